"""ControlNet creation, loading and saving, with the single files checked against diffusers' own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file

from library.models.controlnet_models import (
    CONTROLNET_CONFIG_METADATA_KEY,
    controlnet_config_dict,
    controlnet_to_ldm,
    create_controlnet,
    load_controlnet,
    save_controlnet,
)
from library.models.loading import ModelLoadError, StableDiffusionModel
from library.io import read_safetensors_metadata
from library.models.tiny_models import build_tiny_model

FAMILIES = ("sd15", "sd21", "sdxl")
# 4 SD blocks x (2 layers + downsampler or conv_in) = 12 zero convs; SDXL's 3 blocks give 9.
ZERO_CONVS = {"sd15": 12, "sd21": 12, "sdxl": 9}


@pytest.fixture(scope="module")
def tiny() -> dict[str, StableDiffusionModel]:
    return {family: build_tiny_model(family, seed=0) for family in FAMILIES}


def trained(controlnet: ControlNetModel, seed: int = 1) -> ControlNetModel:
    """Every weight random and distinct, as after training: a round trip of zero-initialised convs proves nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in controlnet.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return controlnet


def assert_same_tensors(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def unet_inputs(model: StableDiffusionModel) -> dict:
    generator = torch.Generator().manual_seed(3)
    config = model.unet.config
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 5, config.cross_attention_dim, generator=generator),
    }
    if model.family.size_conditioning:
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, text_dim, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return inputs


# ------------------------------------------------------------------------------------------ creation


@pytest.mark.parametrize("family", FAMILIES)
def test_create_copies_the_encoder_and_zero_initialises_the_outputs(tiny, family: str) -> None:
    model = tiny[family]
    controlnet = create_controlnet(model.unet)
    unet_sd, cn_sd = model.unet.state_dict(), controlnet.state_dict()

    copied = [k for k in cn_sd if not k.startswith("controlnet_")]
    assert copied and all(torch.equal(cn_sd[k], unet_sd[k]) for k in copied)
    assert {k.split(".")[0] for k in copied} == {"conv_in", "time_embedding", "down_blocks", "mid_block"} | (
        {"add_embedding"} if family == "sdxl" else set())
    assert controlnet.down_blocks[0].resnets[0].conv1.weight.data_ptr() != model.unet.down_blocks[0].resnets[0].conv1.weight.data_ptr()

    assert len(controlnet.controlnet_down_blocks) == ZERO_CONVS[family]
    zeros = [k for k in cn_sd if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out."))]
    assert len(zeros) == 2 * (ZERO_CONVS[family] + 2)
    assert all(torch.count_nonzero(cn_sd[k]) == 0 for k in zeros)
    assert torch.count_nonzero(cn_sd["controlnet_cond_embedding.conv_in.weight"]) > 0
    assert all(p.dtype == torch.float32 and p.requires_grad for p in controlnet.parameters())

    if family == "sdxl":
        assert controlnet.config.addition_embed_type == "text_time"
        assert controlnet.config.addition_time_embed_dim == 8
        assert controlnet.config.projection_class_embeddings_input_dim == 80
        assert list(controlnet.config.transformer_layers_per_block) == [1, 1, 2]
    else:
        assert controlnet.config.addition_embed_type is None
        assert controlnet.config.use_linear_projection == (family == "sd21")


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_controlnet_leaves_the_unet_output_unchanged(tiny, family: str) -> None:
    model = tiny[family]
    controlnet = create_controlnet(model.unet).eval()
    inputs = unet_inputs(model)
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))  # 8x the 8x8 latent
    with torch.no_grad():
        down, mid = controlnet(**inputs, controlnet_cond=cond, return_dict=False)
        assert len(down) == ZERO_CONVS[family]
        assert all(torch.count_nonzero(r) == 0 for r in down) and torch.count_nonzero(mid) == 0
        base = model.unet(**inputs).sample
        controlled = model.unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert down[0].shape == (2, model.unet.config.block_out_channels[0], 8, 8)
    assert torch.equal(base, controlled)


def test_conditioning_channels_reach_the_hint_block(tiny) -> None:
    controlnet = create_controlnet(tiny["sd15"].unet, conditioning_channels=1)
    assert controlnet.controlnet_cond_embedding.conv_in.weight.shape == (16, 1, 3, 3)
    assert controlnet.controlnet_cond_embedding.conv_out.weight.shape == (32, 256, 3, 3)


