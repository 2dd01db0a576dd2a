"""`load_dataset_configs(flags, support)`: the datasets to train on, from a file or the command line.

It reads kohya's `--dataset_config` schema (TOML or JSON) or, without one, synthesises the same structure
from `--in_json` / `--train_data_dir` / `--reg_data_dir` / `--conditioning_data_dir`. Unlike kohya
(voluptuous, first error only, "extra keys not allowed"), every problem is collected and reported in one
`DatasetConfigError`, each line naming the file, the table (`cfg.toml [[datasets]] #1 [[datasets.subsets]]
#2`) and the key, with a "did you mean" for typos.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from library import toml_values
from library.data.dataset_config import (
    ALL_KINDS,
    DatasetConfig,
    DatasetConfigError,
    DatasetKind,
    parse_face_crop_range,
    parse_resolution,
)
from library.data.dataset_config_chain import (
    CLI_ONLY_KEYS,
    CLI_OPTIONS,
    DATASET_KEYS,
    DREAMBOOTH_FOLDER_RE,
    KIND_LABELS,
    KIND_ONLY_KEYS,
    SUBSET_KEYS,
    SUBSET_ONLY_KEYS,
    UNSUPPORTED_HINTS,
    UNSUPPORTED_KEYS,
    ConfigLayer,
    ConfigProblems,
    build_dataset,
    kind_hints,
    kinds_text,
)
from library.data.metadata import IMAGE_EXTENSIONS
from library.toml_values import TomlDecodeError, check_kind, reject, value_repr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetFlags:
    """The dataset flags of the command line (library.cli.data_args fills it; None: not given).

    ``key_values`` holds, for each dataset config key, the value its flag gives (`CLI_NAMES` maps the keys
    whose flag is named differently): the last fallback before the defaults.
    """

    dataset_config: str | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    in_json: str | None = None
    conditioning_data_dir: str | None = None
    conditioning_filter: str | None = None
    prior_loss_weight: float | None = None
    seed: int | None = None  # the validation split's seed unless validation_seed is set (kohya)
    key_values: Mapping[str, Any] = field(default_factory=dict)


def load_dataset_configs(flags: DatasetFlags,
                         support: Collection[DatasetKind] | None = None) -> list[DatasetConfig]:
    """The datasets to train on, from `--dataset_config` or else from the dataset CLI flags.

    `support` is the set of kinds the calling script can train (None: all); any other kind is an error
    saying what the script expects. Every problem found is reported together in one DatasetConfigError.
    """
    supported = ALL_KINDS if support is None else frozenset(support)
    if not supported or not supported <= ALL_KINDS:
        raise ValueError(f"support must be a non-empty subset of {sorted(ALL_KINDS)}, got {sorted(supported)}")

    config_file = flags.dataset_config
    problems = ConfigProblems()
    cli = _cli_layer(flags, problems)
    # prior_loss_weight is a command-line setting only (as in kohya), the same for every dataset.
    prior_loss_weight = flags.prior_loss_weight
    prior_loss_weight = 1.0 if prior_loss_weight is None else float(prior_loss_weight)
    if prior_loss_weight < 0:
        problems.add(f"argument --prior_loss_weight = {prior_loss_weight} must be >= 0")
    if config_file is not None:
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir")
                   if getattr(flags, name) is not None]
        if ignored:
            logger.warning("%s %s ignored because --dataset_config is given: set image_dir / metadata_file / "
                           "conditioning_data_dir in '%s' instead", ", ".join(ignored),
                           "is" if len(ignored) == 1 else "are", config_file)
        datasets = _from_file(Path(config_file), cli, supported, problems)
        problems.raise_if_any(f"dataset config '{config_file}'")
    else:
        datasets = _from_command_line(flags, cli, supported, problems)
        problems.raise_if_any("dataset arguments")
    return [replace(d, prior_loss_weight=prior_loss_weight) for d in datasets]


def _read_document(path: Path) -> dict[str, Any]:
    """The parsed TOML/JSON document; a missing or unparsable file is a one-line DatasetConfigError."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise DatasetConfigError(f"dataset config '{path}' must be a .toml or .json file")
    if not path.is_file():
        raise DatasetConfigError(f"dataset config '{path}' not found: check the --dataset_config path")
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if suffix == ".json" else toml_values.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetConfigError(f"dataset config '{path}' cannot be read ({e})") from None
    except (json.JSONDecodeError, TomlDecodeError) as e:
        raise DatasetConfigError(f"dataset config '{path}' is not valid {suffix[1:].upper()} ({e}): "
                                 "fix the syntax") from None
    if not isinstance(document, dict):
        raise DatasetConfigError(f"dataset config '{path}' must hold a table/object at the top level")
    return document


