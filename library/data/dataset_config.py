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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import toml

from library.data.captions import CaptionOptions
from library.data.metadata import IMAGE_EXTENSIONS

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


# --------------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

ALL_KINDS: frozenset[DatasetKind] = frozenset({"dreambooth", "finetuning", "controlnet"})
_KIND_LABELS: dict[str, str] = {"dreambooth": "DreamBooth", "finetuning": "fine-tuning", "controlnet": "ControlNet"}
# What a subset needs to be of each kind, for "this script supports only ..." hints.
_KIND_HINTS: dict[str, str] = {
    "dreambooth": "subsets with an image_dir and no metadata_file",
    "finetuning": "a metadata_file in every subset",
    "controlnet": "an image_dir and a conditioning_data_dir in every subset",
}
# The flags that describe each kind without a config file, for "no training data given" messages.
_CLI_OPTIONS: dict[str, str] = {
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
}
"""Subset settings that may also be given in [[datasets]] or [general] as a default for its subsets."""

SUBSET_ONLY_KEYS: dict[str, str] = {
    "image_dir": "str",
    "metadata_file": "str",
    "conditioning_data_dir": "str",
    "is_reg": "bool",
    "alpha_mask": "bool",
}
"""Keys that only make sense for one subset: where its files are and what they are."""

_PATH_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")
# kohya keys we recognise but do not implement yet: rejected with that reason rather than as typos.
_UNSUPPORTED_KEYS = frozenset({"network_multiplier", "resize_interpolation", "face_crop_aug_range", "custom_attributes",
                               "cache_info"})
# Extra words for some of them.
_UNSUPPORTED_HINTS: dict[str, str] = {
    "cache_info": " (kohya's metadata_cache.json; start-up here reads only image headers, which is fast, and "
                  "--cache_latents_to_disk caches the latents)",
}
# kohya treats these as command-line settings only.
_CLI_ONLY_KEYS = frozenset({"debug_dataset", "max_token_length", "prior_loss_weight"})
# Keys a kind does not read (kohya rejects them too); checked in [[datasets]] and its subsets, not in [general].
_KIND_ONLY_KEYS: dict[str, frozenset[str]] = {
    "is_reg": frozenset({"dreambooth"}),
    "class_tokens": frozenset({"dreambooth"}),
    "caption_extension": frozenset({"dreambooth", "controlnet"}),  # fine-tuning captions come from the JSON
}
# Config key -> argparse dest where they differ.
_CLI_NAMES: dict[str, str] = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
_CAPTION_KEYS: tuple[str, ...] = tuple(f.name for f in fields(CaptionOptions))
_DREAMBOOTH_FOLDER_RE = re.compile(r"^(\d+)_(.*)$", re.DOTALL)
_RESOLUTION_MULTIPLE = 8


class _Layer(NamedTuple):
    """One level of the fallback chain: its validated values and where they were written."""

    values: Mapping[str, Any]
    where: str
    from_cli: bool = False

    def origin(self, key: str) -> str:
        return f"argument --{_CLI_NAMES.get(key, key)}" if self.from_cli else self.where


