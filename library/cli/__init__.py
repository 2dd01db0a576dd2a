"""Command-line layer: argument groups, --config_file, and the flow every script shares; the only package that sees argparse namespaces."""
