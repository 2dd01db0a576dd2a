"""Tiny offline models, built once per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a bad local path must fail at once, not retry an unreachable hub

import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from library.models.tiny_models import make_tiny_model
from tests.helpers.in_process import run_main_in_process

FAMILIES = ("sd15", "sd21", "sdxl")

# One thread per test process (and per script a test starts: OMP_NUM_THREADS below). The suite runs on two
# workers, and CPU kernels with two threads are not bit-reproducible: two identical 6-step LoRA runs differed
# by 4e-3, which no exact-resume test could tell from a resume bug.
torch.set_num_threads(1)


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


def _script_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _checked(result: subprocess.CompletedProcess, expect_rc: int | None) -> subprocess.CompletedProcess:
    if expect_rc is not None:
        assert result.returncode == expect_rc, \
            f"exit {result.returncode}, expected {expect_rc}\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def run_script() -> Callable[..., subprocess.CompletedProcess]:
    """``run(script, args, expect_rc=0)``: ``python script.py ARGS`` from the repository root, as a user types it
    (one thread); checks the exit code (``expect_rc=None`` checks nothing) and returns the completed process."""

    def run(script: str, args: list[str], expect_rc: int | None = 0, timeout: int = 420,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / script), *map(str, args)]
        result = subprocess.run(command, cwd=ROOT, env={**_script_env(), **(env or {})}, capture_output=True,
                                text=True, timeout=timeout)
        return _checked(result, expect_rc)

    return run


@pytest.fixture
def run_in_process(monkeypatch: pytest.MonkeyPatch) -> Callable[..., subprocess.CompletedProcess]:
    """Like ``run_script``, but ``main(argv)`` runs in this process (tests/helpers/in_process.py): for the further
    refusal cases of a path whose first case already ran as a real subprocess, and for an earlier run that only
    leaves behind the folder the test's real subprocess then starts from."""

    def run(script: str, args: list[str], expect_rc: int | None = 0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        return _checked(run_main_in_process(script, args), expect_rc)

    return run


@pytest.fixture
def launch_two_cpu_processes() -> Callable[..., subprocess.CompletedProcess]:
    """``launch(script, args, expect_rc=0)``: `accelerate launch --multi_gpu --num_processes 2` of a repo script
    on the CPU (a free port, one thread per process); checks the exit code like ``run_script``."""

    def launch(script: str, args: list[str], timeout: int = 420, expect_rc: int | None = 0) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), str(ROOT / script), *map(str, args)]
        result = subprocess.run(command, cwd=ROOT, env=_script_env(), capture_output=True, text=True, timeout=timeout)
        return _checked(result, expect_rc)

    return launch


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-image kohya dataset shared read-only by the user-path tests: ``images/`` with ``.caption`` sidecars
    and ``meta.json`` (keyed by stem). Tests that change a dataset copy it first."""
    from tools.make_sample_dataset import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("shapes_data") / "shapes", count=6, size=96, seed=0).parent


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices: one thread is faster, and a shared CPU makes multi-threaded QR/SVD crawl
    (request it from a module's autouse fixture, so it comes before the module's other fixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_PROCESS_FIXTURES = {"run_script", "launch_two_cpu_processes"}
_PROCESS_CALLS = ("subprocess.run(", "subprocess.Popen(", "accelerate.commands.launch")


def _starts_processes(module: object) -> bool:
    return any(call in Path(module.__file__).read_text() for call in _PROCESS_CALLS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules whose tests start processes run first (whole modules, so module fixtures are built once): the
    two workers then end on short in-process tests instead of one worker idling while the other runs a long
    launch at the very end."""
    modules = {item.module.__name__: item.module for item in items}
    first = {name for name, module in modules.items() if _starts_processes(module)}
    first |= {item.module.__name__ for item in items if _PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))}
    items.sort(key=lambda item: item.module.__name__ not in first)
