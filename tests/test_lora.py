"""networks/lora: kohya-format LoRA/LoCon — names, counts, maths, dropouts, files, and diffusers reading our files."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from library.models.family_configs import standard_configs
from library.models.ldm_layout import unet_table
from library.models.loading import StableDiffusionModel, build_model
from library.io import read_safetensors_metadata
from library.models.tiny_models import build_tiny_model
from library.adapters.errors import LoRAWeightsError
from library.adapters.lora_files import addnet_hash_legacy, precalculate_safetensors_hashes
from networks.lora import LoRAModule, create_network, create_network_from_weights

FAMILIES = ("sd15", "sd21", "sdxl")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def te_arg(model: StableDiffusionModel) -> nn.Module | list[nn.Module]:
    """What kohya's trainer passes: one encoder, or the list of SDXL's two."""
    return model.text_encoders if len(model.text_encoders) > 1 else model.text_encoders[0]


def make_network(model: StableDiffusionModel, dim: int = 4, alpha: float = 2.0, seed: int = 0, **kwargs):
    """A network with non-zero up weights (a fresh one would change nothing)."""
    network = create_network(1.0, dim, alpha, model.vae, te_arg(model), model.unet, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.1)
    return network


def unet_inputs(model: StableDiffusionModel, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(2, 4, 16, 16, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=generator),
    }
    if model.family.size_conditioning:
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, model.text_encoders[1].config.projection_dim, generator=generator),
            "time_ids": torch.randn(2, 6, generator=generator),
        }
    return inputs


@torch.no_grad()
def unet_out(unet: nn.Module, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample


@torch.no_grad()
def te_out(text_encoder: nn.Module) -> torch.Tensor:
    ids = torch.arange(77).remainder(300).unsqueeze(0) + 400
    return text_encoder(ids).last_hidden_state


def count_targets(model: StableDiffusionModel) -> tuple[int, list[int]]:
    """Counted from the module tree independently of networks.lora."""
    unet = sum(isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1))
               for block in model.unet.modules() if type(block).__name__ == "Transformer2DModel"
               for child in block.modules())
    tes = [sum(isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TE_TARGETS for name, m in te.named_modules())
           for te in model.text_encoders]
    return unet, tes


# ---------------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("family, unet_count, te_counts, locon_count", [
    ("sd1", 192, [72], 278),
    ("sd2", 192, [138], 278),
    ("sdxl", 722, [66, 192], 788),
])
def test_full_size_module_counts_match_kohya(family: str, unet_count: int, te_counts: list[int], locon_count: int) -> None:
    """kohya's counts, except SDXL's text encoder 1: kohya makes 72 modules, 6 of them on its last layer, which
    SDXL's penultimate-layer conditioning never uses; we make none there (issue 9, B4)."""
    model = build_model(family, standard_configs(family), empty_weights=True)
    network = create_network(1.0, 4, 1, None, te_arg(model), model.unet)
    assert len(network.unet_loras) == unet_count
    prefixes = network.text_encoder_prefixes
    assert [sum(l.lora_name.startswith(p + "_") for l in network.text_encoder_loras) for p in prefixes] == te_counts
    assert network.unet_loras[0].lora_down.weight.device.type == "meta"  # nothing was allocated
    locon = create_network(1.0, 4, 1, None, te_arg(model), model.unet, conv_dim="4")
    assert len(locon.unet_loras) == locon_count
    names = {l.lora_name for l in locon.loras}
    if family == "sdxl":
        assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_output_blocks_2_1_proj_out",
                "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_4_0_skip_connection",
                "lora_unet_output_blocks_0_0_emb_layers_1", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_31_mlp_fc2"} <= names
    else:
        assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                "lora_unet_up_blocks_3_attentions_2_proj_out", "lora_unet_down_blocks_0_resnets_0_conv1",
                "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
                "lora_te_text_model_encoder_layers_11_mlp_fc2"} <= names


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_names_shapes_and_counts(family: str) -> None:
    model = build_tiny_model(family)
    network = create_network(1.0, 4, 2, model.vae, te_arg(model), model.unet, conv_dim="2", conv_alpha="1")
    sd = network.state_dict()
    names = {key.split(".")[0] for key in sd}
    for name in names:
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= sd.keys()
        assert sd[f"{name}.alpha"].shape == ()
    assert len(sd) == 3 * len(names)
    assert not any(s in name for name in names for s in ("time_embed", "label_emb", "add_embedding", "conv_in", "conv_out"))

    plain = create_network(1.0, 4, 2, model.vae, te_arg(model), model.unet)
    unet_count, te_counts = count_targets(model)
    if family == "sdxl":
        te_counts[0] -= 6  # text encoder 1's last layer does not reach SDXL's conditioning: no modules there
    assert len(plain.unet_loras) == unet_count
    assert [len([l for l in plain.text_encoder_loras if l.lora_name.startswith(p + "_")])
            for p in plain.text_encoder_prefixes] == te_counts

    if family == "sdxl":
        assert plain.text_encoder_prefixes == ("lora_te1", "lora_te2")
        q, proj_out, conv = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                             "lora_unet_output_blocks_2_1_proj_out", "lora_unet_input_blocks_1_0_in_layers_2")
        te_name = "lora_te2_text_model_encoder_layers_2_mlp_fc2"
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    else:
        assert plain.text_encoder_prefixes == ("lora_te",)
        q, proj_out, conv = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                             "lora_unet_up_blocks_1_attentions_2_proj_out", "lora_unet_down_blocks_0_resnets_0_conv1")
        te_name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert {q, proj_out, conv, te_name} <= names
    # shapes: Linear (rank x in / out x rank); LoCon 3x3 (rank x in x 3 x 3 / out x rank x 1 x 1)
    assert sd[f"{q}.lora_down.weight"].shape[0] == 4 and sd[f"{q}.lora_down.weight"].dim() == 2
    assert sd[f"{conv}.lora_down.weight"].shape[0] == 2 and sd[f"{conv}.lora_down.weight"].shape[2:] == (3, 3)
    assert sd[f"{conv}.lora_up.weight"].shape[1:] == (2, 1, 1)
    assert float(sd[f"{q}.alpha"]) == 2.0 and float(sd[f"{conv}.alpha"]) == 1.0
    # SD1's proj_in/out are 1x1 convolutions and get a 1x1 conv LoRA; SD2/SDXL's are Linear
    proj = sd[f"{proj_out}.lora_down.weight"]
    assert proj.dim() == (4 if family == "sd15" else 2)


