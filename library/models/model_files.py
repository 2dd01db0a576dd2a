"""What a model path is before anything is loaded: the single-file suffixes, and the error for a path or
file that cannot be used (raised by the family detector and every loader alike)."""

from __future__ import annotations

import os
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


class ModelLoadError(Exception):
    """A model path or file that cannot be used; the message names the file and what was expected."""


def is_single_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES
