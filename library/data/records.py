"""Dataset configs -> checked image records: every image, its caption text, size and bucket.

Stages, each a plain function on plain data:

1. :func:`collect_records` reads the subsets (fine-tuning metadata JSON/JSONL, DreamBooth folders with
   caption sidecars, ControlNet image/conditioning pairs) into :class:`ImageRecord` s and balances the
   regularisation images. It never raises for bad data: every problem becomes a :class:`Problem`.
2. :func:`check_records` decodes every image file completely (``library.images.verify_image``); files that
   passed before are remembered in the user's cache (``images.VerifiedImages``), so a restart is fast.
3. :func:`assign_buckets` gives every record its bucket (a too-small image under bucket_no_upscale is a
   problem naming the file).

Besides problems (which stop training), the index carries ``notices``: things that train but are probably
not what the user meant (files in an image folder that are not images we read, images upscaled more than
4x to reach their bucket, captions longer than the prompt length), shown in the start-up summary.
4. :func:`build_dataset_index` runs 1-3 and keeps all problems; :func:`load_dataset_index` raises them
   together as one :class:`DatasetProblems`, so a user fixes the whole dataset in one go instead of one
   file per run. ``tools/check_dataset.py`` calls the same :func:`build_dataset_index`.

Where this differs from kohya-ss/sd-scripts (reference §2.2-2.4):

* Fine-tuning metadata keys that are stems (``merge_*_to_metadata.py`` output) are found with any image
  extension in any letter case; two keys for one image, or a key listed twice in the JSON, are errors
  (``json.load`` would silently keep the last one).
* Caption sidecars are read as UTF-8 with an optional BOM; an empty sidecar or an image with neither a
  caption nor class tokens is an error (kohya trains on an empty caption with a warning).
* ControlNet conditioning images get the identical resize/crop/flip as the target (kohya stretches them,
  misaligning them by the bucket's aspect error), so ``random_crop`` is allowed for ControlNet.
* Without ``enable_bucket`` the one bucket is the resolution, and images are resized to cover it and
  cropped; kohya asserts on images of another size unless random_crop/face-crop is on.
* Not implemented: ``cache_info`` (the config schema rejects it), face-crop file names and
  ``face_crop_aug_range``, validation splits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal


from library.data.buckets import BucketAssignment, BucketSet, Size, cover_resize, make_bucket_set
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.captions import build_prompt
from library.data.images import (
    IMAGE_EXTENSIONS,
    VerifiedImages,
    default_verified_cache_dir,
    is_image_file,
    read_image_size,
    verify_image_cached,
)

logger = logging.getLogger(__name__)

CaptionSource = Literal["metadata", "caption_file", "class_tokens", "none"]
# Files that live beside images and are not meant to be trained on: not reported as skipped.
COMPANION_EXTENSIONS = frozenset({".txt", ".caption", ".json", ".jsonl", ".npz", ".npy", ".toml"})
UPSCALE_WARNING_FACTOR = 4.0
NAMES_IN_NOTICE = 5


# --------------------------------------------------------------------------------------------------
# Records and problems
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Collecting records
# --------------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    """Per-call scratch state: the problems found so far and cached directory listings."""

    problems: list[Problem] = field(default_factory=list)
    listings: dict[Path, tuple[str, ...]] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)  # files in image folders that are not read as images

    def add(self, location: Path | str, what: str, fix: str) -> None:
        self.problems.append(Problem(str(location), what, fix))

    def listing(self, directory: Path) -> tuple[str, ...]:
        """Sorted file names in ``directory`` (empty if it is not a directory)."""
        if directory not in self.listings:
            try:
                names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
            except OSError:
                names = []
            self.listings[directory] = tuple(names)
        return self.listings[directory]

    def images_in(self, directory: Path) -> list[Path]:
        """Image files directly in ``directory`` (not recursive, hidden files skipped), sorted by name."""
        return [directory / name for name in self.listing(directory)
                if is_image_file(Path(name)) and not name.startswith(".")]  # skip macOS "._x.png" etc.

    def note_skipped_files(self, directory: Path, caption_extension: str) -> None:
        """Remember the files of an image folder that are neither images we read nor caption/cache files
        (a GIF, a TIFF, a video), so the summary can say they are not trained on."""
        companions = COMPANION_EXTENSIONS | {caption_extension.lower()}
        for name in self.listing(directory):
            suffix = Path(name).suffix.lower()
            if not name.startswith(".") and suffix not in IMAGE_EXTENSIONS and suffix not in companions:
                self.skipped.append(directory / name)

    def image_size(self, path: Path) -> Size | None:
        """Header size, or None with a problem when the file is not a readable image."""
        try:
            return read_image_size(path)
        except Exception as error:
            self.add(path, f"cannot read the image header ({type(error).__name__}: {error})",
                     "re-export the image, or delete it")
            return None


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def collect_records(datasets: Sequence[DatasetConfig]) -> DatasetIndex:
    """Read every subset of every dataset into records; balance regularisation images per dataset.

    Problems (missing files, bad captions, bad metadata, ControlNet pairing) are collected, not raised.
    """
    scan = _Scan()
    records: list[ImageRecord] = []
    unused: list[Path] = []
    for dataset_index, dataset in enumerate(datasets):
        dataset_records: list[ImageRecord] = []
        for subset in dataset.subsets:
            dataset_records += _collect_subset(dataset, subset, dataset_index, scan)
        balanced, left_out = balance_regularisation(dataset_records)
        if left_out:
            logger.warning("dataset %d: %d regularisation image(s) are not used (more than the training "
                           "samples need)", dataset_index, len(left_out))
        records += balanced
        unused += left_out
    notice = _listed_notice(
        [str(path) for path in dict.fromkeys(scan.skipped)],
        f"file(s) in the image folders are not used (only {', '.join(IMAGE_EXTENSIONS)} are read)",
        "convert them to PNG to train on them, or move them out of the folder")
    return DatasetIndex(
        datasets=tuple(datasets),
        records=tuple(records),
        problems=tuple(scan.problems),
        unused_reg_images=tuple(unused),
        notices=(notice,) if notice else (),
    )


def _listed_notice(items: Sequence[str], what: str, fix: str) -> str | None:
    """One line: the count, the first few items and the fix; None for no items."""
    if not items:
        return None
    shown = ", ".join(items[:NAMES_IN_NOTICE]) + (", ..." if len(items) > NAMES_IN_NOTICE else "")
    return f"{len(items)} {what}: {shown}; {fix}"


def _collect_subset(dataset: DatasetConfig, subset: SubsetConfig, dataset_index: int, scan: _Scan) -> list[ImageRecord]:
    if dataset.kind == "finetuning":
        return _collect_finetuning(subset, dataset_index, scan)
    if dataset.kind == "controlnet":
        return _collect_controlnet(subset, dataset_index, scan)
    return _collect_dreambooth(subset, dataset_index, scan)


def balance_regularisation(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[Path]]:
    """kohya's balancing within one dataset: reg samples are made to match the training samples.

    Reg images are taken in order with their own num_repeats until their sample count reaches the
    training sample count (repeats included); if all are taken and it is still short, their repeats are
    raised by one, round-robin from the first, until it is reached. Reg images not taken are returned as
    unused. Like kohya, a reg image with num_repeats > 1 can overshoot by less than its repeats.
    Returns (records in their original order with the reg repeats changed, unused reg image paths).
    """
    target = sum(record.num_repeats for record in records if not record.is_reg)
    reg_positions = [i for i, record in enumerate(records) if record.is_reg]
    repeats: list[int] = []
    count = 0
    for position in reg_positions:
        if count >= target:
            break
        repeats.append(records[position].num_repeats)
        count += records[position].num_repeats
    turn = 0
    while repeats and count < target:
        repeats[turn % len(repeats)] += 1
        count += 1
        turn += 1
    new_repeats = dict(zip(reg_positions, repeats))
    unused = [records[p].image_path for p in reg_positions[len(repeats):]]
    kept = [
        replace(record, num_repeats=new_repeats[i]) if i in new_repeats else record
        for i, record in enumerate(records)
        if not record.is_reg or i in new_repeats
    ]
    return kept, unused


# ---- DreamBooth ----


def _read_caption_file(image_path: Path, subset: SubsetConfig, scan: _Scan) -> tuple[str | None, CaptionSource]:
    """The sidecar caption: first non-empty line, or all of them ("\\n"-joined) with wildcards.

    Without a sidecar the subset's class_tokens are the caption; without either it is a problem.
    """
    sidecar = image_path.with_name(image_path.stem + subset.caption_extension)
    if not sidecar.is_file():
        if subset.class_tokens and subset.class_tokens.strip():
            return subset.class_tokens.strip(), "class_tokens"
        scan.add(image_path, f"no caption file {sidecar.name} and the subset has no class_tokens",
                 f"write {sidecar.name}, or set class_tokens for the subset ({subset.source})")
        return None, "none"
    try:
        text = sidecar.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        scan.add(sidecar, f"caption file is not UTF-8 (byte 0x{error.object[error.start]:02x} at offset "
                 f"{error.start})", "re-save the caption file with UTF-8 encoding")
        return None, "none"
    except OSError as error:
        scan.add(sidecar, f"cannot read the caption file ({error})", "check the file's permissions")
        return None, "none"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        scan.add(sidecar, "caption file is empty",
                 "write a caption into it, or delete it to train on the subset's class_tokens")
        return None, "none"
    caption = "\n".join(lines) if subset.captions.enable_wildcard else lines[0]
    return caption, "caption_file"


def _collect_dreambooth(subset: SubsetConfig, dataset_index: int, scan: _Scan) -> list[ImageRecord]:
    """Images directly in image_dir, captions from sidecars (or class_tokens)."""
    if subset.image_dir is None or not Path(subset.image_dir).is_dir():
        scan.add(subset.image_dir or subset.source, "image_dir is missing or not a folder",
                 f"set image_dir of {subset.source} to an existing folder of images")
        return []
    image_dir = _absolute(Path(subset.image_dir))
    paths = scan.images_in(image_dir)
    scan.note_skipped_files(image_dir, subset.caption_extension)
    if not paths:
        scan.add(image_dir, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder",
                 "add images, or remove the subset from the dataset config")
    records = []
    for path in paths:
        caption, source = _read_caption_file(path, subset, scan)
        size = scan.image_size(path)
        if size is None:
            continue
        records.append(ImageRecord(
            image_path=path, caption=caption, tags=None, image_size=size, num_repeats=subset.num_repeats,
            is_reg=subset.is_reg, subset=subset, dataset_index=dataset_index, caption_source=source,
        ))
    return records


# ---- ControlNet ----


def _collect_controlnet(subset: SubsetConfig, dataset_index: int, scan: _Scan) -> list[ImageRecord]:
    """DreamBooth records, each paired with the conditioning image of the same stem.

    Missing, ambiguous and extra conditioning images and size mismatches are all problems.
    """
    records = _collect_dreambooth(subset, dataset_index, scan)
    cond_dir = subset.conditioning_data_dir
    if cond_dir is None or not Path(cond_dir).is_dir():
        scan.add(cond_dir or subset.source, "conditioning_data_dir is missing or not a folder",
                 f"set conditioning_data_dir of {subset.source} to the folder of conditioning images")
        return records
    cond_dir = _absolute(Path(cond_dir))
    by_stem: dict[str, list[Path]] = {}
    for path in scan.images_in(cond_dir):
        by_stem.setdefault(path.stem, []).append(path)

    paired = []
    for record in records:
        candidates = by_stem.get(record.image_path.stem, [])
        if not candidates:
            scan.add(record.image_path, f"no conditioning image named {record.image_path.stem}.* in {cond_dir}",
                     "add the conditioning image (same file name, any image extension), or remove this image")
        elif len(candidates) > 1:
            scan.add(record.image_path, "several conditioning images match: "
                     + ", ".join(p.name for p in candidates), "keep exactly one of them")
        else:
            cond_size = scan.image_size(candidates[0])
            if cond_size is not None and cond_size != record.image_size:
                scan.add(candidates[0], f"conditioning image is {cond_size[0]}x{cond_size[1]} but its target "
                         f"{record.image_path.name} is {record.image_size[0]}x{record.image_size[1]}",
                         "resize the conditioning image to the target image's size")
            record = replace(record, conditioning_path=candidates[0])
        paired.append(record)

    image_stems = {path.stem for path in scan.images_in(_absolute(Path(subset.image_dir)))}  # type: ignore[arg-type]
    for stem, paths in by_stem.items():
        if stem not in image_stems:
            for path in paths:
                scan.add(path, f"conditioning image has no target image {stem}.* in {subset.image_dir}",
                         "add the target image, or delete the extra conditioning image")
    return paired


# ---- Fine-tuning metadata ----


class _PairsDict(dict):
    """A JSON object that remembers which keys it saw more than once (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _PairsDict:
    result = _PairsDict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        result.duplicates = tuple(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k)))
    return result


