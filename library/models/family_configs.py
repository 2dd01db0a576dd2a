"""Diffusers component configs of each family's standard (full-size) release and of its tiny test model.

The standard configs let a foreign single-file checkpoint (an A1111/ComfyUI download) be built without
reaching a model hub; the tiny ones keep every key mapping and code path real at widths that build in
seconds. Keyed by family name (`library.models.families` reaches them through ``ModelFamily``).
"""

from __future__ import annotations

from typing import Any


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


def standard_configs(family: str) -> dict[str, dict[str, Any]]:
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


def tiny_configs(family: str) -> dict[str, dict[str, Any]]:
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
