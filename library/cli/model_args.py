"""`--pretrained_model_name_or_path` and the flags that say how the base model reads prompts."""

from __future__ import annotations

import argparse

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


def _check_max_token_length(args: argparse.Namespace) -> str | None:
    value = getattr(args, "max_token_length", None)
    if value is None or (value > 0 and value % TOKEN_CHUNK == 0):
        return None
    return (f"--max_token_length must be a positive multiple of {TOKEN_CHUNK} (75, 150, 225, 300, ...), "
            f"got {value}")

