"""ControlNet models: create one from a UNet, load it from any common layout, save it where other tools read it.

The model is diffusers' `ControlNetModel` (a trainable copy of the UNet's encoder and mid block, plus the
zero-initialised convolutions that feed residuals into the frozen UNet). What this module adds is the
single-file layouts people actually exchange:

* SD1.x / SD2.x: the ORIGINAL ControlNet layout (``control_model.*`` keys, as lllyasviel's
  ``tool_add_control.py`` writes them), which A1111 (sd-webui-controlnet), ComfyUI and diffusers'
  ``ControlNetModel.from_single_file`` all read. Diffusers has a reader for it but no writer, so the
  key table below is ours; it is built from `library.models.ldm_layout.unet_table` and used in both directions.
* SDXL: the diffusers-keyed single file (``controlnet.state_dict()`` names), the convention of kohya's
  SDXL ControlNet trainer and of the SDXL ControlNets that ComfyUI and A1111 load.

Every file we write carries the diffusers config in its metadata, so it loads back with no flags;
a foreign file gets its config from the base UNet's config (or, failing that, the standard config of
the family its keys reveal), with the conditioning-embedding widths read off the file's own tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from library.models import ldm_layout
from library.models.families import SD1, SD2, SDXL, ModelFamily, detect_family_of_keys, family_of_unet_config, resolve_family
from library.models.loading import ModelLoadError, is_single_file, read_checkpoint
from library.io import atomic_save_folder, atomic_save_safetensors, atomic_torch_save
from library.models.import_noise import without_import_noise

with without_import_noise():  # diffusers' model modules import bitsandbytes
    from diffusers import ControlNetModel, UNet2DConditionModel

# Written into single files we save: the ControlNetModel config, so the file rebuilds with no flags.
CONTROLNET_CONFIG_METADATA_KEY = "sdtrainer.controlnet_config"
LDM_CONTROLNET_PREFIX = "control_model."
DEFAULT_CONDITIONING_EMBEDDING_CHANNELS = (16, 32, 96, 256)
_HINT_BLOCK = "input_hint_block"
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
_LDM_MARKER = _HINT_BLOCK + ".0.weight"


# --------------------------------------------------------------------------------------------------
# creation


def create_controlnet(unet: UNet2DConditionModel, conditioning_channels: int = 3, *,
                      conditioning_embedding_out_channels: Sequence[int] = DEFAULT_CONDITIONING_EMBEDDING_CHANNELS,
                      ) -> ControlNetModel:
    """A trainable ControlNet initialised from ``unet``: its encoder and mid block copied, its outputs zero.

    The zero-initialised output convolutions make the residuals zero at step 0, so training starts from
    exactly the base model's behaviour. SDXL's added text/time embedding (``addition_embed_type
    text_time``) is configured and copied by diffusers' ``from_unet``. The copy is float32 on the CPU
    whatever the UNet's dtype and device: trainable weights belong in full precision.
    """
    _check_unet_supported(unet)
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        load_weights_from_unet=True, conditioning_channels=conditioning_channels,
    )


def _check_unet_supported(unet: UNet2DConditionModel) -> None:
    """`from_unet` silently drops UNet options ControlNetModel cannot express; refuse instead of diverging."""
    config = unet.config
    unsupported = {"conv_in_kernel": 3, "time_embedding_type": "positional", "time_cond_proj_dim": None,
                   "class_embeddings_concat": False}
    for key, expected in unsupported.items():
        if config.get(key, expected) != expected:
            raise ValueError(f"a ControlNet cannot be made from a UNet with {key}={config[key]!r} "
                             f"(ControlNetModel only supports {expected!r})")


# --------------------------------------------------------------------------------------------------
# the original (LDM) ControlNet layout


def controlnet_table(config: Mapping[str, Any], hint_convs: int | None = None) -> ldm_layout.PrefixTable:
    """diffusers ControlNet module paths <-> original ``control_model.*`` paths (prefix not included).

    The encoder uses the UNet's own LDM numbering. The hint block is a Sequential of conv, SiLU, conv, ...
    so its convolutions sit at even indices: conv_in at 0, ``blocks.k`` at 2(k+1), conv_out last (14 for the
    standard 16/32/96/256 widths, where diffusers' reader expects it). ``hint_convs`` is the number of
    convolutions in the hint block; by default it follows from ``conditioning_embedding_out_channels``.
    """
    table = ldm_layout.unet_table({**dict(config), "up_block_types": []})
    if hint_convs is None:
        widths = config.get("conditioning_embedding_out_channels") or DEFAULT_CONDITIONING_EMBEDDING_CHANNELS
        hint_convs = 2 * len(widths)
    table.add("controlnet_cond_embedding.conv_in", f"{_HINT_BLOCK}.0")
    for k in range(hint_convs - 2):
        table.add(f"controlnet_cond_embedding.blocks.{k}", f"{_HINT_BLOCK}.{2 * (k + 1)}")
    table.add("controlnet_cond_embedding.conv_out", f"{_HINT_BLOCK}.{2 * (hint_convs - 1)}")
    # one zero conv per encoder output: every resnet/attention step, every downsampler, and conv_in
    for n in range(len(config["down_block_types"]) * (config["layers_per_block"] + 1)):
        table.add(f"controlnet_down_blocks.{n}", f"zero_convs.{n}.0")
    table.add("controlnet_mid_block", "middle_block_out.0")
    return table


def controlnet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict in the original layout, ``control_model.`` prefix included."""
    table = controlnet_table(config)
    out = {}
    for key, value in state_dict.items():
        ldm_key = table.diffusers_key_to_ldm(key)
        if ldm_key is None:
            raise KeyError(f"the ControlNet weight {key} has no equivalent in the original ControlNet layout")
        out[LDM_CONTROLNET_PREFIX + ldm_key] = value
    return out


def ldm_to_controlnet(state_dict: Mapping[str, torch.Tensor],
                      config: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original-layout weights (with or without the ``control_model.`` prefix) -> diffusers names.

    Returns the converted dict and the keys that have no diffusers equivalent.
    """
    bare = _strip_ldm_prefix(state_dict)
    table = controlnet_table(config, hint_convs=_count_hint_convs(bare))
    out, unknown = {}, []
    for key, value in bare.items():
        new_key = table.ldm_key_to_diffusers(key)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    return out, unknown


def _strip_ldm_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files made by lllyasviel's tools prefix ``control_model.``; some re-releases (thibaud's SD2.1) do not."""
    if any(k.startswith(LDM_CONTROLNET_PREFIX) for k in state_dict):
        return {k[len(LDM_CONTROLNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LDM_CONTROLNET_PREFIX)}
    return dict(state_dict)


def _count_hint_convs(bare: Mapping[str, torch.Tensor]) -> int:
    return len({k.split(".")[1] for k in bare if k.startswith(_HINT_BLOCK + ".") and k.endswith(".weight")})


# --------------------------------------------------------------------------------------------------
# loading


def load_controlnet(path: str | os.PathLike, unet_config_for_fallback: Mapping[str, Any] | None = None,
                    torch_dtype: torch.dtype | None = None) -> ControlNetModel:
    """A ControlNet from a diffusers folder or a single file (original layout or diffusers-keyed).

    A single file's config comes from, in order: the config our writer stored in its metadata, the base
    model's ``unet_config_for_fallback`` (pass ``unet.config``), or the standard config of the family the
    file's keys reveal. Weights are float32 (what training needs, and what ``from_pretrained`` gives)
    unless ``torch_dtype`` says otherwise.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"ControlNet {p} does not exist: pass a diffusers ControlNet folder or a .safetensors file")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a diffusers ControlNet folder: config.json is missing")
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        return ControlNetModel.from_pretrained(p, local_files_only=True, **kwargs)
    if not is_single_file(p):
        raise ModelLoadError(f"ControlNet {p} is neither a diffusers folder nor a .safetensors/.ckpt/.pth file")
    state_dict, metadata = read_checkpoint(p)
    state_dict = _cast(state_dict, torch_dtype or torch.float32)
    return _controlnet_from_state_dict(state_dict, metadata, unet_config_for_fallback, p)


def _controlnet_from_state_dict(state_dict: dict[str, torch.Tensor], metadata: Mapping[str, str],
                                unet_config: Mapping[str, Any] | None, path: Path) -> ControlNetModel:
    layout = _layout_of(state_dict, path)
    stored = metadata.get(CONTROLNET_CONFIG_METADATA_KEY)
    if stored:
        try:
            config = json.loads(stored)
        except json.JSONDecodeError as error:
            raise ModelLoadError(f"{path}: the stored ControlNet config ({CONTROLNET_CONFIG_METADATA_KEY}) "
                                 f"is not valid JSON ({error})") from error
        weights, unknown = ldm_to_controlnet(state_dict, config) if layout == "ldm" else (state_dict, [])
        with init_empty_weights():
            controlnet = ControlNetModel.from_config(config)
    else:
        if unet_config is None:
            unet_config = _family_of_keys(state_dict, layout, path).standard_configs()["unet"]
        weights, unknown = ldm_to_controlnet(state_dict, unet_config) if layout == "ldm" else (state_dict, [])
        controlnet = _empty_controlnet_like(unet_config, weights, path)
    _assign_weights(controlnet, weights, unknown, path, fallback_used=not stored)
    return controlnet.eval()


def _layout_of(state_dict: Mapping[str, torch.Tensor], path: Path) -> str:
    if _DIFFUSERS_MARKER in state_dict:
        return "diffusers"
    if _LDM_MARKER in _strip_ldm_prefix(state_dict):
        return "ldm"
    hint = ""
    if any(k.startswith(ldm_layout.UNET_PREFIX) for k in state_dict):
        hint = " (it looks like a Stable Diffusion checkpoint: pass it as the base model instead)"
    elif any(k.startswith("lllite_") for k in state_dict):
        hint = " (it looks like a ControlNet-LLLite file, which is a different kind of network)"
    raise ModelLoadError(
        f"{path} is not a ControlNet checkpoint: neither {LDM_CONTROLNET_PREFIX}{_LDM_MARKER} (original layout) "
        f"nor {_DIFFUSERS_MARKER} (diffusers layout) was found{hint}"
    )


def _family_of_keys(state_dict: Mapping[str, torch.Tensor], layout: str, path: Path) -> ModelFamily:
    """The family of a foreign ControlNet, by the same tell-tale weights as full checkpoints."""
    if layout == "ldm":
        as_unet = {ldm_layout.UNET_PREFIX + k: v for k, v in _strip_ldm_prefix(state_dict).items()}
        family = detect_family_of_keys(as_unet)
    elif "add_embedding.linear_1.weight" in state_dict:
        family = SDXL
    else:
        proj_in = state_dict.get("down_blocks.0.attentions.0.proj_in.weight")
        family = None if proj_in is None else (SD2 if proj_in.ndim == 2 else SD1)
    if family is None:
        raise ModelLoadError(f"{path}: cannot tell which model family this ControlNet is for; pass the base UNet's config")
    return family


def _empty_controlnet_like(unet_config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], path: Path) -> ControlNetModel:
    """A meta-device ControlNet for a UNet config, via diffusers' own `from_unet` (no config list of ours)."""
    conv_in = weights.get("controlnet_cond_embedding.conv_in.weight")
    if conv_in is None:
        raise ModelLoadError(f"{path} has no conditioning-embedding input convolution; the file is truncated")
    widths = [conv_in.shape[0]]
    block = 1
    while f"controlnet_cond_embedding.blocks.{block}.weight" in weights:  # the stride-2 convs widen the embedding
        widths.append(weights[f"controlnet_cond_embedding.blocks.{block}.weight"].shape[0])
        block += 2
    unet_kwargs = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_kwargs)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(widths),
                                         load_weights_from_unet=False, conditioning_channels=conv_in.shape[1])


def _assign_weights(controlnet: ControlNetModel, weights: Mapping[str, torch.Tensor], unknown: list[str],
                    path: Path, fallback_used: bool) -> None:
    expected = controlnet.state_dict()
    advice = ("; pass the base model's UNet config (unet_config_for_fallback) it was trained for"
              if fallback_used else "; the file is damaged")
    unknown = unknown + sorted(k for k in weights if k not in expected)
    if unknown:
        raise ModelLoadError(f"{path} has {len(unknown)} weights this ControlNet architecture does not have "
                             f"(first: {unknown[0]}){advice}")
    missing = sorted(k for k in expected if k not in weights)
    if missing:
        raise ModelLoadError(f"{path} is missing {len(missing)} ControlNet weights (first: {missing[0]}){advice}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(f"{path}: ControlNet weight {key} has shape {tuple(value.shape)} but the config "
                                 f"expects {tuple(expected[key].shape)}{advice}")
    controlnet.load_state_dict(dict(weights), strict=True, assign=True)


# --------------------------------------------------------------------------------------------------
# saving


def save_controlnet(controlnet: ControlNetModel, path: str | os.PathLike, family: ModelFamily | str,
                    dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None,
                    overwrite: bool = False) -> None:
    """Save as a diffusers folder (``path`` without a file suffix) or one file (``.safetensors``/``.ckpt``...).

    Single files: SD1.x/SD2.x in the original ``control_model.*`` layout, SDXL diffusers-keyed; both
    carry the diffusers config in their metadata. Every write is atomic and the caller's module is
    never cast.
    """
    fam = resolve_family(family)
    conditioned_on_sizes = family_of_unet_config(controlnet.config).size_conditioning
    if fam.size_conditioning != conditioned_on_sizes:
        raise ValueError(f"save_controlnet was told family {fam.name}, but this ControlNet is "
                         f"{'an SDXL' if conditioned_on_sizes else 'an SD1/SD2'} one")
    path = Path(path)
    if is_single_file(path):
        _save_single_file(controlnet, path, fam, dtype, metadata)
    else:
        _save_folder(controlnet, path, dtype, overwrite)


def _save_single_file(controlnet: ControlNetModel, path: Path, family: ModelFamily, dtype: torch.dtype | None,
                      metadata: Mapping[str, str] | None) -> None:
    state_dict = controlnet.state_dict()
    if family.controlnet_file_in_ldm_layout:
        state_dict = controlnet_to_ldm(state_dict, controlnet.config)
    if dtype is not None:
        state_dict = _cast(state_dict, dtype)
    meta = {CONTROLNET_CONFIG_METADATA_KEY: json.dumps(controlnet_config_dict(controlnet)), **(metadata or {})}
    if path.suffix.lower() == ".safetensors":
        atomic_save_safetensors(state_dict, path, meta)
    else:
        atomic_torch_save({"state_dict": state_dict, **meta}, path)


def controlnet_config_dict(controlnet: ControlNetModel) -> dict[str, Any]:
    """The JSON-serialisable config ``ControlNetModel.from_config`` takes."""
    return {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_") or k == "_class_name"}


def _save_folder(controlnet: ControlNetModel, folder: Path, dtype: torch.dtype | None, overwrite: bool = False) -> None:
    """`save_pretrained` into a temp folder renamed into place: a killed save never leaves half a model."""
    if dtype is not None and dtype != controlnet.dtype:
        # a cast copy built around cast tensors: no second full-precision copy, and no `ModelMixin.to(dtype)`
        # (which warns about fp32 modules this model does not have)
        with init_empty_weights():
            cast = ControlNetModel.from_config(controlnet.config)
        cast.load_state_dict(_cast(controlnet.state_dict(), dtype), strict=True, assign=True)
        controlnet = cast
    atomic_save_folder(folder, partial(controlnet.save_pretrained, safe_serialization=True), overwrite)


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
