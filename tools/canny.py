"""Write a Canny edge map for every image of a folder: the conditioning_data_dir of a canny ControlNet.

    python tools/canny.py INPUT_DIR OUTPUT_DIR [--low 100] [--high 200] [--workers 4] [--overwrite]

Every image directly in INPUT_DIR (png/jpg/jpeg/webp/bmp, any letter case; sub-folders are not read) becomes
``OUTPUT_DIR/<same stem>.png``: white edges on black, 3 channels, the size of the image as displayed (EXIF
rotation applied, transparency on white, exactly as training loads it), computed by
``library.data.conditioning.CannyFilter`` -- the filter ``--conditioning_filter canny`` applies during training,
so pre-computed and on-the-fly maps are identical. The training dataset matches a conditioning image to its
target by stem, so the PNG extension does not have to match the image's.

Existing output files are kept (and counted as skipped) unless --overwrite; each map is written to a temp file
and renamed, so an interrupted run never leaves a half-written PNG that a re-run would skip. Two inputs with
one stem (``a.jpg`` and ``a.png``) would write the same file, so the tool refuses them before writing anything.
Exit status 1 when an image could not be read.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from library.data.conditioning import CannyFilter, ConditioningFilter
from library.data.images import load_rgb
from library.data.metadata import MetadataError, format_names, list_images
from library.io import atomic_write_file


def duplicate_stems(images: Sequence[Path]) -> list[str]:
    """``a.jpg, a.png`` for each group of inputs that would write one output file."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for image in images:
        by_stem[image.stem].append(image.name)
    return [", ".join(names) for names in by_stem.values() if len(names) > 1]


def convert_one(source: Path, target: Path, conditioning_filter: ConditioningFilter) -> str | None:
    """Write the control image of ``source`` to ``target``; returns an error message, or None."""
    try:
        control = conditioning_filter(load_rgb(source))
    except (OSError, ValueError) as error:  # PIL: UnidentifiedImageError, truncated files, ...
        return f"{source}: {type(error).__name__}: {error}"
    atomic_write_file(target, lambda handle: control.save(handle, format="PNG"))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", help="folder of images")
    parser.add_argument("output_dir", help="folder for the edge maps (created if missing)")
    parser.add_argument("--low", type=int, default=100, help="Canny lower hysteresis threshold (default 100)")
    parser.add_argument("--high", type=int, default=200, help="Canny upper hysteresis threshold (default 200)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="images processed in parallel (threads; OpenCV and PIL release the GIL)")
    parser.add_argument("--overwrite", action="store_true", help="replace edge maps that already exist")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        conditioning_filter = CannyFilter(low=args.low, high=args.high)
        images = list_images(args.input_dir)
    except (ValueError, MetadataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    if output_dir.resolve() == Path(args.input_dir).resolve():
        print("error: OUTPUT_DIR is INPUT_DIR: the edge maps would replace the PNG images", file=sys.stderr)
        return 2
    clashes = duplicate_stems(images)
    if clashes:
        print(f"error: these images share a stem and would write one edge map: {'; '.join(clashes)}; "
              "rename them", file=sys.stderr)
        return 2
    output_dir.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[Path, Path]] = []
    skipped: list[Path] = []
    for image in images:
        target = output_dir / f"{image.stem}.png"
        if target.exists() and not args.overwrite:
            skipped.append(target)
        else:
            jobs.append((image, target))
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        errors = [e for e in pool.map(lambda job: convert_one(*job, conditioning_filter), jobs) if e is not None]

    summary = f"wrote {len(jobs) - len(errors)} edge map(s) to {output_dir}; skipped {len(skipped)} existing"
    print(summary + (" (--overwrite replaces them)" if skipped else ""))
    if skipped:
        print(f"skipped: {format_names(p.name for p in skipped)}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
