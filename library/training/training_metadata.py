"""The ``ss_*`` metadata kohya writes into trained files, which A1111's and ComfyUI's LoRA browsers show.

All values are strings (safetensors metadata is str -> str). With ``--no_metadata`` only the keys a
loader needs to understand the file remain (kohya's SS_METADATA_MINIMUM_KEYS).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections import Counter
from typing import Any, Iterable

MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def tag_frequency(captions_and_tags: Iterable[tuple[str, str | None, str | None]]) -> dict[str, dict[str, int]]:
    """{dataset dir: {tag: count}} over caption tags, as kohya's ``ss_tag_frequency``."""
    frequency: dict[str, Counter] = {}
    for folder, caption, tags in captions_and_tags:
        counter = frequency.setdefault(folder, Counter())
        for text in (caption, tags):
            for tag in (text or "").split(","):
                tag = tag.strip()
                if tag:
                    counter[tag] += 1
    return {folder: dict(counter) for folder, counter in frequency.items()}


def training_metadata(args: argparse.Namespace, *, family: str, session_id: str | None, started_at: float,
                      num_train_images: int, num_reg_images: int, batches_per_epoch: int, num_epochs: int,
                      max_train_steps: int, optimizer_description: str, network_args: dict[str, Any] | None,
                      dataset_summary: list[dict[str, Any]], tag_freq: dict[str, dict[str, int]],
                      bucket_info: dict[str, Any], resolution: tuple[int, int]) -> dict[str, str]:
    """Everything known at the start of training; `per_save_metadata` adds the step and epoch of each file."""
    model_path = str(getattr(args, "pretrained_model_name_or_path", "") or "")
    values: dict[str, Any] = {
        "ss_session_id": session_id or uuid.uuid4().hex,
        "ss_training_started_at": started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": getattr(args, "text_encoder_lr", None),
        "ss_unet_lr": getattr(args, "unet_lr", None),
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": getattr(args, "network_module", None),
        "ss_network_dim": getattr(args, "network_dim", None),
        "ss_network_alpha": getattr(args, "network_alpha", None),
        "ss_network_dropout": getattr(args, "network_dropout", None),
        "ss_network_args": json.dumps(network_args or {}),
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": getattr(args, "full_fp16", False),
        "ss_v2": family == "sd2",
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_clip_skip": getattr(args, "clip_skip", None),
        "ss_max_token_length": getattr(args, "max_token_length", None),
        "ss_cache_latents": getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False),
        "ss_seed": args.seed,
        "ss_noise_offset": getattr(args, "noise_offset", None),
        "ss_multires_noise_iterations": getattr(args, "multires_noise_iterations", None),
        "ss_multires_noise_discount": getattr(args, "multires_noise_discount", None),
        "ss_adaptive_noise_scale": getattr(args, "adaptive_noise_scale", None),
        "ss_zero_terminal_snr": getattr(args, "zero_terminal_snr", False),
        "ss_ip_noise_gamma": getattr(args, "ip_noise_gamma", None),
        "ss_min_snr_gamma": getattr(args, "min_snr_gamma", None),
        "ss_debiased_estimation": getattr(args, "debiased_estimation_loss", False),
        "ss_loss_type": getattr(args, "loss_type", None),
        "ss_training_comment": getattr(args, "training_comment", None),
        "ss_optimizer": optimizer_description,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_scale_weight_norms": getattr(args, "scale_weight_norms", None),
        "ss_prior_loss_weight": getattr(args, "prior_loss_weight", None),
        "ss_sd_model_name": os.path.basename(model_path.rstrip("/")),
        "ss_vae_name": os.path.basename(str(getattr(args, "vae", "") or "")) or None,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_datasets": json.dumps(dataset_summary),
        "ss_tag_frequency": json.dumps(tag_freq),
        "ss_bucket_info": json.dumps(bucket_info),
        "modelspec.architecture": {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
                                   "sdxl": "stable-diffusion-xl-v1-base"}[family] + "/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": args.output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started_at)),
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def per_save_metadata(base: dict[str, str], step: int, epoch: int, minimal: bool) -> dict[str, str]:
    """The metadata of one saved file: the base plus ss_steps/ss_epoch, or only the minimum with --no_metadata."""
    if minimal:
        return {k: v for k, v in base.items() if k in MINIMUM_KEYS}
    return {**base, "ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())}