def _read_metadata(path: Path, scan: _Scan) -> list[tuple[str, Mapping[str, Any]]]:
    """(image key, entry) pairs from a metadata .json (dict by key) or .jsonl (``image_path`` per line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        scan.add(path, f"cannot read the metadata file ({error})", "check metadata_file's path and encoding")
        return []
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text, scan)
    if _is_controlnet_prompt_file(text):
        return _read_controlnet_prompts(path, text, scan)
    try:
        data = json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as error:
        scan.add(path, f"invalid JSON ({error})", "fix the JSON syntax at that line")
        return []
    if not isinstance(data, dict):
        scan.add(path, "metadata must be a JSON object keyed by image", "regenerate it with the metadata tools")
        return []
    for key in getattr(data, "duplicates", ()):
        scan.add(path, f"key {key!r} appears more than once; JSON keeps only the last entry",
                 "merge the entries into one")
    entries = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            scan.add(path, f"entry {key!r} is not an object", 'make it {"caption": ..., "tags": ...}')
            continue
        entries.append((key, entry))
    return entries


CONDITIONING_KEY = "_conditioning"  # entry field carrying a prompt.json "source" path into the record


def _is_controlnet_prompt_file(text: str) -> bool:
    """The original ControlNet training format: one {"source", "target", "prompt"} object per line."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        entry = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(entry, dict) and "source" in entry and "target" in entry


