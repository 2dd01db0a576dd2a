"""kohya's --initial_step / --initial_epoch: a run that starts counting at a later step.

kohya uses them to continue a run whose state was lost (or to restart a schedule part-way): the step and
epoch counters start there, the learning-rate scheduler still starts from its beginning (kohya documents the
same), and training ends at --max_train_steps as usual, so only the remaining steps are trained.

With --skip_until_initial_step the data continues exactly where the uninterrupted run would be: the
batches before that step are skipped (here without loading them: the batch sampler knows the order). Without
it, kohya only skips the epoch number, and the data starts at the beginning of the epoch that holds the step;
here the step counter then starts at that epoch's first step too, so saved names and logs match the data
(kohya's counter restarts at 0 in that case).
"""

from __future__ import annotations

from dataclasses import dataclass

from library.training.checkpoints import StateError, TrainState


class StartPositionError(StateError):
    """--initial_step/--initial_epoch beyond the run's length (one line naming the flag and the fix)."""


@dataclass(frozen=True)
class StartPosition:
    initial_step: int | None = None  # optimizer steps already done, counted over all epochs (0: the start)
    initial_epoch: int | None = None  # 1-based; used when initial_step is None (1: the start)
    skip_until_initial_step: bool = False

    @property
    def given(self) -> bool:
        return self.initial_step is not None or self.initial_epoch is not None


def start_state(position: StartPosition, *, steps_per_epoch: int, gradient_accumulation_steps: int,
                max_train_steps: int, seed: int, num_processes: int) -> TrainState | None:
    """Where the loop starts for ``position`` (None: at the beginning)."""
    if not position.given:
        return None
    if position.initial_step is not None:
        step, flag = position.initial_step, f"--initial_step {position.initial_step}"
    else:
        step, flag = (position.initial_epoch - 1) * steps_per_epoch, f"--initial_epoch {position.initial_epoch}"
    if step <= 0:
        return None
    if step >= max_train_steps:
        raise StartPositionError(f"{flag} starts at step {step}, but the run ends at step {max_train_steps} "
                                 "(--max_train_steps/--max_train_epochs): start earlier or train longer")
    epoch = step // steps_per_epoch + 1
    epoch_start = (epoch - 1) * steps_per_epoch
    if not position.skip_until_initial_step:
        return TrainState(epoch_start, epoch, 0, seed, num_processes)
    return TrainState(step, epoch, (step - epoch_start) * gradient_accumulation_steps, seed, num_processes)


def describe(state: TrainState, position: StartPosition) -> str:
    how = ("the batches before it are skipped (--skip_until_initial_step)" if position.skip_until_initial_step
           else "the data starts at the beginning of that epoch")
    return (f"starting at step {state.global_step} (epoch {state.epoch}): {how}; the learning-rate schedule "
            "starts from its beginning")
