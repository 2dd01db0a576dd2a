"""Turn a folder of captioned images into the original ControlNet training layout (lllyasviel/ControlNet's
``training/fill50k``): control images computed with a conditioning filter, the images, and a prompt list.

    python tools/make_controlnet_dataset.py IMAGE_DIR OUTPUT_DIR [--caption_extension .caption]
        [--filter canny] [--filter_args low=100 high=200] [--copy]

Writes, for the n-th captioned image (sorted by file name, numbered from 0)::

    OUTPUT_DIR/source/<n>.png   the control image (``library.data.conditioning`` filter, as in training)
    OUTPUT_DIR/target/<n>.png   the image as training loads it (EXIF rotation applied, transparency on white)
    OUTPUT_DIR/prompt.json      one JSON object per line:
                                {"source": "source/0.png", "target": "target/0.png", "prompt": "..."}

Paths in prompt.json are relative to its folder. ``--copy`` copies each image file unchanged instead of
re-encoding it as PNG (``target/<n>.jpg`` keeps a JPEG's bytes and size on disk; the control image is still
computed from the EXIF-rotated pixels, which is how PIL with exif_transpose and OpenCV's imread read it back).

Images without a caption file (``<stem><caption_extension>``, UTF-8) or with an empty one are listed and
skipped; an unreadable image is reported and skipped and makes the exit status 1. OUTPUT_DIR must be new
or empty, so a second run never mixes two datasets in one prompt.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from library.data.conditioning import FILTERS, ConditioningFilter, make_filter
from library.data.images import load_rgb
from library.data.metadata import (
    MetadataError,
    format_names,
    list_images,
    normalize_extension,
    read_side_file,
    side_file,
)


@dataclass(frozen=True)
class Entry:
    """One line of prompt.json."""

    source: str
    target: str
    prompt: str

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "target": self.target, "prompt": self.prompt}, ensure_ascii=False)


def find_captions(images: Sequence[Path], extension: str) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(image, caption) for every image with a non-empty caption file, and the images without one."""
    captioned: list[tuple[Path, str]] = []
    missing: list[Path] = []
    for image in images:
        caption_path = side_file(image, extension)
        caption = read_side_file(caption_path) if caption_path.is_file() else ""
        if caption:
            captioned.append((image, caption))
        else:
            missing.append(image)
    return captioned, missing


def write_pair(image_path: Path, index: int, output_dir: Path, conditioning_filter: ConditioningFilter,
               copy: bool) -> tuple[str, str]:
    """Write the control image and the target of one image; returns their paths relative to output_dir."""
    image = load_rgb(image_path)
    source = f"source/{index}.png"
    conditioning_filter(image).save(output_dir / source, format="PNG")
    if copy:
        target = f"target/{index}{image_path.suffix.lower()}"
        shutil.copyfile(image_path, output_dir / target)
    else:
        target = f"target/{index}.png"
        image.save(output_dir / target, format="PNG")
    return source, target


def make_controlnet_dataset(captioned: Sequence[tuple[Path, str]], output_dir: Path,
                            conditioning_filter: ConditioningFilter, copy: bool = False
                            ) -> tuple[list[Entry], list[str]]:
    """Write source/, target/ and prompt.json for ``captioned``; returns the entries and the errors of images
    that could not be read (they are skipped, and the numbering stays contiguous)."""
    (output_dir / "source").mkdir(parents=True)
    (output_dir / "target").mkdir()
    entries: list[Entry] = []
    errors: list[str] = []
    for image_path, caption in captioned:
        try:
            source, target = write_pair(image_path, len(entries), output_dir, conditioning_filter, copy)
        except (OSError, ValueError) as error:  # PIL: UnidentifiedImageError, truncated files, ...
            errors.append(f"{image_path}: {type(error).__name__}: {error}")
            continue
        entries.append(Entry(source, target, caption))
    text = "".join(entry.to_json() + "\n" for entry in entries)
    (output_dir / "prompt.json").write_text(text, encoding="utf-8", newline="\n")
    return entries, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image_dir", help="folder of images with caption files")
    parser.add_argument("output_dir", help="folder to create (or an empty one)")
    parser.add_argument("--caption_extension", default=".caption", help="caption file extension (default .caption)")
    parser.add_argument("--filter", default="canny", choices=sorted(FILTERS),
                        help="conditioning filter (default canny)")
    parser.add_argument("--filter_args", nargs="*", default=[], metavar="KEY=VALUE",
                        help="filter options, e.g. low=100 high=200")
    parser.add_argument("--copy", action="store_true",
                        help="copy the image files unchanged instead of re-encoding them as PNG")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        conditioning_filter = make_filter(args.filter, args.filter_args)
        extension = normalize_extension(args.caption_extension)
        images = list_images(args.image_dir)
        captioned, missing = find_captions(images, extension)
    except (ValueError, MetadataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        print(f"error: {output_dir} exists and is not an empty folder; choose a new OUTPUT_DIR", file=sys.stderr)
        return 2
    if missing:
        print(f"skipped {len(missing)} image(s) without a {extension} caption: "
              f"{format_names(p.name for p in missing)}", file=sys.stderr)
    if not captioned:
        print(f"error: no image in {args.image_dir} has a {extension} caption", file=sys.stderr)
        return 1
    entries, errors = make_controlnet_dataset(captioned, output_dir, conditioning_filter, args.copy)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"wrote {len(entries)} pair(s) ({conditioning_filter.name}) and {output_dir / 'prompt.json'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
