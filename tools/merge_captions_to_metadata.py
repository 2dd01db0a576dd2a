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


from library.data.metadata import run_merge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", help="folder with the training images and their caption files")
    parser.add_argument("out_json", help="metadata JSON to write (may be the same file as --in_json)")
    parser.add_argument("--in_json", default=None,
                        help="metadata JSON to start from (default: out_json if it exists, else empty)")
    parser.add_argument("--caption_extension", default=".caption", help="caption file extension (default .caption)")
    parser.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's old spelling
    parser.add_argument("--full_path", action="store_true", help="use absolute image paths as keys")
    parser.add_argument("--recursive", action="store_true",
                        help="also look in sub-folders (keys become relative paths unless --full_path)")
    parser.add_argument("--debug", action="store_true", help="print each key and its caption")
    args = parser.parse_args(argv)
    extension = args.caption_extention or args.caption_extension

    return run_merge(args, "caption", extension)


if __name__ == "__main__":
    sys.exit(main())