def _read_controlnet_prompts(path: Path, text: str, scan: _Scan) -> list[tuple[str, Mapping[str, Any]]]:
    """(target path, {"caption": prompt, CONDITIONING_KEY: source path}) per line; paths relative to the file."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            scan.add(path, f"line {number}: invalid JSON ({error})", "fix or remove that line")
            continue
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("source", "target")):
            scan.add(path, f"line {number}: needs string fields source and target", 'write {"source": ..., '
                     '"target": ..., "prompt": ...}')
            continue
        entries.append((entry["target"], {"caption": entry.get("prompt"), CONDITIONING_KEY: entry["source"]}))
    return entries


def _read_jsonl(path: Path, text: str, scan: _Scan) -> list[tuple[str, Mapping[str, Any]]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line, object_pairs_hook=_pairs_hook)
        except json.JSONDecodeError as error:
            scan.add(path, f"line {number}: invalid JSON ({error})", "fix or remove that line")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str):
            scan.add(path, f"line {number}: not an object with a string image_path", "add image_path to the line")
            continue
        entries.append((entry["image_path"], entry))
    return entries


def _resolve_image_key(key: str, base_dir: Path, scan: _Scan) -> list[Path]:
    """Images a metadata key can mean: the exact file, or ``key`` + any image extension (any case).

    The key is an absolute path, a path relative to ``base_dir``, or a stem (kohya's merge tools write
    stems); the extension comparison ignores case so "img" finds "img.PNG".
    """
    candidate = Path(key)
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    candidate = _absolute(candidate)
    if candidate.is_file() and is_image_file(candidate):
        return [candidate]
    name = candidate.name
    matches = []
    for other in scan.listing(candidate.parent):
        rest = other[len(name):]
        if other.lower() == name.lower() and is_image_file(Path(other)):
            matches.append(candidate.parent / other)
        elif other.startswith(name) and rest.lower() in IMAGE_EXTENSIONS:
            matches.append(candidate.parent / other)
    return matches


def _parse_size(value: Any) -> Size | None:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def _text_field(entry: Mapping[str, Any], name: str, where: Path, key: str, scan: _Scan) -> str | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        scan.add(where, f"entry {key!r}: {name} must be a string, got {type(value).__name__}",
                 f"write {name} as a string")
        return None
    return value.strip() or None


def _collect_finetuning(subset: SubsetConfig, dataset_index: int, scan: _Scan) -> list[ImageRecord]:
    """Records from a metadata file; image keys are resolved against image_dir (else the file's folder)."""
    if subset.metadata_file is None:
        scan.add(subset.source, "fine-tuning subset without metadata_file", "set metadata_file for the subset")
        return []
    meta = _absolute(Path(subset.metadata_file))
    base_dir = _absolute(Path(subset.image_dir)) if subset.image_dir is not None else meta.parent
    records = []
    seen: dict[Path, str] = {}
    for key, entry in _read_metadata(meta, scan):
        for name in getattr(entry, "duplicates", ()):
            scan.add(meta, f"entry {key!r} has the field {name!r} more than once", "keep one of them")
        record = _finetuning_record(key, entry, meta, base_dir, subset, dataset_index, scan)
        if record is None:
            continue
        if record.image_path in seen:
            scan.add(meta, f"keys {seen[record.image_path]!r} and {key!r} both refer to {record.image_path}",
                     "keep one entry per image")
            continue
        seen[record.image_path] = key
        records.append(record)
    return records


def _finetuning_record(key: str, entry: Mapping[str, Any], meta: Path, base_dir: Path, subset: SubsetConfig,
                       dataset_index: int, scan: _Scan) -> ImageRecord | None:
    matches = _resolve_image_key(key, base_dir, scan)
    if not matches:
        scan.add(meta, f"key {key!r}: image not found (looked for {base_dir / key} with extensions "
                 f"{', '.join(IMAGE_EXTENSIONS)})", "fix the key or image_dir, or remove the entry")
        return None
    if len(matches) > 1:
        scan.add(meta, f"key {key!r} matches several images: {', '.join(p.name for p in matches)}",
                 "use the file name with its extension as the key")
        return None
    path = matches[0]
    caption = _text_field(entry, "caption", meta, key, scan)
    tags = _text_field(entry, "tags", meta, key, scan)
    source: CaptionSource = "metadata" if caption or tags else "none"
    if source == "none":
        if subset.class_tokens and subset.class_tokens.strip():
            caption, source = subset.class_tokens.strip(), "class_tokens"
        else:
            scan.add(meta, f"key {key!r}: no caption and no tags", "add a caption or tags to the entry")
    size = _parse_size(entry.get("image_size"))
    if entry.get("image_size") is not None and size is None:
        scan.add(meta, f"key {key!r}: image_size must be [width, height], got {entry.get('image_size')!r}",
                 "fix or remove image_size")
    train_resolution = _parse_size(entry.get("train_resolution"))
    from_metadata = size is not None
    if size is None:
        size = scan.image_size(path)
        if size is None:
            return None
    conditioning = None
    if entry.get(CONDITIONING_KEY) is not None:
        conditioning = _absolute(meta.parent / entry[CONDITIONING_KEY])
        if not conditioning.is_file():
            scan.add(meta, f"{key!r}: conditioning image {conditioning} does not exist", "fix the source path")
            return None
        conditioning_size = scan.image_size(conditioning)
        if conditioning_size is not None and conditioning_size != size:
            scan.add(meta, f"{key!r}: conditioning image {conditioning.name} is {conditioning_size[0]}x{conditioning_size[1]} "
                     f"but the target is {size[0]}x{size[1]}", "make both images the same size")
            return None
    return ImageRecord(
        image_path=path, caption=caption, tags=tags, image_size=size, num_repeats=subset.num_repeats,
        is_reg=subset.is_reg, subset=subset, dataset_index=dataset_index, caption_source=source,
        conditioning_path=conditioning, train_resolution=train_resolution, size_from_metadata=from_metadata,
    )


# --------------------------------------------------------------------------------------------------
# Checking files and assigning buckets
# --------------------------------------------------------------------------------------------------


def _check_record(record: ImageRecord, verified: VerifiedImages) -> list[Problem]:
    problems = []
    try:
        size = verify_image_cached(record.image_path, verified)
    except (ValueError, OSError) as error:
        return [Problem(str(record.image_path), f"corrupt or truncated image ({error})",
                        "re-export the image from its source, or delete it")]
    if record.size_from_metadata and size != record.image_size:
        problems.append(Problem(
            str(record.image_path),
            f"metadata image_size {record.image_size[0]}x{record.image_size[1]} differs from the file's "
            f"{size[0]}x{size[1]}", f"correct or remove image_size in {record.subset.metadata_file}"))
    if record.conditioning_path is not None:
        try:
            verify_image_cached(record.conditioning_path, verified)
        except (ValueError, OSError) as error:
            problems.append(Problem(str(record.conditioning_path), f"corrupt or truncated conditioning image "
                                    f"({error})", "re-export the conditioning image"))
    return problems


def check_records(records: Sequence[ImageRecord], workers: int | None = None,
                  verified_cache_dir: Path | None = None) -> list[Problem]:
    """Decode every image (and conditioning image) completely; compare metadata image_size with the file.

    Runs in a thread pool (PIL releases the GIL while decoding); problems come back in record order.
    ``verified_cache_dir``: where images that decoded are remembered (by size and mtime) and skipped next
    time; None decodes everything and remembers nothing.
    """
    verified = VerifiedImages(verified_cache_dir)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda record: _check_record(record, verified), records))
    verified.save()
    return [problem for problems in found for problem in problems]


