"""Issue 11, helper K2: kohya flags with kohya's meaning (data/caption flags, LoRA --base_weights, values that
meant "off" or "default" in kohya, upper-case model suffixes, ControlNet .pt saves), run as a user types them."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import train_controlnet
import train_network
from library.cli import config
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.dataset_index import split_for_validation
from library.data.images import apply_crop_plan, face_in_file_name, plan_crop, plan_face_crop
from library.data.records import DatasetIndex, ImageRecord
from library.models.controlnet_models import create_controlnet, load_controlnet, save_controlnet
from library.models.loading import load_model, save_single_file
from library.training.loop import Callback
from tests.helpers.user_paths import assert_one_error_line, lora_args


def dreambooth_folder(shapes_data: Path, root: Path) -> Path:
    """``root/1_sks`` with the shapes images and their captions as ``.txt`` sidecars (kohya's usual extension)."""
    folder = root / "1_sks"
    folder.mkdir(parents=True)
    for image in sorted((shapes_data / "images").glob("*.png"))[:3]:
        shutil.copy(image, folder / image.name)
        (folder / f"{image.stem}.txt").write_text(image.with_suffix(".caption").read_text(encoding="utf-8"),
                                                   encoding="utf-8")
    return root


def test_debug_dataset_prints_samples_with_kohya_spellings_and_stops_before_the_model(run_script, shapes_data,
                                                                                      tmp_path):
    data = dreambooth_folder(shapes_data, tmp_path / "db")
    # kohya's face position in the name: centre (40, 30), 20x20 px, in a 96x96 image
    face_image = data / "1_sks" / "face_40_30_20_20.png"
    shutil.copy(sorted((data / "1_sks").glob("*.png"))[0], face_image)
    face_image.with_suffix(".txt").write_text("a face", encoding="utf-8")
    dataset_config = tmp_path / "ds.toml"
    # validation_split = 1.0 (kohya: validate on every image) and resize_interpolation as a dataset key
    dataset_config.write_text(f'[[datasets]]\nresolution = 64\nvalidation_split = 1.0\n[[datasets.subsets]]\n'
                              f'image_dir = "{(data / "1_sks").as_posix()}"\nresize_interpolation = "nearest"\n',
                              encoding="utf-8")
    result = run_script("train_network.py", [
        "--pretrained_model_name_or_path", tmp_path / "no_model_here", "--dataset_config", dataset_config,
        "--caption_extention", ".txt", "--output_dir", tmp_path / "out", "--debug_dataset", "--seed", "1",
        "--sample_every_n_steps", "0", "--sample_every_n_epochs", "0", "--vae_batch_size", "0", "--cache_info",
        "--face_crop_aug_range", "2.0,2.0"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert "dataset preview (--debug_dataset): 4 image(s); first 4:" in result.stdout, result.stdout
    assert len(lines) == 4
    # face crop: the face (20 px) is to be 1/2 of the 64 px side, which would need an upscale, so the scale stays 1
    # (kohya never enlarges) and the 64x64 window is centred on the face: left 40 - 32, top 30 - 32 -> 0
    (face_line,) = [line for line in lines if "face_40_30_20_20" in line]
    assert "face crop, resized to 96x96 (nearest), crop left/top 8,0" in face_line, face_line
    lines = [line for line in lines if line is not face_line]
    # the .txt captions were read (without --caption_extention the prompt would be the class token "sks")
    captions = sorted(p.read_text(encoding="utf-8").strip() for p in (data / "1_sks").glob("shape_*.txt"))
    assert sorted(line.split("prompt: ")[1].strip("'") for line in lines) == captions
    assert all("bucket 64x64" in line and "(nearest)" in line for line in lines), lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_kohya_zero_values_mean_off_or_default_and_pt_is_a_controlnet_format():
    args = config.parse_args(train_network.build_parser(), [
        "--sample_every_n_steps", "0", "--sample_every_n_epochs", "0", "--vae_batch_size", "0"])
    assert (args.sample_every_n_steps, args.sample_every_n_epochs, args.vae_batch_size) == (0, 0, 1)
    assert config.parse_args(train_controlnet.build_parser(), ["--save_model_as", "pt"]).save_model_as == "pt"


def in_process(main, argv: list, capsys) -> subprocess.CompletedProcess:
    """``main(argv)`` in this process (no interpreter start-up), as a completed process for the error checks."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def test_bad_resize_interpolation_in_a_dataset_config_is_one_error_line(shapes_data, tmp_path, capsys):
    data = dreambooth_folder(shapes_data, tmp_path / "db")
    dataset_config = tmp_path / "ds.toml"
    dataset_config.write_text(f'[general]\nresize_interpolation = "lanczos3"\n[[datasets]]\nresolution = 64\n'
                              f'[[datasets.subsets]]\nimage_dir = "{(data / "1_sks").as_posix()}"\n', encoding="utf-8")
    result = in_process(train_network.main, ["--pretrained_model_name_or_path", tmp_path / "none",
                                             "--dataset_config", dataset_config, "--output_dir", tmp_path / "out"],
                        capsys)
    assert_one_error_line(result, "resize_interpolation = 'lanczos3' is not one of lanczos, nearest")


def test_resize_interpolation_changes_the_resized_pixels():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    pixels = {}
    for name in ("nearest", "lanczos", "bicubic", None):
        plan = plan_crop((96, 96), (64, 64), random_crop=False, flip_aug=False, rng=random.Random(0),
                         interpolation=name)
        pixels[name] = np.asarray(apply_crop_plan(image, plan), dtype=np.int16)
    assert np.abs(pixels["nearest"] - pixels["lanczos"]).mean() > 10  # nearest keeps the noise, lanczos smooths it
    # the default is an antialiased bicubic (library.data.pixels), PIL's BICUBIC within rounding; on pure noise it
    # is a few levels from lanczos (about 1.2 of 255 on photo-like images, see bench/RESULTS.md)
    assert np.abs(pixels[None] - pixels["bicubic"]).max() <= 1
    assert 0 < np.abs(pixels[None] - pixels["lanczos"]).mean() < 8
    # nearest picks source pixels: every output pixel is one of the image's
    source = np.asarray(image, dtype=np.int16)
    assert any(np.array_equal(pixels["nearest"][0, 0], source[0, x]) for x in range(2))


def test_face_crop_scales_the_face_to_the_range_and_centres_it():
    # a 128 px face at (128, 128) of a 256 px image; range 1,1: the face's side becomes the 64 px bucket side
    plan = plan_face_crop((256, 256), (64, 64), face=(128, 128, 128, 100), aug_range=(1.0, 1.0), random_crop=False,
                          flip_aug=False, rng=random.Random(0))
    assert (plan.resized_size, plan.crop_left_top) == ((128, 128), (32, 32))
    assert face_in_file_name(Path("/x/me_128_128_128_100.png")) == (128, 128, 128, 100)
    assert face_in_file_name(Path("/x/me_0_128_128_100.png")) is None  # kohya: centre x 0 means no face
    assert face_in_file_name(Path("/x/shape_001.png")) is None


def test_validation_split_one_validates_on_every_image_and_still_trains():
    dataset = DatasetConfig(kind="dreambooth", subsets=(SubsetConfig(),), validation_split=1.0)
    records = tuple(ImageRecord(image_path=Path(f"/x/{i}.png"), caption=None, tags=None, image_size=(64, 64),
                                num_repeats=2, is_reg=False, subset=dataset.subsets[0], dataset_index=0)
                    for i in range(4))
    train, validation = split_for_validation(DatasetIndex(datasets=(dataset,), records=records))
    assert validation is not None
    assert sorted(r.image_path for r in validation.records) == sorted(r.image_path for r in records)
    assert sorted(r.image_path for r in train.records) == sorted(r.image_path for r in records)


def test_upper_case_model_suffix_is_a_single_file(tiny_model_dirs, tmp_path):
    model = load_model(tiny_model_dirs["sd15"])
    path = tmp_path / "X.SAFETENSORS"
    save_single_file(model, path)
    loaded = load_model(path)
    assert loaded.family.name == model.family.name
    key, weight = next(iter(model.unet.state_dict().items()))
    assert torch.equal(loaded.unet.state_dict()[key], weight)


def test_controlnet_pt_file_round_trips(tiny_model_dirs, tmp_path):
    model = load_model(tiny_model_dirs["sd15"])
    controlnet = create_controlnet(model.unet)
    path = tmp_path / "cn.pt"
    save_controlnet(controlnet, path, "sd15")
    data = torch.load(path, weights_only=True)  # a plain torch file, readable without unpickling code
    assert "state_dict" in data
    again = load_controlnet(path, unet_config_for_fallback=dict(model.unet.config))
    key, weight = next(iter(controlnet.state_dict().items()))
    assert torch.equal(again.state_dict()[key], weight)


class _BaseWeightsAtStart(Callback):
    """The (merged) base weight under each LoRA module when training starts."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, run, state) -> None:
        for lora in run.trainee.network.unet_loras:
            self.weights[lora.lora_name] = lora.org_module.weight.detach().float().cpu().clone()


def test_base_weights_merge_the_lora_delta_into_the_base_before_training(tiny_model_dirs, shapes_data, tmp_path):
    from networks.lora import create_network

    model = load_model(tiny_model_dirs["sd15"])
    network = create_network(1.0, 4, 2.0, model.vae, model.text_encoders, model.unet)
    torch.manual_seed(0)
    for lora in network.unet_loras:
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    base_lora = tmp_path / "base.safetensors"
    network.save_weights(base_lora, None, {})
    base = {lora.lora_name: lora.org_module.weight.detach().float().clone() for lora in network.unet_loras}
    delta = {lora.lora_name: lora.weight_delta("cpu").reshape(lora.org_module.weight.shape)
             for lora in network.unet_loras}

    watcher = _BaseWeightsAtStart()
    argv = lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1,
                     "--base_weights", base_lora, "--base_weights_multiplier", "0.5", "--network_train_unet_only")
    assert train_network.main(argv, callbacks=[watcher]) == 0
    assert watcher.weights.keys() == base.keys()
    for name, weight in watcher.weights.items():
        torch.testing.assert_close(weight, base[name] + 0.5 * delta[name], rtol=0, atol=1e-6)
    assert any(delta[name].abs().max() > 1e-3 for name in delta)  # the merge moved the weights


def test_missing_base_weights_file_is_one_error_line(tiny_model_dirs, shapes_data, tmp_path, capsys):
    result = in_process(train_network.main, lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1,
                                                      "--base_weights", tmp_path / "nope.safetensors"), capsys)
    assert_one_error_line(result, "--base_weights", "nope.safetensors is not a file")


def test_xformers_without_cuda_is_one_error_line(tiny_model_dirs, shapes_data, tmp_path, capsys):
    assert not torch.cuda.is_available()
    result = in_process(train_network.main, lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1,
                                                      "--xformers"), capsys)
    assert_one_error_line(result, "--xformers needs a CUDA GPU")


