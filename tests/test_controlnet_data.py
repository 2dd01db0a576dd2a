"""ControlNet data beyond conditioning folders: the original prompt.json format and on-the-fly filters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.datasets import SampleKey, TrainingDataset, collate_samples
from library.data.dataset_index import load_dataset_index
from library.data.pixels import normalize_pixels
from library.data.records import DatasetProblems


def gradient_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def write_prompt_json(root: Path, lines: list[dict]) -> Path:
    path = root / "prompt.json"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_prompt_json_pairs_targets_with_sources(tmp_path):
    for folder in ("source", "target"):
        (tmp_path / folder).mkdir()
    for i in range(2):
        image = gradient_image((96, 64), i)
        image.save(tmp_path / "target" / f"{i}.png")
        ImageOps.invert(image).save(tmp_path / "source" / f"{i}.png")
    meta = write_prompt_json(tmp_path, [{"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"p{i}"}
                                        for i in range(2)])
    subset = SubsetConfig(metadata_file=meta, random_crop=True, flip_aug=True)
    index = load_dataset_index([DatasetConfig(kind="finetuning", subsets=(subset,), resolution=(64, 64))])
    assert [(r.caption, r.conditioning_path.name) for r in index.records] == [("p0", "0.png"), ("p1", "1.png")]
    dataset = TrainingDataset(index, seed=0)
    batch = collate_samples([dataset[SampleKey(i, epoch=e)] for i in range(2) for e in (1, 2)])
    # the source is the inverted target, so after the same crop and flip: target + condition == 0 (in [-1, 1])
    target, condition = normalize_pixels(batch.pixel_values), normalize_pixels(batch.conditioning_pixel_values)
    torch.testing.assert_close(target + condition, torch.zeros_like(target), atol=1e-6, rtol=0)


def test_prompt_json_problems_are_reported_together(tmp_path):
    for folder in ("source", "target"):
        (tmp_path / folder).mkdir()
    gradient_image((64, 64), 0).save(tmp_path / "target" / "0.png")
    gradient_image((64, 64), 1).save(tmp_path / "target" / "1.png")
    gradient_image((32, 64), 2).save(tmp_path / "source" / "1.png")  # wrong size
    meta = write_prompt_json(tmp_path, [{"source": "source/0.png", "target": "target/0.png", "prompt": "a"},
                                        {"source": "source/1.png", "target": "target/1.png", "prompt": "b"}])
    with pytest.raises(DatasetProblems) as error:
        load_dataset_index([DatasetConfig(kind="finetuning", subsets=(SubsetConfig(metadata_file=meta),))])
    message = str(error.value)
    assert "source/0.png" in message.replace("\\", "/") and "does not exist" in message
    assert "is 32x64 but the target is 64x64" in message


def test_conditioning_filter_sees_the_cropped_flipped_target(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        gradient_image((128, 80), i).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "images" / f"{i}.caption").write_text("x")
    subset = SubsetConfig(image_dir=tmp_path / "images", class_tokens="x", random_crop=True, flip_aug=True)
    index = load_dataset_index([DatasetConfig(kind="dreambooth", subsets=(subset,), resolution=(64, 64))])
    dataset = TrainingDataset(index, seed=0, conditioning_filter=ImageOps.invert)
    batch = collate_samples([dataset[SampleKey(i, epoch=e)] for i in range(3) for e in (1, 2, 3)])
    assert batch.flipped.any() and not batch.flipped.all()
    target, condition = normalize_pixels(batch.pixel_values), normalize_pixels(batch.conditioning_pixel_values)
    torch.testing.assert_close(target + condition, torch.zeros_like(target), atol=1e-6, rtol=0)