def test_unknown_network_argument_is_an_error() -> None:
    model = build_tiny_model("sd15")
    with pytest.raises(ValueError, match="unknown network argument.*conv_dims"):
        create_network(1.0, 4, 1, None, te_arg(model), model.unet, conv_dims="4")


# ---------------------------------------------------------------------------------------------- the maths


def test_forward_is_base_plus_scaled_low_rank_update() -> None:
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
    lora = LoRAModule("t", linear, multiplier=2.0, lora_dim=1, alpha=0.5)
    assert lora.scale == 0.5
    with torch.no_grad():
        lora.lora_down.weight.copy_(torch.tensor([[1.0, 2.0]]))
        lora.lora_up.weight.copy_(torch.tensor([[3.0], [4.0]]))
    lora.apply_to()
    # x=[1,1]: down = 3, up = [9, 12], * multiplier 2 * scale 0.5 -> [9, 12]; plus identity -> [10, 13]
    assert linear(torch.tensor([[1.0, 1.0]])).tolist() == [[10.0, 13.0]]
    assert linear(input=torch.tensor([[1.0, 1.0]])).tolist() == [[10.0, 13.0]]  # keyword call hooked too
    lora.restore()
    assert linear(torch.tensor([[1.0, 1.0]])).tolist() == [[1.0, 1.0]]
    assert LoRAModule("a", nn.Linear(3, 3), lora_dim=4, alpha=0).scale == 1.0
    assert LoRAModule("b", nn.Linear(3, 3), lora_dim=4, alpha=None).scale == 1.0


