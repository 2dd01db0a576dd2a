"""Training state folders that never unpickle: tensors in safetensors, everything else in JSON.

Why our own writer instead of ``accelerator.save_state``/``load_state``: accelerate pickles the optimizer,
scheduler, RNG states and every object registered for checkpointing, and unpickles them on ``--resume`` with
``weights_only=False``, so a state folder someone shares runs their code. It also stores the whole frozen model
next to a LoRA (11 MB of state for a 0.47 MB LoRA on the tiny model). A folder written here holds:

    train_state.json           position (step, epoch, data position, seed), run settings, file sizes (written last)
    model_<name>.safetensors   the trainable parameters of each prepared module (requires_grad only)
    optimizer.json/.safetensors, scheduler.json, scaler.json, custom_<i>.json/.safetensors (EMA)
    rng_<rank>.json/.safetensors   each rank's torch / CUDA / numpy / python RNG states

DeepSpeed keeps its engine checkpoint (a pickle, in ``deepspeed/``), written without frozen parameters; before
DeepSpeed loads it every pickle is run through torch's weights-only unpickler, which refuses code.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from library.training.checkpoints import STATE_SUFFIX, TRAIN_STATE_FILE, StateError, TrainState
from library.io import (
    FOLDER_TEMP_SUFFIX,
    SafetensorsHeaderError,
    atomic_save_safetensors,
    folder_temp_path,
    read_safetensors_header,
    replace_path,
)
from library.training.process_count import load_scheduler_state, position_for_processes
from library.training.run_settings import MODEL_FAMILY, SCHEDULE_SETTINGS, changed_settings
from library.training.state_pickles import (  # noqa: F401 - check_deepspeed_pickles is part of this API
    check_deepspeed_pickles,
    looks_pickled,
    state_files as _state_files,
)

FORMAT = "safetensors-json-1"
DEEPSPEED_FORMAT = "deepspeed-1"
DEEPSPEED_FOLDER = "deepspeed"
DEEPSPEED_TAG = "engine"
FSDP_FORMAT = "fsdp-1"  # each rank's own shards: fsdp_model_rank<r>.safetensors, fsdp_optimizer_rank<r>.json/.safetensors
ASIDE_SUFFIX = ".old"


# --------------------------------------------------------------------------------------------------------
# Trees of tensors and plain values <-> JSON + safetensors
# --------------------------------------------------------------------------------------------------------


def _join(key: str, part: Any) -> str:
    return f"{key}/{part}" if key else str(part)


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor], ids: dict[int, str]) -> Any:
    """A JSON value for ``value``; its tensors go to ``tensors`` under path-like keys.

    Values JSON has no type for are one-key objects whose key starts with ``$``; a dict with keys that are not
    strings (optimizer states are keyed by parameter index) or that start with ``$`` is stored as pairs.
    """
    if isinstance(value, torch.Tensor):
        known = ids.get(id(value))  # one tensor in many places (bitsandbytes' shared qmaps): stored once
        if known is not None:
            return {"$t": known}
        if key in tensors:
            raise ValueError(f"two tensors map to the state key {key!r}")
        tensors[key], ids[id(value)] = value, key
        return {"$t": key}
    if isinstance(value, np.ndarray):
        return {"$a": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, _join(key, k), tensors, ids) for k, v in value.items()}
        return {"$pairs": [[k, _encode(v, _join(key, k), tensors, ids)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, _join(key, i), tensors, ids) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(key, i), tensors, ids) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state entry {key!r} is a {type(value).__name__}, which cannot be stored without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$t" in value:
        return tensors[value["$t"]]
    if "$a" in value:
        return np.array(value["$a"], dtype=value["dtype"])
    if "$dtype" in value:
        return getattr(torch, value["$dtype"])
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    if "$pairs" in value:
        return {k: _decode(v, tensors) for k, v in value["$pairs"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent, separators=None if indent else (",", ":"))
        handle.flush()
        os.fsync(handle.fileno())


def write_tree(folder: Path, stem: str, tree: Any) -> None:
    """``stem.json`` (structure and plain values) and, when there are tensors, ``stem.safetensors``."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors, {})
    if tensors:
        atomic_save_safetensors(_unshared(tensors), folder / f"{stem}.safetensors")
    _write_json(folder / f"{stem}.json", encoded)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies where two entries are views of one storage (safetensors refuses shared memory)."""
    storages: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in storages:
            tensor = tensor.clone()
        elif pointer is not None:
            storages.add(pointer)
        result[key] = tensor.contiguous()
    return result


def read_tree(folder: Path, stem: str) -> Any:
    tensor_file = folder / f"{stem}.safetensors"
    tensors = _load_safetensors(tensor_file) if tensor_file.is_file() else {}
    try:
        return _decode(_read_json(folder / f"{stem}.json"), tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise StateError(f"--resume {folder}: {stem}.json does not match {tensor_file.name} ({error}); the folder is "
                         "damaged: resume from another state folder") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"--resume {path.parent}: {path.name} is missing; the folder is incomplete: resume from "
                         "another state folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateError(f"--resume {path.parent}: {path.name} is not valid JSON ({error}); the folder is damaged: "
                         "resume from another state folder") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors_file(path)
    return load_file(str(path))


# --------------------------------------------------------------------------------------------------------
# Checks that need no model: JSON, sizes, safetensors headers, pickles
# --------------------------------------------------------------------------------------------------------


def check_safetensors_file(path: Path) -> None:
    """The header parses and the data it describes is all there (a truncated copy fails here, not in a kernel)."""
    damaged = f"--resume {path.parent}: {path.name} is truncated or damaged"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_len, header = read_safetensors_header(handle, max_len=min(size, 100_000_000))
    except SafetensorsHeaderError as error:
        if error.header_len is None:
            raise StateError(f"{damaged} ({size} bytes); resume from another state folder") from None
        raise StateError(f"{damaged} (header of {error.header_len} bytes in a {size}-byte file); resume from "
                         "another state folder") from None
    except FileNotFoundError:
        raise StateError(f"--resume {path.parent}: {path.name} is missing; resume from another state folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StateError(f"{damaged} (unreadable header); resume from another state folder") from None
    end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_len + end:
        raise StateError(f"{damaged} ({size} bytes, its header describes {8 + header_len + end}); resume from "
                         "another state folder")


def refuse_pickles(folder: Path) -> None:
    """Our state folders hold only JSON and safetensors: any pickle in one is refused, never loaded."""
    found = [p for p in _state_files(folder) if p.suffix not in (".json", ".safetensors") and looks_pickled(p)]
    if found:
        names = ", ".join(str(p.relative_to(folder)) for p in found)
        raise StateError(f"--resume {folder}: {names} would be unpickled, and unpickling runs code; state folders of "
                         "this trainer hold only safetensors and JSON: resume from a state saved by this version "
                         "(or delete the file if you trust nothing else in the folder)")


@dataclass(frozen=True)
class StateRecord:
    """``train_state.json``: the position plus what the state needs to be trusted and compared."""

    state: TrainState
    format: str | None  # None: an older folder written by accelerate
    settings: dict[str, Any]
    files: dict[str, int]


def read_record(folder: Path) -> StateRecord:
    """The state file of ``folder``, checked; every problem is one StateError line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StateError(f"--resume {folder}: no such state folder (saved with --save_state as <name>{STATE_SUFFIX}, "
                         "or use --resume auto)")
    if not (folder / TRAIN_STATE_FILE).is_file():
        raise StateError(f"--resume {folder}: {TRAIN_STATE_FILE} is missing, so the step and epoch to resume from are "
                         "unknown; was this folder written by --save_state of this trainer?")
    data = _read_json(folder / TRAIN_STATE_FILE)
    try:
        if not isinstance(data, dict):
            raise TypeError("not an object")
        state = TrainState.from_json(json.dumps(data))
        numbers = (state.global_step, state.epoch, state.batches_done_in_epoch, state.seed, state.num_processes)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise TypeError("step, epoch, position and seed must be integers >= 0")
        files = {str(k): int(v) for k, v in (data.get("files") or {}).items()}
        settings = dict(data.get("settings") or {})
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({type(error).__name__}: {error}): resume "
                         "from another state folder") from None
    return StateRecord(state, data.get("format"), settings, files)


