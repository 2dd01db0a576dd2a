"""ModelSpec (``modelspec.*``) metadata in every saved file kind, as a user gets it from the command line: the
keys kohya's sai_model_spec.py writes, the ``--metadata_*`` values, and a hash that matches the file's data."""

from __future__ import annotations

import base64
import datetime
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers.user_paths import assert_one_error_line, lora_args
from library.models.families import SD1, SD2, SDXL
from library.models.model_spec import architecture, implementation

SAI = "https://github.com/Stability-AI/generative-models"


def header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def data_sha256(path: Path) -> str:
    """Recomputed here from the bytes, as ModelSpec defines it: sha256 of everything after the header."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    return "0x" + hashlib.sha256(data[8 + header_len:]).hexdigest()


def assert_common_keys(meta: dict[str, str], path: Path, *, title: str, arch: str, impl: str,
                       prediction: str = "epsilon") -> None:
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (arch, impl)
    assert meta["modelspec.title"] == title
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == prediction
    saved_at = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert abs((datetime.datetime.now() - saved_at).total_seconds()) < 600
    assert meta["modelspec.hash_sha256"] == data_sha256(path)
    assert meta["modelspec.implementation_version"].startswith("sd-trainer/")


@pytest.fixture
def thumbnail(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "thumb.png"
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)
    return path


def test_sd15_lora_carries_modelspec_and_the_metadata_flags(tiny_model_dirs, shapes_data, tmp_path, run_script,
                                                             thumbnail):
    from diffusers import DiffusionPipeline

    from library.adapters.lora_files import read_lora_file

    output = tmp_path / "out"
    run_script("train_network.py", lora_args(
        tiny_model_dirs["sd15"], shapes_data, output, 1,
        "--metadata_author", "Ada", "--metadata_description", "red shapes", "--metadata_license", "openrail",
        "--metadata_tags", "shapes,red", "--metadata_merged_from", "a, b", "--metadata_preprocessor", "none",
        "--metadata_trigger_phrase", "shp style", "--metadata_usage_hint", "weight 0.8",
        "--metadata_thumbnail", thumbnail, "--metadata_is_negative_embedding", "false", "--min_timestep", "100",
        "--clip_skip", "2"))
    lora = output / "lora.safetensors"
    meta = header_metadata(lora)
    assert_common_keys(meta, lora, title="lora", arch="stable-diffusion-v1/lora", impl="diffusers")
    assert {k: meta[f"modelspec.{k}"] for k in ("author", "description", "license", "tags", "merged_from",
                                                 "preprocessor", "trigger_phrase", "usage_hint",
                                                 "is_negative_embedding")} == {
        "author": "Ada", "description": "red shapes", "license": "openrail", "tags": "shapes,red",
        "merged_from": "a, b", "preprocessor": "none", "trigger_phrase": "shp style", "usage_hint": "weight 0.8",
        "is_negative_embedding": "false"}
    assert meta["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(thumbnail.read_bytes()).decode()
    assert meta["modelspec.timestep_range"] == "100,1000" and meta["modelspec.encoder_layer"] == "2"
    # the existing kohya metadata stays, and its data hash is the ModelSpec hash without the prefix
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "lora" and meta["ss_steps"] == "1"
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]

    tensors, read_meta = read_lora_file(lora)  # kohya-style reading
    assert read_meta == meta and any(k.startswith("lora_unet_") for k in tensors)
    pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs["sd15"], local_files_only=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(latents, 500, text).sample
        pipe.load_lora_weights(str(lora))  # diffusers reads the file, thumbnail and all, and applies it
        after = pipe.unet(latents, 500, text).sample
    assert (after - before).abs().max() > 1e-6


def test_sdxl_lora_with_no_metadata_keeps_the_minimum_and_modelspec(tiny_model_dirs, shapes_data, tmp_path,
                                                                    run_script):
    output = tmp_path / "out"
    run_script("train_network.py", lora_args(tiny_model_dirs["sdxl"], shapes_data, output, 1, "--no_metadata",
                                             "--metadata_title", "Red Shapes XL", "--save_every_n_steps", "1",
                                             "--max_train_steps", "2"))
    for name in ("lora-step00000001.safetensors", "lora.safetensors"):  # every save, the title stays the same
        path = output / name
        meta = header_metadata(path)
        assert_common_keys(meta, path, title="Red Shapes XL", arch="stable-diffusion-xl-v1-base/lora", impl=SAI)
        assert not any(k in meta for k in ("ss_steps", "ss_output_name", "modelspec.author", "modelspec.thumbnail",
                                           "modelspec.timestep_range", "modelspec.encoder_layer"))
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_full_sdxl_single_file_carries_modelspec_and_its_config(tiny_model_dirs, shapes_data, tmp_path, run_script):
    from library.models.loading import CONFIG_METADATA_KEY, load_model

    output = tmp_path / "out"
    run_script("train_sdxl.py", [
        "--pretrained_model_name_or_path", tiny_model_dirs["sdxl"], "--in_json", shapes_data / "meta.json",
        "--train_data_dir", shapes_data / "images", "--resolution", "64", "--learning_rate", "1e-3", "--seed", "5",
        "--max_data_loader_n_workers", "0", "--output_dir", output, "--output_name", "model", "--max_train_steps",
        "1", "--save_model_as", "safetensors", "--metadata_author", "Ada", "--metadata_license", "openrail++"])
    path = output / "model.safetensors"
    meta = header_metadata(path)
    assert_common_keys(meta, path, title="model", arch="stable-diffusion-xl-v1-base", impl=SAI)
    assert (meta["modelspec.author"], meta["modelspec.license"]) == ("Ada", "openrail++")
    assert CONFIG_METADATA_KEY in meta and meta["ss_steps"] == "1"
    assert load_model(path).family is SDXL


def test_controlnet_file_carries_modelspec(tiny_model_dirs, shapes_data, tmp_path, run_script):
    output = tmp_path / "out"
    run_script("train_controlnet.py", [
        "--pretrained_model_name_or_path", tiny_model_dirs["sd15"], "--train_data_dir", shapes_data / "images",
        "--caption_extension", ".caption", "--conditioning_filter", "canny", "--resolution", "64",
        "--learning_rate", "1e-3", "--seed", "2", "--max_data_loader_n_workers", "0", "--output_dir", output,
        "--output_name", "cn", "--max_train_steps", "1", "--metadata_preprocessor", "canny",
        "--metadata_thumbnail", "data:image/png;base64,AAAA"])
    path = output / "cn.safetensors"
    meta = header_metadata(path)
    # SD1/SD2 ControlNet files are in the original (LDM) layout
    assert_common_keys(meta, path, title="cn", arch="stable-diffusion-v1/controlnet", impl=SAI)
    assert meta["modelspec.preprocessor"] == "canny" and meta["modelspec.thumbnail"] == "data:image/png;base64,AAAA"
    assert meta["ss_steps"] == "1"


def test_a_missing_thumbnail_file_is_one_line_before_the_model_loads(shapes_data, tmp_path, run_in_process):
    missing = tmp_path / "nope.png"
    args = lora_args(tmp_path / "no-model", shapes_data, tmp_path / "out", 1, "--metadata_thumbnail", missing)
    line = assert_one_error_line(run_in_process("train_network.py", args, expect_rc=2))
    assert "--metadata_thumbnail" in line and str(missing) in line and "data: URL" in line
    assert not (tmp_path / "out").exists()


def test_architecture_and_implementation_per_family_and_kind():
    """kohya's names: SD 2.x-base (epsilon) is its own architecture; the implementation follows the key layout."""
    assert [architecture(f, "checkpoint", v) for f, v in ((SD1, False), (SD2, False), (SD2, True), (SDXL, False))] \
        == ["stable-diffusion-v1", "stable-diffusion-v2-512", "stable-diffusion-v2-768-v",
            "stable-diffusion-xl-v1-base"]
    assert architecture(SD2, "lora", True) == "stable-diffusion-v2-768-v/lora"
    assert architecture(SDXL, "controlnet", False) == "stable-diffusion-xl-v1-base/controlnet"
    assert [implementation(f, "lora") for f in (SD1, SD2, SDXL)] == ["diffusers", "diffusers", SAI]
    assert [implementation(f, "checkpoint") for f in (SD1, SD2, SDXL)] == [SAI, SAI, SAI]
    assert [implementation(f, "controlnet") for f in (SD1, SD2, SDXL)] == [SAI, SAI, "diffusers"]