def test_half_precision_base_keeps_its_dtype_and_lora_stays_float32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).to(torch.bfloat16)
    lora = LoRAModule("h", linear, lora_dim=2, alpha=2)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    out = linear(x)
    expected = nn.functional.linear(x, linear.weight, linear.bias).float() + lora.lora_up(lora.lora_down(x.float()))
    assert out.dtype == torch.bfloat16 and lora.lora_down.weight.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_dropout_values_are_checked() -> None:
    model = build_tiny_model("sd15")
    with pytest.raises(ValueError, match=r"rank_dropout must be in \[0, 1\)"):
        create_network(1.0, 4, 1, None, te_arg(model), model.unet, rank_dropout="1")
    with pytest.raises(ValueError, match="network_dropout"):
        create_network(1.0, 4, 1, None, te_arg(model), model.unet, neuron_dropout=1.5)


def test_init_kaiming_down_zero_up_leaves_model_unchanged() -> None:
    model = build_tiny_model("sd15")
    inputs = unet_inputs(model)
    base = unet_out(model.unet, inputs)
    keys_before = list(model.unet.state_dict())
    network = create_network(1.0, 4, 1, None, te_arg(model), model.unet, conv_dim="4")
    network.apply_to(te_arg(model), model.unet)
    assert list(model.unet.state_dict()) == keys_before  # base model key paths untouched
    assert torch.equal(unet_out(model.unet, inputs), base)
    for lora in network.loras:
        fan_in = lora.lora_down.weight[0].numel()
        assert lora.lora_down.weight.abs().max() <= 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) bound
        assert lora.lora_down.weight.abs().max() > 0.3 / math.sqrt(fan_in)
        assert not lora.lora_up.weight.any()


def test_set_multiplier_scales_the_update_and_restore_removes_it() -> None:
    model = build_tiny_model("sd21")
    inputs = unet_inputs(model)
    base = unet_out(model.unet, inputs)
    network = make_network(model, dim=4, alpha=4)
    network.apply_to(te_arg(model), model.unet, apply_text_encoder=False)
    assert network.text_encoder_loras == [] and all(k.startswith("lora_unet_") for k in network.state_dict())
    full = unet_out(model.unet, inputs)
    assert (full - base).abs().max() > 1e-2
    network.set_multiplier(0.0)
    assert torch.equal(unet_out(model.unet, inputs), base)
    network.restore()
    network.set_multiplier(1.0)
    assert torch.equal(unet_out(model.unet, inputs), base)


def test_training_step_reaches_only_lora_parameters() -> None:
    model = build_tiny_model("sdxl")
    model.unet.requires_grad_(False)
    network = make_network(model, conv_dim="2")
    network.apply_to(te_arg(model), model.unet)
    network.prepare_grad_etc()
    network.on_epoch_start()
    assert network.training
    model.unet(**unet_inputs(model)).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for l in network.unet_loras for p in l.parameters())
    assert all(p.grad is None for p in model.unet.parameters())
    assert sum(p.numel() for p in network.get_trainable_params()) == sum(p.numel() for p in network.parameters())


# ---------------------------------------------------------------------------------------------- dropouts


def _rank1_linear(**dropouts) -> tuple[nn.Linear, LoRAModule]:
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    lora = LoRAModule("d", linear, lora_dim=1, alpha=1, **dropouts)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    return linear, lora


def test_module_dropout_one_skips_lora_in_training_and_never_in_eval() -> None:
    linear, lora = _rank1_linear(module_dropout=1.0, rank_dropout=0.5, dropout=0.5)
    x = torch.randn(4, 3, 8)
    base = nn.functional.linear(x, linear.weight, linear.bias)
    full = base + lora.lora_up(lora.lora_down(x))
    lora.train()
    assert torch.equal(linear(x), base)
    lora.eval()  # no dropout of any kind at inference
    torch.testing.assert_close(linear(x), full)


def test_rank_dropout_masks_per_sample_and_rescales() -> None:
    linear, lora = _rank1_linear(rank_dropout=0.25)
    lora.train()
    x = torch.randn(64, 5, 8)  # (batch, tokens, features): one mask value per (sample, rank), shared over tokens
    base = nn.functional.linear(x, linear.weight, linear.bias)
    update = lora.lora_up(lora.lora_down(x)).detach()
    delta = (linear(x) - base).detach()
    kept = [torch.allclose(delta[i], update[i] / 0.75, atol=1e-5) for i in range(64)]
    dropped = [bool((delta[i] == 0).all()) for i in range(64)]
    assert all(k != d for k, d in zip(kept, dropped))  # every sample is either fully kept (x 1/(1-p)) or dropped
    assert 0 < sum(dropped) < 64


