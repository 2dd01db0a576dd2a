"""fine_tune.py (whole SD1.x/SD2.x models) through its command line: files diffusers loads, what trains and what
stays frozen, two processes, kohya_ss GUI configs, and a refused SDXL model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from library.models.loading import load_model, save_single_file
from tests.helpers.fine_tune_args import changed, fine_tune_args as args_for


@pytest.fixture(scope="module")
def sd15_single_file(tiny_model_dirs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors"
    save_single_file(load_model(tiny_model_dirs["sd15"]), path)
    return path


def test_unet_only_into_a_new_folder_saves_a_single_file_diffusers_loads(tiny_model_dirs, sd15_single_file,
                                                                         shapes_data, tmp_path, run_script):
    output = tmp_path / "runs" / "first"  # does not exist yet
    result = run_script("fine_tune.py", args_for(sd15_single_file, shapes_data, output, 2))
    saved = output / "model.safetensors"  # a single file in, a single file out
    theirs = StableDiffusionPipeline.from_single_file(saved, config=str(tiny_model_dirs["sd15"]), local_files_only=True)
    ours, base = load_model(saved), load_model(tiny_model_dirs["sd15"])
    for name, module in (("unet", ours.unet), ("vae", ours.vae), ("text_encoder", ours.text_encoders[0])):
        a, b = getattr(theirs, name).state_dict(), module.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert changed(ours.unet.state_dict(), base.unet.state_dict())
    assert not changed(ours.text_encoders[0].state_dict(), base.text_encoders[0].state_dict())
    assert "(sd1, epsilon)" in result.stdout and f"saved {saved} after 2 steps" in result.stdout


def test_text_encoder_from_a_kohya_ss_gui_config_with_clip_skip(tiny_model_dirs, shapes_data, tmp_path, run_in_process):
    """The GUI's fine-tune tab writes learning_rate_te into its TOML: here it is fine_tune.py's flag. CLIP skip 2
    reads the penultimate layer, so the last layer must stay as it was (it gets no gradient)."""
    config = tmp_path / "gui.toml"
    config.write_text('learning_rate_te = 0.001\ntrain_text_encoder = true\nclip_skip = 2\n'
                      'save_model_as = "diffusers_safetensors"\n', encoding="utf-8")
    output = tmp_path / "out"
    run_in_process("fine_tune.py", ["--config_file", config, *args_for(tiny_model_dirs["sd15"], shapes_data, output, 2,
                                                                       "--learning_rate", "0")])
    trained = StableDiffusionPipeline.from_pretrained(output / "model", local_files_only=True)
    base = load_model(tiny_model_dirs["sd15"])
    moved = changed(trained.text_encoder.state_dict(), base.text_encoders[0].state_dict())
    last = base.text_encoders[0].config.num_hidden_layers - 1
    assert moved and not any(f"encoder.layers.{last}." in k for k in moved)
    assert not changed(trained.unet.state_dict(), base.unet.state_dict())  # --learning_rate 0: the UNet is frozen


def test_two_processes_sd2_with_the_text_encoder(tiny_model_dirs, shapes_data, tmp_path, launch_two_cpu_processes):
    output = tmp_path / "new" / "out"
    launch_two_cpu_processes("fine_tune.py", args_for(tiny_model_dirs["sd21"], shapes_data, output, 2,
                                                      "--v_parameterization", "--train_text_encoder", "--clip_skip", "2",
                                                      "--save_model_as", "safetensors"))
    saved, base = load_model(output / "model.safetensors"), load_model(tiny_model_dirs["sd21"])
    assert saved.family.name == "sd2" and saved.prediction_type == "v_prediction"
    assert changed(saved.unet.state_dict(), base.unet.state_dict())
    assert changed(saved.text_encoders[0].state_dict(), base.text_encoders[0].state_dict())
    assert all(torch.isfinite(v).all() for v in saved.unet.state_dict().values())


def test_an_sdxl_model_is_refused_with_the_script_to_use(tiny_model_dirs, shapes_data, tmp_path, run_in_process):
    result = run_in_process("fine_tune.py", args_for(tiny_model_dirs["sdxl"], shapes_data, tmp_path / "o", 1),
                            expect_rc=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sdxl" in errors[0] and "train_sdxl.py" in errors[0], result.stderr
