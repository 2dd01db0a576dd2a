"""kohya's --fp8_base / --fp8_base_unet: the frozen base model's weights stored in float8_e4m3fn.

kohya's network scripts (train_network.py, sdxl_train_network.py) implement both; its other scripts accept
--fp8_base (train_util.add_training_arguments) and ignore it. Here the scripts that train the base model or a
ControlNet refuse it with one line instead of ignoring it.
"""

from __future__ import annotations

import argparse

from library.cli.config import add_validator
from library.models.fp8_weights import Fp8BaseOptions, fp8_unavailable_reason


def add_fp8_arguments(parser: argparse.ArgumentParser, *, frozen_base: bool) -> None:
    """``frozen_base``: the script trains a network on a frozen base (both flags work); otherwise --fp8_base is
    accepted for kohya configs and refused with the reason (kohya's scripts of that kind ignore it)."""
    group = parser.add_argument_group("fp8 base weights")
    if not frozen_base:
        group.add_argument("--fp8_base", action="store_true",
                           help="refused by this script: the frozen-base float8 storage is for networks "
                                "(train_network.py); kohya's script of this kind accepts the flag and ignores it")
        add_validator(parser, _refuse_here)
        return
    group.add_argument("--fp8_base", action="store_true",
                       help="store the frozen U-Net's and text encoders' Linear/Conv2d weights in float8_e4m3fn "
                            "(half of bf16's bytes), upcast layer by layer to the --mixed_precision dtype in the "
                            "forward; biases, norms and embeddings stay in that dtype. Needs --mixed_precision "
                            "fp16 or bf16")
    group.add_argument("--fp8_base_unet", action="store_true",
                       help="as --fp8_base for the U-Net only; the text encoders stay in the --mixed_precision "
                            "dtype (kohya's meaning, also when given together with --fp8_base)")
    add_validator(parser, _check_fp8_base)


def _flag_in_use(args: argparse.Namespace) -> str | None:
    if getattr(args, "fp8_base_unet", False):
        return "--fp8_base_unet"
    return "--fp8_base" if getattr(args, "fp8_base", False) else None


def _refuse_here(args: argparse.Namespace) -> str | None:
    if not getattr(args, "fp8_base", False):
        return None
    return ("--fp8_base is implemented for networks trained on a frozen base model (train_network.py); this "
            "script does not store its base model in float8 (kohya's script of this kind accepts the flag and "
            "ignores it): drop it")


def _check_fp8_base(args: argparse.Namespace) -> str | None:
    flag = _flag_in_use(args)
    if flag is None:
        return None
    unavailable = fp8_unavailable_reason()
    if unavailable is not None:
        return f"{flag} needs torch.float8_e4m3fn: {unavailable}; install torch 2.1 or newer, or drop {flag}"
    if getattr(args, "mixed_precision", "no") not in ("fp16", "bf16"):
        return (f"{flag} needs --mixed_precision fp16 or bf16 (kohya's rule): the float8 weights are upcast to that "
                f"dtype in the forward (got --mixed_precision {getattr(args, 'mixed_precision', None)})")
    return None


def fp8_options_from_args(args: argparse.Namespace) -> Fp8BaseOptions:
    """kohya's rule: either flag puts the U-Net in float8; the text encoders only with --fp8_base alone."""
    fp8_unet = bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False))
    return Fp8BaseOptions(unet=fp8_unet, text_encoders=fp8_unet and not getattr(args, "fp8_base_unet", False))
