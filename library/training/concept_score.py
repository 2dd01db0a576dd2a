"""A concept score from pixels: does an image show "a <colour> <shape> on a <background> background"?

Used where training must be seen to learn (tools/demo.py, tools/pretrain_tiny.py, tests/test_learning.py) on
the flat-coloured shapes of tools/make_sample_dataset.py. No model is involved, only measures a person would
check by eye, each in [0, 1]:

- colour: the share of pixels near the named colour (and nearer to it than to the background) is plausible for
  one shape (4 % - 60 % of the image);
- background: the other pixels are near the named background colour;
- shape: on the colour mask, the number of corners / star points (peaks of the outline's distance from the
  centroid, by angle) and the fill ratio (area / bounding box) match the named shape (a circle has no peaks and
  fills pi/4 of its box, a five-pointed star has 5 peaks and fills about 0.4);
- position (only when one is named, "top left" ...): the mask's centroid is in that part of the image.

The score is their mean. ``foreground_iou`` compares where a shape is with where a mask says it should be (the
ControlNet's control fidelity).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

NAMED_COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "orange": (240, 130, 30), "cyan": (40, 200, 210), "white": (245, 245, 245), "black": (20, 20, 20),
    "brown": (130, 80, 40), "grey": (128, 128, 128), "light blue": (170, 200, 240), "beige": (225, 210, 170),
    "purple": (140, 50, 200),
}
# expected (outline peaks, area / bounding-box area) of each shape as tools/make_sample_dataset.py draws it
SHAPE_SIGNATURES = {"circle": (0, math.pi / 4), "square": (4, 1.0), "triangle": (3, 0.5), "diamond": (4, 0.5),
                    "hexagon": (6, 0.75), "star": (5, 0.4)}
POSITION_CENTRES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
                    "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}
COLOUR_DISTANCE = 90.0  # RGB distance under which a pixel counts as a named colour


@dataclass(frozen=True)
class Concept:
    colour: tuple[int, int, int]
    shape: str | None = None
    background: tuple[int, int, int] | None = None
    position: str | None = None


def parse_concept(prompt: str) -> Concept:
    """Read "a red circle on a white background[, large, top left]" (the captions of the shapes data)."""
    names = "|".join(sorted(NAMED_COLOURS, key=len, reverse=True))
    match = re.search(rf"\b({names}) ({'|'.join(SHAPE_SIGNATURES)})\b", prompt)
    if match is None:
        raise ValueError(f"no '<colour> <shape>' in prompt {prompt!r}")
    background = re.search(rf"on an? ({names}) background", prompt)
    position = next((p for p in POSITION_CENTRES if p in prompt), None)
    return Concept(NAMED_COLOURS[match.group(1)], match.group(2),
                   NAMED_COLOURS[background.group(1)] if background else None, position)


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    return array[..., :3]


def _near(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.linalg.norm(pixels - np.asarray(colour, dtype=np.float32), axis=-1)


def colour_mask(image: Image.Image | np.ndarray, concept: Concept) -> np.ndarray:
    pixels = _pixels(image)
    distance = _near(pixels, concept.colour)
    mask = distance < COLOUR_DISTANCE
    if concept.background is not None:
        mask &= distance < _near(pixels, concept.background)
    return mask


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a mask (stray pixels of the same colour do not make a shape)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def shape_measures(mask: np.ndarray) -> dict[str, float]:
    """Outline peaks (corners / star points), fill ratio and centroid (x, y in 0..1) of the largest blob of a
    mask, and the share of the image the whole mask covers."""
    height, width = mask.shape
    total = mask.sum() / mask.size
    mask = largest_blob(mask)
    ys, xs = np.nonzero(mask)
    if len(xs) < 4:
        return {"area": float(total), "peaks": 0.0, "fill": 0.0, "cx": 0.5, "cy": 0.5}
    cy, cx = ys.mean(), xs.mean()
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    by, bx = np.nonzero(mask & ~inner)
    bins = 36
    angle = ((np.arctan2(by - cy, bx - cx) + math.pi) / (2 * math.pi) * bins).astype(int) % bins
    radius = np.hypot(by - cy, bx - cx) + 0.5
    profile = np.zeros(bins)
    np.maximum.at(profile, angle, radius)
    for index in np.nonzero(profile == 0)[0]:  # empty angle bins (tiny shapes): borrow the neighbours
        profile[index] = max(profile[(index - 1) % bins], profile[(index + 1) % bins])
    smooth = (np.roll(profile, 1) + 2 * profile + np.roll(profile, -1)) / 4
    peaks = 0
    for index in range(bins):
        window = [smooth[(index + k) % bins] for k in range(-3, 4)]
        if smooth[index] == max(window) and smooth[index] - min(window) > 0.12 * smooth.mean():
            peaks += 1
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return {"area": float(total), "peaks": float(peaks), "fill": len(xs) / box,
            "cx": (cx + 0.5) / width, "cy": (cy + 0.5) / height}


def concept_parts(image: Image.Image | np.ndarray, concept: Concept) -> dict[str, float]:
    """Each measure's score (colour, background, shape, position when named) and the raw shape measures."""
    mask = colour_mask(image, concept)
    measures = shape_measures(mask)
    area = measures["area"]
    parts = {"colour": min(1.0, area / 0.04) if area <= 0.6 else max(0.0, 1 - (area - 0.6) / 0.4)}
    if concept.background is not None:
        rest = ~mask
        near = _near(_pixels(image), concept.background)[rest] < COLOUR_DISTANCE
        parts["background"] = float(near.mean()) if rest.any() else 0.0
    if concept.shape is not None:
        peaks, fill = SHAPE_SIGNATURES[concept.shape]
        match = 0.5 * max(0.0, 1 - abs(measures["peaks"] - peaks) / 2) + 0.5 * max(0.0, 1 - abs(measures["fill"] - fill) / 0.25)
        parts["shape"] = match if area >= 0.01 else 0.0
    if concept.position is not None:
        x, y = POSITION_CENTRES[concept.position]
        distance = math.hypot(measures["cx"] - x, measures["cy"] - y)
        parts["position"] = max(0.0, 1 - distance / 0.5) if area >= 0.01 else 0.0
    return {**parts, **{f"measure_{k}": v for k, v in measures.items()}}


def concept_score(image: Image.Image | np.ndarray, concept: Concept | str) -> float:
    """Mean of the colour, background, shape (and position) scores; 1.0 is a clean match."""
    concept = parse_concept(concept) if isinstance(concept, str) else concept
    parts = concept_parts(image, concept)
    scores = [v for k, v in parts.items() if not k.startswith("measure_")]
    return float(sum(scores) / len(scores))


def mean_concept_score(images: list[Image.Image], concept: Concept | str) -> float:
    return float(np.mean([concept_score(image, concept) for image in images]))


def foreground_iou(image: Image.Image | np.ndarray, target: np.ndarray, background: tuple[int, int, int]) -> float:
    """IoU of the pixels that are not the background colour with a target mask (control fidelity)."""
    foreground = _near(_pixels(image), background) > COLOUR_DISTANCE / 2
    union = (foreground | target).sum()
    return float((foreground & target).sum() / union) if union else 1.0
