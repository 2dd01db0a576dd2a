"""Checked image records -> the torch Dataset that yields one training sample per index, and batches.

One image's path from its file to a batch::

    index = load_dataset_index(dataset_configs, min_step=32)      # library.records; raises DatasetProblems
    inputs = build_bucket_sampler_inputs(index)                    # bucket key per sample index
    sampler = KeyedBatchSampler(BucketBatchSampler(inputs.bucket_keys, inputs.batch_size, seed))
    dataset = TrainingDataset(index, seed, max_train_steps)        # + latent_cache= / text_cache= (optional,
                                                                   #   filled by library.dataset_caching)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=n)
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch, first_step=global_step)
        for batch in loader: ...                                   # dict, see collate_samples

Epoch and step reach DataLoader workers inside the indices: :class:`KeyedBatchSampler` (iterated in the
main process) turns each batch of ints into :class:`SampleKey` (index, epoch, step) items, and every
random choice of a sample (caption shuffle/dropout, crop, flip, colour) comes from a ``random.Random``
seeded with (seed, epoch, index). No shared mutable state, and a batch is identical for any num_workers.
kohya instead pushes epoch/step into workers through ``multiprocessing.Value`` s read by the collator.

Multiple datasets: a batch never mixes datasets (the bucket key starts with the dataset's position), and
all datasets must have the same ``batch_size`` (:func:`build_bucket_sampler_inputs` raises otherwise):
``BucketBatchSampler`` takes one batch size, and per-dataset batch sizes would also make the number of
images per optimizer step vary between steps, which changes the effective learning rate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from library.cache.storage import CachedLatents, TextEncoderOutputCache, load_cached_latents
from library.data.captions import build_prompt
from library.cache.dataset_caching import LatentCacheLocation, raise_if_not_cacheable
from library.data.dataset_config import DatasetConfigError
from library.data.images import (
    CropPlan,
    apply_crop_plan,
    color_jitter,
    load_image,
    load_rgb,
    mask_to_tensor,
    plan_crop,
    to_tensor,
)
from library.data.records import DatasetIndex, ImageRecord

logger = logging.getLogger(__name__)



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

    All datasets must share one batch_size (see the module docstring for why); raises DatasetConfigError
    naming them otherwise.
    """
    sizes = {dataset.batch_size for dataset in index.datasets}
    if len(sizes) > 1:
        listed = ", ".join(f"{d.source}: {d.batch_size}" for d in index.datasets)
        raise DatasetConfigError(f"all datasets must have the same batch_size for now ({listed}); set one batch_size "
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


ConditioningFilter = Callable[[Image.Image], Image.Image]


def conditioning_image(record: ImageRecord, plan: CropPlan, conditioning_filter: ConditioningFilter | None = None,
                       cropped_target: Image.Image | None = None) -> torch.Tensor | None:
    """The ControlNet condition of one draw, pixel-aligned with the target: the record's conditioning image
    under the target's own crop plan, or ``conditioning_filter`` applied to the cropped target itself."""
    if conditioning_filter is not None:
        target = cropped_target if cropped_target is not None else apply_crop_plan(load_rgb(record.image_path), plan)
        return to_tensor(conditioning_filter(target))
    if record.conditioning_path is not None:
        return to_tensor(apply_crop_plan(load_rgb(record.conditioning_path), plan))
    return None


def load_sample_pixels(record: ImageRecord, rng: random.Random, conditioning_filter: ConditioningFilter | None = None
                       ) -> tuple[torch.Tensor, CropPlan, torch.Tensor | None, torch.Tensor | None]:
    """Decode and transform one record's image (and its mask and conditioning image with the same plan)."""
    if record.bucket is None:
        raise ValueError(f"{record.image_path}: no bucket assigned")
    subset = record.subset
    loaded = load_image(record.image_path, keep_alpha=subset.alpha_mask)
    plan = plan_crop(loaded.rgb.size, record.bucket.bucket, random_crop=subset.random_crop,
                     flip_aug=subset.flip_aug, rng=rng)
    image = apply_crop_plan(loaded.rgb, plan)
    cond = conditioning_image(record, plan, conditioning_filter, cropped_target=image)
    if subset.color_aug:
        image = color_jitter(image, rng)
    mask = mask_to_tensor(apply_crop_plan(loaded.alpha, plan)) if loaded.alpha is not None else None
    return to_tensor(image), plan, mask, cond


def load_sample_latents(record: ImageRecord, location: LatentCacheLocation, rng: random.Random,
                        conditioning_filter: ConditioningFilter | None = None
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
    return cached, plan, conditioning_image(record, plan, conditioning_filter)


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
                 text_cache: TextEncoderOutputCache | None = None,
                 conditioning_filter: ConditioningFilter | None = None) -> None:
        """``max_train_steps``: the planned total, for a fractional token_warmup_step; ``conditioning_filter``
        computes each ControlNet condition from the cropped target (``library.conditioning``)."""
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
        self.conditioning_filter = conditioning_filter

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
            pixels, plan, mask, cond = load_sample_pixels(record, rng, self.conditioning_filter)
        else:
            cached, plan, cond = load_sample_latents(record, self.latent_cache, rng, self.conditioning_filter)
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