class _Problems:
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


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def load_dataset_configs(args: argparse.Namespace,
                         support: Collection[DatasetKind] | None = None) -> list[DatasetConfig]:
    """The datasets to train on, from `--dataset_config` or else from the dataset CLI flags.

    `support` is the set of kinds the calling script can train (None: all); any other kind is an error
    saying what the script expects. Every problem found is reported together in one DatasetConfigError.
    """
    supported = ALL_KINDS if support is None else frozenset(support)
    if not supported or not supported <= ALL_KINDS:
        raise ValueError(f"support must be a non-empty subset of {sorted(ALL_KINDS)}, got {sorted(supported)}")

    config_file = getattr(args, "dataset_config", None)
    problems = _Problems()
    cli = _cli_layer(args, problems)
    # prior_loss_weight is a command-line setting only (as in kohya), the same for every dataset.
    prior_loss_weight = getattr(args, "prior_loss_weight", None)
    prior_loss_weight = 1.0 if prior_loss_weight is None else float(prior_loss_weight)
    if prior_loss_weight < 0:
        problems.add(f"argument --prior_loss_weight = {prior_loss_weight} must be >= 0")
    if config_file is not None:
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
                   if getattr(args, name, None) is not None]
        if ignored:
            logger.warning("%s %s ignored because --dataset_config is given: set image_dir / metadata_file / "
                           "conditioning_data_dir in '%s' instead", ", ".join(ignored),
                           "is" if len(ignored) == 1 else "are", config_file)
        datasets = _from_file(Path(config_file), cli, supported, problems)
        problems.raise_if_any(f"dataset config '{config_file}'")
    else:
        datasets = _from_command_line(args, cli, supported, problems)
        problems.raise_if_any("dataset arguments")
    return [replace(d, prior_loss_weight=prior_loss_weight) for d in datasets]


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


# --------------------------------------------------------------------------------------------------------
# Reading a config file
# --------------------------------------------------------------------------------------------------------


