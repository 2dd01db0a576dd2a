"""The dataset config's keys and the fallback chain that resolves them into DatasetConfig / SubsetConfig.

A value is looked up in the subset, then its [[datasets]] entry, then [general], then the command line,
then the dataclass default (kohya's order). Every problem is collected in one :class:`ConfigProblems`, each
line naming where the value was written, and raised together as one DatasetConfigError.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from library.data.captions import CaptionOptions
from library.data.dataset_config import DatasetConfig, DatasetConfigError, DatasetKind, SubsetConfig
from library.data.images import RESIZE_FILTERS

logger = logging.getLogger(__name__)

KIND_LABELS: dict[str, str] = {"dreambooth": "DreamBooth", "finetuning": "fine-tuning", "controlnet": "ControlNet"}
# What a subset needs to be of each kind, for "this script supports only ..." hints.
KIND_HINTS: dict[str, str] = {
    "dreambooth": "subsets with an image_dir and no metadata_file",
    "finetuning": "a metadata_file in every subset",
    "controlnet": "an image_dir and a conditioning_data_dir in every subset",
}
# The flags that describe each kind without a config file, for "no training data given" messages.
CLI_OPTIONS: dict[str, str] = {
    "dreambooth": "--train_data_dir DIR (DreamBooth subfolders named '<repeats>_<class tokens>', e.g. '10_sks dog')",
    "finetuning": "--in_json META.json (fine-tuning, with --train_data_dir as the image folder)",
    "controlnet": "--train_data_dir DIR with --conditioning_data_dir DIR or --conditioning_filter (ControlNet)",
}

# Value types of the keys: "bool", "int", "float" (an int is accepted), "str", "resolution" (int or [w, h]).
DATASET_KEYS: dict[str, str] = {
    "batch_size": "int",
    "resolution": "resolution",
    "enable_bucket": "bool",
    "min_bucket_reso": "int",
    "max_bucket_reso": "int",
    "bucket_reso_steps": "int",
    "bucket_no_upscale": "bool",
    "validation_seed": "int",
    "validation_split": "float",
    "network_multiplier": "float",
}
"""Keys of [general] and [[datasets]] (not of subsets): they shape batches and buckets."""

SUBSET_KEYS: dict[str, str] = {
    "num_repeats": "int",
    "shuffle_caption": "bool",
    "keep_tokens": "int",
    "keep_tokens_separator": "str",
    "secondary_separator": "str",
    "caption_separator": "str",
    "enable_wildcard": "bool",
    "caption_prefix": "str",
    "caption_suffix": "str",
    "caption_dropout_rate": "float",
    "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "float",
    "token_warmup_min": "int",
    "token_warmup_step": "float",
    "caption_tag_mode": "str",
    "color_aug": "bool",
    "flip_aug": "bool",
    "random_crop": "bool",
    "caption_extension": "str",
    "class_tokens": "str",
    "resize_interpolation": "str",
    "face_crop_aug_range": "face_range",
    "custom_attributes": "table",
}
"""Subset settings that may also be given in [[datasets]] or [general] as a default for its subsets."""

SUBSET_ONLY_KEYS: dict[str, str] = {
    "image_dir": "str",
    "metadata_file": "str",
    "conditioning_data_dir": "str",
    "is_reg": "bool",
    "alpha_mask": "bool",
    "shards": "str",
    "shards_index": "str",
}
"""Keys that only make sense for one subset: where its files are and what they are."""

PATH_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")
# kohya keys we recognise but do not implement yet: rejected with that reason rather than as typos.
UNSUPPORTED_KEYS = frozenset({"cache_info"})
# Extra words for some of them.
UNSUPPORTED_HINTS: dict[str, str] = {
    "cache_info": " (kohya's metadata_cache.json; start-up here reads only image headers, which is fast, and "
                  "--cache_latents_to_disk caches the latents)",
}
# kohya treats these as command-line settings only.
CLI_ONLY_KEYS = frozenset({"debug_dataset", "max_token_length", "prior_loss_weight"})
# Keys a kind does not read (kohya rejects them too); checked in [[datasets]] and its subsets, not in [general].
KIND_ONLY_KEYS: dict[str, frozenset[str]] = {
    "is_reg": frozenset({"dreambooth"}),
    "class_tokens": frozenset({"dreambooth"}),
    "caption_extension": frozenset({"dreambooth", "controlnet"}),  # fine-tuning captions come from the JSON
}
# Config key -> argparse dest where they differ.
CLI_NAMES: dict[str, str] = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
CAPTION_KEYS: tuple[str, ...] = tuple(f.name for f in fields(CaptionOptions))
DREAMBOOTH_FOLDER_RE = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
_RESOLUTION_MULTIPLE = 8


class ConfigLayer(NamedTuple):
    """One level of the fallback chain: its validated values and where they were written."""

    values: Mapping[str, Any]
    where: str
    from_cli: bool = False

    def origin(self, key: str) -> str:
        return f"argument --{CLI_NAMES.get(key, key)}" if self.from_cli else self.where


class ConfigProblems:
    """Collects messages in order, without repeats (a [general] value is checked once per subset)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)

    def raise_if_any(self, what: str) -> None:
        if not self.messages:
            return
        n = len(self.messages)
        lines = "\n".join(f"  - {m}" for m in self.messages)
        raise DatasetConfigError(f"{what}: {n} problem{'s' if n > 1 else ''}, fix {'them' if n > 1 else 'it'}:\n{lines}")


