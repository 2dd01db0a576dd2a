"""Merge WD14 / DeepDanbooru tag files into a fine-tuning metadata JSON (kohya's merge_dd_tags_to_metadata.py).

    python tools/merge_dd_tags_to_metadata.py train_data_dir meta_cap_dd.json --in_json meta_cap.json

For each image (png/jpg/jpeg/webp/bmp, any letter case) the whole `<stem><caption_extension>` file
(default .txt, what the taggers write), stripped, becomes the entry's `tags`; captions and other fields of
existing entries are kept. The starting metadata is --in_json, or out_json itself when it already exists,
else empty. out_json may equal --in_json: the file is replaced atomically. Keys are bare stems, relative
paths without extension with --recursive, absolute paths with --full_path. Images without a tag file are
listed on stderr and left out.
"""

from __future__ import annotations

import argparse
import sys


from library.data.metadata import run_merge


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", help="folder with the training images and their tag files")
    parser.add_argument("out_json", help="metadata JSON to write (may be the same file as --in_json)")
    parser.add_argument("--in_json", default=None,
                        help="metadata JSON to start from (default: out_json if it exists, else empty)")
    parser.add_argument("--caption_extension", default=".txt", help="tag file extension (default .txt)")
    parser.add_argument("--full_path", action="store_true", help="use absolute image paths as keys")
    parser.add_argument("--recursive", action="store_true",
                        help="also look in sub-folders (keys become relative paths unless --full_path)")
    parser.add_argument("--debug", action="store_true", help="print each key and its tags")
    args = parser.parse_args(argv)

    return run_merge(args, "tags", args.caption_extension)


if __name__ == "__main__":
    sys.exit(main())
