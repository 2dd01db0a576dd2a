"""DoRA for the native network (issue 12): ``--network_module networks.lora --network_args dora_wd=True``.

The reference is LyCORIS 4.1.3's LoConModule(weight_decompose=True): same forward, gradients and merge; its own
loader reads our files. diffusers 0.42.1 does not load DoRA from kohya/LyCORIS files (see
`test_diffusers_load_lora_weights_drops_dora_scale_and_loads_the_plain_lora`).
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import train_network
from library.adapters.dora import dora_merged_weight, initial_dora_scale
from library.adapters.lora_files import lora_delta_weight
from library.io import read_safetensors_metadata
from library.models.loading import load_model
from library.training.loop import Callback
from networks.dora import DoRAModule, DoRANetwork
from networks.lora import LoRANetwork, create_network, create_network_from_weights
from tests.helpers.user_paths import assert_one_error_line, lora_args

DORA_KEYS = {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}


def _layers() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [(nn.Linear(16, 12), torch.randn(2, 5, 16)),
            (nn.Conv2d(8, 6, 1), torch.randn(2, 8, 5, 5)),
            (nn.Conv2d(8, 6, 3, padding=1), torch.randn(2, 8, 5, 5))]  # LoCon's 3x3 (conv_dim)


def _trained_like(module: DoRAModule) -> None:
    """Non-zero up and magnitudes away from the initial row norms, as after training."""
    with torch.no_grad():
        nn.init.normal_(module.lora_up.weight, std=0.5)
        module.dora_scale.mul_(torch.rand_like(module.dora_scale) + 0.5)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["linear", "conv1x1", "conv3x3"])
def test_dora_module_matches_lycoris_forward_gradients_and_merge(index):
    from lycoris.modules.locon import LoConModule

    org, x = _layers()[index]
    org.requires_grad_(False)
    ours = DoRAModule("lora_unet_x", org, 1.0, 4, 2.0)
    assert ours.dora_scale.shape == (org.weight.shape[0],) + (1,) * (org.weight.dim() - 1)
    torch.testing.assert_close(ours.dora_scale.detach(), initial_dora_scale(org.weight), rtol=0, atol=0)
    _trained_like(ours)
    lyco_org = copy.deepcopy(org)
    lyco = LoConModule("lora_unet_x", lyco_org, multiplier=1.0, lora_dim=4, alpha=2.0, weight_decompose=True)
    assert lyco.wd_on_out  # LyCORIS's default, ours
    lyco.load_state_dict(ours.state_dict())  # our keys and shapes are LyCORIS's
    assert set(lyco.state_dict()) == set(ours.state_dict()) == DORA_KEYS

    for multiplier in (1.0, 0.6):
        ours.multiplier = lyco.multiplier = multiplier
        ours.apply_to()
        out = org(x)  # org_out + our contribution
        ours.restore()
        lyco.apply_to()
        expected = lyco_org(x)
        lyco.restore()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        assert (out - org(x)).abs().max() > 1e-2  # the module changes the output

        # gradients reach dora_scale, lora_down and lora_up (through the norm too, as in LyCORIS); W stays frozen
        ours.zero_grad(), lyco.zero_grad()
        ours.apply_to()
        org(x).square().sum().backward()
        ours.restore()
        lyco.apply_to()
        lyco_org(x).square().sum().backward()
        lyco.restore()
        for name in ("dora_scale", "lora_down.weight", "lora_up.weight"):
            ours_grad, lyco_grad = ours.get_parameter(name).grad, lyco.get_parameter(name).grad
            assert ours_grad is not None and ours_grad.abs().sum() > 0, name
            torch.testing.assert_close(ours_grad, lyco_grad, rtol=1e-4, atol=1e-5)
        assert org.weight.grad is None

        # the merge (what merge_lora.py and --base_weights write) is LyCORIS's merged weight
        delta = lora_delta_weight(ours.lora_down.weight, ours.lora_up.weight, 2.0 / 4)
        merged = dora_merged_weight(org.weight, delta, ours.dora_scale, multiplier)
        torch.testing.assert_close(merged, lyco.get_merged_weight(multiplier=multiplier)[0], rtol=0, atol=1e-6)
        from_file = ours.merged_weight(org.weight, ours.state_dict(prefix="lora_unet_x."), "cpu")
        torch.testing.assert_close(from_file, merged, rtol=0, atol=0)


def test_dora_wd_values_and_network_dropout_are_checked():
    from library.adapters.errors import NetworkArgumentError
    from networks.lora import network_class_for

    assert network_class_for({"dora_wd": "True"}) is DoRANetwork
    assert network_class_for({"dora_wd": "false"}) is network_class_for({}) is LoRANetwork
    with pytest.raises(NetworkArgumentError, match="dora_wd=ture in --network_args: use dora_wd=True"):
        network_class_for({"dora_wd": "ture"})
    with pytest.raises(NetworkArgumentError, match="--network_dropout .* does not apply to DoRA"):
        DoRAModule("lora_unet_x", nn.Linear(4, 4), 1.0, 2, 1.0, dropout=0.1)


class _InitialMagnitudes(Callback):
    """The network the run trains and its dora_scale values before step 1."""

    def __init__(self) -> None:
        self.network = None
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, run, state) -> None:
        self.network = run.trainee.network
        self.initial = {k: v.detach().clone() for k, v in self.network.state_dict().items()}


def _modules(weights: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    modules: dict[str, set[str]] = {}
    for key in weights:
        name, _, rest = key.partition(".")
        modules.setdefault(name, set()).add(rest)
    return modules


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_train_network_with_dora_wd_writes_lycoris_dora_keys(family, tiny_model_dirs, shapes_data, tmp_path):
    watcher = _InitialMagnitudes()
    argv = lora_args(tiny_model_dirs[family], shapes_data, tmp_path / "out", 3, "--network_module", "networks.lora",
                     "--network_args", "dora_wd=True", "conv_dim=4", "conv_alpha=1")
    assert train_network.main(argv, callbacks=[watcher]) == 0
    assert type(watcher.network) is DoRANetwork
    file = tmp_path / "out" / "lora.safetensors"
    weights = load_file(file)
    modules = _modules(weights)
    assert all(keys == DORA_KEYS for keys in modules.values()), modules

    # the same modules (names, ranks) as a plain LoRA/LoCon network of these arguments, and LyCORIS's shapes
    model = load_model(tiny_model_dirs[family])
    plain = create_network(1.0, 4, 2.0, model.vae, model.text_encoders, model.unet, conv_dim="4", conv_alpha="1")
    assert type(plain) is LoRANetwork
    assert set(modules) == {lora.lora_name for lora in plain.loras}
    assert any(lora.lora_down.weight.shape[2:] == (3, 3) for lora in plain.unet_loras if lora.is_conv)
    for lora in plain.loras:
        out_features = lora.org_module.weight.shape[0]
        scale = weights[lora.lora_name + ".dora_scale"]
        assert scale.shape == (out_features,) + (1,) * (lora.org_module.weight.dim() - 1)
        assert scale.dtype == torch.float32
        assert weights[lora.lora_name + ".lora_down.weight"].shape == lora.lora_down.weight.shape

    # training moved the magnitudes away from the row norms they start at
    changed = [k for k, v in weights.items() if k.endswith(".dora_scale") and not torch.equal(v, watcher.initial[k])]
    assert len(changed) > len(modules) // 2, (len(changed), len(modules))
    for lora in plain.unet_loras[:5]:
        key = lora.lora_name + ".dora_scale"
        torch.testing.assert_close(watcher.initial[key], initial_dora_scale(lora.org_module.weight))

    metadata = read_safetensors_metadata(file)
    assert metadata["ss_network_module"] == "networks.lora"
    assert json.loads(metadata["ss_network_args"])["dora_wd"] == "True"


def _random_dora_file(model, path: Path, conv_dim: str | None = "4") -> DoRANetwork:
    kwargs = {"conv_dim": conv_dim, "conv_alpha": "1"} if conv_dim else {}
    network = create_network(1.0, 4, 2.0, model.vae, model.text_encoders, model.unet, dora_wd="True", **kwargs)
    torch.manual_seed(1)
    for lora in network.loras:
        _trained_like(lora)
    network.save_weights(path, None, {"ss_network_module": "networks.lora",
                                      "ss_network_args": json.dumps({"dora_wd": "True", **kwargs})})
    return network


def _unet_output(unet: nn.Module, inputs: tuple) -> torch.Tensor:
    sample, context, added = inputs
    with torch.no_grad():
        return unet(sample, 10, context, added_cond_kwargs=added).sample


def _inputs(unet: nn.Module) -> tuple:
    torch.manual_seed(2)
    config = unet.config
    added = None
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return torch.randn(1, config.in_channels, 8, 8), torch.randn(1, 4, config.cross_attention_dim), added


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lycoris_loader_reads_our_dora_file_and_computes_the_same(family, tiny_model_dirs, tmp_path):
    """LyCORIS's own loader (``lycoris.kohya.create_network_from_weights``, through networks.lycoris_kohya, which shows
    it kohya's module names) reads every key of our file as DoRA and computes what our network computes."""
    from networks.lycoris_kohya import create_network_from_weights as lycoris_from_weights

    model = load_model(tiny_model_dirs[family])
    file = tmp_path / "dora.safetensors"
    ours = _random_dora_file(model, file)
    weights = load_file(file)
    lyco_model = load_model(tiny_model_dirs[family])
    lyco, _ = lycoris_from_weights(1.0, str(file), None, lyco_model.text_encoders, lyco_model.unet,
                                   for_inference=True)
    loaded = lyco.unet_loras + lyco.text_encoder_loras
    assert {m.lora_name for m in loaded} == set(_modules(weights))  # every module of the file, nothing else
    assert all(type(m).__name__ == "LoConModule" and m.wd for m in loaded)  # read as DoRA
    assert set(lyco.state_dict()) == set(weights)  # no missing, no unexpected keys
    for key, value in lyco.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)

    inputs = _inputs(model.unet)
    base = _unet_output(model.unet, inputs)
    ours.apply_to(model.text_encoders, model.unet, True, True)
    ours.eval()
    expected = _unet_output(model.unet, inputs)
    lyco.apply_to(lyco_model.text_encoders, lyco_model.unet, True, True)
    torch.testing.assert_close(_unet_output(lyco_model.unet, inputs), expected, rtol=0, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2

    # our loader reads it back (DoRA from the dora_scale keys alone) and merges it as LyCORIS computes it
    ours.restore()
    again, _ = create_network_from_weights(1.0, file, None, model.text_encoders, model.unet, for_inference=True)
    assert type(again) is DoRANetwork
    again.merge_to(model.text_encoders, model.unet)
    torch.testing.assert_close(_unet_output(model.unet, inputs), expected, rtol=0, atol=1e-4)


def test_diffusers_load_lora_weights_drops_dora_scale_and_loads_the_plain_lora(tiny_model_dirs, tmp_path):
    """diffusers 0.42.1: the SD1.x and SDXL loaders (``lora_state_dict``) filter out every ``dora_scale`` key with
    a warning before the kohya converter runs, so a DoRA file loads as the plain LoRA of its down/up/alpha.
    (The converter's own DoRA branch, called directly, gives ``lora_magnitude_vector`` in LyCORIS's shape
    (out, 1), which peft 0.21.2 refuses: it expects (out,).)"""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    model = load_model(tiny_model_dirs["sd15"])
    file = tmp_path / "dora.safetensors"
    network = _random_dora_file(model, file, conv_dim=None)
    file_keys = set(load_file(file))
    for pipeline_class in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        state_dict, _ = pipeline_class.lora_state_dict(str(file))
        assert not any("dora" in k or "magnitude" in k for k in state_dict), pipeline_class.__name__
        assert len(state_dict) == len([k for k in file_keys if k.endswith("weight")])  # down + up of every module

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd15"])
    inputs = _inputs(pipe.unet)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(str(file))
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert any("filter out the keys associated to 'dora_scale" in m for m in messages), messages
    assert not pipe.unet.peft_config["default_0"].use_dora
    loaded = _unet_output(pipe.unet, inputs)

    plain = create_network(1.0, 4, 2.0, model.vae, model.text_encoders, model.unet)
    plain.load_state_dict_checked({k: v for k, v in network.state_dict().items() if not k.endswith("dora_scale")})
    plain.apply_to(model.text_encoders, model.unet, True, True)
    plain.eval()
    torch.testing.assert_close(loaded, _unet_output(model.unet, inputs), rtol=0, atol=1e-5)
    plain.restore()
    network.apply_to(model.text_encoders, model.unet, True, True)
    network.eval()
    assert (_unet_output(model.unet, inputs) - loaded).abs().max() > 1e-2  # what DoRA computes is not that


class _WeightsAtStart(Callback):
    def __init__(self) -> None:
        self.network = None
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, run, state) -> None:
        self.network = run.trainee.network
        self.weights = {k: v.detach().clone() for k, v in self.network.state_dict().items()}


