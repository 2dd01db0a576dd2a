"""When to save, what the files are called, and training state that resumes exactly.

Names follow kohya so existing habits and scripts keep working:
``{output_name}-{epoch:06d}`` for epoch saves, ``{output_name}-step{step:08d}`` for step saves and
``{output_name}`` for the final save; training state goes into a folder of the same name plus ``-state``.

Unlike kohya, ``--save_state`` state holds the whole position of the run (optimizer step, epoch, batches
consumed in the epoch, the seed), and ``--resume`` continues from exactly there: the batch sampler skips
the consumed batches and every random draw is seeded from (seed, step), so an interrupted and resumed run
ends with the same weights as an uninterrupted one. Writing and reading state folders (safetensors and JSON,
never pickle, atomically swapped in) is ``library.training.train_state_io``.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TRAIN_STATE_FILE = "train_state.json"
# --save_model_as values written as one file, and their extensions; the other formats are folders.
SINGLE_FILE_FORMATS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}
STATE_SUFFIX = "-state"


@dataclass(frozen=True)
class SaveSettings:
    output_dir: Path
    output_name: str
    extension: str  # ".safetensors", ".ckpt", ".pt" or "" for a diffusers folder
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    last_n_steps: int | None = None  # keep only saves from the last N steps (kohya: a step distance, not a count)
    last_n_epochs: int | None = None  # keep only the last N epoch saves
    save_state: bool = False
    save_state_on_train_end: bool = False
    last_n_steps_state: int | None = None
    last_n_epochs_state: int | None = None

    def step_name(self, step: int) -> str:
        return f"{self.output_name}-step{step:08d}"

    def epoch_name(self, epoch: int) -> str:
        return f"{self.output_name}-{epoch:06d}"

    def model_path(self, name: str) -> Path:
        return self.output_dir / f"{name}{self.extension}"

    def state_path(self, name: str) -> Path:
        return self.output_dir / f"{name}{STATE_SUFFIX}"

    def due_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def due_at_epoch(self, epoch: int, num_epochs: int) -> bool:
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0 and epoch < num_epochs


def outdated_step_names(settings: SaveSettings, step: int, keep_last_n_steps: int | None) -> list[str]:
    """Step saves that fell out of the last-N-steps window: kohya keeps saves made within N steps of now
    (one exactly N steps old included) and removes older ones."""
    if not keep_last_n_steps or not settings.every_n_steps:
        return []
    cutoff = step - keep_last_n_steps - 1
    return [settings.step_name(s) for s in range(settings.every_n_steps, max(cutoff, 0) + 1, settings.every_n_steps)]


def outdated_epoch_names(settings: SaveSettings, epoch: int, keep_last_n_epochs: int | None) -> list[str]:
    if not keep_last_n_epochs or not settings.every_n_epochs:
        return []
    cutoff = epoch - keep_last_n_epochs * settings.every_n_epochs
    return [settings.epoch_name(e) for e in range(settings.every_n_epochs, cutoff + 1, settings.every_n_epochs)]


def remove_paths(paths: list[Path]) -> list[Path]:
    removed = []
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
        elif path.exists():
            path.unlink()
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------------
# training state


@dataclass(frozen=True)
class TrainState:
    """Where a run stands after ``global_step`` optimizer steps."""

    global_step: int
    epoch: int  # the epoch in progress (1-based); equals the finished epoch at an epoch boundary
    batches_done_in_epoch: int  # batches this rank consumed in `epoch` (0 at an epoch boundary)
    seed: int
    num_processes: int = 1
    extra: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> "TrainState":
        data = json.loads(text)
        return TrainState(**{k: data[k] for k in ("global_step", "epoch", "batches_done_in_epoch", "seed")},
                          num_processes=data.get("num_processes", 1), extra=data.get("extra"))


class StateError(ValueError):
    """A state folder that cannot be resumed; the message names the file or flag and the fix (one line)."""


def read_training_state(folder: Path) -> TrainState:
    """Our position file in a state folder; a clear error when the folder is not one of ours."""
    folder = Path(folder)
    state_file = folder / TRAIN_STATE_FILE
    if not folder.is_dir():
        raise StateError(f"--resume {folder}: no such state folder (saved with --save_state as <name>{STATE_SUFFIX})")
    if not state_file.is_file():
        raise StateError(
            f"--resume {folder}: {TRAIN_STATE_FILE} is missing, so the step and epoch to resume from are unknown; "
            "was this folder written by --save_state of this trainer?"
        )
    try:
        return TrainState.from_json(state_file.read_text())
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({type(error).__name__}: {error}): "
                         "resume from another state folder") from None


def latest_state_folder(output_dir: Path, output_name: str) -> Path | None:
    """The complete state folder with the most steps among ``{output_name}-step########-state``,
    ``-######-state`` and the final ``{output_name}-state``, for ``--resume auto``. Temp and aside folders of an
    interrupted save and ``-nan-`` states (written when the loss diverged) are not candidates."""
    pattern = re.compile(re.escape(output_name) + r"(-step\d{8}|-\d{6}|)" + re.escape(STATE_SUFFIX) + "$")
    candidates = [p for p in Path(output_dir).glob(f"{glob.escape(output_name)}*{STATE_SUFFIX}")
                  if pattern.match(p.name) and p.is_dir()]
    with_steps = []
    for path in candidates:
        try:
            with_steps.append((read_training_state(path).global_step, path.stat().st_mtime, path))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue
    return max(with_steps)[2] if with_steps else None
