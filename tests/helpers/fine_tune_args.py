"""What the full fine-tuning tests (train_sdxl.py, fine_tune.py) share: the command line of a short run on a
kohya metadata dataset, and which tensors a run changed."""

from __future__ import annotations

from pathlib import Path

import torch


def fine_tune_args(model: Path, data: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--in_json", str(data / "meta.json"),
            "--train_data_dir", str(data / "images"), "--resolution", "64", "--learning_rate", "1e-3", "--seed", "5",
            "--max_data_loader_n_workers", "0", "--output_dir", str(output), "--output_name", "model",
            "--max_train_steps", str(steps), *extra]


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensors differ between two state dicts of the same model."""
    return {k for k in a if not torch.equal(a[k], b[k])}
