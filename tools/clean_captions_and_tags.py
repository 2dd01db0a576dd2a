"""Clean the captions and tags of a fine-tuning metadata JSON (kohya's finetune/clean_captions_and_tags.py).

    python tools/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json

Every entry's `tags` and `caption` are rewritten by kohya's rules, in this order (deterministic, and pinned
one by one in tests/test_metadata_tools.py):

Tags (a string of tags separated by ", "):
  1. every `_` becomes a space, except in the kaomoji `^_^`: `long_hair` -> `long hair`;
  2. DeepDanbooru ratings are cut: everything from the first ", rating" on is dropped
     (`1girl, solo, rating:safe` -> `1girl, solo`); several ratings also print a warning;
  3. only if some tag contains "girls" or "boys" (2girls, multiple boys, ...), per-person tags are dropped
     when they disagree: for each group -- hair length (long/short/medium hair), hair cut (bob/hime cut),
     `X eyes`, `X sleeves`/sleeveless, hair style (ponytail, braid, ahoge, twintails, `X bun`, single hair
     bun, single side bun, two side up, two tails, `X braid`, sidelocks) -- a group with two or more tags
     loses all of them; then if two or more one-word `X hair` tags remain (colours, "messy hair", ...),
     they all go, except the one hair-length tag left by the first step;
  4. a one-word tag (or "hair ornament") is dropped when a longer tag ends with it after whole words:
     `shirt, white shirt` -> `white shirt` (`off-shoulder shirt` does not count: `-` is not a word letter);
  5. the tags are joined again with ", ".
Captions: the fixed (find, replace) list `library.data.metadata.CAPTION_REPLACEMENTS` (anime/cartoon woman,
lady, female, person, people ... -> girl/girls, "young " removed, "a cartoon image" -> "an image", ...),
applied in order, each until it no longer matches. They are plain substring replacements, exactly as in
kohya ("personal" becomes "girlal"); use them only for BLIP-style captions of anime pictures.

Entries without tags or caption are kept and counted. out_json may be in_json (written atomically).
kohya's old three-argument form `train_data_dir in_json out_json` still works, with a warning.
"""

from __future__ import annotations

import argparse
import sys

from library.data.metadata import MetadataError, clean_metadata, format_names, load_metadata, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("in_json", help="metadata JSON to read")
    parser.add_argument("out_json", help="metadata JSON to write (may be the same file)")
    parser.add_argument("legacy_out_json", nargs="?", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="print every changed caption and tag string")
    args = parser.parse_args(argv)
    in_json, out_json = args.in_json, args.out_json
    if args.legacy_out_json is not None:  # kohya's old form: train_data_dir in_json out_json
        print(f"warning: the train_data_dir argument ({in_json}) is ignored; pass only in_json and out_json",
              file=sys.stderr)
        in_json, out_json = args.out_json, args.legacy_out_json

    try:
        report = clean_metadata(load_metadata(in_json), source=in_json)
        write_json_atomic(out_json, report.metadata)
    except MetadataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.debug:
        for key, name, before, after in report.changed:
            print(f"{key} [{name}]\nFROM: {before}\nTO:   {after}")
    print(f"cleaned {len(report.metadata)} entries of {in_json} ({len(report.changed)} values changed) "
          f"-> {out_json}")
    if report.no_tags:
        print(f"note: {len(report.no_tags)} entries have no tags: {format_names(report.no_tags)}", file=sys.stderr)
    if report.no_caption:
        print(f"note: {len(report.no_caption)} entries have no caption: {format_names(report.no_caption)}",
              file=sys.stderr)
    if report.several_ratings:
        print(f"warning: {len(report.several_ratings)} entries have several ratings in their tags "
              f"(kept the tags before the first): {format_names(report.several_ratings)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
