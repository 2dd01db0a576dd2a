"""Sample the tiny models on shape prompts and score what they draw (tools/demo.py, pretrain_tiny, tests).

The same prompts and seeds always give the same images (one CPU thread, seeded generators per image), so
a before/after comparison differs only by the weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from library.training.concept_score import Concept, concept_score

EVAL_PROMPTS = ("a red circle on a white background", "a blue square on a black background",
                "a yellow triangle on a grey background", "a green circle on a light blue background",
                "a white diamond on a black background")


@torch.no_grad()
def sample(pipe: Any, prompt: str, seeds: Sequence[int], *, steps: int = 16, guidance: float = 4.0,
           size: int = 64, negative_prompt: str = "") -> list[Image.Image]:
    """One image per seed (a batch), Euler sampling at size x size."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    result = pipe(prompt=[prompt] * len(seeds), negative_prompt=[negative_prompt] * len(seeds), height=size,
                  width=size, num_inference_steps=steps, guidance_scale=guidance, generator=generators)
    return result.images


def score_images(images: Sequence[Image.Image], concept: Concept | str) -> float:
    return float(np.mean([concept_score(image, concept) for image in images]))


def contact_sheet(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] = (), scale: int = 2, gap: int = 4,
                  label_width: int = 0) -> Image.Image:
    """Rows of equal-size images on one white sheet, scaled up without smoothing, each row's label on its left."""
    width, height = rows[0][0].size
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (label_width + columns * (width * scale + gap) + gap,
                              len(rows) * (height * scale + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = gap + r * (height * scale + gap)
        if r < len(labels):
            for line, text in enumerate(labels[r].split("\n")):
                draw.text((4, top + 4 + 12 * line), text, fill=(0, 0, 0))
        for c, image in enumerate(row):
            sheet.paste(image.resize((width * scale, height * scale), Image.NEAREST),
                        (label_width + gap + c * (width * scale + gap), top))
    return sheet
