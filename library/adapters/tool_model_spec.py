"""The ModelSpec (``modelspec.*`` keys) of the files the network tools write: merged models, merged LoRAs and
extracted LoRAs carry the same key set as the training scripts' outputs (library.models.model_spec), with the
output's name as title, the model's own resolution and prediction type, and ``merged_from`` for merges. The
hash is a placeholder until ``model_spec.fill_in_hash`` is run on the saved file."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

from library.models.families import ModelFamily, family_with_base_model_version
from library.models.model_spec import ModelKind, ModelSpec, ModelSpecOptions

# ModelSpec keys that only a known family can fill in
_FAMILY_KEYS = ("modelspec.architecture", "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type")


def model_resolution(model: Any) -> tuple[int, int]:
    """The image side a model was built for: the UNet's sample size times the VAE's downscale (512 for SD 1.5,
    768 for SD 2.x-v, 1024 for SDXL)."""
    side = int(model.unet.config.sample_size) * 2 ** (len(model.vae.config.block_out_channels) - 1)
    return side, side


def model_spec_metadata(*, family: ModelFamily, kind: ModelKind, save_to: str | os.PathLike,
                        resolution: tuple[int, int], v_prediction: bool,
                        merged_from: list[str] | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys for a tool's output at ``save_to`` (nothing for a .ckpt/.pt or a folder)."""
    spec = ModelSpec(family=family, kind=kind, title=Path(save_to).stem, resolution=resolution,
                     v_prediction=v_prediction, options=ModelSpecOptions(merged_from=_names(merged_from)))
    return spec.metadata_for(save_to)


def merged_lora_model_spec(sources: list[dict[str, str]], *, save_to: str | os.PathLike,
                           merged_from: list[str]) -> dict[str, str]:
    """ModelSpec of a LoRA merged from LoRAs: the family, resolution and prediction type of the first source
    that states them (kohya's ``ss_*`` or ``modelspec.*`` keys); without a family only the family-free keys."""
    def first(key: str) -> str | None:
        return next((meta[key] for meta in sources if meta.get(key)), None)

    family = family_with_base_model_version(first("ss_base_model_version"))
    v_prediction = first("modelspec.prediction_type") == "v" or first("ss_v_parameterization") == "True"
    resolution = _parse_resolution(first("ss_resolution"))
    if family is not None:
        resolution = resolution or (family.default_resolution, family.default_resolution)
        return model_spec_metadata(family=family, kind="lora", save_to=save_to, resolution=resolution,
                                   v_prediction=v_prediction, merged_from=merged_from)
    from library.models.families import SD1

    metadata = model_spec_metadata(family=SD1, kind="lora", save_to=save_to, resolution=(0, 0), v_prediction=False,
                                   merged_from=merged_from)
    return {key: value for key, value in metadata.items() if key not in _FAMILY_KEYS}


def _names(paths: list[str] | None) -> str | None:
    return ", ".join(Path(p).stem for p in paths) if paths else None


def _parse_resolution(value: str | None) -> tuple[int, int] | None:
    """kohya's ``ss_resolution`` "(512, 768)" -> (512, 768)."""
    try:
        width, height = ast.literal_eval(value) if value else (None, None)
        return (int(width), int(height)) if width and height else None
    except (ValueError, SyntaxError, TypeError):
        return None
