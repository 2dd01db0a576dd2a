"""Deciding at start-up whether and from where a run resumes, before any model is loaded.

``prepare_resume`` recovers interrupted saves in the output folder, resolves ``--resume auto``, checks the state
folder (pickles, sizes, headers, JSON) and compares the run's settings with the state's; it returns what it
decided and changes nothing else, so the caller records the decision where the run's flags live.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.training.checkpoints import StateError, TrainState, latest_state_folder
from library.training.process_count import accumulation_for_processes, describe_adjustment
from library.training.run_settings import compare_settings
from library.training.train_state_io import FORMAT, check_folder, read_record, recover_output_dir


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class ResumeDecision:
    """What ``--resume`` resolved to: the state folder the run continues from and its checked state.

    ``folder`` is the flag's value with ``auto`` resolved (None: ``auto`` found nothing, a new run starts);
    ``state`` is None for a new run. The run's seed is then the state's, so the metadata records what was used.
    """

    folder: str | None
    state: TrainState | None
    gradient_accumulation_steps: int | None = None  # set when another process count changes it (see process_count)


def prepare_resume(*, output_dir: str | None, output_name: str | None, resume: str | None,
                   settings: Mapping[str, Any], ignore_changes: bool = False,
                   printer: Any = print, num_processes: int = 1) -> ResumeDecision:
    """Everything about the state that can be checked before the model loads.

    Recovers interrupted saves in --output_dir, resolves ``--resume auto``, checks the folder (pickles, sizes,
    headers, JSON) and compares the run's ``settings`` (`run_settings`) with the state's (refusing what cannot
    change). A state saved by another number of processes than ``num_processes`` gets the gradient accumulation
    that keeps its global batch (``library.training.process_count``).
    """
    say = printer if is_main_rank() else (lambda *_: None)
    output_path = Path(output_dir) if output_dir else None
    if output_path is not None:
        done = recover_output_dir(output_path)
        if done:
            say(f"recovered interrupted saves in {output_path}: " + "; ".join(done))
    if not resume:
        return ResumeDecision(resume, None)
    if resume == "auto":
        found = latest_state_folder(output_path, output_name or "last") if output_path else None
        if found is None:
            say(f"--resume auto: no complete state folder in {output_path}; starting a new run")
            return ResumeDecision(None, None)
        resume = str(found)
        say(f"--resume auto: continuing from {found}")
    folder = Path(resume)
    record = read_record(folder)
    check_folder(folder, record)
    accumulation = None
    saved_processes = record.state.num_processes
    if saved_processes != num_processes:
        if record.format != FORMAT:
            raise StateError(f"--resume {folder} was saved by {saved_processes} process(es) with DeepSpeed/FSDP, whose "
                             f"state is split per process; this run has {num_processes}: resume it on "
                             f"{saved_processes} process(es)")
        accumulation = accumulation_for_processes(folder, saved_settings=record.settings, current_settings=settings,
                                                  saved_processes=saved_processes, num_processes=num_processes)
        say(describe_adjustment(saved_processes=saved_processes, num_processes=num_processes,
                                accumulation=accumulation, batch_size=int(settings.get("train_batch_size") or 1)))
        # the accumulation was checked against the global batch: it does not count as a changed setting
        settings = {**settings, "gradient_accumulation_steps": record.settings.get("gradient_accumulation_steps",
                                                                                   accumulation)}
    if record.settings:
        compare_settings(folder, record.settings, settings, ignore_changes, say)
    return ResumeDecision(resume, record.state, accumulation)
