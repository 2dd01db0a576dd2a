"""Typed set-up pieces the scripts share: the checked data, its sampler and loader, the caches, module placement.

The flags are read one layer up (library.cli.script_flow), which calls these in order; the loop only sees the
ready objects.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from library.cache import dataset_caching
from library.data.dataset_config import DatasetConfig
from library.data.datasets import KeyedBatchSampler, TrainingDataset, make_batch_sampler, make_loader
from library.models.families import ModelFamily
from library.models.loading import StableDiffusionModel
from library.data.records import DatasetIndex
from library.data.shard_config import ShardRun
from library.data.shard_stream import ShardBatchControl, ShardLoader
from library.training.shard_setup import check_shard_tensors, shard_loader, shard_sampler


@dataclass(frozen=True)
class SamplerCounts:
    """What a rank's batch sampler yields per epoch (for the step plan)."""

    batches_per_epoch: int  # on this rank
    short_batches: int  # last-of-bucket batches kept short
    repeated_batches: int  # repeated to give every rank the same number


@dataclass
class TrainingData:
    datasets: list[DatasetConfig]
    index: DatasetIndex
    family: ModelFamily | None  # as peeked before loading (None: not known yet)
    sampler_inputs: Any = None
    validation_index: DatasetIndex | None = None  # held-out images (validation_split), None without a split
    shards: ShardRun | None = None  # streamed shards (then ``index`` holds no records): planned from index.json

    @property
    def num_images(self) -> int:
        if self.shards is not None:
            return self.shards.samples - self.shards.reg_samples
        return sum(1 for r in self.index.records if not r.is_reg)

    @property
    def num_reg_images(self) -> int:
        if self.shards is not None:
            return self.shards.reg_samples
        return sum(1 for r in self.index.records if r.is_reg)

    @property
    def samples_per_epoch(self) -> int:
        if self.shards is not None:
            return self.shards.samples
        return sum(r.num_repeats for r in self.index.records)

    @property
    def batch_size(self) -> int:
        if self.shards is not None:
            return self.datasets[0].batch_size
        return self.sampler_inputs.batch_size

    @property
    def resolution(self) -> tuple[int, int]:
        return self.datasets[0].resolution

    @property
    def prior_loss_weight(self) -> float:
        return self.datasets[0].prior_loss_weight

    def make_sampler(self, *, seed: int, rank: int, world_size: int, batches_per_step: int,
                     num_workers: int = 0) -> tuple[KeyedBatchSampler | ShardBatchControl, SamplerCounts]:
        """This rank's batch sampler, and the counts the step plan prints. For shards: the stream's control,
        planned for ``num_workers`` DataLoader workers (each reads its own shards)."""
        if self.shards is not None:
            control = shard_sampler(self.shards, batch_size=self.batch_size, seed=seed, rank=rank,
                                    world_size=world_size, batches_per_step=batches_per_step, num_workers=num_workers)
            layout = control.dataset.layout
            return control, SamplerCounts(batches_per_epoch=layout.batches_per_rank,
                                          short_batches=layout.short_batches, repeated_batches=layout.repeated_batches)
        sampler = make_batch_sampler(self.sampler_inputs, seed, rank=rank, world_size=world_size,
                                     batches_per_step=batches_per_step)
        summary = sampler.summary()
        counts = SamplerCounts(batches_per_epoch=len(sampler),
                               short_batches=sum(1 for b in summary.buckets if b.short_batch_size),
                               repeated_batches=summary.repeated_batches)
        return sampler, counts

    def make_loader(self, sampler: KeyedBatchSampler, *, seed: int, max_train_steps: int, caches: "Caches",
                    conditioning_filter: Any = None, num_workers: int = 0,
                    persistent_workers: bool = False) -> DataLoader | ShardLoader:
        if isinstance(sampler, ShardBatchControl):
            return shard_loader(sampler, max_train_steps=max_train_steps, num_workers=num_workers,
                                persistent_workers=persistent_workers)
        dataset = TrainingDataset(self.index, seed, max_train_steps, latent_cache=caches.latents, text_cache=caches.text,
                                  conditioning_filter=conditioning_filter)
        return make_loader(dataset, sampler, num_workers=max(0, num_workers), persistent_workers=persistent_workers)

    def summary_for_metadata(self) -> list[dict[str, Any]]:
        out = []
        for dataset in self.datasets:
            out.append({"batch_size": dataset.batch_size, "resolution": list(dataset.resolution),
                        "enable_bucket": dataset.enable_bucket, "kind": dataset.kind,
                        "network_multiplier": dataset.network_multiplier,
                        "subsets": [{"image_dir": str(s.image_dir.name) if s.image_dir else None,
                                     "num_repeats": s.num_repeats, "is_reg": s.is_reg,
                                     "class_tokens": s.class_tokens} for s in dataset.subsets]})
        return out

    def caption_sources(self) -> list[tuple[str, str | None, str | None]]:
        """(folder, caption, tags) per image for the tag frequencies; empty for shards (not read at start-up)."""
        return [(str(r.image_path.parent.name), r.caption, r.tags) for r in self.index.records]

    def bucket_info(self) -> dict[str, Any]:
        if self.shards is not None:
            return {"buckets": dict(self.shards.bucket_counts)}
        counts: dict[str, int] = {}
        for record in self.index.records:
            bucket = record.bucket.bucket if record.bucket else None
            key = f"{bucket[0]}x{bucket[1]}" if bucket else "none"
            counts[key] = counts.get(key, 0) + record.num_repeats
        return {"buckets": counts}


