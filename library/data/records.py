"""What the dataset stages pass along: one :class:`ImageRecord` per training image, the problems found
with the user's files, and the :class:`DatasetIndex` holding both.

Built by ``library.data.record_sources.collect_records`` (reading the subsets) and completed by
``library.data.dataset_index`` (file checks, buckets, the validation split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from library.data.buckets import BucketAssignment, BucketSet, Size
from library.data.dataset_config import DatasetConfig, SubsetConfig

CaptionSource = Literal["metadata", "caption_file", "class_tokens", "none"]
NAMES_IN_NOTICE = 5


@dataclass(frozen=True)
class ImageRecord:
    """One training image and everything known about it before its pixels are read."""

    image_path: Path  # absolute
    caption: str | None  # may hold "\n"-separated alternatives (wildcards / metadata)
    tags: str | None
    image_size: Size  # (width, height) as displayed (after EXIF orientation)
    num_repeats: int
    is_reg: bool  # the trainer weights these samples with prior_loss_weight
    subset: SubsetConfig
    dataset_index: int  # position of its DatasetConfig in the list given to collect_records
    caption_source: CaptionSource = "none"
    conditioning_path: Path | None = None  # ControlNet
    train_resolution: Size | None = None  # kept from metadata; not used for bucketing
    size_from_metadata: bool = False
    bucket: BucketAssignment | None = None  # set by assign_buckets
    metadata_key: str | None = None  # fine-tuning: the entry's key in the metadata file (kohya's image key)


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file (or config entry): where, what, and how to fix it."""

    location: str  # a file path, or a config location such as "cfg.toml [[datasets]] #1"
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.location}: {self.what}\n    fix: {self.fix}"


def format_problems(problems: Sequence[Problem]) -> str:
    """All problems, one block each, under a one-line count."""
    lines = [f"{len(problems)} dataset problem(s) found; fix them all, then start again:"]
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)


class DatasetProblems(ValueError):
    """Every problem found at start-up, raised together so the user can fix the dataset in one pass."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(format_problems(self.problems))


@dataclass(frozen=True)
class DatasetIndex:
    """The records of all datasets, plus what went wrong and what was left out while building them."""

    datasets: tuple[DatasetConfig, ...]
    records: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...] = ()
    unused_reg_images: tuple[Path, ...] = ()
    dropped: tuple[ImageRecord, ...] = ()  # records no bucket could take (each also has a problem)
    bucket_sets: tuple[BucketSet | None, ...] = ()  # per dataset, after assign_buckets; None = fixed bucket
    notices: tuple[str, ...] = ()  # warnings for the start-up summary; they do not stop training

    def raise_for_problems(self) -> None:
        """Raise :class:`DatasetProblems` listing every problem, if there are any."""
        if self.problems:
            raise DatasetProblems(self.problems)



def listed_notice(items: Sequence[str], what: str, fix: str) -> str | None:
    """One line for the start-up summary: the count, the first few items and the fix; None for no items."""
    if not items:
        return None
    shown = ", ".join(items[:NAMES_IN_NOTICE]) + (", ..." if len(items) > NAMES_IN_NOTICE else "")
    return f"{len(items)} {what}: {shown}; {fix}"
