"""Merge caption files into a fine-tuning metadata JSON (kohya's finetune/merge_captions_to_metadata.py).

    python tools/merge_captions_to_metadata.py train_data_dir meta_cap.json
    python tools/merge_captions_to_metadata.py train_data_dir meta.json --in_json meta.json --full_path

For each image (png/jpg/jpeg/webp/bmp, any letter case) the whole `<stem><caption_extension>` file,
stripped, becomes the entry's `caption`; other fields of existing entries are kept. The starting metadata
is --in_json, or out_json itself when it already exists (so a second run updates the file), else empty.
out_json may equal --in_json: the file is replaced atomically. Keys are bare stems, relative paths without
extension with --recursive, absolute paths with --full_path. Images without a caption file are listed
on stderr and left out.
"""

from __future__ import annotations

import argparse
import sys

from library.cli.metadata_merge import build_merge_parser, run_merge


def main(argv: list[str] | None = None) -> int:
    parser = build_merge_parser(__doc__, side_file="caption", default_extension=".caption", shown="its caption")
    parser.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's old spelling
    args = parser.parse_args(argv)
    extension = args.caption_extention or args.caption_extension

    return run_merge(args, "caption", extension)


if __name__ == "__main__":
    sys.exit(main())
