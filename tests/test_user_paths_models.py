"""Model and LoRA paths as a user meets them (issue 9: B4, B6, B7, D12).

B4: no LoRA module on a text-encoder layer the loss never sees; every module gets a gradient in step 1, and an
SDXL LoRA trains on two processes. B6: one family detector, so start-up plans an SD1 folder with SD1's bucket
step. B7: the diffusers folders we write use the standard (transformers 4.x) key names. D12: broken model and
LoRA files and a zero rank are one ``error:`` line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.models.families import detect_family
from library.models.loading import load_model, save_single_file
from library.cli.setup_from_args import peek_family
from library.models.text_encoding import PromptEncoder
from library.models.tiny_models import build_tiny_model
from networks.lora import LoRANetwork, create_network
from tests.helpers.user_paths import assert_one_error_line, lora_args

FAMILY_NAMES = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}


# --------------------------------------------------------------------------------------------------
# B4: every LoRA module can learn


def _step_one_gradients(family: str, clip_skip: int | None) -> LoRANetwork:
    """One forward/backward of the training computation (prompt -> text encoders -> UNet -> loss)."""
    model = build_tiny_model(family, seed=0)
    network = create_network(1.0, 4, 2.0, model.vae, model.text_encoders, model.unet, clip_skip=clip_skip)
    network.apply_to(model.text_encoders, model.unet)
    network.train()
    # up weights start at zero, which hides nothing: their gradient is down(x) times the output gradient
    encoder = PromptEncoder(FAMILY_NAMES[family], model.tokenizers, model.text_encoders, clip_skip=clip_skip)
    text = encoder.encode(["a red circle on a blue square"])
    added = None
    if text.pooled is not None:
        added = {"text_embeds": text.pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    # 16x16 latents: the mid block's self-attention sees 4 positions (over 1 position softmax has no gradient)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prediction = model.unet(latents, 500, encoder_hidden_states=text.hidden_states, added_cond_kwargs=added).sample
    torch.nn.functional.mse_loss(prediction, torch.randn_like(prediction)).backward()
    return network


@pytest.mark.parametrize(("family", "clip_skip"), [("sd15", None), ("sd15", 2), ("sd21", None), ("sd21", 2),
                                                   ("sdxl", None), ("sdxl", 2)])
def test_every_lora_module_gets_a_gradient_in_step_one(family, clip_skip):
    network = _step_one_gradients(family, clip_skip)
    assert network.text_encoder_loras and network.unet_loras
    no_grad = [name for name, p in network.named_parameters() if p.grad is None]
    assert not no_grad, no_grad  # DDP stops at step 2 on any of these
    still = [lora.lora_name for lora in network.loras if not lora.lora_up.weight.grad.abs().sum() > 0]
    assert not still, still


@pytest.mark.parametrize(("family", "clip_skip", "te_layers"), [("sd15", None, [2]), ("sd15", 2, [1]),
                                                                ("sd21", 2, [1]), ("sdxl", None, [2, 3])])
def test_modules_only_on_text_encoder_layers_that_reach_the_loss(family, clip_skip, te_layers):
    """Tiny SD1/SD2 encoders have 2 layers, SDXL's 3 + 3: SDXL reads encoder 1 at its penultimate layer and
    encoder 2's last layer through the pooled vector."""
    model = build_tiny_model(family, seed=0)
    network = create_network(1.0, 4, 2.0, None, model.text_encoders, model.unet, clip_skip=clip_skip)
    for prefix, layers in zip(network.text_encoder_prefixes, te_layers):
        names = [lora.lora_name for lora in network.text_encoder_loras if lora.lora_name.startswith(prefix + "_")]
        found = {int(name.split("_layers_")[1].split("_")[0]) for name in names}
        assert found == set(range(layers)), (prefix, sorted(found))
        assert len(names) == 6 * layers  # q, k, v, out, fc1, fc2


def test_a_lora_with_modules_on_unused_layers_still_loads(tmp_path):
    """kohya's files (and ours before this fix) carry text encoder 1's last layer for SDXL: continuing from
    one skips those tensors instead of refusing the file."""
    model = build_tiny_model("sdxl", seed=0)
    everything = LoRANetwork(model.text_encoders, model.unet, lora_dim=4, alpha=2.0)
    assert any("lora_te1_text_model_encoder_layers_2_" in lora.lora_name for lora in everything.loras)
    for lora in everything.loras:
        torch.nn.init.normal_(lora.lora_up.weight)
    file = tmp_path / "kohya_layout.safetensors"
    everything.save_weights(file)
    network = create_network(1.0, 4, 2.0, None, model.text_encoders, model.unet)
    network.load_weights(file)
    saved = load_file(str(file))
    for name, value in network.state_dict().items():
        torch.testing.assert_close(value, saved[name])


