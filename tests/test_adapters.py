"""The adapter protocol (networks.base, networks.plugin): LoRA is one implementation; a toy adapter kind made of
one module class is built, trained, saved, loaded, merged and max-norm regularised through the same path."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.adapters.errors import NetworkArgumentError
from library.io import read_safetensors_metadata
from library.models.tiny_models import build_tiny_model
from networks.base import AdapterModule, AdapterNetwork
from networks.lora import LoRAModule, LoRANetwork, create_network
from networks.plugin import NetworkOptions, build_network, import_network_module

TOY = "tests.helpers.scaled_delta_network"


def unet_inputs(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 16, 16, generator=generator), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=generator)}


def test_lora_is_one_implementation_of_the_protocol() -> None:
    model = build_tiny_model("sd15")
    network = create_network(1.0, 4, 2.0, None, model.text_encoders[0], model.unet)
    assert isinstance(network, LoRANetwork) and isinstance(network, AdapterNetwork)
    assert network.loras and all(isinstance(m, LoRAModule) and isinstance(m, AdapterModule) for m in network.loras)
    assert import_network_module("networks.lora").create_network is create_network


def test_a_new_adapter_kind_is_one_module_class(tmp_path: Path) -> None:
    model = build_tiny_model("sd15")
    assert model.unet.config.cross_attention_dim == 32
    toy = importlib.import_module(TOY)
    lora = create_network(1.0, 4, 2.0, None, model.text_encoders[0], model.unet)
    options = NetworkOptions(network_dim=4, network_alpha=2.0, network_args={"delta_scale": "0.5"})
    network = build_network(toy, options=options, vae=None, text_encoders=model.text_encoders, unet=model.unet)
    assert {m.delta_scale for m in network.loras} == {0.5}  # the kind's own --network_args reach every module
    # the targets and their kohya names come from the protocol, so they are LoRA's
    assert [m.lora_name for m in network.loras] == [m.lora_name for m in lora.loras]
    assert set(network.state_dict()) == {f"{m.lora_name}.{t}" for m in network.loras for t in ("delta", "alpha")}

    inputs = unet_inputs()
    with torch.no_grad():
        base = model.unet(**inputs).sample
    network.apply_to(model.text_encoders, model.unet)
    params, descriptions = network.prepare_optimizer_params(None, 1e-2, 1e-2)
    assert descriptions == ["textencoder", "unet"]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    model.unet(**inputs).sample.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        trained = model.unet(**inputs).sample
    assert (trained - base).abs().max() > 0
    assert any(m.delta.abs().sum() > 0 for m in network.unet_loras)

    file = tmp_path / "toy.safetensors"
    network.save_weights(file, None, {"ss_network_module": TOY})
    assert set(load_file(str(file))) == set(network.state_dict())
    assert read_safetensors_metadata(file)["ss_network_module"] == TOY
    assert len(read_safetensors_metadata(file)["sshs_model_hash"]) == 64

    # a network shaped like the file (kohya's --dim_from_weights) holds the same tensors
    fresh = build_tiny_model("sd15")
    options = NetworkOptions(network_weights=str(file), dim_from_weights=True, network_args={"delta_scale": "0.5"})
    loaded = build_network(toy, options=options, vae=None, text_encoders=fresh.text_encoders, unet=fresh.unet)
    assert all(torch.equal(v, network.state_dict()[k]) for k, v in loaded.state_dict().items())
    loaded.apply_to(fresh.text_encoders, fresh.unet)
    with torch.no_grad():
        assert torch.allclose(fresh.unet(**inputs).sample, trained, atol=1e-6)
    # load_weights into a freshly created one, then merge into the base weights: the same output without hooks
    merged_model = build_tiny_model("sd15")
    merged = toy.create_network(1.0, 4, 2.0, None, merged_model.text_encoders[0], merged_model.unet, delta_scale=0.5)
    merged.load_weights(file)
    merged.merge_to(merged_model.text_encoders, merged_model.unet)
    with torch.no_grad():
        assert torch.allclose(merged_model.unet(**inputs).sample, trained, atol=1e-5)

    with torch.no_grad():
        limit = min(float(m.weight_delta().norm()) for m in network.loras if m.delta.abs().sum() > 0) / 2
    scaled, _, largest = network.apply_max_norm_regularization(limit, "cpu")
    assert scaled > 0 and largest <= limit * (1 + 1e-5)


def test_unknown_network_args_name_what_the_kind_accepts() -> None:
    model = build_tiny_model("sd15")
    toy = importlib.import_module(TOY)
    with pytest.raises(NetworkArgumentError, match=r"unknown network argument\(s\) delta_scale for networks.lora"):
        create_network(1.0, 4, 2.0, None, model.text_encoders[0], model.unet, delta_scale="2")
    with pytest.raises(NetworkArgumentError, match=f"bogus for {TOY}; accepted: conv_dim, .*, verbose, delta_scale$"):
        toy.create_network(1.0, 4, 2.0, None, model.text_encoders[0], model.unet, bogus="1")


@pytest.mark.parametrize("alpha, multiplier, dtype", [
    (4.0, 1.0, torch.float32),    # factor 1: no multiplication at all
    (1.0, 1.0, torch.float32),    # kohya's default alpha 1, rank 4: factor 1/4, applied to the rank activations
    (2.0, -0.5, torch.bfloat16),  # a negative power of two, under bf16 autocast
    (3.0, 0.7, torch.float32),    # any other factor scales the output, as before
    (1.0, 1.0, torch.float16),    # float16 could underflow on the rank activations: the output is scaled
])
def test_lora_forward_fast_path_gives_the_bits_of_the_plain_formula(alpha: float, multiplier: float,
                                                                    dtype: torch.dtype) -> None:
    """The LoRA forward skips what does nothing and moves an exact scale; outputs and gradients keep their bits."""
    torch.manual_seed(0)
    for org, shape in ((torch.nn.Linear(16, 8), (2, 5, 16)), (torch.nn.Conv2d(8, 6, 3, padding=1), (2, 8, 6, 6))):
        lora = LoRAModule("lora_unet_x", org.requires_grad_(False), multiplier, 4, alpha)
        torch.nn.init.normal_(lora.lora_up.weight)
        x = torch.randn(shape)
        results = []
        for fast in (True, False):
            lora.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = lora(x) if fast else lora.lora_up(lora.lora_down(x)) * (multiplier * alpha / 4)
            out.float().square().sum().backward()
            results.append([out, lora.lora_down.weight.grad, lora.lora_up.weight.grad])
        assert all(torch.equal(a, b) for a, b in zip(*results))


def test_lora_forward_reads_a_changed_alpha() -> None:
    """The forward keeps alpha / rank between steps, and takes a loaded or rewritten alpha at once."""
    torch.manual_seed(0)
    lora = LoRAModule("lora_unet_x", torch.nn.Linear(16, 8), 1.0, 4, 4.0)
    torch.nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(3, 16)
    with torch.no_grad():
        plain = lora.lora_up(lora.lora_down(x))
        assert torch.equal(lora(x), plain)
        lora.load_state_dict({**lora.state_dict(), "alpha": torch.tensor(2.0)})
        assert torch.equal(lora(x), plain * 0.5)
        lora.alpha.fill_(1.0)
        assert torch.equal(lora(x), plain * 0.25)
        lora.alpha = torch.tensor(3.0)
        assert torch.equal(lora(x), plain * 0.75)
