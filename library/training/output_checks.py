"""Output problems found before training instead of at the first save, after hours of work.

`check_outputs` runs before the model loads: the output folder can be created and written, ``--output_name``
is a plain file name, and the files this run will write are free (an existing one is replaced only with
``--overwrite``, or when ``--resume`` continues the same run in its own folder). `warn_if_disk_short` runs
once the saved modules exist and the step count is known. A save that still fails (a full disk) becomes one
`OutputError` line via `raise_save_failure`; the atomic writers in `library.io` keep earlier
files intact and remove their temp files.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.training.checkpoints import STATE_SUFFIX, SaveSettings, TrainState, latest_state_folder
from library.io import save_temp_paths

OVERWRITE_FLAG = "--overwrite"
# AdamW keeps two fp32 moments per trained parameter
OPTIMIZER_STATE_BYTES_PER_TRAINED_PARAM = 8


class OutputError(Exception):
    """The output folder or a file in it cannot be used; the message names the path and the fix."""


@dataclass(frozen=True)
class PlannedOutput:
    """One path this run writes; ``step``/``epoch`` tell which save it belongs to (both None: the final one)."""

    path: Path
    step: int | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class OutputOptions:
    """What the start-up output checks need from the flags (library.cli.training_args fills it)."""

    output_name: str | None
    output_dir: str | None
    save: SaveSettings | None = None  # the run's save names and frequencies; None without --output_dir
    overwrite: bool = False
    resume: str | None = None
    max_train_steps: int | None = None
    max_train_epochs: int | None = None
    raw_ema_copy: bool = False  # --use_ema --save_raw_too: each save also writes '<name>-raw'
    unet_decoder_copy: bool = False  # --train_unet_decoder: each save also writes '<name>-model.safetensors'


# --------------------------------------------------------------------------------------------------
# start-up checks


def check_outputs(options: OutputOptions, resume_state: TrainState | None = None) -> None:
    """Every output check that needs no model: raise OutputError for the first problem found."""
    check_output_name(options.output_name)
    if not options.output_dir or options.save is None:
        return  # the scripts require it with their own message
    output_dir = Path(options.output_dir)
    check_output_dir(output_dir)
    if options.overwrite or not output_dir.is_dir():
        return
    save = options.save
    if resume_state is not None and _same_run(options.resume, save):
        return  # resuming a run in its own folder rewrites that run's files: what the user asked for
    taken = [o.path for o in planned_outputs(options, save)
             if (o.path.exists() or o.path.is_symlink()) and _written(o, resume_state)]
    if taken:
        raise OutputError(_taken_message(taken, bool(options.resume)))


def check_output_name(name: str | None) -> None:
    """Saved names are ``{output_name}...`` inside --output_dir: a separator or '..' would write elsewhere."""
    if not name:
        return
    separators = {"/", os.sep, *(filter(None, [os.altsep])), "\\"}
    if any(s in name for s in separators) or name in (".", ".."):
        raise OutputError(f"--output_name {name!r} must be a plain file name (no '/', no '..'); put the folder in "
                          "--output_dir")


def check_output_dir(output_dir: Path) -> None:
    """The folder exists or can be created, and a file can be written in it (tried, since root ignores modes)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"--output_dir {output_dir} is a file, not a folder; give a folder to save into")
    existing = output_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"--output_dir {output_dir} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as error:
        what = "is not writable" if existing == output_dir else f"cannot be created in {existing}"
        raise OutputError(f"--output_dir {output_dir} {what} ({error.strerror or error}); make it writable or "
                          "choose another --output_dir") from error


def planned_outputs(options: OutputOptions, save: SaveSettings) -> list[PlannedOutput]:
    """The final save, and the step/epoch saves: computed where the flags fix their number, else every
    existing file of the run's step/epoch name pattern (the data is not read yet to count steps per epoch)."""
    outputs = [PlannedOutput(p) for p in _paths_for(options, save, save.output_name, final=True)]
    steps_known = bool(options.max_train_steps) and not options.max_train_epochs
    if save.every_n_steps and steps_known:
        for step in range(save.every_n_steps, options.max_train_steps, save.every_n_steps):
            outputs += [PlannedOutput(p, step=step) for p in _paths_for(options, save, save.step_name(step))]
    if save.every_n_epochs and options.max_train_epochs:
        for epoch in range(save.every_n_epochs, options.max_train_epochs, save.every_n_epochs):
            outputs += [PlannedOutput(p, epoch=epoch) for p in _paths_for(options, save, save.epoch_name(epoch))]
    existing = _existing_numbered_outputs(options, save)
    outputs += [o for o in existing if (o.step is not None and not steps_known and save.every_n_steps)
                or (o.epoch is not None and not options.max_train_epochs and save.every_n_epochs)]
    return outputs


def _paths_for(options: OutputOptions, save: SaveSettings, name: str, final: bool = False) -> list[Path]:
    """The model (plus its companions: EMA raw weights, ControlNet's trained UNet) and the state of one save."""
    model = save.model_path(name)
    paths = [model]
    if options.raw_ema_copy:
        paths.append(model.with_name(f"{model.stem}-raw{model.suffix}"))
    if options.unet_decoder_copy:
        paths.append(model.with_name(f"{model.stem}-model.safetensors"))
    if save.save_state or (final and save.save_state_on_train_end):
        paths.append(save.state_path(name))
    return paths


