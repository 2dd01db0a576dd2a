"""Write a small captioned dataset of coloured shapes at several aspect ratios, with a kohya metadata JSON.

    python tools/make_sample_dataset.py --output sample_data [--count 12] [--size 96] [--seed 0]

Gives ``images/*.png`` with ``.caption`` sidecars and ``meta.json`` (``caption`` and ``tags`` per image, keyed
by stem), which is what ``--in_json meta.json --train_data_dir images`` trains on.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
ASPECTS = ((1, 1), (3, 4), (4, 3), (1, 2), (2, 1))


def draw_shape(size: tuple[int, int], shape: str, colour: tuple[int, int, int], background: tuple[int, int, int],
               rng: random.Random) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    extent = int(min(width, height) * rng.uniform(0.4, 0.7))
    left = rng.randint(0, width - extent)
    top = rng.randint(0, height - extent)
    box = (left, top, left + extent, top + extent)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=colour)
    return image


def make_sample_dataset(output: Path, count: int = 12, size: int = 96, seed: int = 0) -> Path:
    """Create ``output/images`` and ``output/meta.json``; returns the metadata path."""
    rng = random.Random(seed)
    images = output / "images"
    images.mkdir(parents=True, exist_ok=False)
    metadata = {}
    for index in range(count):
        shape = SHAPES[index % len(SHAPES)]
        colour_name = rng.choice(sorted(COLOURS))
        background_name = rng.choice(sorted(BACKGROUNDS))
        aspect_w, aspect_h = ASPECTS[index % len(ASPECTS)]
        scale = size / max(aspect_w, aspect_h)
        image_size = (max(64, int(aspect_w * scale)), max(64, int(aspect_h * scale)))
        image = draw_shape(image_size, shape, COLOURS[colour_name], BACKGROUNDS[background_name], rng)
        stem = f"shape_{index:03d}"
        image.save(images / f"{stem}.png")
        caption = f"a {colour_name} {shape} on a {background_name} background"
        (images / f"{stem}.caption").write_text(caption + "\n", encoding="utf-8")
        metadata[stem] = {"caption": caption, "tags": f"{shape}, {colour_name}, {background_name} background, simple"}
    meta_path = output / "meta.json"
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return meta_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=96, help="long side in pixels (at least 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.output).exists():
        parser.error(f"{args.output} already exists; choose a new --output")
    meta = make_sample_dataset(Path(args.output), args.count, max(64, args.size), args.seed)
    print(f"wrote {args.count} images and {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
