"""kohya's --initial_step, --initial_epoch and --skip_until_initial_step, read into a StartPosition."""

from __future__ import annotations

import argparse
from typing import Any

from library.cli.config import add_validator
from library.training.checkpoints import TrainState
from library.training.start_position import StartPosition, describe, start_state


def add_start_position_arguments(group: argparse._ArgumentGroup, parser: argparse.ArgumentParser) -> None:
    """Added to the saving group: they say where a run's counting starts, like --resume."""
    group.add_argument("--initial_step", type=int, default=None,
                       help="start counting at this optimizer step (over all epochs; 0 is the start) and train up "
                            "to --max_train_steps; overrides --initial_epoch and the step of a --resume state. The "
                            "learning-rate schedule still starts from its beginning (as kohya). Without "
                            "--skip_until_initial_step training starts at the beginning of the epoch holding that "
                            "step, and counts from that epoch's first step")
    group.add_argument("--initial_epoch", type=int, default=None,
                       help="start at this epoch (1 is the first): the same as --initial_step at its first step")
    group.add_argument("--skip_until_initial_step", action="store_true",
                       help="with --initial_step: continue the data where an uninterrupted run would be, skipping "
                            "the batches before that step (without loading them)")
    add_validator(parser, _check_start_position)


def _check_start_position(args: argparse.Namespace) -> str | None:
    step, epoch = getattr(args, "initial_step", None), getattr(args, "initial_epoch", None)
    if step is not None and step < 0:
        return f"--initial_step must be 0 or more (got {step})"
    if epoch is not None and epoch < 1:
        return f"--initial_epoch must be 1 or more, 1 being the first epoch (got {epoch})"
    if step is not None and not getattr(args, "max_train_epochs", None) \
            and step >= (getattr(args, "max_train_steps", None) or 0) > 0:
        return (f"--initial_step {step} is not before the end of the run (--max_train_steps "
                f"{args.max_train_steps}): start earlier or train longer")
    return None


def start_position_from_args(args: argparse.Namespace) -> StartPosition:
    return StartPosition(initial_step=getattr(args, "initial_step", None),
                         initial_epoch=getattr(args, "initial_epoch", None),
                         skip_until_initial_step=bool(getattr(args, "skip_until_initial_step", False)))


def start_from_args(args: argparse.Namespace, plan: Any, seed: int, accelerator: Any,
                    resumed: TrainState | None = None) -> TrainState | None:
    """The loop's start: --initial_step/--initial_epoch when given (over a --resume state's step, as kohya),
    else ``resumed``."""
    position = start_position_from_args(args)
    state = start_state(position, steps_per_epoch=plan.steps_per_epoch,
                        gradient_accumulation_steps=plan.gradient_accumulation_steps,
                        max_train_steps=plan.max_train_steps, seed=seed, num_processes=accelerator.num_processes)
    if state is None:
        return resumed
    if resumed is not None:
        accelerator.print(f"--initial_step/--initial_epoch given: the state's step {resumed.global_step} is not used")
    accelerator.print(describe(state, position))
    return state
