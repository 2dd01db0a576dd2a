"""The three model families we train, and the diffusers configs of their standard (full-size) releases.

A family decides how text is encoded, which single-file layout a checkpoint uses and what the UNet is
conditioned on. The standard configs let a foreign single-file checkpoint (an A1111/ComfyUI download) be
built without reaching a model hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

FamilyName = Literal["sd1", "sd2", "sdxl"]
FAMILY_NAMES: tuple[FamilyName, ...] = ("sd1", "sd2", "sdxl")
# Accepted spellings on the command line (`--family sd15` is what people type).
FAMILY_ALIASES: dict[str, FamilyName] = {
    "sd1": "sd1", "sd15": "sd1", "sd1.5": "sd1", "v1": "sd1",
    "sd2": "sd2", "sd21": "sd2", "sd2.1": "sd2", "v2": "sd2",
    "sdxl": "sdxl", "xl": "sdxl",
}


@dataclass(frozen=True)
class Family:
    name: FamilyName
    text_encoder_count: int
    default_prediction_type: Literal["epsilon", "v_prediction"]
    default_resolution: int
    latent_scaling_factor: float

    @property
    def is_sdxl(self) -> bool:
        return self.name == "sdxl"


FAMILIES: dict[FamilyName, Family] = {
    "sd1": Family("sd1", 1, "epsilon", 512, 0.18215),
    # SD 2.1 (768-v) is the SD2 most people fine-tune; 2.x-base (eps) needs an explicit override.
    "sd2": Family("sd2", 1, "v_prediction", 768, 0.18215),
    "sdxl": Family("sdxl", 2, "epsilon", 1024, 0.13025),
}


def resolve_family(name: str) -> Family:
    key = FAMILY_ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model family {name!r}: expected one of sd15, sd21, sdxl")
    return FAMILIES[key]


def scheduler_config(prediction_type: str) -> dict[str, Any]:
    """The noise schedule shared by SD1, SD2 and SDXL (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


def _clip_text_config(hidden: int, layers: int, heads: int, act: str, projection: int) -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def _vae_config(channels: list[int], scaling_factor: float, sample_size: int) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


_SD_UNET_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "norm_num_groups": 32,
}
_SDXL_UNET_BLOCKS = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
}


def standard_configs(family: FamilyName) -> dict[str, dict[str, Any]]:
    """Component configs of the official release: SD 1.5, SD 2.1 (768-v) or SDXL 1.0 base."""
    if family == "sd1":
        return {
            "unet": {**_SD_UNET_BLOCKS, "sample_size": 64, "block_out_channels": [320, 640, 1280, 1280],
                     "cross_attention_dim": 768, "attention_head_dim": 8},
            "vae": _vae_config([128, 256, 512, 512], 0.18215, 512),
            "text_encoder": _clip_text_config(768, 12, 12, "quick_gelu", 768),
            "scheduler": scheduler_config("epsilon"),
        }
    if family == "sd2":
        return {
            "unet": {**_SD_UNET_BLOCKS, "sample_size": 96, "block_out_channels": [320, 640, 1280, 1280],
                     "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                     "use_linear_projection": True, "upcast_attention": True},
            "vae": _vae_config([128, 256, 512, 512], 0.18215, 768),
            # diffusers keeps 23 of OpenCLIP-H's 24 layers: its last hidden state is the original's penultimate.
            "text_encoder": _clip_text_config(1024, 23, 16, "gelu", 512),
            "scheduler": scheduler_config("v_prediction"),
        }
    if family == "sdxl":
        return {
            "unet": {**_SDXL_UNET_BLOCKS, "sample_size": 128, "block_out_channels": [320, 640, 1280],
                     "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                     "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
                     "projection_class_embeddings_input_dim": 2816},
            "vae": {**_vae_config([128, 256, 512, 512], 0.13025, 1024), "force_upcast": True},
            "text_encoder": _clip_text_config(768, 12, 12, "quick_gelu", 768),
            "text_encoder_2": _clip_text_config(1280, 32, 20, "gelu", 1280),
            "scheduler": scheduler_config("epsilon"),
        }
    raise ValueError(f"unknown family {family!r}")


def tiny_configs(family: FamilyName) -> dict[str, dict[str, Any]]:
    """Same architectures as `standard_configs` at widths that build in seconds and step in milliseconds.

    Block counts, layers per block, attention layout and conditioning are kept, so every key mapping and
    every code path is the real one; only channel widths, depths of the text encoders and transformer
    depths shrink. SDXL's two text encoders get different widths, as in the real model (the single-file
    loaders of other tools tell them apart by width).
    """
    if family == "sd1":
        return {
            "unet": {**_SD_UNET_BLOCKS, "sample_size": 8, "block_out_channels": [32, 32, 64, 64],
                     "cross_attention_dim": 32, "attention_head_dim": 2},
            "vae": _vae_config([32, 32, 64, 64], 0.18215, 64),
            "text_encoder": _clip_text_config(32, 2, 2, "quick_gelu", 32),
            "scheduler": scheduler_config("epsilon"),
        }
    if family == "sd2":
        return {
            "unet": {**_SD_UNET_BLOCKS, "sample_size": 8, "block_out_channels": [32, 32, 64, 64],
                     "cross_attention_dim": 64, "attention_head_dim": [2, 2, 4, 4],
                     "use_linear_projection": True, "upcast_attention": True},
            "vae": _vae_config([32, 32, 64, 64], 0.18215, 64),
            "text_encoder": _clip_text_config(64, 2, 4, "gelu", 32),
            "scheduler": scheduler_config("v_prediction"),
        }
    if family == "sdxl":
        return {
            "unet": {**_SDXL_UNET_BLOCKS, "sample_size": 8, "block_out_channels": [32, 64, 64],
                     "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [2, 4, 4],
                     "cross_attention_dim": 80, "addition_time_embed_dim": 8,
                     "projection_class_embeddings_input_dim": 32 + 6 * 8},
            "vae": {**_vae_config([32, 32, 64, 64], 0.13025, 64), "force_upcast": True},
            "text_encoder": _clip_text_config(32, 3, 2, "quick_gelu", 32),
            "text_encoder_2": _clip_text_config(48, 3, 3, "gelu", 32),
            "scheduler": scheduler_config("epsilon"),
        }
    raise ValueError(f"unknown family {family!r}")
