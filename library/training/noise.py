"""Noise, timesteps, training targets and loss weighting for one diffusion training step.

Everything here is a pure tensor function: no model, no module state, and the only source of randomness is
the `torch.Generator` the caller passes in. Seed it with `step_generator(seed, global_step, rank)` and a run
resumed at step N draws exactly the noise and timesteps an uninterrupted run draws at step N (kohya uses the
global torch RNG, so its resumed runs diverge).

The formulas follow kohya-ss/sd-scripts (library/train_util.py `get_noise_noisy_latents_and_timesteps`,
`get_huber_threshold_if_needed`, `conditional_loss`; library/custom_train_functions.py `apply_noise_offset`,
`pyramid_noise_like`, `apply_snr_weight`, `get_snr_scale`, `add_v_prediction_like_loss`,
`apply_debiased_estimation`, `apply_masked_loss`, `fix_noise_scheduler_betas_for_zero_terminal_snr`) so that
a kohya command line trains the same objective here. Where kohya produces inf/nan (SNR = 0 under zero
terminal SNR) or silently ignores a flag, we differ; each such place says so in its docstring.

Draw order (a contract: changing it changes every seeded run):
  sample_noise:     base gaussian (B,C,H,W) -> [offset strength U(0,1) (1,)] -> [offset gaussian (B,C,1,1)]
                    -> [per multires iteration: ratio U(0,1) (1,), gaussian (B,C,h_i,w_i)]
  sample_timesteps: integers (B,)
  add_noise:        [ip strength U(0,1) (1,)] -> [perturbation gaussian (B,C,H,W)]
All draws happen on `generator.device` in float32 and are then moved to the latents' device and dtype, so a
CPU generator gives the same numbers whatever device trains.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
LOSS_TYPES: tuple[str, ...] = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES: tuple[str, ...] = ("constant", "exponential", "snr")

# Stable Diffusion's training schedule (kohya's SCHEDULER_LINEAR_START/END/TIMESTEPS, scaled_linear).
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_NUM_TRAIN_TIMESTEPS = 1000

# kohya clamps SNR to 1000 in get_snr_scale / apply_debiased_estimation because SNR(t=0) ~ 1175 for SD.
SNR_MAX = 1000.0
# Our lower clamp, for the weights that divide by SNR: under zero terminal SNR, SNR(999) = 0 and kohya's
# weights become inf. SD's normal schedule never reaches it (its smallest SNR is ~0.0047), so without
# --zero_terminal_snr the weights equal kohya's exactly.
SNR_MIN = 1e-3


# --------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseOptions:
    """How the noise and timesteps of a step are drawn (kohya's noise flags, 0/False meaning off)."""

    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = SD_NUM_TRAIN_TIMESTEPS
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be >= 0, got {self.noise_offset}")
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            # kohya's verify_training_args rule: the adaptive term is added to the offset, so it needs one.
            raise ValueError("adaptive_noise_scale requires noise_offset")
        if self.multires_noise_iterations < 0:
            raise ValueError(f"multires_noise_iterations must be >= 0, got {self.multires_noise_iterations}")
        if self.ip_noise_gamma < 0:
            raise ValueError(f"ip_noise_gamma must be >= 0, got {self.ip_noise_gamma}")
        if not 0 <= self.min_timestep <= self.max_timestep:
            raise ValueError(f"need 0 <= min_timestep <= max_timestep, got {self.min_timestep}, {self.max_timestep}")


@dataclass(frozen=True)
class LossOptions:
    """How the per-pixel loss is computed and how each sample is weighted (kohya's loss flags)."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0
    masked_loss: bool = False

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"huber_schedule must be one of {HUBER_SCHEDULES}, got {self.huber_schedule!r}")
        if self.huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {self.huber_c}")
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or None/0 for off), got {self.min_snr_gamma}")
        if self.v_pred_like_loss < 0:
            raise ValueError(f"v_pred_like_loss must be >= 0, got {self.v_pred_like_loss}")


def step_generator(seed: int, global_step: int, rank: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, rank) only, so resuming at a step replays that step's draws.

    The three numbers are hashed (not summed) so that (step 1, rank 0) and (step 0, rank 1) differ.
    """
    digest = hashlib.sha256(f"{seed}:{global_step}:{rank}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


# --------------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------------


def _betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """Betas exactly as diffusers' DDPMScheduler builds them (float32), for the schedules SD uses."""
    trained = config.get("trained_betas")
    if trained is not None:
        return torch.as_tensor(trained, dtype=torch.float32)
    n = int(config.get("num_train_timesteps", SD_NUM_TRAIN_TIMESTEPS))
    start = float(config.get("beta_start", SD_BETA_START))
    end = float(config.get("beta_end", SD_BETA_END))
    kind = config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    raise ValueError(f"unsupported beta_schedule {kind!r}; expected 'scaled_linear' or 'linear' (or trained_betas)")


def rescale_betas_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alphas_cumprod) so the last one is 0 and the first kept.

    Same computation as diffusers' `rescale_zero_terminal_snr` and kohya's `enforce_zero_terminal_snr`
    (written here because diffusers keeps it inside a scheduler module rather than its public API).
    """
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def noise_schedule(schedule: Mapping[str, Any] | torch.Tensor | None = None,
                   zero_terminal_snr: bool = False) -> torch.Tensor:
    """alphas_cumprod (float32, one per training timestep) from a scheduler config, or betas, or SD's default.

    `schedule` may be a diffusers scheduler config (`scheduler.config`; its `rescale_betas_zero_snr` is
    honoured), a 1-D betas tensor, or None for SD's scaled_linear 0.00085..0.012 over 1000 steps.
    With zero terminal SNR the last entry is exactly 0.
    """
    if schedule is None:
        betas = _betas_from_config({})
    elif isinstance(schedule, torch.Tensor):
        betas = schedule.detach().to(torch.float32).flatten()
    else:
        betas = _betas_from_config(schedule)
        zero_terminal_snr = zero_terminal_snr or bool(schedule.get("rescale_betas_zero_snr", False))
    if zero_terminal_snr:
        betas = rescale_betas_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] as float32 on the timesteps' device."""
    return alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep; 0 at a zero-terminal-SNR end."""
    ab = _at(alphas_cumprod, timesteps)
    return ab / (1.0 - ab)


# --------------------------------------------------------------------------------------------------------
# Noise, timesteps, noisy input, target
# --------------------------------------------------------------------------------------------------------


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _rand1(generator: torch.Generator) -> torch.Tensor:
    return torch.rand((1,), generator=generator, device=generator.device, dtype=torch.float32)


def _offset_noise(latents: torch.Tensor, options: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """Per-(B,C) constant shift (Cross Labs' offset noise) so the model can learn overall brightness.

    kohya: strength = noise_offset (x U(0,1), one draw per batch, with random strength); with an adaptive
    scale the strength becomes clamp(strength + adaptive * |mean_HW(latents)|, min=0) per (B,C).
    """
    b, c = latents.shape[:2]
    strength: torch.Tensor | float = options.noise_offset
    if options.noise_offset_random_strength:
        strength = _rand1(generator) * options.noise_offset
    offset = _randn((b, c, 1, 1), generator)
    if options.adaptive_noise_scale is not None:
        latent_mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().to(offset.device)
        strength = torch.clamp(strength + options.adaptive_noise_scale * latent_mean, min=0.0)
    return strength * offset


def _pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator) -> torch.Tensor:
    """kohya's multires (pyramid) noise: add bilinear upsamples of ever coarser gaussians, then rescale.

    Iteration i draws a ratio r in [2, 4) and adds upsample(N(0,1) at (H/r^i, W/r^i)) * discount^i (i = 0
    adds one more full-resolution gaussian, as in kohya); it stops after the 1-pixel level. The sum is
    divided by its std over the whole batch. kohya draws r from Python's `random`; we use the generator.
    """
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = float(_rand1(generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        coarse = _randn((b, c, hn, wn), generator)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_noise(latents: torch.Tensor, options: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """The noise of one step: gaussian, plus offset noise, then multires, in kohya's order."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    noise = _randn(tuple(latents.shape), generator)
    if options.noise_offset:
        noise = noise + _offset_noise(latents, options, generator)
    if options.multires_noise_iterations:
        noise = _pyramid_noise(noise, options.multires_noise_iterations, options.multires_noise_discount, generator)
    return noise.to(device=latents.device, dtype=latents.dtype)


def sample_timesteps(batch_size: int, options: NoiseOptions, generator: torch.Generator,
                     device: str | torch.device | None = None) -> torch.Tensor:
    """Integer timesteps uniform in [min_timestep, max_timestep); all equal to max_timestep when min == max.

    The min == max case mirrors kohya's `get_timesteps` (it lets one train a single timestep).
    """
    if options.min_timestep < options.max_timestep:
        t = torch.randint(options.min_timestep, options.max_timestep, (batch_size,), generator=generator,
                          device=generator.device)
    else:
        t = torch.full((batch_size,), options.max_timestep, device=generator.device)
    return t.long().to(device if device is not None else generator.device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) in `like`'s dtype and device, to broadcast over a batch."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
              options: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """The noisy model input x_t = sqrt(ab) x0 + sqrt(1 - ab) (noise + gamma * perturbation).

    Input perturbation (Ning et al. 2023, kohya's --ip_noise_gamma) changes only this input; the training
    target keeps the unperturbed `noise`. gamma is one U(0, ip_noise_gamma) draw per batch with random
    strength, as in kohya. The coefficients are computed in float32 and cast to the latents' dtype.
    """
    if options.ip_noise_gamma:
        strength: torch.Tensor | float = options.ip_noise_gamma
        if options.ip_noise_gamma_random_strength:
            strength = _rand1(generator) * options.ip_noise_gamma
        perturbation = strength * _randn(tuple(latents.shape), generator)
        noise = noise + perturbation.to(device=noise.device, dtype=noise.dtype)
    ab = _at(alphas_cumprod, timesteps)
    return _per_sample(ab.sqrt(), latents) * latents + _per_sample((1.0 - ab).sqrt(), latents) * noise


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity v = sqrt(ab) noise - sqrt(1-ab) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        ab = _at(alphas_cumprod, timesteps)
        return _per_sample(ab.sqrt(), latents) * noise - _per_sample((1.0 - ab).sqrt(), latents) * latents
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# --------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
                 options: LossOptions) -> torch.Tensor:
    """Per-sample (B,) float32 weight: the product of the enabled SNR-based rules, in kohya's order.

    - min-SNR-gamma (Hang et al. 2023): eps min(snr, g)/snr, written min(1, g/snr) so that snr = 0 gives 1
      (the limit) instead of kohya's 0/0 = nan; v-pred min(snr, g)/(snr + 1) (0 at snr = 0, finite).
    - scale_v_pred_loss_like_noise_pred (v-pred only): s/(s + 1), s = min(snr, 1000).
    - v_pred_like_loss k (eps only): kohya's loss + loss/scale*k, i.e. x (1 + k (s + 1)/s), s = snr clamped
      to [1e-3, 1000] (kohya: upper clamp only, so inf at snr = 0).
    - debiased estimation (Yu et al. 2023): eps 1/sqrt(s), s clamped to [1e-3, 1000] (kohya: upper clamp
      only); v-pred 1/(s + 1), s = min(snr, 1000) (the v-pred form of kohya PR #1715 / issue #1058, which
      older kohya lacks: it used 1/sqrt(snr) for v-pred too; 1 at snr = 0).
    The rules are multiplicative, so their order does not change the product.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    v_pred = prediction_type == "v_prediction"
    if options.scale_v_pred_loss_like_noise_pred and not v_pred:
        raise ValueError("scale_v_pred_loss_like_noise_pred needs v_prediction (--v_parameterization)")
    if options.v_pred_like_loss and v_pred:
        raise ValueError("v_pred_like_loss cannot be used with v_prediction (--v_parameterization)")

    s = snr(timesteps, alphas_cumprod)
    weight = torch.ones_like(s)
    if options.min_snr_gamma:
        gamma = float(options.min_snr_gamma)
        if v_pred:
            weight = weight * torch.clamp(s, max=gamma) / (s + 1.0)
        else:
            weight = weight * torch.clamp(gamma / s, max=1.0)
    if options.scale_v_pred_loss_like_noise_pred:
        capped = torch.clamp(s, max=SNR_MAX)
        weight = weight * capped / (capped + 1.0)
    if options.v_pred_like_loss:
        clamped = torch.clamp(s, min=SNR_MIN, max=SNR_MAX)
        weight = weight * (1.0 + options.v_pred_like_loss * (clamped + 1.0) / clamped)
    if options.debiased_estimation:
        if v_pred:
            weight = weight / (torch.clamp(s, max=SNR_MAX) + 1.0)
        else:
            weight = weight * torch.clamp(s, min=SNR_MIN, max=SNR_MAX).rsqrt()
    return weight


def huber_c(timesteps: torch.Tensor, options: LossOptions, alphas_cumprod: torch.Tensor | None = None,
            num_train_timesteps: int | None = None) -> torch.Tensor:
    """Per-sample (B,) threshold c of the huber / smooth_l1 losses, per kohya's `get_huber_threshold_if_needed`.

    - constant:    huber_c * huber_scale
    - exponential: huber_scale * huber_c ** (t / N)   (kohya: exp(-alpha t), alpha = -ln(huber_c) / N)
    - snr:         huber_scale * ((1 - huber_c) / (1 + sigma)^2 + huber_c), sigma = sqrt((1 - ab) / ab)
    Deviation: kohya ignores huber_scale under 'snr'; we apply it there too (same result at the default 1.0)
    so the flag never silently does nothing. Under zero terminal SNR sigma = inf and 'snr' gives huber_c.
    """
    t = timesteps.long()
    if options.huber_schedule == "constant":
        return torch.full(t.shape, options.huber_c * options.huber_scale, dtype=torch.float32, device=t.device)
    if options.huber_schedule == "exponential":
        if num_train_timesteps is None:
            num_train_timesteps = len(alphas_cumprod) if alphas_cumprod is not None else SD_NUM_TRAIN_TIMESTEPS
        alpha = -math.log(options.huber_c) / num_train_timesteps
        return torch.exp(-alpha * t.float()) * options.huber_scale
    if alphas_cumprod is None:
        raise ValueError("huber_schedule 'snr' needs alphas_cumprod")
    ab = _at(alphas_cumprod, t)
    sigmas = ((1.0 - ab) / ab).sqrt()
    return ((1.0 - options.huber_c) / (1.0 + sigmas) ** 2 + options.huber_c) * options.huber_scale


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | float | None = None) -> torch.Tensor:
    """Unreduced loss, as kohya's `conditional_loss(..., reduction="none")`.

    l2 d^2; l1 |d|; huber 2c (sqrt(d^2 + c^2) - c); smooth_l1 2 (sqrt(d^2 + c^2) - c), with d = pred - target
    and c per sample ((B,) tensor) or a float. Both "huber" kinds are pseudo-Huber (smooth everywhere), not
    torch's piecewise Huber / SmoothL1: kohya's names, kohya's formulas.
    """
    diff = pred - target
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c")
    c = _per_sample(huber_c, diff) if isinstance(huber_c, torch.Tensor) else huber_c
    pseudo = torch.sqrt(diff**2 + c**2) - c
    return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (B,1,h,w) or (B,h,w) mask in [0,1] area-averaged to (B,1,*size), as kohya's apply_masked_loss does."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, h, w) or (B, h, w), got shape {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=tuple(size), mode="area")


def training_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                  prediction_type: str, options: LossOptions, mask: torch.Tensor | None = None,
                  sample_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar loss to backpropagate, weighted per-sample losses (B,)), in kohya's train_network order.

    elementwise loss (float32) -> x mask -> mean over C,H,W -> x sample_weights (e.g. prior_loss_weight of
    regularisation images) -> x loss_weights -> mean over the batch.
    Masked loss follows kohya: the loss is multiplied by the area-resized mask and then averaged over ALL
    pixels, not normalised by the mask's area, so a sample whose mask covers half the image contributes
    half the loss of an unmasked one. A mask is applied whenever one is given (kohya applies alpha masks
    even without --masked_loss); options.masked_loss without a mask is an error, not a silent no-op.
    """
    pred, target = pred.float(), target.float()
    threshold = None
    if options.loss_type in ("huber", "smooth_l1"):
        threshold = huber_c(timesteps, options, alphas_cumprod).to(pred.device)
    loss = elementwise_loss(pred, target, options.loss_type, threshold)
    if mask is not None:
        loss = loss * resize_mask(mask, tuple(loss.shape[-2:])).to(loss.device)
    elif options.masked_loss:
        raise ValueError("masked_loss is on but this batch has no mask (enable --alpha_mask or give "
                         "conditioning/mask images)")
    per_sample = loss.mean(dim=tuple(range(1, loss.ndim)))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, torch.float32)
    per_sample = per_sample * loss_weights(timesteps, alphas_cumprod, prediction_type, options).to(per_sample.device)
    return per_sample.mean(), per_sample