def test_rank_dropout_on_conv_masks_channels_per_sample() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    lora = LoRAModule("c", conv, lora_dim=1, alpha=1, rank_dropout=0.5)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.apply_to()
    lora.train()
    x = torch.randn(32, 3, 6, 6)
    base = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    update = lora.lora_up(lora.lora_down(x)).detach()
    delta = (conv(x) - base).detach()
    for i in range(32):
        assert bool((delta[i] == 0).all()) or torch.allclose(delta[i], update[i] * 2, atol=1e-5)


def test_neuron_dropout_drops_down_outputs_in_training_only() -> None:
    linear, lora = _rank1_linear(dropout=0.5)
    x = torch.randn(16, 10, 8)
    base = nn.functional.linear(x, linear.weight, linear.bias)
    update = lora.lora_up(lora.lora_down(x)).detach()
    lora.train()
    delta = (linear(x) - base).detach()
    zero = (delta == 0).all(-1)
    doubled = torch.isclose(delta, update * 2, atol=1e-5).all(-1)
    assert bool((zero ^ doubled).all()) and 0 < int(zero.sum()) < 160  # per token, not per sample
    lora.eval()
    torch.testing.assert_close(linear(x) - base, update)


# ---------------------------------------------------------------------------------------------- optimizer groups


def test_prepare_optimizer_params_groups_and_fallbacks() -> None:
    model = build_tiny_model("sd15")
    network = create_network(1.0, 4, 1, None, te_arg(model), model.unet)
    n_te, n_unet = 2 * len(network.text_encoder_loras), 2 * len(network.unet_loras)
    groups, descriptions = network.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert descriptions == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 1e-4] and [len(g["params"]) for g in groups] == [n_te, n_unet]
    groups, _ = network.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, descriptions = network.prepare_optimizer_params(0, 1e-4, 1e-3)  # TE lr 0: not trained
    assert descriptions == ["unet"]
    groups, descriptions = network.prepare_optimizer_params(None, None, None)
    assert groups == [] and descriptions == []


def test_prepare_optimizer_params_sdxl_per_encoder_and_loraplus() -> None:
    model = build_tiny_model("sdxl")
    network = create_network(1.0, 4, 1, None, te_arg(model), model.unet, loraplus_lr_ratio="16")
    groups, descriptions = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 1 plus", "textencoder 2", "textencoder 2 plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 1.6e-4, 2e-5, 3.2e-4, 1e-4, 1.6e-3])
    up_ids = {id(l.lora_up.weight) for l in network.loras}
    assert all(id(p) in up_ids for p in groups[5]["params"]) and not any(id(p) in up_ids for p in groups[4]["params"])
    groups, descriptions = network.prepare_optimizer_params([0, 2e-5], 1e-4, 1e-3)
    assert descriptions[:2] == ["textencoder 2", "textencoder 2 plus"]


def test_block_dims_and_block_lr_weights() -> None:
    model = build_tiny_model("sd15")
    # 25 SD1 blocks: 0..11 down (LDM input_blocks), 12 mid, 13..24 up (output_blocks)
    dims = [4] * 25
    dims[1] = 8  # input_blocks.1 = down_blocks.0.attentions.0
    network = create_network(1.0, 4, 1, None, te_arg(model), model.unet, block_dims=",".join(map(str, dims)),
                             down_lr_weight="0,0.5", mid_lr_weight="0", up_lr_weight="zeros+0.25")
    by_name = {l.lora_name: l for l in network.unet_loras}
    assert by_name["lora_unet_down_blocks_0_attentions_0_proj_in"].lora_dim == 8
    assert by_name["lora_unet_down_blocks_0_attentions_1_proj_in"].lora_dim == 4
    assert not any("mid_block" in name for name in by_name)  # mid LR 0: no modules there
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    # down_lr_weight lists blocks 0.. (0 = conv_in, never a LoRA) and is padded with 1.0 (kohya);
    # up "zeros+0.25" is the zeros preset plus 0.25
    assert lrs["unet_block1"] == pytest.approx(0.5e-4) and lrs["unet_block2"] == pytest.approx(1e-4)
    assert lrs["unet_block17"] == pytest.approx(0.25e-4) and "unet_block12" not in lrs
    assert lrs["textencoder"] == 1e-3
    with pytest.raises(ValueError, match="block_dims needs 25"):
        create_network(1.0, 4, 1, None, te_arg(model), model.unet, block_dims="4,4")


