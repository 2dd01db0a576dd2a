"""DeepSpeed and DDP flags, and the AcceleratorOptions every script builds its Accelerator from."""

from __future__ import annotations

import argparse
from dataclasses import fields

from library.cli.config import add_validator
from library.cli.training_args import attention_flag_in_use
from library.training.accelerate_utils import OFFLOAD_DEVICES, ZERO_STAGES, AcceleratorOptions, deepspeed_flag_error


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
                       help="DeepSpeed: build models partitioned with deepspeed.zero.Init (ZeRO stage 3 only)")
    group.add_argument("--zero3_save_16bit_model", action="store_true",
                       help="DeepSpeed: gather the 16-bit weights when saving (needed to save under ZeRO stage 3)")
    group.add_argument("--fp16_master_weights_and_gradients", action="store_true",
                       help="DeepSpeed: keep master weights and gradients in fp16 (needs --mixed_precision fp16 "
                            "and --offload_optimizer_device cpu)")
    group.add_argument("--ddp_timeout", type=int, default=None,
                       help="minutes before a stuck collective aborts (default: torch's, 30 min for gloo)")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true",
                       help="DDP gradient_as_bucket_view: gradients alias the all-reduce buckets (saves memory)")
    group.add_argument("--ddp_static_graph", action="store_true",
                       help="DDP static_graph: the set of used parameters never changes between steps")
    add_validator(parser, _check_deepspeed_flags)


def _check_deepspeed_flags(args: argparse.Namespace) -> str | None:
    return deepspeed_flag_error(accelerator_options_from_args(args))


def accelerator_options_from_args(args: argparse.Namespace) -> AcceleratorOptions:
    """The Accelerator's options from the parsed flags; a flag this parser lacks keeps the option's default."""
    defaults = AcceleratorOptions()
    values = {f.name: getattr(args, f.name, getattr(defaults, f.name)) for f in fields(AcceleratorOptions)}
    if "xformers" in values:  # --xformers next to --mem_eff_attn is not used (kohya's order), so needs no CUDA
        values["xformers"] = attention_flag_in_use(args) == "xformers"
    return AcceleratorOptions(**values)