def fixed_bucket(image_size: Size, resolution: Size) -> BucketAssignment:
    """Without enable_bucket: the one bucket is the resolution; resize to cover it, then crop."""
    resized, scale = cover_resize(image_size, resolution)
    return BucketAssignment(image_size=image_size, bucket=resolution, resized_size=resized, scale=scale)


def make_dataset_bucket_set(dataset: DatasetConfig, min_step: int) -> BucketSet | None:
    """The dataset's BucketSet, or None without enable_bucket (one fixed bucket = the resolution)."""
    if not dataset.enable_bucket:
        return None
    if dataset.bucket_no_upscale:  # min/max are ignored there; passing them would only warn
        return make_bucket_set(dataset.resolution, None, None, dataset.bucket_reso_steps,
                               min_step=min_step, no_upscale=True)
    return make_bucket_set(dataset.resolution, dataset.min_bucket_reso, dataset.max_bucket_reso,
                           dataset.bucket_reso_steps, min_step=min_step)


def assign_buckets(index: DatasetIndex, min_step: int = 64) -> DatasetIndex:
    """Give every record its bucket. ``min_step``: the model's granularity (64 SD1/SD2, 32 SDXL).

    An image no bucket can take (smaller than a step under bucket_no_upscale) is dropped with a problem
    naming the file; a bad bucket setup is a problem naming the dataset.
    """
    problems = list(index.problems)
    bucket_sets: list[BucketSet | None] = []
    broken: set[int] = set()
    for position, dataset in enumerate(index.datasets):
        try:
            bucket_sets.append(make_dataset_bucket_set(dataset, min_step))
        except ValueError as error:
            problems.append(Problem(dataset.source, f"bucket settings: {error}", "fix the bucket options"))
            bucket_sets.append(None)
            broken.add(position)
    records, dropped, upscaled = [], [], []
    for record in index.records:
        if record.dataset_index in broken:
            dropped.append(record)
            continue
        bucket_set = bucket_sets[record.dataset_index]
        dataset = index.datasets[record.dataset_index]
        try:
            if bucket_set is None:
                assignment = fixed_bucket(record.image_size, dataset.resolution)
            else:
                assignment = bucket_set.select(record.image_size)
        except ValueError as error:
            problems.append(Problem(str(record.image_path), str(error),
                                    "use a larger image, or turn off bucket_no_upscale for this dataset"))
            dropped.append(record)
            continue
        records.append(replace(record, bucket=assignment))
        if assignment.scale > UPSCALE_WARNING_FACTOR:
            upscaled.append(f"{record.image_path} ({assignment.scale:.1f}x)")
    notice = _listed_notice(upscaled, f"image(s) are upscaled more than {UPSCALE_WARNING_FACTOR:g}x to reach their "
                            "bucket and will train blurry", "use larger images, or a lower resolution / "
                            "min_bucket_reso")
    return replace(index, records=tuple(records), problems=tuple(problems), dropped=tuple(dropped),
                   bucket_sets=tuple(bucket_sets), notices=index.notices + ((notice,) if notice else ()))


