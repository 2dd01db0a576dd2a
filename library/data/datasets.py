"""Checked image records -> the torch Dataset that yields one training sample per index, and batches.

One image's path from its file to a batch::

    index = load_dataset_index(dataset_configs, min_step=32)      # library.data.dataset_index
    inputs = build_bucket_sampler_inputs(index)                    # bucket key per sample index
    sampler = make_batch_sampler(inputs, seed, rank=r, world_size=n)   # bucketed, rank-sharded
    dataset = TrainingDataset(index, seed, max_train_steps)        # + latent_cache= / text_cache= (optional,
                                                                   #   filled by library.cache.dataset_caching)
    loader = make_loader(dataset, sampler, num_workers=workers)
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch, first_step=global_step)
        for batch in loader: ...                                   # a Batch, see collate_samples

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from library.data.buckets import BucketBatchSampler, SamplerSummary
from library.data.captions import build_prompt
from library.data.cacheable import raise_if_not_cacheable
from library.data.dataset_config import DatasetConfigError
from library.data.images import (
    CropPlan,
    apply_crop_plan,
    color_jitter,
    crop_plan_array,
    draft_bucket,
    load_image,
    load_rgb,
    mask_to_tensor,
    plan_crop,
    plan_face_crop,
    face_in_file_name,
    to_uint8_tensor,
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
    buckets = [record.bucket for record in index.records]
    if any(bucket is None for bucket in buckets):
        raise ValueError("records have no bucket yet: call assign_buckets (or build_dataset_index) first")
    keys = [BucketKey(index.records[p].dataset_index, *bucket.bucket)
            for p in expand_repeats(index.records) if (bucket := buckets[p]) is not None]
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

    def __init__(self, batch_sampler: BucketBatchSampler | Sequence[list[int]], batches_per_step: int = 1) -> None:
        """``batches_per_step``: gradient accumulation steps (batches per optimizer step); a plain list of
        batches is accepted for tests (it has no epochs and cannot resume)."""
        if batches_per_step < 1:
            raise ValueError(f"batches_per_step must be >= 1, got {batches_per_step}")
        self.batch_sampler = batch_sampler
        self.batches_per_step = batches_per_step
        self.epoch = 1
        self.first_step = 0

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Start ``epoch`` (from 1) whose first yielded batch is trained at global step ``first_step``;
        forwards the epoch to the wrapped bucket sampler."""
        self.epoch, self.first_step = epoch, first_step
        if isinstance(self.batch_sampler, BucketBatchSampler):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, first_step, per_step = self.epoch, self.first_step, self.batches_per_step
        for position, batch in enumerate(self.batch_sampler):
            step = first_step + position // per_step
            yield [SampleKey(int(index), epoch, step) for index in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _buckets(self) -> BucketBatchSampler:
        if not isinstance(self.batch_sampler, BucketBatchSampler):
            raise TypeError("only a BucketBatchSampler can save and resume its position")
        return self.batch_sampler

    def summary(self) -> SamplerSummary:
        """The wrapped bucket sampler's counts (for the start-up printout and the plan)."""
        return self._buckets().summary()

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """The wrapped sampler's state (for resuming)."""
        return self._buckets().state_dict(batches_done)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the wrapped sampler at this rank's ``batches_done`` or, when given, at ``global_batches_done``
        of the epoch's global order (a state saved on another process count)."""
        self._buckets().load_state_dict(state)


def sample_rng(seed: int, epoch: int, index: int, purpose: str) -> random.Random:
    """The generator for one draw of one sample; ``purpose`` separates streams ("caption", "image") so
    turning on colour augmentation does not change the captions."""
    return random.Random(f"{seed}:{epoch}:{index}:{purpose}")


# --------------------------------------------------------------------------------------------------
# The Dataset
# --------------------------------------------------------------------------------------------------


@dataclass
class CachedLatents:
    """A cached latent and the SDXL size conditioning that belongs to exactly that latent. Sizes are (h, w).

    ``latents`` are unscaled (multiply by the VAE scaling factor); ``crop_top_left`` is already mirrored
    when ``flipped``; ``alpha_mask`` (H, W) is flipped with the latent.
    """

    latents: torch.Tensor
    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size_hw: tuple[int, int]
    flipped: bool
    alpha_mask: torch.Tensor | None = None


class LatentCache(Protocol):
    """Cached latents per record, filled before training (``library.cache.dataset_caching.LatentCacheLocation``)."""

    def load(self, record: ImageRecord, *, flipped: bool) -> CachedLatents: ...

    def conflicts(self, index: DatasetIndex) -> list[str]:
        """Images that would need two buckets in one cache file (why this dataset cannot use the cache)."""
        ...


class TextCache(Protocol):
    """Cached text-encoder outputs by prompt (``library.cache.text_encoder_files.TextEncoderOutputCache``)."""

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Sample:
    """One training sample, before collation.

    With a latent cache, ``pixel_values`` is None and ``cached`` holds the latents with the SDXL size
    conditioning of the crop they were made from; ``plan`` is then the centre crop and this draw's flip
    (what a conditioning image is cropped with).
    """

    pixel_values: torch.Tensor | None  # (3, H, W) uint8 (library.data.pixels.normalize_pixels); None if cached
    caption: str
    plan: CropPlan
    is_reg: bool
    image_path: str
    alpha_mask: torch.Tensor | None  # (H, W) in [0, 1]
    conditioning_pixel_values: torch.Tensor | None  # (3, H, W) uint8, like pixel_values
    cached: CachedLatents | None = None  # from the latent cache
    text_hidden_states: torch.Tensor | None = None  # (L, D) from the text-encoder output cache
    text_pooled: torch.Tensor | None = None  # (P,) SDXL only
    network_multiplier: float = 1.0  # its dataset's network_multiplier (kohya's per-dataset key)


ConditioningFilter = Callable[[Image.Image], Image.Image]


def conditioning_image(record: ImageRecord, plan: CropPlan, conditioning_filter: ConditioningFilter | None = None,
                       cropped_target: Image.Image | None = None) -> torch.Tensor | None:
    """The ControlNet condition of one draw as uint8 (3, H, W), pixel-aligned with the target: the record's
    conditioning image under the target's own crop plan, or ``conditioning_filter`` applied to the cropped
    target itself."""
    if conditioning_filter is not None:
        target = cropped_target if cropped_target is not None else apply_crop_plan(
            load_rgb(record.image_path, cover_bucket=draft_bucket(plan)), plan)
        return to_uint8_tensor(conditioning_filter(target))
    if record.conditioning_path is not None:
        condition = load_rgb(record.conditioning_path, cover_bucket=draft_bucket(plan))
        return to_uint8_tensor(crop_plan_array(condition, plan))
    return None


def load_sample_pixels(record: ImageRecord, rng: random.Random, conditioning_filter: ConditioningFilter | None = None
                       ) -> tuple[torch.Tensor, CropPlan, torch.Tensor | None, torch.Tensor | None]:
    """Decode and transform one record's image (and its mask and conditioning image with the same plan).

    Pixels come back as uint8 (3, H, W) (``to_uint8_tensor``): the float conversion happens on the device
    (``library.data.pixels.normalize_pixels``). A large JPEG is decoded reduced (``load_image``'s
    ``cover_bucket``), except for face crops, whose plan may keep more pixels than the bucket needs.
    """
    if record.bucket is None:
        raise ValueError(f"{record.image_path}: no bucket assigned")
    subset = record.subset
    bucket = record.bucket.bucket
    face = face_in_file_name(record.image_path) if subset.face_crop_aug_range else None
    loaded = load_image(record.image_path, keep_alpha=subset.alpha_mask, cover_bucket=None if face else bucket)
    if face is not None and subset.face_crop_aug_range is not None:
        plan = plan_face_crop(loaded.original_size, bucket, face=face, aug_range=subset.face_crop_aug_range,
                              random_crop=subset.random_crop, flip_aug=subset.flip_aug, rng=rng,
                              interpolation=subset.resize_interpolation)
    else:
        plan = plan_crop(loaded.original_size, bucket, random_crop=subset.random_crop,
                         flip_aug=subset.flip_aug, rng=rng, interpolation=subset.resize_interpolation)
    pixels = crop_plan_array(loaded.rgb, plan)
    cond = None
    if conditioning_filter is not None or record.conditioning_path is not None:
        cond = conditioning_image(record, plan, conditioning_filter, cropped_target=Image.fromarray(pixels))
    if subset.color_aug:
        pixels = color_jitter(Image.fromarray(pixels), rng)
    mask = mask_to_tensor(apply_crop_plan(loaded.alpha, plan)) if loaded.alpha is not None else None
    return to_uint8_tensor(pixels), plan, mask, cond


def load_sample_latents(record: ImageRecord, cache: LatentCache, rng: random.Random,
                        conditioning_filter: ConditioningFilter | None = None
                        ) -> tuple[CachedLatents, CropPlan, torch.Tensor | None]:
    """The cached latents of one draw (the flipped ones when this draw flips) and the conditioning image
    cropped to match. The flip comes from the same ``plan_crop`` draw as the pixel path makes, so a seed
    flips the same samples with and without the cache."""
    if record.bucket is None:
        raise ValueError(f"{record.image_path}: no bucket assigned")
    plan = plan_crop(record.image_size, record.bucket.bucket, random_crop=False, flip_aug=record.subset.flip_aug,
                     rng=rng, interpolation=record.subset.resize_interpolation)
    return cache.load(record, flipped=plan.flipped), plan, conditioning_image(record, plan, conditioning_filter)


class TrainingDataset(Dataset):
    """Map-style dataset over sample indices (records with repeats expanded), fetched by SampleKey.

    Each fetch builds the prompt (``build_prompt`` with the subset's CaptionOptions) and the pixels;
    randomness comes only from (seed, epoch, index), so any worker count gives the same samples.
    An int index is accepted too (epoch 1, step 0), for inspection.

    ``latent_cache``: read latents from these npz files instead of decoding images; ``text_cache``: attach
    the text-encoder outputs of each sample's prompt. Both are read in the worker, and both must have been
    filled first (``library.cache.dataset_caching``); options the caches would freeze are refused here too.
    """

    def __init__(self, index: DatasetIndex, seed: int, max_train_steps: int = 0, *,
                 latent_cache: LatentCache | None = None, text_cache: TextCache | None = None,
                 conditioning_filter: ConditioningFilter | None = None) -> None:
        """``max_train_steps``: the planned total, for a fractional token_warmup_step; ``conditioning_filter``
        computes each ControlNet condition from the cropped target (``library.data.conditioning``)."""
        index.raise_for_problems()
        if any(record.bucket is None for record in index.records):
            raise ValueError("records have no bucket yet: call assign_buckets (or build_dataset_index) first")
        if latent_cache is not None or text_cache is not None:
            conflicts = latent_cache.conflicts(index) if latent_cache is not None else []
            raise_if_not_cacheable(index, latent_cache is not None, text_cache is not None, conflicts)
        self.records = index.records
        self.network_multipliers = tuple(dataset.network_multiplier for dataset in index.datasets)
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
                      cached=cached, text_hidden_states=hidden, text_pooled=pooled,
                      network_multiplier=self.network_multipliers[record.dataset_index])