def _existing_numbered_outputs(options: OutputOptions, save: SaveSettings) -> list[PlannedOutput]:
    pattern = re.compile(re.escape(save.output_name) + r"-(?:step(\d{8})|(\d{6}))")
    found = []
    for path in save.output_dir.glob(f"{glob_escape(save.output_name)}-*"):
        match = pattern.match(path.name)
        if match is None:
            continue
        base = path.name[:match.end()]
        if path in _paths_for(options, save, base):
            step, epoch = match.groups()
            found.append(PlannedOutput(path, int(step) if step else None, int(epoch) if epoch else None))
    return found


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _written(output: PlannedOutput, resume_state: TrainState | None) -> bool:
    """A resumed run writes only the saves after its resume point (and the final one)."""
    if resume_state is None:
        return True
    if output.step is not None:
        return output.step > resume_state.global_step
    if output.epoch is not None:
        return output.epoch >= resume_state.epoch
    return True


def _same_run(resume_flag: str | None, save: SaveSettings) -> bool:
    if resume_flag == "auto":
        return True
    resume = Path(resume_flag)
    return resume.resolve().parent == save.output_dir.resolve() and resume.name.startswith(save.output_name + "-") \
        and resume.name.endswith(STATE_SUFFIX)


def _taken_message(taken: list[Path], resuming: bool) -> str:
    more = f" (and {len(taken) - 1} more: {', '.join(p.name for p in taken[1:4])}{', ...' if len(taken) > 4 else ''})" \
        if len(taken) > 1 else ""
    fix = "choose another --output_dir or --output_name"
    if not resuming:
        fix += ", resume that run with --resume <its -state folder>"
    return f"{taken[0]} already exists{more} and this run would replace it; {fix}, or add {OVERWRITE_FLAG} to replace it"


# --------------------------------------------------------------------------------------------------
# disk space


def count_model_saves(save: SaveSettings, max_train_steps: int, num_epochs: int) -> int:
    """Model saves present at the end: step and epoch saves (after --save_last_n_* pruning) and the final one."""
    steps = len(range(save.every_n_steps, max_train_steps, save.every_n_steps)) if save.every_n_steps else 0
    if steps and save.last_n_steps:
        steps = min(steps, save.last_n_steps // save.every_n_steps + 1)
    epochs = len(range(save.every_n_epochs, num_epochs, save.every_n_epochs)) if save.every_n_epochs else 0
    if epochs and save.last_n_epochs:
        epochs = min(epochs, save.last_n_epochs)
    return steps + epochs + 1


def estimate_output_bytes(save: SaveSettings, max_train_steps: int, num_epochs: int, saved_params: int,
                          bytes_per_saved_param: int, state_bytes: int) -> int:
    """Parameters x save dtype size x saves, plus one state per save with --save_state (once with
    --save_state_on_train_end)."""
    saves = count_model_saves(save, max_train_steps, num_epochs)
    states = saves if save.save_state else (1 if save.save_state_on_train_end else 0)
    return saves * saved_params * bytes_per_saved_param + states * state_bytes


def warn_if_disk_short(accelerator: Any, save: SaveSettings, max_train_steps: int, num_epochs: int,
                       trainee: Any, save_dtype: torch.dtype | None) -> None:
    """Warn (no error: the estimate is rough, files may be pruned or moved) when the outputs will not fit."""
    modules = list(trainee.trainable_modules().values())
    trained = [p for m in modules for p in m.parameters() if p.requires_grad]
    counter = getattr(trainee, "saved_parameter_count", None)
    saved_params = counter() if counter else sum(p.numel() for p in trained)
    element = torch.empty((), dtype=save_dtype or (trained[0].dtype if trained else torch.float32)).element_size()
    # a state folder holds the trained parameters (frozen ones are not saved) and the optimizer's moments
    state_bytes = sum(p.numel() * (p.element_size() + OPTIMIZER_STATE_BYTES_PER_TRAINED_PARAM) for p in trained)
    needed = estimate_output_bytes(save, max_train_steps, num_epochs, saved_params, element, state_bytes)
    free = free_bytes(save.output_dir)
    if free is not None and free < needed:
        accelerator.print(f"warning: {_megabytes(free)} free on the disk of --output_dir {save.output_dir}, but this "
                          f"run's saves need about {_megabytes(needed)}; a save may fail with a full disk")


def free_bytes(output_dir: Path) -> int | None:
    existing = output_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------------------
# a save that fails anyway


def save_failures() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError (disk full, permissions, existing paths) and safetensors' own error."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


def raise_save_failure(accelerator: Any, path: Path, error: BaseException | None, save: SaveSettings) -> None:
    """Every rank learns whether the main process's save failed, so none waits for it forever; all raise."""
    failed = error is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    if not failed:
        return
    if error is None:
        raise OutputError(f"the main process could not save {path}; see its error")
    raise save_failure(path, error, save) from error


def save_failure(path: Path, error: BaseException, save: SaveSettings) -> OutputError:
    """One line: what could not be written, why, that earlier saves are intact, and what to do."""
    remove_temp_siblings(path)
    code = getattr(error, "errno", None)
    reason = os.strerror(code) if code else str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, FileExistsError):
        fix = f"add {OVERWRITE_FLAG} to replace it, or choose another --output_dir or --output_name"
    elif isinstance(error, PermissionError) or code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {path.parent} writable or choose another --output_dir"
    else:
        fix = f"free space on the disk of {path.parent} (or choose another --output_dir)"
    last_state = latest_state_folder(save.output_dir, save.output_name)
    resume = f", then continue with --resume {last_state}" if last_state else ""
    return OutputError(f"could not save {path}: {reason}; earlier saves are intact; {fix}{resume}")


def remove_temp_siblings(path: Path) -> None:
    """A failed save leaves no temp files: `<name>.tmp-saving` folders and `.<name>.<pid>.tmp` files."""
    for temp in save_temp_paths(path):
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink(missing_ok=True)