# ---------------------------------------------------------------------------------------------- max norm


def test_max_norm_regularization_numbers() -> None:
    model = build_tiny_model("sd15")
    network = create_network(1.0, 1, 1, None, te_arg(model), None)  # text encoder only, rank 1, alpha 1
    loras = network.text_encoder_loras
    with torch.no_grad():
        for lora in loras:
            lora.lora_down.weight.zero_()
            lora.lora_up.weight.zero_()
        loras[0].lora_down.weight[0, 0] = 3.0
        loras[0].lora_up.weight[0, 0] = 4.0  # |up @ down| = 12
        loras[1].lora_down.weight[0, 0] = 1.0
        loras[1].lora_up.weight[0, 0] = 2.0  # |up @ down| = 2
    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(6.0, "cpu")
    assert (scaled, mean_norm, max_norm) == (1, pytest.approx((6 + 2 + 0 * (len(loras) - 2)) / len(loras)), pytest.approx(6.0))
    # both factors shrink by sqrt(6/12) so the product halves
    assert loras[0].lora_down.weight[0, 0].item() == pytest.approx(3 * math.sqrt(0.5))
    assert loras[0].lora_up.weight[0, 0].item() == pytest.approx(4 * math.sqrt(0.5))
    assert loras[1].lora_up.weight[0, 0].item() == 2.0


def test_max_norm_uses_alpha_scale_and_conv_kernels() -> None:
    down, up = torch.zeros(2, 3, 3, 3), torch.zeros(4, 2, 1, 1)
    down[0, 0, 1, 1], up[0, 0] = 2.0, 3.0
    delta = LoRAModule.delta_weight(down, up, 0.5)  # a 3x3 kernel with one non-zero tap: 2 * 3 * 0.5
    assert delta.shape == (4, 3, 3, 3) and float(delta[0, 0, 1, 1]) == 3.0 and float(delta.abs().sum()) == 3.0


# ---------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("family, suffix", [("sd15", ".safetensors"), ("sdxl", ".safetensors"), ("sd21", ".pt")])
def test_save_and_create_from_weights_round_trip(tmp_path: Path, family: str, suffix: str) -> None:
    model = build_tiny_model(family)
    inputs = unet_inputs(model)
    network = make_network(model, dim=4, alpha=3, conv_dim="2", conv_alpha="0.5")
    file = tmp_path / f"lora{suffix}"
    network.save_weights(file, None, {"ss_network_dim": "4"})
    saved = load_file(file) if suffix == ".safetensors" else torch.load(file, weights_only=True)
    assert saved.keys() == network.state_dict().keys()
    if suffix == ".safetensors":
        assert read_safetensors_metadata(file)["ss_network_dim"] == "4"

    network.apply_to(te_arg(model), model.unet)
    expected = unet_out(model.unet, inputs)
    network.restore()
    loaded, weights_sd = create_network_from_weights(1.0, file, None, te_arg(model), model.unet)
    original = network.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())
    ranks = {l.lora_name: (l.lora_dim, float(l.alpha)) for l in loaded.loras}
    conv_name = "lora_unet_input_blocks_1_0_in_layers_2" if family == "sdxl" else "lora_unet_down_blocks_0_resnets_0_conv1"
    assert ranks[conv_name] == (2, 0.5)
    assert set(weights_sd) == set(saved)
    loaded.apply_to(te_arg(model), model.unet)
    assert torch.equal(unet_out(model.unet, inputs), expected)


