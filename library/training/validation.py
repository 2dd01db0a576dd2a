"""Validation loss on held-out images, comparable from one evaluation to the next.

Training loss jumps with the random timestep and noise of each batch; a validation loss is only useful
when those are fixed. Every evaluation therefore uses the same images, the same timesteps
(`VALIDATION_TIMESTEPS`, each image at all of them) and noise seeded from (validation seed, batch,
timestep), so a change in the number is a change in the model. The held-out images come from each
dataset's ``validation_split`` (see `library.data.dataset_index.split_for_validation`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from library.training import noise as noise_lib
from library.data.dataset_config import DatasetConfigError
from library.data.datasets import TrainingDataset, build_bucket_sampler_inputs, make_batch_sampler, make_loader
from library.data.records import DatasetIndex
from library.training.checkpoints import TrainState
from library.training.loop import Callback, TrainingRun, batch_loss, evaluation

VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
VALIDATION_EPOCH = 1  # one fixed epoch: the same crops, flips and captions at every evaluation


def make_validation_loader(index: DatasetIndex, seed: int, accelerator: Any) -> DataLoader:
    sampler = make_batch_sampler(build_bucket_sampler_inputs(index), seed, rank=accelerator.process_index,
                                 world_size=accelerator.num_processes)
    sampler.set_epoch(VALIDATION_EPOCH)
    return make_loader(TrainingDataset(index, seed), sampler)


def validation_loss(run: TrainingRun, loader: DataLoader, seed: int, max_batches: int | None = None) -> float:
    """Mean loss over the held-out batches at every fixed timestep, averaged over all ranks."""
    device = run.accelerator.device
    total = torch.zeros(2, device=device)  # (sum of losses, count)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        size = len(batch)
        for timestep in VALIDATION_TIMESTEPS:
            generator = noise_lib.step_generator(seed, index * 1000 + timestep, run.accelerator.process_index, device=device)
            loss = batch_loss(run, batch, generator, timesteps=torch.full((size,), timestep, dtype=torch.long))
            total += torch.stack([loss.detach().float(), torch.ones((), device=device)])
    total = run.accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


class PeriodicValidation(Callback):
    """The validation loss, with the evaluation weights, logged as ``loss/validation`` every ``every_n_steps``
    optimizer steps and every ``every_n_epochs`` epochs (every epoch when neither is set)."""

    def __init__(self, loader: DataLoader, *, seed: int, every_n_steps: int | None, every_n_epochs: int | None,
                 max_batches: int | None) -> None:
        self.loader = loader
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs if every_n_steps or every_n_epochs else 1
        self.max_batches = max_batches

    def on_step_end(self, run: TrainingRun, state: TrainState, logs: dict[str, float]) -> None:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._validate(run, state.global_step)

    def on_epoch_end(self, run: TrainingRun, state: TrainState) -> None:
        if self.every_n_epochs and state.epoch % self.every_n_epochs == 0:
            self._validate(run, state.global_step)

    def _validate(self, run: TrainingRun, step: int) -> None:
        with evaluation(run), torch.no_grad():
            loss = validation_loss(run, self.loader, self.seed, self.max_batches)
        run.accelerator.log({"loss/validation": loss}, step=step)


def validation_callback(index: DatasetIndex | None, *, seed: int, accelerator: Any, every_n_steps: int | None,
                        every_n_epochs: int | None, max_batches: int | None) -> PeriodicValidation | None:
    """None without held-out images (asking for validation steps without them is an error)."""
    if index is None or not index.records:
        if every_n_steps or every_n_epochs:
            raise DatasetConfigError("--validate_every_n_steps/--validate_every_n_epochs need --validation_split > 0 "
                             "(or validation_split in the dataset config)")
        return None
    return PeriodicValidation(make_validation_loader(index, seed, accelerator), seed=seed, every_n_steps=every_n_steps,
                              every_n_epochs=every_n_epochs, max_batches=max_batches)
