"""Plan and fill the latent and text-encoder-output caches of a DatasetIndex, for TrainingDataset to read.

The order at start-up::

    location = LatentCacheLocation(is_sdxl=True)                     # npz beside the images (kohya's place)
    raise_if_not_cacheable(index, cache_latents=True, cache_text=True, location=location)  # before any model
    fill_latent_caches(index, vae, location, batch_size=args.vae_batch_size, rank=r, world_size=n)
    text_cache = fill_text_cache(index, prompt_encoder, default_text_cache_dir(index.datasets))
    dataset = TrainingDataset(index, seed, latent_cache=location, text_cache=text_cache)

Latents are encoded once per image (not per repeat) from the deterministic centre crop of the image's bucket
(``images.plan_crop`` with ``random_crop=False``); with flip_aug the mirrored crop is encoded as well and
stored as ``latents_flipped``, and each draw picks one of the two with the sample's seeded flip, exactly the
decision the pixel path would make. Text-encoder outputs are cached per final prompt text (see
``cache.TextEncoderOutputCache``), so a record's entry is found from the caption the dataset builds.

The two modes of each cache (``latent_cache_mode`` / ``text_cache_mode`` read the kohya flags):

* ``"disk"`` (``--cache_latents_to_disk``, ``--cache_text_encoder_outputs_to_disk``): latents as kohya npz
  files beside the images, text outputs in ``--text_encoder_cache_dir`` (default
  :func:`default_text_cache_dir`); both are reused by later runs (and the npz by kohya).
* ``"run"`` (``--cache_latents``, ``--cache_text_encoder_outputs`` alone): kohya keeps these in RAM. We write
  the very same files into a folder the caller owns for this run only (e.g. a ``TemporaryDirectory``) and
  read them back per sample. Process RAM then stays constant however large the dataset (the OS page cache
  keeps hot files in memory anyway), DataLoader workers read them without copying a dict of every latent
  into each worker, and the dataset code has one cache path instead of two. Each dataset gets its own
  subfolder, so one image used by two datasets at two resolutions gets two files.

Where this differs from kohya (reference §2.8-2.9):

* A disk npz holds one bucket/crop per image (kohya's format); an image that two datasets use at different
  buckets cannot share it, so that is refused with a clear message (kohya silently reuses the first
  latent for both). Images used twice at the same bucket share one file, with the flip/alpha needs merged.
* Text-encoder caching is refused when the prompt can change between draws (shuffle, token warm-up, tag
  dropout, caption_tag_mode "random", wildcards that choose), using the final processed caption (prefix,
  suffix, wildcard line, separators); kohya caches the raw caption and so ignores prefix/suffix. Caption
  dropout IS allowed: a dropped caption is the empty prompt, which is always cached (kohya refuses it
  for SDXL).
* ``--skip_cache_check`` trusts any existing npz without opening it; otherwise stale entries (changed
  image, other bucket/crop, missing flip) are rebuilt, not used.
"""

from __future__ import annotations

import argparse
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from library.data.buckets import Size
from library.cache.storage import (
    CacheStatus,
    LatentFillResult,
    LatentJob,
    TextEncoderOutputCache,
    check_latent_cache,
    fill_latent_cache,
    fill_text_encoder_cache,
    latent_cache_path,
    text_encoder_cache_identity,
)
from library.data.captions import CaptionOptions, build_prompt, is_caption_random, merge_caption_and_tags
from library.data.dataset_config import DatasetConfig
from library.data.images import CropPlan, ImageReadError, apply_crop_plan, load_image, mask_to_tensor, plan_crop, to_tensor
from library.data.records import DatasetIndex, ImageRecord
from library.models.text_encoding import PromptEncoder


CacheMode = Literal["disk", "run"]
TEXT_CACHE_FOLDER = ".te_cache"


# --------------------------------------------------------------------------------------------------
# Modes from the command line
# --------------------------------------------------------------------------------------------------


def latent_cache_mode(args: argparse.Namespace) -> CacheMode | None:
    """"disk" for --cache_latents_to_disk (which implies --cache_latents), "run" for --cache_latents, else None."""
    if getattr(args, "cache_latents_to_disk", False):
        return "disk"
    return "run" if getattr(args, "cache_latents", False) else None


def text_cache_mode(args: argparse.Namespace) -> CacheMode | None:
    """"disk" for --cache_text_encoder_outputs_to_disk (implies the other), "run" for
    --cache_text_encoder_outputs, else None."""
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        return "disk"
    return "run" if getattr(args, "cache_text_encoder_outputs", False) else None


