"""Resolved dataset settings: what `--dataset_config` TOML (or the equivalent CLI flags) describes.

Every value here is final: the fallback chain subset -> dataset -> [general] -> CLI -> default has been
applied, so code downstream reads one place and never consults `args`.

`load_dataset_configs(args, support)` is the one entry point. It reads kohya's `--dataset_config` schema
(TOML or JSON) or, without one, synthesises the same structure from `--in_json` / `--train_data_dir` /
`--reg_data_dir` / `--conditioning_data_dir`. Unlike kohya (voluptuous, first error only, "extra keys not
allowed"), every problem is collected and reported in one `DatasetConfigError`, each line naming the file,
the table (`cfg.toml [[datasets]] #1 [[datasets.subsets]] #2`) and the key, with a "did you mean" for typos.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import toml

from library.captions import CaptionOptions

DatasetKind = Literal["dreambooth", "finetuning", "controlnet"]


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
    cache_info: bool = False
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
