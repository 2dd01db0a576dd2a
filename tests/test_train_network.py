"""train_network.py end to end on the tiny models: files that load in diffusers, exact resume, DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import train_network
from library.training.checkpoints import read_training_state
from tests.helpers.user_paths import lora_args
from tools.make_sample_dataset import make_sample_dataset



@pytest.fixture(scope="module")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "shapes", count=6, size=96, seed=0).parent


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_trained_lora_loads_in_diffusers_and_changes_the_unet(tiny_model_dirs, sample_data, tmp_path, family, capsys):
    output = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs[family], sample_data, output, 3)) == 0
    printed = capsys.readouterr().out
    assert "global batch: 1 per device x 1 accumulation x 1 process(es) = 1" in printed
    assert "optimizer steps: 6 per epoch, 3 in total over 1 epoch(s)" in printed
    lora = output / "lora.safetensors"
    tensors = lora_tensors(lora)
    te_prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith(te_prefix) for k in tensors)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    # up weights start at zero, so every module that took part in a forward pass has moved; no module is made
    # on a layer the loss never sees (SDXL conditions on text encoder 1's penultimate layer), so none is left.
    still_zero = sorted(k for k, v in tensors.items() if k.endswith("lora_up.weight") and v.abs().sum() == 0)
    assert not still_zero, still_zero
    if family == "sdxl":
        assert not any(k.startswith("lora_te1_text_model_encoder_layers_2_") for k in tensors)
    with safe_open(str(lora), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == {"sd15": "sd_v1", "sd21": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["ss_steps"] == "3" and metadata["ss_num_train_images"] == "6"
    assert len(metadata["sshs_model_hash"]) == 64

    pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs[family], local_files_only=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    width = pipe.unet.config.cross_attention_dim
    text = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(1))
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.zeros(1, pipe.text_encoder_2.config.projection_dim),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        before = pipe.unet(latents, 500, text, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(lora))
        after = pipe.unet(latents, 500, text, added_cond_kwargs=added).sample
    assert (after - before).abs().max() > 1e-6


def test_resume_twice_gives_the_same_weights_as_one_run(tiny_model_dirs, sample_data, tmp_path):
    """6 steps straight == 2 steps, resume to 4, resume to 6 (with dropout and accumulation on)."""
    extra = ("--network_dropout", "0.2", "--gradient_accumulation_steps", "2", "--save_every_n_steps", "2")
    model = tiny_model_dirs["sd15"]
    assert train_network.main(lora_args(model, sample_data, tmp_path / "straight", 6, *extra)) == 0
    assert train_network.main(lora_args(model, sample_data, tmp_path / "first", 6, *extra, "--save_state")) == 0
    step2 = tmp_path / "first" / "lora-step00000002-state"
    assert read_training_state(step2).global_step == 2
    assert train_network.main(lora_args(model, sample_data, tmp_path / "second", 6, *extra, "--save_state",
                                        "--resume", str(step2))) == 0
    step4 = tmp_path / "second" / "lora-step00000004-state"
    assert read_training_state(step4).global_step == 4
    assert train_network.main(lora_args(model, sample_data, tmp_path / "third", 6, *extra,
                                        "--resume", str(step4))) == 0
    straight = lora_tensors(tmp_path / "straight" / "lora.safetensors")
    resumed = lora_tensors(tmp_path / "third" / "lora.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-7)
    at_step2 = lora_tensors(tmp_path / "first" / "lora-step00000002.safetensors")
    assert any(not torch.equal(at_step2[k], straight[k]) for k in straight)  # training went on after the save


def test_samples_and_tensorboard_logs(tiny_model_dirs, sample_data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 5\n# a comment\na blue square --n blurry --s 2\n")
    output = tmp_path / "out"
    args = lora_args(tiny_model_dirs["sdxl"], sample_data, output, 4, "--sample_prompts", str(prompts),
                     "--sample_every_n_steps", "2", "--sample_at_first", "--logging_dir", str(tmp_path / "logs"),
                     "--max_token_length", "150", "--save_every_n_steps", "1", "--save_last_n_steps", "1")
    assert train_network.main(args) == 0
    names = sorted(p.name for p in (output / "sample").glob("*.png"))
    # kohya's names: at first as epoch 0 ("e000000"), then by step
    assert [n.split("_")[1:3] for n in names] == [["000002", "00"], ["000002", "01"], ["000004", "00"], ["000004", "01"],
                                                  ["e000000", "00"], ["e000000", "01"]]
    assert names[0].endswith("_5.png")
    # --save_every_n_steps 1 --save_last_n_steps 1 over 4 steps: saves at 1, 2, 3 (4 is the final file); at step 3
    # the step-1 save is more than 1 step old and removed, as kohya does
    assert sorted(p.name for p in output.glob("*.safetensors")) == [
        "lora-step00000002.safetensors", "lora-step00000003.safetensors", "lora.safetensors"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    assert event_files
    events = EventAccumulator(str(event_files[0].parent), size_guidance={"images": 0}).Reload()
    assert "loss/current" in events.Tags()["scalars"] and "lr" in events.Tags()["scalars"]
    # every sample also reaches TensorBoard, at the step it was taken (0 = --sample_at_first), at its own size
    assert sorted(events.Tags()["images"]) == ["samples/00", "samples/01"]
    shown = events.Images("samples/00")
    assert [image.step for image in shown] == [0, 2, 4] and (shown[0].width, shown[0].height) == (64, 64)


def test_nan_loss_stops_and_keeps_the_last_good_state(tiny_model_dirs, sample_data, tmp_path, capsys):
    output = tmp_path / "out"
    args = lora_args(tiny_model_dirs["sd15"], sample_data, output, 6, "--learning_rate", "1e35", "--optimizer_type",
                     "SGDNesterov", "--max_grad_norm", "0")
    assert train_network.main(args) == 1
    err = capsys.readouterr().err
    assert "the loss became NaN/inf at step" in err
    states = list(output.glob("lora-nan-step*-state"))
    assert len(states) == 1
    state = read_training_state(states[0])
    saved = lora_tensors(output / f"{states[0].name[:-len('-state')]}.safetensors")
    assert state.global_step >= 1
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not (output / "lora.safetensors").exists()


def test_dataset_problems_are_reported_before_the_model_is_loaded(sample_data, tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "images" / "bad.png").write_bytes(b"not a png")
    (broken / "meta.json").write_text(json.dumps({"bad": {"caption": "x"}, "missing": {"caption": "y"}}))
    args = lora_args(tmp_path / "no_such_model", broken, tmp_path / "out", 1)
    assert train_network.main(args) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "missing" in err
    assert "no_such_model" not in err  # the data was checked first



# DeepSpeed ZeRO-2 on two processes: tests/test_lycoris_loop.py::test_two_cpu_processes[dora-zero2] launches this
# script with networks.lora on SD1.5 under ZeRO-2 and asserts what a plain-LoRA launch here did (2 processes, every
# lora_up trained), plus no error line, finite tensors and the DoRA scales: one launch (~30 CPU-s) for both.


def _scalars(logs: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(logs.rglob("events.out.tfevents*")).parent)).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_validation_loss_is_fixed_noise_on_held_out_images(tiny_model_dirs, sample_data, tmp_path, capsys, monkeypatch):
    """Each evaluation runs twice on the same weights and must give the identical number (fixed timesteps and
    noise); between evaluations the model learns, so the logged values move."""
    from library.training import validation

    original, repeats = validation.validation_loss, []

    def evaluated_twice(*args, **kwargs):
        first, second = original(*args, **kwargs), original(*args, **kwargs)
        repeats.append((first, second))
        return first

    monkeypatch.setattr(validation, "validation_loss", evaluated_twice)
    args = lora_args(tiny_model_dirs["sd15"], sample_data, tmp_path / "out", 4, "--validation_split", "0.34",
                     "--validate_every_n_steps", "2", "--logging_dir", str(tmp_path / "logs"), "--learning_rate", "1e-2")
    assert train_network.main(args) == 0
    assert "images: 4 train + 0 regularisation" in capsys.readouterr().out  # 6 images, ceil(6 * 0.66) train
    assert len(repeats) == 2 and all(a == b for a, b in repeats)
    values = _scalars(tmp_path / "logs", "loss/validation")
    assert [step for step, _ in values] == [2, 4]
    assert values[0][1] == repeats[0][0] and values[0][1] != values[1][1]


def test_adamw8bit_trains_with_8bit_state(tiny_model_dirs, sample_data, tmp_path):
    output = tmp_path / "out"
    # bitsandbytes keeps fp32 state for tensors under min_8bit_size (4096); every tiny LoRA tensor is smaller
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], sample_data, output, 2, "--optimizer_type", "AdamW8bit",
                                        "--optimizer_args", "min_8bit_size=0", "--save_state")) == 0
    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
    from library.training.train_state_io import read_tree

    optimizer_state = read_tree(output / "lora-state", "optimizer")["state"]  # safetensors + JSON, no pickle
    quantized = [state["__bnb_optimizer_quant_state__"] for state in optimizer_state.values()]
    assert quantized and all(q["state1"].dtype == torch.uint8 for q in quantized)


@pytest.fixture(scope="module")
def minimal_unet_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD1 with two UNet levels and one layer per block: the smallest real graph for torch.compile."""
    import copy

    from library.models.family_configs import tiny_configs
    from library.models.loading import build_model, save_diffusers

    configs = copy.deepcopy(tiny_configs("sd1"))
    configs["unet"].update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 32],
                           layers_per_block=1)
    folder = tmp_path_factory.mktemp("minimal") / "sd1_minimal"
    save_diffusers(build_model("sd1", configs, seed=0), folder)
    return folder


