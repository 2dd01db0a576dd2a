"""Standalone command-line tools (importable so tests can call their main())."""