def check_folder(folder: Path, record: StateRecord) -> None:
    """Pickles refused (or weights-only checked for DeepSpeed), files present at their recorded sizes,
    safetensors headers whole, JSON parseable: all before the model loads."""
    if record.format == DEEPSPEED_FORMAT:
        check_deepspeed_pickles(folder)
    else:
        refuse_pickles(folder)
        if record.format not in (FORMAT, FSDP_FORMAT):
            raise StateError(f"--resume {folder}: {TRAIN_STATE_FILE} does not say how the state was written (an older "
                             "version of this trainer?); start a new run, or resume from a state saved by this version")
    for name, size in record.files.items():
        path = folder / name
        if not path.is_file():
            raise StateError(f"--resume {folder}: {name} is missing; the folder is incomplete: resume from another "
                             "state folder")
        if path.stat().st_size != size:
            raise StateError(f"--resume {folder}: {name} is truncated or damaged ({path.stat().st_size} bytes, "
                             f"{size} when saved): resume from another state folder")
        if path.suffix == ".safetensors":
            check_safetensors_file(path)
        elif path.suffix == ".json":
            _read_json(path)


# --------------------------------------------------------------------------------------------------------
# Start-up: recover interrupted saves (library.training.resume decides whether and from where to resume)
# --------------------------------------------------------------------------------------------------------