def _read_document(path: Path) -> dict[str, Any]:
    """The parsed TOML/JSON document; a missing or unparsable file is a one-line DatasetConfigError."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise DatasetConfigError(f"dataset config '{path}' must be a .toml or .json file")
    if not path.is_file():
        raise DatasetConfigError(f"dataset config '{path}' not found: check the --dataset_config path")
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if suffix == ".json" else toml.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetConfigError(f"dataset config '{path}' cannot be read ({e})") from None
    except (json.JSONDecodeError, toml.TomlDecodeError) as e:
        raise DatasetConfigError(f"dataset config '{path}' is not valid {suffix[1:].upper()} ({e}): "
                                 "fix the syntax") from None
    if not isinstance(document, dict):
        raise DatasetConfigError(f"dataset config '{path}' must hold a table/object at the top level")
    return document


def _from_file(path: Path, cli: _Layer, supported: frozenset[str], problems: _Problems) -> list[DatasetConfig]:
    """Validate the document table by table, then resolve each [[datasets]] entry."""
    document = _read_document(path)
    file = str(path)
    for key in document:
        if key not in ("general", "datasets"):
            problems.add(f"{file}: unknown top-level key '{key}'{_suggest(key, ('general', 'datasets'))}; "
                         "the top level holds only [general] and [[datasets]]")

    general_raw = document.get("general", {})
    if not isinstance(general_raw, dict):
        problems.add(f"{file}: general must be a table: write it as [general]")
        general_raw = {}
    general = _Layer(_check_table(general_raw, "general", f"{file} [general]", problems), f"{file} [general]")

    datasets_raw = document.get("datasets")
    if datasets_raw is None or datasets_raw == []:
        problems.add(f"{file}: no [[datasets]]: add at least one [[datasets]] with a [[datasets.subsets]]")
        return []
    if not isinstance(datasets_raw, list):
        problems.add(f"{file}: datasets must be an array of tables: write [[datasets]], not [datasets]")
        return []

    datasets: list[DatasetConfig] = []
    for i, dataset_raw in enumerate(datasets_raw, start=1):
        where = f"{file} [[datasets]] #{i}"
        if not isinstance(dataset_raw, dict):
            problems.add(f"{where}: must be a table [[datasets]]")
            continue
        own = {k: v for k, v in dataset_raw.items() if k != "subsets"}
        dataset = _Layer(_check_table(own, "dataset", where, problems), where)
        subsets_raw = dataset_raw.get("subsets")
        if subsets_raw is None or subsets_raw == []:
            problems.add(f"{where}: no [[datasets.subsets]]: every dataset needs at least one subset")
            continue
        if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw):
            problems.add(f"{where}: subsets must be an array of tables: write [[datasets.subsets]]")
            continue
        subsets = [
            _Layer(_check_table(raw, "subset", f"{where} [[datasets.subsets]] #{j}", problems),
                   f"{where} [[datasets.subsets]] #{j}")
            for j, raw in enumerate(subsets_raw, start=1)
        ]
        kind, subset_kinds = _detect_kind(subsets_raw, subsets, where, problems)
        if kind is not None and kind not in supported:
            problems.add(f"{where}: this is a {_KIND_LABELS[kind]} dataset, but this script supports only "
                         f"{_kinds_text(supported)} datasets: give it {_hints(supported)}")
            kind = None
        if kind is not None:
            for layer in (dataset, *subsets):
                for key in layer.values:
                    kinds = _KIND_ONLY_KEYS.get(key)
                    if kinds is not None and kind not in kinds:
                        problems.add(f"{layer.where}: {key} is not used by {_KIND_LABELS[kind]} datasets "
                                     f"(only by {_kinds_text(kinds)} ones): remove it")
        # Resolved even when the kind is wrong, so that the other problems are reported in the same run.
        built = _build_dataset(kind, subset_kinds, [[s, dataset, general, cli] for s in subsets],
                               [dataset, general, cli], where, problems)
        if built is not None:
            datasets.append(built)
    return datasets


def _check_table(table: Mapping[str, Any], level: Literal["general", "dataset", "subset"], where: str,
                 problems: _Problems) -> dict[str, Any]:
    """The table's keys that are allowed at `level` and well typed, converted; the rest become problems.

    None (JSON null) means unset, as in kohya's fallback search.
    """
    allowed = dict(SUBSET_KEYS)
    if level in ("general", "dataset"):
        allowed.update(DATASET_KEYS)
    if level == "subset":
        allowed.update(SUBSET_ONLY_KEYS)
    known = [*DATASET_KEYS, *SUBSET_KEYS, *SUBSET_ONLY_KEYS]
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in allowed:
            problems.add(f"{where}: {_misplaced(key, level, known)}")
            continue
        if raw is None:
            continue
        try:
            values[key] = _convert(allowed[key], raw)
        except ValueError as e:
            problems.add(f"{where}: {key} = {_repr(raw)} {e}")
    return values


def _misplaced(key: str, level: str, known: Sequence[str]) -> str:
    """Why `key` cannot appear at `level`, as the rest of a problem line."""
    if key in SUBSET_ONLY_KEYS:
        return f"{key} is only allowed in [[datasets.subsets]]"
    if key in DATASET_KEYS:
        return f"{key} is only allowed in [general] or [[datasets]], not in [[datasets.subsets]]"
    if key in _UNSUPPORTED_KEYS:
        return f"{key} is a kohya key that is not supported yet: remove it{_UNSUPPORTED_HINTS.get(key, '')}"
    if key in _CLI_ONLY_KEYS:
        return f"{key} is a command-line argument, not a dataset config key: pass --{key} instead"
    if key == "subsets":
        return "subsets belong to a [[datasets]] entry: write [[datasets.subsets]] after a [[datasets]]"
    if key in ("general", "datasets"):
        return f"{key} is only allowed at the top level"
    return f"unknown key '{key}'{_suggest(key, known)}"


def _suggest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _convert(kind: str, raw: Any) -> Any:
    """A TOML/JSON value checked against its key's type; the ValueError message completes 'key = value ...'."""
    if kind == "resolution":
        return parse_resolution(raw) if not isinstance(raw, str) else _reject(raw, "an integer or [width, height]")
    if kind == "bool":
        return raw if isinstance(raw, bool) else _reject(raw, "true or false")
    if kind == "int":
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else _reject(raw, "an integer")
    if kind == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        return _reject(raw, "a number")
    return raw if isinstance(raw, str) else _reject(raw, "a string")


def _reject(raw: Any, expected: str) -> Any:
    raise ValueError(f"is {_describe(raw)}: expected {expected}")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _repr(value: Any) -> str:
    return json.dumps(value, default=str)