def test_missing_alpha_means_alpha_equals_rank_and_half_precision_save(tmp_path: Path) -> None:
    model = build_tiny_model("sd15")
    network = make_network(model, dim=4, alpha=1)
    file = tmp_path / "half.safetensors"
    network.save_weights(file, torch.float16, None)
    weights = load_file(file)
    assert {v.dtype for v in weights.values()} == {torch.float16}
    without_alpha = {k: v for k, v in weights.items() if not k.endswith(".alpha")}
    loaded, _ = create_network_from_weights(1.0, None, None, te_arg(model), model.unet, weights_sd=without_alpha)
    assert {(l.lora_dim, float(l.alpha), l.scale) for l in loaded.loras} == {(4, 4.0, 1.0)}


def test_diffusers_named_sdxl_keys_are_converted(tmp_path: Path) -> None:
    model = build_tiny_model("sdxl")
    inputs = unet_inputs(model)
    network = make_network(model, conv_dim="2")
    table = unet_table(dict(model.unet.config))
    sai_to_diffusers = {}
    for path, module in model.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and table.diffusers_key_to_ldm(path + ".weight"):
            ldm = table.diffusers_key_to_ldm(path + ".weight")[: -len(".weight")]
            sai_to_diffusers["lora_unet_" + ldm.replace(".", "_")] = "lora_unet_" + path.replace(".", "_")
    renamed = {}
    for key, value in network.state_dict().items():
        name, rest = key.split(".", 1)
        renamed[f"{sai_to_diffusers.get(name, name)}.{rest}"] = value
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in renamed
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in renamed
    file = tmp_path / "diffusers_named.safetensors"
    save_file(renamed, str(file))
    network.apply_to(te_arg(model), model.unet)
    expected = unet_out(model.unet, inputs)
    network.restore()
    loaded, weights_sd = create_network_from_weights(1.0, file, None, te_arg(model), model.unet)
    assert set(weights_sd) == set(network.state_dict())
    loaded.apply_to(te_arg(model), model.unet)
    assert torch.equal(unet_out(model.unet, inputs), expected)
    network.restore()
    fresh = create_network(1.0, 4, 2, None, te_arg(model), model.unet, conv_dim="2")
    fresh.load_weights(file)  # load_weights accepts the diffusers spelling too
    original = network.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in fresh.state_dict().items())


def test_unknown_keys_are_a_clear_error(tmp_path: Path) -> None:
    model = build_tiny_model("sd15")
    network = make_network(model)
    file = tmp_path / "extra.safetensors"
    weights = network.state_dict()
    weights["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 4)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(file))
    with pytest.raises(LoRAWeightsError, match="1 key.*match no LoRA module.*lora_unet_not_a_module"):
        network.load_weights(file)
    with pytest.raises(LoRAWeightsError, match="lora_unet_not_a_module"):
        create_network_from_weights(1.0, file, None, te_arg(model), model.unet)
    # a LoCon file into a plain network: conv keys have no module -> error, not silently ignored
    locon_file = tmp_path / "locon.safetensors"
    make_network(model, conv_dim="2").save_weights(locon_file)
    with pytest.raises(LoRAWeightsError, match="conv_dim"):
        network.load_weights(locon_file)
    # an SD1 file on SDXL
    sdxl = build_tiny_model("sdxl")
    with pytest.raises(LoRAWeightsError):
        create_network_from_weights(1.0, locon_file, None, te_arg(sdxl), sdxl.unet)


def test_load_weights_returns_info_and_updates_scale(tmp_path: Path) -> None:
    model = build_tiny_model("sd15")
    source = make_network(model, dim=4, alpha=2)
    file = tmp_path / "a.safetensors"
    source.save_weights(file)
    target = create_network(1.0, 4, 1, None, te_arg(model), model.unet)
    info = target.load_weights(file)
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert {l.scale for l in target.loras} == {0.5}


def test_hashes_match_an_independent_computation(tmp_path: Path) -> None:
    model = build_tiny_model("sd15")
    network = make_network(model)
    file = tmp_path / "hashed.safetensors"
    network.save_weights(file, None, {"ss_seed": "42", "modelspec.title": "x"})
    metadata = read_safetensors_metadata(file)
    data = file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == "e3b0c442"  # a file under 1 MiB: sha256 of nothing, as in A1111
    assert metadata["modelspec.title"] == "x" and metadata["ss_seed"] == "42"

    # a tensor payload past 1 MiB: the legacy hash reads 64 KiB at offset 1 MiB of the file serialised
    # with only the ss_* metadata (so non-ss edits keep it)
    tensors = {"b": torch.arange(400_000, dtype=torch.float32), "a": torch.ones(3, 3)}
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, {"ss_a": "1", "other": "z"})
    reference = tmp_path / "reference.safetensors"
    save_file(tensors, str(reference), metadata={"ss_a": "1"})
    raw = reference.read_bytes()
    assert legacy_hash == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8] != "e3b0c442"
    n = int.from_bytes(raw[:8], "little")
    assert model_hash == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert precalculate_safetensors_hashes(tensors, {"ss_a": "1", "other": "changed"}) == (model_hash, legacy_hash)
    # ss_* metadata is in the header, so a longer value shifts the window at 1 MiB
    assert precalculate_safetensors_hashes(tensors, {"ss_a": "12345678"})[1] != legacy_hash
    assert addnet_hash_legacy(save(tensors, {"ss_a": "1"})) == legacy_hash