def test_sdxl_lora_with_text_encoder_trains_on_two_processes(tiny_model_dirs, shapes_data, tmp_path,
                                                             launch_two_cpu_processes):
    output = tmp_path / "out"
    launch_two_cpu_processes("train_network.py", lora_args(tiny_model_dirs["sdxl"], shapes_data, output, 3))
    tensors = load_file(str(output / "lora.safetensors"))
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    still_zero = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and v.abs().sum() == 0]
    assert not still_zero, still_zero


# --------------------------------------------------------------------------------------------------
# B6: one family detector


@pytest.fixture(scope="module")
def single_files(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each tiny model as an A1111-style single file (.safetensors) and the SD1.5 one also as a .ckpt."""
    root = tmp_path_factory.mktemp("single_files")
    files = {}
    for family, folder in tiny_model_dirs.items():
        files[family] = root / f"{family}.safetensors"
        save_single_file(load_model(folder), files[family])
    files["sd15_ckpt"] = root / "sd15.ckpt"
    save_single_file(load_model(tiny_model_dirs["sd15"]), files["sd15_ckpt"])
    return files


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_start_up_and_loading_see_the_same_family(tiny_model_dirs, single_files, family):
    expected = FAMILY_NAMES[family]
    for path in (tiny_model_dirs[family], single_files[family]):
        args = argparse.Namespace(family=None, pretrained_model_name_or_path=str(path), v2=False)
        loaded = load_model(path).family
        assert peek_family(args) is detect_family(path) is loaded and loaded.name == expected
    if family == "sd15":
        assert detect_family(single_files["sd15_ckpt"]).name == "sd1"


def test_sd15_folder_is_planned_with_the_sd_bucket_step(tiny_model_dirs, shapes_data, tmp_path, run_script):
    """SD1's UNet needs bucket sides in multiples of 64; start-up used to take the SDXL step (32) for any
    folder without --v2, and trained an SD1.5 model on 32-pixel bucket steps."""
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1,
                                                       "--bucket_reso_steps", "32"), expect_rc=None)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "bucket_reso_steps must be a positive multiple of 64 for this model, got 32" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------
# B7: standard key names in the folders we write


def clip_text_keys(config: dict, with_projection: bool) -> set[str]:
    """transformers' CLIPTextModel / CLIPTextModelWithProjection state-dict names (4.x, what diffusers pins)."""
    keys = {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    for layer in range(config["num_hidden_layers"]):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"text_model.encoder.layers.{layer}.{part}.weight", f"text_model.encoder.layers.{layer}.{part}.bias"}
    return keys | ({"text_projection.weight"} if with_projection else set())


def file_keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def component_keys(folder: Path) -> set[str]:
    """Tensor names of one component folder, whichever format it was saved in (safetensors or pickle)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    assert files, f"no weights in {folder}"
    keys: set[str] = set()
    for file in files:
        keys |= file_keys(file) if file.suffix == ".safetensors" else set(torch.load(str(file), weights_only=True))
    return keys


def assert_standard_folder(folder: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index = json.loads((folder / "model_index.json").read_text())
    for name, with_projection in (("text_encoder", False), ("text_encoder_2", True)):
        if name in index:
            config = json.loads((folder / name / "config.json").read_text())
            assert component_keys(folder / name) == clip_text_keys(config, with_projection), name
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        keys = component_keys(folder / name)
        config = {k: v for k, v in json.loads((folder / name / "config.json").read_text()).items() if not k.startswith("_")}
        with torch.device("meta"):
            assert keys == set(cls(**config).state_dict()), name
    unet = component_keys(folder / "unet")
    assert {"conv_in.weight", "time_embedding.linear_1.weight",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"} <= unet
    vae = component_keys(folder / "vae")
    assert {"encoder.mid_block.attentions.0.to_q.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"} <= vae


def test_make_tiny_model_writes_standard_key_names(tmp_path, run_script):
    """SDXL covers both text-encoder classes (CLIPTextModel and CLIPTextModelWithProjection)."""
    run_script("tools/make_tiny_model.py", ["--family", "sdxl", "--output", tmp_path / "sdxl"])
    assert_standard_folder(tmp_path / "sdxl")


def test_convert_model_to_a_folder_writes_standard_key_names(single_files, tmp_path, run_script):
    run_script("tools/convert_model.py", ["--input", single_files["sdxl"], "--output", tmp_path / "sdxl"])
    assert_standard_folder(tmp_path / "sdxl")


def test_train_sdxl_saved_as_diffusers_has_standard_key_names(tiny_model_dirs, shapes_data, tmp_path, run_script):
    output = tmp_path / "out"
    run_script("train_sdxl.py", ["--pretrained_model_name_or_path", tiny_model_dirs["sdxl"],
                                 "--in_json", shapes_data / "meta.json", "--train_data_dir", shapes_data / "images",
                                 "--resolution", "64", "--learning_rate", "1e-3", "--seed", "5",
                                 "--max_data_loader_n_workers", "0", "--output_dir", output, "--output_name", "model",
                                 "--max_train_steps", "1", "--train_text_encoder", "--save_model_as", "diffusers"])
    assert_standard_folder(output / "model")


def test_controlnet_folder_has_standard_key_names(tiny_model_dirs, tmp_path):
    from diffusers import ControlNetModel

    from library.models.controlnet_models import create_controlnet, save_controlnet

    model = load_model(tiny_model_dirs["sdxl"])
    save_controlnet(create_controlnet(model.unet), tmp_path / "cn", model.family)
    keys = file_keys(tmp_path / "cn" / "diffusion_pytorch_model.safetensors")
    config = {k: v for k, v in json.loads((tmp_path / "cn" / "config.json").read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        assert keys == set(ControlNetModel(**config).state_dict())
    assert {"controlnet_cond_embedding.conv_in.weight", "controlnet_mid_block.weight"} <= keys


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_transformers_loads_our_text_encoders_with_nothing_missing(tiny_model_dirs, family):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = tiny_model_dirs[family]
    subfolders = [("text_encoder", CLIPTextModel)] + ([("text_encoder_2", CLIPTextModelWithProjection)]
                                                      if family == "sdxl" else [])
    for subfolder, cls in subfolders:
        _, info = cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (subfolder, info)


def test_folders_written_without_the_text_model_prefix_still_load(tiny_model_dirs, tmp_path):
    """Folders from before this fix (transformers 5's bare names) load with the same weights."""
    old = tmp_path / "old"
    shutil.copytree(tiny_model_dirs["sdxl"], old)
    for subfolder in ("text_encoder", "text_encoder_2"):
        file = old / subfolder / "model.safetensors"
        tensors = load_file(str(file))
        save_file({k.removeprefix("text_model."): v for k, v in tensors.items()}, str(file), {"format": "pt"})
    reference, loaded = load_model(tiny_model_dirs["sdxl"]), load_model(old)
    for ours, theirs in zip(reference.text_encoders, loaded.text_encoders):
        for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(theirs.state_dict().items())):
            assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------
# D12: one line per user error


def _truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _lora_file(model_dir: Path, path: Path, dim: int) -> Path:
    model = load_model(model_dir)
    create_network(1.0, dim, 1.0, None, model.text_encoders, model.unet).save_weights(path)
    return path


def test_truncated_model_file_is_one_error_line(single_files, shapes_data, tmp_path, run_script):
    broken = _truncated(single_files["sd15"], tmp_path / "sd15_cut.safetensors")  # an interrupted download
    result = run_script("train_network.py", lora_args(broken, shapes_data, tmp_path / "out", 1), expect_rc=None)
    assert_one_error_line(result, str(broken), "truncated")


def test_model_path_that_is_no_safetensors_file_is_one_error_line(shapes_data, tmp_path, run_in_process):
    fake = tmp_path / "model.safetensors"
    fake.write_text("<html>403 Forbidden</html>")  # a broken model file as a real process: the truncated one above
    result = run_in_process("train_network.py", lora_args(fake, shapes_data, tmp_path / "out", 1), expect_rc=None)
    assert_one_error_line(result, str(fake), "safetensors")


def test_truncated_network_weights_are_one_error_line(tiny_model_dirs, shapes_data, tmp_path, run_script):
    lora = _truncated(_lora_file(tiny_model_dirs["sd15"], tmp_path / "full.safetensors", 4), tmp_path / "cut.safetensors")
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1,
                                                       "--network_weights", lora), expect_rc=None)
    assert_one_error_line(result, str(lora), "truncated")