def _lookup(key: str, layers: Sequence[ConfigLayer], default: Any) -> tuple[Any, str]:
    """(value, where it was set): the first layer that sets `key`, else the dataclass default."""
    for layer in layers:
        if key in layer.values:
            return layer.values[key], layer.origin(key)
    return default, "default"


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def build_dataset(kind: DatasetKind | None, subset_kinds: Sequence[DatasetKind],
                   subset_chains: Sequence[Sequence[ConfigLayer]], dataset_chain: Sequence[ConfigLayer],
                   source: str, problems: ConfigProblems) -> DatasetConfig | None:
    """Resolve one dataset and its subsets; None when something was wrong (already in `problems`).

    `kind` None means the dataset is already known to be invalid: it is still resolved, to find more problems.
    """
    before = len(problems.messages)
    defaults = _defaults(DatasetConfig)
    resolved: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key in DATASET_KEYS:
        resolved[key], origins[key] = _lookup(key, dataset_chain, defaults[key])

    for key in ("batch_size", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if resolved[key] < 1:
            problems.add(f"{origins[key]}: {key} = {resolved[key]} must be >= 1")
    if resolved["min_bucket_reso"] > resolved["max_bucket_reso"]:
        problems.add(f"{source}: min_bucket_reso = {resolved['min_bucket_reso']} (from {origins['min_bucket_reso']}) "
                     f"is larger than max_bucket_reso = {resolved['max_bucket_reso']} "
                     f"(from {origins['max_bucket_reso']})")
    if not 0.0 <= resolved["validation_split"] <= 1.0:
        problems.add(f"{origins['validation_split']}: validation_split = {resolved['validation_split']} "
                     "must be in [0, 1]")
    if not math.isfinite(resolved["network_multiplier"]):
        problems.add(f"{origins['network_multiplier']}: network_multiplier = {resolved['network_multiplier']} "
                     "must be a finite number, e.g. 1.0 or -1.0")

    subsets: list[SubsetConfig] = []
    seen: dict[Path, str] = {}
    for subset_kind, chain in zip(subset_kinds, subset_chains):
        subset = _build_subset(subset_kind, chain, problems)
        if subset is None:
            continue
        identity = subset.metadata_file if subset_kind == "finetuning" else subset.image_dir
        key_name = "metadata_file" if subset_kind == "finetuning" else "image_dir"
        if identity is not None:
            ident = identity.resolve()
            if ident in seen:
                logger.warning("%s: ignoring this subset: its %s '%s' is already used by %s in the same dataset "
                               "(to train it at another resolution, put it in another [[datasets]])",
                               subset.source, key_name, identity, seen[ident])
                continue
            seen[ident] = subset.source
        subsets.append(subset)

    if kind is None or len(problems.messages) > before:
        return None
    if resolved["enable_bucket"]:  # kohya crops around faces only without buckets
        subsets = [replace(s, face_crop_aug_range=None) for s in subsets]
    return DatasetConfig(kind=kind, subsets=tuple(subsets), source=source, **resolved)


def _build_subset(kind: DatasetKind, chain: Sequence[ConfigLayer], problems: ConfigProblems) -> SubsetConfig | None:
    """Resolve one subset: the chain is [subset, dataset, general, CLI] (or [synthesised subset, CLI])."""
    before = len(problems.messages)
    subset_where = chain[0].where
    defaults = _defaults(SubsetConfig)
    caption_defaults = _defaults(CaptionOptions)

    caption_values: dict[str, Any] = {}
    caption_origins: dict[str, str] = {}
    for key in CAPTION_KEYS:
        caption_values[key], caption_origins[key] = _lookup(key, chain, caption_defaults[key])
    captions = CaptionOptions()
    # Each key alone first, so every bad value is reported at the table where it is written (CaptionOptions
    # stops at its first error); keep_tokens_separator is only checked against caption_separator, below.
    bad_caption = False
    for key in CAPTION_KEYS:
        if key == "keep_tokens_separator" or caption_origins[key] == "default":
            continue
        try:
            CaptionOptions(**{key: caption_values[key]})
        except ValueError as e:
            problems.add(f"{caption_origins[key]}: {e}")
            bad_caption = True
    if not bad_caption:
        try:
            captions = CaptionOptions(**caption_values)
        except ValueError as e:
            message = str(e)
            named = [k for k in CAPTION_KEYS if re.search(rf"\b{k}\b", message)] or ["keep_tokens_separator"]
            where = caption_origins[named[0]]
            others = [f"{k} from {caption_origins[k]}" for k in named[1:] if caption_origins[k] != where]
            problems.add(f"{where}: {message}" + (f" ({', '.join(others)})" if others else ""))

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key in ("num_repeats", "is_reg", "class_tokens", "caption_extension", "flip_aug", "color_aug",
                "random_crop", "alpha_mask", "resize_interpolation", "face_crop_aug_range", "custom_attributes",
                "shards", "shards_index", *PATH_KEYS):
        values[key], origins[key] = _lookup(key, chain, defaults[key])

    if values["resize_interpolation"] is not None and values["resize_interpolation"] not in RESIZE_FILTERS:
        problems.add(f"{origins['resize_interpolation']}: resize_interpolation = {values['resize_interpolation']!r} "
                     f"is not one of {', '.join(RESIZE_FILTERS)}")
    if values["num_repeats"] < 1:
        problems.add(f"{origins['num_repeats']}: num_repeats = {values['num_repeats']} must be >= 1")
    if kind == "controlnet" and values["random_crop"]:
        problems.add(f"{origins['random_crop']}: random_crop = true is not supported by ControlNet datasets "
                     "(the conditioning image must stay aligned with the target)")
    if kind in ("dreambooth", "controlnet") and values["image_dir"] is None and values["shards"] is None:
        problems.add(f"{subset_where}: image_dir is missing: a {KIND_LABELS[kind]} subset needs the folder of "
                     "its images")

    paths: dict[str, Path | None] = {}
    for key in PATH_KEYS:
        text = values[key]
        if text is None:
            paths[key] = None
            continue
        if isinstance(text, Path):
            text = str(text)
        if not text.strip():
            problems.add(f"{origins[key]}: {key} is empty: give a path")
            paths[key] = None
            continue
        path = Path(text).expanduser()
        paths[key] = path
        if key == "metadata_file":
            if not path.is_file():
                problems.add(f"{origins[key]}: {key} '{text}' does not exist or is not a file")
        elif not path.is_dir():
            problems.add(f"{origins[key]}: {key} '{text}' does not exist or is not a folder")

    if len(problems.messages) > before:
        return None
    return SubsetConfig(
        image_dir=paths["image_dir"],
        metadata_file=paths["metadata_file"],
        conditioning_data_dir=paths["conditioning_data_dir"],
        num_repeats=values["num_repeats"],
        is_reg=values["is_reg"],
        class_tokens=values["class_tokens"],
        caption_extension=values["caption_extension"],
        captions=captions,
        flip_aug=values["flip_aug"],
        color_aug=values["color_aug"],
        random_crop=values["random_crop"],
        alpha_mask=values["alpha_mask"],
        resize_interpolation=values["resize_interpolation"],
        face_crop_aug_range=values["face_crop_aug_range"],
        custom_attributes=values["custom_attributes"],
        shards=values["shards"],
        shards_index=values["shards_index"],
        source=subset_where,
    )


def kinds_text(kinds: Collection[str]) -> str:
    ordered = [k for k in ("dreambooth", "finetuning", "controlnet") if k in kinds]
    return " and ".join(KIND_LABELS[k] for k in ordered)


def kind_hints(kinds: Collection[str]) -> str:
    ordered = [k for k in ("dreambooth", "finetuning", "controlnet") if k in kinds]
    return " or ".join(KIND_HINTS[k] for k in ordered)