def _long(rows: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), 2)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, written straight into shared memory inside a DataLoader worker (as torch's default
    collate does): the batch is not copied again to cross to the main process, and no batch-sized buffer goes
    through the worker's malloc heap, where freed 10-30 MB blocks would stay resident."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(list(tensors))
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.numel() * first.element_size())
    out = first.new(storage).view(len(tensors), *first.shape)
    return torch.stack(list(tensors), out=out)


def _all_or_none(values: Sequence[torch.Tensor | None], what: str) -> torch.Tensor | None:
    """Stack when every sample has the tensor, None when none has; a mix is a bug upstream."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) != len(values):
        raise ValueError(f"some samples of the batch have {what} and some do not")
    return _stack(present)


@dataclass(frozen=True)
class Batch:
    """One bucket's samples stacked: what the training step reads.

    Exactly one of ``pixel_values`` (B,3,H,W) uint8 (``library.data.pixels.normalize_pixels`` gives the VAE's
    [-1, 1] on the device; float pixels already in [-1, 1] are accepted too) and ``latents`` (B,C,H/8,W/8)
    float32, unscaled (multiply by the VAE scaling factor) is set. The SDXL size conditioning is (B,2) long in (h, w) /
    (top, left) order (from the cache file with cached latents). ``alpha_masks`` (B,H,W) holds ones for
    samples without a mask when others have one. ``text_hidden_states`` (B,L,D) and ``text_pooled`` (B,P)
    (SDXL) come from the text-encoder cache. ``network_multipliers`` (B,) float32 holds each sample's dataset
    ``network_multiplier`` (kohya's batch key of the same name); the bucket sampler never mixes datasets in a
    batch, so its values are equal. None (a batch built by hand) means 1.0.
    """

    captions: list[str]
    image_paths: list[str]
    original_sizes_hw: torch.Tensor
    crop_top_lefts: torch.Tensor
    target_sizes_hw: torch.Tensor
    flipped: torch.Tensor  # (B,) bool
    is_reg: torch.Tensor  # (B,) bool
    pixel_values: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    alpha_masks: torch.Tensor | None = None
    conditioning_pixel_values: torch.Tensor | None = None  # (B,3,H,W) uint8, like pixel_values
    text_hidden_states: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    network_multipliers: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def network_multiplier(self) -> float:
        """The one network multiplier of this batch; a batch mixing multipliers is refused (as kohya does):
        the network applies one multiplier to the whole forward pass."""
        if self.network_multipliers is None:
            return 1.0
        values = sorted(set(self.network_multipliers.tolist()))
        if len(values) != 1:
            raise ValueError(f"a batch mixes network multipliers {values}: batches must come from one dataset "
                             "(use the bucket batch sampler)")
        return float(values[0])


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """Stack one bucket's samples into a :class:`Batch`; raises when they differ in size or in what they carry."""
    if not samples:
        raise ValueError("empty batch")
    cached = [sample.cached for sample in samples if sample.cached is not None]
    if cached and len(cached) != len(samples):
        raise ValueError("some samples of the batch have cached latents and some do not")
    pixels = [sample.pixel_values for sample in samples if sample.pixel_values is not None]
    geometry: Sequence[CachedLatents | CropPlan] = cached if cached else [sample.plan for sample in samples]
    shapes = {tuple(t.shape) for t in ([c.latents for c in cached] if cached else pixels)}
    if len(shapes) != 1:
        raise ValueError(f"a batch must hold one bucket size, got {sorted(shapes)}: use the bucket batch sampler")
    height, width = geometry[0].target_size_hw
    masks = None
    if any(sample.alpha_mask is not None for sample in samples):
        masks = torch.stack([s.alpha_mask if s.alpha_mask is not None else torch.ones(height, width)
                             for s in samples])
    return Batch(
        pixel_values=None if cached else _stack(pixels),
        latents=torch.stack([c.latents for c in cached]) if cached else None,
        captions=[sample.caption for sample in samples],
        original_sizes_hw=_long([g.original_size_hw for g in geometry]),
        crop_top_lefts=_long([g.crop_top_left for g in geometry]),
        target_sizes_hw=_long([g.target_size_hw for g in geometry]),
        flipped=torch.tensor([g.flipped for g in geometry], dtype=torch.bool),
        is_reg=torch.tensor([sample.is_reg for sample in samples], dtype=torch.bool),
        alpha_masks=masks,
        conditioning_pixel_values=_all_or_none([s.conditioning_pixel_values for s in samples], "a conditioning image"),
        text_hidden_states=_all_or_none([s.text_hidden_states for s in samples], "cached text-encoder outputs"),
        text_pooled=_all_or_none([s.text_pooled for s in samples], "cached pooled text-encoder outputs"),
        image_paths=[sample.image_path for sample in samples],
        network_multipliers=torch.tensor([sample.network_multiplier for sample in samples], dtype=torch.float32),
    )


def make_batch_sampler(inputs: SamplerInputs, seed: int, *, rank: int = 0, world_size: int = 1,
                       batches_per_step: int = 1) -> KeyedBatchSampler:
    """This rank's bucketed batches of the dataset, each carrying its epoch and step to the workers."""
    buckets = BucketBatchSampler(inputs.bucket_keys, inputs.batch_size, seed, world_size=world_size, rank=rank,
                                 batches_per_step=batches_per_step)
    return KeyedBatchSampler(buckets, batches_per_step=batches_per_step)


def make_loader(dataset: TrainingDataset, sampler: KeyedBatchSampler, *, num_workers: int = 0,
                persistent_workers: bool = False) -> DataLoader:
    """The DataLoader over ``dataset`` that yields one :class:`Batch` per batch of ``sampler``."""
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=num_workers,
                      persistent_workers=persistent_workers and num_workers > 0)