def long_caption_notice(records: Sequence[ImageRecord], max_token_length: int) -> str | None:
    """One warning counting the prompts longer than ``max_token_length`` CLIP tokens (they are cut).

    Counted with the real CLIP tokenizer (SD1, SD2 and SDXL share its vocabulary; no model is needed) on the
    prompt each record trains on, dropout and warm-up off. None when all fit or the tokenizer is missing.
    """
    try:
        from library.models.clip_tokenizer import build_clip_tokenizer

        tokenizer = build_clip_tokenizer(model_max_length=1 << 30)  # no "longer than 77" warning of its own
    except Exception as error:  # open-clip-torch missing: the check is a courtesy, not a requirement
        logger.debug("caption length check skipped: %s", error)
        return None
    prompts = {_full_prompt(record): record.image_path for record in records}
    # Every CLIP token holds at least one non-space character: shorter prompts cannot be too long.
    texts = [text for text in prompts if len("".join(text.split())) > max_token_length]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    long = [(length, text) for length, text in zip(lengths, texts) if length > max_token_length]
    if not long:
        return None
    longest, text = max(long)
    return (f"{len(long)} caption(s) are longer than {max_token_length} tokens and will be cut (longest: {longest} "
            f"tokens, {prompts[text]}); shorten them, or raise --max_token_length (75, 150 or 225)")


