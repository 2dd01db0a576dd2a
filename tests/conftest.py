"""Tiny offline models, built once per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a bad local path must fail at once, not retry an unreachable hub

import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from accelerate.state import AcceleratorState, GradientState

from library.tiny_models import make_tiny_model

FAMILIES = ("sd15", "sd21", "sdxl")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One diffusers folder per family: {"sd15": path, "sd21": path, "sdxl": path}."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch: pytest.MonkeyPatch):
    """accelerate keeps one process-wide state; every test that builds an Accelerator in-process starts clean
    (and never sees a launcher's WORLD_SIZE / LOCAL_RANK)."""
    for name in [n for n in os.environ if n.startswith("ACCELERATE_")] + ["WORLD_SIZE", "LOCAL_RANK"]:
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launch_two_cpu_processes() -> Callable[..., subprocess.CompletedProcess]:
    """``launch(script, args)``: `accelerate launch --multi_gpu --num_processes 2` of a repo script on the CPU
    (a free port, one thread per process); fails the test with the output tail if the run fails."""

    def launch(script: str, args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), str(ROOT / script), *args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    return launch