def _aside_target(path: Path) -> Path | None:
    """``X.old`` or ``.X.<pid>.old`` (a folder renamed aside while being replaced) -> ``X``."""
    name = path.name[:-len(ASIDE_SUFFIX)]
    if name.startswith("."):
        stem, _, pid = name[1:].rpartition(".")
        if not pid.isdigit():
            return None
        name = stem
    return path.with_name(name) if name else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_output_dir(output_dir: Path) -> list[str]:
    """Finish or undo saves a kill interrupted, and return what was done (one phrase each).

    A save writes ``X.tmp-saving``, renames ``X`` aside, renames the temp to ``X``, then removes the aside copy;
    a kill between any two of these leaves one of: a temp alone (incomplete: removed, or complete with ``X``
    gone: renamed in), an aside copy with ``X`` present (removed) or with ``X`` gone (put back).
    """
    if not output_dir.is_dir():
        return []
    done: list[str] = []
    for temp in sorted(output_dir.glob(f"*{FOLDER_TEMP_SUFFIX}")):
        target = temp.with_name(temp.name[:-len(FOLDER_TEMP_SUFFIX)])
        complete = temp.is_dir() and (temp / TRAIN_STATE_FILE).is_file()
        if complete and not target.exists():
            _rename_quietly(temp, target)
            done.append(f"finished the interrupted save of {target.name}")
        else:
            _remove(temp)
            done.append(f"removed the incomplete {temp.name}")
    for aside in sorted(output_dir.glob(f"*{ASIDE_SUFFIX}")):
        target = _aside_target(aside)
        if target is None:
            continue
        if target.exists():
            _remove(aside)
            done.append(f"removed {aside.name} (replaced by {target.name})")
        else:
            _rename_quietly(aside, target)
            done.append(f"restored {target.name} from {aside.name}")
    for orphan in sorted(output_dir.glob(".*.tmp")):
        _remove(orphan)
        done.append(f"removed the orphan temp file {orphan.name}")
    return done


def _rename_quietly(source: Path, target: Path) -> None:
    """Another rank may have done the same rename a moment ago."""
    try:
        os.replace(source, target)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------------------
# Writing and reading a state
# --------------------------------------------------------------------------------------------------------


def _unwrap(accelerator: Any, module: nn.Module) -> nn.Module:
    from library.training.accelerate_utils import unwrap

    return unwrap(accelerator, module)


