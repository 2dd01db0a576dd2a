"""What the user-path tests share: a kohya command line for the tiny models, and what a user must see when a
run is refused (one ``error:`` line naming the fix, never a traceback)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_ERROR_LINE = re.compile(r"^(\S+: )?error:")  # ours ("error: ...") and argparse's ("train_network.py: error: ...")


def lora_args(model: Path, data: Path, output: Path, steps: int, *extra: object) -> list[str]:
    """train_network.py on ``data`` (``images/`` + ``meta.json``) at 64 px, rank 4, as a kohya user types it."""
    return ["--pretrained_model_name_or_path", str(model), "--in_json", str(data / "meta.json"),
            "--train_data_dir", str(data / "images"), "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--network_dim", "4", "--network_alpha", "2",
            "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--output_dir", str(output), "--output_name", "lora", "--max_train_steps", str(steps), *map(str, extra)]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if _ERROR_LINE.match(line)]


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exactly one ``error:`` line and no traceback; every needle is in that line or in the
    indented details under it (a dataset's problem list). Returns the line."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    details = result.stderr[result.stderr.index(lines[0]):]
    for needle in needles:
        assert needle in details, details
    return lines[0]
