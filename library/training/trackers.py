"""Opening the run's experiment trackers (TensorBoard, wandb) and sending them sample images.

accelerate builds the trackers from ``log_with``; what it leaves to us is kohya's wandb behaviour: log in
with the API key before the run starts, put the run folder under --logging_dir, name the run, and send each
sample image to every tracker that shows images, not only TensorBoard. wandb is an optional package:
it is imported here only when a wandb tracker is open.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REDACTED = "<hidden>"


@dataclass(frozen=True)
class TrackerOptions:
    """What init_trackers is called with; the API key is used to log in and never stored anywhere else."""

    project_name: str
    config: dict[str, Any] | None = None
    init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    logging_dir: str | None = None
    wandb_api_key: str | None = field(default=None, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)  # credential values given as flags (any tool's)


def start_trackers(accelerator: Any, options: TrackerOptions) -> None:
    """Log in to wandb if a key is given (kohya: wandb.login(key=...)), then open every configured tracker."""
    if not accelerator.log_with:
        return
    init_kwargs = {name: dict(values) for name, values in options.init_kwargs.items()}
    if uses_wandb(accelerator):
        wandb_kwargs = init_kwargs.setdefault("wandb", {})
        if options.logging_dir is not None and "dir" not in wandb_kwargs:
            # kohya points WANDB_DIR at --logging_dir; the same, without changing the process environment
            Path(options.logging_dir).mkdir(parents=True, exist_ok=True)
            wandb_kwargs["dir"] = str(options.logging_dir)
        hide_in_argv(options.secrets)
        if options.wandb_api_key and accelerator.is_main_process:
            import wandb

            wandb.login(key=options.wandb_api_key)
    accelerator.init_trackers(options.project_name, config=options.config, init_kwargs=init_kwargs)


def hide_in_argv(secrets: Sequence[str]) -> None:
    """Mask each of ``secrets`` in this process's command line (``--wandb_api_key KEY``, ``--huggingface_token=T``).

    wandb records sys.argv in the run's metadata (shown with the run, public on a public project; kohya warns
    about it) and may read it again later in the run, so the values are masked for good once the flags are parsed.
    """
    for secret in (s for s in secrets if s):
        sys.argv[:] = [arg.replace(secret, REDACTED) for arg in sys.argv]


def uses_wandb(accelerator: Any) -> bool:
    return any(str(getattr(t, "value", t)) == "wandb" for t in accelerator.log_with)


def log_sample_images(accelerator: Any, samples: Sequence[Any], step: int) -> None:
    """Each sample as ``samples/NN`` at ``step``: TensorBoard as an image, wandb as an image captioned by its
    prompt (kohya logs them to wandb too). Trackers that show no images are skipped."""
    import numpy as np

    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            for index, sample in enumerate(samples):
                tracker.writer.add_image(f"samples/{index:02d}", np.asarray(_image(sample)), global_step=step,
                                         dataformats="HWC")
        elif tracker.name == "wandb" and getattr(tracker, "run", None) is not None:
            import wandb

            images = {f"samples/{index:02d}": wandb.Image(_image(sample), caption=_caption(sample))
                      for index, sample in enumerate(samples)}
            tracker.run.log(images, step=step)


def _image(sample: Any) -> Any:
    return getattr(sample, "image", sample)


def _caption(sample: Any) -> str | None:
    prompt = getattr(sample, "prompt", None)
    return getattr(prompt, "prompt", None) if prompt is not None else None
