"""kohya parity, measured: every flag of kohya's SD/SDXL scripts (tests/data/kohya_flags.toml, read from kohya's
parsers) is accepted by our matching script or listed in [not_supported] with the reason; and the saving/resume
and memory flags added for it do what kohya's do, checked through the command line."""

from __future__ import annotations

import importlib
import tomllib
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.user_paths import assert_one_error_line, lora_args
from tools.make_sample_dataset import make_sample_dataset

DATA = Path(__file__).parent / "data" / "kohya_flags.toml"


@cache
def census_data() -> dict:
    return tomllib.loads(DATA.read_text())


@cache
def option_strings(script: str) -> frozenset[str]:
    parser = importlib.import_module(Path(script).stem).build_parser()
    return frozenset(option for action in parser._actions for option in action.option_strings)


def test_every_kohya_flag_is_accepted_or_listed_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    data = census_data()
    not_supported = data["not_supported"]
    unexplained, lines = {}, []
    for kohya_script, entry in data["scripts"].items():
        ours = option_strings(entry["ours"])
        missing = [flag for flag in entry["flags"] if flag not in ours]
        accepted = len(entry["flags"]) - len(missing)
        lines.append(f"{kohya_script} -> {entry['ours']}: {accepted}/{len(entry['flags'])} accepted, "
                     f"{len(missing)} not supported: {' '.join(missing)}")
        unexplained.update({f"{kohya_script}: {flag}": None for flag in missing if flag not in not_supported})
    with capsys.disabled():
        print("\nkohya flag census (kohya-ss/sd-scripts v0.10.1)\n  " + "\n  ".join(lines))
    assert not unexplained, f"kohya flags neither accepted nor in [not_supported]: {sorted(unexplained)}"


def test_not_supported_lists_only_flags_still_missing_each_with_a_reason() -> None:
    data = census_data()
    missing_somewhere = {flag for entry in data["scripts"].values() for flag in entry["flags"]
                         if flag not in option_strings(entry["ours"])}
    for flag, reason in data["not_supported"].items():
        assert flag in missing_somewhere, f"{flag} is accepted now: remove it from [not_supported]"
        assert isinstance(reason, str) and len(reason) > 20, flag


def test_census_counts_match_kohyas_parsers() -> None:
    """The counts the issue measured at kohya v0.10.1, so the data file is not silently cut down."""
    counts = {name: len(entry["flags"]) for name, entry in census_data()["scripts"].items()}
    assert counts == {"train_network": 193, "sdxl_train_network": 196, "sdxl_train": 176, "fine_tune": 167,
                      "train_control_net": 153, "sdxl_train_control_net": 169}
    assert all(len(set(entry["flags"])) == len(entry["flags"]) for entry in census_data()["scripts"].values())


# ---------------------------------------------------------------------------------------------------------------
# saving / resume flags


@pytest.fixture(scope="module")
def one_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image: one optimizer step per epoch at batch size 1."""
    return make_sample_dataset(tmp_path_factory.mktemp("one") / "data", count=1, size=64, seed=1).parent


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images: two optimizer steps per epoch at batch size 1."""
    return make_sample_dataset(tmp_path_factory.mktemp("two") / "data", count=2, size=64, seed=1).parent


def _saved(output: Path) -> set[str]:
    return {p.name for p in output.iterdir() if not p.name.startswith(".")}


def test_save_n_epoch_ratio_and_save_last_n_epochs_state(run_script, tiny_model_dirs, one_image, tmp_path) -> None:
    """4 epochs, --save_n_epoch_ratio 4: a save every 4 // 4 = 1 epoch, replacing --save_every_n_epochs 3 (kohya);
    --save_last_n_epochs_state 1 keeps only the newest epoch state while every model save stays."""
    out = tmp_path / "out"
    args = lora_args(tiny_model_dirs["sd15"], one_image, out, 1, "--max_train_epochs", "4",
                     "--save_every_n_epochs", "3", "--save_n_epoch_ratio", "4", "--save_state",
                     "--save_last_n_epochs_state", "1")
    run_script("train_network.py", args)
    assert _saved(out) == {"lora-000001.safetensors", "lora-000002.safetensors", "lora-000003.safetensors",
                           "lora.safetensors", "lora-000003-state", "lora-state"}


def test_initial_step_counts_from_there_and_skip_until_initial_step_skips_the_data(run_script, run_in_process,
                                                                                  tiny_model_dirs, two_images,
                                                                                  tmp_path) -> None:
    """Two steps per epoch, --max_train_steps 5 --initial_step 3. With --skip_until_initial_step the run is at
    step 3 (epoch 2, its first batch skipped) and trains steps 4-5; without it training starts at the beginning of
    epoch 2, i.e. step 2, and trains steps 3-5. --save_every_n_steps 1 names each step trained."""
    skip, plain = tmp_path / "skip", tmp_path / "plain"
    common = ("--save_every_n_steps", "1", "--initial_step", "3", "--disable_mmap_load_safetensors", "--lowram",
              "--highvram")
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], two_images, skip, 5, *common,
                                                      "--skip_until_initial_step"))
    assert "starting at step 3 (epoch 2): the batches before it are skipped" in result.stdout
    assert "after 5 steps" in result.stdout
    assert _saved(skip) == {"lora-step00000004.safetensors", "lora.safetensors"}
    # --initial_step ran as typed above; without --skip_until_initial_step only the start differs
    result = run_in_process("train_network.py", lora_args(tiny_model_dirs["sd15"], two_images, plain, 5, *common))
    assert "starting at step 2 (epoch 2): the data starts at the beginning of that epoch" in result.stdout
    assert _saved(plain) == {"lora-step00000003.safetensors", "lora-step00000004.safetensors", "lora.safetensors"}
    from safetensors import safe_open

    with safe_open(str(skip / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "5"


def test_initial_epoch_is_its_first_step(tiny_model_dirs, two_images, tmp_path, capsys) -> None:
    import train_network

    out = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], two_images, out, 4, "--initial_epoch", "2",
                                        "--save_every_n_epochs", "1")) == 0
    assert "starting at step 2 (epoch 2)" in capsys.readouterr().out
    assert _saved(out) == {"lora.safetensors"}  # epoch 2 is the last: only the final save


