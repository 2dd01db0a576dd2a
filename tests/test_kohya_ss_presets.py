"""kohya_ss GUI configs run unchanged: the TOML files the GUI writes, through `--config_file`, as a GUI user runs them.

The presets in tests/data/kohya_ss_presets/ keep the GUI's keys and value styles (GUI-only keys such as `epoch` and
`noise_offset_type`, 0/1 for booleans, `xformers` next to `mem_eff_attn`, `sample_every_n_steps = 0`); only the
model, data and output paths are replaced here. Steps and resolution are overridden on the command line, which
wins over the file, so each preset trains one step in 64 px buckets on the tiny models.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_network
from library.cli import config
from tests.helpers.user_paths import assert_one_error_line

PRESETS = Path(__file__).resolve().parent / "data" / "kohya_ss_presets"
# The presets keep the GUI's bucket_no_upscale = true: the 64-96 px test images then sit in 64 px buckets (sides
# rounded down to bucket_reso_steps) under a 128 px resolution; at --resolution 64 they would be scaled below 64.
ONE_STEP_AT_64PX = ["--max_train_steps", "1", "--resolution", "128", "--min_bucket_reso", "64",
                    "--max_bucket_reso", "128"]
GUI_NOTE = "note: ignored kohya_ss GUI keys (sd-scripts ignores them too): "


def preset(name: str, destination: Path, **paths: object) -> Path:
    """``name`` copied to ``destination`` with the value of each key in ``paths`` replaced (None: line removed)."""
    text = (PRESETS / name).read_text(encoding="utf-8")
    for key, value in paths.items():
        pattern = re.compile(rf'^{key} = ".*"$\n', re.MULTILINE)
        assert pattern.search(text), f"{name} has no {key}"
        text = pattern.sub("" if value is None else f'{key} = "{Path(value).as_posix()}"\n', text)
    destination.write_text(text, encoding="utf-8")
    return destination


def dreambooth_folder(shapes_data: Path, root: Path) -> Path:
    """The GUI's image folder: one '<repeats>_<class>' subfolder with '.txt' captions (its default extension)."""
    concept = root / "img" / "1_shapes"
    concept.mkdir(parents=True)
    for image in sorted((shapes_data / "images").glob("*.png")):
        shutil.copy(image, concept / image.name)
        shutil.copy(image.with_suffix(".caption"), (concept / image.name).with_suffix(".txt"))
    return concept.parent


def gui_notes(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(GUI_NOTE)]


def lora_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def test_sdxl_lora_preset_trains_with_kohyas_attention_precedence(run_script, tiny_model_dirs, shapes_data, tmp_path):
    output = tmp_path / "out"
    cfg = preset("sdxl_lora.toml", tmp_path / "config_lora.toml", pretrained_model_name_or_path=tiny_model_dirs["sdxl"],
                 train_data_dir=dreambooth_folder(shapes_data, tmp_path), output_dir=output,
                 logging_dir=tmp_path / "log", sample_prompts=None)
    # AdamW8bit needs bitsandbytes' CUDA kernels; bf16 autocast is what the GUI user's GPU runs.
    result = run_script("train_network.py", ["--config_file", cfg, *ONE_STEP_AT_64PX, "--optimizer_type", "AdamW",
                                             "--mixed_precision", "no"])
    assert gui_notes(result.stdout) == [GUI_NOTE + "epoch, noise_offset_type"]
    assert "note: --mem_eff_attn and --xformers are set together: using --mem_eff_attn" in result.stdout
    assert "attention: sliced (mem_eff_attn)" in result.stdout
    metadata = lora_metadata(output / "sdxl_style.safetensors")
    assert metadata["ss_network_dim"] == "32" and metadata["ss_network_alpha"] == "16.0"  # from the file
    assert metadata["ss_steps"] == "1"  # the command line wins over max_train_steps = 1600
    assert metadata["ss_noise_offset"] == "0.0357"


