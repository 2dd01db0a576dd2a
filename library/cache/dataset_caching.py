"""Plan and fill the latent and text-encoder-output caches of a DatasetIndex, for TrainingDataset to read.

The order at start-up::

    location = LatentCacheLocation(model.family)                     # npz beside the images (kohya's place)
    raise_if_not_cacheable(index, cache_latents=True, cache_text=True,  # library.data.cacheable, before any model
                           latent_conflicts=location.conflicts(index))
    fill_latent_caches(index, vae, location, batch_size=vae_batch_size, rank=r, world_size=n)
    text_cache = fill_text_cache(index, prompt_encoder, default_text_cache_dir(index.datasets))
    dataset = TrainingDataset(index, seed, latent_cache=location, text_cache=text_cache)

Latents are encoded once per image (not per repeat) from the deterministic centre crop of the image's bucket
(``images.plan_crop`` with ``random_crop=False``); with flip_aug the mirrored crop is encoded as well and
stored as ``latents_flipped``, and each draw picks one of the two with the sample's seeded flip, exactly the
decision the pixel path would make. Text-encoder outputs are cached per final prompt text (see
``text_encoder_files.TextEncoderOutputCache``), so a record's entry is found from the caption the dataset builds.

The two modes of each cache (``library.cli.data_args.latent_cache_mode`` / ``text_cache_mode`` read the kohya
flags):

* ``"disk"`` (``--cache_latents_to_disk``, ``--cache_text_encoder_outputs_to_disk``): latents as kohya npz
  files beside the images, text outputs in ``--text_encoder_cache_dir`` (default
  :func:`default_text_cache_dir`); both are reused by later runs (and the npz by kohya).
* ``"run"`` (``--cache_latents``, ``--cache_text_encoder_outputs`` alone): kohya keeps these in RAM. We write
  the very same files into a folder the caller owns for this run only (e.g. a ``TemporaryDirectory``) and
  read them back per sample. Process RAM then stays constant however large the dataset (the OS page cache
  keeps hot files in memory anyway), DataLoader workers read them without copying a dict of every latent
  into each worker, and the dataset code has one cache path instead of two. Each dataset gets its own
  subfolder, so one image used by two datasets at two resolutions gets two files.

Where this differs from kohya:

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

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from library.data.buckets import Size
from library.cache.latent_files import (
    CacheStatus,
    LatentFillResult,
    LatentJob,
    check_latent_cache,
    fill_latent_cache,
    latent_cache_path,
    load_cached_latents,
)
from library.cache.text_encoder_files import TextEncoderOutputCache, fill_text_encoder_cache, text_encoder_cache_identity
from library.data.cacheable import raise_if_not_cacheable, without_dropout
from library.data.captions import build_prompt
from library.data.dataset_config import DatasetConfig
from library.data.images import (CropPlan, ImageReadError, apply_crop_plan, draft_bucket, load_image, mask_to_tensor,
                                 plan_crop, to_tensor)
from library.data.datasets import CachedLatents
from library.data.records import DatasetIndex, ImageRecord
from library.data.sharding import rank_share
from library.models.families import SD1, ModelFamily
from library.models.text_encoding import PromptEncoder


CacheMode = Literal["disk", "run"]
TEXT_CACHE_FOLDER = ".te_cache"


# --------------------------------------------------------------------------------------------------
# Where latents live
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentCacheLocation:
    """Where a dataset's latent npz files are: beside the images (``directory`` None, kohya's names, kept
    across runs) or under ``directory`` (a per-run folder: one subfolder per dataset and image folder)."""

    family: ModelFamily  # its latent_cache_suffix ends the npz names
    directory: Path | None = None

    def path_for(self, record: ImageRecord) -> Path:
        """The npz of ``record``: kohya's ``<stem>_<WWWW>x<HHHH>_sd(xl).npz`` name, in its folder."""
        beside = latent_cache_path(record.image_path, record.image_size, self.family)
        if self.directory is None:
            return beside
        folder = hashlib.blake2b(str(record.image_path.parent).encode("utf-8"), digest_size=8).hexdigest()
        return Path(self.directory) / f"dataset{record.dataset_index}" / folder / beside.name

    def load(self, record: ImageRecord, *, flipped: bool) -> CachedLatents:
        """The cached latents of ``record`` (the mirrored ones when ``flipped``), for TrainingDataset."""
        path = self.path_for(record)
        try:
            return load_cached_latents(path, flipped=flipped)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no cached latents for {record.image_path}; fill the cache first "
                                    "(dataset_caching.fill_latent_caches)") from None

    def conflicts(self, index: DatasetIndex) -> list[str]:
        """Images that two records need at different buckets/crops but that share one cache file here."""
        return _grouped_jobs(index, self)[1]


