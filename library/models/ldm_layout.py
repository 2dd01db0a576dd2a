"""Key layout of single-file checkpoints (the original LDM/SGM layout A1111 and ComfyUI use) <-> diffusers.

One table of prefix pairs per component is built from the diffusers config and used in both directions,
so a save followed by a load is the identity by construction. Text encoders are handled in canonical
``text_model.*`` names (what transformers' CLIPTextModelWithProjection uses); `library.models` adapts to
modules that drop that prefix.

Single-file prefixes: UNet ``model.diffusion_model.``; VAE ``first_stage_model.``; each family's text
encoders where its `library.models.families.TextEncoderSpec` says (HF CLIP names, or OpenCLIP names with
``text_projection`` stored transposed and, with a projection, a ``logit_scale``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# CLIP's trained temperature, ln(100); stored by SGM checkpoints though no SD pipeline uses it.
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)



class TextEncoderLayout(Protocol):
    """Where one text encoder lives in a single file (`library.models.families.TextEncoderSpec` is one)."""

    component: str  # "text_encoder", "text_encoder_2"
    ldm_prefix: str
    open_clip: bool  # OpenCLIP names in the file (a with_projection one also stores ``logit_scale``)
    with_projection: bool


_UNET_RESNET_RENAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                        ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_VAE_RESNET_RENAMES = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION_RENAMES = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


class PrefixTable:
    """Pairs of (diffusers prefix, ldm prefix, inner renames) for one component."""

    def __init__(self) -> None:
        self.to_ldm: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        self.to_diffusers: dict[str, tuple[str, list[tuple[str, str]]]] = {}

    def add(self, diffusers: str, ldm: str, renames: list[tuple[str, str]] | None = None) -> None:
        renames = renames or []
        self.to_ldm[diffusers] = (ldm, renames)
        self.to_diffusers[ldm] = (diffusers, [(b, a) for a, b in renames])

    @staticmethod
    def _convert(key: str, table: dict[str, tuple[str, list[tuple[str, str]]]]) -> str | None:
        parts = key.split(".")
        for length in range(min(len(parts) - 1, 6), 0, -1):
            prefix = ".".join(parts[:length])
            if prefix in table:
                target, renames = table[prefix]
                rest = ".".join(parts[length:])
                for old, new in renames:
                    if rest == old or rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
                return f"{target}.{rest}"
        return None

    def diffusers_key_to_ldm(self, key: str) -> str | None:
        return self._convert(key, self.to_ldm)

    def ldm_key_to_diffusers(self, key: str) -> str | None:
        return self._convert(key, self.to_diffusers)


# --------------------------------------------------------------------------------------------------
# UNet


def unet_table(config: dict[str, Any]) -> PrefixTable:
    """LDM numbers every down/up step of the UNet in one flat list (input_blocks / output_blocks)."""
    table = PrefixTable()
    table.add("time_embedding.linear_1", "time_embed.0")
    table.add("time_embedding.linear_2", "time_embed.2")
    table.add("add_embedding.linear_1", "label_emb.0.0")
    table.add("add_embedding.linear_2", "label_emb.0.2")
    table.add("conv_in", "input_blocks.0.0")
    table.add("conv_norm_out", "out.0")
    table.add("conv_out", "out.2")
    layers = config["layers_per_block"]
    down_types = config["down_block_types"]
    for i, block_type in enumerate(down_types):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            table.add(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if "CrossAttn" in block_type:
                table.add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1")
        if i < len(down_types) - 1:
            table.add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op")
    table.add("mid_block.resnets.0", "middle_block.0", _UNET_RESNET_RENAMES)
    table.add("mid_block.attentions.0", "middle_block.1")
    table.add("mid_block.resnets.1", "middle_block.2", _UNET_RESNET_RENAMES)
    up_types = config["up_block_types"]
    for i, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            table.add(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if has_attention:
                table.add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1")
        if i < len(up_types) - 1:
            last = i * (layers + 1) + layers
            table.add(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{last}.{2 if has_attention else 1}")
    return table


# --------------------------------------------------------------------------------------------------
# VAE


def vae_table(num_blocks: int, layers_per_block: int = 2) -> PrefixTable:
    """The LDM decoder numbers its up blocks from the bottom, diffusers from the top."""
    table = PrefixTable()
    for part in ("encoder", "decoder"):
        table.add(f"{part}.conv_in", f"{part}.conv_in")
        table.add(f"{part}.conv_out", f"{part}.conv_out")
        table.add(f"{part}.conv_norm_out", f"{part}.norm_out")
        table.add(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET_RENAMES)
        table.add(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET_RENAMES)
        table.add(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION_RENAMES)
    for i in range(num_blocks):
        for j in range(layers_per_block):
            table.add(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET_RENAMES)
        if i < num_blocks - 1:
            table.add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        ldm_i = num_blocks - 1 - i
        for j in range(layers_per_block + 1):
            table.add(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}", _VAE_RESNET_RENAMES)
        if i < num_blocks - 1:
            table.add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv")
    table.add("quant_conv", "quant_conv")
    table.add("post_quant_conv", "post_quant_conv")
    return table


def _is_vae_attention_matrix(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def vae_diffusers_to_ldm(state_dict: dict[str, torch.Tensor], num_blocks: int, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    table = vae_table(num_blocks, layers_per_block)
    out = {}
    for key, value in state_dict.items():
        ldm_key = _require(table.diffusers_key_to_ldm(key), key, "VAE")
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        out[ldm_key] = value[:, :, None, None] if _is_vae_attention_matrix(ldm_key) and value.ndim == 2 else value
    return out


def vae_ldm_to_diffusers(state_dict: dict[str, torch.Tensor], num_blocks: int, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    if any(".down_blocks." in k or ".up_blocks." in k for k in state_dict):
        return dict(state_dict)  # already diffusers-named (a diffusers VAE saved as one file)
    table = vae_table(num_blocks, layers_per_block)
    out = {}
    for key, value in state_dict.items():
        new_key = table.ldm_key_to_diffusers(key)
        if new_key is None:
            continue
        out[new_key] = value[:, :, 0, 0] if _is_vae_attention_matrix(key) and value.ndim == 4 else value
    return out


def strip_vae_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE-only file has bare ``encoder.*`` keys; a full checkpoint has them under first_stage_model."""
    if any(k.startswith(VAE_PREFIX) for k in state_dict):
        return {k[len(VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(VAE_PREFIX)}
    return {k: v for k, v in state_dict.items() if k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv"))}


# --------------------------------------------------------------------------------------------------
# OpenCLIP text encoder (SD2, SDXL's second encoder)

_OPEN_CLIP_LAYER_RENAMES = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                            ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]


def open_clip_to_hf(state_dict: dict[str, torch.Tensor], num_layers: int, with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP's fused q/k/v become three projections; layers past ``num_layers`` are dropped (SD2 keeps 23 of 24)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key[len("ln_final."):]] = value
        elif key == "text_projection" and with_projection:
            out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            layer, rest = key[len("transformer.resblocks."):].split(".", 1)
            if int(layer) >= num_layers:
                continue
            base = f"text_model.encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                suffix = "weight" if rest.endswith("weight") else "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{suffix}"] = chunk.contiguous()
                continue
            for old, new in _OPEN_CLIP_LAYER_RENAMES:
                if rest.startswith(old + "."):
                    out[base + new + rest[len(old):]] = value
                    break
    return out


def hf_to_open_clip(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key[len("text_model.final_layer_norm."):]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key.startswith("text_model.encoder.layers."):
            layer, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            base = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue  # fused below
            for old, new in _OPEN_CLIP_LAYER_RENAMES:
                if rest.startswith(new + "."):
                    out[base + old + rest[len(new):]] = value
                    break
            else:
                raise KeyError(f"unexpected text-encoder key {key}")
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"unexpected text-encoder key {key}")
    for layer in range(num_layers):
        attn = f"text_model.encoder.layers.{layer}.self_attn."
        for suffix in ("weight", "bias"):
            parts = [state_dict[f"{attn}{name}.{suffix}"] for name in ("q_proj", "k_proj", "v_proj")]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{suffix}"] = torch.cat(parts, dim=0)
    return out


# --------------------------------------------------------------------------------------------------
# whole checkpoints


def _select(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _require(value: str | None, key: str, component: str) -> str:
    if value is None:
        raise KeyError(f"the {component} key {key} has no single-file equivalent")
    return value


def ldm_to_diffusers(state_dict: dict[str, torch.Tensor], text_encoders: Sequence[TextEncoderLayout],
                     configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-component diffusers state dicts (text encoders in canonical ``text_model.*`` names)."""
    unet = unet_table(configs["unet"])
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}}
    for key, value in _select(state_dict, UNET_PREFIX).items():
        new_key = unet.ldm_key_to_diffusers(key)
        if new_key is not None:
            out["unet"][new_key] = value
    vae_cfg = configs["vae"]
    out["vae"] = vae_ldm_to_diffusers(_select(state_dict, VAE_PREFIX), len(vae_cfg["block_out_channels"]), vae_cfg.get("layers_per_block", 2))
    for spec in text_encoders:
        weights = _select(state_dict, spec.ldm_prefix)
        if spec.open_clip:
            weights = open_clip_to_hf(weights, configs[spec.component]["num_hidden_layers"], with_projection=spec.with_projection)
        out[spec.component] = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    return out


def diffusers_to_ldm(components: dict[str, dict[str, torch.Tensor]], text_encoders: Sequence[TextEncoderLayout],
                     configs: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One flat LDM-layout state dict from per-component diffusers state dicts (canonical TE names)."""
    unet = unet_table(configs["unet"])
    out = {UNET_PREFIX + _require(unet.diffusers_key_to_ldm(k), k, "UNet"): v for k, v in components["unet"].items()}
    vae_cfg = configs["vae"]
    vae = vae_diffusers_to_ldm(components["vae"], len(vae_cfg["block_out_channels"]), vae_cfg.get("layers_per_block", 2))
    out.update({VAE_PREFIX + k: v for k, v in vae.items()})
    for spec in text_encoders:
        weights = components[spec.component]
        if spec.open_clip:
            weights = hf_to_open_clip(weights, configs[spec.component]["num_hidden_layers"])
            if spec.with_projection:  # SGM stores the whole OpenCLIP model, temperature included
                weights["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE)
        out.update(_prefixed(weights, spec.ldm_prefix))
    return out


def _prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state_dict.items() if not k.endswith("position_ids")}

