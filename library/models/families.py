"""The model families we train, one `ModelFamily` object each (SD1, SD2, SDXL), and the one family detector.

A family holds everything that differs between them: its text encoders (where they live in a folder and in a
single file, how their tokenizers pad, which of their layers reach the UNet), what the UNet is conditioned on besides the
text, the bucket step, the latent-cache file suffix, the names kohya's and ModelSpec metadata give it, its
kohya block layout and its pipelines. Code outside ``library.models`` never asks which family a model is: it
reads these attributes or calls these methods. The component configs live in `library.models.family_configs`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from library.models import family_configs
from library.models.ldm_layout import UNET_PREFIX
from library.models.model_files import ModelLoadError, is_single_file

FamilyName = Literal["sd1", "sd2", "sdxl"]


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, by where it lives and how it is named.

    ``layers_read`` says which encoder layers reach the UNet (what LoRA modules can train): ``clip_skip`` the
    output of layer ``n - clip_skip + 1``; ``penultimate`` layer ``n - 1``; ``all`` every layer (the pooled
    vector reads the last).
    """

    component: str  # folder and pipeline name: "text_encoder", "text_encoder_2"
    tokenizer: str  # its tokenizer's folder and pipeline name
    ldm_prefix: str  # key prefix in a single (LDM/SGM layout) file
    open_clip: bool  # the single file holds OpenCLIP names (converted both ways by ldm_layout)
    with_projection: bool  # CLIPTextModelWithProjection: gives the pooled vector
    pad_with_exclamation: bool  # its tokenizer pads with "!" (id 0, as open_clip pads zeros), not with EOS
    layers_read: Literal["clip_skip", "penultimate", "all"]


@dataclass(frozen=True)
class KohyaBlocks:
    """kohya's UNet block indices (get_block_index) for block-wise LoRA dims and LR weights.

    Down blocks are ``[0, mid[0])``, up blocks ``[first_up, count)``; LDM ``input_blocks.i`` is block
    ``input_offset + i``, ``middle_block.i`` is ``mid[i]`` (the last one when there are fewer), and
    ``output_blocks.i`` is ``first_up + i``.
    """

    count: int
    input_offset: int
    mid: tuple[int, ...]
    first_up: int

    def index(self, ldm_path: str) -> int:
        """The block of a UNet module by its LDM path; -1 outside the three block lists."""
        parts = ldm_path.split(".")
        if parts[0] == "input_blocks":
            return self.input_offset + int(parts[1])
        if parts[0] == "middle_block":
            return self.mid[min(int(parts[1]), len(self.mid) - 1)]
        if parts[0] == "output_blocks":
            return self.first_up + int(parts[1])
        return -1


