"""Write a small captioned dataset of coloured shapes at several aspect ratios, with a kohya metadata JSON.

    python tools/make_sample_dataset.py --output sample_data [--count 12] [--size 96] [--seed 0] [--variety full]

Gives ``images/*.png`` with ``.caption`` sidecars and ``meta.json`` (``caption`` and ``tags`` per image, keyed
by stem), which is what ``--in_json meta.json --train_data_dir images`` trains on.

``--variety basic`` (the default) is the small set the tests train on. ``--variety full`` is what the tiny
pretrained models learned from (tools/pretrain_tiny.py): more colours, shapes, backgrounds, sizes, positions and
aspect ratios, each named in the caption. Purple and stars are kept out of it on purpose, so the demo's
``--concept`` data (a purple five-pointed star captioned "a sks star") is something the base has never seen.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
ASPECTS = ((1, 1), (3, 4), (4, 3), (1, 2), (2, 1))

FULL_SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")
FULL_COLOURS = {**COLOURS, "orange": (240, 130, 30), "cyan": (40, 200, 210), "white": (245, 245, 245),
                "black": (20, 20, 20), "brown": (130, 80, 40)}
FULL_BACKGROUNDS = {**BACKGROUNDS, "light blue": (170, 200, 240), "beige": (225, 210, 170)}
FULL_ASPECTS = ((1, 1), (1, 1), (1, 1), (1, 1), (3, 1), (1, 3))  # 64x64, 96x32, 32x96 at --size 64
SIZES = {"small": (0.35, 0.45), "medium": (0.5, 0.62), "large": (0.68, 0.85)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
PURPLE = (140, 50, 200)


def polygon_points(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """Outline of a polygonal shape inside box (left, top, right, bottom)."""
    left, top, right, bottom = box
    cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2
    if shape == "triangle":
        return [(cx, top), (left, bottom), (right, bottom)]
    if shape == "diamond":
        return [(cx, top), (right, cy), (cx, bottom), (left, cy)]
    if shape == "hexagon":
        return [(cx + rx * math.cos(math.pi / 3 * k), cy + ry * math.sin(math.pi / 3 * k)) for k in range(6)]
    if shape == "star":  # five points, inner radius 0.4 of the outer, first point straight up
        return [(cx + (rx if k % 2 == 0 else 0.4 * rx) * math.sin(math.pi / 5 * k),
                 cy - (ry if k % 2 == 0 else 0.4 * ry) * math.cos(math.pi / 5 * k)) for k in range(10)]
    raise ValueError(f"unknown shape {shape!r}")


def paint(image: Image.Image, shape: str, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> None:
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(polygon_points(shape, box), fill=colour)


def place(size: tuple[int, int], extent: int, position: str, rng: random.Random) -> tuple[int, int, int, int]:
    """A box of side extent in the named region of the image (a little jitter, never outside)."""
    width, height = size
    slack_x, slack_y = width - extent, height - extent
    fx = {"left": 0.0, "right": 1.0}.get(next((w for w in position.split() if w in ("left", "right")), ""), 0.5)
    fy = {"top": 0.0, "bottom": 1.0}.get(next((w for w in position.split() if w in ("top", "bottom")), ""), 0.5)
    left = min(slack_x, max(0, round(slack_x * fx + rng.uniform(-0.1, 0.1) * slack_x)))
    top = min(slack_y, max(0, round(slack_y * fy + rng.uniform(-0.1, 0.1) * slack_y)))
    return (left, top, left + extent, top + extent)


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


def full_variety_item(index: int, size: int, rng: random.Random) -> tuple[Image.Image, str, str]:
    """One image of the full vocabulary with its caption and tags.

    The caption starts "a <colour> <shape> on a <background> background" and, for half of the images, goes on
    with the size and place (", large, top left"): a causal text encoder then encodes the plain prompt exactly
    as the start of the longer one.
    """
    shape = FULL_SHAPES[index % len(FULL_SHAPES)]
    background_name = rng.choice(sorted(FULL_BACKGROUNDS))
    colour_name = rng.choice([c for c in sorted(FULL_COLOURS) if FULL_COLOURS[c] != FULL_BACKGROUNDS[background_name]])
    aspect_w, aspect_h = rng.choice(FULL_ASPECTS)
    image_size = (size * aspect_w * 3 // 2 // max(aspect_w, aspect_h), size * aspect_h * 3 // 2 // max(aspect_w, aspect_h))
    image_size = (size, size) if aspect_w == aspect_h else image_size
    size_name = rng.choice(sorted(SIZES))
    position = rng.choice(POSITIONS)
    extent = int(min(image_size) * rng.uniform(*SIZES[size_name]))
    image = Image.new("RGB", image_size, FULL_BACKGROUNDS[background_name])
    paint(image, shape, FULL_COLOURS[colour_name], place(image_size, extent, position, rng))
    article = "an" if colour_name[0] in "aeiou" else "a"
    caption = f"{article} {colour_name} {shape} on a {background_name} background"
    if rng.random() < 0.5:
        caption += f", {size_name}, {position}"
    return image, caption, f"{shape}, {colour_name}, {background_name} background, {size_name}, {position}"


def concept_item(size: int, rng: random.Random) -> Image.Image:
    """A purple five-pointed star on white, of varying size and place: the demo's new concept."""
    image = Image.new("RGB", (size, size), FULL_BACKGROUNDS["white"])
    extent = int(size * rng.uniform(0.55, 0.8))
    paint(image, "star", PURPLE, place((size, size), extent, rng.choice(POSITIONS), rng))
    return image


def make_sample_dataset(output: Path, count: int = 12, size: int = 96, seed: int = 0, variety: str = "basic",
                        concept_caption: str | None = None) -> Path:
    """Create ``output/images`` and ``output/meta.json``; returns the metadata path.

    ``variety`` is "basic" (the test set), "full" (the pretraining vocabulary) or "concept" (purple stars, all
    captioned ``concept_caption``).
    """
    if variety in ("full", "concept"):
        return _write_items(output, count, size, seed, variety, concept_caption or "a sks star")
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


def _write_items(output: Path, count: int, size: int, seed: int, variety: str, concept_caption: str) -> Path:
    rng = random.Random(seed)
    images = output / "images"
    images.mkdir(parents=True, exist_ok=False)
    metadata = {}
    for index in range(count):
        if variety == "full":
            image, caption, tags = full_variety_item(index, size, rng)
        else:
            image, caption, tags = concept_item(size, rng), concept_caption, "star, purple, white background"
        stem = f"shape_{index:05d}"
        image.save(images / f"{stem}.png")
        (images / f"{stem}.caption").write_text(caption + "\n", encoding="utf-8")
        metadata[stem] = {"caption": caption, "tags": tags}
    meta_path = output / "meta.json"
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return meta_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=96, help="long side in pixels (at least 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variety", choices=("basic", "full", "concept"), default="basic",
                        help="basic: the small test set; full: the pretraining vocabulary; concept: purple stars")
    parser.add_argument("--concept_caption", default="a sks star", help="caption of every --variety concept image")
    args = parser.parse_args(argv)
    if Path(args.output).exists():
        parser.error(f"{args.output} already exists; choose a new --output")
    meta = make_sample_dataset(Path(args.output), args.count, max(64, args.size), args.seed, args.variety,
                               args.concept_caption)
    print(f"wrote {args.count} images and {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
