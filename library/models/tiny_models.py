"""Tiny, randomly initialised SD1.5 / SD2.1 / SDXL pipelines for tests and the demo (no download needed)."""

from __future__ import annotations

import os
from pathlib import Path

from library.models.families import ModelFamily, resolve_family
from library.models.loading import StableDiffusionModel, build_model, save_diffusers


def build_tiny_model(family: str | ModelFamily, seed: int = 0) -> StableDiffusionModel:
    fam = resolve_family(family)
    return build_model(fam, fam.tiny_configs(), seed=seed)


def make_tiny_model(family: str | ModelFamily, output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a diffusers folder that `DiffusionPipeline.from_pretrained` loads offline."""
    save_diffusers(build_tiny_model(family, seed), output_dir)
    return Path(output_dir)
