"""The one place files are written atomically and safetensors / .npy headers are read; also the one rule for
which flag names hold credentials that no written file may contain (``is_secret``).

A kill or a full disk during a write never leaves a half-written file (or folder) under the final name, never
touches the previous version, and leaves no temp files behind: every writer fills a temp file beside the target
(a rename is atomic only within one file system) and renames it over the target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

if TYPE_CHECKING:  # torch, safetensors and numpy load on first use, so the torch-free metadata tools stay light
    import numpy as np
    import torch

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
    from safetensors import SafetensorError

    text = str(error).lower()
    return isinstance(error, SafetensorError) or "os error" in text or "writ" in text or "no space" in text


@contextlib.contextmanager
def _write_failures_as_save_error(path: Path) -> Iterator[None]:
    """safetensors' and torch's own exception types for a failed write (torch's zip writer reports a full disk
    as a RuntimeError) become a SaveError naming ``path``; other errors pass unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, RuntimeError) as error:
        if not _is_write_failure(error):
            raise
        raise _save_error(path, error) from error


def _atomic_save(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """``save(tmp)`` writes a checkpoint file that is fsynced and renamed to ``path``; a full disk is a SaveError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with _write_failures_as_save_error(path):
            save(tmp)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text_metadata = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic_save(path, lambda tmp: save_file(contiguous, str(tmp), metadata=text_metadata))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    _atomic_save(path, lambda tmp: torch.save(obj, str(tmp)))


def atomic_write_file(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = False) -> None:
    """``write(handle)`` into a temp file beside ``path`` (binary), then rename it over ``path``: a reader (another
    rank, a DataLoader worker) sees the old or the new file, never half of one. OSErrors propagate as they are.

    The temp name is unique per call, so threads writing different files of one folder never meet. It is created
    with mode 0o666 (the umask applies, as for any new file) and takes an existing file's mode, so an overwrite
    keeps the file's permissions. ``fsync``: flush to disk before the rename (user files such as metadata JSON).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def folder_temp_path(folder: Path) -> Path:
    return folder.with_name(folder.name + FOLDER_TEMP_SUFFIX)


def save_temp_paths(path: Path) -> tuple[Path, Path]:
    """The temp folder and the temp file a save of ``path`` (by this process) fills before its rename."""
    return folder_temp_path(path), _temp_path(path)


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
        with _write_failures_as_save_error(folder):
            write(tmp)
        replace_path(tmp, folder)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


class SafetensorsHeaderError(ValueError):
    """No plausible header: ``header_len`` is None when the file is shorter than the 8-byte length, else the
    length read (over the limit). Callers word the error for their user."""

    def __init__(self, header_len: int | None) -> None:
        super().__init__(f"safetensors header length: {header_len}")
        self.header_len = header_len


def read_safetensors_header(handle: BinaryIO, max_len: int = 100_000_000) -> tuple[int, dict[str, Any]]:
    """(length, parsed JSON) of the header of the safetensors file ``handle`` is at the start of; no tensor data
    is read. A length over ``max_len`` is a SafetensorsHeaderError, bad JSON a json.JSONDecodeError."""
    head = handle.read(8)
    if len(head) != 8:
        raise SafetensorsHeaderError(None)
    (header_len,) = struct.unpack("<Q", head)
    if header_len > max_len:
        raise SafetensorsHeaderError(header_len)
    return header_len, json.loads(handle.read(header_len))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's ``__metadata__`` without reading any tensor data."""
    with open(path, "rb") as handle:
        try:
            _, header = read_safetensors_header(handle)
        except SafetensorsHeaderError as error:
            problem = ("it is shorter than its 8-byte header length" if error.header_len is None
                       else f"header length {error.header_len} is implausible")
            raise ValueError(f"{path} is not a safetensors file: {problem}") from None
    return dict(header.get("__metadata__") or {})


def read_npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy array whose file (or .npz member) ``handle`` is at the start of;
    afterwards ``handle`` is at the first byte of the data."""
    import numpy as np

    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(shape), fortran, dtype


def is_secret(name: str) -> bool:
    """Credentials (wandb_api_key, huggingface_token, ...) never go into anything written out: a saved config,
    the tracker's run settings, the training state.

    A plain "contains token" test would also drop max_token_length and keep_tokens, so only names that
    end in "token" count.
    """
    name = name.lower()
    return (any(word in name for word in ("api_key", "apikey", "password", "secret"))
            or name == "token" or name.endswith("_token"))
