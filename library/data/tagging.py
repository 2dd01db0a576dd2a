"""Tag a folder of images with a WD14-style ONNX tagger: caption files, or one JSON/JSONL file.

``run_tagger(options)`` is ``tools/tag_images_by_wd14_tagger.py`` without its command line: it checks the
input, finds (or downloads) the model, runs the images in batches and writes ``<image stem><extension>`` per
image (or ``output_path``: ``{image path: {"tags", "image_size"}}`` as JSON, or one
``{"image_path", "caption", "image_size"}`` per line for ``.jsonl``, kohya's two formats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from library.data.caption_files import (APPEND, KEEP, LabellingError, LabelSummary, caption_path, find_images,
                                        images_to_label, write_caption)
from library.data.image_batches import image_batches
from library.data.wd14_model import (OnnxTagger, ensure_tagger_files, import_onnxruntime, prepare_tagger_image,
                                     read_vocabulary, tagger_decode_size, tagger_files)
from library.data.wd14_tags import TagOptions, TagVocabulary, append_to_existing, select_tags
from library.io import atomic_write_file


@dataclass(frozen=True)
class TaggerOptions:
    train_data_dir: Path
    repo_id: str
    model_dir: Path
    tags: TagOptions
    force_download: bool = False
    batch_size: int = 1
    num_workers: int = 0
    caption_extension: str = ".txt"
    recursive: bool = False
    mode: str = KEEP  # KEEP, OVERWRITE or APPEND (caption_files)
    output_path: Path | None = None
    debug: bool = False


def run_tagger(options: TaggerOptions, *, echo: Callable[[str], None] = print) -> LabelSummary:
    """Tag every image of ``options.train_data_dir``; returns what was done (the summary is echoed too)."""
    images = find_images(options.train_data_dir, recursive=options.recursive)
    writes_files = options.output_path is None
    todo, kept = images_to_label(images, extension=options.caption_extension,
                                 mode=options.mode if writes_files else APPEND)
    echo(f"found {len(images)} images in {options.train_data_dir}" +
         (f"; {len(kept)} already have a {options.caption_extension} file and are kept" if kept else ""))
    files = tagger_files(options.model_dir, options.repo_id)
    if not todo:
        return LabelSummary(kept=kept)
    import_onnxruntime()  # the missing package is reported before any download
    for name in ensure_tagger_files(files, force_download=options.force_download):
        echo(f"downloaded {name} of {files.repo_id} into {files.folder}")
    vocabulary = read_vocabulary(files)
    tagger = OnnxTagger(files)
    if tagger.output_count and not vocabulary.by_score and tagger.output_count != len(vocabulary.labels):
        raise LabellingError(f"{files.labels} lists {len(vocabulary.labels)} tags but {files.onnx} gives "
                             f"{tagger.output_count} scores: they are not from the same model; download both again "
                             "with --force_download")
    echo(f"tagger {files.onnx} on {tagger.providers[0]}")
    batch_size = options.batch_size
    if tagger.fixed_batch and tagger.fixed_batch != batch_size:
        echo(f"warning: the model takes batches of {tagger.fixed_batch}; using --batch_size {tagger.fixed_batch}")
        batch_size = tagger.fixed_batch

    summary = LabelSummary(kept=kept)
    results: dict[str, dict] = {}
    progress = tqdm(total=len(todo), desc="tagging", unit="img", smoothing=0.0)
    for batch in image_batches(todo, prepare_tagger_image, batch_size=batch_size, num_workers=options.num_workers,
                               decode_size=tagger_decode_size):
        for failure in batch.failures:
            tqdm.write(f"warning: {failure}")
        summary.failed.extend(batch.failures)
        if batch.paths:
            scores = tagger.scores(np.stack(batch.prepared))
            for path, size, image_scores in zip(batch.paths, batch.sizes, scores):
                tags = _tags_for(path, image_scores, vocabulary, options)
                summary.add(tags)
                text = options.tags.separator.join(tags)
                if writes_files:
                    write_caption(caption_path(path, options.caption_extension), text)
                else:
                    results[str(path)] = {"tags": text, "image_size": list(size)}
                if options.debug:
                    tqdm.write(f"{path}: {text}")
        progress.update(len(batch.paths) + len(batch.failures))
    progress.close()
    if options.output_path is not None:
        write_tag_results(options.output_path, results)
        echo(f"wrote the tags of {len(results)} images to {options.output_path}")
    return summary


def _tags_for(path: Path, scores: np.ndarray, vocabulary: TagVocabulary, options: TaggerOptions) -> list[str]:
    tags = select_tags(scores, vocabulary, options.tags)
    existing = caption_path(path, options.caption_extension)
    if options.mode == APPEND and existing.is_file():
        tags = append_to_existing(existing.read_text(encoding="utf-8"), tags, options.tags.separator)
    return tags


def write_tag_results(path: Path, results: dict[str, dict]) -> None:
    """kohya's ``--output_path``: JSONL (``image_path``, ``caption``, ``image_size`` per line) or JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        lines = [json.dumps({"image_path": key, "caption": entry["tags"], "image_size": entry["image_size"]},
                            ensure_ascii=False) for key, entry in results.items()]
        text = "".join(line + "\n" for line in lines)
    else:
        text = json.dumps(results, ensure_ascii=False, indent=4) + "\n"
    data = text.encode("utf-8")
    atomic_write_file(path, lambda handle: handle.write(data))
