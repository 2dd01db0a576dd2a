"""The model-family objects: lookup, the one detector (folders, single files, UNet configs), the UNet's added
conditioning, bucket steps, and the one table of architecture names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from library.io import read_safetensors_metadata
from library.models.families import (
    CLI_FAMILY_CHOICES,
    FAMILIES,
    FAMILY_ALIASES,
    FINEST_BUCKET_STEP,
    SD1,
    SD2,
    SDXL,
    detect_family,
    detect_family_of_keys,
    family_of_folder,
    family_of_unet_config,
    family_with_base_model_version,
    resolve_family,
)
from library.models.ldm_layout import UNET_PREFIX
from library.models.loading import load_model, save_single_file, tokenizers_for

ROOT = Path(__file__).resolve().parent.parent
BY_CLI_NAME = {"sd15": SD1, "sd21": SD2, "sdxl": SDXL}


# ------------------------------------------------------------------------------------------ lookup


def test_every_alias_resolves_to_its_one_family_object() -> None:
    assert tuple(FAMILIES.values()) == (SD1, SD2, SDXL)
    assert CLI_FAMILY_CHOICES == ("sd15", "sd21", "sdxl")
    for alias, name in FAMILY_ALIASES.items():
        assert resolve_family(alias) is FAMILIES[name]
        assert resolve_family(alias.upper()) is FAMILIES[name]
    assert resolve_family(SDXL) is SDXL
    for cli_name, family in BY_CLI_NAME.items():
        assert resolve_family(cli_name) is family and family.cli_name == cli_name


def test_unknown_family_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model family 'sd3': expected one of sd15, sd21, sdxl"):
        resolve_family("sd3")


def test_bucket_steps_and_default_resolutions() -> None:
    assert (SD1.bucket_step, SD2.bucket_step, SDXL.bucket_step) == (64, 64, 32)
    assert FINEST_BUCKET_STEP == 32
    assert (SD1.default_resolution, SD2.default_resolution, SDXL.default_resolution) == (512, 768, 1024)
    for family in FAMILIES.values():
        configs = family.standard_configs()
        assert configs["vae"]["sample_size"] == family.default_resolution == 8 * configs["unet"]["sample_size"]
        assert [k for k in configs if k.startswith("text_encoder")] == [s.component for s in family.text_encoders]
        assert len(family.tiny_configs()) == len(configs)
    assert [f.standard_configs()["scheduler"]["prediction_type"] for f in FAMILIES.values()] == [
        "epsilon", "v_prediction", "epsilon"]
    assert (SD1.latent_cache_suffix, SD2.latent_cache_suffix, SDXL.latent_cache_suffix) == ("_sd.npz", "_sd.npz", "_sdxl.npz")


# ------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("cli_name", ["sd15", "sd21", "sdxl"])
def test_detects_each_tiny_folder_and_its_single_files(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                       cli_name: str) -> None:
    folder = tiny_model_dirs[cli_name]
    expected = BY_CLI_NAME[cli_name]
    assert detect_family(folder) is family_of_folder(folder) is expected
    model = load_model(folder)
    assert model.family is expected
    assert family_of_unet_config(model.unet.config) is expected
    for name in ("model.safetensors", "model.ckpt"):
        save_single_file(model, tmp_path / name)
        assert detect_family(tmp_path / name) is expected
        assert load_model(tmp_path / name).family is expected


def test_detection_of_paths_that_are_no_model(tmp_path: Path) -> None:
    assert detect_family(tmp_path / "missing") is None
    assert detect_family(tmp_path) is None  # a folder without model_index.json
    (tmp_path / "notes.txt").write_text("hello")
    assert detect_family(tmp_path / "notes.txt") is None


def test_single_file_keys_decide_the_family() -> None:
    def shape(ndim: int) -> torch.Tensor:
        return torch.zeros((1,) * ndim)

    assert detect_family_of_keys({"conditioner.embedders.1.model.ln_final.weight": shape(1)}) is SDXL
    assert detect_family_of_keys({UNET_PREFIX + "label_emb.0.0.weight": shape(2)}) is SDXL
    assert detect_family_of_keys({"cond_stage_model.model.ln_final.weight": shape(1)}) is SD2
    assert detect_family_of_keys({"cond_stage_model.transformer.text_model.x": shape(1)}) is SD1
    proj_in = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"  # UNet-only files: linear (SD2) or 1x1 conv (SD1)
    assert detect_family_of_keys({proj_in: shape(2)}) is SD2
    assert detect_family_of_keys({proj_in: shape(4)}) is SD1
    assert detect_family_of_keys({"first_stage_model.encoder.conv_in.weight": shape(4)}) is None


# ------------------------------------------------------------------------------------------ UNet conditioning


def _sizes(batch: int) -> dict[str, torch.Tensor]:
    return {"original_sizes_hw": torch.tensor([[96, 64]] * batch), "crop_top_lefts": torch.tensor([[8, 0]] * batch),
            "target_sizes_hw": torch.tensor([[64, 64]] * batch)}


@pytest.mark.parametrize("family", [SD1, SD2])
def test_sd1_and_sd2_add_no_conditioning(family) -> None:
    assert family.unet_added_conditions(None, **_sizes(2), device=torch.device("cpu"), dtype=torch.float32) is None


def test_sdxl_conditioning_is_pooled_text_and_time_ids_in_diffusers_order() -> None:
    pooled = torch.randn(2, 32)
    added = SDXL.unet_added_conditions(pooled, **_sizes(2), device=torch.device("cpu"), dtype=torch.float16)
    assert set(added) == {"text_embeds", "time_ids"}
    assert torch.equal(added["text_embeds"], pooled)
    assert added["time_ids"].dtype == torch.float16 and added["time_ids"].shape == (2, 6)
    assert added["time_ids"][0].tolist() == [96, 64, 8, 0, 64, 64]  # original (h, w), crop (top, left), target (h, w)
    with pytest.raises(ValueError, match="pooled"):
        SDXL.unet_added_conditions(None, **_sizes(2), device=torch.device("cpu"), dtype=torch.float32)


def test_sdxl_conditioning_fits_the_unet(tiny_model_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_model_dirs["sdxl"])
    pooled = torch.randn(1, model.text_encoders[1].config.projection_dim)
    added = SDXL.unet_added_conditions(pooled, **_sizes(1), device=torch.device("cpu"), dtype=torch.float32)
    latents = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, model.unet.config.cross_attention_dim)
    with torch.no_grad():
        out = model.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert out.shape == latents.shape


# ------------------------------------------------------------------------------------------ text encoders, blocks


def test_text_encoders_and_tokenizers() -> None:
    assert [s.component for s in SDXL.text_encoders] == ["text_encoder", "text_encoder_2"]
    assert [t.pad_token_id for t in tokenizers_for(SD1)] == [49407]
    assert [t.pad_token_id for t in tokenizers_for(SD2)] == [0]
    assert [t.pad_token_id for t in tokenizers_for(SDXL)] == [49407, 0]


def test_text_encoder_layers_that_reach_the_unet() -> None:
    assert SD1.text_encoder_layers_in_use([12], clip_skip=None) == [12]
    assert SD2.text_encoder_layers_in_use([23], clip_skip=2) == [22]
    assert SDXL.text_encoder_layers_in_use([12, 32]) == [11, 32]  # TE1 penultimate; TE2 whole (pooled)


def test_kohya_block_indices() -> None:
    sd, xl = SD1.kohya_blocks, SDXL.kohya_blocks
    assert (sd.count, xl.count) == (25, 23)
    assert [sd.index(p) for p in ("input_blocks.0.0", "input_blocks.11.0", "middle_block.1", "output_blocks.11.1")] \
        == [0, 11, 12, 24]
    assert [xl.index(p) for p in ("input_blocks.0.0", "input_blocks.8.1", "middle_block.0", "middle_block.2",
                                  "output_blocks.8.0", "out.2")] == [1, 9, 10, 12, 21, -1]


# ------------------------------------------------------------------------------------------ architecture names


def test_metadata_names_of_each_family() -> None:
    assert [f.modelspec_architecture for f in FAMILIES.values()] == [
        "stable-diffusion-v1", "stable-diffusion-v2-768-v", "stable-diffusion-xl-v1-base"]
    assert [f.base_model_version for f in FAMILIES.values()] == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]
    assert [f.kohya_v2 for f in FAMILIES.values()] == [False, True, False]
    for family in FAMILIES.values():
        assert family_with_base_model_version(family.base_model_version) is family
    assert family_with_base_model_version("sd3") is None and family_with_base_model_version(None) is None


def test_saved_files_carry_the_family_architecture(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from networks.extract_lora_from_models import extraction_metadata

    for cli_name, family in BY_CLI_NAME.items():
        path = tmp_path / f"{cli_name}.safetensors"
        save_single_file(load_model(tiny_model_dirs[cli_name]), path)
        assert read_safetensors_metadata(path)["modelspec.architecture"] == family.modelspec_architecture
        meta = extraction_metadata(family, 4, None, False, str(path), False)
        assert meta["modelspec.architecture"] == family.modelspec_base_architecture(False) + "/lora"  # epsilon
        meta = extraction_metadata(family, 4, None, True, str(path), False)
        assert meta["modelspec.architecture"] == family.modelspec_architecture + "/lora"
        assert (meta["ss_base_model_version"], meta["ss_v2"]) == (family.base_model_version, str(family.kohya_v2))


def test_architecture_names_live_in_one_table() -> None:
    """Every ModelSpec/kohya family name is written in library/models/families.py and nowhere else."""
    names = ("stable-diffusion-v2-768-v", "stable-diffusion-xl-v1-base", "sdxl_base_v1-0")
    sources = [p for folder in ("library", "networks", "tools") for p in (ROOT / folder).rglob("*.py")]
    sources += [*ROOT.glob("train_*.py"), ROOT / "fine_tune.py"]
    holders = {p.relative_to(ROOT).as_posix() for p in sources if any(n in p.read_text() for n in names)}
    assert holders == {"library/models/families.py"}


def test_no_family_questions_outside_library_models() -> None:
    pattern = re.compile(r"is_sdxl|[\"']sdxl[\"']")
    sources = [p for folder in ("library", "networks", "tools") for p in (ROOT / folder).rglob("*.py")]
    sources += [*ROOT.glob("train_*.py"), ROOT / "fine_tune.py"]
    askers = sorted(p.relative_to(ROOT).as_posix() for p in sources
                    if "library/models/" not in p.as_posix() and pattern.search(p.read_text()))
    assert askers == []
