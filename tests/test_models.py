"""Tokenizer, tiny models, and diffusers <-> single-file conversion, checked against diffusers' own loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from library.models import ldm_layout
from library.models.clip_tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, build_clip_tokenizer
from library.models.families import FAMILIES
from library.models.loading import (
    CONFIG_METADATA_KEY,
    ModelLoadError,
    _component_state_dicts,
    build_model,
    load_model,
    save_single_file,
)
from library.io import read_safetensors_metadata
from tools import convert_model

COMPONENTS = {"sd15": ["unet", "vae", "text_encoder"], "sd21": ["unet", "vae", "text_encoder"],
              "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"]}


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def convert(*args: str) -> int:
    return convert_model.main(list(args))


# ------------------------------------------------------------------------------------------ tokenizer


def test_real_clip_vocabulary_encodes_reference_ids() -> None:
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)


def test_exclamation_padded_tokenizer_pads_with_zero() -> None:
    tokenizer = build_clip_tokenizer("!")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=10).input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
    assert tokenizer.pad_token_id == 0 != tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------ tiny models


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_tiny_model_loads_in_diffusers_offline(tiny_model_dirs: dict[str, Path], family: str) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs[family], local_files_only=True)
    expected = {"sd15": ("StableDiffusionPipeline", "epsilon", 0.18215),
                "sd21": ("StableDiffusionPipeline", "v_prediction", 0.18215),
                "sdxl": ("StableDiffusionXLPipeline", "epsilon", 0.13025)}[family]
    assert (type(pipe).__name__, pipe.scheduler.config.prediction_type, pipe.vae.config.scaling_factor) == expected
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8  # latents are 1/8 of the image, as in SD
    if family == "sd21":
        assert pipe.tokenizer.pad_token_id == 0
        assert pipe.unet.config.use_linear_projection
    if family == "sdxl":
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert pipe.text_encoder.config.hidden_size != pipe.text_encoder_2.config.hidden_size
        assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == EOS_ID
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") or \
            list(pipe.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        # a real forward pass with SDXL's added conditioning
        latents = torch.randn(1, 4, 8, 8)
        text = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
        added = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim), "time_ids": torch.zeros(1, 6)}
        out = pipe.unet(latents, 10, text, added_cond_kwargs=added).sample
        assert out.shape == latents.shape and torch.isfinite(out).all()


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path) -> None:
    from library.models.tiny_models import build_tiny_model

    a, b, c = build_tiny_model("sd15", seed=3), build_tiny_model("sd15", seed=3), build_tiny_model("sd15", seed=4)
    assert_same_tensors(a.unet, b.unet)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


# ------------------------------------------------------------------------------------------ single files


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_folder_to_single_file_to_folder_is_bit_exact(tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str) -> None:
    single, folder = tmp_path / "model.safetensors", tmp_path / "back"
    assert convert("--input", str(tiny_model_dirs[family]), "--output", str(single)) == 0
    assert convert("--input", str(single), "--output", str(folder)) == 0
    original = DiffusionPipeline.from_pretrained(tiny_model_dirs[family], local_files_only=True)
    restored = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(original) is type(restored)
    for name in [*COMPONENTS[family], "scheduler"]:
        if name != "scheduler":
            assert_same_tensors(getattr(original, name), getattr(restored, name))
        assert public_config(getattr(original, name)) == public_config(getattr(restored, name))


def public_config(component: object) -> dict:
    config = component.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "_commit_hash")}


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_single_file_loads_in_diffusers_from_single_file(tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str) -> None:
    """diffusers' own single-file reader (not ours) must see the same weights we wrote."""
    single = tmp_path / "model.safetensors"
    save_single_file(load_model(tiny_model_dirs[family]), single)
    if family == "sdxl":
        theirs = StableDiffusionXLPipeline.from_single_file(single, config=str(tiny_model_dirs[family]), local_files_only=True)
    else:
        theirs = StableDiffusionPipeline.from_single_file(single, config=str(tiny_model_dirs[family]), local_files_only=True,
                                                          safety_checker=None, requires_safety_checker=False)
    original = DiffusionPipeline.from_pretrained(tiny_model_dirs[family], local_files_only=True)
    for name in COMPONENTS[family]:
        assert_same_tensors(getattr(original, name), getattr(theirs, name))


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_single_file_uses_the_original_layout(tiny_model_dirs: dict[str, Path], tmp_path: Path, family: str) -> None:
    single = tmp_path / "model.safetensors"
    save_single_file(load_model(tiny_model_dirs[family]), single)
    sd = load_file(single)
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # VAE attention as 1x1 convs
    assert "model.diffusion_model.out.2.weight" in sd and "model.diffusion_model.time_embed.0.weight" in sd
    if family == "sd15":
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
        assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in sd
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd  # upsampler after a block without attention
    elif family == "sd21":
        qkv = sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert qkv.shape == (3 * 64, 64)
        assert "cond_stage_model.model.ln_final.weight" in sd
        assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # linear projection
    else:
        assert "model.diffusion_model.label_emb.0.0.weight" in sd
        assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight" in sd
        assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in sd
        assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sd
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sd
        assert sd["conditioner.embedders.1.model.text_projection"].shape == (48, 32)  # (width, projection): transposed
        assert sd["conditioner.embedders.1.model.logit_scale"].item() == pytest.approx(4.6052, abs=1e-4)
    metadata = read_safetensors_metadata(single)
    assert json.loads(metadata[CONFIG_METADATA_KEY])["unet"]["block_out_channels"]


