"""Resolved dataset settings: what `--dataset_config` TOML (or the equivalent CLI flags) describes.

Every value here is final: the fallback chain subset -> dataset -> [general] -> CLI -> default has been
applied (``library.data.dataset_config_chain``), so code downstream reads one place and never consults
`args`. ``library.data.dataset_config_loading.load_dataset_configs`` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from library.data.captions import CaptionOptions

DatasetKind = Literal["dreambooth", "finetuning", "controlnet"]
ALL_KINDS: frozenset[DatasetKind] = frozenset({"dreambooth", "finetuning", "controlnet"})
_RESOLUTION_MULTIPLE = 8


class DatasetConfigError(ValueError):
    """A dataset config that cannot be used; the message names the file, the table and the key."""


@dataclass(frozen=True)
class SubsetConfig:
    """One folder (DreamBooth / ControlNet) or one metadata file (fine-tuning) and how to read it."""

    image_dir: Path | None = None
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    resize_interpolation: str | None = None  # kohya's name of the resize filter; None: LANCZOS
    # kohya's face-centred crop (min, max face scale) for files named <name>_<cx>_<cy>_<w>_<h>; without buckets only
    face_crop_aug_range: tuple[float, float] | None = None
    # kohya's free-form table for custom code (e.g. a custom loss), carried unchanged; not part of equality
    custom_attributes: Mapping[str, Any] | None = field(default=None, compare=False)
    # Streamed webdataset shards instead of a folder: any URL/brace pattern/`pipe:` webdataset opens
    # (library.data.shard_config); shards_index: their index.json when it is not beside them.
    shards: str | None = None
    shards_index: str | None = None
    # Where this subset was declared, for error messages: "cfg.toml [[datasets]] #1 [[datasets.subsets]] #2".
    source: str = "command line"


@dataclass(frozen=True)
class DatasetConfig:
    """Images that share one resolution/bucket setup and one batch size."""

    kind: DatasetKind
    subsets: tuple[SubsetConfig, ...]
    batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)  # (width, height): the max area for buckets
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    source: str = "command line"
    # Loss weight of is_reg subsets; a command-line flag only (kohya has no dataset key for it).
    prior_loss_weight: float = 1.0
    # kohya's per-dataset multiplier of the trained network: its batches train the network at this strength
    # (e.g. 1.0 for one state and -1.0 for its opposite, so the LoRA's weight slides between them). Only
    # train_network.py reads it; batches never mix datasets, so each batch has one multiplier.
    network_multiplier: float = 1.0


def parse_face_crop_range(value: str | Sequence[float]) -> tuple[float, float]:
    """`"2.0,4.0"` or `[2.0, 4.0]` -> (2.0, 4.0): two positive numbers. Raises ValueError with a message that
    completes "face_crop_aug_range = <value> ..."."""
    parts: Sequence[Any] = value.split(",") if isinstance(value, str) else value
    try:
        numbers = tuple(float(p) for p in parts if not isinstance(p, bool))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 2 or len(parts) != 2 or min(numbers) <= 0:
        raise ValueError("is not two positive numbers 'MIN,MAX' (e.g. 2.0,4.0)")
    return numbers[0], numbers[1]


def parse_resolution(value: str | int | Sequence[int]) -> tuple[int, int]:
    """`512`, `"512"`, `"512,768"` or `[512, 768]` -> (width, height); each a positive multiple of 8.

    Raises ValueError with a message that completes "resolution = <value> ...".
    """
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError("is not 'SIZE' or 'WIDTH,HEIGHT' (e.g. 512 or 512,768)") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        numbers = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        numbers = list(value)
        if len(numbers) != 2:
            raise ValueError(f"has {len(numbers)} values: give one size or [width, height]")
    else:
        raise ValueError("is not an integer or an array [width, height] of integers")
    if len(numbers) not in (1, 2):
        raise ValueError(f"has {len(numbers)} values: give one size or [width, height]")
    if any(n <= 0 or n % _RESOLUTION_MULTIPLE for n in numbers):
        raise ValueError(f"must be {'positive multiples' if len(numbers) > 1 else 'a positive multiple'} "
                         f"of {_RESOLUTION_MULTIPLE}")
    width, height = (numbers[0], numbers[0]) if len(numbers) == 1 else numbers
    return width, height
