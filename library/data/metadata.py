"""Fine-tuning metadata JSON: build it from caption/tag side files, clean it, read and write it safely.

The metadata file is kohya's `--in_json` format: one JSON object keyed by image key, each value an object
with optional `caption` (str), `tags` (comma list str), `image_size` ([w, h]) and other fields we keep as is.
The three tools in `tools/` (merge captions, merge tags, clean) are thin wrappers over this module.

Image keys (what `--in_json` readers join with the image folder):
  * default: the bare file stem, `img_001` for `img_001.png` (kohya's default);
  * `--recursive` without `--full_path`: the path relative to the folder without its extension, written
    with `/` (`sub/img_001`). kohya refuses this combination; we allow it because these keys stay unique
    across sub-folders, where bare stems would silently merge `a/x.png` and `b/x.png` into one entry;
  * `--full_path`: the absolute path of the image (kohya writes the folder argument joined with the file
    name, which is only absolute when the folder argument was; an absolute key works from any directory).
Two images with the same key (`x.png` and `x.jpg` side by side) are an error, not a silent merge.

Side files (kohya's `merge_*_to_metadata.py`): `<image path without extension><extension>`, read whole as
UTF-8 and stripped of leading/trailing whitespace; inner newlines stay (a caption may hold several lines).
We also drop a UTF-8 byte-order mark (Notepad writes one; kohya keeps it as part of the caption) and read
`\\r\\n` as `\\n` (as Python's text mode does in kohya).

JSON is written atomically (a temp file in the same folder, fsynced, then `os.replace`), UTF-8 without
`\\u` escapes, indent 2, one trailing newline; so writing over the input file cannot leave it half-written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from library.io import atomic_write_file

# The image files every folder reader recognises (any letter case). Kept here, in a torch-free module, so the
# metadata tools stay light.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_LISTED = 5  # how many names a warning lists before "..."

Metadata = dict[str, dict[str, Any]]


class MetadataError(Exception):
    """Bad input for a metadata tool; the message is one sentence that names the offending file."""


# ---------------------------------------------------------------------------------------------------------
# Images and keys


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sub-folders too when `recursive`), sorted by relative path.

    Extensions match case-insensitively (kohya globs only all-lower and all-upper spellings, so `x.Png`
    was skipped there). Sorting makes the JSON identical from run to run and machine to machine.
    """
    root = Path(folder)
    if not root.exists():
        raise MetadataError(f"image folder {root} does not exist.")
    if not root.is_dir():
        raise MetadataError(f"image folder {root} is not a folder.")
    candidates = root.rglob("*") if recursive else root.iterdir()
    images = [p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(images, key=lambda p: p.relative_to(root).as_posix())


def image_key(image: Path, root: Path, *, full_path: bool = False, recursive: bool = False) -> str:
    """The metadata key of `image` found under `root` (see the module docstring for the three styles)."""
    if full_path:
        return os.path.abspath(image)
    if recursive:
        return image.relative_to(root).with_suffix("").as_posix()
    return image.stem


def assign_keys(images: Iterable[Path], root: Path, *, full_path: bool = False,
                recursive: bool = False) -> dict[str, Path]:
    """Map key -> image, refusing two images that would share one entry (data would be lost silently)."""
    keys: dict[str, Path] = {}
    for image in images:
        key = image_key(image, root, full_path=full_path, recursive=recursive)
        if key in keys:
            hint = "" if full_path else "; rename one or pass --full_path"
            raise MetadataError(f"images {keys[key]} and {image} in {root} both map to the metadata key "
                                f"{key!r}{hint}.")
        keys[key] = image
    return keys


def normalize_extension(extension: str) -> str:
    """`.txt` stays `.txt`; `txt` becomes `.txt` (kohya's Path.with_suffix would crash on it)."""
    extension = extension.strip()
    if extension in ("", "."):
        raise MetadataError(f"the side-file extension {extension!r} is empty; pass e.g. --caption_extension .txt.")
    return extension if extension.startswith(".") else "." + extension


def side_file(image: Path, extension: str) -> Path:
    """`dir/name.png` -> `dir/name<extension>` (only the last suffix is replaced, like kohya)."""
    return image.with_name(image.stem + extension)


def read_side_file(path: Path) -> str:
    """A caption/tag file's text as kohya's merge tools read it: whole file, UTF-8, stripped."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise MetadataError(f"cannot read {path}: {error.strerror or error}.") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MetadataError(f"{path} is not UTF-8 text (bad byte at offset {error.start}); "
                            f"re-save it as UTF-8.") from error
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# ---------------------------------------------------------------------------------------------------------
# Reading and writing JSON


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook: plain json keeps the last of two equal keys, silently dropping an entry."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _line_of_duplicate(text: str, key: str) -> int | None:
    """Line of the second `"key":` when the key is written exactly twice (else unknown: None)."""
    for spelling in (json.dumps(key, ensure_ascii=False), json.dumps(key)):
        matches = list(re.finditer(re.escape(spelling) + r"\s*:", text))
        if len(matches) == 2:
            return text.count("\n", 0, matches[1].start()) + 1
    return None


def load_metadata(path: str | os.PathLike[str]) -> Metadata:
    """Read a metadata JSON file, checking it is an object of objects with no repeated keys."""
    path = Path(path)
    if not path.exists():
        raise MetadataError(f"metadata file {path} does not exist.")
    if path.is_dir():
        raise MetadataError(f"metadata file {path} is a folder, not a JSON file.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MetadataError(f"metadata file {path} is not UTF-8 (bad byte at offset {error.start}).") from error
    except OSError as error:
        raise MetadataError(f"cannot read metadata file {path}: {error.strerror or error}.") from error
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as error:
        raise MetadataError(f"metadata file {path} is not valid JSON: {error.msg} at line {error.lineno} "
                            f"column {error.colno}.") from error
    except _DuplicateKey as error:
        line = _line_of_duplicate(text, error.key)
        where = f" (second one at line {line})" if line else ""
        raise MetadataError(f"metadata file {path} has the key {error.key!r} twice{where}; "
                            f"JSON readers would silently keep only the last one.") from None
    if not isinstance(data, dict):
        raise MetadataError(f"metadata file {path} must hold a JSON object keyed by image, "
                            f"not a {type(data).__name__}.")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise MetadataError(f"metadata file {path}: the entry {key!r} must be a JSON object, "
                                f"not a {type(entry).__name__}.")
    return data


def dumps_metadata(data: Any) -> str:
    """The exact text we write: readable UTF-8 (no \\u escapes), indent 2, trailing newline."""
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as JSON so that `path` holds either the old or the new content, never a partial file
    (`library.io.atomic_write_file`: fsynced, an existing file's mode kept)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise MetadataError(f"cannot write {path}: the folder {parent} does not exist.")
    if path.is_dir():
        raise MetadataError(f"cannot write {path}: it is a folder.")
    encoded = dumps_metadata(data).encode("utf-8")
    try:
        atomic_write_file(path, lambda handle: handle.write(encoded), fsync=True)
    except OSError as error:
        raise MetadataError(f"cannot write {path}: {error.strerror or error}.") from error


# ---------------------------------------------------------------------------------------------------------
# Merging side files into metadata


@dataclass
class MergeReport:
    """What a merge did, for the tool to print; `metadata` is what was written."""

    metadata: Metadata
    source: Path | None  # the JSON we started from, None for a fresh file
    images: int  # images found
    merged: dict[str, str] = field(default_factory=dict)  # key -> text put into the field
    added: int = 0  # keys that were not in the source
    missing: list[Path] = field(default_factory=list)  # images without a side file (left out)
    empty: list[str] = field(default_factory=list)  # keys whose side file was blank
    unmatched: int = 0  # source entries with no image in this folder (kept unchanged)


def collect_side_files(root: Path, images: dict[str, Path], extension: str) -> tuple[dict[str, str], list[Path]]:
    """Read `<image stem><extension>` for each keyed image; return (key -> text, images without a file)."""
    texts: dict[str, str] = {}
    missing: list[Path] = []
    for key, image in images.items():
        path = side_file(image, extension)
        if path.is_file():
            texts[key] = read_side_file(path)
        else:
            missing.append(image.relative_to(root))
    return texts, missing


def merge_field(metadata: Metadata, texts: dict[str, str], field_name: str) -> tuple[Metadata, int]:
    """A copy of `metadata` with `field_name` set from `texts`; other fields kept, new keys appended.

    Returns (new metadata, number of keys added). Existing values of the field are overwritten, as kohya
    does ("captions for existing images will be overwritten").
    """
    result = {key: dict(entry) for key, entry in metadata.items()}
    added = 0
    for key, text in texts.items():
        if key not in result:
            result[key] = {}
            added += 1
        result[key][field_name] = text
    return result, added


def merge_side_files(train_data_dir: str | os.PathLike[str], out_json: str | os.PathLike[str], *,
                     field_name: str, extension: str, in_json: str | os.PathLike[str] | None = None,
                     full_path: bool = False, recursive: bool = False) -> MergeReport:
    """kohya's merge_captions/merge_dd_tags: read side files, merge into metadata, write `out_json`.

    The starting metadata is `in_json` when given (it must exist), else `out_json` when that file already
    exists (kohya's behaviour: running a second merge into the same file updates it instead of wiping the
    other field), else empty. Everything is read and checked before anything is written.
    """
    root = Path(train_data_dir)
    extension = normalize_extension(extension)
    out_path = Path(out_json)
    source: Path | None
    if in_json is not None:
        source = Path(in_json)
        if not source.exists():
            raise MetadataError(f"--in_json file {source} does not exist.")
    else:
        source = out_path if out_path.is_file() else None
    images = assign_keys(list_images(root, recursive), root, full_path=full_path, recursive=recursive)
    metadata = load_metadata(source) if source is not None else {}
    texts, missing = collect_side_files(root, images, extension)
    merged, added = merge_field(metadata, texts, field_name)
    write_json_atomic(out_path, merged)
    return MergeReport(
        metadata=merged, source=source, images=len(images), merged=texts, added=added, missing=missing,
        empty=[key for key, text in texts.items() if not text],
        unmatched=sum(1 for key in metadata if key not in images),
    )


def format_names(names: Iterable[object], limit: int = MAX_LISTED) -> str:
    """`a, b, c, ... (12 in all)`: enough names to find the problem without flooding the terminal."""
    items = [str(n) for n in names]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def merge_report_lines(report: MergeReport, field_name: str, extension: str, out_json: str | os.PathLike[str]
                       ) -> tuple[list[str], list[str]]:
    """(info lines for stdout, warning lines for stderr) describing a merge."""
    extension = normalize_extension(extension)
    info = []
    if report.source is not None:
        info.append(f"updating metadata from {report.source} (existing {field_name} values are overwritten)")
    info.append(f"found {report.images} images; wrote {field_name} for {len(report.merged)} of them "
                f"({report.added} new entries) to {out_json}")
    warnings = []
    if report.missing:
        warnings.append(f"warning: {len(report.missing)} of {report.images} images have no {extension} file "
                        f"and got no {field_name}: {format_names(report.missing)}")
    if report.empty:
        warnings.append(f"warning: {len(report.empty)} {extension} files are empty: {format_names(report.empty)}")
    if report.unmatched and report.merged:
        warnings.append(f"note: {report.unmatched} entries of {report.source} match no image in this folder "
                        f"and were kept unchanged (different folder or key style?)")
    return info, warnings


# ---------------------------------------------------------------------------------------------------------
# Cleaning (kohya's finetune/clean_captions_and_tags.py rules; see tools/clean_captions_and_tags.py)

# Tags that, in a picture of several people ("2girls", "multiple boys", ...), describe only one of them.
# When one of these groups has more than one tag, every tag of that group is dropped.
_MULTI_PERSON_GROUPS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?:long|short|medium) hair"),
    re.compile(r"(?:bob|hime) cut"),
    re.compile(r"[\w\-]+ eyes"),
    re.compile(r"[\w\-]+ sleeves|sleeveless"),
    re.compile(r"ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up"
               r"|two tails|[\w\-]+ braid|sidelocks"),
)


_HAIR_LENGTH = _MULTI_PERSON_GROUPS[0]
_ONE_WORD_HAIR = re.compile(r"[\w\-]+ hair")  # hair colours, and also e.g. "messy hair"
_GENERIC_TAG = re.compile(r"[\w\-]+|hair ornament")  # tags a more specific tag can make redundant
_UNDERSCORE = re.compile(r"(\^_\^)|_")  # the kaomoji ^_^ keeps its underscore

# (find, replace), applied in this order, each repeated until the caption no longer changes. Plain substring
# replacement, as in kohya: "person" also rewrites "personal" to "girlal".
CAPTION_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("anime anime", "anime"),
    ("young ", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
)


def _clean_tags(tags: str) -> tuple[str, bool]:
    """clean_tags plus whether the string held more than one rating (kohya prints a warning for that)."""
    tags = _UNDERSCORE.sub(lambda m: m.group(1) or " ", tags)
    parts = tags.split(", rating")
    several_ratings = len(parts) > 2
    items = [tag for tag in parts[0].split(", ") if tag.strip()]  # kohya keeps empty tags (see the tool)

    if any("girls" in tag or "boys" in tag for tag in items):
        for group in _MULTI_PERSON_GROUPS:
            if sum(1 for tag in items if group.fullmatch(tag)) > 1:
                items = [tag for tag in items if not group.fullmatch(tag)]
        # A single hair-length tag survives the hair-colour purge (everyone may share the length).
        length = next((tag for tag in items if _HAIR_LENGTH.fullmatch(tag)), None)
        hair = [i for i, tag in enumerate(items) if _ONE_WORD_HAIR.fullmatch(tag) and tag != length]
        if len(hair) > 1:
            drop = set(hair)
            items = [tag for i, tag in enumerate(items) if i not in drop]

    for word in [tag for tag in items if _GENERIC_TAG.fullmatch(tag)]:
        specific = re.compile(r"(?:\w+ )+" + re.escape(word))
        if any(specific.fullmatch(tag) for tag in items):
            items = [tag for tag in items if tag != word]
    return ", ".join(items), several_ratings


def clean_tags(tags: str) -> str:
    """Apply kohya's tag-cleaning rules to one `, `-separated tag string (rules in the tool's docstring)."""
    return _clean_tags(tags)[0]


def clean_caption(caption: str) -> str:
    """Apply kohya's caption rewrites (CAPTION_REPLACEMENTS) to one caption."""
    for find, replace in CAPTION_REPLACEMENTS:
        while find in caption:
            caption = caption.replace(find, replace)
    return caption