def test_control_net_lr_applies_to_the_controlnet_layers_as_in_kohyas_sdxl_script(tiny_model_dirs):
    controlnet = create_controlnet(load_model(tiny_model_dirs["sdxl"]).unet)
    (whole,) = train_controlnet.controlnet_param_groups(controlnet, learning_rate=1e-5, control_net_lr=None)
    assert whole["lr"] == 1e-5 and len(whole["params"]) == len(list(controlnet.parameters()))
    own, encoder = train_controlnet.controlnet_param_groups(controlnet, learning_rate=1e-5, control_net_lr=1e-4)
    names = {id(p): name for name, p in controlnet.named_parameters()}
    assert own["lr"] == 1e-4 and encoder["lr"] == 1e-5
    assert own["params"] and all(names[id(p)].startswith("controlnet_") for p in own["params"])
    assert encoder["params"] and not any(names[id(p)].startswith("controlnet_") for p in encoder["params"])
    assert len(own["params"]) + len(encoder["params"]) == len(names)


def test_dataset_config_takes_kohyas_subset_keys(tmp_path, capsys):
    from library.cli.data_args import dataset_flags_from_args
    from library.data.dataset_config_loading import load_dataset_configs

    (tmp_path / "img").mkdir()
    cfg = tmp_path / "ds.toml"
    cfg.write_text('[general]\nface_crop_aug_range = [2.0, 4.0]\n[[datasets]]\n[[datasets.subsets]]\n'
                   f'image_dir = "{(tmp_path / "img").as_posix()}"\nresize_interpolation = "area"\n'
                   'custom_attributes = {loss_weight = 2.5, tag = "x"}\n', encoding="utf-8")
    args = config.parse_args(train_network.build_parser(), ["--dataset_config", str(cfg)])
    (dataset,) = load_dataset_configs(dataset_flags_from_args(args))
    (subset,) = dataset.subsets
    assert subset.custom_attributes == {"loss_weight": 2.5, "tag": "x"}
    assert (subset.resize_interpolation, subset.face_crop_aug_range) == ("area", (2.0, 4.0))
    # kohya crops around faces only without buckets
    args = config.parse_args(train_network.build_parser(), ["--dataset_config", str(cfg), "--enable_bucket"])
    assert load_dataset_configs(dataset_flags_from_args(args))[0].subsets[0].face_crop_aug_range is None
    cfg.write_text(cfg.read_text(encoding="utf-8").replace("[2.0, 4.0]", '"2.0"'), encoding="utf-8")
    result = in_process(train_network.main, ["--dataset_config", cfg, "--output_dir", tmp_path / "out",
                                             "--pretrained_model_name_or_path", tmp_path / "none"], capsys)
    assert_one_error_line(result, "face_crop_aug_range = \"2.0\" is not two positive numbers")
