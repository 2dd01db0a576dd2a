"""FSDP2 and DeepSpeed ZeRO-3 on 2 CPU processes (gloo): sharded training, complete model files written by rank 0
that diffusers loads, sampling in lockstep, state save and exact resume; and the flag rules, in-process.

Each mode is one launch that trains 2 steps (saving model + state at step 1 and at the end); the FSDP test adds
one resume launch from the step-1 state, which must end with the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import train_network
import train_sdxl
from library.cli.accelerate_args import accelerator_options_from_args
from library.models.loading import load_model
from library.training.accelerate_utils import build_accelerator
from library.training.fsdp_setup import build_fsdp_plugin, resolve_fsdp_options
from library.training.train_state_io import FSDP_FORMAT, check_folder, read_record
from tests.helpers.user_paths import lora_args
from tools.make_sample_dataset import make_sample_dataset


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "shapes", count=4, size=96, seed=1).parent


def sdxl_args(model: Path, data: Path, output: Path, *extra: object) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--in_json", str(data / "meta.json"),
            "--train_data_dir", str(data / "images"), "--resolution", "64", "--learning_rate", "1e-3", "--seed", "5",
            "--max_data_loader_n_workers", "0", "--output_dir", str(output), "--output_name", "model",
            "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_model_as", "safetensors",
            *map(str, extra)]


def state_dicts(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    model = load_model(path)
    return {"unet": model.unet.state_dict(), "te1": model.text_encoders[0].state_dict(),
            "te2": model.text_encoders[1].state_dict()}


def moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(a[k], b[k]) for k in a)


def two_prompts(tmp_path: Path) -> Path:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a circle --w 64 --h 64 --s 2\na square --w 64 --h 64 --s 2\n")
    return prompts


def test_fsdp_two_processes_save_full_model_sample_and_resume_exactly(tiny_model_dirs, sample_data, tmp_path,
                                                                      launch_two_cpu_processes):
    model = tiny_model_dirs["sdxl"]
    first = tmp_path / "first"
    launch_two_cpu_processes("train_sdxl.py", sdxl_args(model, sample_data, first, "--fsdp", "--train_text_encoder",
                                                        "--save_state", "--sample_prompts", two_prompts(tmp_path),
                                                        "--sample_every_n_steps", "2"))
    # rank 0 wrote a complete model that diffusers loads, with the UNet and text encoder 1 trained
    pipe = StableDiffusionXLPipeline.from_single_file(first / "model.safetensors", config=str(model),
                                                      local_files_only=True)
    ours, base = state_dicts(first / "model.safetensors"), state_dicts(Path(model))
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in ours["unet"].items())
    assert moved(ours["unet"], base["unet"]) == len(base["unet"])  # every tensor (none left empty or stale)
    assert moved(ours["te1"], base["te1"]) > 0 and moved(ours["te2"], base["te2"]) > 0
    assert all(torch.isfinite(v).all() for v in ours["unet"].values())
    # sampling ran on both ranks in lockstep; rank 0 wrote both prompts' images
    assert sorted(p.name.split("_")[2] for p in (first / "sample").glob("*.png")) == ["00", "01"]
    # each rank's shards, safetensors + JSON only
    state = first / "model-step00000001-state"
    record = read_record(state)
    check_folder(state, record)
    assert record.format == FSDP_FORMAT
    assert {p.name for p in state.glob("fsdp_*")} == {
        f"fsdp_{kind}_rank{r}.{ext}" for r in (0, 1) for kind, ext in
        [("model", "safetensors"), ("optimizer", "json"), ("optimizer", "safetensors")]}

    resumed = tmp_path / "resumed"
    launch_two_cpu_processes("train_sdxl.py", sdxl_args(model, sample_data, resumed, "--fsdp", "--train_text_encoder",
                                                        "--resume", state))
    again = state_dicts(resumed / "model.safetensors")
    for name, tensors in ours.items():
        for key, value in tensors.items():
            torch.testing.assert_close(again[name][key], value, rtol=0, atol=0)


def test_zero3_two_processes_gather_complete_weights_for_saves_samples_and_state(tiny_model_dirs, sample_data,
                                                                                 tmp_path, launch_two_cpu_processes):
    model = tiny_model_dirs["sdxl"]
    output = tmp_path / "out"
    launch_two_cpu_processes("train_sdxl.py", sdxl_args(model, sample_data, output, "--deepspeed", "--zero_stage", "3",
                                                        "--save_state", "--sample_prompts", two_prompts(tmp_path),
                                                        "--sample_every_n_steps", "2"))
    base = state_dicts(Path(model))
    step1, final = state_dicts(output / "model-step00000001.safetensors"), state_dicts(output / "model.safetensors")
    pipe = StableDiffusionXLPipeline.from_single_file(output / "model.safetensors", config=str(model),
                                                      local_files_only=True)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in final["unet"].items())
    # every save holds every tensor complete (ZeRO-3 ranks hold empty placeholders), and they differ by a step
    for saved in (step1, final):
        assert {k: v.shape for k, v in saved["unet"].items()} == {k: v.shape for k, v in base["unet"].items()}
        assert moved(saved["unet"], base["unet"]) == len(base["unet"])
        assert moved(saved["te1"], base["te1"]) == 0  # frozen text encoders are saved as loaded
    assert moved(final["unet"], step1["unet"]) == len(base["unet"])
    assert sorted(p.name.split("_")[2] for p in (output / "sample").glob("*.png")) == ["00", "01"]
    # DeepSpeed's ZeRO-3 checkpoint passes the weights-only pickle check the resume runs first
    state = output / "model-step00000001-state"
    check_folder(state, read_record(state))
    assert sorted(p.name for p in (state / "deepspeed" / "engine").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]


# --------------------------------------------------------------------------------------------------------
# Flags, launcher settings and refusals (in-process, no model)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script, extra, message", [
    (train_network, ["--fsdp"], "--fsdp (or a launcher config with distributed_type: FSDP) cannot be used with "
                                "train_network.py"),
    (train_sdxl, ["--fsdp", "--deepspeed"], "--fsdp and --deepspeed both shard the model"),
    (train_sdxl, ["--fsdp", "--fused_backward_pass"], "--fused_backward_pass cannot be used with --fsdp"),
    (train_sdxl, ["--fsdp", "--use_ema"], "--use_ema cannot be used with --fsdp"),
    (train_sdxl, ["--deepspeed", "--zero_stage", "3", "--use_ema"], "--use_ema cannot be used with --deepspeed"),
    (train_sdxl, ["--fsdp_offload_params"], "--fsdp_offload_params only applies with --fsdp"),
    (train_sdxl, ["--fsdp", "--ddp_static_graph"], "--ddp_static_graph configures DDP, which --fsdp replaces"),
])
def test_invalid_combinations_are_one_error_line(tiny_model_dirs, sample_data, tmp_path, capsys, script, extra,
                                                 message):
    args = (lora_args(tiny_model_dirs["sd15"], sample_data, tmp_path, 1) if script is train_network else
            sdxl_args(tiny_model_dirs["sdxl"], sample_data, tmp_path))
    with pytest.raises(SystemExit):
        script.main([*args, *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


def test_zero3_refuses_training_text_encoders(tiny_model_dirs, sample_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_sdxl.main(sdxl_args(tiny_model_dirs["sdxl"], sample_data, tmp_path, "--deepspeed", "--zero_stage", "3",
                                  "--train_text_encoder"))
    assert "--train_text_encoder cannot be used with --deepspeed --zero_stage 3" in capsys.readouterr().err


def test_fsdp_plugin_from_flags_and_from_the_launcher_config(monkeypatch):
    parser = train_sdxl.build_parser()
    options = accelerator_options_from_args(parser.parse_args(
        ["--fsdp", "--fsdp_sharding_strategy", "shard_grad_op", "--fsdp_offload_params"]))
    fsdp = resolve_fsdp_options(sharding_strategy=options.fsdp_sharding_strategy,
                                offload_params=options.fsdp_offload_params,
                                extra_wrap_classes=options.fsdp_transformer_layer_cls_to_wrap)
    plugin = build_fsdp_plugin(fsdp)
    assert (plugin.fsdp_version, plugin.reshard_after_forward) == (2, False)
    assert type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    assert {"BasicTransformerBlock", "ResnetBlock2D", "UNet2DConditionModel"} <= set(plugin.transformer_cls_names_to_wrap)

    # what `accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml` exports
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Downsample2D")
    options = accelerator_options_from_args(parser.parse_args([]))
    assert options.fsdp  # the launcher turned it on without --fsdp
    launched = resolve_fsdp_options(sharding_strategy=None, offload_params=None, extra_wrap_classes=None)
    assert (launched.sharding_strategy, launched.offload_params, launched.extra_wrap_classes) == (
        "FULL_SHARD", False, ("Downsample2D",))
    with pytest.raises(ValueError, match="--fsdp_sharding_strategy SHARD_GRAD_OP contradicts the launcher"):
        resolve_fsdp_options(sharding_strategy="SHARD_GRAD_OP", offload_params=None, extra_wrap_classes=None)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="this trainer runs FSDP2: set fsdp_version: 2"):
        resolve_fsdp_options(sharding_strategy=None, offload_params=None, extra_wrap_classes=None)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ValueError, match="--fsdp needs a distributed launcher"):
        build_accelerator(accelerator_options_from_args(parser.parse_args(["--fsdp"])))


def test_accelerate_config_files_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
    fsdp = load_config_from_file(str(root / "fsdp_8gpu.yaml"))
    assert (fsdp.distributed_type.value, fsdp.num_processes, fsdp.fsdp_config["fsdp_version"]) == ("FSDP", 8, 2)
    zero3 = load_config_from_file(str(root / "zero3_8gpu.yaml"))
    assert (zero3.distributed_type.value, zero3.num_processes) == ("MULTI_GPU", 8)
    json.dumps(fsdp.fsdp_config)  # plain values only
