"""DeepSpeed, FSDP and DDP flags, and the AcceleratorOptions every script builds its Accelerator from."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Callable

from library.cli.config import add_validator
from library.cli.training_args import attention_flag_in_use
from library.training.accelerate_utils import (
    OFFLOAD_DEVICES,
    ZERO_STAGES,
    AcceleratorOptions,
    deepspeed_flag_error,
    fsdp_flag_error,
)
from library.training.fsdp_setup import FSDP_BLOCK_CLASSES, FSDP_SHARDING_STRATEGIES, launcher_uses_fsdp


def add_accelerate_arguments(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed and DDP flags (kohya's names and defaults); the rest build_accelerator reads is in training_args."""
    group = parser.add_argument_group("distributed")
    group.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed ZeRO (Linux)")
    group.add_argument("--zero_stage", type=int, choices=ZERO_STAGES, default=2,
                       help="DeepSpeed ZeRO stage: 1 partitions optimizer states, 2 also gradients, 3 also weights")
    group.add_argument("--offload_optimizer_device", type=str, choices=OFFLOAD_DEVICES, default=None,
                       help="DeepSpeed: keep optimizer states on cpu or nvme (ZeRO stage 1-3)")
    group.add_argument("--offload_optimizer_nvme_path", type=str, default=None,
                       help="DeepSpeed: folder for --offload_optimizer_device nvme")
    group.add_argument("--offload_param_device", type=str, choices=OFFLOAD_DEVICES, default=None,
                       help="DeepSpeed: keep parameters on cpu or nvme (ZeRO stage 3 only)")
    group.add_argument("--offload_param_nvme_path", type=str, default=None,
                       help="DeepSpeed: folder for --offload_param_device nvme")
    group.add_argument("--zero3_init_flag", action="store_true",
                       help="kohya's flag, refused: models built partitioned with deepspeed.zero.Init break the frozen text "
                            "encoders; ZeRO-3 partitions what trains without it")
    group.add_argument("--zero3_save_16bit_model", action="store_true",
                       help="DeepSpeed: gather the 16-bit weights when saving (needed to save under ZeRO stage 3)")
    group.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                       help="DeepSpeed: keep master weights and gradients in fp16 (needs --mixed_precision fp16 "
                            "and --offload_optimizer_device cpu)")
    group.add_argument("--fsdp", action="store_true",
                       help="shard the trained models with PyTorch FSDP2 through accelerate (train_sdxl.py, "
                            "train_controlnet.py); a launcher config with distributed_type: FSDP turns it on too")
    group.add_argument("--fsdp_sharding_strategy", type=str.upper, choices=FSDP_SHARDING_STRATEGIES, default=None,
                       help="FSDP: FULL_SHARD (default) frees each block's gathered weights after its forward; "
                            "SHARD_GRAD_OP keeps them until backward (faster, more memory)")
    group.add_argument("--fsdp_offload_params", action="store_true", default=None,
                       help="FSDP: keep the sharded parameters, gradients and optimizer states in CPU memory")
    group.add_argument("--fsdp_transformer_layer_cls_to_wrap", type=str, default=None,
                       help="FSDP: extra comma-separated module classes that become their own FSDP unit (always: "
                            f"{', '.join(FSDP_BLOCK_CLASSES)} and each trained model)")
    group.add_argument("--ddp_timeout", type=int, default=None,
                       help="minutes before a stuck collective aborts (default: torch's, 30 min for gloo)")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                       help="DDP gradient_as_bucket_view: gradients alias the all-reduce buckets (saves memory)")
    group.add_argument("--ddp_static_graph", action="store_true",
                       help="DDP static_graph: the set of used parameters never changes between steps")
    add_validator(parser, _check_deepspeed_flags)


def _check_deepspeed_flags(args: argparse.Namespace) -> str | None:
    options = accelerator_options_from_args(args)
    return deepspeed_flag_error(options) or fsdp_flag_error(options)


def fsdp_refused(script: str) -> "Callable[[argparse.Namespace], str | None]":
    """A validator for scripts FSDP does not apply to (``--fsdp``, or a launcher that enabled FSDP)."""

    def check(args: argparse.Namespace) -> str | None:
        if getattr(args, "fsdp", False) or launcher_uses_fsdp():
            return (f"--fsdp (or a launcher config with distributed_type: FSDP) cannot be used with {script}: it "
                    "shards fully trained models; train a network with DDP or --deepspeed --zero_stage 2|3")
        return None

    return check


def accelerator_options_from_args(args: argparse.Namespace) -> AcceleratorOptions:
    """The Accelerator's options from the parsed flags; a flag this parser lacks keeps the option's default."""
    defaults = AcceleratorOptions()
    values = {f.name: getattr(args, f.name, getattr(defaults, f.name)) for f in fields(AcceleratorOptions)}
    values["fsdp"] = bool(values["fsdp"]) or launcher_uses_fsdp()
    if "xformers" in values:  # --xformers next to --mem_eff_attn is not used (kohya's order), so needs no CUDA
        values["xformers"] = attention_flag_in_use(args) == "xformers"
    return AcceleratorOptions(**values)