# --------------------------------------------------------------------------------------------------
# Where latents live
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentCacheLocation:
    """Where a dataset's latent npz files are: beside the images (``directory`` None, kohya's names, kept
    across runs) or under ``directory`` (a per-run folder: one subfolder per dataset and image folder)."""

    is_sdxl: bool
    directory: Path | None = None

    def path_for(self, record: ImageRecord) -> Path:
        """The npz of ``record``: kohya's ``<stem>_<WWWW>x<HHHH>_sd(xl).npz`` name, in its folder."""
        beside = latent_cache_path(record.image_path, record.image_size, self.is_sdxl)
        if self.directory is None:
            return beside
        folder = hashlib.blake2b(str(record.image_path.parent).encode("utf-8"), digest_size=8).hexdigest()
        return Path(self.directory) / f"dataset{record.dataset_index}" / folder / beside.name


def latent_job_for(image_path: Path, image_size: Size, bucket: Size, *, flip: bool, alpha_mask: bool = False,
                   cache_file: Path | None = None) -> LatentJob:
    """The job for one image in one bucket: the centre crop the dataset would take, never flipped itself
    (``flip`` asks for the mirrored latent as well)."""
    plan = plan_crop(image_size, bucket, random_crop=False, flip_aug=False, rng=random.Random(0))
    return LatentJob(image_path=image_path, original_size=plan.original_size, bucket=plan.bucket,
                     resized_size=plan.resized_size, crop_left_top=plan.crop_left_top, flip=flip,
                     alpha_mask=alpha_mask, cache_file=cache_file)


def _record_job(record: ImageRecord, location: LatentCacheLocation) -> LatentJob:
    if record.bucket is None:
        raise ValueError(f"{record.image_path}: no bucket assigned (call assign_buckets first)")
    cache_file = None if location.directory is None else location.path_for(record)
    return latent_job_for(record.image_path, record.image_size, record.bucket.bucket, flip=record.subset.flip_aug,
                          alpha_mask=record.subset.alpha_mask, cache_file=cache_file)


def _grouped_jobs(index: DatasetIndex, location: LatentCacheLocation) -> tuple[dict[Path, LatentJob], list[str]]:
    """One job per cache file (flip/alpha needs merged) and the conflicts: records that share a file but
    need another bucket, resize or crop."""
    jobs: dict[Path, LatentJob] = {}
    first_user: dict[Path, ImageRecord] = {}
    conflicts: list[str] = []
    for record in index.records:
        job = _record_job(record, location)
        path = location.path_for(record)
        held = jobs.get(path)
        if held is None:
            jobs[path], first_user[path] = job, record
            continue
        if (held.bucket, held.resized_size, held.crop_left_top) != (job.bucket, job.resized_size, job.crop_left_top):
            other = first_user[path]
            conflicts.append(
                f"{record.image_path}: latent caching needs one bucket per cache file, but this image is used at "
                f"{held.bucket[0]}x{held.bucket[1]} by {other.subset.source} and at {job.bucket[0]}x{job.bucket[1]} "
                f"by {record.subset.source}; fix: use --cache_latents without --cache_latents_to_disk (one file "
                "per dataset), or copy the images to a second folder for the second dataset")
            continue
        jobs[path] = replace(held, flip=held.flip or job.flip, alpha_mask=held.alpha_mask or job.alpha_mask)
    return jobs, conflicts


def latent_jobs(index: DatasetIndex, location: LatentCacheLocation | None = None) -> list[LatentJob]:
    """One job per image (not per repeat) from its bucket and centre crop; images that several records
    share become one job needing the union of their flip/alpha. Raises ValueError on bucket conflicts
    (see :func:`check_cacheable`). Without ``location`` the npz go beside the images (the family suffix of
    the name is then chosen by ``fill_latent_cache``'s ``is_sdxl``)."""
    jobs, conflicts = _grouped_jobs(index, location if location is not None else LatentCacheLocation(False))
    if conflicts:
        raise ValueError("\n".join(conflicts))
    return list(jobs.values())


# --------------------------------------------------------------------------------------------------
# What may be cached
# --------------------------------------------------------------------------------------------------


def _without_dropout(options: CaptionOptions) -> CaptionOptions:
    """Dropout only ever yields "" (always cached), so it does not make a caption uncacheable."""
    return replace(options, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)


def _random_caption_options(options: CaptionOptions) -> list[str]:
    """The set options that make every prompt of a subset change between draws (wildcards aside)."""
    named = []
    if options.shuffle_caption:
        named.append("shuffle_caption")
    if options.token_warmup_step > 0:
        named.append("token_warmup_step")
    if options.caption_tag_dropout_rate > 0:
        named.append("caption_tag_dropout_rate")
    if options.caption_tag_mode == "random":
        named.append('caption_tag_mode = "random"')
    return named


