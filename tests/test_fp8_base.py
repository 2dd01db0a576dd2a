"""--fp8_base / --fp8_base_unet: frozen base weights stored as float8_e4m3fn and upcast layer by layer.

Measured on the tiny SDXL UNet (bf16, batch 2, 16x16 latents, seed 0): storing its 263 Linear/Conv2d weights in
float8 moves the output by a relative L2 error ||fp8 - bf16|| / ||bf16|| of 0.094 (cosine similarity 0.9956):
e4m3 keeps 3 mantissa bits, so each weight is off by up to 1/16 of itself. The tolerance stated here is 0.15
(cosine > 0.99). The upcast itself loses nothing: the float8 UNet's output equals bit for bit that of a bf16 UNet
whose weights were rounded through float8.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from library.cli import config
from library.models.fp8_weights import Float8Stored, store_frozen_weights_in_fp8
from library.models.tiny_models import build_tiny_model
from library.training.loop import Callback
from tests.helpers.user_paths import assert_one_error_line, lora_args
from tools.make_sample_dataset import make_sample_dataset

RELATIVE_L2_TOLERANCE = 0.15  # measured 0.094 (see the module docstring)
MIN_COSINE = 0.99  # measured 0.9956


@pytest.fixture(scope="module")
def bf16_unet() -> nn.Module:
    torch.manual_seed(0)
    return build_tiny_model("sdxl").unet.to(torch.bfloat16).requires_grad_(False).eval()


def unet_inputs(unet: nn.Module) -> tuple[tuple[torch.Tensor, ...], dict[str, object]]:
    config_ = unet.config
    generator = torch.Generator().manual_seed(1)
    pooled_dim = config_.projection_class_embeddings_input_dim - 6 * config_.addition_time_embed_dim
    sample = torch.randn(2, 4, 16, 16, generator=generator).to(torch.bfloat16)
    context = torch.randn(2, 77, config_.cross_attention_dim, generator=generator).to(torch.bfloat16)
    added = {"text_embeds": torch.randn(2, pooled_dim, generator=generator).to(torch.bfloat16),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2, dtype=torch.bfloat16)}
    return (sample, torch.tensor([10, 500])), {"encoder_hidden_states": context, "added_cond_kwargs": added}


def weight_bytes(unet: nn.Module) -> int:
    """The bytes of the Linear/Conv2d weights as stored (the float8 Parameter for converted layers)."""
    return sum(p.numel() * p.element_size() for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               for name, p in m.named_parameters(recurse=False) if name == "weight")


def rounded_through_fp8(unet: nn.Module) -> nn.Module:
    """A bf16 copy whose Linear/Conv2d weights hold the float8-rounded values: what the float8 UNet computes."""
    rounded = copy.deepcopy(unet)
    for module in rounded.modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).to(torch.bfloat16)
    return rounded


def test_fp8_unet_is_within_tolerance_of_bf16_and_its_weights_take_half_the_bytes(bf16_unet) -> None:
    args, kwargs = unet_inputs(bf16_unet)
    fp8_unet = copy.deepcopy(bf16_unet)
    rounded = rounded_through_fp8(bf16_unet)
    bytes_bf16, params_bf16 = weight_bytes(fp8_unet), sum(p.numel() * p.element_size() for p in fp8_unet.parameters())
    keys = list(fp8_unet.state_dict())
    storage = store_frozen_weights_in_fp8(fp8_unet)
    assert storage.layers == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in fp8_unet.modules()) == 263
    assert storage.bytes_after * 2 == storage.bytes_before == bytes_bf16 and weight_bytes(fp8_unet) * 2 == bytes_bf16
    # biases and norms stay bf16: the whole UNet's parameters take 51% of their bf16 bytes
    params_fp8 = sum(p.numel() * p.element_size() for p in fp8_unet.parameters())
    assert 0.5 < params_fp8 / params_bf16 < 0.52
    assert list(fp8_unet.state_dict()) == keys  # same keys, so same loaders and savers
    layer = fp8_unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(layer, nn.Linear) and layer.state_dict()["weight"].dtype == torch.float8_e4m3fn
    assert layer.weight.dtype == torch.bfloat16  # readable in the compute dtype (DoRA, LyCORIS read it)

    with torch.no_grad():
        reference = bf16_unet(*args, **kwargs).sample.float()
        stored = fp8_unet(*args, **kwargs).sample.float()
        exact = rounded(*args, **kwargs).sample.float()
    assert torch.equal(stored, exact)  # the upcast adds no error of its own
    relative = ((stored - reference).norm() / reference.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(stored.flatten(), reference.flatten(), dim=0).item()
    assert 0 < relative < RELATIVE_L2_TOLERANCE and cosine > MIN_COSINE, (relative, cosine)

    fp8_unet.to(torch.float16)  # a later dtype cast changes the compute dtype, never the float8 storage
    assert layer.state_dict()["weight"].dtype == torch.float8_e4m3fn and layer.weight.dtype == torch.float16


def test_gradients_reach_a_lora_on_fp8_layers_without_keeping_upcast_weights(bf16_unet) -> None:
    """A networks.lora LoRA hooked on float8 layers trains: its gradients equal (to bf16 rounding) those on the
    rounded bf16 UNet, and autograd keeps the float8 weights for backward, never a bf16 copy of one."""
    import networks.lora

    args, kwargs = unet_inputs(bf16_unet)
    fp8_unet, rounded = copy.deepcopy(bf16_unet), rounded_through_fp8(bf16_unet)
    store_frozen_weights_in_fp8(fp8_unet)
    upcast_shapes = {tuple(m.stored_weight.shape) for m in fp8_unet.modules() if isinstance(m, Float8Stored)}
    grads = []
    for unet in (fp8_unet, rounded):
        torch.manual_seed(2)
        network = networks.lora.create_network(1.0, 4, 1.0, None, [], unet, conv_dim="2", conv_alpha="1")
        network.apply_to([], unet, False, True)
        for name, param in network.named_parameters():
            if "lora_up" in name:
                nn.init.normal_(param, std=0.02)  # so that lora_down gets a gradient too
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = unet(*args, **kwargs).sample
        out.float().square().mean().backward()
        grads.append({name: p.grad for name, p in network.named_parameters()})
        if unet is fp8_unet:
            kept = [t for t in saved if t.dtype == torch.bfloat16 and tuple(t.shape) in upcast_shapes]
            assert not kept, [tuple(t.shape) for t in kept]
            assert any(t.dtype == torch.float8_e4m3fn for t in saved)
    fp8_grads, reference = grads
    assert len(fp8_grads) > 100 and all(g is not None and g.abs().sum() > 0 for g in fp8_grads.values())
    for name, grad in fp8_grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=2e-2, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("fp8") / "data", count=2, size=64, seed=1).parent


class FrozenDtypes(Callback):
    """Records, at the start of training, the stored dtypes of the first Linear weight of the UNet and of each
    text encoder (the run's own modules, as the loop sees them)."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.dtype] = {}

    def on_train_start(self, run, state) -> None:
        trainee = run.trainee
        parts = {"unet": trainee.unet, **{f"te{i}": te for i, te in enumerate(trainee.text_encoders)}}
        for name, part in parts.items():
            linear = next(m for m in part.modules() if isinstance(m, nn.Linear))
            self.seen[name] = linear.state_dict()["weight"].dtype


def saved_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


@pytest.mark.parametrize("family, flag, te_dtype", [("sdxl", "--fp8_base", torch.float8_e4m3fn),
                                                     ("sd15", "--fp8_base_unet", torch.bfloat16)])
def test_train_network_with_fp8_base_trains_the_lora(tiny_model_dirs, two_images, tmp_path, capsys, family, flag,
                                                     te_dtype) -> None:
    """kohya's flags as typed: --fp8_base puts the U-Net and text encoders in float8, --fp8_base_unet the U-Net
    only; the LoRA (U-Net and text-encoder modules) moves away from its zero-initialised lora_up."""
    import train_network

    out = tmp_path / "out"
    recorder = FrozenDtypes()
    assert train_network.main(lora_args(tiny_model_dirs[family], two_images, out, 2, "--mixed_precision", "bf16",
                                        flag), callbacks=[recorder]) == 0
    printed = capsys.readouterr().out
    assert "fp8 base weights (float8_e4m3fn, upcast per layer): U-Net " in printed
    assert ("text encoder" in printed.split("fp8 base weights")[1].splitlines()[0]) == (flag == "--fp8_base")
    assert recorder.seen.pop("unet") == torch.float8_e4m3fn
    assert set(recorder.seen.values()) == {te_dtype}
    tensors, metadata = saved_lora(out / "lora.safetensors")
    ups = {k: v for k, v in tensors.items() if k.endswith("lora_up.weight")}
    assert any(k.startswith("lora_unet_") for k in ups) and any(k.startswith("lora_te") for k in ups)
    # lora_up starts at zero: a non-zero one learned. Every text-encoder module must; in the tiny U-Net a
    # self-attention q/k whose bf16 softmax saturates gets exactly zero gradient, so allow a few of those.
    learned = {k: bool(v.abs().sum() > 0) for k, v in ups.items()}
    assert all(ok for k, ok in learned.items() if k.startswith("lora_te"))
    unet = [ok for k, ok in learned.items() if k.startswith("lora_unet_")]
    assert sum(unet) >= 0.9 * len(unet), f"{len(unet) - sum(unet)} of {len(unet)} U-Net modules did not learn"
    assert metadata["ss_fp8_base"] == str(flag == "--fp8_base") and metadata["ss_fp8_base_unet"] == str(
        flag == "--fp8_base_unet")


def one_error_line(script: str, argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    """Refused while parsing, before any model loads, with one error line."""
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main(argv)
    assert_one_error_line(SimpleNamespace(returncode=exit_info.value.code, stderr=capsys.readouterr().err), *needles)


def test_torch_without_float8_is_one_error_line(tiny_model_dirs, two_images, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn")  # a torch build older than 2.1
    one_error_line("train_network", lora_args(tiny_model_dirs["sd15"], two_images, tmp_path, 2, "--mixed_precision",
                                              "bf16", "--fp8_base"), capsys,
                   "--fp8_base needs torch.float8_e4m3fn", "has no torch.float8_e4m3fn", "torch 2.1 or newer")


@pytest.mark.parametrize("script, argv, needles", [
    ("train_network", ["--fp8_base_unet"], ("--fp8_base_unet needs --mixed_precision fp16 or bf16",
                                            "got --mixed_precision no")),
    ("train_network", ["--fp8_base", "--mixed_precision", "no"], ("--fp8_base needs --mixed_precision fp16 or bf16",)),
    ("train_sdxl", ["--fp8_base", "--mixed_precision", "bf16"], ("--fp8_base is implemented for networks",
                                                                "train_network.py", "drop it")),
    ("train_controlnet", ["--fp8_base", "--mixed_precision", "bf16"], ("--fp8_base is implemented for networks",)),
])
def test_fp8_flags_refused_with_one_line(tiny_model_dirs, two_images, tmp_path, capsys, script, argv, needles) -> None:
    base = ["--pretrained_model_name_or_path", str(tiny_model_dirs["sdxl"]), "--in_json", str(two_images / "meta.json"),
            "--train_data_dir", str(two_images / "images"), "--output_dir", str(tmp_path / "out")]
    one_error_line(script, base + argv, capsys, *needles)
    assert not (tmp_path / "out").exists()


KOHYA_SS_PRESETS = Path(__file__).resolve().parent / "data" / "kohya_ss_presets"


def test_kohya_ss_gui_fp8_base_key_is_the_flag(tmp_path, capsys) -> None:
    """The kohya_ss GUI's LoRA tab writes ``fp8_base = true`` (its "fp8 base" checkbox) into the config: read as
    --fp8_base, not as a GUI-only key; a fine-tune config with it is refused by train_sdxl with one line."""
    import train_network

    text = (KOHYA_SS_PRESETS / "sdxl_lora.toml").read_text(encoding="utf-8")
    gui = tmp_path / "sdxl_lora_fp8.toml"
    gui.write_text(text.replace('enable_bucket = true\n', 'enable_bucket = true\nfp8_base = true\n'), encoding="utf-8")
    args = config.parse_args(train_network.build_parser(), ["--config_file", str(gui)])
    assert args.fp8_base is True and args.fp8_base_unet is False and args.mixed_precision == "bf16"
    assert "fp8_base" not in capsys.readouterr().out  # not named among the ignored GUI keys
    finetune = tmp_path / "sdxl_finetune_fp8.toml"
    finetune.write_text((KOHYA_SS_PRESETS / "sdxl_finetune.toml").read_text(encoding="utf-8") + "fp8_base = 1\n",
                        encoding="utf-8")
    one_error_line("train_sdxl", ["--config_file", str(finetune)], capsys, "--fp8_base is implemented for networks")


def test_ddp_wraps_the_lora_unet_with_fp8_weights(bf16_unet, tmp_path) -> None:
    """DDP broadcasts every parameter when it wraps a module and gloo has no float8 ("Invalid scalar type"): the
    float8 weights are left out of that broadcast (every rank loaded the same base), and the LoRA still trains."""
    import torch.distributed as dist

    import networks.lora
    from train_network import LoraUNet

    unet = copy.deepcopy(bf16_unet)
    store_frozen_weights_in_fp8(unet)
    network = networks.lora.create_network(1.0, 4, 1.0, None, [], unet)
    network.apply_to([], unet, False, True)
    dist.init_process_group("gloo", init_method=(tmp_path / "rendezvous").as_uri(), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(LoraUNet(network, unet))
        args, kwargs = unet_inputs(bf16_unet)
        wrapped(*args, **kwargs).sample.float().square().mean().backward()
    finally:
        dist.destroy_process_group()
    assert all(p.grad is not None for name, p in network.named_parameters() if "lora_up" in name)