def test_sd15_lora_preset_with_zeros_and_0_1_booleans(run_script, tiny_model_dirs, shapes_data, tmp_path):
    output = tmp_path / "out"
    prompts = tmp_path / "prompt.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2\n", encoding="utf-8")
    cfg = preset("sd15_lora.toml", tmp_path / "sd15.toml", pretrained_model_name_or_path=tiny_model_dirs["sd15"],
                 train_data_dir=dreambooth_folder(shapes_data, tmp_path), output_dir=output, sample_prompts=prompts)
    result = run_script("train_network.py", ["--config_file", cfg, *ONE_STEP_AT_64PX, "--mixed_precision", "no"])
    assert gui_notes(result.stdout) == [GUI_NOTE + "epoch, noise_offset_type"]
    assert not list(output.rglob("*.png"))  # sample_every_n_steps = 0 with prompts given: off, as in kohya
    metadata = lora_metadata(output / "sd15_character.safetensors")
    assert metadata["ss_network_dim"] == "8" and metadata["ss_clip_skip"] == "2" and metadata["ss_seed"] == "1234"
    assert metadata["ss_min_snr_gamma"] == "5.0" and metadata["ss_steps"] == "1"


def test_sdxl_finetune_preset_trains(run_script, tiny_model_dirs, shapes_data, tmp_path):
    output = tmp_path / "out"
    cfg = preset("sdxl_finetune.toml", tmp_path / "finetune.toml", pretrained_model_name_or_path=tiny_model_dirs["sdxl"],
                 in_json=shapes_data / "meta.json", train_data_dir=shapes_data / "images", output_dir=output)
    result = run_script("train_sdxl.py", ["--config_file", cfg, *ONE_STEP_AT_64PX, "--max_data_loader_n_workers", "0"])
    assert gui_notes(result.stdout) == [GUI_NOTE + "noise_offset_type"]
    assert (output / "sdxl_finetune.safetensors").stat().st_size > 0


def test_sdxl_lycoris_preset_trains_lokr_with_kohyas_names(run_script, tiny_model_dirs, shapes_data, tmp_path):
    # network_module = "lycoris.kohya" with algo=lokr, preset=full, conv_dim=1 and network_dim = 100000 (LoKr's
    # "full matrix" setting) in network_args: trained by LyCORIS on kohya's (LDM) module names.
    output = tmp_path / "out"
    cfg = preset("sdxl_lycoris.toml", tmp_path / "lokr.toml", pretrained_model_name_or_path=tiny_model_dirs["sdxl"],
                 train_data_dir=dreambooth_folder(shapes_data, tmp_path), output_dir=output)
    # Prodigy (and its optimizer_args) is an optional package this test machine lacks; the GUI user's machine has it.
    result = run_script("train_network.py", ["--config_file", cfg, *ONE_STEP_AT_64PX, "--optimizer_type", "AdamW",
                                             "--optimizer_args", "weight_decay=0.01", "--mixed_precision", "no"])
    assert gui_notes(result.stdout) == [GUI_NOTE + "epoch, noise_offset_type"]
    file = output / "sdxl_lokr.safetensors"
    with safe_open(str(file), "pt") as handle:
        keys = set(handle.keys())
        dtypes = {handle.get_tensor(key).dtype for key in keys}
        metadata = handle.metadata()
    names = {key.split(".", 1)[0] for key in keys}
    assert not any(name.startswith("lora_te") for name in names)  # network_train_unet_only = true
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_3_0_op",
            "lora_unet_output_blocks_2_2_conv", "lora_unet_middle_block_1_proj_out"} <= names
    def tensors(name: str) -> set[str]:
        return {key.split(".", 1)[1] for key in keys if key.split(".", 1)[0] == name}

    # network_dim = 100000: LoKr's full matrices on Linear layers; conv_dim = 1: rank-1 factors on 3x3 convs
    assert tensors("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == {"lokr_w1", "lokr_w2", "alpha"}
    assert {"lokr_w2_a", "lokr_w2_b", "alpha"} <= tensors("lora_unet_input_blocks_1_0_in_layers_2")
    assert {key.split(".", 1)[1] for key in keys} <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                     "lokr_w2_b", "alpha"}
    assert dtypes == {torch.bfloat16}  # save_precision = "bf16"
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_network_dim"] == "100000"
    assert json.loads(metadata["ss_network_args"])["algo"] == "lokr"
    assert metadata["ss_steps"] == "1"