@pytest.mark.parametrize("family,expected", [
    ("sd1", {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}),
    ("sdxl", {"model.diffusion_model.": 1680, "first_stage_model.": 248, "conditioner.embedders.0.": 196,
              "conditioner.embedders.1.": 390}),
])
def test_full_size_layout_matches_real_checkpoints(family: str, expected: dict[str, int]) -> None:
    """On the meta device (no memory): the standard configs map to the key counts of the released files."""
    configs = FAMILIES[family].standard_configs()
    components = _component_state_dicts(build_model(family, configs, empty_weights=True))
    ldm = ldm_layout.diffusers_to_ldm(components, FAMILIES[family].text_encoders, configs)
    assert {prefix: sum(k.startswith(prefix) for k in ldm) for prefix in expected} == expected
    assert sum(v.numel() for v in components["unet"].values()) == {"sd1": 859_520_964, "sdxl": 2_567_463_684}[family]
    back = ldm_layout.ldm_to_diffusers(ldm, FAMILIES[family].text_encoders, configs)
    assert {k: set(v) for k, v in back.items()} == {k: set(v) for k, v in components.items()}


def test_save_precision_writes_half_weights(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "half.safetensors"
    assert convert("--input", str(tiny_model_dirs["sd15"]), "--output", str(single), "--save_precision", "fp16") == 0
    sd = load_file(single)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    original = load_model(tiny_model_dirs["sd15"])
    reloaded = load_model(single)
    assert torch.equal(reloaded.unet.conv_in.weight, original.unet.conv_in.weight.half())


def test_ckpt_round_trip(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    assert convert("--input", str(tiny_model_dirs["sd15"]), "--output", str(ckpt)) == 0
    assert_same_tensors(load_model(ckpt).unet, load_model(tiny_model_dirs["sd15"]).unet)


def _foreign_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """Our file as another tool would write it: no config metadata, plus the extra keys A1111 files carry."""
    ours = tmp_path / "ours.safetensors"
    save_single_file(load_model(tiny_dir), ours)
    sd = load_file(ours)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    foreign = tmp_path / "foreign.safetensors"
    save_file(sd, foreign)
    return foreign


def test_foreign_non_standard_file_loads_with_model_config(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    foreign = _foreign_copy(tiny_model_dirs["sd15"], tmp_path)
    model = load_model(foreign, model_config=str(tiny_model_dirs["sd15"]))
    original = load_model(tiny_model_dirs["sd15"])
    for a, b in [(model.unet, original.unet), (model.vae, original.vae), (model.text_encoders[0], original.text_encoders[0])]:
        assert_same_tensors(a, b)


def test_foreign_non_standard_file_without_config_names_the_fix(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    foreign = _foreign_copy(tiny_model_dirs["sd15"], tmp_path)
    with pytest.raises(ModelLoadError, match="--model_config") as error:
        load_model(foreign)
    assert str(foreign) in str(error.value)


def test_v_parameterization_override(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "v.safetensors"
    assert convert("--input", str(tiny_model_dirs["sd15"]), "--output", str(out), "--v_parameterization") == 0
    assert load_model(out).prediction_type == "v_prediction"


def test_vae_override_from_folder_and_from_vae_only_file(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from library.models.tiny_models import make_tiny_model

    other = make_tiny_model("sd15", tmp_path / "other", seed=7)
    from_folder = load_model(tiny_model_dirs["sd15"], vae=str(other / "vae"))
    assert_same_tensors(from_folder.vae, load_model(other).vae)
    # a VAE-only single file with bare LDM keys (encoder.*, decoder.*), as vae-ft-mse-*.safetensors ships
    full = load_file_from_model(other, tmp_path)
    vae_only = {k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, tmp_path / "vae.safetensors")
    from_file = load_model(tiny_model_dirs["sd15"], vae=str(tmp_path / "vae.safetensors"))
    assert_same_tensors(from_file.vae, load_model(other).vae)


def load_file_from_model(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    single = tmp_path / f"{folder.name}.safetensors"
    save_single_file(load_model(folder), single)
    return load_file(single)


# ------------------------------------------------------------------------------------------ bad input


def _assert_refused(capsys: pytest.CaptureFixture[str], output: Path, needle: str, *args: str) -> None:
    assert convert(*args, "--output", str(output)) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err  # one sentence naming the problem
    assert "Traceback" not in err
    assert not output.exists()


def test_missing_path_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.safetensors"
    _assert_refused(capsys, tmp_path / "out", f"{missing} does not exist", "--input", str(missing))


def test_unknown_layout_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, bogus)
    _assert_refused(capsys, tmp_path / "out", "is not a Stable Diffusion 1.x, 2.x or SDXL checkpoint", "--input", str(bogus))


def test_checkpoint_with_missing_keys_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    single = tmp_path / "full.safetensors"
    save_single_file(load_model(tiny_model_dirs["sdxl"]), single)
    sd = load_file(single)
    del sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"]
    truncated = tmp_path / "truncated.safetensors"
    save_file(sd, truncated, metadata=read_safetensors_metadata(single))
    _assert_refused(capsys, tmp_path / "out", "is missing 1 unet weights", "--input", str(truncated))


def test_wrong_family_is_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _assert_refused(capsys, tmp_path / "out.safetensors", "holds an sdxl model, but --family sd15 was given",
                    "--input", str(tiny_model_dirs["sdxl"]), "--family", "sd15")


def test_existing_output_is_never_overwritten(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"precious")
    with pytest.raises(SystemExit) as exit_info:
        convert("--input", str(tiny_model_dirs["sd15"]), "--output", str(existing))
    assert exit_info.value.code == 2
    assert existing.read_bytes() == b"precious"