def _detect_kind(subsets_raw: Sequence[Mapping[str, Any]], subsets: Sequence[_Layer], where: str,
                 problems: _Problems) -> tuple[DatasetKind | None, list[DatasetKind]]:
    """(the dataset's kind or None when invalid, each subset's kind), by kohya's rule per [[datasets]]:
    all conditioning_data_dir -> ControlNet, all metadata_file -> fine-tuning, no metadata_file -> DreamBooth;
    anything else is a mix. Decided on the keys as written (even ill-typed ones)."""
    subset_kinds: list[DatasetKind] = []
    valid = True
    for raw, layer in zip(subsets_raw, subsets):
        has_cond = raw.get("conditioning_data_dir") is not None
        has_meta = raw.get("metadata_file") is not None
        if has_cond and has_meta:
            problems.add(f"{layer.where}: a subset cannot have both metadata_file (fine-tuning) and "
                         "conditioning_data_dir (ControlNet)")
            valid = False
        subset_kinds.append("controlnet" if has_cond else "finetuning" if has_meta else "dreambooth")
    members: dict[str, list[int]] = {}
    for j, kind in enumerate(subset_kinds, start=1):
        members.setdefault(kind, []).append(j)
    if valid and len(members) > 1:
        parts = " and ".join(f"{_KIND_LABELS[k]} subsets (#{', #'.join(map(str, js))})" for k, js in members.items())
        problems.add(f"{where}: mixes {parts}; kinds cannot be mixed within one dataset: put them in separate "
                     "[[datasets]] (ControlNet subsets have conditioning_data_dir, fine-tuning subsets have "
                     "metadata_file, DreamBooth subsets have neither)")
        valid = False
    return (subset_kinds[0] if valid else None), subset_kinds


# --------------------------------------------------------------------------------------------------------
# Resolving values through the fallback chain
# --------------------------------------------------------------------------------------------------------


def _cli_layer(args: argparse.Namespace, problems: _Problems) -> _Layer:
    """The argparse values as the last fallback before the defaults (None means unset, as in kohya)."""
    values: dict[str, Any] = {}
    for key in (*DATASET_KEYS, *SUBSET_KEYS, "alpha_mask"):
        value = getattr(args, _CLI_NAMES.get(key, key), None)
        if key == "validation_seed" and value is None:
            value = getattr(args, "seed", None)  # kohya: the training seed unless a validation seed is given
        if value is None:
            continue
        if key == "resolution":
            try:
                value = parse_resolution(value)
            except ValueError as e:
                problems.add(f"argument --resolution {_repr(value)} {e}")
                continue
        values[key] = value
    return _Layer(values, "command line", from_cli=True)


def _lookup(key: str, layers: Sequence[_Layer], default: Any) -> tuple[Any, str]:
    """(value, where it was set): the first layer that sets `key`, else the dataclass default."""
    for layer in layers:
        if key in layer.values:
            return layer.values[key], layer.origin(key)
    return default, "default"


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _build_dataset(kind: DatasetKind | None, subset_kinds: Sequence[DatasetKind],
                   subset_chains: Sequence[Sequence[_Layer]], dataset_chain: Sequence[_Layer],
                   source: str, problems: _Problems) -> DatasetConfig | None:
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
    if not 0.0 <= resolved["validation_split"] < 1.0:
        problems.add(f"{origins['validation_split']}: validation_split = {resolved['validation_split']} "
                     "must be in [0, 1)")

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
    return DatasetConfig(kind=kind, subsets=tuple(subsets), source=source, **resolved)