def _full_prompt(record: ImageRecord) -> str:
    """The longest form of the record's prompt: both caption and tags, nothing dropped, no warm-up cut."""
    options = replace(record.subset.captions, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                      caption_tag_dropout_rate=0.0, token_warmup_step=0,
                      caption_tag_mode="concat" if record.subset.captions.caption_tag_mode == "random"
                      else record.subset.captions.caption_tag_mode)
    return build_prompt(record.caption, record.tags, options, random.Random(0), 1, 0, 0)


def build_dataset_index(datasets: Sequence[DatasetConfig], min_step: int = 64, verify_images: bool = True, *,
                        max_token_length: int | None = None,
                        verified_cache_dir: Path | None | Literal["default"] = "default") -> DatasetIndex:
    """collect -> check -> buckets, keeping every problem in ``index.problems`` (never raises for data).

    ``verify_images=False`` skips decoding every file (for very large, already-checked datasets); the
    metadata image_size is then trusted for bucketing. ``max_token_length``: also count the captions
    longer than that (a notice). ``verified_cache_dir``: see :func:`check_records`; "default" is the user's
    cache (``images.default_verified_cache_dir``).
    """
    index = collect_records(datasets)
    if verify_images:
        cache_dir = default_verified_cache_dir() if verified_cache_dir == "default" else verified_cache_dir
        problems = check_records(index.records, verified_cache_dir=cache_dir)  # type: ignore[arg-type]
        index = replace(index, problems=index.problems + tuple(problems))
    index = assign_buckets(index, min_step)
    if max_token_length is not None:
        notice = long_caption_notice(index.records, max_token_length)
        index = replace(index, notices=index.notices + ((notice,) if notice else ()))
    return index