def _one_error_line(script: str, argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """The flags as typed, refused while parsing (before any model loads) with one error line."""
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(argv)
    result = SimpleNamespace(returncode=exit_info.value.code, stderr=capsys.readouterr().err)
    assert_one_error_line(result, *needles)


@pytest.mark.parametrize("flags, needles", [
    (("--initial_step", "5"), ("--initial_step 5", "--max_train_steps 5")),
    (("--initial_step", "-1"), ("--initial_step must be 0 or more",)),
    (("--initial_epoch", "0"), ("--initial_epoch must be 1 or more",)),
])
def test_bad_start_positions_are_one_error_line(tiny_model_dirs, two_images, tmp_path, capsys, flags, needles) -> None:
    _one_error_line("train_network", lora_args(tiny_model_dirs["sd15"], two_images, tmp_path, 5, *flags), capsys,
                    *needles)
    assert not (tmp_path / "lora.safetensors").exists()


def test_diffusers_xformers_that_cannot_work_is_one_error_line(tiny_model_dirs, two_images, tmp_path, capsys) -> None:
    """Refused at parse time, before any model loads, when CUDA or the xformers package is missing."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None:
        return  # it can work here: nothing to refuse
    needle = "needs the xformers package" if torch.cuda.is_available() else "needs a CUDA GPU"
    _one_error_line("train_sdxl", ["--pretrained_model_name_or_path", str(tiny_model_dirs["sdxl"]),
                                   "--train_data_dir", str(two_images / "images"), "--output_dir", str(tmp_path),
                                   "--diffusers_xformers"], capsys, "--diffusers_xformers " + needle)

# ---------------------------------------------------------------------------------------------------------------
# memory flags


def test_unmapped_read_gives_the_same_tensors(tmp_path) -> None:
    """--disable_mmap_load_safetensors reads the file whole instead of memory-mapping it: same tensors, same metadata."""
    from library.io import atomic_save_safetensors
    from library.models.loading import read_checkpoint

    path = tmp_path / "m.SAFETENSORS"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    atomic_save_safetensors(tensors, path, {"note": "x"})
    mapped, unmapped = read_checkpoint(path), read_checkpoint(path, mmap=False)
    assert mapped[1] == unmapped[1] == {"note": "x"}
    assert all(torch.equal(mapped[0][k], unmapped[0][k]) and unmapped[0][k].dtype == tensors[k].dtype for k in tensors)


def test_sdxl_use_safetensors_fused_optimizer_groups_and_unmapped_single_file(run_script, tiny_model_dirs, one_image,
                                                                              tmp_path) -> None:
    """sdxl_train: --save_model_as ckpt --use_safetensors writes .safetensors (kohya); --fused_optimizer_groups runs
    the fused backward; a single-file base model is read with --disable_mmap_load_safetensors."""
    from library.models.loading import load_model, save_single_file

    single = tmp_path / "base.safetensors"
    save_single_file(load_model(tiny_model_dirs["sdxl"]), single)
    out = tmp_path / "out"
    result = run_script("train_sdxl.py", [
        "--pretrained_model_name_or_path", str(single), "--train_data_dir", str(one_image / "images"),
        "--in_json", str(one_image / "meta.json"), "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64",
        "--max_bucket_reso", "128", "--output_dir", str(out), "--output_name", "sdxl", "--max_train_steps", "1",
        "--learning_rate", "1e-4", "--seed", "1", "--max_data_loader_n_workers", "0", "--save_model_as", "ckpt",
        "--use_safetensors", "--fused_optimizer_groups", "4", "--disable_mmap_load_safetensors"])
    assert "[fused backward]" in result.stdout
    assert _saved(out) == {"sdxl.safetensors"}
    from safetensors import safe_open

    key = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet's first conv, in the single-file layout
    with safe_open(str(out / "sdxl.safetensors"), "pt") as trained, safe_open(str(single), "pt") as base:
        assert not torch.equal(trained.get_tensor(key), base.get_tensor(key))  # the fused steps trained it


def test_controlnet_fused_backward_pass(run_script, tiny_model_dirs, one_image, tmp_path) -> None:
    out = tmp_path / "out"
    result = run_script("train_controlnet.py", [
        "--pretrained_model_name_or_path", str(tiny_model_dirs["sd15"]), "--train_data_dir", str(one_image / "images"),
        "--in_json", str(one_image / "meta.json"), "--conditioning_filter", "canny", "--resolution", "64",
        "--learning_rate", "1e-3", "--seed", "2", "--max_data_loader_n_workers", "0", "--output_dir", str(out),
        "--output_name", "cn", "--max_train_steps", "2", "--fused_backward_pass", "--optimizer_type", "AdamW"])
    assert "[fused backward]" in result.stdout
    from library.models.controlnet_models import load_controlnet

    assert load_controlnet(out / "cn.safetensors").controlnet_mid_block.weight.abs().sum() > 0  # it learned

