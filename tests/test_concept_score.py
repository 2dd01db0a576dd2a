"""The pieces of "see it learn" that need no pretrained weights: the shapes data, the concept score, the
pretraining script's whole path at toy sizes, and loading what it exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.models.loading import load_model
from library.models.tiny_models import (
    PRETRAINED_DIR,
    PRETRAINED_NORM_GROUPS,
    PRETRAINED_SD1_UNET_WIDTHS,
    build_pretrained_tiny_model,
    text_encoder_hash,
)
from library.training.concept_score import NAMED_COLOURS, Concept, concept_parts, concept_score, parse_concept
from tools import make_sample_dataset, pretrain_tiny


def test_the_full_shapes_vocabulary_scores_high_against_its_own_captions(tmp_path: Path) -> None:
    assert make_sample_dataset.main(["--output", str(tmp_path / "full"), "--count", "30", "--size", "64",
                                     "--variety", "full"]) == 0
    meta = json.loads((tmp_path / "full" / "meta.json").read_text())
    scores, sizes = [], set()
    for stem, entry in meta.items():
        with Image.open(tmp_path / "full" / "images" / f"{stem}.png") as image:
            sizes.add(image.size)
            concept = parse_concept(entry["caption"])
            scores.append(concept_score(image, concept))
            if concept.shape == "circle":  # a circle is no square: fewer points, smaller fill
                assert concept_score(image, Concept(concept.colour, "square", concept.background)) < scores[-1] - 0.1
    assert sizes == {(64, 64), (96, 32), (32, 96)}
    assert {parse_concept(e["caption"]).shape for e in meta.values()} == {"circle", "square", "triangle", "diamond", "hexagon"}
    assert min(scores) > 0.6 and sum(scores) / len(scores) > 0.9, scores
    assert not any("purple" in e["caption"] or "star" in e["caption"] for e in meta.values())  # kept for the demo


def test_a_purple_star_is_told_from_other_colours_and_shapes(tmp_path: Path) -> None:
    assert make_sample_dataset.main(["--output", str(tmp_path / "c"), "--count", "4", "--size", "64",
                                     "--variety", "concept", "--concept_caption", "a sks star"]) == 0
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert {e["caption"] for e in meta.values()} == {"a sks star"}
    star = Concept(NAMED_COLOURS["purple"], "star", NAMED_COLOURS["white"])
    for stem in meta:
        with Image.open(tmp_path / "c" / "images" / f"{stem}.png") as image:
            parts = concept_parts(image, star)
            assert parts["measure_peaks"] == 5 and 0.3 < parts["measure_fill"] < 0.5, parts
            assert concept_score(image, star) > 0.9
            assert concept_score(image, Concept(NAMED_COLOURS["purple"], "circle", NAMED_COLOURS["white"])) < 0.75
            assert concept_score(image, "a red circle on a white background") < 0.4
    blank = Image.new("RGB", (64, 64), NAMED_COLOURS["white"])
    assert concept_score(blank, star) == pytest.approx(1 / 3)  # only the background is right
    assert parse_concept("an orange hexagon on a light blue background, small, top left") == Concept(
        NAMED_COLOURS["orange"], "hexagon", NAMED_COLOURS["light blue"], "top left")


def toy_pretraining(work: Path, export: Path, *extra: str) -> list[str]:
    return ["--work_dir", str(work), "--images", "24", "--vae_steps", "2", "--decoder_steps", "2", "--unet_steps", "2",
            "--batch", "4", "--export_to", str(export), "--eval_seeds", "1", *extra]


def test_pretraining_runs_end_to_end_deterministically_and_its_export_loads(tmp_path: Path, capsys) -> None:
    export = tmp_path / "export"
    assert pretrain_tiny.main(toy_pretraining(tmp_path / "work", export)) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex('{\n  "family"'):])
    assert set(summary["concept_scores"]) == set(pretrain_tiny.EVAL_PROMPTS)
    files = sorted(p.name for p in export.iterdir())
    assert files == ["sdxl_unet.safetensors", "text_encoder_hashes.json", "vae.safetensors"]
    # the same command in another folder writes the same bytes (seeded, one thread)
    assert pretrain_tiny.main(toy_pretraining(tmp_path / "again", tmp_path / "export_again")) == 0
    for name in files:
        assert (export / name).read_bytes() == (tmp_path / "export_again" / name).read_bytes(), name
    # SD1.5 next, in the same work folder: fine_tune.py trains its UNet on the VAE the SDXL run trained
    vae_bytes = (export / "vae.safetensors").read_bytes()
    assert pretrain_tiny.main(toy_pretraining(tmp_path / "work", export, "--family", "sd15")) == 0
    assert (export / "vae.safetensors").read_bytes() == vae_bytes
    sd1 = build_pretrained_tiny_model("sd1", export)
    assert list(sd1.unet.config.block_out_channels) == PRETRAINED_SD1_UNET_WIDTHS
    assert sd1.vae.config.scaling_factor == 0.18215  # SD1's own factor on the shared weights
    assert set(json.loads((export / "text_encoder_hashes.json").read_text())) == {"sd1", "sdxl"}
    unet = load_file(export / "sdxl_unet.safetensors")
    assert {t.dtype for t in unet.values()} == {torch.float16}
    model = build_pretrained_tiny_model("sdxl", export)
    # trained and rebuilt with the pretrained layout: 8 GroupNorm groups, not the per-channel 32 of the tiny configs
    assert model.unet.config.norm_num_groups == model.vae.config.norm_num_groups == PRETRAINED_NORM_GROUPS == 8
    assert load_model(tmp_path / "work" / "out" / "sdxl_trained.safetensors").unet.config.norm_num_groups == 8
    assert all(torch.equal(model.unet.state_dict()[k], v.float()) for k, v in unet.items())
    assert text_encoder_hash(model) == json.loads((export / "text_encoder_hashes.json").read_text())["sdxl"]
    (export / "text_encoder_hashes.json").write_text(json.dumps({"sdxl": "0" * 64, "sd1": "0" * 64}))
    with pytest.raises(RuntimeError, match="seeded text encoders"):
        build_pretrained_tiny_model("sdxl", export)


def test_the_decoder_stage_leaves_the_encoder_and_so_the_unets_latents_unchanged(tmp_path: Path) -> None:
    vae = pretrain_tiny.build_tiny_model("sdxl", seed=0, pretrained_layout=True).vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    pixels = [torch.rand(3, 64, 64) * 2 - 1 for _ in range(4)]
    losses = pretrain_tiny.train_decoder(vae, pixels, steps=2, batch=4, log=tmp_path / "log")
    after = vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(losses) == 2
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2
    assert all(p.requires_grad for p in vae.parameters())  # handed back trainable, as it came
    shapes = pretrain_tiny.random_colour_shapes(64, pretrain_tiny.random.Random(0))
    colours = {tuple(c) for c in shapes.permute(0, 2, 3, 1).reshape(-1, 3).tolist()}
    assert shapes.shape == (64, 3, 64, 64) and len(colours) > 90  # a random colour per shape, half the backgrounds


def test_the_committed_pretrained_models_fit_in_10_mib_and_load_in_diffusers(tmp_path: Path, capsys) -> None:
    from diffusers import StableDiffusionPipeline

    from tools import make_tiny_model

    files = {p.name: p.stat().st_size for p in PRETRAINED_DIR.iterdir()}
    assert set(files) == {"sdxl_unet.safetensors", "sd1_unet.safetensors", "vae.safetensors", "text_encoder_hashes.json"}
    assert sum(files.values()) < 10 * 2**20, files
    sdxl = build_pretrained_tiny_model("sdxl")  # checks the rebuilt text encoders against the recorded hash
    assert all(torch.isfinite(p).all() for p in sdxl.unet.parameters())
    # the SD1.5 base as the diffusers folder a user asks for
    assert make_tiny_model.main(["--family", "sd15", "--pretrained", "--output", str(tmp_path / "sd15")]) == 0
    assert "wrote pretrained tiny sd15 model" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15", local_files_only=True)
    ours = build_pretrained_tiny_model("sd1")
    for name, module in (("unet", ours.unet), ("vae", ours.vae), ("text_encoder", ours.text_encoders[0])):
        theirs = getattr(pipe, name).state_dict()
        assert all(torch.equal(theirs[k], v) for k, v in module.state_dict().items()), name
    with pytest.raises(SystemExit):
        make_tiny_model.main(["--family", "sd21", "--pretrained", "--output", str(tmp_path / "sd21")])
    assert "no pretrained tiny sd2 model" in capsys.readouterr().err
