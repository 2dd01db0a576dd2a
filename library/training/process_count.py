"""Resuming a state on another number of processes, and how the processes of a run are laid out on nodes.

A state saved by N processes resumes on M when the global batch (batch x accumulation x processes) can stay
the same: the gradient accumulation becomes ``accumulation x N / M``. Everything else then lines up:

* the bucket sampler's global batch order depends only on (seed, epoch) and is padded to a multiple of
  processes x accumulation (the batches of one optimizer step), which the kept global batch keeps too; the
  batches consumed over all ranks (``batches_done_in_epoch x N``) are the new run's position in it;
* the noise of a micro-batch is keyed by its index in that global order (library.training.loop), so rank r's
  micro-step j of step s draws what micro-step ``j x N + r`` of one process with N x accumulation draws;
* accelerate steps a prepared scheduler once per process per optimizer step (optim.scheduler_steps), so a
  scheduler state's counts are rescaled from N to M steps per optimizer step;
* per-rank RNG files (rng_<i>.json) are loaded where a rank has one; no draw that decides the weights uses them.

DeepSpeed and FSDP shard their engine state per process, so their states are refused on another count.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from library.training.checkpoints import StateError, TrainState


SAVED_PROCESSES = "saved_num_processes"  # in a rescaled TrainState's extra: the count the state was saved by


@dataclass(frozen=True)
class GlobalBatch:
    """Samples per optimizer step over all processes."""

    batch_size: int
    accumulation: int
    processes: int

    @property
    def size(self) -> int:
        return self.batch_size * self.accumulation * self.processes

    def describe(self) -> str:
        return (f"{self.batch_size} per device x {self.accumulation} accumulation x {self.processes} process(es) "
                f"= {self.size}")


def launched_processes(environ: Mapping[str, str] = os.environ) -> int:
    """The run's process count before the Accelerator exists: what accelerate launch / torchrun set."""
    return max(1, int(environ.get("WORLD_SIZE") or 1))


