"""WD14 tagger labels and tag selection: which model outputs become which tags, in which order.

Pure functions over a score vector, so every option of ``tools/tag_images_by_wd14_tagger.py`` is pinned by
tests without a model. Two label layouts, as kohya reads them:

* ``selected_tags.csv`` (SmilingWolf's WD14 models): one row per model output, ``tag_id,name,category,count``;
  category 9 = rating, 0 = general, 4 = character (1 artist, 3 copyright, 5 meta where a model has them).
  Tags come out in the model's output order, as in kohya.
* ``tag_mapping.json`` (newer taggers such as cl_tagger): ``{"<output index>": {"tag": ..., "category":
  "Rating"|"General"|"Character"|"Copyright"|"Meta"|"Model"|"Quality"|"Artist"}}``. Tags come out by
  descending score, as in kohya; copyright, meta, model and artist tags join the general ones.

Each label's name goes through, in this order: ``--character_tag_expand`` (``name_(series)`` -> ``name``,
``series``: two tags), ``--remove_underscore`` (``_`` -> space in tags longer than 3 characters, so kaomoji
such as ``^_^`` stay), ``--tag_replacement`` (exact whole-tag matches). ``--undesired_tags`` then compares with
these final names. The rating (and, in the JSON layout, quality) tag is the category's best-scoring label,
whatever the thresholds. Where kohya's behaviour is an accident we do what its help text says: always-first
tags come first in the order given (kohya reversed them), ``--character_tags_first`` keeps the characters'
own order (kohya reversed them in the CSV layout), and ``--tag_replacement`` replaces every listed pair
(kohya's replaced nothing in the CSV layout and every tag in the JSON one).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

RATING, GENERAL, CHARACTER, COPYRIGHT, META, MODEL, ARTIST, QUALITY = (
    "rating", "general", "character", "copyright", "meta", "model", "artist", "quality")
THRESHOLD_CATEGORIES = (GENERAL, CHARACTER, COPYRIGHT, META, MODEL, ARTIST)
_CSV_CATEGORIES = {"9": RATING, "0": GENERAL, "4": CHARACTER, "1": ARTIST, "3": COPYRIGHT, "5": META}
_JSON_CATEGORIES = {"Rating": RATING, "General": GENERAL, "Character": CHARACTER, "Copyright": COPYRIGHT,
                    "Meta": META, "Model": MODEL, "Quality": QUALITY, "Artist": ARTIST}


class TagLabelError(ValueError):
    """A label file or a tag option that cannot be used; the message names the file or flag and the fix."""


@dataclass(frozen=True)
class TagLabel:
    name: str
    category: str


@dataclass(frozen=True)
class TagVocabulary:
    """``labels[i]`` names model output ``i`` (None: an output without a tag). ``by_score``: the JSON layout's
    order (descending score) instead of output order."""

    labels: tuple[TagLabel | None, ...]
    by_score: bool


@dataclass(frozen=True)
class TagOptions:
    """What to keep and how to write it (kohya's flags; thresholds per category, already defaulted)."""

    thresholds: dict[str, float]
    separator: str = ", "
    remove_underscore: bool = False
    undesired: frozenset[str] = frozenset()
    always_first: tuple[str, ...] = ()
    character_first: bool = False
    character_expand: bool = False
    rating: str | None = None  # "first", "last" or None
    quality: str | None = None  # "first", "last" or None
    replacements: tuple[tuple[str, str], ...] = field(default=())


def read_selected_tags_csv(path: Path) -> TagVocabulary:
    """WD14's ``selected_tags.csv``: the header must start ``tag_id,name,category``."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or [cell.strip() for cell in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise TagLabelError(f"{path}: expected a header starting tag_id,name,category (WD14's selected_tags.csv); "
                            "download the file again with --force_download")
    labels = []
    for row in rows[1:]:
        category = _CSV_CATEGORIES.get(row[2].strip()) if len(row) > 2 else None
        labels.append(TagLabel(row[1], category) if category else None)
    return TagVocabulary(labels=tuple(labels), by_score=False)


def read_tag_mapping_json(path: Path) -> TagVocabulary:
    """The newer ``tag_mapping.json``: output index -> {"tag", "category"}."""
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = {int(index): (info["tag"], info["category"]) for index, info in mapping.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise TagLabelError(f"{path}: not a tag mapping ({error}); expected {{\"0\": {{\"tag\": ..., \"category\": "
                            "...}}, ...}}; download it again with --force_download") from error
    labels: list[TagLabel | None] = [None] * (max(entries, default=-1) + 1)
    for index, (tag, category) in entries.items():
        if category not in _JSON_CATEGORIES:
            raise TagLabelError(f"{path}: unknown category {category!r} for tag {tag!r}; expected one of "
                                f"{', '.join(_JSON_CATEGORIES)}")
        labels[index] = TagLabel(tag, _JSON_CATEGORIES[category])
    return TagVocabulary(labels=tuple(labels), by_score=True)


def parse_tag_replacement(text: str) -> tuple[tuple[str, str], ...]:
    """``source1,target1;source2,target2``; ``\\,`` and ``\\;`` stand for a literal comma and semicolon."""
    pairs = []
    for item in _split_escaped(text, ";"):
        if not item:
            continue
        parts = _split_escaped(item, ",")
        if len(parts) != 2 or not parts[0]:
            raise TagLabelError(f"--tag_replacement: {item!r} is not `source,target`; write pairs as "
                                "`source1,target1;source2,target2` (escape , and ; inside tags as \\, and \\;)")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def _split_escaped(text: str, separator: str) -> list[str]:
    """Split on ``separator`` except where it is escaped as ``\\<separator>`` (other escapes are kept)."""
    parts, current, index = [], [], 0
    while index < len(text):
        if text[index] == "\\" and text[index + 1:index + 2] == separator:
            current.append(separator)
            index += 2
            continue
        if text[index] == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(text[index])
        index += 1
    parts.append("".join(current))
    return parts


def split_tags(text: str, separator: str) -> list[str]:
    """A tag string or a flag's list split on the separator without its spaces, each tag stripped."""
    stripped = separator.strip() or separator
    return [tag.strip() for tag in text.split(stripped) if tag.strip()]


def output_names(label: TagLabel, options: TagOptions) -> tuple[str, ...]:
    """The tag(s) one label is written as (see the module docstring for the order of the renaming steps)."""
    names = [label.name]
    if options.character_expand and label.category == CHARACTER and label.name.endswith(")") and "(" in label.name:
        head, _, tail = label.name.rpartition("(")
        names = [head[:-1] if head.endswith("_") else head.rstrip(), tail[:-1]]
    if options.remove_underscore:
        names = [name.replace("_", " ") if len(name) > 3 else name for name in names]
    replace = dict(options.replacements)
    return tuple(replace.get(name, name) for name in names)


def select_tags(scores: np.ndarray, vocabulary: TagVocabulary, options: TagOptions) -> list[str]:
    """The tags of one image, in the order they are written."""
    best: dict[str, tuple[float, TagLabel]] = {}
    chosen: list[tuple[float, int, TagLabel]] = []
    for index, label in enumerate(vocabulary.labels[: len(scores)]):
        if label is None:
            continue
        score = float(scores[index])
        if label.category in (RATING, QUALITY):
            if not _all_undesired(label, options) and score > best.get(label.category, (-1.0, label))[0]:
                best[label.category] = (score, label)
        elif score >= options.thresholds[label.category]:
            chosen.append((score, index, label))
    if vocabulary.by_score:
        chosen.sort(key=lambda item: (-item[0], item[1]))
    if options.character_first:
        chosen.sort(key=lambda item: item[2].category != CHARACTER)  # stable: each group keeps its order
    tags = [name for _, _, label in chosen for name in output_names(label, options)]
    for category, placement in ((QUALITY, options.quality), (RATING, options.rating)):
        if placement and category in best:
            names = list(output_names(best[category][1], options))
            tags = names + tags if placement == "first" else tags + names
    tags = [tag for tag in tags if tag not in options.undesired]
    first = [tag for tag in options.always_first if tag in tags]
    return _unique(first + [tag for tag in tags if tag not in first])


def _all_undesired(label: TagLabel, options: TagOptions) -> bool:
    return all(name in options.undesired for name in output_names(label, options))


def _unique(tags: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def append_to_existing(existing_text: str, tags: Sequence[str], separator: str) -> list[str]:
    """``--append_tags``: the caption file's tags, then the new ones it does not have yet."""
    existing = split_tags(existing_text.strip("\n"), separator)
    return existing + [tag for tag in tags if tag not in existing]
