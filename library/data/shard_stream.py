"""Streamed webdataset shards -> single-bucket training batches, with the loop's sampler surface.

    source = ShardSource(units, subsets, ...)                       # library.data.shard_config builds it
    layout = plan_layout(source.units, world_size=n, workers=w, batch_size=b)   # from index.json only
    dataset = ShardStreamDataset(source, layout, rank=r, seed=s)
    control = ShardBatchControl(dataset)                            # set_epoch / state_dict / load_state_dict
    loader = make_shard_loader(dataset, control, num_workers=w)     # yields Batch, like the folder loader

Each (rank, worker) stream reads its own shards (``library.data.shard_plan``) through webdataset's pipeline
(``SimpleShardList`` -> ``tarfile_to_samples``: local paths, URLs and ``pipe:`` commands), in an order and
with a shuffle drawn only from (seed, epoch, stream). Samples wait, still encoded, in a bucket-aware shuffle
buffer (one list per bucket; when the buffer is full a random bucket that holds a whole batch gives a random
batch), so memory is bounded by the buffer whatever the dataset size. Only the batches a worker yields are
decoded: resuming mid-epoch runs the same stream without decoding up to the first batch not yet trained.

A yielded batch goes through the folder datasets' own pieces: ``build_prompt`` with the subset's
CaptionOptions, ``plan_crop`` / ``apply_crop_plan`` / ``color_jitter`` / ``to_tensor``, and
``collate_samples``; the shard's latents and text-encoder outputs are used when the run allows them.
"""

from __future__ import annotations

import io
import json
import logging
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from library.data.buckets import BucketStats, SamplerSummary
from library.data.captions import build_prompt
from library.data.dataset_config import SubsetConfig
from library.data.datasets import Batch, Sample, collate_samples, sample_rng
from library.data.images import (CropPlan, apply_crop_plan, color_jitter, crop_plan_array, load_image, mask_to_tensor,
                                 plan_crop, to_uint8_tensor)
from library.data.shard_plan import BucketKey, EpochLayout, ShardUnit

logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 256
"""Samples (still encoded) a stream holds for shuffling; raised when needed to always hold a whole batch."""
_SUBSET_STRIDE = 10**10  # sample numbers of different subsets never share a random stream


@dataclass(frozen=True)
class ShardSource:
    """The shards to stream and how to read them (picklable: it travels to the DataLoader workers)."""

    units: tuple[ShardUnit, ...]
    subsets: tuple[SubsetConfig, ...]  # indexed by ShardUnit.subset
    network_multipliers: tuple[float, ...]  # per dataset
    use_latents: bool = False  # train on the shards' latents (checked against this run at start-up)
    use_text: bool = False  # use the shards' text-encoder outputs (checked likewise)


@dataclass(frozen=True)
class _Raw:
    """One sample as read from the tar: its unit and webdataset fields, nothing decoded but the json."""

    unit: int
    fields: Mapping[str, Any]
    key: BucketKey


class BucketShuffleBuffer:
    """Per-bucket lists of waiting samples; a batch leaves when the buffer is full, from a random bucket holding
    a whole batch, so batches are single-bucket and every bucket yields ceil(n / batch_size) batches."""

    def __init__(self, batch_size: int, capacity: int, rng: random.Random) -> None:
        self.batch_size, self.capacity, self.rng = batch_size, capacity, rng
        self.waiting: dict[BucketKey, list[_Raw]] = {}
        self.size = 0

    def add(self, item: _Raw) -> list[_Raw] | None:
        self.waiting.setdefault(item.key, []).append(item)
        self.size += 1
        if self.size < self.capacity:
            return None
        full = [key for key, items in self.waiting.items() if len(items) >= self.batch_size]
        return self._take(self.rng.choice(full), self.batch_size)

    def _take(self, key: BucketKey, count: int) -> list[_Raw]:
        items = self.waiting[key]
        chosen = sorted(self.rng.sample(range(len(items)), count))
        batch, taken = [items[i] for i in chosen], set(chosen)
        self.waiting[key] = [item for i, item in enumerate(items) if i not in taken]
        self.size -= count
        return batch

    def drain(self) -> list[list[_Raw]]:
        """What is left, as batches (at most one short batch per bucket) in random order."""
        batches = []
        for key in sorted(self.waiting):
            while self.waiting[key]:
                batches.append(self._take(key, min(self.batch_size, len(self.waiting[key]))))
        self.rng.shuffle(batches)
        return batches


