"""LyCORIS (``--network_module lycoris.kohya`` / ``networks.lycoris_kohya``) and DoRA (``networks.lora dora_wd=True``)
through what the loop offers, as a kohya user types it: exact resume, --network_weights continuation, gradient
checkpointing, block LR, LoRA+, sampling, 2-process DDP and DeepSpeed ZeRO-2 (tiny models, 64 px, few steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_network
from library.training.loop import Callback
from tests.helpers.user_paths import error_lines, lora_args

LOKR = ("--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4", "preset=attn-mlp")
DORA = ("--network_module", "networks.lora", "--network_args", "dora_wd=True")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-7, msg=key)


def zero_initialised(file: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS / LoRA start at zero (so a non-zero one has trained): LoKr's w2 (or its w2_b factor),
    LoRA's up."""
    return {k: v for k, v in file.items() if k.endswith((".lokr_w2", ".lokr_w2_b", ".lora_up.weight"))}


class NetworkAtStart(Callback):
    """The network's tensors and the optimizer's param groups when training starts (after any loading)."""

    def on_train_start(self, run, state) -> None:
        network = run.trainee.network
        self.state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        owners = {id(p): (module.lora_name, name) for module in network.text_encoder_loras + network.unet_loras
                  for name, p in module.named_parameters()}
        self.trainable = sorted(owners[id(p)] for p in network.parameters() if p.requires_grad)
        self.groups = [(group["lr"], [owners[id(p)] for p in group["params"]])
                       for group in run.prepared.optimizer.param_groups]


def test_lokr_resume_with_gradient_checkpointing_and_network_weights_continuation(tiny_model_dirs, shapes_data,
                                                                                  tmp_path):
    """2 steps straight == 1 step + --resume (with --gradient_checkpointing on) + 1; then --network_weights
    starts a new run from exactly the file's values and trains on."""
    model = tiny_model_dirs["sd15"]
    extra = (*LOKR, "rank_dropout=0.2", "--save_every_n_steps", "1")
    straight = tmp_path / "straight"
    assert train_network.main(lora_args(model, shapes_data, straight, 2, *extra, "--save_state")) == 0
    state = straight / "lora-step00000001-state"
    assert state.is_dir()
    resumed = tmp_path / "resumed"
    assert train_network.main(lora_args(model, shapes_data, resumed, 2, *extra, "--resume", str(state),
                                        "--gradient_checkpointing")) == 0
    final = tensors(straight / "lora.safetensors")
    assert any(".lokr_w1" in k for k in final) and zero_initialised(final)
    assert all(v.abs().sum() > 0 for v in zero_initialised(final).values())  # every module trained
    assert_same_tensors(tensors(resumed / "lora.safetensors"), final)
    at_step1 = tensors(straight / "lora-step00000001.safetensors")
    assert any(not torch.equal(at_step1[k], final[k]) for k in final)  # training went on after the save

    start = NetworkAtStart()
    continued = tmp_path / "continued"
    assert train_network.main(lora_args(model, shapes_data, continued, 1, *LOKR, "--network_weights",
                                        str(straight / "lora.safetensors")), callbacks=[start]) == 0
    assert start.state.keys() == final.keys()
    for key, value in final.items():
        assert torch.equal(start.state[key].to(value.dtype), value), key
    after = tensors(continued / "lora.safetensors")
    moved = [k for k in final if not torch.equal(after[k], final[k])]
    assert moved and all((after[k] - final[k]).abs().max() < 0.05 for k in final)  # one small step on from the file


def _sdxl_block(name: str) -> int:
    """kohya's block of an SDXL UNet module from its LDM name: 0 embeddings, 1-9 input_blocks, 10-12
    middle_block, 13-21 output_blocks, 22 out."""
    rest = name.removeprefix("lora_unet_")
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(prefix):
            return first + int(rest[len(prefix):].split("_")[0])
    assert rest.startswith("out_"), name
    return 22


def test_locon_block_lr_loraplus_and_samples_on_sdxl(tiny_model_dirs, shapes_data, tmp_path):
    """down/mid/up_lr_weight give each UNet module the LR of its kohya block, LoRA+ puts LyCORIS's lora_up at
    lr * ratio, and the samples after a step differ from those at the start (lora_up = 0: the base model's)."""
    down = [round(0.1 * (i + 1), 2) for i in range(10)]
    up = [round(2.0 + 0.1 * i, 2) for i in range(10)]
    weights = down + [1.5] * 3 + up  # SDXL's 23 blocks
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 5\n")
    output = tmp_path / "out"
    start = NetworkAtStart()
    args = lora_args(tiny_model_dirs["sdxl"], shapes_data, output, 1,
                     "--network_module", "lycoris.kohya", "--network_args", "algo=locon", "preset=attn-mlp",
                     "down_lr_weight=" + ",".join(map(str, down)), "mid_lr_weight=1.5",
                     "up_lr_weight=" + ",".join(map(str, up)), "loraplus_lr_ratio=4",
                     "--unet_lr", "1e-2", "--text_encoder_lr", "1e-4", "--sample_prompts", str(prompts),
                     "--sample_at_first", "--sample_every_n_steps", "1")
    assert train_network.main(args, callbacks=[start]) == 0

    seen_blocks, seen_plus = set(), 0
    for lr, owners in start.groups:
        for name, param_name in owners:
            plus = "lora_up" in param_name
            seen_plus += plus
            if name.startswith("lora_unet_"):
                block = _sdxl_block(name)
                seen_blocks.add(block)
                expected = 1e-2 * weights[block] * (4 if plus else 1)
            else:
                assert name.startswith(("lora_te1_", "lora_te2_")), name
                expected = 1e-4 * (4 if plus else 1)
            assert lr == pytest.approx(expected), (name, param_name, lr)
    assert seen_plus and {5, 11, 14} <= seen_blocks  # attention in input_blocks 4, the middle, output_blocks 1
    in_groups = sorted(owner for _, owners in start.groups for owner in owners)
    assert in_groups == start.trainable  # every trainable tensor in exactly one group

    samples = sorted((output / "sample").glob("*.png"))
    assert [p.name.split("_")[1] for p in samples] == ["000001", "e000000"]
    after, before = (np.asarray(Image.open(p), dtype=np.int16) for p in samples)
    assert np.abs(after - before).max() > 0


