"""Pickles in state folders: recognising them, and checking DeepSpeed's through the weights-only unpickler.

Our own state folders never hold a pickle (train_state_io refuses any); a DeepSpeed engine checkpoint is all
pickles, so before DeepSpeed reads one every pickle in it must load with torch's weights-only unpickler, which
refuses code. Kept apart from train_state_io so that module stays about the folder format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.training.checkpoints import StateError

# Files that torch.load / pickle would read; refused in our folders, weights-only checked in DeepSpeed ones.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz")
_PICKLE_MAGICS = (b"\x80", b"PK\x03\x04")  # a raw pickle (protocol 2+) or torch's zip container


def looks_pickled(path: Path) -> bool:
    """Whether torch.load / pickle would read this file (by name or by its first bytes)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        head = handle.read(4)
    return any(head.startswith(magic) for magic in _PICKLE_MAGICS)


def state_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def check_deepspeed_pickles(folder: Path) -> None:
    """Every pickle of a DeepSpeed state through torch's weights-only unpickler before DeepSpeed reads it."""
    for path in state_files(folder):
        if path.suffix in (".json", ".safetensors") or not looks_pickled(path):
            continue
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure means we cannot vouch for the file
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0] if lines else
                          type(error).__name__)
            raise StateError(f"--resume {folder}: {path.relative_to(folder)} is a pickle that the weights-only "
                             f"unpickler refuses ({reason[:200]}); it could run code: resume from a state you "
                             "saved yourself") from None


def _deepspeed_safe_globals() -> list[Any]:
    """What DeepSpeed's checkpoints hold besides tensors and containers: numpy scalars/arrays and its enums."""
    numpy_core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("float32")),
                          type(np.dtype("int64"))]
    try:  # plain-data classes: the unpickler only sets their attributes, it calls no code of theirs
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    return allowed
