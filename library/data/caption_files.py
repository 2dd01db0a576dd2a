"""Caption and tag files next to images: which images still need one, writing them, and the run's summary.

Shared by the WD14 tagger and the captioners. An existing caption file is never replaced unless the user
asked for it (``--overwrite``, or ``--append_tags`` for the tagger): a hand-corrected caption is worth more
than a model's guess, and kohya's tools silently wrote over them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from library.data.metadata import MetadataError, list_images

OVERWRITE, APPEND, KEEP = "overwrite", "append", "keep"
TOP_TAGS = 10


class LabellingError(ValueError):
    """Bad input for a tagging/captioning tool; the message is one line naming the flag or file and the fix."""


def caption_path(image: Path, extension: str) -> Path:
    """``<image without its extension><extension>``, as every kohya reader looks for it."""
    return image.with_name(image.stem + extension)


def find_images(folder: Path, *, recursive: bool) -> list[Path]:
    """The images to label, sorted; a missing folder is a :class:`LabellingError` naming it."""
    try:
        return list_images(folder, recursive=recursive)
    except MetadataError as error:
        raise LabellingError(f"train_data_dir: {error} Pass the folder holding the images.") from error


def images_to_label(images: Sequence[Path], *, extension: str, mode: str) -> tuple[list[Path], list[Path]]:
    """(images to run, images skipped because their caption file exists and ``mode`` is KEEP)."""
    if mode != KEEP:
        return list(images), []
    todo = [image for image in images if not caption_path(image, extension).exists()]
    kept = [image for image in images if caption_path(image, extension).exists()]
    return todo, kept


def write_caption(path: Path, text: str) -> None:
    """One line, newline-terminated (kohya's format)."""
    path.write_text(text.strip("\n") + "\n", encoding="utf-8")


@dataclass
class LabelSummary:
    """What a run did, for the closing lines and for tests."""

    labelled: int = 0
    kept: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one message per image that could not be read
    counts: Counter = field(default_factory=Counter)
    per_image: list[int] = field(default_factory=list)

    def add(self, items: Iterable[str]) -> None:
        items = list(items)
        self.labelled += 1
        self.per_image.append(len(items))
        self.counts.update(items)

    def lines(self, *, what: str, unit: str, flag_hint: str) -> list[str]:
        """The summary printed at the end: images, ``unit`` per image, most frequent ``unit``."""
        lines = [f"{what} {self.labelled} images"]
        if self.per_image:
            mean = sum(self.per_image) / len(self.per_image)
            lines.append(f"{unit} per image: mean {mean:.1f}, min {min(self.per_image)}, max {max(self.per_image)}")
        if self.counts:
            top = ", ".join(f"{item} ({count})" for item, count in most_frequent(self.counts, TOP_TAGS))
            lines.append(f"most frequent {unit}: {top}")
        if self.kept:
            lines.append(f"kept {len(self.kept)} existing caption files ({flag_hint} to replace them)")
        if self.failed:
            lines.append(f"skipped {len(self.failed)} images that could not be read (see the warnings above)")
        return lines


def most_frequent(counts: Counter, limit: int | None = None) -> list[tuple[str, int]]:
    """Most frequent first; ties in alphabetical order, so the output is the same on every run."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ordered if limit is None else ordered[:limit]