@dataclass
class CleanReport:
    """What cleaning did, for the tool to print."""

    metadata: Metadata
    changed: list[tuple[str, str, str, str]] = field(default_factory=list)  # (key, field, before, after)
    no_tags: list[str] = field(default_factory=list)
    no_caption: list[str] = field(default_factory=list)
    several_ratings: list[str] = field(default_factory=list)


def clean_metadata(metadata: Metadata, source: str | os.PathLike[str] = "metadata") -> CleanReport:
    """A cleaned copy of `metadata`: `tags` through clean_tags, `caption` through clean_caption.

    `source` only names the file in error messages (a non-string tags/caption value is an error: kohya
    would crash on it half-way).
    """
    report = CleanReport(metadata={})
    for key, entry in metadata.items():
        entry = dict(entry)
        for name in ("tags", "caption"):
            value = entry.get(name)
            if value is None:
                (report.no_tags if name == "tags" else report.no_caption).append(key)
                continue
            if not isinstance(value, str):
                raise MetadataError(f"metadata file {source}: {name!r} of the entry {key!r} must be a string, "
                                    f"not a {type(value).__name__}.")
            if name == "tags":
                cleaned, several = _clean_tags(value)
                if several:
                    report.several_ratings.append(key)
            else:
                cleaned = clean_caption(value)
            if cleaned != value:
                report.changed.append((key, name, value, cleaned))
            entry[name] = cleaned
        report.metadata[key] = entry
    return report