# ---------------------------------------------------------------------------------------------- merging


def test_merge_to_bakes_the_same_update(tmp_path: Path) -> None:
    model = build_tiny_model("sd15")
    inputs = unet_inputs(model)
    network = make_network(model, dim=4, alpha=2, conv_dim="2")
    network.set_multiplier(0.7)
    network.apply_to(te_arg(model), model.unet)
    expected_unet, expected_te = unet_out(model.unet, inputs), te_out(model.text_encoders[0])
    with pytest.raises(RuntimeError, match="twice"):
        network.merge_to(None, None, None)
    file = tmp_path / "m.safetensors"
    network.save_weights(file)

    base = build_tiny_model("sd15")
    merger, weights_sd = create_network_from_weights(0.7, file, None, te_arg(base), base.unet, for_inference=True)
    assert merger.is_mergeable()
    merger.merge_to(te_arg(base), base.unet, weights_sd, torch.float32, "cpu")
    torch.testing.assert_close(unet_out(base.unet, inputs), expected_unet, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_out(base.text_encoders[0]), expected_te, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- interop


@pytest.mark.parametrize("family, conv_dim", [("sd15", None), ("sd21", "2"), ("sdxl", "2")])
def test_diffusers_load_lora_weights_applies_the_same_update(tmp_path: Path, family: str, conv_dim: str | None) -> None:
    """A real client reads our file: diffusers' kohya converter + peft give the outputs our hooks give."""
    model = build_tiny_model(family)
    inputs = unet_inputs(model)
    base_unet = unet_out(model.unet, inputs)
    base_tes = [te_out(te) for te in model.text_encoders]
    network = make_network(model, dim=4, alpha=2, **({"conv_dim": conv_dim, "conv_alpha": "1"} if conv_dim else {}))
    file = tmp_path / "lora.safetensors"
    network.save_weights(file, None, {"ss_network_dim": "4"})
    network.apply_to(te_arg(model), model.unet)
    ours_unet = unet_out(model.unet, inputs)
    ours_tes = [te_out(te) for te in model.text_encoders]

    pipe = build_tiny_model(family).to_pipeline()  # same seed: the same base weights
    pipe.load_lora_weights(str(file))
    theirs_unet = unet_out(pipe.unet, inputs)
    theirs_tes = [te_out(te) for te in ([pipe.text_encoder, pipe.text_encoder_2] if family == "sdxl" else [pipe.text_encoder])]

    assert (ours_unet - base_unet).abs().max() > 0.05  # the LoRA does something sizeable
    torch.testing.assert_close(theirs_unet, ours_unet, atol=1e-5, rtol=1e-5)
    for base, ours, theirs in zip(base_tes, ours_tes, theirs_tes):
        assert (ours - base).abs().max() > 0.05
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
