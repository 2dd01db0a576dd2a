"""kohya's ``--metadata_*`` flags: the ModelSpec values (library.models.model_spec) every saved file carries."""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os

from library.cli.config import add_validator
from library.models.families import ModelFamily
from library.cli.training_args import DEFAULT_OUTPUT_NAME
from library.models.model_spec import ModelKind, ModelSpec, ModelSpecOptions
from library.training.noise import SD_NUM_TRAIN_TIMESTEPS

# flag suffix -> what the help says it is
_FIELDS: dict[str, str] = {
    "title": "model title (default: --output_name)",
    "author": "author name",
    "description": "description of the model",
    "license": "license, e.g. CreativeML Open RAIL++-M",
    "tags": "comma-separated tags",
    "merged_from": "the models this one was merged from",
    "preprocessor": "the preprocessor the model expects (e.g. canny for a ControlNet)",
    "trigger_phrase": "the phrase that triggers the trained concept",
    "usage_hint": "a short hint on how to use the model",
    "thumbnail": "thumbnail image: a file (read into a data URL at start-up) or a data: URL",
    "is_negative_embedding": "whether the file is a negative embedding (kohya's flag for textual inversion; "
                             "written as given)",
}


def add_metadata_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's names (sai_model_spec.add_model_spec_arguments); each value goes into ``modelspec.<name>`` of
    every saved .safetensors file."""
    group = parser.add_argument_group("model-spec metadata (modelspec.* keys of saved .safetensors files)")
    for name, meaning in _FIELDS.items():
        group.add_argument(f"--metadata_{name}", type=str, default=None, help=meaning)
    add_validator(parser, _check_thumbnail)


def _check_thumbnail(args: argparse.Namespace) -> str | None:
    """A thumbnail file that is not there is refused at start-up (kohya warns and drops it after training)."""
    thumbnail = getattr(args, "metadata_thumbnail", None)
    if not thumbnail or thumbnail.startswith("data:"):
        return None
    if not os.path.isfile(thumbnail):
        return (f"--metadata_thumbnail {thumbnail!r}: no such file; give an image file (it is embedded as a "
                "data URL) or a data: URL")
    return None


def thumbnail_data_url(value: str | None) -> str | None:
    """A data URL as it is; a file as ``data:<mime type>;base64,...`` (kohya's file_to_data_url)."""
    if not value or value.startswith("data:"):
        return value or None
    mime_type = mimetypes.guess_type(value)[0] or "application/octet-stream"
    with open(value, "rb") as handle:
        return f"data:{mime_type};base64,{base64.b64encode(handle.read()).decode('ascii')}"


def model_spec_options_from_args(args: argparse.Namespace) -> ModelSpecOptions:
    values = {name: getattr(args, f"metadata_{name}", None) for name in _FIELDS}
    values["thumbnail"] = thumbnail_data_url(values["thumbnail"])
    return ModelSpecOptions(**values)


def model_spec_from_args(args: argparse.Namespace, *, family: ModelFamily, kind: ModelKind,
                         resolution: tuple[int, int], prediction_type: str) -> ModelSpec:
    """The ModelSpec of this run's saved files: the title defaults to --output_name (kohya's default), the
    resolution is the one trained at, the timestep range is written only when --min/--max_timestep narrow it."""
    low, high = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    timestep_range = None
    if low is not None or high is not None:
        timestep_range = (0 if low is None else int(low), SD_NUM_TRAIN_TIMESTEPS if high is None else int(high))
    return ModelSpec(family=family, kind=kind, title=args.output_name or DEFAULT_OUTPUT_NAME,
                     resolution=(int(resolution[0]), int(resolution[1])),
                     v_prediction=prediction_type == "v_prediction", options=model_spec_options_from_args(args),
                     timestep_range=timestep_range, clip_skip=getattr(args, "clip_skip", None))