def latent_job_for(image_path: Path, image_size: Size, bucket: Size, *, flip: bool, alpha_mask: bool = False,
                   cache_file: Path | None = None, interpolation: str | None = None) -> LatentJob:
    """The job for one image in one bucket: the centre crop the dataset would take, never flipped itself
    (``flip`` asks for the mirrored latent as well)."""
    plan = plan_crop(image_size, bucket, random_crop=False, flip_aug=False, rng=random.Random(0))
    return LatentJob(image_path=image_path, original_size=plan.original_size, bucket=plan.bucket,
                     resized_size=plan.resized_size, crop_left_top=plan.crop_left_top, flip=flip,
                     alpha_mask=alpha_mask, cache_file=cache_file, interpolation=interpolation)


def _record_job(record: ImageRecord, location: LatentCacheLocation) -> LatentJob:
    if record.bucket is None:
        raise ValueError(f"{record.image_path}: no bucket assigned (call assign_buckets first)")
    cache_file = None if location.directory is None else location.path_for(record)
    return latent_job_for(record.image_path, record.image_size, record.bucket.bucket, flip=record.subset.flip_aug,
                          alpha_mask=record.subset.alpha_mask, cache_file=cache_file,
                          interpolation=record.subset.resize_interpolation)


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
    (see :meth:`LatentCacheLocation.conflicts`). Without ``location`` the npz go beside the images (the family suffix of
    the name is then chosen by ``fill_latent_cache``'s ``family``)."""
    # without a location any family's names group the records alike: only the suffix differs
    jobs, conflicts = _grouped_jobs(index, location if location is not None else LatentCacheLocation(SD1))
    if conflicts:
        raise ValueError("\n".join(conflicts))
    return list(jobs.values())


# --------------------------------------------------------------------------------------------------
# Filling the latent cache
# --------------------------------------------------------------------------------------------------


def load_job_pixels(job: LatentJob, flipped: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``latent_files.fill_latent_cache``'s loader: the job's crop through the dataset's own image path
    (``load_image`` + ``apply_crop_plan`` + ``to_tensor``), so cached and uncached training see the same
    pixels. Returns (pixels, alpha) when the job wants the alpha mask (alpha never flipped)."""
    try:
        plan = CropPlan(original_size=job.original_size, resized_size=job.resized_size,
                        crop_left_top=job.crop_left_top, bucket=job.bucket, flipped=flipped,
                        interpolation=job.interpolation)
        # reduced JPEG decoding exactly when training without the cache does it, for the same pixels
        loaded = load_image(job.image_path, keep_alpha=job.alpha_mask, cover_bucket=draft_bucket(plan))
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
    raise_if_not_cacheable(index, cache_latents=True, cache_text=False, latent_conflicts=location.conflicts(index))
    share = rank_share(latent_jobs(index, location), rank=rank, world_size=world_size)
    trusted = 0
    if skip_cache_check:
        todo = [job for job in share if not job.cache_path(location.family).exists()]
        trusted = len(share) - len(todo)
        share = todo
    result = fill_latent_cache(share, vae, load_job_pixels, batch_size=batch_size, family=location.family,
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
    options = without_dropout(record.subset.captions)
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
