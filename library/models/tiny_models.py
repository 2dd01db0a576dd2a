"""Tiny SD1.5 / SD2.1 / SDXL pipelines for tests and the demo (no download needed).

`build_tiny_model` gives randomly initialised weights (any family, any seed: tests that need other shapes).
`build_pretrained_tiny_model` gives the embedded default that can draw: the same architecture with the UNet and
VAE trained on procedural shapes by tools/pretrain_tiny.py, stored in fp16 under ``tiny_pretrained/``. Its text
encoders are not stored: they are the seeded random ones, rebuilt here and checked against the recorded hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from library.io import atomic_save_safetensors
from library.models.families import ModelFamily, resolve_family
from library.models.loading import StableDiffusionModel, build_model, save_diffusers

PRETRAINED_DIR = Path(__file__).with_name("tiny_pretrained")
PRETRAINED_SEED = 0  # the seed the pretrained weights started from; it also rebuilds their text encoders


# GroupNorm over 32 groups of the tiny widths (32 channels) is a per-channel instance norm: it removes each
# channel's mean over the image, so the VAE cannot tell a red flat area from a blue one and the UNet cannot set
# the mean of its output (both lose colour). The pretrained models use 8 groups (4-8 channels each) instead.
PRETRAINED_NORM_GROUPS = 8

# The pretrained SD1.5 UNet is narrower than the random tiny one (2.45M parameters, 4.9 MB in fp16), so that it fits
# next to the SDXL UNet (6.25 MB) and the shared VAE (2.83 MB) in the 10 MiB the repository gives the embedded
# models: 0.62M parameters, 1.32 MB. Same blocks, layers and attention layout, so every key mapping stays the real
# one. Measured over 5 prompts x 8 seeds, own prompt vs the others' (tools/pretrain_tiny.py): widths 16,16,16,24
# never followed the prompt (0.18 vs 0.18 after 2000 steps, also at lr 3e-3); 24,16,16,16 only slowly (0.23 vs
# 0.16 after 2000); 24,24,24,24 did (0.36 vs 0.16 after 2000, 0.46 vs 0.14 after 3000).
PRETRAINED_SD1_UNET_WIDTHS = [24, 24, 24, 24]

# The one VAE file both pretrained families load; every writer stores it with this metadata, so the SDXL and the
# SD1.5 export write the same bytes
SHARED_VAE_METADATA = {"families": "sd1 sdxl"}


def build_tiny_model(family: str | ModelFamily, seed: int = 0, *, pretrained_layout: bool = False) -> StableDiffusionModel:
    """Random weights; ``pretrained_layout`` gives the configs the pretrained weights use (fewer norm groups)."""
    fam = resolve_family(family)
    return build_model(fam, pretrained_tiny_configs(fam) if pretrained_layout else fam.tiny_configs(), seed=seed)


def pretrained_tiny_configs(family: str | ModelFamily) -> dict[str, dict]:
    """The tiny configs with `PRETRAINED_NORM_GROUPS` GroupNorm groups in the UNet and the VAE (and SD1.5's
    narrower UNet, `PRETRAINED_SD1_UNET_WIDTHS`)."""
    fam = resolve_family(family)
    configs = fam.tiny_configs()
    out = {**configs, **{name: {**configs[name], "norm_num_groups": PRETRAINED_NORM_GROUPS} for name in ("unet", "vae")}}
    if fam.name == "sd1":
        out["unet"]["block_out_channels"] = list(PRETRAINED_SD1_UNET_WIDTHS)
    return out


def make_tiny_model(family: str | ModelFamily, output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a diffusers folder that `DiffusionPipeline.from_pretrained` loads offline."""
    save_diffusers(build_tiny_model(family, seed), output_dir)
    return Path(output_dir)


def pretrained_file(family: str | ModelFamily, component: str, folder: Path = PRETRAINED_DIR) -> Path:
    """``<family>_unet.safetensors``; the VAE is one file both families share (``vae.safetensors``)."""
    return folder / ("vae.safetensors" if component == "vae" else f"{resolve_family(family).name}_{component}.safetensors")


def text_encoder_hash(model: StableDiffusionModel) -> str:
    """sha256 over the text encoders' weights (names, shapes, fp32 bytes) in state-dict order."""
    digest = hashlib.sha256()
    for encoder in model.text_encoders:
        for name, tensor in encoder.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_pretrained(model: StableDiffusionModel, folder: Path = PRETRAINED_DIR) -> list[Path]:
    """Store a pretrained tiny model's UNet and VAE in fp16 and its text-encoder hash (tools/pretrain_tiny.py)."""
    family = model.family.name
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for component, module in (("unet", model.unet), ("vae", model.vae)):
        path = pretrained_file(family, component, folder)
        metadata = {"family": family} if component == "unet" else SHARED_VAE_METADATA
        atomic_save_safetensors({k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()},
                                path, metadata=metadata)
        written.append(path)
    hashes_path = folder / "text_encoder_hashes.json"
    hashes = json.loads(hashes_path.read_text()) if hashes_path.exists() else {}
    hashes[family] = text_encoder_hash(model)
    hashes_path.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")
    return [*written, hashes_path]


def has_pretrained_tiny_model(family: str | ModelFamily = "sdxl", folder: Path = PRETRAINED_DIR) -> bool:
    return pretrained_file(family, "unet", folder).is_file() and pretrained_file(family, "vae", folder).is_file()


def build_pretrained_tiny_model(family: str | ModelFamily = "sdxl", folder: Path = PRETRAINED_DIR) -> StableDiffusionModel:
    """The embedded tiny model that draws shapes (fp32 modules; UNet and VAE from the fp16 files)."""
    from safetensors.torch import load_file

    fam = resolve_family(family)
    if not has_pretrained_tiny_model(fam, folder):
        raise FileNotFoundError(f"no pretrained tiny {fam.name} model in {folder}; "
                                f"create it with: python tools/pretrain_tiny.py --family {fam.name} --work_dir pretrain_work")
    model = build_tiny_model(fam, seed=PRETRAINED_SEED, pretrained_layout=True)
    expected = json.loads((folder / "text_encoder_hashes.json").read_text())[fam.name]
    if text_encoder_hash(model) != expected:
        raise RuntimeError(f"the seeded text encoders of the tiny {fam.name} model differ from the ones its UNet was "
                           "trained with (a changed torch/transformers initialisation?); rerun tools/pretrain_tiny.py")
    for module, component in ((model.unet, "unet"), (model.vae, "vae")):
        weights = load_file(pretrained_file(fam, component, folder))
        module.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()})
    return model