def _from_file(path: Path, cli: ConfigLayer, supported: frozenset[str], problems: ConfigProblems) -> list[DatasetConfig]:
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
    general = ConfigLayer(_check_table(general_raw, "general", f"{file} [general]", problems), f"{file} [general]")

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
        dataset = ConfigLayer(_check_table(own, "dataset", where, problems), where)
        subsets_raw = dataset_raw.get("subsets")
        if subsets_raw is None or subsets_raw == []:
            problems.add(f"{where}: no [[datasets.subsets]]: every dataset needs at least one subset")
            continue
        if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw):
            problems.add(f"{where}: subsets must be an array of tables: write [[datasets.subsets]]")
            continue
        subsets = [
            ConfigLayer(_check_table(raw, "subset", f"{where} [[datasets.subsets]] #{j}", problems),
                   f"{where} [[datasets.subsets]] #{j}")
            for j, raw in enumerate(subsets_raw, start=1)
        ]
        kind, subset_kinds = _detect_kind(subsets_raw, subsets, where, problems)
        if kind is not None and kind not in supported:
            problems.add(f"{where}: this is a {KIND_LABELS[kind]} dataset, but this script supports only "
                         f"{kinds_text(supported)} datasets: give it {kind_hints(supported)}")
            kind = None
        if kind is not None:
            for layer in (dataset, *subsets):
                for key in layer.values:
                    kinds = KIND_ONLY_KEYS.get(key)
                    if kinds is not None and kind not in kinds:
                        problems.add(f"{layer.where}: {key} is not used by {KIND_LABELS[kind]} datasets "
                                     f"(only by {kinds_text(kinds)} ones): remove it")
        # Resolved even when the kind is wrong, so that the other problems are reported in the same run.
        built = build_dataset(kind, subset_kinds, [[s, dataset, general, cli] for s in subsets],
                               [dataset, general, cli], where, problems)
        if built is not None:
            datasets.append(built)
    return datasets


def _check_table(table: Mapping[str, Any], level: Literal["general", "dataset", "subset"], where: str,
                 problems: ConfigProblems) -> dict[str, Any]:
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
            problems.add(f"{where}: {key} = {value_repr(raw)} {e}")
    return values


def _misplaced(key: str, level: str, known: Sequence[str]) -> str:
    """Why `key` cannot appear at `level`, as the rest of a problem line."""
    if key in SUBSET_ONLY_KEYS:
        return f"{key} is only allowed in [[datasets.subsets]]"
    if key in DATASET_KEYS:
        return f"{key} is only allowed in [general] or [[datasets]], not in [[datasets.subsets]]"
    if key in UNSUPPORTED_KEYS:
        return f"{key} is a kohya key that is not supported yet: remove it{UNSUPPORTED_HINTS.get(key, '')}"
    if key in CLI_ONLY_KEYS:
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
        return parse_resolution(raw) if not isinstance(raw, str) else reject(raw, "an integer or [width, height]")
    if kind == "face_range":
        return parse_face_crop_range(raw)
    if kind == "table":
        return dict(raw) if isinstance(raw, dict) else reject(raw, "a table, e.g. {key = \"value\"}")
    return check_kind(kind, raw)


def _detect_kind(subsets_raw: Sequence[Mapping[str, Any]], subsets: Sequence[ConfigLayer], where: str,
                 problems: ConfigProblems) -> tuple[DatasetKind | None, list[DatasetKind]]:
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
        parts = " and ".join(f"{KIND_LABELS[k]} subsets (#{', #'.join(map(str, js))})" for k, js in members.items())
        problems.add(f"{where}: mixes {parts}; kinds cannot be mixed within one dataset: put them in separate "
                     "[[datasets]] (ControlNet subsets have conditioning_data_dir, fine-tuning subsets have "
                     "metadata_file, DreamBooth subsets have neither)")
        valid = False
    return (subset_kinds[0] if valid else None), subset_kinds


def _cli_layer(flags: DatasetFlags, problems: ConfigProblems) -> ConfigLayer:
    """The command-line values as the last fallback before the defaults (None means unset, as in kohya)."""
    values: dict[str, Any] = {}
    for key in (*DATASET_KEYS, *SUBSET_KEYS, "alpha_mask"):
        value = flags.key_values.get(key)
        if key == "validation_seed" and value is None:
            value = flags.seed  # kohya: the training seed unless a validation seed is given
        if value is None:
            continue
        if key == "resolution":
            try:
                value = parse_resolution(value)
            except ValueError as e:
                problems.add(f"argument --resolution {value_repr(value)} {e}")
                continue
        values[key] = value
    return ConfigLayer(values, "command line", from_cli=True)