def check_cacheable(index: DatasetIndex, cache_latents: bool, cache_text: bool,
                    location: LatentCacheLocation | None = None) -> list[str]:
    """Why the requested caches cannot be used for this dataset (empty when they can), one line per
    subset and reason, naming where the option is set and how to fix it.

    Latents: random_crop and color_aug would be frozen into the cache; with ``location``, images that need
    two buckets in one cache file are reported too. Text: any subset whose prompt can differ between draws
    (``captions.is_caption_random``, caption dropout excepted).
    """
    problems: list[str] = []
    subsets = list(dict.fromkeys(subset for dataset in index.datasets for subset in dataset.subsets))
    if cache_latents:
        for subset in subsets:
            for option, why in (("random_crop", "the crop"), ("color_aug", "the colour change")):
                if getattr(subset, option):
                    problems.append(
                        f"{subset.source}: {option} = true cannot be used with latent caching (--cache_latents / "
                        f"--cache_latents_to_disk): {why} would be frozen into the cached latent; fix: set "
                        f"{option} = false for this subset, or train without latent caching")
        if location is not None:
            problems += _grouped_jobs(index, location)[1]
    if cache_text:
        flagged: set[int] = set()
        for subset in subsets:
            named = _random_caption_options(subset.captions)
            if named:
                flagged.add(id(subset))
                problems.append(
                    f"{subset.source}: {', '.join(named)} make{'s' if len(named) == 1 else ''} the caption change "
                    "between draws, so text-encoder outputs cannot be cached (--cache_text_encoder_outputs); fix: "
                    f"turn {'it' if len(named) == 1 else 'them'} off for this subset, or train without "
                    "text-encoder output caching")
        for record in index.records:
            subset = record.subset
            if id(subset) in flagged:
                continue
            options = _without_dropout(subset.captions)
            text = merge_caption_and_tags(record.caption, record.tags, options.caption_separator,
                                          options.caption_tag_mode, random.Random(0),
                                          enable_wildcard=options.enable_wildcard)
            if is_caption_random(options, text):
                flagged.add(id(subset))
                problems.append(
                    f"{subset.source}: enable_wildcard = true and the caption of {record.image_path} has several "
                    "lines or a {a|b} choice, so it changes between draws and text-encoder outputs cannot be "
                    "cached (--cache_text_encoder_outputs); fix: turn enable_wildcard off for this subset, or "
                    "train without text-encoder output caching")
    return problems


class NotCacheableError(ValueError):
    """The dataset uses options that a requested cache would silently freeze; lists every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("cannot cache this dataset:\n" + "\n".join(f"  - {p}" for p in self.problems))


def raise_if_not_cacheable(index: DatasetIndex, cache_latents: bool, cache_text: bool,
                           location: LatentCacheLocation | None = None) -> None:
    """:func:`check_cacheable`, raising :class:`NotCacheableError` with all problems if there are any."""
    problems = check_cacheable(index, cache_latents, cache_text, location)
    if problems:
        raise NotCacheableError(problems)


# --------------------------------------------------------------------------------------------------
# Filling the latent cache
# --------------------------------------------------------------------------------------------------


def load_job_pixels(job: LatentJob, flipped: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``cache.fill_latent_cache``'s loader: the job's crop through the dataset's own image path
    (``load_image`` + ``apply_crop_plan`` + ``to_tensor``), so cached and uncached training see the same
    pixels. Returns (pixels, alpha) when the job wants the alpha mask (alpha never flipped)."""
    try:
        loaded = load_image(job.image_path, keep_alpha=job.alpha_mask)
        plan = CropPlan(original_size=job.original_size, resized_size=job.resized_size,
                        crop_left_top=job.crop_left_top, bucket=job.bucket, flipped=flipped)
        pixels = to_tensor(apply_crop_plan(loaded.rgb, plan))
        if not job.alpha_mask:
            return pixels
        alpha = mask_to_tensor(apply_crop_plan(loaded.alpha, replace(plan, flipped=False)))  # type: ignore[arg-type]
    except ImageReadError:
        raise  # names the file already, and is a one-line user error
    except Exception as error:
        raise ImageReadError(f"{job.image_path}: cannot prepare the image for latent caching "
                             f"({type(error).__name__}: {error}); it may have changed since the start-up check"
                             ) from error
    return pixels, alpha


