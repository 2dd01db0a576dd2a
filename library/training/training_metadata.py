"""The ``ss_*`` metadata kohya writes into trained files, which A1111's and ComfyUI's LoRA browsers show.

All values are strings (safetensors metadata is str -> str). With ``--no_metadata`` only the keys a
loader needs to understand the file remain (kohya's SS_METADATA_MINIMUM_KEYS). The ``modelspec.*`` keys
every saved file carries, with or without ``--no_metadata``, come from library.models.model_spec.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from library.models.families import ModelFamily

MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


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


@dataclass(frozen=True)
class MetadataFlags:
    """The flags kohya records in ``ss_*`` keys, as given (None: not given, or not a flag of this script)."""

    pretrained_model_name_or_path: str | None = None
    output_name: str | None = None
    learning_rate: float | None = None
    text_encoder_lr: Any = None
    unet_lr: float | None = None
    gradient_checkpointing: bool | None = None
    gradient_accumulation_steps: int | None = None
    lr_warmup_steps: str | None = None
    lr_scheduler: str | None = None
    network_module: str | None = None
    network_dim: int | None = None
    network_alpha: float | None = None
    network_dropout: float | None = None
    mixed_precision: str | None = None
    full_fp16: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    clip_skip: int | None = None
    max_token_length: int | None = None
    cache_latents: bool = False  # --cache_latents or --cache_latents_to_disk
    seed: int | None = None
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float | None = None
    adaptive_noise_scale: float | None = None
    zero_terminal_snr: bool = False
    ip_noise_gamma: float | None = None
    min_snr_gamma: float | None = None
    debiased_estimation_loss: bool = False
    loss_type: str | None = None
    training_comment: str | None = None
    max_grad_norm: float | None = None
    scale_weight_norms: float | None = None
    prior_loss_weight: float | None = None
    vae: str | None = None


def training_metadata(flags: MetadataFlags, *, family: ModelFamily, session_id: str | None, started_at: float,
                      num_train_images: int, num_reg_images: int, batches_per_epoch: int, num_epochs: int,
                      max_train_steps: int, optimizer_description: str, network_args: dict[str, Any] | None,
                      dataset_summary: list[dict[str, Any]], tag_freq: dict[str, dict[str, int]],
                      bucket_info: dict[str, Any], resolution: tuple[int, int]) -> dict[str, str]:
    """Everything known at the start of training; `per_save_metadata` adds the step and epoch of each file."""
    model_path = str(flags.pretrained_model_name_or_path or "")
    values: dict[str, Any] = {
        "ss_session_id": session_id or uuid.uuid4().hex,
        "ss_training_started_at": started_at,
        "ss_output_name": flags.output_name,
        "ss_learning_rate": flags.learning_rate,
        "ss_text_encoder_lr": flags.text_encoder_lr,
        "ss_unet_lr": flags.unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": flags.gradient_checkpointing,
        "ss_gradient_accumulation_steps": flags.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": flags.lr_warmup_steps,
        "ss_lr_scheduler": flags.lr_scheduler,
        "ss_network_module": flags.network_module,
        "ss_network_dim": flags.network_dim,
        "ss_network_alpha": flags.network_alpha,
        "ss_network_dropout": flags.network_dropout,
        "ss_network_args": json.dumps(network_args or {}),
        "ss_mixed_precision": flags.mixed_precision,
        "ss_full_fp16": flags.full_fp16,
        "ss_fp8_base": flags.fp8_base,
        "ss_fp8_base_unet": flags.fp8_base_unet,
        "ss_v2": family.kohya_v2,
        "ss_base_model_version": family.base_model_version,
        "ss_clip_skip": flags.clip_skip,
        "ss_max_token_length": flags.max_token_length,
        "ss_cache_latents": flags.cache_latents,
        "ss_seed": flags.seed,
        "ss_noise_offset": flags.noise_offset,
        "ss_multires_noise_iterations": flags.multires_noise_iterations,
        "ss_multires_noise_discount": flags.multires_noise_discount,
        "ss_adaptive_noise_scale": flags.adaptive_noise_scale,
        "ss_zero_terminal_snr": flags.zero_terminal_snr,
        "ss_ip_noise_gamma": flags.ip_noise_gamma,
        "ss_min_snr_gamma": flags.min_snr_gamma,
        "ss_debiased_estimation": flags.debiased_estimation_loss,
        "ss_loss_type": flags.loss_type,
        "ss_training_comment": flags.training_comment,
        "ss_optimizer": optimizer_description,
        "ss_max_grad_norm": flags.max_grad_norm,
        "ss_scale_weight_norms": flags.scale_weight_norms,
        "ss_prior_loss_weight": flags.prior_loss_weight,
        "ss_sd_model_name": os.path.basename(model_path.rstrip("/")),
        "ss_vae_name": os.path.basename(str(flags.vae or "")) or None,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_datasets": json.dumps(dataset_summary),
        "ss_tag_frequency": json.dumps(tag_freq),
        "ss_bucket_info": json.dumps(bucket_info),
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def per_save_metadata(base: dict[str, str], step: int, epoch: int, minimal: bool) -> dict[str, str]:
    """The metadata of one saved file: the base plus ss_steps/ss_epoch, or only the minimum with --no_metadata."""
    if minimal:
        return {k: v for k, v in base.items() if k in MINIMUM_KEYS}
    return {**base, "ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())}