def in_process(argv: list, capsys) -> subprocess.CompletedProcess:
    code = train_network.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def test_network_weights_continue_a_dora_file(tiny_model_dirs, shapes_data, tmp_path, capsys):
    model = load_model(tiny_model_dirs["sd15"])
    file = tmp_path / "dora.safetensors"
    _random_dora_file(model, file, conv_dim="2")  # another conv rank than the command line's: the file decides
    weights = load_file(file)

    # --dim_from_weights: the file's layout and values, DoRA from its dora_scale keys
    watcher = _WeightsAtStart()
    argv = lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "a", 1, "--network_weights", file,
                     "--dim_from_weights", "--network_args", "dora_wd=True")
    assert train_network.main(argv, callbacks=[watcher]) == 0
    assert type(watcher.network) is DoRANetwork
    assert set(watcher.weights) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(watcher.weights[key], value, rtol=0, atol=0)
    assert set(load_file(tmp_path / "a" / "lora.safetensors")) == set(weights)

    # --network_weights with the same network_args: loaded into the fresh DoRA network
    watcher = _WeightsAtStart()
    argv = lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "b", 1, "--network_weights", file,
                     "--network_args", "dora_wd=True", "conv_dim=2", "conv_alpha=1")
    assert train_network.main(argv, callbacks=[watcher]) == 0
    torch.testing.assert_close(watcher.weights, dict(weights), rtol=0, atol=0)

    # without dora_wd, the file is named for what it is
    result = in_process(lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "c", 1, "--network_weights", file,
                                  "--network_args", "conv_dim=2", "conv_alpha=1"), capsys)
    assert_one_error_line(result, "is a DoRA file", "add dora_wd=True to --network_args")
