"""Tag a folder of images with a WD14 tagger (kohya's finetune/tag_images_by_wd14_tagger.py, same flags).

    python tools/tag_images_by_wd14_tagger.py train_data_dir --batch_size 8 --remove_underscore
    python tools/tag_images_by_wd14_tagger.py train_data_dir --repo_id SmilingWolf/wd-vit-tagger-v3 \\
        --general_threshold 0.35 --character_threshold 0.85 --use_rating_tags --output_path tags.jsonl

Writes `<image stem>.txt` (--caption_extension) per image with the tags whose score reaches their
category's threshold. An existing tag file is kept unless --overwrite (replace) or --append_tags (add the
missing tags). The model is read from MODEL_DIR/<repo_id with / as _>/ (kohya's place, so its downloads are
reused), downloaded from the hub when missing; offline (HF_HUB_OFFLINE=1) a missing model is an error that
says what to download where. Needs onnxruntime (pip install onnxruntime==1.32.0; onnxruntime-gpu for CUDA).
Tag selection and ordering rules: library/data/wd14_tags.py.
"""

from __future__ import annotations

import sys

from library.cli.tagger_args import build_tagger_parser, tagger_options_from_args
from library.data.caption_files import LabellingError, most_frequent
from library.data.tagging import run_tagger
from library.data.wd14_tags import TagLabelError


def main(argv: list[str] | None = None) -> int:
    args = build_tagger_parser(__doc__).parse_args(argv)
    try:
        summary = run_tagger(tagger_options_from_args(args))
    except (LabellingError, TagLabelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, count in most_frequent(summary.counts):
            print(f"{tag}: {count}")
    for line in summary.lines(what="tagged", unit="tags", flag_hint="--overwrite or --append_tags"):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