def test_old_preset_with_bucket_reso_steps_1_is_refused_like_kohya(run_script, tiny_model_dirs, shapes_data, tmp_path):
    cfg = preset("sd15_lora_old_bucket_steps.toml", tmp_path / "old.toml",
                 pretrained_model_name_or_path=tiny_model_dirs["sd15"],
                 train_data_dir=dreambooth_folder(shapes_data, tmp_path), output_dir=tmp_path / "out")
    result = run_script("train_network.py", ["--config_file", cfg, *ONE_STEP_AT_64PX, "--mixed_precision", "no"],
                        expect_rc=None)
    line = assert_one_error_line(result, "--bucket_reso_steps 1 is not a multiple of 32", "set bucket_reso_steps = 64",
                                 f"bucket_reso_steps = 1 comes from config file '{cfg}'")
    assert line.startswith("train_network.py: error:")  # at start-up, before any model loads
    assert not (tmp_path / "out").exists()


# In-process parses: the reading rules themselves.


def parse(tmp_path: Path, text: str, *argv: str) -> argparse.Namespace:
    cfg = tmp_path / "gui.toml"
    cfg.write_text(text, encoding="utf-8")
    return config.parse_args(train_network.build_parser(), ["--config_file", str(cfg), *argv])


def parse_error(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(tmp_path, text)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0]


def test_0_and_1_are_booleans_and_gui_keys_are_named_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(tmp_path, "persistent_data_loader_workers = 0\ncache_latents = 1\nepoch = 3\nlowvram = true\n"
                           '[extra]\nepoch = 3\nnoise_offset_type = "Multires"\n')
    assert args.persistent_data_loader_workers is False and args.cache_latents is True
    assert not hasattr(args, "epoch") and not hasattr(args, "noise_offset_type")
    assert gui_notes(capsys.readouterr().out) == [GUI_NOTE + "epoch, lowvram, noise_offset_type"]


def test_empty_string_means_unset_for_options_without_default(tmp_path: Path) -> None:
    args = parse(tmp_path, 'vae = ""\nnetwork_weights = ""\ncaption_extension = ".txt"\n')
    assert args.vae is None and args.network_weights is None and args.caption_extension == ".txt"


@pytest.mark.parametrize("text, needles", [
    ("persistent_data_loader_workers = 2\n", ["persistent_data_loader_workers = 2", "true or false (or 1 or 0)"]),
    ("epoc = 3\n", ["epoc (did you mean epoch, a kohya_ss GUI key that is ignored?)"]),  # a typo is no GUI key
    ("learning_rat = 1e-4\n", ["learning_rat (did you mean --learning_rate?)"]),
    ("loraplus_lr_ratio = 16\n", ["loraplus_lr_ratio", 'network_args = ["loraplus_lr_ratio=16"]']),
    ('lora_network_weights = "a.safetensors"\n', ["lora_network_weights", "--network_weights"]),
])
def test_other_unknown_keys_stay_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        needles: list[str]) -> None:
    line = parse_error(tmp_path, text, capsys)
    for needle in needles:
        assert needle in line, line


def test_attention_flags_follow_kohyas_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(tmp_path, "sdpa = true\n", "--xformers")
    assert args.sdpa and args.xformers
    assert "using --xformers (kohya's order: mem_eff_attn, then xformers, then sdpa)" in capsys.readouterr().out