def test_lora_for_another_family_is_one_error_line(tiny_model_dirs, shapes_data, tmp_path, run_in_process):
    lora = _lora_file(tiny_model_dirs["sdxl"], tmp_path / "sdxl_lora.safetensors", 4)  # real process: truncated above
    result = run_in_process("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1,
                                                           "--network_weights", lora), expect_rc=None)
    assert_one_error_line(result, str(lora), "another model family")


def test_lora_of_another_rank_is_one_error_line(tiny_model_dirs, shapes_data, tmp_path, run_in_process):
    lora = _lora_file(tiny_model_dirs["sd15"], tmp_path / "rank8.safetensors", 8)  # real process: truncated above
    result = run_in_process("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1,
                                                           "--network_weights", lora), expect_rc=None)
    assert_one_error_line(result, str(lora), "--network_dim")


def test_network_dim_zero_is_refused_before_the_model_loads(shapes_data, tmp_path, run_script):
    missing_model = tmp_path / "not_downloaded_yet.safetensors"
    result = run_script("train_network.py", lora_args(missing_model, shapes_data, tmp_path / "out", 1,
                                                       "--network_dim", "0"), expect_rc=None)
    line = assert_one_error_line(result, "--network_dim must be at least 1")
    assert "not_downloaded_yet" not in result.stderr, line
