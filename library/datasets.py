"""Dataset configs -> image records -> the torch Dataset that yields one training sample per index.

One image's path from its file to a batch::

    index = load_dataset_index(dataset_configs, min_step=32)      # records, checked; raises DatasetProblems
    inputs = build_bucket_sampler_inputs(index)                    # bucket key per sample index
    sampler = KeyedBatchSampler(BucketBatchSampler(inputs.bucket_keys, inputs.batch_size, seed))
    dataset = TrainingDataset(index, seed, max_train_steps)        # + latent_cache= / text_cache= (optional,
                                                                   #   filled by library.dataset_caching)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=n)
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch, first_step=global_step)
        for batch in loader: ...                                   # dict, see collate_samples

Stages, each a plain function on plain data:

1. :func:`collect_records` reads the subsets (fine-tuning metadata JSON/JSONL, DreamBooth folders with
   caption sidecars, ControlNet image/conditioning pairs) into :class:`ImageRecord` s and balances the
   regularisation images. It never raises for bad data: every problem becomes a :class:`Problem`.
2. :func:`check_records` verifies every image file (see ``library.images.verify_image``).
3. :func:`assign_buckets` gives every record its bucket (a too-small image under bucket_no_upscale is a
   problem naming the file).
4. :func:`build_dataset_index` runs 1-3 and keeps all problems; :func:`load_dataset_index` raises them
   together as one :class:`DatasetProblems`, so a user fixes the whole dataset in one go instead of one
   file per run. ``tools/check_dataset.py`` calls the same :func:`build_dataset_index`.

Epoch and step reach DataLoader workers inside the indices: :class:`KeyedBatchSampler` (iterated in the
main process) turns each batch of ints into :class:`SampleKey` (index, epoch, step) items, and every
random choice of a sample (caption shuffle/dropout, crop, flip, colour) comes from a ``random.Random``
seeded with (seed, epoch, index). No shared mutable state, and a batch is identical for any num_workers.
kohya instead pushes epoch/step into workers through ``multiprocessing.Value`` s read by the collator.

Multiple datasets: a batch never mixes datasets (the bucket key starts with the dataset's position), and
all datasets must have the same ``batch_size`` (:func:`build_bucket_sampler_inputs` raises otherwise):
``BucketBatchSampler`` takes one batch size, and per-dataset batch sizes would also make the number of
images per optimizer step vary between steps, which changes the effective learning rate.

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
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from library.buckets import BucketAssignment, BucketSet, Size, cover_resize, make_bucket_set
from library.cache import CachedLatents, TextEncoderOutputCache, load_cached_latents
from library.captions import build_prompt
from library.dataset_caching import LatentCacheLocation, raise_if_not_cacheable
from library.dataset_config import DatasetConfig, SubsetConfig
from library.images import (
    IMAGE_EXTENSIONS,
    CropPlan,
    apply_crop_plan,
    color_jitter,
    is_image_file,
    load_image,
    load_rgb,
    mask_to_tensor,
    plan_crop,
    read_image_size,
    to_tensor,
    verify_image,
)

logger = logging.getLogger(__name__)

CaptionSource = Literal["metadata", "caption_file", "class_tokens", "none"]


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
    return DatasetIndex(
        datasets=tuple(datasets),
        records=tuple(records),
        problems=tuple(scan.problems),
        unused_reg_images=tuple(unused),
    )


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
    return ImageRecord(
        image_path=path, caption=caption, tags=tags, image_size=size, num_repeats=subset.num_repeats,
        is_reg=subset.is_reg, subset=subset, dataset_index=dataset_index, caption_source=source,
        train_resolution=train_resolution, size_from_metadata=from_metadata,
    )


# --------------------------------------------------------------------------------------------------
# Checking files and assigning buckets
# --------------------------------------------------------------------------------------------------


def _check_record(record: ImageRecord) -> list[Problem]:
    problems = []
    try:
        size = verify_image(record.image_path)
    except ValueError as error:
        return [Problem(str(record.image_path), f"corrupt or truncated image ({error})",
                        "re-export the image from its source, or delete it")]
    if record.size_from_metadata and size != record.image_size:
        problems.append(Problem(
            str(record.image_path),
            f"metadata image_size {record.image_size[0]}x{record.image_size[1]} differs from the file's "
            f"{size[0]}x{size[1]}", f"correct or remove image_size in {record.subset.metadata_file}"))
    if record.conditioning_path is not None:
        try:
            verify_image(record.conditioning_path)
        except ValueError as error:
            problems.append(Problem(str(record.conditioning_path), f"corrupt or truncated conditioning image "
                                    f"({error})", "re-export the conditioning image"))
    return problems


def check_records(records: Sequence[ImageRecord], workers: int | None = None) -> list[Problem]:
    """Verify every image (and conditioning image) decodes; compare metadata image_size with the file.

    Runs in a thread pool (PIL releases the GIL while decoding); problems come back in record order.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [problem for found in pool.map(_check_record, records) for problem in found]


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
    records, dropped = [], []
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
    return replace(index, records=tuple(records), problems=tuple(problems), dropped=tuple(dropped),
                   bucket_sets=tuple(bucket_sets))


