"""`--pretrained_model_name_or_path` and the flags that say how the base model reads prompts."""

from __future__ import annotations

import argparse
from typing import Any

from library.cli.config import add_validator
from library.models.families import CLI_FAMILY_CHOICES as FAMILY_CHOICES

TOKEN_CHUNK = 75  # tokens per CLIP chunk without BOS/EOS; --max_token_length is a multiple of it


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which base model to load and how its text encoders read prompts."""
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="base model: a diffusers folder, a single .safetensors/.ckpt file, or a hub id")
    group.add_argument("--vae", type=str, default=None, help="VAE to use instead of the model's own")
    group.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    group.add_argument("--v_parameterization", action="store_true",
                       help="train with v-prediction (SD 2.x 768-v models)")
    group.add_argument("--family", type=str, choices=FAMILY_CHOICES, default=None,
                       help="model family; default: detected from the checkpoint")
    group.add_argument("--clip_skip", type=int, default=None,
                       help="use the output of the n-th last text-encoder layer (2 for many anime models)")
    group.add_argument("--max_token_length", type=int, default=None,
                       help="prompt length in tokens, a multiple of 75 (75, 150, 225, ...); default 75")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None,
                       help="accepted for compatibility with kohya; tokenizers are bundled and never downloaded")
    group.add_argument("--no_half_vae", action="store_true",
                       help="keep the VAE in fp32 under mixed precision (the SDXL VAE overflows in fp16)")
    add_validator(parser, _check_max_token_length)
    add_memory_arguments(parser)


def _check_max_token_length(args: argparse.Namespace) -> str | None:
    value = getattr(args, "max_token_length", None)
    if value is None or (value > 0 and value % TOKEN_CHUNK == 0):
        return None
    return (f"--max_token_length must be a positive multiple of {TOKEN_CHUNK} (75, 150, 225, 300, ...), "
            f"got {value}")



def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's model-loading memory switches, with what each does here."""
    group = parser.add_argument_group("model memory")
    group.add_argument("--lowram", action="store_true",
                       help="accepted for kohya configs, changes nothing here: kohya loads the checkpoint straight "
                            "into VRAM for machines with less RAM than VRAM (Colab, Kaggle); this trainer always "
                            "builds the model in RAM and then moves it to the device (loading straight to the "
                            "device is not implemented)")
    group.add_argument("--highvram", action="store_true",
                       help="accepted for kohya configs, changes nothing here: kohya uses it to stop emptying the "
                            "CUDA cache after each latent-caching batch; this trainer never empties the CUDA cache, "
                            "so it always runs as kohya does with --highvram")
    group.add_argument("--disable_mmap_load_safetensors", action="store_true",
                       help="read a single-file .safetensors base model whole into memory instead of memory-mapping "
                            "it (faster on WSL, as in kohya); diffusers folders load as diffusers does")
    group.add_argument("--diffusers_xformers", action="store_true",
                       help="xformers attention in the VAE only (kohya's sdxl_train: its own UNet ignores the flag); "
                            "--xformers puts it in the UNet and the VAE. Needs CUDA and the xformers package")
    add_validator(parser, _check_diffusers_xformers)


def _check_diffusers_xformers(args: argparse.Namespace) -> str | None:
    if not getattr(args, "diffusers_xformers", False):
        return None
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "--diffusers_xformers needs a CUDA GPU (xformers has no CPU kernels): drop the flag"
    if importlib.util.find_spec("xformers") is None:
        return "--diffusers_xformers needs the xformers package: pip install xformers, or drop the flag"
    from library.training.xformers_probe import xformers_unusable_reason

    reason = xformers_unusable_reason("cuda")
    return None if reason is None else f"--diffusers_xformers {reason.replace('use --sdpa', 'drop the flag')}"


def apply_diffusers_xformers(args: argparse.Namespace, model: Any, attention: str) -> str:
    """--diffusers_xformers: xformers in the VAE (the UNet keeps ``attention``); returns the attention summary."""
    if not getattr(args, "diffusers_xformers", False) or attention == "xformers":
        return attention
    model.vae.enable_xformers_memory_efficient_attention()
    return f"{attention} (VAE: xformers)"