def _zero_stage(accelerator: Any) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    """Every RNG of this process; the long integer states as int64 tensors (5 KB each, not 14 KB of JSON)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _saved_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in _state_files(folder)}


@dataclass
class TrainingStateIO:
    """Saves and restores what trains: the prepared modules' trainable parameters, optimizer, scheduler,
    registered objects with state_dict/load_state_dict (EMA), gradient scaler, RNG states and the position."""

    accelerator: Any
    models: dict[str, nn.Module]  # the prepared modules (DDP wrappers without DeepSpeed)
    optimizer: Any
    lr_scheduler: Any
    custom: tuple[Any, ...] = ()
    settings: dict[str, Any] | None = None
    engine: Any = None  # the DeepSpeed engine, or None
    fsdp_root: Any = None  # under FSDP, the container of the sharded trained modules (library.training.sharded_state)

    def _format(self) -> str:
        return DEEPSPEED_FORMAT if self.engine is not None else FSDP_FORMAT if self.fsdp_root is not None else FORMAT

    # ---- saving ----------------------------------------------------------------------------------

    def save(self, folder: Path, state: TrainState) -> Path:
        """Written into ``<folder>.tmp-saving`` and swapped in: a kill never leaves no complete state."""
        accelerator, folder = self.accelerator, Path(folder)
        tmp = folder_temp_path(folder)
        if accelerator.is_main_process:
            _remove(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if self.engine is not None:
            self.engine.save_checkpoint(str(tmp / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        write_tree(tmp, f"rng_{accelerator.process_index}", _rng_state())
        if self.fsdp_root is not None:
            from library.training.sharded_state import fsdp_local_state

            tensors, optimizer_state = fsdp_local_state(self.fsdp_root, self.optimizer)
            atomic_save_safetensors(tensors, tmp / f"fsdp_model_rank{accelerator.process_index}.safetensors")
            write_tree(tmp, f"fsdp_optimizer_rank{accelerator.process_index}", optimizer_state)
        if accelerator.is_main_process:
            self._write_shared(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record = {**json.loads(state.to_json()), "format": self._format(),
                      "settings": self.settings or {}, "files": _saved_files(tmp)}
            _write_json(tmp / TRAIN_STATE_FILE, record, indent=1)  # last: its presence means the folder is complete
            replace_path(tmp, folder)
        accelerator.wait_for_everyone()
        return folder

    def _write_shared(self, tmp: Path) -> None:
        if self.engine is None and self.fsdp_root is None:
            for name, module in self.models.items():
                tensors = trainable_tensors(_unwrap(self.accelerator, module))
                atomic_save_safetensors(tensors, tmp / f"model_{name}.safetensors")
            write_tree(tmp, "optimizer", self.optimizer.state_dict())
        if self.lr_scheduler is not None:
            write_tree(tmp, "scheduler", self.lr_scheduler.state_dict())
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            write_tree(tmp, "scaler", scaler.state_dict())
        for index, obj in enumerate(self.custom):
            write_tree(tmp, f"custom_{index}", obj.state_dict())

    # ---- loading ---------------------------------------------------------------------------------

    def load(self, folder: Path, family: str | None = None) -> TrainState:
        """Restore a state checked by `prepare_resume`; mismatches with this run are one StateError line."""
        folder = Path(folder)
        record = read_record(folder)
        check_folder(folder, record)
        saved_processes, processes = record.state.num_processes, self.accelerator.num_processes
        if saved_processes != processes and (record.format != FORMAT or self._format() != FORMAT):
            raise StateError(f"--resume {folder} was saved by {saved_processes} process(es) and this run has "
                             f"{processes}; a DeepSpeed/FSDP state is split per process: resume on {saved_processes}")
        state = position_for_processes(folder, record.state, processes, record.settings, self.settings or {})
        saved_family = record.settings.get(MODEL_FAMILY)
        if family is not None and saved_family is not None and saved_family != family:
            raise StateError(f"--resume {folder} trained a {saved_family} model; --pretrained_model_name_or_path is "
                             f"an {family} model: resume with the state's base model")
        if (record.format == DEEPSPEED_FORMAT) != (self.engine is not None):
            raise StateError(f"--resume {folder} was saved {'with' if self.engine is None else 'without'} --deepspeed; "
                             "resume it the same way")
        if record.format != self._format() and FSDP_FORMAT in (record.format, self._format()):
            raise StateError(f"--resume {folder} was saved {'with' if record.format == FSDP_FORMAT else 'without'} "
                             "FSDP; resume it the same way")
        sharded = self.fsdp_root is not None or (self.engine is not None and _zero_stage(self.accelerator) == 3)
        if sharded and record.state.num_processes != self.accelerator.num_processes:
            raise StateError(f"--resume {folder}: its weights are sharded over {record.state.num_processes} process(es) "
                             f"(FSDP / ZeRO-3) and this run has {self.accelerator.num_processes}: launch with "
                             f"{record.state.num_processes}")
        fresh_lrs = [{k: g[k] for k in ("lr", "initial_lr") if k in g} for g in self.optimizer.param_groups]
        if self.fsdp_root is not None:
            self._load_fsdp_shards(folder)
        elif self.engine is not None:
            self.engine.load_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            for name, module in self.models.items():
                self._load_module(folder, name, _unwrap(self.accelerator, module))
            self._load_optimizer(folder)
        reschedule = bool(set(changed_settings(record.settings, self.settings or {})) & set(SCHEDULE_SETTINGS))
        self._load_scheduler(folder, fresh_lrs, record.state.global_step, reschedule, saved_processes)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and (folder / "scaler.json").is_file():
            scaler.load_state_dict(read_tree(folder, "scaler"))
        for index, obj in enumerate(self.custom):
            try:
                obj.load_state_dict(read_tree(folder, f"custom_{index}"))
            except (KeyError, ValueError) as error:
                raise StateError(f"--resume {folder}: custom_{index} ({type(obj).__name__}) does not fit this run: "
                                 f"{error}") from None
        rng_stem = f"rng_{self.accelerator.process_index}"
        if (folder / f"{rng_stem}.json").is_file():
            _set_rng_state(read_tree(folder, rng_stem))  # a rank the state had no file for keeps its seeded RNG
        return state

    def _load_fsdp_shards(self, folder: Path) -> None:
        from library.training.sharded_state import load_fsdp_local_state

        rank = self.accelerator.process_index
        file = folder / f"fsdp_model_rank{rank}.safetensors"
        if not file.is_file():
            raise StateError(f"--resume {folder}: {file.name} is missing: the state was saved by fewer processes; "
                             "resume an FSDP state with the same number of processes")
        try:
            load_fsdp_local_state(self.fsdp_root, self.optimizer, _load_safetensors(file),
                                  read_tree(folder, f"fsdp_optimizer_rank{rank}"))
        except (KeyError, ValueError, RuntimeError) as error:
            raise StateError(f"--resume {folder}: rank {rank}'s FSDP shards do not fit this run "
                             f"({str(error).splitlines()[0]}): use the state's flags and process count") from None

    def _load_module(self, folder: Path, name: str, module: nn.Module) -> None:
        file = folder / f"model_{name}.safetensors"
        if not file.is_file():
            raise StateError(f"--resume {folder}: {file.name} is missing: the state trained other modules than this "
                             "run (another script or --train_text_encoder/--learning_rate choice?)")
        saved, targets = _load_safetensors(file), trainable_tensors(module)
        missing, unexpected = sorted(set(targets) - set(saved)), sorted(set(saved) - set(targets))
        if missing or unexpected:
            raise StateError(f"--resume {folder}: {file.name} holds other parameters than this run trains "
                             f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. "
                             f"{unexpected[:1]}): the state was made with another network type, --network_args or "
                             "model; use the state's flags")
        for key, target in targets.items():
            if tuple(saved[key].shape) != tuple(target.shape):
                raise StateError(f"--resume {folder}: {file.name}: {key} is {tuple(saved[key].shape)} in the state, "
                                 f"{tuple(target.shape)} in this run: the state was made with another --network_dim, "
                                 "--network_args or model; use the state's flags")
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(saved[key])

    def _load_optimizer(self, folder: Path) -> None:
        try:
            self.optimizer.load_state_dict(read_tree(folder, "optimizer"))
        except (KeyError, ValueError, RuntimeError) as error:
            raise StateError(f"--resume {folder}: optimizer.json does not fit this run's optimizer "
                             f"({str(error).splitlines()[0]}): use the state's --optimizer_type and flags") from None

    def _load_scheduler(self, folder: Path, fresh_lrs: list[dict[str, float]], step: int, reschedule: bool,
                        saved_processes: int) -> None:
        """The saved schedule (counts rescaled to this run's process count), or with changed learning rates /
        schedule flags or a schedule that cannot be rescaled, the new one wound to ``step``."""
        if not reschedule and self.lr_scheduler is not None and (folder / "scheduler.json").is_file():
            reschedule = not load_scheduler_state(self.lr_scheduler, read_tree(folder, "scheduler"),
                                                  saved_processes=saved_processes,
                                                  num_processes=self.accelerator.num_processes)
        if not reschedule:
            return
        for group, fresh in zip(self.optimizer.param_groups, fresh_lrs):
            group.update(fresh)
        if self.lr_scheduler is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            for _ in range(step):
                self.lr_scheduler.step()


# --------------------------------------------------------------------------------------------------------
# NaN/inf stops: which saved state is from before the loss diverged
# --------------------------------------------------------------------------------------------------------

DIVERGENCE_FACTOR = 100.0  # a loss this many times the median of the earlier ones counts as diverged


def divergence_start(history: Iterable[dict[str, float]], stop_step: int) -> int:
    """The first weights index (optimizer steps applied) whose loss was non-finite or exploded.

    A history entry for step k holds the loss computed on the weights after k - 1 steps; the stop itself is a
    non-finite loss on the weights after ``stop_step`` steps.
    """
    losses = sorted((int(e["step"]) - 1, float(e["loss/current"])) for e in history if "loss/current" in e)
    earlier: list[float] = []
    for index, loss in losses:
        if not math.isfinite(loss) or (earlier and loss > DIVERGENCE_FACTOR * float(np.median(earlier))):
            return index
        earlier.append(loss)
    return stop_step


def state_before_divergence(saved: list[tuple[int, Path]], history: Iterable[dict[str, float]],
                            stop_step: int) -> Path | None:
    """The newest state (step, folder) still on disk whose weights came before the divergence."""
    start = divergence_start(history, stop_step)
    good = [(step, path) for step, path in saved if step < start and (Path(path) / TRAIN_STATE_FILE).is_file()]
    return max(good, key=lambda item: item[0])[1] if good else None