def build_dataset_index(datasets: Sequence[DatasetConfig], min_step: int = 64,
                        verify_images: bool = True) -> DatasetIndex:
    """collect -> check -> buckets, keeping every problem in ``index.problems`` (never raises for data).

    ``verify_images=False`` skips decoding every file (for very large, already-checked datasets); the
    metadata image_size is then trusted for bucketing.
    """
    index = collect_records(datasets)
    if verify_images:
        index = replace(index, problems=index.problems + tuple(check_records(index.records)))
    return assign_buckets(index, min_step)


def load_dataset_index(datasets: Sequence[DatasetConfig], min_step: int = 64,
                       verify_images: bool = True) -> DatasetIndex:
    """:func:`build_dataset_index`, raising :class:`DatasetProblems` (all of them at once) if any."""
    index = build_dataset_index(datasets, min_step, verify_images)
    index.raise_for_problems()
    if not index.records:
        raise DatasetProblems([Problem("dataset config", "no training images", "add images to a subset")])
    return index


# --------------------------------------------------------------------------------------------------
# Sample indices, buckets for the sampler
# --------------------------------------------------------------------------------------------------


def expand_repeats(records: Sequence[ImageRecord]) -> list[int]:
    """Sample index -> record index: record i occupies num_repeats consecutive sample indices."""
    return [position for position, record in enumerate(records) for _ in range(record.num_repeats)]


class BucketKey(NamedTuple):
    """What a batch shares: the dataset (batches never mix datasets) and the bucket size."""

    dataset: int
    width: int
    height: int


@dataclass(frozen=True)
class SamplerInputs:
    """``BucketBatchSampler(bucket_keys, batch_size, seed, ...)`` arguments for the dataset."""

    bucket_keys: tuple[BucketKey, ...]
    batch_size: int


def build_bucket_sampler_inputs(index: DatasetIndex) -> SamplerInputs:
    """The bucket key of every sample index (repeats expanded exactly as :class:`TrainingDataset` does).

    All datasets must share one batch_size (see the module docstring for why); raises ValueError naming
    them otherwise.
    """
    sizes = {dataset.batch_size for dataset in index.datasets}
    if len(sizes) > 1:
        listed = ", ".join(f"{d.source}: {d.batch_size}" for d in index.datasets)
        raise ValueError(f"all datasets must have the same batch_size for now ({listed}); set one batch_size "
                         "in [general] or on the command line")
    if any(record.bucket is None for record in index.records):
        raise ValueError("records have no bucket yet: call assign_buckets (or build_dataset_index) first")
    keys = []
    for position in expand_repeats(index.records):
        record = index.records[position]
        bucket = record.bucket.bucket  # type: ignore[union-attr]
        keys.append(BucketKey(record.dataset_index, bucket[0], bucket[1]))
    return SamplerInputs(bucket_keys=tuple(keys), batch_size=sizes.pop() if sizes else 1)


