"""Optimizer, scheduler, fused-backward and EMA flags, and the settings the training code takes from them."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
from typing import Any

from library.cli.config import add_validator, non_negative_int, positive_int
from library.models.sdxl_blocks import parse_block_lr
from library.training.ema import DEFAULT_DECAY, EMA_DEVICES, EMASettings
from library.training.fused_backward import (
    MULTI_PROCESS_MESSAGE,
    supported_optimizer_names,
    unsupported_optimizer_message,
)
from library.training.optim import SCHEDULER_NAMES, OptimizerSettings, parse_optimizer_args, parse_step_spec

logger = logging.getLogger(__name__)

# kohya's deprecated optimizer switches and the --optimizer_type each stands for
_LEGACY_OPTIMIZER_FLAGS = (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion"))


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimizer/scheduler flags training_args.py does not define (kohya's names and defaults)."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1,
                       help="cosine_with_restarts: number of restarts; cosine_with_min_lr/warmup_stable_decay: "
                            "half-cosines")
    group.add_argument("--lr_scheduler_power", type=float, default=1.0, help="polynomial decay power")
    group.add_argument("--lr_scheduler_timescale", type=int, default=None,
                       help="inverse_sqrt timescale (default: the warm-up steps, or 10000)")
    group.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                       help="cosine_with_min_lr / warmup_stable_decay: final LR as a ratio of the initial LR")
    group.add_argument("--lr_decay_steps", type=str, default="0",
                       help="warmup_stable_decay decay length: steps (100), a ratio (0.1) or a percentage (10%%)")
    group.add_argument("--lr_scheduler_type", type=str, default=None,
                       help="any scheduler class, module.Class or a torch.optim.lr_scheduler name; "
                            "arguments from --lr_scheduler_args")
    group.add_argument("--lr_scheduler_args", type=str, nargs="*", default=None,
                       help="scheduler keyword arguments as key=value, e.g. step_rules=\"1:10,0.1\"")
    group.add_argument("--use_8bit_adam", action="store_true",
                       help="deprecated: same as --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true",
                       help="deprecated: same as --optimizer_type Lion")
    add_validator(parser, _check_optimizer_flags)


def _check_optimizer_flags(args: argparse.Namespace) -> str | None:
    """Syntax checks that can run before the step counts are known."""
    try:
        _legacy_optimizer_type(args, warn=False)
        parse_optimizer_args(getattr(args, "optimizer_args", None))
        parse_optimizer_args(getattr(args, "lr_scheduler_args", None), flag="--lr_scheduler_args")
        parse_step_spec(getattr(args, "lr_warmup_steps", "0") or "0", "--lr_warmup_steps")
        parse_step_spec(getattr(args, "lr_decay_steps", "0") or "0", "--lr_decay_steps")
    except ValueError as error:
        return str(error)
    name = str(getattr(args, "lr_scheduler", None) or "constant").lower()
    if not getattr(args, "lr_scheduler_type", None) and not name.startswith("adafactor") \
            and name not in SCHEDULER_NAMES:
        close = difflib.get_close_matches(name, SCHEDULER_NAMES, n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        return f"unknown --lr_scheduler '{name}'.{hint} Known: {', '.join(SCHEDULER_NAMES)}"
    return None


def _legacy_optimizer_type(args: argparse.Namespace, warn: bool = True) -> str:
    """--use_8bit_adam / --use_lion_optimizer mapped to their --optimizer_type (default AdamW may be overridden)."""
    optimizer_type = getattr(args, "optimizer_type", None) or "AdamW"
    legacy = [(flag, target) for flag, target in _LEGACY_OPTIMIZER_FLAGS if getattr(args, flag, False)]
    if not legacy:
        return optimizer_type
    if len(legacy) > 1:
        raise ValueError("--use_8bit_adam and --use_lion_optimizer are exclusive: use --optimizer_type")
    flag, target = legacy[0]
    if optimizer_type.lower() not in ("adamw", target.lower()):
        raise ValueError(f"--{flag} conflicts with --optimizer_type {optimizer_type}: use --optimizer_type alone")
    if warn:
        logger.warning("--%s is deprecated: use --optimizer_type %s", flag, target)
    return target


def optimizer_settings_from_args(args: argparse.Namespace) -> OptimizerSettings:
    """Read the optimizer/scheduler flags (training_args' and add_optimizer_arguments') into OptimizerSettings."""
    return OptimizerSettings(
        optimizer_type=_legacy_optimizer_type(args),
        learning_rate=args.learning_rate,
        optimizer_args=parse_optimizer_args(getattr(args, "optimizer_args", None)),
        lr_scheduler=getattr(args, "lr_scheduler", None) or "constant",
        lr_warmup_steps=getattr(args, "lr_warmup_steps", None) or "0",
        lr_decay_steps=getattr(args, "lr_decay_steps", None) or "0",
        lr_scheduler_num_cycles=getattr(args, "lr_scheduler_num_cycles", 1),
        lr_scheduler_power=getattr(args, "lr_scheduler_power", 1.0),
        lr_scheduler_timescale=getattr(args, "lr_scheduler_timescale", None),
        lr_scheduler_min_lr_ratio=getattr(args, "lr_scheduler_min_lr_ratio", None),
        lr_scheduler_type=getattr(args, "lr_scheduler_type", None) or None,
        lr_scheduler_args=parse_optimizer_args(getattr(args, "lr_scheduler_args", None),
                                               flag="--lr_scheduler_args"),
    )


def add_fused_backward_arguments(parser: argparse.ArgumentParser, optimizer_groups_flag: bool = False) -> None:
    """`--fused_backward_pass` (kohya's name) and the rules that make it safe; ``optimizer_groups_flag`` adds
    kohya's --fused_optimizer_groups (sdxl_train has it), driven by the same machinery."""
    group = parser.add_argument_group("fused backward")
    group.add_argument(
        "--fused_backward_pass", action="store_true",
        help="step each parameter during backward and free its gradient at once, so the gradients of the "
             "whole model never exist together (saves the memory of a full set of gradients). Optimizers: "
             f"{', '.join(supported_optimizer_names())}. Needs --gradient_accumulation_steps 1, one process, "
             "no DeepSpeed and no fp16 mixed precision (bf16 is fine). --max_grad_norm then clips each "
             "tensor's gradient separately, not the global norm (that would need every gradient at once)")
    if optimizer_groups_flag:
        group.add_argument(
            "--fused_optimizer_groups", type=positive_int, default=None,
            help="kohya: split the parameters into N optimizers, each stepping inside backward once its gradients "
                 "are complete. Here it runs as --fused_backward_pass: every parameter steps on its own as soon as "
                 "its gradient is ready, which frees gradients at least as early and gives the same update for the "
                 "optimizers allowed (those that update each parameter from its own gradient), so N is not used; "
                 "the same limits as --fused_backward_pass apply (Prodigy/D-Adaptation are refused)")
    add_validator(parser, fused_backward_flag_error)


def fused_backward_flag_error(args: argparse.Namespace) -> str | None:
    """The first flag that conflicts with --fused_backward_pass (or --fused_optimizer_groups), or None."""
    if not uses_fused_backward(args):
        return None
    accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
    if accumulation != 1:
        return (f"--fused_backward_pass steps every parameter in each backward, so it cannot accumulate "
                f"gradients: set --gradient_accumulation_steps 1 (got {accumulation})")
    if getattr(args, "deepspeed", False):
        return "--fused_backward_pass cannot be used with --deepspeed (DeepSpeed owns the gradients and the step)"
    if getattr(args, "fsdp", False):
        return "--fused_backward_pass cannot be used with --fsdp (FSDP reduces sharded gradients after backward)"
    if getattr(args, "mixed_precision", "no") == "fp16":
        return ("--fused_backward_pass cannot be used with --mixed_precision fp16: the loss scaler must see every "
                "gradient before any parameter steps. Use --mixed_precision bf16 or no")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return MULTI_PROCESS_MESSAGE
    optimizer_type = getattr(args, "optimizer_type", None)
    for flag, name in _LEGACY_OPTIMIZER_FLAGS:
        if getattr(args, flag, False):
            optimizer_type = name
    return unsupported_optimizer_message(optimizer_type)


def uses_fused_backward(args: argparse.Namespace) -> bool:
    """--fused_backward_pass, or kohya's --fused_optimizer_groups that runs as it here."""
    return bool(getattr(args, "fused_backward_pass", False) or getattr(args, "fused_optimizer_groups", None))


def add_ema_arguments(parser: argparse.ArgumentParser) -> None:
    """EMA flags (kohya has none; names follow diffusers' --use_ema and StableCascade's beta)."""
    group = parser.add_argument_group("ema")
    group.add_argument("--use_ema", action="store_true", help="keep an exponential moving average of the weights "
                       "and save it (samples use it too)")
    group.add_argument("--ema_decay", type=float, default=None,
                       help=f"EMA decay per optimizer step (default {DEFAULT_DECAY})")
    group.add_argument("--ema_beta", type=float, default=None, help="another name for --ema_decay")
    group.add_argument("--ema_update_every", type=positive_int, default=1,
                       help="update the EMA every N optimizer steps (with decay**N, same time constant)")
    group.add_argument("--ema_start_step", type=non_negative_int, default=0,
                       help="copy the weights into the EMA until this optimizer step, average after it")
    group.add_argument("--ema_warmup", dest="ema_warmup", action="store_true", default=True,
                       help="decay = min(ema_decay, (1+t)/(10+t)) with t steps since the start (default on)")
    group.add_argument("--no_ema_warmup", dest="ema_warmup", action="store_false",
                       help="use the full decay from the first update")
    group.add_argument("--ema_device", type=str, choices=EMA_DEVICES, default="cpu",
                       help="cpu: fp32 EMA in CPU memory (saves ~10 GB of VRAM for SDXL); same: next to the weights")
    group.add_argument("--save_raw_too", action="store_true",
                       help="with --use_ema, also save the raw (non-EMA) weights next to the EMA ones")
    add_validator(parser, _check_ema_args)


def ema_settings_from_args(args: argparse.Namespace) -> EMASettings | None:
    """EMASettings from the parsed flags, or None without --use_ema (so a trainer writes `if settings:`)."""
    if not getattr(args, "use_ema", False):
        return None
    return EMASettings(
        decay=getattr(args, "ema_decay", None),
        beta=getattr(args, "ema_beta", None),
        update_every=getattr(args, "ema_update_every", 1),
        start_step=getattr(args, "ema_start_step", 0),
        warmup=getattr(args, "ema_warmup", True),
        device=getattr(args, "ema_device", "cpu"),
    )


# flag -> (namespace attribute, value meaning "not set")
_EMA_ONLY_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--ema_decay", "ema_decay", None),
    ("--ema_beta", "ema_beta", None),
    ("--ema_update_every", "ema_update_every", 1),
    ("--ema_start_step", "ema_start_step", 0),
    ("--no_ema_warmup", "ema_warmup", True),
    ("--ema_device", "ema_device", "cpu"),
    ("--save_raw_too", "save_raw_too", False),
)


def _check_ema_args(args: argparse.Namespace) -> str | None:
    if not getattr(args, "use_ema", False):
        for flag, dest, unset in _EMA_ONLY_FLAGS:
            if getattr(args, dest, unset) != unset:
                return f"{flag} requires --use_ema"
        return None
    if getattr(args, "fsdp", False) or (getattr(args, "deepspeed", False) and getattr(args, "zero_stage", 2) == 3):
        sharder = "--fsdp" if getattr(args, "fsdp", False) else "--deepspeed --zero_stage 3"
        return (f"--use_ema cannot be used with {sharder}: the average is kept of whole weights, which a sharded "
                "run does not hold; use --zero_stage 2 or DDP for EMA")
    try:
        ema_settings_from_args(args)
    except ValueError as e:
        return f"EMA flags: {e}"
    return None


def check_block_lr_flag(args: argparse.Namespace) -> str | None:
    """Parser validator: a malformed --block_lr is refused with the other flag errors, before any work."""
    try:
        text = getattr(args, "block_lr", None)
        if text:
            parse_block_lr(text)
    except ValueError as error:
        return str(error)
    return None