def nodes_in_run(num_processes: int, environ: Mapping[str, str] = os.environ) -> int:
    """Nodes the processes are spread over: torchrun (and accelerate launch through it) sets LOCAL_WORLD_SIZE."""
    per_node = int(environ.get("LOCAL_WORLD_SIZE") or num_processes) or num_processes
    return max(1, num_processes // per_node)


def _saved_global_batch(saved_settings: Mapping[str, Any], current_settings: Mapping[str, Any],
                        saved_processes: int) -> GlobalBatch:
    batch = saved_settings.get("train_batch_size") or current_settings.get("train_batch_size") or 1
    accumulation = saved_settings.get("gradient_accumulation_steps")
    if accumulation is None:  # a state without settings: the run's own value is the only one known
        accumulation = current_settings.get("gradient_accumulation_steps") or 1
    return GlobalBatch(int(batch), int(accumulation), saved_processes)


def accumulation_for_processes(folder: Path, *, saved_settings: Mapping[str, Any],
                               current_settings: Mapping[str, Any], saved_processes: int, num_processes: int) -> int:
    """The gradient accumulation that keeps the state's global batch on ``num_processes``.

    The run's --gradient_accumulation_steps may be the state's (then it is adjusted) or already the adjusted
    value; anything else, or a count that cannot divide the batches of one step, is one StateError line.
    """
    saved = _saved_global_batch(saved_settings, current_settings, saved_processes)
    per_step = saved.accumulation * saved.processes  # batches of one optimizer step, over all ranks
    if per_step % num_processes:
        counts = [str(d) for d in range(1, per_step + 1) if per_step % d == 0]
        choices = counts[0] if len(counts) == 1 else ", ".join(counts[:-1]) + " or " + counts[-1]
        raise StateError(f"--resume {folder}: the state's global batch is {saved.describe()}, so an optimizer step "
                         f"is {saved.accumulation} x {saved.processes} = {per_step} batches, which {num_processes} "
                         f"process(es) cannot share evenly ({per_step} / {num_processes} is not a whole "
                         f"accumulation): resume on {choices} process(es)")
    needed = per_step // num_processes
    requested = int(current_settings.get("gradient_accumulation_steps") or 1)
    if requested not in (needed, saved.accumulation):
        mine = GlobalBatch(saved.batch_size, requested, num_processes)
        raise StateError(f"--resume {folder}: the state's global batch is {saved.describe()}, this run's would be "
                         f"{mine.describe()}: use --gradient_accumulation_steps {needed} (or the state's "
                         f"{saved.accumulation}, which is then adjusted to {needed})")
    fused = current_settings.get("fused_backward_pass") or current_settings.get("fused_optimizer_groups")
    if needed != 1 and fused:
        raise StateError(f"--resume {folder}: the state's global batch is {saved.describe()}, which needs an "
                         f"accumulation of {needed} on {num_processes} process(es), and --fused_backward_pass cannot "
                         "accumulate gradients: resume without --fused_backward_pass")
    return needed


def describe_adjustment(*, saved_processes: int, num_processes: int, accumulation: int, batch_size: int) -> str:
    kept = GlobalBatch(batch_size, accumulation, num_processes)
    return (f"resume: the state was saved by {saved_processes} process(es); on {num_processes} the gradient "
            f"accumulation becomes {accumulation} to keep the global batch ({kept.describe()})")


def position_for_processes(folder: Path, state: TrainState, num_processes: int, saved_settings: Mapping[str, Any],
                           current_settings: Mapping[str, Any]) -> TrainState:
    """The saved position in this run's units: batches consumed per rank = batches consumed over all ranks / M.
    The run must keep the state's global batch (`accumulation_for_processes` chose its accumulation)."""
    if state.num_processes == num_processes:
        return state
    needed = accumulation_for_processes(folder, saved_settings=saved_settings, current_settings=current_settings,
                                        saved_processes=state.num_processes, num_processes=num_processes)
    requested = int(current_settings.get("gradient_accumulation_steps") or 1)
    if requested != needed:
        raise StateError(f"--resume {folder}: saved by {state.num_processes} process(es), resumed on {num_processes} "
                         f"with --gradient_accumulation_steps {requested}; keeping the global batch needs {needed}")
    consumed = state.batches_done_in_epoch * state.num_processes
    if consumed % num_processes:
        raise StateError(f"--resume {folder}: {consumed} batches of epoch {state.epoch} were consumed over "
                         f"{state.num_processes} process(es), which {num_processes} process(es) cannot share "
                         "evenly: resume from a state saved at an optimizer step")
    return dataclasses.replace(state, batches_done_in_epoch=consumed // num_processes, num_processes=num_processes,
                               extra={**(state.extra or {}), SAVED_PROCESSES: state.num_processes})


def rescale_scheduler_state(state: Mapping[str, Any], *, saved_processes: int, num_processes: int) -> dict[str, Any]:
    """``state`` with its step counts moved from ``saved_processes`` to ``num_processes`` scheduler steps per
    optimizer step. Only counts are changed: a LambdaLR's learning rate then follows from its (new) lambdas."""
    rescaled = dict(state)
    if "last_epoch" in rescaled:
        rescaled["last_epoch"] = int(rescaled["last_epoch"]) // saved_processes * num_processes
    if "_step_count" in rescaled:
        rescaled["_step_count"] = 1 + max(0, int(rescaled["_step_count"]) - 1) // saved_processes * num_processes
    return rescaled


def load_scheduler_state(scheduler: Any, state: Mapping[str, Any], *, saved_processes: int,
                         num_processes: int) -> bool:
    """Load a saved scheduler state into ``scheduler`` (accelerate's wrapper or a plain one), its counts rescaled
    when the process count changed. False when it cannot be rescaled (a scheduler that is not a LambdaLR keeps
    counts of its own, e.g. T_max): the caller then winds the fresh scheduler to the resume step instead."""
    if saved_processes == num_processes:
        scheduler.load_state_dict(dict(state))
        return True
    import warnings

    from torch.optim.lr_scheduler import LambdaLR

    inner = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(inner, LambdaLR):
        return False
    inner.load_state_dict(rescale_scheduler_state(state, saved_processes=saved_processes,
                                                  num_processes=num_processes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr outside step(): intended, a LambdaLR's lr is closed-form
        rates = inner.get_lr()
    for group, rate in zip(inner.optimizer.param_groups, rates):
        group["lr"] = rate
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
    return True