def _build_subset(kind: DatasetKind, chain: Sequence[_Layer], problems: _Problems) -> SubsetConfig | None:
    """Resolve one subset: the chain is [subset, dataset, general, CLI] (or [synthesised subset, CLI])."""
    before = len(problems.messages)
    subset_where = chain[0].where
    defaults = _defaults(SubsetConfig)
    caption_defaults = _defaults(CaptionOptions)

    caption_values: dict[str, Any] = {}
    caption_origins: dict[str, str] = {}
    for key in _CAPTION_KEYS:
        caption_values[key], caption_origins[key] = _lookup(key, chain, caption_defaults[key])
    captions = CaptionOptions()
    # Each key alone first, so every bad value is reported at the table where it is written (CaptionOptions
    # stops at its first error); keep_tokens_separator is only checked against caption_separator, below.
    bad_caption = False
    for key in _CAPTION_KEYS:
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
            named = [k for k in _CAPTION_KEYS if re.search(rf"\b{k}\b", message)] or ["keep_tokens_separator"]
            where = caption_origins[named[0]]
            others = [f"{k} from {caption_origins[k]}" for k in named[1:] if caption_origins[k] != where]
            problems.add(f"{where}: {message}" + (f" ({', '.join(others)})" if others else ""))

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key in ("num_repeats", "is_reg", "class_tokens", "caption_extension", "flip_aug", "color_aug",
                "random_crop", "alpha_mask", *_PATH_KEYS):
        values[key], origins[key] = _lookup(key, chain, defaults[key])

    if values["num_repeats"] < 1:
        problems.add(f"{origins['num_repeats']}: num_repeats = {values['num_repeats']} must be >= 1")
    if kind == "controlnet" and values["random_crop"]:
        problems.add(f"{origins['random_crop']}: random_crop = true is not supported by ControlNet datasets "
                     "(the conditioning image must stay aligned with the target)")
    if kind in ("dreambooth", "controlnet") and values["image_dir"] is None:
        problems.add(f"{subset_where}: image_dir is missing: a {_KIND_LABELS[kind]} subset needs the folder of "
                     "its images")

    paths: dict[str, Path | None] = {}
    for key in _PATH_KEYS:
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
        source=subset_where,
    )


# --------------------------------------------------------------------------------------------------------
# Synthesising a config from the command line
# --------------------------------------------------------------------------------------------------------


def _from_command_line(args: argparse.Namespace, cli: _Layer, supported: frozenset[str],
                       problems: _Problems) -> list[DatasetConfig]:
    """kohya's implicit dataset: --in_json (fine-tuning), --conditioning_data_dir (ControlNet), or the
    `<repeats>_<class tokens>` subfolders of --train_data_dir / --reg_data_dir (DreamBooth)."""
    train_dir: str | None = getattr(args, "train_data_dir", None)
    reg_dir: str | None = getattr(args, "reg_data_dir", None)
    in_json: str | None = getattr(args, "in_json", None)
    cond_dir: str | None = getattr(args, "conditioning_data_dir", None)

    kind: DatasetKind
    if in_json is not None:
        kind = "finetuning"
        if cond_dir is not None:
            problems.add("--in_json (fine-tuning) and --conditioning_data_dir (ControlNet) cannot be combined: "
                         "drop one, or describe the datasets in a --dataset_config")
            return []
        subsets = [_Layer({"metadata_file": in_json, "image_dir": train_dir}, "argument --in_json")]
    elif cond_dir is not None:
        kind = "controlnet"
        if train_dir is None:
            problems.add("--conditioning_data_dir needs --train_data_dir: the folder of the target images "
                         "(same file names as the conditioning images)")
            return []
        # kohya's ControlNet convention: the images are directly in --train_data_dir, no repeat folders.
        subsets = [_Layer({"image_dir": train_dir, "conditioning_data_dir": cond_dir}, "argument --train_data_dir")]
    elif train_dir is not None and getattr(args, "conditioning_filter", None) and _is_flat_image_folder(train_dir):
        # kohya's ControlNet layout: images (and caption sidecars) directly in the folder; the filter makes
        # each condition from its image, so no second folder and no repeat subfolders are needed.
        kind = "dreambooth"
        subsets = [_Layer({"image_dir": train_dir}, "argument --train_data_dir")]
    elif train_dir is not None:
        kind = "dreambooth"
        subsets = _dreambooth_subsets(train_dir, "train_data_dir", is_reg=False, problems=problems)
    else:
        listed = "; or ".join(_CLI_OPTIONS[k] for k in ("dreambooth", "finetuning", "controlnet") if k in supported)
        problems.add(f"no training data given: pass --dataset_config FILE.toml; or {listed}")
        return []

    if kind not in supported:
        listed = "; or ".join(_CLI_OPTIONS[k] for k in ("dreambooth", "finetuning", "controlnet") if k in supported)
        problems.add(f"the command line describes a {_KIND_LABELS[kind]} dataset, but this script supports only "
                     f"{_kinds_text(supported)} datasets: pass {listed}; or a --dataset_config")
        return []
    if reg_dir is not None:
        if kind == "dreambooth":
            subsets += _dreambooth_subsets(reg_dir, "reg_data_dir", is_reg=True, problems=problems)
        else:
            logger.warning("--reg_data_dir is ignored: regularisation images are only used by DreamBooth datasets")
    if not subsets:
        return []
    built = _build_dataset(kind, [kind] * len(subsets), [[s, cli] for s in subsets], [cli], "command line", problems)
    return [] if built is None else [built]