@dataclass(frozen=True, eq=False)
class ModelFamily:
    """Everything that differs between model families; one instance per family (compare with ``is``)."""

    name: FamilyName
    cli_name: str  # what --family takes
    aliases: tuple[str, ...]  # other accepted spellings
    title: str  # for messages
    text_encoders: tuple[TextEncoderSpec, ...]
    default_resolution: int  # the release's image side (its standard VAE sample size)
    bucket_step: int  # bucket sides are multiples of this
    latent_cache_suffix: str  # kohya's npz name ends with it
    base_model_version: str  # kohya's ss_base_model_version
    kohya_v2: bool  # kohya's ss_v2
    modelspec_architecture: str  # ModelSpec's modelspec.architecture
    size_conditioning: bool  # the UNet also takes the pooled text and (original size, crop, target size)
    single_file_markers: tuple[str, ...]  # key prefixes that identify the family in a single file
    kohya_blocks: KohyaBlocks
    lora_names_from_ldm: bool  # UNet LoRA modules named by LDM (SAI) paths rather than diffusers paths
    controlnet_file_in_ldm_layout: bool  # single ControlNet files in the original layout (else diffusers keys)
    pipeline_class: str  # diffusers class names
    controlnet_pipeline_class: str
    pipeline_options: tuple[tuple[str, Any], ...]  # constructor arguments besides the components
    vae_overflow_hint: str = ""  # appended when the VAE produces NaN/inf latents
    # ModelSpec's name for the family's epsilon-prediction release when it differs (SD 2.x-base at 512 px)
    modelspec_architecture_epsilon: str = ""

    def __repr__(self) -> str:
        return f"ModelFamily({self.name})"

    def modelspec_base_architecture(self, v_prediction: bool) -> str:
        """ModelSpec's modelspec.architecture of a base model of this family that predicts v or epsilon."""
        if v_prediction or not self.modelspec_architecture_epsilon:
            return self.modelspec_architecture
        return self.modelspec_architecture_epsilon

    def standard_configs(self) -> dict[str, dict[str, Any]]:
        """Component configs of the official release (SD 1.5, SD 2.1 768-v, SDXL 1.0 base)."""
        return family_configs.standard_configs(self.name)

    def tiny_configs(self) -> dict[str, dict[str, Any]]:
        """The same architecture at test widths."""
        return family_configs.tiny_configs(self.name)

    def unet_added_conditions(self, pooled: torch.Tensor | None, *, original_sizes_hw: torch.Tensor,
                              crop_top_lefts: torch.Tensor, target_sizes_hw: torch.Tensor, device: torch.device,
                              dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` for a batch: None, or SDXL's pooled text and (B, 6) time ids in
        diffusers' order (original (h, w), crop (top, left), target (h, w)), the ids in ``dtype``."""
        if not self.size_conditioning:
            return None
        if pooled is None:
            raise ValueError(f"{self.title} conditions the UNet on the pooled text embedding, but none was given")
        time_ids = torch.cat([original_sizes_hw, crop_top_lefts, target_sizes_hw], dim=1)
        return {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device, dtype)}

    def text_encoder_layers_in_use(self, layer_counts: list[int], clip_skip: int | None = None) -> list[int]:
        """How many leading layers of each text encoder can change the conditioning (encoders beyond the
        family's own count read like its last one)."""
        skip = max(int(clip_skip or 1), 1)
        used = {"clip_skip": lambda n: max(n - (skip - 1), 0), "penultimate": lambda n: n - 1, "all": lambda n: n}
        specs = self.text_encoders
        return [used[specs[min(i, len(specs) - 1)].layers_read](count) for i, count in enumerate(layer_counts)]


_CLIP_L = dict(open_clip=False, with_projection=False, pad_with_exclamation=False)

SD1 = ModelFamily(
    name="sd1", cli_name="sd15", aliases=("sd1", "sd15", "sd1.5", "v1"), title="SD 1.x",
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "cond_stage_model.transformer.", **_CLIP_L,
                                   layers_read="clip_skip"),),
    default_resolution=512, bucket_step=64, latent_cache_suffix="_sd.npz",
    base_model_version="sd_v1", kohya_v2=False, modelspec_architecture="stable-diffusion-v1",
    size_conditioning=False, single_file_markers=("cond_stage_model.transformer.",),
    kohya_blocks=KohyaBlocks(count=25, input_offset=0, mid=(12,), first_up=13), lora_names_from_ldm=False,
    controlnet_file_in_ldm_layout=True, pipeline_class="StableDiffusionPipeline", controlnet_pipeline_class="StableDiffusionControlNetPipeline",
    pipeline_options=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
)
# SD 2.1 (768-v, v-prediction in its standard configs) is the SD2 most people fine-tune; 2.x-base (eps)
# needs an explicit override.
SD2 = ModelFamily(
    name="sd2", cli_name="sd21", aliases=("sd2", "sd21", "sd2.1", "v2"), title="SD 2.x",
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "cond_stage_model.model.", open_clip=True,
                                   with_projection=False, pad_with_exclamation=True, layers_read="clip_skip"),),
    default_resolution=768, bucket_step=64, latent_cache_suffix="_sd.npz",
    base_model_version="sd_v2", kohya_v2=True, modelspec_architecture="stable-diffusion-v2-768-v",
    size_conditioning=False, single_file_markers=("cond_stage_model.model.",),
    kohya_blocks=SD1.kohya_blocks, lora_names_from_ldm=False, controlnet_file_in_ldm_layout=True,
    pipeline_class=SD1.pipeline_class, controlnet_pipeline_class=SD1.controlnet_pipeline_class,
    pipeline_options=SD1.pipeline_options, modelspec_architecture_epsilon="stable-diffusion-v2-512",
)
SDXL = ModelFamily(
    name="sdxl", cli_name="sdxl", aliases=("sdxl", "xl"), title="SDXL",
    text_encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", **_CLIP_L,
                        layers_read="penultimate"),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", open_clip=True,
                        with_projection=True, pad_with_exclamation=True, layers_read="all"),
    ),
    default_resolution=1024, bucket_step=32, latent_cache_suffix="_sdxl.npz",
    base_model_version="sdxl_base_v1-0", kohya_v2=False, modelspec_architecture="stable-diffusion-xl-v1-base",
    size_conditioning=True, single_file_markers=("conditioner.embedders.1.model.", UNET_PREFIX + "label_emb."),
    kohya_blocks=KohyaBlocks(count=23, input_offset=1, mid=(10, 11, 12), first_up=13), lora_names_from_ldm=True,
    controlnet_file_in_ldm_layout=False, pipeline_class="StableDiffusionXLPipeline",
    controlnet_pipeline_class="StableDiffusionXLControlNetPipeline",
    pipeline_options=(("add_watermarker", False),),
    vae_overflow_hint="the SDXL VAE overflows in fp16: add --no_half_vae",
)

FAMILIES: dict[FamilyName, ModelFamily] = {family.name: family for family in (SD1, SD2, SDXL)}
# Accepted spellings on the command line (`--family sd15` is what people type).
FAMILY_ALIASES: dict[str, FamilyName] = {alias: f.name for f in FAMILIES.values() for alias in f.aliases}
CLI_FAMILY_CHOICES: tuple[str, ...] = tuple(f.cli_name for f in FAMILIES.values())
# Buckets are checked before the model is known when its family cannot be peeked: the finest step any
# family allows refuses nothing a family would accept.
FINEST_BUCKET_STEP = min(f.bucket_step for f in FAMILIES.values())
# What a tool with no model to ask assumes (tools/check_dataset.py names the npz files after it): kohya's
# SDXL names, whose bucket step is also the finest.
FAMILY_WHEN_UNKNOWN = SDXL


def resolve_family(name: str | ModelFamily) -> ModelFamily:
    """The family of a name or alias (a family is returned as it is)."""
    if isinstance(name, ModelFamily):
        return name
    key = FAMILY_ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model family {name!r}: expected one of {', '.join(CLI_FAMILY_CHOICES)}")
    return FAMILIES[key]


def family_with_base_model_version(version: str | None) -> ModelFamily | None:
    """The family kohya's ``ss_base_model_version`` names, or None."""
    return next((f for f in FAMILIES.values() if f.base_model_version == version), None)


# --------------------------------------------------------------------------------------------------
# detection: the one place that tells families apart


def detect_family_of_keys(state_dict: Mapping[str, Any]) -> ModelFamily | None:
    """The family of an LDM-layout state dict from its keys (values need only ``ndim``), or None if this is no
    SD checkpoint we know. A UNet-only file is told by its projections: SD2 linear, SD1 1x1 convolutions."""
    keys = state_dict.keys()
    for family in (SDXL, SD2, SD1):
        if any(k.startswith(family.single_file_markers) for k in keys):
            return family
    proj_in = state_dict.get(UNET_PREFIX + "input_blocks.1.1.proj_in.weight")
    if proj_in is not None:
        return SD2 if proj_in.ndim == 2 else SD1
    return None


def family_of_folder(folder: str | os.PathLike) -> ModelFamily:
    """The family of a diffusers folder from its configs: SDXL by its pipeline or second text encoder; SD2's
    OpenCLIP encoder uses gelu where CLIP ViT-L (SD1) uses quick_gelu."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name", "").startswith("StableDiffusionXL") or "text_encoder_2" in index:
        return SDXL
    te_config_file = folder / "text_encoder" / "config.json"
    if not te_config_file.is_file():
        raise ModelLoadError(f"{folder} is not a Stable Diffusion model folder: text_encoder/config.json is missing")
    te_config = json.loads(te_config_file.read_text())
    return SD2 if te_config.get("hidden_act") == "gelu" else SD1


def family_of_unet_config(config: Mapping[str, Any] | None) -> ModelFamily:
    """The family of a diffusers UNet (or ControlNet) config: SDXL adds pooled text + sizes ("text_time");
    SD2 uses linear projections."""
    config = config or {}
    if config.get("addition_embed_type") == "text_time":
        return SDXL
    return SD2 if config.get("use_linear_projection") else SD1


def family_of_unet(unet: Any) -> ModelFamily:
    """`family_of_unet_config` of a UNet module (SD1 for a module without a config)."""
    return family_of_unet_config(getattr(unet, "config", None))


def detect_family(path: str | os.PathLike) -> ModelFamily | None:
    """The family of a model path without loading weights: the one detector for start-up and loading.

    A diffusers folder by its configs; a ``.safetensors`` file by its header's keys; a pickled checkpoint
    by its keys through a memory map. None when the path does not exist or is no model we can peek into
    (the full load then says why); a file that is not what its name says is a `ModelLoadError`.
    """
    p = Path(path)
    if p.is_dir():
        return family_of_folder(p) if (p / "model_index.json").is_file() else None
    if not p.is_file():
        return None
    if p.suffix.lower() == ".safetensors":
        return detect_family_of_keys(_safetensors_shapes(p))
    if is_single_file(p):
        return _family_of_pickle(p)
    return None


def _safetensors_shapes(path: Path) -> dict[str, "_ShapeOnly"]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), "pt")
        return {key: _ShapeOnly(handle, key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - a broken header: the user needs the file name and the fix
        reason = " ".join(str(error).split())
        raise ModelLoadError(f"{path} could not be read as a safetensors file ({reason}): it is truncated or not a "
                             "model file; download it again or pass another model") from error


class _ShapeOnly:
    """Enough of a tensor for `detect_family_of_keys`: ``ndim`` of one key, read from the header lazily."""

    def __init__(self, handle: Any, key: str) -> None:
        self._handle, self._key = handle, key

    @property
    def ndim(self) -> int:
        return len(self._handle.get_slice(self._key).get_shape())


def _family_of_pickle(path: Path) -> ModelFamily | None:
    """Keys of a zip-format checkpoint through a memory map (no tensor data read); None for other formats."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy formats cannot be mapped; the full load reports real damage
        return None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return detect_family_of_keys(data) if isinstance(data, dict) else None
