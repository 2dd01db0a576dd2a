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

import sys

from library.cli.metadata_merge import build_merge_parser, run_merge


def main(argv: list[str] | None = None) -> int:
    parser = build_merge_parser(__doc__, side_file="tag", default_extension=".txt", shown="its tags")
    args = parser.parse_args(argv)

    return run_merge(args, "tags", args.caption_extension)


if __name__ == "__main__":
    sys.exit(main())
