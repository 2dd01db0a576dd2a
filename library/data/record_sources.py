"""Dataset configs -> image records: every image of every subset with its caption text and size.

:func:`collect_records` reads fine-tuning metadata JSON/JSONL, DreamBooth folders with caption sidecars and
ControlNet image/conditioning pairs into :class:`ImageRecord` s, and balances the regularisation images.
It never raises for bad data: every problem becomes a :class:`Problem` (``library.data.dataset_index``
checks the files and assigns buckets next).

Where this differs from kohya-ss/sd-scripts:

* Fine-tuning metadata keys that are stems (``merge_*_to_metadata.py`` output) are found with any image
  extension in any letter case; two keys for one image, or a key listed twice in the JSON, are errors
  (``json.load`` would silently keep the last one).
* Caption sidecars are read as UTF-8 with an optional BOM; an empty sidecar or an image with neither a
  caption nor class tokens is an error (kohya trains on an empty caption with a warning).
* ControlNet conditioning images get the identical resize/crop/flip as the target (kohya stretches them,
  misaligning them by the bucket's aspect error), so ``random_crop`` is allowed for ControlNet.
* Not implemented: ``cache_info`` (the config schema rejects it), face-crop file names and
  ``face_crop_aug_range``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from library.data.buckets import Size
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.images import IMAGE_EXTENSIONS, is_image_file, read_image_size
from library.data.records import CaptionSource, DatasetIndex, ImageRecord, Problem, listed_notice

logger = logging.getLogger(__name__)

# Files that live beside images and are not meant to be trained on: not reported as skipped.
COMPANION_EXTENSIONS = frozenset({".txt", ".caption", ".json", ".jsonl", ".npz", ".npy", ".toml"})


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
    notice = listed_notice(
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
        metadata_key=key,
    )