@dataclass(frozen=True)
class SampleKey:
    """What the DataLoader passes to ``__getitem__``: the sample and the epoch/step it is drawn for."""

    index: int
    epoch: int = 1  # counts from 1, as caption_dropout_every_n_epochs expects
    step: int = 0  # global optimizer step this sample is trained at (token warm-up)


class KeyedBatchSampler(Sampler[list[SampleKey]]):
    """Wraps a batch sampler of ints so each batch carries (epoch, step) to the workers as SampleKeys.

    It runs in the main process only; the step of a batch is computed from its position in the epoch
    (``first_step + position // batches_per_step``), so it is the step the batch is actually trained at,
    however far the DataLoader prefetches.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], batches_per_step: int = 1) -> None:
        """``batches_per_step``: gradient accumulation steps (batches per optimizer step)."""
        if batches_per_step < 1:
            raise ValueError(f"batches_per_step must be >= 1, got {batches_per_step}")
        self.batch_sampler = batch_sampler
        self.batches_per_step = batches_per_step
        self.epoch = 1
        self.first_step = 0

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Start ``epoch`` (from 1) whose first yielded batch is trained at global step ``first_step``;
        forwards the epoch to the wrapped sampler's ``set_epoch`` if it has one."""
        self.epoch, self.first_step = epoch, first_step
        set_inner = getattr(self.batch_sampler, "set_epoch", None)
        if set_inner is not None:
            set_inner(epoch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, first_step, per_step = self.epoch, self.first_step, self.batches_per_step
        for position, batch in enumerate(self.batch_sampler):
            step = first_step + position // per_step
            yield [SampleKey(int(index), epoch, step) for index in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped sampler's state (for resuming)."""
        return self.batch_sampler.state_dict(*args, **kwargs)  # type: ignore[attr-defined]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the wrapped sampler."""
        self.batch_sampler.load_state_dict(state)  # type: ignore[attr-defined]


def sample_rng(seed: int, epoch: int, index: int, purpose: str) -> random.Random:
    """The generator for one draw of one sample; ``purpose`` separates streams ("caption", "image") so
    turning on colour augmentation does not change the captions."""
    return random.Random(f"{seed}:{epoch}:{index}:{purpose}")


# --------------------------------------------------------------------------------------------------
# The Dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One training sample, before collation.

    With a latent cache, ``pixel_values`` is None and ``cached`` holds the latents with the SDXL size
    conditioning of the crop they were made from; ``plan`` is then the centre crop and this draw's flip
    (what a conditioning image is cropped with).
    """

    pixel_values: torch.Tensor | None  # (3, H, W) in [-1, 1]; None with cached latents
    caption: str
    plan: CropPlan
    is_reg: bool
    image_path: str
    alpha_mask: torch.Tensor | None  # (H, W) in [0, 1]
    conditioning_pixel_values: torch.Tensor | None  # (3, H, W) in [-1, 1]
    cached: CachedLatents | None = None  # from the latent cache
    text_hidden_states: torch.Tensor | None = None  # (L, D) from the text-encoder output cache
    text_pooled: torch.Tensor | None = None  # (P,) SDXL only


def load_sample_pixels(record: ImageRecord, rng: random.Random
                       ) -> tuple[torch.Tensor, CropPlan, torch.Tensor | None, torch.Tensor | None]:
    """Decode and transform one record's image (and its mask and conditioning image with the same plan)."""
    if record.bucket is None:
        raise ValueError(f"{record.image_path}: no bucket assigned")
    subset = record.subset
    loaded = load_image(record.image_path, keep_alpha=subset.alpha_mask)
    plan = plan_crop(loaded.rgb.size, record.bucket.bucket, random_crop=subset.random_crop,
                     flip_aug=subset.flip_aug, rng=rng)
    image = apply_crop_plan(loaded.rgb, plan)
    if subset.color_aug:
        image = color_jitter(image, rng)
    mask = mask_to_tensor(apply_crop_plan(loaded.alpha, plan)) if loaded.alpha is not None else None
    cond = None
    if record.conditioning_path is not None:
        cond = to_tensor(apply_crop_plan(load_rgb(record.conditioning_path), plan))
    return to_tensor(image), plan, mask, cond


def load_sample_latents(record: ImageRecord, location: LatentCacheLocation, rng: random.Random
                        ) -> tuple[CachedLatents, CropPlan, torch.Tensor | None]:
    """The cached latents of one draw (the flipped ones when this draw flips) and the conditioning image
    cropped to match. The flip comes from the same ``plan_crop`` draw as the pixel path makes, so a seed
    flips the same samples with and without the cache."""
    if record.bucket is None:
        raise ValueError(f"{record.image_path}: no bucket assigned")
    plan = plan_crop(record.image_size, record.bucket.bucket, random_crop=False, flip_aug=record.subset.flip_aug,
                     rng=rng)
    path = location.path_for(record)
    try:
        cached = load_cached_latents(path, flipped=plan.flipped)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no cached latents for {record.image_path}; fill the cache first "
                                "(dataset_caching.fill_latent_caches)") from None
    cond = None
    if record.conditioning_path is not None:
        cond = to_tensor(apply_crop_plan(load_rgb(record.conditioning_path), plan))
    return cached, plan, cond


class TrainingDataset(Dataset):
    """Map-style dataset over sample indices (records with repeats expanded), fetched by SampleKey.

    Each fetch builds the prompt (``build_prompt`` with the subset's CaptionOptions) and the pixels;
    randomness comes only from (seed, epoch, index), so any worker count gives the same samples.
    An int index is accepted too (epoch 1, step 0), for inspection.

    ``latent_cache``: read latents from these npz files instead of decoding images; ``text_cache``: attach
    the text-encoder outputs of each sample's prompt. Both are read in the worker, and both must have been
    filled first (``library.dataset_caching``); options the caches would freeze are refused here too.
    """

    def __init__(self, index: DatasetIndex, seed: int, max_train_steps: int = 0,
                 latent_cache: LatentCacheLocation | None = None,
                 text_cache: TextEncoderOutputCache | None = None) -> None:
        """``max_train_steps``: the planned total, for a fractional token_warmup_step."""
        index.raise_for_problems()
        if any(record.bucket is None for record in index.records):
            raise ValueError("records have no bucket yet: call assign_buckets (or build_dataset_index) first")
        if latent_cache is not None or text_cache is not None:
            raise_if_not_cacheable(index, latent_cache is not None, text_cache is not None, latent_cache)
        self.records = index.records
        self.sample_to_record = expand_repeats(index.records)
        self.seed = seed
        self.max_train_steps = max_train_steps
        self.latent_cache = latent_cache
        self.text_cache = text_cache

    def __len__(self) -> int:
        return len(self.sample_to_record)

    def record_of(self, sample_index: int) -> ImageRecord:
        """The record a sample index draws from."""
        return self.records[self.sample_to_record[sample_index]]

    def __getitem__(self, key: SampleKey | int) -> Sample:
        if not isinstance(key, SampleKey):
            key = SampleKey(int(key))
        record = self.record_of(key.index)
        caption = build_prompt(
            record.caption, record.tags, record.subset.captions,
            sample_rng(self.seed, key.epoch, key.index, "caption"), key.epoch, key.step, self.max_train_steps,
        )
        rng = sample_rng(self.seed, key.epoch, key.index, "image")
        cached = None
        if self.latent_cache is None:
            pixels, plan, mask, cond = load_sample_pixels(record, rng)
        else:
            cached, plan, cond = load_sample_latents(record, self.latent_cache, rng)
            pixels, mask = None, cached.alpha_mask if record.subset.alpha_mask else None
        hidden = pooled = None
        if self.text_cache is not None:
            hidden, pooled = self.text_cache.get(caption)
        return Sample(pixel_values=pixels, caption=caption, plan=plan, is_reg=record.is_reg,
                      image_path=str(record.image_path), alpha_mask=mask, conditioning_pixel_values=cond,
                      cached=cached, text_hidden_states=hidden, text_pooled=pooled)


def _long(rows: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 2)


def _all_or_none(values: Sequence[torch.Tensor | None], what: str) -> torch.Tensor | None:
    """Stack when every sample has the tensor, None when none has; a mix is a bug upstream."""
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"some samples of the batch have {what} and some do not")
    return torch.stack(values)  # type: ignore[arg-type]