# ------------------------------------------------------------------------------------------ diffusers folder


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_folder_round_trip_loads_in_diffusers(tiny, tmp_path: Path, family: str) -> None:
    controlnet = trained(create_controlnet(tiny[family].unet))
    save_controlnet(controlnet, tmp_path / "cn", family)
    assert sorted(p.name for p in (tmp_path / "cn").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not (tmp_path / "cn.tmp-saving").exists()
    assert_same_tensors(ControlNetModel.from_pretrained(tmp_path / "cn", local_files_only=True), controlnet)
    assert_same_tensors(load_controlnet(tmp_path / "cn"), controlnet)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_controlnet(controlnet, tmp_path / "cn", family)


def test_folder_save_in_half_precision_leaves_the_module_alone(tiny, tmp_path: Path) -> None:
    controlnet = trained(create_controlnet(tiny["sd15"].unet))
    save_controlnet(controlnet, tmp_path / "cn16", "sd15", dtype=torch.float16)
    assert controlnet.dtype == torch.float32
    stored = load_file(tmp_path / "cn16" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors(stored, {k: v.half() for k, v in controlnet.state_dict().items()})
    loaded = load_controlnet(tmp_path / "cn16", torch_dtype=torch.float16)
    assert_same_tensors(loaded.state_dict(), stored)


# ------------------------------------------------------------------------------------------ single files


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip(tiny, tmp_path: Path, family: str) -> None:
    controlnet = trained(create_controlnet(tiny[family].unet))
    path = tmp_path / "cn.safetensors"
    save_controlnet(controlnet, path, family, metadata={"ss_training_comment": "hello"})
    metadata = read_safetensors_metadata(path)
    assert json.loads(metadata[CONTROLNET_CONFIG_METADATA_KEY])["block_out_channels"] == list(controlnet.config.block_out_channels)
    assert metadata["ss_training_comment"] == "hello"
    loaded = load_controlnet(path)
    assert_same_tensors(loaded, controlnet)
    as_json = lambda model: json.loads(json.dumps(controlnet_config_dict(model)))  # noqa: E731 - tuples vs lists
    assert as_json(loaded) == as_json(controlnet)

    keys = load_file(path).keys()
    if family == "sdxl":  # the diffusers-keyed convention of kohya's SDXL trainer, ComfyUI and A1111
        assert set(keys) == set(controlnet.state_dict())
    else:
        assert all(k.startswith("control_model.") for k in keys) and len(keys) == len(controlnet.state_dict())


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_sd_single_file_has_the_original_controlnet_layout(tiny, tmp_path: Path, family: str) -> None:
    controlnet = trained(create_controlnet(tiny[family].unet))
    path = tmp_path / "cn.safetensors"
    save_controlnet(controlnet, path, family)
    tensors = load_file(path)
    module = controlnet.state_dict()
    expected = {  # original name -> diffusers name, by hand from lllyasviel's cldm.py
        "control_model.input_hint_block.0.weight": "controlnet_cond_embedding.conv_in.weight",
        "control_model.input_hint_block.2.weight": "controlnet_cond_embedding.blocks.0.weight",
        "control_model.input_hint_block.4.bias": "controlnet_cond_embedding.blocks.1.bias",
        "control_model.input_hint_block.12.weight": "controlnet_cond_embedding.blocks.5.weight",
        "control_model.input_hint_block.14.weight": "controlnet_cond_embedding.conv_out.weight",
        "control_model.zero_convs.0.0.weight": "controlnet_down_blocks.0.weight",
        "control_model.zero_convs.11.0.bias": "controlnet_down_blocks.11.bias",
        "control_model.middle_block_out.0.weight": "controlnet_mid_block.weight",
        "control_model.time_embed.0.weight": "time_embedding.linear_1.weight",
        "control_model.time_embed.2.bias": "time_embedding.linear_2.bias",
        "control_model.input_blocks.0.0.weight": "conv_in.weight",
        "control_model.input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.conv1.weight",
        "control_model.input_blocks.1.1.proj_in.weight": "down_blocks.0.attentions.0.proj_in.weight",
        "control_model.input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "control_model.input_blocks.11.0.out_layers.3.weight": "down_blocks.3.resnets.1.conv2.weight",
        "control_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "control_model.middle_block.2.emb_layers.1.weight": "mid_block.resnets.1.time_emb_proj.weight",
    }
    for ldm_key, diffusers_key in expected.items():
        assert torch.equal(tensors[ldm_key], module[diffusers_key]), ldm_key
    # SD1 projects with 1x1 convolutions, SD2 with linear layers: both kept as they are.
    assert tensors["control_model.input_blocks.1.1.proj_in.weight"].ndim == (2 if family == "sd21" else 4)
    assert "control_model.input_hint_block.1.weight" not in tensors  # odd indices are the SiLUs


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_own_single_file_loader_reads_our_file(tiny, tmp_path: Path, family: str) -> None:
    controlnet = trained(create_controlnet(tiny[family].unet))
    path = tmp_path / "cn.safetensors"
    save_controlnet(controlnet, path, family)
    controlnet.save_config(tmp_path / "config")  # diffusers needs a config; offline it must be a local folder
    theirs = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True)
    assert_same_tensors(theirs, controlnet)


def test_ckpt_and_half_precision_single_files(tiny, tmp_path: Path) -> None:
    controlnet = trained(create_controlnet(tiny["sd21"].unet))
    save_controlnet(controlnet, tmp_path / "cn.ckpt", "sd2", dtype=torch.float16)
    saved = torch.load(tmp_path / "cn.ckpt", weights_only=True)
    assert saved["state_dict"]["control_model.zero_convs.0.0.weight"].dtype == torch.float16
    loaded = load_controlnet(tmp_path / "cn.ckpt")  # float32 by default, as from_pretrained gives
    assert_same_tensors(loaded.state_dict(), {k: v.half().float() for k, v in controlnet.state_dict().items()})


# ------------------------------------------------------------------------------------------ foreign files


def test_foreign_original_layout_files_load_with_the_unet_config(tiny, tmp_path: Path) -> None:
    """lllyasviel-style .pth (control_model.*) and thibaud-style unprefixed files, with no metadata of ours."""
    unet = tiny["sd15"].unet
    controlnet = trained(create_controlnet(unet, conditioning_channels=1))
    ldm = controlnet_to_ldm(controlnet.state_dict(), controlnet.config)
    torch.save(ldm, tmp_path / "control_sd15_tiny.pth")
    save_file({k[len("control_model."):]: v for k, v in ldm.items()}, tmp_path / "unprefixed.safetensors")

    for name in ("control_sd15_tiny.pth", "unprefixed.safetensors"):
        loaded = load_controlnet(tmp_path / name, unet_config_for_fallback=unet.config)
        assert_same_tensors(loaded, controlnet)
        assert loaded.config.conditioning_channels == 1  # read off the hint block's first conv
        assert tuple(loaded.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)

    # without the UNet config the standard SD1.5 config is tried, and the tiny widths do not fit it
    with pytest.raises(ModelLoadError, match="unet_config_for_fallback") as error:
        load_controlnet(tmp_path / "control_sd15_tiny.pth")
    assert "control_sd15_tiny.pth" in str(error.value)


def test_foreign_diffusers_keyed_sdxl_file_loads_with_the_unet_config(tiny, tmp_path: Path) -> None:
    unet = tiny["sdxl"].unet
    controlnet = trained(create_controlnet(unet))
    save_file(controlnet.state_dict(), tmp_path / "kohya_sdxl_cn.safetensors")
    loaded = load_controlnet(tmp_path / "kohya_sdxl_cn.safetensors", unet_config_for_fallback=unet.config)
    assert_same_tensors(loaded, controlnet)
    assert loaded.config.addition_embed_type == "text_time"
    # an SD1.5 UNet config does not describe an SDXL ControlNet: named file, clear reason
    with pytest.raises(ModelLoadError, match="kohya_sdxl_cn.safetensors.*does not have"):
        load_controlnet(tmp_path / "kohya_sdxl_cn.safetensors", unet_config_for_fallback=tiny["sd15"].unet.config)


# ------------------------------------------------------------------------------------------ errors


def test_files_that_are_no_controlnet_are_refused_by_name(tmp_path: Path) -> None:
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "random.safetensors")
    with pytest.raises(ModelLoadError, match=r"random\.safetensors is not a ControlNet checkpoint"):
        load_controlnet(tmp_path / "random.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "sd.safetensors")
    with pytest.raises(ModelLoadError, match="looks like a Stable Diffusion checkpoint"):
        load_controlnet(tmp_path / "sd.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_controlnet(tmp_path / "missing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_controlnet(tmp_path / "folder")


def test_save_refuses_a_family_that_does_not_match(tiny, tmp_path: Path) -> None:
    controlnet = create_controlnet(tiny["sd15"].unet)
    with pytest.raises(ValueError, match="family sdxl"):
        save_controlnet(controlnet, tmp_path / "cn.safetensors", "sdxl")
    assert not (tmp_path / "cn.safetensors").exists()
