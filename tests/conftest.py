"""Tiny offline models, built once per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a bad local path must fail at once, not retry an unreachable hub

from pathlib import Path

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
    """accelerate keeps one process-wide state; every test that builds an Accelerator in-process starts clean."""
    for name in [n for n in os.environ if n.startswith("ACCELERATE_")]:
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