def _from_command_line(flags: DatasetFlags, cli: ConfigLayer, supported: frozenset[str],
                       problems: ConfigProblems) -> list[DatasetConfig]:
    """kohya's implicit dataset: --in_json (fine-tuning), --conditioning_data_dir (ControlNet), or the
    `<repeats>_<class tokens>` subfolders of --train_data_dir / --reg_data_dir (DreamBooth)."""
    train_dir, reg_dir = flags.train_data_dir, flags.reg_data_dir
    in_json, cond_dir = flags.in_json, flags.conditioning_data_dir

    kind: DatasetKind
    if in_json is not None:
        kind = "finetuning"
        if cond_dir is not None:
            problems.add("--in_json (fine-tuning) and --conditioning_data_dir (ControlNet) cannot be combined: "
                         "drop one, or describe the datasets in a --dataset_config")
            return []
        subsets = [ConfigLayer({"metadata_file": in_json, "image_dir": train_dir}, "argument --in_json")]
    elif cond_dir is not None:
        kind = "controlnet"
        if train_dir is None:
            problems.add("--conditioning_data_dir needs --train_data_dir: the folder of the target images "
                         "(same file names as the conditioning images)")
            return []
        # kohya's ControlNet convention: the images are directly in --train_data_dir, no repeat folders.
        subsets = [ConfigLayer({"image_dir": train_dir, "conditioning_data_dir": cond_dir}, "argument --train_data_dir")]
    elif train_dir is not None and flags.conditioning_filter and _is_flat_image_folder(train_dir):
        # kohya's ControlNet layout: images (and caption sidecars) directly in the folder; the filter makes
        # each condition from its image, so no second folder and no repeat subfolders are needed.
        kind = "dreambooth"
        subsets = [ConfigLayer({"image_dir": train_dir}, "argument --train_data_dir")]
    elif train_dir is not None:
        kind = "dreambooth"
        subsets = _dreambooth_subsets(train_dir, "train_data_dir", is_reg=False, problems=problems)
    else:
        listed = "; or ".join(CLI_OPTIONS[k] for k in ("dreambooth", "finetuning", "controlnet") if k in supported)
        problems.add(f"no training data given: pass --dataset_config FILE.toml; or {listed}")
        return []

    if kind not in supported:
        listed = "; or ".join(CLI_OPTIONS[k] for k in ("dreambooth", "finetuning", "controlnet") if k in supported)
        problems.add(f"the command line describes a {KIND_LABELS[kind]} dataset, but this script supports only "
                     f"{kinds_text(supported)} datasets: pass {listed}; or a --dataset_config")
        return []
    if reg_dir is not None:
        if kind == "dreambooth":
            subsets += _dreambooth_subsets(reg_dir, "reg_data_dir", is_reg=True, problems=problems)
        else:
            logger.warning("--reg_data_dir is ignored: regularisation images are only used by DreamBooth datasets")
    if not subsets:
        return []
    built = build_dataset(kind, [kind] * len(subsets), [[s, cli] for s in subsets], [cli], "command line", problems)
    return [] if built is None else [built]


def _is_flat_image_folder(folder: str) -> bool:
    """Images directly in ``folder`` and no ``<repeats>_<class tokens>`` subfolder (so not a DreamBooth root)."""
    root = Path(folder).expanduser()
    try:
        entries = list(root.iterdir())
    except OSError:
        return False
    if any(e.is_dir() and DREAMBOOTH_FOLDER_RE.match(e.name) for e in entries):
        return False
    return any(e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in entries)


def _dreambooth_subsets(folder: str, flag: str, *, is_reg: bool, problems: ConfigProblems) -> list[ConfigLayer]:
    """One subset per `<N>_<class tokens>` subfolder (N repeats); other folders are skipped with a warning."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        problems.add(f"argument --{flag} '{folder}' does not exist or is not a folder")
        return []
    subsets: list[ConfigLayer] = []
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
        match = DREAMBOOTH_FOLDER_RE.match(entry.name)
        if match is None or int(match.group(1)) < 1:
            logger.warning("--%s: skipping folder '%s': its name is not '<repeats>_<class tokens>' with "
                           "repeats >= 1 (e.g. '10_sks dog')", flag, entry)
            continue
        class_tokens = match.group(2).strip() or None
        values = {"image_dir": str(entry), "num_repeats": int(match.group(1)), "is_reg": is_reg,
                  "class_tokens": class_tokens}
        subsets.append(ConfigLayer(values, f"argument --{flag} subfolder '{entry.name}'"))
    if not subsets:
        hint = (f"; the {loose_images} image(s) directly in it are not used: move them into a subfolder such as "
                f"'{root / '10_sks dog'}'" + ("" if is_reg else ", or use --in_json for a fine-tuning dataset")
                if loose_images else "")
        problems.add(f"argument --{flag} '{folder}' has no subfolder named '<repeats>_<class tokens>' "
                     f"(e.g. '10_sks dog' for 10 repeats with the caption 'sks dog'){hint}")
    return subsets
