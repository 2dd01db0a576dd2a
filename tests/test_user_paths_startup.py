"""Issue 9 A1/D12: what the flags ask for is checked before any data or model loads, as a user types it.

The first case of each kind runs ``python train_*.py`` in a subprocess; its further cases call the same
script's ``main(argv)`` in this process (``run_in_process``), where a process costs seconds of imports and
adds nothing. Where a check must come before the model loads, the model path does not exist: the only way to
get the expected message is that the check ran first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from PIL import Image
from tests.helpers.user_paths import assert_one_error_line

ROOT = Path(__file__).resolve().parent.parent
NO_MODEL = "/nonexistent/model.safetensors"


def hidden_packages_env(folder: Path, *packages: str) -> dict[str, str]:
    """An environment in which ``import PACKAGE`` fails as if it were not installed (a sitecustomize that
    blocks it), so a test can be the user who never installed it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{p!r}] = None\n" for p in packages))
    return {"PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


def data_args(data: Path, output: Path, model: str | Path = NO_MODEL) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--in_json", str(data / "meta.json"),
            "--train_data_dir", str(data / "images"), "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--output_dir", str(output),
            "--output_name", "lora", "--max_train_steps", "1", "--max_data_loader_n_workers", "0"]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on a white background --w 64 --h 64 --s 2 --d 1\n")
    return path


def test_sampler_needing_a_missing_package_fails_before_the_model_loads(shapes_data, tmp_path, prompts, run_script):
    env = hidden_packages_env(tmp_path / "site", "scipy")
    result = run_script("train_network.py", [*data_args(shapes_data, tmp_path / "out"), "--sample_prompts", prompts,
                                             "--sample_sampler", "k_lms"], expect_rc=1, env=env)
    assert_one_error_line(result, "--sample_sampler", "k_lms", "scipy")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sampler_named_in_the_prompt_file_is_checked_too(shapes_data, tmp_path, run_script):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle --w 64 --h 64 --s 2 --ss k_lms\n")
    env = hidden_packages_env(tmp_path / "site", "scipy")  # diffusers reads it once, at import: a real process
    result = run_script("train_sdxl.py", [*data_args(shapes_data, tmp_path / "out"), "--sample_prompts", prompt_file],
                        expect_rc=1, env=env)
    assert_one_error_line(result, str(prompt_file), "scipy")


def test_optimizer_from_a_missing_package_fails_before_the_model_loads(shapes_data, tmp_path, run_in_process,
                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what hidden_packages_env's sitecustomize does
    result = run_in_process("train_network.py", [*data_args(shapes_data, tmp_path / "out"), "--optimizer_type",
                                                 "Prodigy"], expect_rc=1)
    assert_one_error_line(result, "--optimizer_type Prodigy", "pip install prodigyopt")


def test_unknown_optimizer_class_path_is_one_line(shapes_data, tmp_path, run_script):
    result = run_script("train_controlnet.py", [*data_args(shapes_data, tmp_path / "out"), "--conditioning_filter",
                                                "canny", "--optimizer_type", "torch.optim.NoSuchOptimizer"], expect_rc=1)
    assert_one_error_line(result, "torch.optim", "NoSuchOptimizer")


def test_xformers_without_cuda_and_wandb_without_the_package_are_reported_together(shapes_data, tmp_path, run_script):
    env = hidden_packages_env(tmp_path / "site", "wandb")
    result = run_script("train_network.py", [*data_args(shapes_data, tmp_path / "out"), "--xformers",
                                             "--log_with", "wandb"], expect_rc=1, env=env)
    assert_one_error_line(result, "--xformers needs a CUDA GPU", "pip install wandb")


def test_k_lms_samples_at_the_first_step_in_a_fresh_output_folder(tiny_model_dirs, shapes_data, tmp_path, prompts,
                                                                     run_script):
    """README-style run with the LMS sampler: scipy is a runtime requirement, so the first sample is drawn."""
    output = tmp_path / "new" / "out"
    run_script("train_network.py", [*data_args(shapes_data, output, tiny_model_dirs["sd15"]), "--sample_prompts",
                                    prompts, "--sample_sampler", "k_lms", "--sample_at_first",
                                    "--network_dim", "2"])
    samples = sorted((output / "sample").glob("*.png"))
    assert [p.name[:15] for p in samples] == ["lora_e000000_00"], samples  # kohya names the first sample e000000
    image = Image.open(samples[0])
    assert image.size == (64, 64)


@pytest.mark.parametrize("flag, value, expected", [
    ("--gradient_accumulation_steps", "0", "must be >= 1"),
    ("--learning_rate", "-1", "must be a number >= 0"),
    ("--learning_rate", "1e39", "overflows float32"),
    ("--max_train_steps", "0", "must be >= 1"),
])
def test_impossible_numbers_are_one_line_naming_the_flag(shapes_data, tmp_path, run_script, run_in_process, flag, value,
                                                         expected):
    run = run_script if flag == "--gradient_accumulation_steps" else run_in_process  # one real process is enough
    result = run("train_network.py", [*data_args(shapes_data, tmp_path / "out"), flag, value], expect_rc=2)
    line = assert_one_error_line(result, flag, expected)
    assert "usage:" not in result.stderr, line


@pytest.mark.parametrize("script, key, value, expected", [
    ("train_sdxl.py", "learning_rate_te1", "-1e-5", "must be a number >= 0"),
    ("train_sdxl.py", "block_lr", '"1,2,3"', "--block_lr takes 23"),
    ("train_controlnet.py", "control_net_lr", "1e40", "overflows float32"),
])
def test_impossible_numbers_in_a_config_file_are_one_line(shapes_data, tmp_path, run_script, run_in_process, script,
                                                          key, value, expected):
    config = tmp_path / "config.toml"
    config.write_text(f"[training]\n{key} = {value}\n")
    run = run_in_process if key == "block_lr" else run_script  # one real process per script
    result = run(script, [*data_args(shapes_data, tmp_path / "out"), "--config_file", config], expect_rc=2)
    assert_one_error_line(result, key, expected)