def _read_units(source: ShardSource, units: Sequence[int]) -> Iterator[_Raw]:
    """The samples of ``units`` in that order, through webdataset's shard list and tar reader."""
    import webdataset as wds

    for position in units:
        unit = source.units[position]
        pipeline = wds.DataPipeline(wds.SimpleShardList([unit.url]),
                                    wds.tarfile_to_samples(handler=wds.reraise_exception))
        for fields in pipeline:
            meta = json.loads(fields["json"])
            width, height = meta["bucket"]
            yield _Raw(position, fields, (unit.dataset, int(width), int(height)))


def stream_batches(source: ShardSource, layout: EpochLayout, stream: int, *, seed: int, epoch: int,
                   shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> Iterator[list[_Raw]]:
    """The real batches of one stream in one epoch, undecoded; the same for the same (seed, epoch, stream)."""
    plan = layout.streams[stream]
    rng = random.Random(f"shard-stream:{seed}:{epoch}:{stream}")
    units = list(plan.units)
    rng.shuffle(units)
    keys = {key for position in units for key, _ in source.units[position].buckets}
    # At least one bucket always holds a whole batch once the buffer is full (pigeonhole).
    capacity = max(shuffle_buffer, len(keys) * (layout.batch_size - 1) + 1)
    buffer = BucketShuffleBuffer(layout.batch_size, capacity, rng)
    for raw in _read_units(source, units):
        batch = buffer.add(raw)
        if batch is not None:
            yield batch
    yield from buffer.drain()


def worker_batches(source: ShardSource, layout: EpochLayout, stream: int, *, seed: int, epoch: int,
                   shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> Iterator[list[_Raw]]:
    """A stream's batches followed by its padding: the first batches of its padding source, again."""
    plan = layout.streams[stream]
    yield from stream_batches(source, layout, stream, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer)
    left = plan.padding
    while left > 0:
        for batch in stream_batches(source, layout, plan.padding_source, seed=seed, epoch=epoch,
                                    shuffle_buffer=shuffle_buffer):
            yield batch
            left -= 1
            if left == 0:
                break


def _sample_number(raw: _Raw, source: ShardSource) -> int:
    key = str(raw.fields.get("__key__", ""))
    number = int(key[1:]) if key[:1] == "s" and key[1:].isdigit() else zlib.crc32(key.encode("utf-8"))
    return source.units[raw.unit].subset * _SUBSET_STRIDE + number


def shard_sample_pixels(image: bytes, name: str, bucket: tuple[int, int], subset: SubsetConfig, rng: random.Random
                        ) -> tuple[torch.Tensor, CropPlan, torch.Tensor | None]:
    """``datasets.load_sample_pixels`` for image bytes: the same decode (reduced JPEG decoding included), plan,
    crop, colour and uint8 tensor, so a shard sample trains exactly like the same file in a folder."""
    source = io.BytesIO(image)
    source.name = name  # what a decoding error names
    loaded = load_image(source, keep_alpha=subset.alpha_mask, cover_bucket=bucket)
    plan = plan_crop(loaded.original_size, bucket, random_crop=subset.random_crop, flip_aug=subset.flip_aug, rng=rng,
                     interpolation=subset.resize_interpolation)
    pixels = crop_plan_array(loaded.rgb, plan)
    if subset.color_aug:
        pixels = color_jitter(Image.fromarray(pixels), rng)
    mask = mask_to_tensor(apply_crop_plan(loaded.alpha, plan)) if loaded.alpha is not None else None
    return to_uint8_tensor(pixels), plan, mask


def build_shard_sample(raw: _Raw, source: ShardSource, *, seed: int, epoch: int, step: int,
                       max_train_steps: int) -> Sample:
    """One training Sample from one shard sample: the folder datasets' caption and image steps."""
    from library.data.shard_format import ShardFormatError, decode_sample, shard_cached_latents

    unit = source.units[raw.unit]
    subset = source.subsets[unit.subset]
    decoded = decode_sample({**raw.fields, "__url__": unit.url})
    number = _sample_number(raw, source)
    caption, tags = decoded.caption, decoded.tags
    if caption is None and tags is None:
        caption = subset.class_tokens
    prompt = build_prompt(caption, tags, subset.captions, sample_rng(seed, epoch, number, "caption"), epoch, step,
                          max_train_steps)
    rng = sample_rng(seed, epoch, number, "image")
    where = f"{unit.name} {decoded.key} ({decoded.image_key})"
    cached = pixels = mask = None
    if source.use_latents:
        if decoded.latents is None:
            raise ShardFormatError(f"{where}: no latents.safetensors although index.json says the shards carry "
                                   "latents; write the shards again with tools/make_webdataset.py")
        plan = plan_crop(decoded.original_size, decoded.bucket, random_crop=False, flip_aug=subset.flip_aug, rng=rng,
                         interpolation=subset.resize_interpolation)
        cached = shard_cached_latents(decoded.latents, flipped=plan.flipped)
        mask = cached.alpha_mask if subset.alpha_mask else None
    else:
        pixels, plan, mask = shard_sample_pixels(decoded.image, where, decoded.bucket, subset, rng)
    hidden = pooled = None
    if source.use_text:
        if decoded.te is None or decoded.te_prompt != prompt:
            raise ShardFormatError(f"{where}: the shard's text-encoder outputs encode {decoded.te_prompt!r}, but this "
                                   f"run's prompt is {prompt!r}; write the shards again with this run's caption "
                                   "settings, or train without --cache_text_encoder_outputs")
        hidden, pooled = decoded.te["hidden_states"], decoded.te.get("pooled")
    return Sample(pixel_values=pixels, caption=prompt, plan=plan, is_reg=subset.is_reg, image_path=where,
                  alpha_mask=mask, conditioning_pixel_values=None, cached=cached, text_hidden_states=hidden,
                  text_pooled=pooled, network_multiplier=source.network_multipliers[unit.dataset])


class ShardStreamDataset(IterableDataset):
    """This rank's batches of the epoch set by :class:`ShardBatchControl`; each DataLoader worker runs its own
    stream. Yields lists of Samples (collated by the loader)."""

    def __init__(self, source: ShardSource, layout: EpochLayout, *, rank: int, seed: int, max_train_steps: int = 0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> None:
        self.source, self.layout, self.rank = source, layout, rank
        self.max_train_steps, self.shuffle_buffer = max_train_steps, shuffle_buffer
        # (seed, epoch, first step, batches to skip): set in the main process before each epoch and read by the
        # workers when the epoch starts; shared memory, so persistent workers see it too
        self._where = torch.tensor([seed, 1, 0, 0], dtype=torch.int64).share_memory_()

    seed = property(lambda self: int(self._where[0]), lambda self, value: self._where.__setitem__(0, value))
    epoch = property(lambda self: int(self._where[1]), lambda self, value: self._where.__setitem__(1, value))
    first_step = property(lambda self: int(self._where[2]), lambda self, value: self._where.__setitem__(2, value))
    skip = property(lambda self: int(self._where[3]), lambda self, value: self._where.__setitem__(3, value))

    def __iter__(self) -> Iterator[list[Sample]]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.layout.workers:
            raise ValueError(f"the shard plan was made for {self.layout.workers} worker(s), the loader has {workers}")
        seed, epoch, first_step, resume_at = (int(v) for v in self._where.tolist())
        worker = (self.layout.first_worker(self.rank, resume_at) + loader_worker) % workers
        skip = self.layout.consumed(self.rank, resume_at)[worker]
        stream = self.layout.stream_id(self.rank, worker)
        per_step = self.layout.batches_per_step
        for k, raw_batch in enumerate(worker_batches(self.source, self.layout, stream, seed=seed, epoch=epoch,
                                                     shuffle_buffer=self.shuffle_buffer)):
            if k < skip:
                continue  # consumed before the resume point: read, never decoded
            step = first_step + (self.layout.position(self.rank, worker, k) - resume_at) // per_step
            yield [build_shard_sample(raw, self.source, seed=seed, epoch=epoch, step=step,
                                      max_train_steps=self.max_train_steps) for raw in raw_batch]


SHARD_STREAMS = "shard_worker_streams"  # a saved state's extra: worker streams per process of a shard run


class ShardBatchControl:
    """What the loop drives for a streamed run, with KeyedBatchSampler's surface: set_epoch, state_dict,
    load_state_dict, len and summary. It sets the epoch and resume point on the dataset before each epoch."""

    def __init__(self, dataset: ShardStreamDataset) -> None:
        self.dataset = dataset
        self.batches_done = 0  # counted by the loader (ShardLoader)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Start ``epoch`` whose first batch trains at ``first_step``; a resume point of this epoch is kept."""
        if epoch != self.dataset.epoch:
            self.dataset.skip = 0
        self.dataset.epoch, self.dataset.first_step = epoch, first_step
        self.batches_done = self.dataset.skip

    def __len__(self) -> int:
        return self.dataset.layout.batches_per_rank

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        done = self.batches_done if batches_done is None else batches_done
        return {"epoch": self.dataset.epoch, "batches_done": done, "seed": self.dataset.seed}

    def resume_requirements(self) -> dict[str, int]:
        """Recorded in a saved state: each process reads its shards in this many worker streams, so the exact
        order continues only with as many (``check_shard_resume``)."""
        return {SHARD_STREAMS: self.dataset.layout.workers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue ``state``'s epoch after its ``batches_done`` batches (this rank's)."""
        epoch, done, seed = int(state["epoch"]), int(state["batches_done"]), int(state["seed"])
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done {done} is outside 0..{len(self)} for this shard stream")
        if seed != self.dataset.seed:
            logger.warning("shard stream: resuming with the saved seed %d instead of %d", seed, self.dataset.seed)
            self.dataset.seed = seed
        self.dataset.epoch, self.dataset.skip, self.batches_done = epoch, done, done

    def summary(self) -> SamplerSummary:
        """Per-bucket sample counts over all shards and the batches of an epoch, for the start-up printout."""
        layout, counts = self.dataset.layout, {}
        for unit in self.dataset.source.units:
            for key, n in unit.buckets:
                counts[key] = counts.get(key, 0) + n
        size = layout.batch_size
        stats = tuple(BucketStats(bucket=key, count=n, full_batches=n // size, short_batch_size=n % size)
                      for key, n in sorted(counts.items()))
        return SamplerSummary(buckets=stats, batch_size=size, world_size=layout.world_size,
                              total_batches=layout.real_batches, repeated_batches=layout.repeated_batches,
                              batches_per_rank=layout.batches_per_rank, dropped_samples=0)


class ShardLoader:
    """The DataLoader over the stream, counting the batches it hands out (for ``state_dict``)."""

    def __init__(self, loader: DataLoader, control: ShardBatchControl) -> None:
        self.loader, self.control = loader, control

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            self.control.batches_done += 1
            yield batch

    def __len__(self) -> int:
        return len(self.control)


def make_shard_loader(dataset: ShardStreamDataset, control: ShardBatchControl, *, num_workers: int = 0,
                      persistent_workers: bool = False) -> ShardLoader:
    """The loader yielding one collated :class:`Batch` per stream batch; workers read the epoch and resume
    point from shared memory when an epoch starts, so they may be persistent."""
    if max(1, num_workers) != dataset.layout.workers:
        raise ValueError(f"the shard plan was made for {dataset.layout.workers} worker(s), not {num_workers}")
    loader = DataLoader(dataset, batch_size=None, collate_fn=collate_samples, num_workers=num_workers,
                        persistent_workers=persistent_workers and num_workers > 0)
    return ShardLoader(loader, control)


def shard_preview_lines(source: ShardSource, *, seed: int, count: int = 8) -> list[str]:
    """--debug_dataset for shards: the first ``count`` samples of the first shard as epoch 1 would draw them
    (bucket, original size, crop, flip, prompt); only that shard is opened."""
    from itertools import islice

    unit = source.units[0]
    lines = [f"dataset preview (--debug_dataset): streamed shards, {sum(u.samples for u in source.units)} sample(s) "
             f"in {len(source.units)} shard(s); first {min(count, unit.samples)} of {unit.url}:"]
    for raw in islice(_read_units(source, [0]), count):
        sample = build_shard_sample(raw, source, seed=seed, epoch=1, step=0, max_train_steps=1)
        plan = sample.plan
        lines.append(f"  {sample.image_path}: bucket {plan.bucket[0]}x{plan.bucket[1]}, original "
                     f"{plan.original_size[0]}x{plan.original_size[1]}, crop at {plan.crop_left_top}, "
                     f"flip {plan.flipped}; prompt {sample.caption!r}")
    return lines
