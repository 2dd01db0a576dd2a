"""Atomic checkpoint writes: a kill or a full disk during a save never leaves a half-written file (or folder)
under the final name, never touches the previous version, and leaves no temp files behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

FOLDER_TEMP_SUFFIX = ".tmp-saving"


class SaveError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the previous version is untouched."""


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # atomic on POSIX and Windows for files on one filesystem


def _save_error(path: Path, error: BaseException) -> SaveError:
    """safetensors and torch.save report a full disk as their own exception types; make it one OSError."""
    code = getattr(error, "errno", None)
    if code is None and ("os error 28" in str(error) or "No space left" in str(error)):
        code = errno.ENOSPC
    reason = os.strerror(code) if code else str(error).splitlines()[0]
    return SaveError(code or errno.EIO, f"could not write {path}: {reason}")


def _is_write_failure(error: BaseException) -> bool:
    """torch's zip writer raises RuntimeError for I/O failures; other RuntimeErrors are bugs, not disk problems."""
    text = str(error).lower()
    return isinstance(error, SafetensorError) or "os error" in text or "writ" in text or "no space" in text


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        try:
            save_file(contiguous, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        except SafetensorError as error:
            raise _save_error(path, error) from error
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        try:
            torch.save(obj, str(tmp))
        except RuntimeError as error:  # torch's zip writer reports a full disk as a RuntimeError
            if not _is_write_failure(error):
                raise
            raise _save_error(path, error) from error
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """``write(handle)`` into a temp file beside ``path`` (binary), then rename it over ``path``: a reader (another
    rank, a DataLoader worker) sees the old or the new file, never half of one. OSErrors propagate as they are."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def folder_temp_path(folder: Path) -> Path:
    return folder.with_name(folder.name + FOLDER_TEMP_SUFFIX)


def replace_path(new: Path, target: Path) -> None:
    """Move ``new`` (a file or folder) to ``target``, replacing what is there.

    A folder cannot be swapped in one rename, so the old one is renamed aside first, the new one renamed in,
    and only then the old one removed: at every moment either the old or the new version is complete.
    """
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    aside = target.with_name(f".{target.name}.{os.getpid()}.old")
    _remove(aside)
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside, target)  # put the old version back
        raise
    _remove(aside)


def atomic_save_folder(folder: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """``write(tmp)`` fills a temp folder that is then renamed to ``folder``; on failure the temp is removed.

    An existing non-empty ``folder`` is a FileExistsError unless ``overwrite`` (then it is replaced atomically).
    """
    folder = Path(folder)
    if folder.exists() and not overwrite and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not an empty folder; choose a new output path")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder_temp_path(folder)
    _remove(tmp)
    try:
        try:
            write(tmp)
        except (SafetensorError, RuntimeError) as error:
            if not _is_write_failure(error):
                raise
            raise _save_error(folder, error) from error
        replace_path(tmp, folder)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


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