@pytest.mark.parametrize("network_args, needles", [
    (("algo=lokr", "loraplus_lr_ratio=4"), ("loraplus_lr_ratio", "algo=lokr", "use algo=locon")),
    (("algo=loha", "loraplus_unet_lr_ratio=4"), ("loraplus_unet_lr_ratio", "algo=loha")),
    (("algo=lokr", "block_dims=" + ",".join(["4"] * 25)), ("block_dims", "networks.lora")),
    (("down_lr_weight=cosine+x",), ("down_lr_weight", "cosine")),
    (("loraplus_lr_ratio=x",), ("loraplus", "not a number")),
])
def test_what_lycoris_cannot_do_is_one_error_line_before_loading(network_args, needles, shapes_data, tmp_path,
                                                                  capsys):
    """LyCORIS's plug-in would ignore these silently (LoRA+ without a lora_up, block dims) or fail late."""
    args = lora_args(tmp_path / "no_such_model", shapes_data, tmp_path / "out", 1,
                     "--network_module", "lycoris.kohya", "--network_args", *network_args)
    assert train_network.main(args) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(needle in lines[0] for needle in needles), err
    assert "no_such_model" not in err  # refused before the model was looked at


def test_dora_resume_ends_where_one_run_ends(tiny_model_dirs, shapes_data, tmp_path):
    model = tiny_model_dirs["sd15"]
    extra = (*DORA, "rank_dropout=0.2", "--save_every_n_steps", "1")
    straight = tmp_path / "straight"
    assert train_network.main(lora_args(model, shapes_data, straight, 2, *extra, "--save_state")) == 0
    resumed = tmp_path / "resumed"
    assert train_network.main(lora_args(model, shapes_data, resumed, 2, *extra, "--resume",
                                        str(straight / "lora-step00000001-state"))) == 0
    final = tensors(straight / "lora.safetensors")
    assert any(k.endswith(".dora_scale") for k in final)
    assert_same_tensors(tensors(resumed / "lora.safetensors"), final)


@pytest.mark.parametrize("family, network, launch_flags", [
    pytest.param("sdxl", ("--network_module", "networks.lycoris_kohya", *LOKR[2:]), ("--gradient_checkpointing",),
                 id="lokr-ddp-sdxl"),
    pytest.param("sd15", DORA, ("--deepspeed", "--zero_stage", "2"), id="dora-zero2"),
])
def test_two_cpu_processes(family, network, launch_flags, tiny_model_dirs, shapes_data, tmp_path,
                           launch_two_cpu_processes):
    """accelerate launch --multi_gpu --num_processes 2 (gloo), with torch DDP or DeepSpeed ZeRO-2: every module
    that can reach the loss receives averaged gradients and trains (DDP stops at step 2 on a trainable parameter
    without a gradient); on SDXL, the LyCORIS modules on text encoder 1's last layer (read at its penultimate
    one) stay frozen, in the file. One launch per network kind: each costs ~30 s of CPU."""
    output = tmp_path / "out"
    result = launch_two_cpu_processes("train_network.py", lora_args(tiny_model_dirs[family], shapes_data, output, 2,
                                                                     *network, *launch_flags))
    assert "x 2 process(es) = 2" in result.stdout and not error_lines(result)
    file = tensors(output / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in file.values())
    unreachable = "lora_te1_text_model_encoder_layers_2_"  # the tiny SDXL's text encoder 1 has 3 layers
    started_at_zero = zero_initialised(file)
    frozen = {k: v for k, v in started_at_zero.items() if k.startswith(unreachable)}
    trained = {k: v for k, v in started_at_zero.items() if k not in frozen}
    assert trained and all(v.abs().sum() > 0 for v in trained.values())
    assert bool(frozen) == (family == "sdxl") and all(v.abs().sum() == 0 for v in frozen.values())
    if network == DORA:
        assert any(k.endswith(".dora_scale") for k in file)


def test_loha_with_dora_trains_the_text_encoder_under_bf16_autocast(tiny_model_dirs, shapes_data, tmp_path):
    # LyCORIS builds its weight updates in float32 while the frozen text encoder is bf16: kohya encodes prompts
    # under autocast, so do we (this run stopped with "expected m1 and m2 to have the same dtype" before).
    output = tmp_path / "out"
    args = lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2, "--network_module", "lycoris.kohya",
                     "--network_args", "algo=loha", "dora_wd=True", "--mixed_precision", "bf16")
    assert train_network.main(args) == 0
    file = tensors(output / "lora.safetensors")
    text_encoder = {k: v for k, v in file.items() if k.startswith("lora_te_") and k.endswith(".hada_w2_a")}
    assert text_encoder and all(torch.isfinite(v).all() for v in text_encoder.values())
    assert sum(int(v.abs().sum() > 0) for v in text_encoder.values()) > len(text_encoder) // 2  # zero at init
    assert any(k.endswith(".dora_scale") for k in file)