def fill_latent_caches(index: DatasetIndex, vae: nn.Module, location: LatentCacheLocation, *, batch_size: int = 1,
                       rank: int = 0, world_size: int = 1, skip_cache_check: bool = False, seed: int | None = None,
                       load_workers: int = 0, progress: bool = True) -> LatentFillResult:
    """Encode this rank's share of the dataset's images whose npz is missing or stale.

    Raises :class:`NotCacheableError` first if the dataset cannot be cached. Work is split by image
    (``jobs[rank::world_size]``) before anything is checked, so every rank splits the same way; after all
    ranks return (a barrier) every file exists. ``skip_cache_check`` (kohya's --skip_cache_check) treats an
    existing file as valid without opening it (counted in ``skipped_valid``).
    """
    raise_if_not_cacheable(index, cache_latents=True, cache_text=False, location=location)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    share = latent_jobs(index, location)[rank::world_size]
    trusted = 0
    if skip_cache_check:
        todo = [job for job in share if not job.cache_path(location.is_sdxl).exists()]
        trusted = len(share) - len(todo)
        share = todo
    result = fill_latent_cache(share, vae, load_job_pixels, batch_size=batch_size, is_sdxl=location.is_sdxl,
                               seed=seed, load_workers=load_workers, progress=progress and rank == 0)
    return replace(result, skipped_valid=result.skipped_valid + trusted)


def latent_cache_status(index: DatasetIndex, location: LatentCacheLocation
                        ) -> list[tuple[LatentJob, Path, CacheStatus]]:
    """(job, cache file, status) per image, as training would judge it (for reports; nothing is written)."""
    jobs, _ = _grouped_jobs(index, location)
    return [(job, path, check_latent_cache(path, job)) for path, job in jobs.items()]


# --------------------------------------------------------------------------------------------------
# Text-encoder outputs
# --------------------------------------------------------------------------------------------------


def cached_prompt(record: ImageRecord) -> str:
    """The prompt ``record`` trains on whenever its caption is not dropped (deterministic for a cacheable
    subset): the dataset's own ``build_prompt`` with dropout off."""
    options = _without_dropout(record.subset.captions)
    return build_prompt(record.caption, record.tags, options, random.Random(0), 1, 0, 0)


def dataset_prompts(index: DatasetIndex) -> list[str]:
    """The distinct prompts of the dataset, in record order ("" for dropout is added by the cache fill)."""
    return list(dict.fromkeys(cached_prompt(record) for record in index.records))


def default_text_cache_dir(datasets: Sequence[DatasetConfig]) -> Path:
    """``<first subset's image_dir>/.te_cache`` (else beside its metadata file): next to the data it
    describes, hidden so folder scans skip it, and the same for the caching tool and for training."""
    for dataset in datasets:
        for subset in dataset.subsets:
            if subset.image_dir is not None:
                return Path(subset.image_dir) / TEXT_CACHE_FOLDER
            if subset.metadata_file is not None:
                return Path(subset.metadata_file).parent / TEXT_CACHE_FOLDER
    raise ValueError("no subset with an image_dir or metadata_file: pass --text_encoder_cache_dir")


def open_text_cache(prompt_encoder: PromptEncoder, cache_dir: str | Path, model_id: str | None = None,
                    storage_dtype: str = "float16") -> TextEncoderOutputCache:
    """The cache for this encoder's identity (tokenizers, max_token_length, clip_skip, weights or
    ``model_id``) under ``cache_dir``: a different model or setting simply has no entries."""
    return TextEncoderOutputCache(cache_dir, text_encoder_cache_identity(prompt_encoder, model_id),
                                  storage_dtype=storage_dtype)


def fill_text_cache(index: DatasetIndex, prompt_encoder: PromptEncoder, cache_dir: str | Path, *,
                    batch_size: int = 8, rank: int = 0, world_size: int = 1, model_id: str | None = None,
                    storage_dtype: str = "float16", progress: bool = True) -> TextEncoderOutputCache:
    """Encode the dataset's missing prompts (this rank's share) and return the flushed cache, ready to give
    to TrainingDataset (and its workers). With several ranks, call ``refresh()`` on it after a barrier.

    Raises :class:`NotCacheableError` if a subset's prompt can change between draws.
    """
    raise_if_not_cacheable(index, cache_latents=False, cache_text=True)
    cache = open_text_cache(prompt_encoder, cache_dir, model_id, storage_dtype)
    fill_text_encoder_cache(dataset_prompts(index), prompt_encoder, cache, batch_size=batch_size, rank=rank,
                            world_size=world_size, progress=progress)
    return cache