@dataclass
class Caches:
    latents: dataset_caching.LatentCacheLocation | None = None
    text: Any = None
    temp_dirs: list[tempfile.TemporaryDirectory] = field(default_factory=list)  # this run's caches: keep alive


def fill_caches(*, data: TrainingData, model: StableDiffusionModel, prompt_encoder: Any, accelerator: Any,
                latent_mode: str | None, text_mode: str | None, output_dir: Path, vae_batch_size: int,
                skip_cache_check: bool, seed: int | None, text_encoder_cache_dir: Path | None) -> Caches:
    """Each rank encodes its share; then every rank reads all of it (workers read from disk).

    A mode is None (no cache), "run" (a temporary folder in ``output_dir``, gone after the run) or a kept cache.
    """
    if data.shards is not None:  # the shards carry what they cache; nothing is encoded ahead
        check_shard_tensors(data.shards, model=model, prompt_encoder=prompt_encoder, latent_mode=latent_mode)
        return Caches()
    caches = Caches()
    if "run" in (latent_mode, text_mode):  # this run's temp caches live in --output_dir
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    if latent_mode is not None:
        directory = None
        if latent_mode == "run":
            temp = tempfile.TemporaryDirectory(prefix="latents-", dir=output_dir)
            caches.temp_dirs.append(temp)
            directory = Path(temp.name)
        caches.latents = dataset_caching.LatentCacheLocation(model.family, directory)
        with torch.no_grad():
            dataset_caching.fill_latent_caches(
                data.index, model.vae, caches.latents, batch_size=vae_batch_size, rank=accelerator.process_index,
                world_size=accelerator.num_processes, skip_cache_check=skip_cache_check, seed=seed,
                progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
    if text_mode is not None:
        if text_mode == "run":
            temp = tempfile.TemporaryDirectory(prefix="text-", dir=output_dir)
            caches.temp_dirs.append(temp)
            cache_dir = Path(temp.name)
        else:
            cache_dir = Path(text_encoder_cache_dir) if text_encoder_cache_dir else \
                dataset_caching.default_text_cache_dir(data.datasets)
        with torch.no_grad():
            caches.text = dataset_caching.fill_text_cache(data.index, prompt_encoder, cache_dir,
                                                          rank=accelerator.process_index,
                                                          world_size=accelerator.num_processes,
                                                          progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        caches.text.refresh()
    return caches


def move_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Cast only when the dtype changes: diffusers warns on every `.to(dtype=...)` call, even a no-op one."""
    current = next(module.parameters()).dtype
    module.to(device) if current == dtype else module.to(device, dtype=dtype)