def _is_flat_image_folder(folder: str) -> bool:
    """Images directly in ``folder`` and no ``<repeats>_<class tokens>`` subfolder (so not a DreamBooth root)."""
    root = Path(folder).expanduser()
    try:
        entries = list(root.iterdir())
    except OSError:
        return False
    if any(e.is_dir() and _DREAMBOOTH_FOLDER_RE.match(e.name) for e in entries):
        return False
    return any(e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in entries)


def _dreambooth_subsets(folder: str, flag: str, *, is_reg: bool, problems: _Problems) -> list[_Layer]:
    """One subset per `<N>_<class tokens>` subfolder (N repeats); other folders are skipped with a warning."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        problems.add(f"argument --{flag} '{folder}' does not exist or is not a folder")
        return []
    subsets: list[_Layer] = []
    loose_images = 0
    try:
        entries = sorted(root.iterdir())
    except OSError as error:
        problems.add(f"argument --{flag} '{folder}' cannot be listed ({error})")
        return []
    for entry in entries:
        if not entry.is_dir():
            loose_images += entry.suffix.lower() in IMAGE_EXTENSIONS
            continue
        match = _DREAMBOOTH_FOLDER_RE.match(entry.name)
        if match is None or int(match.group(1)) < 1:
            logger.warning("--%s: skipping folder '%s': its name is not '<repeats>_<class tokens>' with "
                           "repeats >= 1 (e.g. '10_sks dog')", flag, entry)
            continue
        class_tokens = match.group(2).strip() or None
        values = {"image_dir": str(entry), "num_repeats": int(match.group(1)), "is_reg": is_reg,
                  "class_tokens": class_tokens}
        subsets.append(_Layer(values, f"argument --{flag} subfolder '{entry.name}'"))
    if not subsets:
        hint = (f"; the {loose_images} image(s) directly in it are not used: move them into a subfolder such as "
                f"'{root / '10_sks dog'}'" + ("" if is_reg else ", or use --in_json for a fine-tuning dataset")
                if loose_images else "")
        problems.add(f"argument --{flag} '{folder}' has no subfolder named '<repeats>_<class tokens>' "
                     f"(e.g. '10_sks dog' for 10 repeats with the caption 'sks dog'){hint}")
    return subsets


def _kinds_text(kinds: Collection[str]) -> str:
    ordered = [k for k in ("dreambooth", "finetuning", "controlnet") if k in kinds]
    return " and ".join(_KIND_LABELS[k] for k in ordered)


def _hints(kinds: Collection[str]) -> str:
    ordered = [k for k in ("dreambooth", "finetuning", "controlnet") if k in kinds]
    return " or ".join(_KIND_HINTS[k] for k in ordered)

