"""What the merge_*_to_metadata tools share: their flags, and the body (one report, or one error line, out)."""

from __future__ import annotations

import argparse
import sys

from library.data.metadata import MetadataError, merge_report_lines, merge_side_files


def build_merge_parser(description: str, *, side_file: str, default_extension: str,
                       shown: str) -> argparse.ArgumentParser:
    """The flags of both merge tools. ``side_file``: what the files hold, for the help ("caption", "tag");
    ``shown``: what --debug prints after each key ("its caption", "its tags")."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", help=f"folder with the training images and their {side_file} files")
    parser.add_argument("out_json", help="metadata JSON to write (may be the same file as --in_json)")
    parser.add_argument("--in_json", default=None,
                        help="metadata JSON to start from (default: out_json if it exists, else empty)")
    parser.add_argument("--caption_extension", default=default_extension,
                        help=f"{side_file} file extension (default {default_extension})")
    parser.add_argument("--full_path", action="store_true", help="use absolute image paths as keys")
    parser.add_argument("--recursive", action="store_true",
                        help="also look in sub-folders (keys become relative paths unless --full_path)")
    parser.add_argument("--debug", action="store_true", help=f"print each key and {shown}")
    return parser


def run_merge(args: argparse.Namespace, field_name: str, extension: str) -> int:
    """The body of the merge_*_to_metadata tools: merge, report, and turn bad input into one error line."""
    try:
        report = merge_side_files(args.train_data_dir, args.out_json, field_name=field_name, extension=extension,
                                  in_json=args.in_json, full_path=args.full_path, recursive=args.recursive)
        info, warnings = merge_report_lines(report, field_name, extension, args.out_json)
    except MetadataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.debug:
        for key, text in report.merged.items():
            print(f"{key} {text}")
    print("\n".join(info))
    for line in warnings:
        print(line, file=sys.stderr)
    return 0

