"""tools/tag_images_by_wd14_tagger.py's command line (kohya's flags and meaning) -> TaggerOptions."""

from __future__ import annotations

import argparse
from pathlib import Path

from library.data.caption_files import APPEND, KEEP, OVERWRITE, LabellingError
from library.data.tagging import TaggerOptions
from library.data.wd14_model import DEFAULT_MODEL_DIR, DEFAULT_REPO_ID
from library.data.wd14_tags import (ARTIST, CHARACTER, COPYRIGHT, GENERAL, META, MODEL, TagLabelError, TagOptions,
                                    parse_tag_replacement, split_tags)

_CATEGORY_FLAGS = {GENERAL: "general", CHARACTER: "character", META: "meta", MODEL: "model",
                   COPYRIGHT: "copyright", ARTIST: "artist"}


def build_tagger_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", help="folder of the images to tag")
    parser.add_argument("--repo_id", default=DEFAULT_REPO_ID,
                        help="tagger on the Hugging Face hub: owner/name (model.onnx + selected_tags.csv) or "
                             "owner/name/subfolder (model_optimized.onnx + tag_mapping.json)")
    parser.add_argument("--model_dir", default=DEFAULT_MODEL_DIR,
                        help="where models live: MODEL_DIR/<repo_id with / as _>/ (kohya's place; reused)")
    parser.add_argument("--force_download", action="store_true", help="download the model files again")
    parser.add_argument("--onnx", action="store_true",
                        help="accepted for kohya's command lines: models always run through onnxruntime")
    parser.add_argument("--batch_size", type=int, default=1, help="images per inference batch")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="DataLoader workers decoding and resizing images (default: in the main process)")
    parser.add_argument("--caption_extension", default=".txt", help="extension of the tag files written")
    parser.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's old spelling
    parser.add_argument("--output_path", default=None,
                        help="write all tags to this JSON file ({path: {tags, image_size}}; .jsonl: one "
                             "{image_path, caption, image_size} per line) instead of tag files")
    parser.add_argument("--thresh", type=float, default=0.35, help="score a tag needs (default for every category)")
    for category, name in _CATEGORY_FLAGS.items():
        parser.add_argument(f"--{name}_threshold", type=float, default=None,
                            help=f"score a {category} tag needs (default --thresh; above 1 turns them off)")
    parser.add_argument("--recursive", action="store_true", help="tag images in sub-folders too")
    parser.add_argument("--remove_underscore", action="store_true",
                        help="write tags longer than 3 characters with spaces instead of underscores")
    parser.add_argument("--undesired_tags", default="", help="tags never written, separated like the output")
    parser.add_argument("--frequency_tags", action="store_true", help="print how often every tag was written")
    parser.add_argument("--append_tags", action="store_true",
                        help="add the new tags to an existing tag file (missing ones only) instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="replace existing tag files (default: kept)")
    parser.add_argument("--use_rating_tags", action="store_true", help="write the rating tag first")
    parser.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="write the rating tag last")
    parser.add_argument("--use_quality_tags", action="store_true",
                        help="write the quality tag first (tag_mapping.json models)")
    parser.add_argument("--use_quality_tags_as_last_tag", action="store_true", help="write the quality tag last")
    parser.add_argument("--character_tags_first", action="store_true", help="write character tags before the others")
    parser.add_argument("--character_tag_expand", action="store_true",
                        help="write a character tag name_(series) as two tags: name, series")
    parser.add_argument("--always_first_tags", default=None,
                        help="tags written first when present, in this order, e.g. `1girl,1boy`")
    parser.add_argument("--caption_separator", default=", ", help="separator between tags (spaces included)")
    parser.add_argument("--tag_replacement", default=None,
                        help="`source1,target1;source2,target2`; escape , and ; inside a tag as \\, and \\;")
    parser.add_argument("--debug", action="store_true", help="print every image's tags")
    return parser


def _placement(args: argparse.Namespace, first: str, last: str) -> str | None:
    if getattr(args, first) and getattr(args, last):
        raise LabellingError(f"--{first} and --{last} both given: pass one (first or last place)")
    return "first" if getattr(args, first) else "last" if getattr(args, last) else None


def tagger_options_from_args(args: argparse.Namespace) -> TaggerOptions:
    """Checks every flag (one LabellingError line naming it) before anything is loaded."""
    if args.batch_size < 1:
        raise LabellingError(f"--batch_size {args.batch_size}: must be 1 or more")
    workers = args.max_data_loader_n_workers or 0
    if workers < 0:
        raise LabellingError(f"--max_data_loader_n_workers {workers}: must be 0 or more")
    if args.append_tags and args.overwrite:
        raise LabellingError("--append_tags and --overwrite both given: pass one")
    if not args.caption_separator:
        raise LabellingError("--caption_separator is empty: pass e.g. ', '")
    thresholds = {}
    for category, name in _CATEGORY_FLAGS.items():
        value = getattr(args, f"{name}_threshold")
        thresholds[category] = args.thresh if value is None else value
    try:
        replacements = parse_tag_replacement(args.tag_replacement) if args.tag_replacement else ()
    except TagLabelError as error:
        raise LabellingError(str(error)) from error
    separator = args.caption_separator
    tags = TagOptions(thresholds=thresholds, separator=separator, remove_underscore=args.remove_underscore,
                      undesired=frozenset(split_tags(args.undesired_tags, separator)),
                      always_first=tuple(split_tags(args.always_first_tags or "", separator)),
                      character_first=args.character_tags_first, character_expand=args.character_tag_expand,
                      rating=_placement(args, "use_rating_tags", "use_rating_tags_as_last_tag"),
                      quality=_placement(args, "use_quality_tags", "use_quality_tags_as_last_tag"),
                      replacements=replacements)
    return TaggerOptions(
        train_data_dir=Path(args.train_data_dir), repo_id=args.repo_id, model_dir=Path(args.model_dir), tags=tags,
        force_download=args.force_download, batch_size=args.batch_size, num_workers=workers,
        caption_extension=args.caption_extention or args.caption_extension, recursive=args.recursive,
        mode=APPEND if args.append_tags else OVERWRITE if args.overwrite else KEEP,
        output_path=Path(args.output_path) if args.output_path else None, debug=args.debug)