def test_torch_compile_trains_the_same_lora(minimal_unet_model, sample_data, tmp_path):
    """dynamo captures the LoRA-wrapped UNet; aot_eager keeps the test fast (a cold inductor compile of even this
    UNet takes minutes on 2 cores) while exercising the same capture, wrapping and unwrapping for saving."""
    extra = ("--network_train_unet_only",)
    assert train_network.main(lora_args(minimal_unet_model, sample_data, tmp_path / "eager", 2, *extra)) == 0
    assert train_network.main(lora_args(minimal_unet_model, sample_data, tmp_path / "compiled", 2, *extra,
                                        "--torch_compile", "--dynamo_backend", "aot_eager")) == 0
    eager = lora_tensors(tmp_path / "eager" / "lora.safetensors")
    compiled = lora_tensors(tmp_path / "compiled" / "lora.safetensors")
    assert eager.keys() == compiled.keys()  # no "_orig_mod" in the saved names
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6)


def test_masked_loss_without_masks_is_refused_at_start(tiny_model_dirs, sample_data, tmp_path, capsys):
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], sample_data, tmp_path / "out", 2, "--masked_loss")) == 1
    assert "add --alpha_mask" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_masked_loss_trains_on_alpha_masks(tiny_model_dirs, tmp_path):
    from PIL import Image

    data = tmp_path / "rgba"
    (data / "images").mkdir(parents=True)
    meta = {}
    for index in range(3):
        image = Image.new("RGBA", (64, 64), (200, 30, 30, 0))
        image.paste((200, 30, 30, 255), (16, 16, 48, 48))  # opaque square, transparent border
        image.save(data / "images" / f"m{index}.png")
        meta[f"m{index}"] = {"caption": "a red square"}
    (data / "meta.json").write_text(json.dumps(meta))
    output = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], data, output, 2, "--alpha_mask", "--masked_loss")) == 0
    tensors = lora_tensors(output / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))


