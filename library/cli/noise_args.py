"""kohya's noise, timestep and loss flags, and the NoiseOptions / LossOptions they turn into."""

from __future__ import annotations

import argparse
from typing import Any

from library.cli.config import add_validator
from library.training.noise import HUBER_SCHEDULES, LOSS_TYPES, SD_NUM_TRAIN_TIMESTEPS, LossOptions, NoiseOptions


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's noise/timestep flags, names and defaults (None meaning off, as in kohya)."""
    group = parser.add_argument_group("noise")
    group.add_argument("--noise_offset", type=float, default=None,
                       help="offset noise strength (about 0.1 is common); helps very dark/bright images")
    group.add_argument("--noise_offset_random_strength", action="store_true",
                       help="use a random strength in [0, noise_offset) each step")
    group.add_argument("--adaptive_noise_scale", type=float, default=None,
                       help="add |latent mean| * this to noise_offset per channel (needs --noise_offset)")
    group.add_argument("--multires_noise_iterations", type=int, default=None,
                       help="multires (pyramid) noise levels (6-10 is common)")
    group.add_argument("--multires_noise_discount", type=float, default=0.3,
                       help="weight decay per multires level (only with --multires_noise_iterations)")
    group.add_argument("--ip_noise_gamma", type=float, default=None,
                       help="input perturbation noise strength (about 0.1 is common)")
    group.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                       help="use a random strength in [0, ip_noise_gamma) each step")
    group.add_argument("--min_timestep", type=int, default=None, help="smallest training timestep (default 0)")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="training timesteps are < this (default 1000)")
    group.add_argument("--zero_terminal_snr", action="store_true",
                       help="rescale the betas so the last timestep is pure noise (use with --v_parameterization)")
    add_validator(parser, _check_noise_args)


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's loss-type and loss-weighting flags, names and defaults."""
    group = parser.add_argument_group("loss")
    group.add_argument("--loss_type", type=str, default="l2", choices=LOSS_TYPES,
                       help="per-pixel loss; huber/smooth_l1 are kohya's pseudo-Huber forms")
    group.add_argument("--huber_schedule", type=str, default="snr", choices=HUBER_SCHEDULES,
                       help="how the huber/smooth_l1 threshold varies with the timestep")
    group.add_argument("--huber_c", type=float, default=0.1, help="huber/smooth_l1 threshold parameter")
    group.add_argument("--huber_scale", type=float, default=1.0, help="huber/smooth_l1 threshold scale")
    group.add_argument("--min_snr_gamma", type=float, default=None,
                       help="min-SNR weighting gamma (5 is the paper's value)")
    group.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation weighting")
    group.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                       help="weight a v-prediction loss like a noise-prediction loss (needs --v_parameterization)")
    group.add_argument("--v_pred_like_loss", type=float, default=None,
                       help="add a v-prediction-like loss times this (noise prediction only)")
    group.add_argument("--masked_loss", action="store_true",
                       help="weight the loss by a mask (alpha channel or conditioning image R channel)")
    add_validator(parser, _check_loss_args)


def _check_noise_args(args: argparse.Namespace) -> str | None:
    if getattr(args, "adaptive_noise_scale", None) is not None and not getattr(args, "noise_offset", None):
        return "--adaptive_noise_scale requires --noise_offset"
    low = getattr(args, "min_timestep", None)
    high = getattr(args, "max_timestep", None)
    low = 0 if low is None else low
    high = SD_NUM_TRAIN_TIMESTEPS if high is None else high
    if not 0 <= low <= high:
        return f"need 0 <= --min_timestep <= --max_timestep, got {low} and {high}"
    return None


def _check_loss_args(args: argparse.Namespace) -> str | None:
    v_pred = bool(getattr(args, "v_parameterization", False))
    if getattr(args, "scale_v_pred_loss_like_noise_pred", False) and not v_pred:
        return "--scale_v_pred_loss_like_noise_pred can be used only with --v_parameterization"
    if getattr(args, "v_pred_like_loss", None) and v_pred:
        return "--v_pred_like_loss cannot be used with --v_parameterization"
    return None


def noise_options_from_args(args: argparse.Namespace) -> NoiseOptions:
    """NoiseOptions from parsed flags; kohya's None defaults become 0 / off / 1000."""
    def value(name: str, default: Any) -> Any:
        got = getattr(args, name, None)
        return default if got is None else got

    return NoiseOptions(
        noise_offset=float(value("noise_offset", 0.0)),
        noise_offset_random_strength=bool(value("noise_offset_random_strength", False)),
        adaptive_noise_scale=getattr(args, "adaptive_noise_scale", None),
        multires_noise_iterations=int(value("multires_noise_iterations", 0)),
        multires_noise_discount=float(value("multires_noise_discount", 0.3)),
        ip_noise_gamma=float(value("ip_noise_gamma", 0.0)),
        ip_noise_gamma_random_strength=bool(value("ip_noise_gamma_random_strength", False)),
        min_timestep=int(value("min_timestep", 0)),
        max_timestep=int(value("max_timestep", SD_NUM_TRAIN_TIMESTEPS)),
        zero_terminal_snr=bool(value("zero_terminal_snr", False)),
    )


def loss_options_from_args(args: argparse.Namespace) -> LossOptions:
    """LossOptions from parsed flags; kohya's None defaults become off."""
    def value(name: str, default: Any) -> Any:
        got = getattr(args, name, None)
        return default if got is None else got

    return LossOptions(
        loss_type=str(value("loss_type", "l2")),
        huber_schedule=str(value("huber_schedule", "snr")),
        huber_c=float(value("huber_c", 0.1)),
        huber_scale=float(value("huber_scale", 1.0)),
        min_snr_gamma=getattr(args, "min_snr_gamma", None) or None,
        debiased_estimation=bool(value("debiased_estimation_loss", False)),
        scale_v_pred_loss_like_noise_pred=bool(value("scale_v_pred_loss_like_noise_pred", False)),
        v_pred_like_loss=float(value("v_pred_like_loss", 0.0)),
        masked_loss=bool(value("masked_loss", False)),
    )

