"""The loop's standard callbacks: EMA updates, sampling at kohya's points, and the NaN guard.

Each is a `library.training.loop.Callback` the script flow puts in `TrainingRun.callbacks`; validation's is
`library.training.validation.PeriodicValidation`. A test or a benchmark adds its own the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from library.training import sampling
from library.training.checkpoints import TrainState
from library.training.loop import Callback, TrainingRun, TrainingStopped, evaluation, save_model, save_state
from library.training.train_state_io import state_before_divergence


class EmaUpdate(Callback):
    """The exponential moving average follows the weights after every optimizer step (library.training.ema)."""

    def __init__(self, averaged: Any) -> None:
        self.averaged = averaged

    def after_optimizer_step(self, run: TrainingRun, state: TrainState) -> dict[str, float]:
        self.averaged.maybe_update(state.global_step)
        return {}


class PeriodicSampling(Callback):
    """``sample(step, epoch)`` with the evaluation weights at --sample_at_first / _every_n_steps / _every_n_epochs."""

    def __init__(self, sample: Callable[[int, int | None], None], *, every_n_steps: int | None,
                 every_n_epochs: int | None, at_first: bool) -> None:
        self.sample = sample
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.at_first = at_first

    def on_train_start(self, run: TrainingRun, state: TrainState) -> None:
        if self.at_first and state.global_step == 0:
            with evaluation(run):
                self.sample(0, 0)

    def on_step_end(self, run: TrainingRun, state: TrainState, logs: dict[str, float]) -> None:
        self._maybe_sample(run, state, None, is_epoch_end=False)

    def on_epoch_end(self, run: TrainingRun, state: TrainState) -> None:
        self._maybe_sample(run, state, state.epoch, is_epoch_end=True)

    def _maybe_sample(self, run: TrainingRun, state: TrainState, epoch: int | None, is_epoch_end: bool) -> None:
        if sampling.should_sample(state.global_step, state.epoch, self.every_n_steps, self.every_n_epochs, False,
                                  is_epoch_end):
            with evaluation(run):
                self.sample(state.global_step, epoch)


class NanGuard(Callback):
    """On a NaN/inf loss: keep the weights at the stop for inspection, and name the newest state from before the
    divergence.

    The weights at the stop are finite (the optimizer has not stepped on the bad loss) but usually already
    diverged (at a huge learning rate they are ~1e10 in size), so resuming from them fails again: the state to
    resume from is the newest one saved before the loss exploded.
    """

    def __init__(self, resumed_from: Path | None = None) -> None:
        self.resumed_from = resumed_from  # the --resume folder
        self.losses: list[dict[str, float]] = []  # {"step", "loss/current"} of every step of this run
        self.saved_states: list[tuple[int, Path]] = []  # (step, folder) of this run's states

    def on_step_end(self, run: TrainingRun, state: TrainState, logs: dict[str, float]) -> None:
        self.losses.append({"step": state.global_step, "loss/current": logs["loss/current"]})

    def on_save(self, run: TrainingRun, state: TrainState, model_path: Path, state_folder: Path | None) -> None:
        if state_folder is not None:
            self.saved_states.append((state.global_step, state_folder))

    def on_nonfinite_loss(self, run: TrainingRun, state: TrainState) -> None:
        step, epoch = state.global_step, state.epoch
        name = f"{run.save.output_name}-nan-step{step:08d}"
        path = save_model(run, name, step, epoch)
        save_state(run, name, state)
        candidates = list(self.saved_states)
        if self.resumed_from is not None and run.start is not None:
            candidates.append((run.start.global_step, self.resumed_from))
        good = state_before_divergence(candidates, self.losses, step)
        if good is not None:
            advice = f"resume from {good}, the newest state saved before the loss diverged, with a lower --learning_rate"
        else:
            advice = ("no state was saved before the loss diverged: add --save_state --save_every_n_steps N to keep "
                      "states to resume from, and start again with a lower --learning_rate")
        raise TrainingStopped(
            f"the loss became NaN/inf at step {step + 1} (epoch {epoch}); the weights at the stop ({path}) have "
            f"diverged; {advice}. Also consider --mixed_precision bf16 instead of fp16, or --no_half_vae for SDXL."
        )
