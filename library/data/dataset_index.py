"""Records -> the checked, bucketed dataset index training starts from, and its validation split.

Stages, each a plain function on plain data:

1. ``record_sources.collect_records`` reads the subsets into records (problems collected, not raised).
2. :func:`check_records` decodes every image file completely (``library.data.images.verify_image``); files
   that passed before are remembered in the user's cache (``images.VerifiedImages``), so a restart is fast.
3. :func:`assign_buckets` gives every record its bucket (a too-small image under bucket_no_upscale is a
   problem naming the file).
4. :func:`build_dataset_index` runs 1-3 and keeps all problems; :func:`load_dataset_index` raises them
   together as one :class:`DatasetProblems`, so a user fixes the whole dataset in one go instead of one
   file per run. ``tools/check_dataset.py`` calls the same :func:`build_dataset_index`.
5. :func:`split_for_validation` holds out each dataset's ``validation_split``.

Besides problems (which stop training), the index carries ``notices``: things that train but are probably
not what the user meant (files in an image folder that are not images we read, images upscaled more than
4x to reach their bucket, captions longer than the prompt length), shown in the start-up summary.

Without ``enable_bucket`` the one bucket is the resolution, and images are resized to cover it and
cropped; kohya asserts on images of another size unless random_crop/face-crop is on.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Literal

from library.data.buckets import BucketAssignment, BucketSet, Size, cover_resize, make_bucket_set
from library.data.captions import build_prompt
from library.data.dataset_config import DatasetConfig
from library.data.images import VerifiedImages, default_verified_cache_dir, verify_image_cached
from library.data.record_sources import collect_records
from library.data.records import DatasetIndex, DatasetProblems, ImageRecord, Problem, listed_notice

logger = logging.getLogger(__name__)

UPSCALE_WARNING_FACTOR = 4.0


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
    notice = listed_notice(upscaled, f"image(s) are upscaled more than {UPSCALE_WARNING_FACTOR:g}x to reach their "
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
    Validation samples count once (no repeats). None when no dataset asks for a split. A split of 1.0
    validates on every image; kohya would then leave nothing to train, so here they all train as well.
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
        train += order[:cut] if cut else order  # 1.0: the whole set validates and trains
        validation += [replace(r, num_repeats=1) for r in order[cut:]]
    return replace(index, records=tuple(train)), replace(index, records=tuple(validation))
