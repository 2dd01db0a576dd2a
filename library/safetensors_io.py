"""Atomic checkpoint writes: a kill during a save never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows for files on one filesystem


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        torch.save(obj, str(tmp))
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's ``__metadata__`` without reading any tensor data."""
    with open(path, "rb") as handle:
        header_len_bytes = handle.read(8)
        if len(header_len_bytes) != 8:
            raise ValueError(f"{path} is not a safetensors file: it is shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", header_len_bytes)
        if header_len > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file: header length {header_len} is implausible")
        header = json.loads(handle.read(header_len))
    return dict(header.get("__metadata__") or {})
