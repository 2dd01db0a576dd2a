"""train_controlnet.py end to end on tiny models: files diffusers loads and runs, a frozen base UNet, all data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

import train_controlnet
from library.training.loop import Callback
from library.models.controlnet_models import load_controlnet
from library.models.loading import load_model
from tools import canny, make_controlnet_dataset
from tools.make_sample_dataset import make_sample_dataset


@pytest.fixture(scope="module")
def canny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_sample_dataset(tmp_path_factory.mktemp("cn") / "shapes", count=4, size=96, seed=2).parent
    assert canny.main([str(root / "images"), str(root / "canny")]) == 0
    return root


def args_for(model: Path, output: Path, steps: int, *data: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), *data, "--resolution", "64", "--learning_rate", "1e-3",
            "--seed", "2", "--max_data_loader_n_workers", "0", "--output_dir", str(output), "--output_name", "cn",
            "--max_train_steps", str(steps), *extra]


def folder_data(root: Path) -> tuple[str, ...]:
    return ("--train_data_dir", str(root / "images"), "--conditioning_data_dir", str(root / "canny"),
            "--caption_extension", ".caption")


def test_sd15_controlnet_trains_saves_both_formats_and_runs_in_diffusers(tiny_model_dirs, canny_data, tmp_path):
    snapshots = {}

    class WatchTheUNet(Callback):
        def on_train_start(self, run, state):
            snapshots["before"] = {k: v.clone() for k, v in run.trainee.model.unet.state_dict().items()}

        def on_train_end(self, run, state):
            snapshots["after"] = run.trainee.model.unet.state_dict()

    model = tiny_model_dirs["sd15"]
    assert train_controlnet.main(args_for(model, tmp_path / "file", 2, *folder_data(canny_data)),
                                 callbacks=[WatchTheUNet()]) == 0
    assert all(torch.equal(snapshots["before"][k], snapshots["after"][k]) for k in snapshots["before"])  # base frozen
    assert train_controlnet.main(args_for(model, tmp_path / "folder", 2, *folder_data(canny_data),
                                          extra=("--save_model_as", "diffusers"))) == 0
    from_folder = ControlNetModel.from_pretrained(tmp_path / "folder" / "cn", local_files_only=True)
    from_file = load_controlnet(tmp_path / "file" / "cn.safetensors")
    for key, value in from_folder.state_dict().items():
        assert torch.equal(value, from_file.state_dict()[key]), key
    # the zero-initialised output convs have learned something
    assert from_folder.controlnet_mid_block.weight.abs().sum() > 0
    base = load_model(model)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], unet=base.unet,
        controlnet=from_folder, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    from PIL import Image

    control = Image.open(next((canny_data / "canny").glob("*.png"))).convert("RGB").resize((64, 64))
    image = pipe("a red circle", image=control, height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_sdxl_controlnet_folder_runs_in_the_sdxl_controlnet_pipeline(tiny_model_dirs, canny_data, tmp_path):
    output = tmp_path / "out"
    assert train_controlnet.main(args_for(tiny_model_dirs["sdxl"], output, 2, *folder_data(canny_data),
                                          extra=("--save_model_as", "diffusers", "--conditioning_dropout_rate", "0.5"))) == 0
    controlnet = ControlNetModel.from_pretrained(output / "cn", local_files_only=True)
    assert controlnet.config.addition_embed_type == "text_time"
    base = load_model(tiny_model_dirs["sdxl"])
    pipe = StableDiffusionXLControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1],
        tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=base.unet, controlnet=controlnet,
        scheduler=base.scheduler, add_watermarker=False)
    from PIL import Image

    image = pipe("a circle", image=Image.new("RGB", (64, 64)), height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_original_prompt_json_format(tiny_model_dirs, canny_data, tmp_path):
    layout = tmp_path / "layout"
    assert make_controlnet_dataset.main([str(canny_data / "images"), str(layout)]) == 0
    assert train_controlnet.main(args_for(tiny_model_dirs["sd15"], tmp_path / "out", 2,
                                          "--in_json", str(layout / "prompt.json"))) == 0
    assert load_controlnet(tmp_path / "out" / "cn.safetensors").controlnet_mid_block.weight.abs().sum() > 0


def test_on_the_fly_canny_with_the_fidelity_score_logged(tiny_model_dirs, canny_data, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    control = next((canny_data / "canny").glob("*.png"))
    prompts.write_text(f"a shape --w 64 --h 64 --s 2 --cn {control}\nno control --w 64 --h 64 --s 2\n")
    output = tmp_path / "out"
    assert train_controlnet.main(args_for(
        tiny_model_dirs["sd15"], output, 2, "--in_json", str(canny_data / "meta.json"), "--train_data_dir",
        str(canny_data / "images"), extra=("--conditioning_filter", "canny", "--conditioning_filter_args", "low=50", "high=150",
                           "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
                           "--logging_dir", str(tmp_path / "logs")))) == 0
    printed = capsys.readouterr().out
    assert "step 2: control_fidelity/00" in printed and "control_fidelity/01" not in printed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents*")).parent)).Reload()
    [score] = [e.value for e in events.Scalars("control_fidelity/mean")]
    assert 0.0 <= score <= 1.0


def test_unet_decoder_training_leaves_the_encoder_alone(tiny_model_dirs, canny_data, tmp_path):
    output = tmp_path / "out"
    assert train_controlnet.main(args_for(tiny_model_dirs["sd15"], output, 2, *folder_data(canny_data),
                                          extra=("--train_unet_decoder", "--only_mid_control"))) == 0
    trained, base = load_model(output / "cn-model.safetensors").unet.state_dict(), load_model(tiny_model_dirs["sd15"]).unet.state_dict()
    moved = {k for k in base if not torch.equal(trained[k], base[k])}
    assert moved and all(k.startswith(("up_blocks.", "conv_norm_out", "conv_out")) for k in moved)


def test_missing_conditioning_images_are_listed(tiny_model_dirs, canny_data, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    first = next((canny_data / "canny").glob("*.png"))
    (partial / first.name).write_bytes(first.read_bytes())
    args = args_for(tiny_model_dirs["sd15"], tmp_path / "out", 1, "--train_data_dir", str(canny_data / "images"),
                    "--conditioning_data_dir", str(partial), "--caption_extension", ".caption")
    assert train_controlnet.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("shape_") >= 3  # every image without its conditioning image is named
