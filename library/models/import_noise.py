"""Two warnings that third-party packages log while diffusers is being imported, dropped at those imports only.

* bitsandbytes (imported by diffusers' model modules for its quantizer support) warns, on CPUs with AVX512-BF16,
  that its optional CPU 4-bit kernel package ``kernels`` is missing: we never run 4-bit kernels on the CPU.
* transformers, when diffusers' pipeline modules import ``CLIPImageProcessor`` / ``SiglipImageProcessor`` without
  torchvision installed, warns that it falls back to the PIL processor: our pipelines have no image processor.

Nothing is set for the rest of the process (no environment variables, no logger levels): a filter is attached to
the two loggers while the import runs and removed afterwards, so every other warning of either package shows.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

# (logger, a phrase of the one message dropped from it)
_IMPORT_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)


def _not_noise(record: logging.LogRecord) -> bool:
    return not any(record.name == name and phrase in record.getMessage() for name, phrase in _IMPORT_NOISE)


@contextlib.contextmanager
def without_import_noise() -> Iterator[None]:
    """Run an import of diffusers (its model classes, or a pipeline class) without the two warnings above."""
    loggers = [logging.getLogger(name) for name, _ in _IMPORT_NOISE]
    for logger in loggers:
        logger.addFilter(_not_noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_not_noise)