def load_dataset_index(datasets: Sequence[DatasetConfig], min_step: int = 64,
                       verify_images: bool = True, *, max_token_length: int | None = None) -> DatasetIndex:
    """:func:`build_dataset_index`, raising :class:`DatasetProblems` (all of them at once) if any."""
    index = build_dataset_index(datasets, min_step, verify_images, max_token_length=max_token_length)
    index.raise_for_problems()
    if not index.records:
        raise DatasetProblems([Problem("dataset config", "no training images", "add images to a subset")])
    return index


def split_for_validation(index: DatasetIndex) -> tuple[DatasetIndex, DatasetIndex | None]:
    """(train, validation) by each dataset's ``validation_split`` and ``validation_seed`` (kohya's rule).

    Per dataset, the non-regularisation images are shuffled with ``validation_seed`` (0 when unset); the
    first ceil(n * (1 - split)) train and the rest validate. Regularisation images always train.
    Validation samples count once (no repeats). None when no dataset asks for a split.
    """
    if not any(d.validation_split > 0 for d in index.datasets):
        return index, None
    train: list[ImageRecord] = []
    validation: list[ImageRecord] = []
    for position, dataset in enumerate(index.datasets):
        records = [r for r in index.records if r.dataset_index == position]
        regular = [r for r in records if not r.is_reg]
        train += [r for r in records if r.is_reg]
        if dataset.validation_split <= 0:
            train += regular
            continue
        order = list(regular)
        random.Random(dataset.validation_seed or 0).shuffle(order)
        cut = math.ceil(len(order) * (1 - dataset.validation_split))
        train += order[:cut]
        validation += [replace(r, num_repeats=1) for r in order[cut:]]
    return replace(index, records=tuple(train)), replace(index, records=tuple(validation))