def test_bf16_mixed_precision_with_bf16_network_and_gradient_checkpointing(tiny_model_dirs, sample_data, tmp_path):
    output = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs["sdxl"], sample_data, output, 2, "--mixed_precision", "bf16",
                                        "--full_bf16", "--save_precision", "bf16", "--gradient_checkpointing")) == 0
    tensors = lora_tensors(output / "lora.safetensors")
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())


def test_ddp_on_two_cpu_processes(tiny_model_dirs, sample_data, tmp_path, launch_two_cpu_processes):
    output = tmp_path / "out"
    result = launch_two_cpu_processes("train_network.py", lora_args(tiny_model_dirs["sd15"], sample_data, output, 2))
    # 6 images over 2 ranks: 3 batches each, so 3 optimizer steps per epoch with a global batch of 2
    assert "x 2 process(es) = 2" in result.stdout and "optimizer steps: 3 per epoch" in result.stdout
    assert (output / "lora.safetensors").is_file()


def test_schedule_free_optimizer_switches_to_eval_for_samples_and_saves(tiny_model_dirs, sample_data, tmp_path):
    from library.training.callbacks import PeriodicSampling
    from library.training.loop import Callback
    from library.training.optim import is_schedule_free

    class Optimizer(Callback):
        def on_train_start(self, run, state):
            assert is_schedule_free(run.prepared.optimizer)
            self.optimizer = run.prepared.optimizer

    modes, optimizer = [], Optimizer()
    # sampled at the same points as --sample_prompts, inside the same evaluation context
    recorder = PeriodicSampling(lambda step, epoch: modes.append(optimizer.optimizer.param_groups[0]["train_mode"]),
                                every_n_steps=2, every_n_epochs=None, at_first=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle --w 64 --h 64 --s 1\n")
    output = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], sample_data, output, 2, "--optimizer_type",
                                        "AdamWScheduleFree", "--sample_prompts", str(prompts),
                                        "--sample_every_n_steps", "2"), callbacks=[optimizer, recorder]) == 0
    assert modes == [False]  # sampled with the averaged (eval-mode) weights
    assert optimizer.optimizer.param_groups[0]["train_mode"]  # and back to training after
    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        assert "schedulefree" in handle.metadata()["ss_optimizer"].lower()


def test_a_third_party_network_module_with_only_kohyas_api_trains(tiny_model_dirs, sample_data, tmp_path):
    """--network_module with kohya's create_network signature (no clip_skip) and its own network class."""
    from tests.helpers import kohya_style_network

    kohya_style_network.CALLS.clear()
    output = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], sample_data, output, 2, "--network_module",
                                        "tests.helpers.kohya_style_network", "--network_args", "foo=bar")) == 0
    assert kohya_style_network.CALLS == [{"multiplier": 1.0, "network_dim": 4, "network_alpha": 2.0,
                                          "neuron_dropout": None, "foo": "bar"}]
    tensors = lora_tensors(output / "lora.safetensors")
    assert tensors and all(k.endswith((".down.weight", ".up.weight")) for k in tensors)
    assert all(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith(".up.weight"))


def test_a_new_adapter_kind_trains_as_a_network_module(tiny_model_dirs, sample_data, tmp_path):
    """The toy adapter of tests/helpers/scaled_delta_network.py (one module class) through the trainer."""
    output = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], sample_data, output, 2, "--network_module",
                                        "tests.helpers.scaled_delta_network")) == 0
    tensors = lora_tensors(output / "lora.safetensors")
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    assert all(k.endswith((".delta", ".alpha")) for k in tensors)
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.startswith("lora_unet_") and k.endswith(".delta"))
    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "tests.helpers.scaled_delta_network"
