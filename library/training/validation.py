"""Validation loss on held-out images, comparable from one evaluation to the next.

Training loss jumps with the random timestep and noise of each batch; a validation loss is only useful
when those are fixed. Every evaluation therefore uses the same images, the same timesteps
(`VALIDATION_TIMESTEPS`, each image at all of them) and noise seeded from (validation seed, batch,
timestep), so a change in the number is a change in the model. The held-out images come from each
dataset's ``validation_split`` (see `library.records.split_for_validation`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils.data import DataLoader

from library.training import noise as noise_lib
from library.data.buckets import BucketBatchSampler
from library.data.dataset_config import DatasetConfigError
from library.data.datasets import KeyedBatchSampler, TrainingDataset, build_bucket_sampler_inputs, collate_samples
from library.data.records import DatasetIndex
from library.training.loop import TrainingRun, batch_loss

VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
VALIDATION_EPOCH = 1  # one fixed epoch: the same crops, flips and captions at every evaluation


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument("--validate_every_n_steps", type=int, default=None,
                       help="validation loss every N optimizer steps (needs a validation_split)")
    group.add_argument("--validate_every_n_epochs", type=int, default=None,
                       help="validation loss every N epochs (default: every epoch when a split is set)")
    group.add_argument("--max_validation_steps", type=int, default=None, help="at most this many validation batches")


def make_validation_loader(index: DatasetIndex, seed: int, accelerator: Any) -> DataLoader:
    inputs = build_bucket_sampler_inputs(index)
    buckets = BucketBatchSampler(inputs.bucket_keys, inputs.batch_size, seed, world_size=accelerator.num_processes,
                                 rank=accelerator.process_index)
    sampler = KeyedBatchSampler(buckets)
    sampler.set_epoch(VALIDATION_EPOCH)
    return DataLoader(TrainingDataset(index, seed), batch_sampler=sampler, collate_fn=collate_samples)


def validation_loss(run: TrainingRun, loader: DataLoader, seed: int, max_batches: int | None = None) -> float:
    """Mean loss over the held-out batches at every fixed timestep, averaged over all ranks."""
    device = run.accelerator.device
    total = torch.zeros(2, device=device)  # (sum of losses, count)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        size = len(batch["captions"])
        for timestep in VALIDATION_TIMESTEPS:
            generator = noise_lib.step_generator(seed, index * 1000 + timestep, run.accelerator.process_index, device=device)
            loss = batch_loss(run, batch, generator, timesteps=torch.full((size,), timestep, dtype=torch.long))
            total += torch.stack([loss.detach().float(), torch.ones((), device=device)])
    total = run.accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def attach_validation(run: TrainingRun, args: argparse.Namespace, index: DatasetIndex | None, seed: int) -> None:
    """Validate at --validate_every_n_steps / --validate_every_n_epochs (every epoch by default)."""
    if index is None or not index.records:
        if args.validate_every_n_steps or args.validate_every_n_epochs:
            raise DatasetConfigError("--validate_every_n_steps/--validate_every_n_epochs need --validation_split > 0 "
                             "(or validation_split in the dataset config)")
        return
    loader = make_validation_loader(index, seed, run.accelerator)
    every_steps, every_epochs = args.validate_every_n_steps, args.validate_every_n_epochs
    if not every_steps and not every_epochs:
        every_epochs = 1

    def due(step: int, epoch: int, is_epoch_end: bool) -> bool:
        if is_epoch_end:
            return bool(every_epochs) and epoch % every_epochs == 0
        return bool(every_steps) and step % every_steps == 0

    run.validate = lambda: validation_loss(run, loader, seed, args.max_validation_steps)
    run.should_validate = due