def collate_samples(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack one bucket's samples into the batch dict the trainer reads.

    Keys: pixel_values (B,3,H,W) float, or None with cached latents; latents (B,C,H/8,W/8) float32 unscaled
    (multiply by the VAE scaling factor) or None; captions list[str]; original_sizes_hw, crop_top_lefts,
    target_sizes_hw (B,2) long, (h, w) / (top, left) order as SDXL wants (from the cache file with cached
    latents); flipped, is_reg (B,) bool; alpha_masks (B,H,W) or None (ones for samples without a mask when
    others have one); conditioning_pixel_values (B,3,H,W) or None; text_hidden_states (B,L,D) and
    text_pooled (B,P) (SDXL) from the text-encoder cache, or None; image_paths list[str].
    """
    if not samples:
        raise ValueError("empty batch")
    cached = [sample.cached is not None for sample in samples]
    if any(cached) and not all(cached):
        raise ValueError("some samples of the batch have cached latents and some do not")
    if all(cached):
        shapes = {tuple(sample.cached.latents.shape) for sample in samples}  # type: ignore[union-attr]
        geometry = [sample.cached for sample in samples]
    else:
        shapes = {tuple(sample.pixel_values.shape) for sample in samples}  # type: ignore[union-attr]
        geometry = [sample.plan for sample in samples]
    if len(shapes) != 1:
        raise ValueError(f"a batch must hold one bucket size, got {sorted(shapes)}: use the bucket batch sampler")
    height, width = geometry[0].target_size_hw  # type: ignore[union-attr]
    masks = None
    if any(sample.alpha_mask is not None for sample in samples):
        masks = torch.stack([s.alpha_mask if s.alpha_mask is not None else torch.ones(height, width)
                             for s in samples])
    if all(cached):
        pixels, latents = None, torch.stack([s.cached.latents for s in samples])  # type: ignore[union-attr]
    else:
        pixels, latents = torch.stack([s.pixel_values for s in samples]), None  # type: ignore[misc]
    return {
        "pixel_values": pixels,
        "latents": latents,
        "captions": [sample.caption for sample in samples],
        "original_sizes_hw": _long([g.original_size_hw for g in geometry]),  # type: ignore[union-attr]
        "crop_top_lefts": _long([g.crop_top_left for g in geometry]),  # type: ignore[union-attr]
        "target_sizes_hw": _long([g.target_size_hw for g in geometry]),  # type: ignore[union-attr]
        "flipped": torch.tensor([g.flipped for g in geometry], dtype=torch.bool),  # type: ignore[union-attr]
        "is_reg": torch.tensor([sample.is_reg for sample in samples], dtype=torch.bool),
        "alpha_masks": masks,
        "conditioning_pixel_values": _all_or_none([s.conditioning_pixel_values for s in samples],
                                                  "a conditioning image"),
        "text_hidden_states": _all_or_none([s.text_hidden_states for s in samples], "cached text-encoder outputs"),
        "text_pooled": _all_or_none([s.text_pooled for s in samples], "cached pooled text-encoder outputs"),
        "image_paths": [sample.image_path for sample in samples],
    }
