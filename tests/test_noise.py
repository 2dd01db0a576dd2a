"""library/noise.py against hand-computed numbers on tiny tensors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.cli import config as cfg
from library.cli.data_args import add_dataset_arguments
from library.cli.model_args import add_model_arguments
from library.cli.noise_args import add_loss_arguments, add_noise_arguments, loss_options_from_args, noise_options_from_args
from library.cli.training_args import add_training_arguments
from library.training.noise import (
    LossOptions,
    NoiseOptions,
    add_noise,
    elementwise_loss,
    huber_c,
    loss_weights,
    noise_schedule,
    resize_mask,
    sample_noise,
    sample_timesteps,
    snr,
    step_generator,
    training_loss,
    training_target,
)

# A toy schedule whose SNRs are round numbers: ab/(1-ab) = 4, 1, 0.25, 0.
TOY_AB = torch.tensor([0.8, 0.5, 0.2, 0.0])
T4 = torch.arange(4)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: list[float] | float, rel: float = 1e-5, abs_: float = 1e-6) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double(), expected_t, rtol=rel, atol=abs_), (actual, expected_t)


# ---------------------------------------------------------------------------------------------- schedule


def _sd_alphas_cumprod_by_hand(n: int = 1000) -> list[float]:
    """scaled_linear: beta_i = (sqrt(b0) + i (sqrt(b1) - sqrt(b0)) / (n-1))^2, ab_t = prod (1 - beta_i)."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    out, acc = [], 1.0
    for i in range(n):
        acc *= 1.0 - (lo + i * (hi - lo) / (n - 1)) ** 2
        out.append(acc)
    return out


def test_default_schedule_is_sd_scaled_linear():
    ab = noise_schedule()
    by_hand = _sd_alphas_cumprod_by_hand()
    assert ab.shape == (1000,) and ab.dtype == torch.float32
    assert ab[0].item() == pytest.approx(0.99915, rel=1e-6)  # 1 - 0.00085
    assert ab[1].item() == pytest.approx(by_hand[1], rel=1e-6)
    assert ab[500].item() == pytest.approx(by_hand[500], rel=1e-4)
    assert ab[999].item() == pytest.approx(by_hand[999], rel=1e-3)
    assert ab[999].item() == pytest.approx(0.004660, abs=2e-5)  # SD's well-known terminal alpha_bar
    # a scheduler config dict gives the same; SNR(0) ~ 1175 > 1000 is why kohya clamps SNR at 1000
    cfg_ab = noise_schedule({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                             "num_train_timesteps": 1000})
    assert torch.equal(cfg_ab, ab)
    assert snr(torch.tensor([0]), ab).item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)


def test_linear_config_and_betas_tensor():
    ab = noise_schedule({"beta_start": 0.1, "beta_end": 0.3, "beta_schedule": "linear", "num_train_timesteps": 3})
    close(ab, [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7])
    close(noise_schedule(torch.tensor([0.5, 0.5])), [0.5, 0.25])
    with pytest.raises(ValueError, match="beta_schedule"):
        noise_schedule({"beta_schedule": "squaredcos_cap_v2"})


def test_zero_terminal_snr_schedule():
    from diffusers import DDPMScheduler

    ab = noise_schedule(None, zero_terminal_snr=True)
    assert ab[-1].item() == 0.0
    assert snr(torch.tensor([999]), ab).item() == 0.0
    assert ab[0].item() == pytest.approx(0.99915, rel=1e-5)  # the first value is kept
    assert bool((ab[1:] < ab[:-1]).all())
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              rescale_betas_zero_snr=True).alphas_cumprod
    assert torch.allclose(ab, reference, rtol=1e-5, atol=1e-7)
    # a config that asks for it is honoured without the flag
    assert noise_schedule({"rescale_betas_zero_snr": True})[-1].item() == 0.0


def test_snr_values():
    close(snr(T4, TOY_AB), [4.0, 1.0, 0.25, 0.0])


# ------------------------------------------------------------------------------ noisy input and target


def test_add_noise_and_targets_by_hand():
    ab = torch.tensor([0.64])  # sqrt 0.8, sqrt(1 - ab) 0.6
    t = torch.tensor([0])
    x0 = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    noise = torch.tensor([3.0, -1.0]).view(1, 2, 1, 1)
    noisy = add_noise(x0, noise, t, ab, NoiseOptions(), gen())
    close(noisy.flatten(), [0.8 * 1 + 0.6 * 3, 0.8 * 2 - 0.6])  # [2.6, 1.0]
    close(training_target(x0, noise, t, ab, "v_prediction").flatten(), [0.8 * 3 - 0.6 * 1, -0.8 - 0.6 * 2])
    assert torch.equal(training_target(x0, noise, t, ab, "epsilon"), noise)
    with pytest.raises(ValueError):
        training_target(x0, noise, t, ab, "sample")


def test_add_noise_and_velocity_match_diffusers_ddpm():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ab = noise_schedule(scheduler.config)
    assert torch.equal(ab, scheduler.alphas_cumprod)
    latents = torch.randn(3, 4, 4, 4, generator=gen(10))
    noise = torch.randn(3, 4, 4, 4, generator=gen(11))
    t = torch.tensor([0, 421, 999])
    assert torch.allclose(add_noise(latents, noise, t, ab, NoiseOptions(), gen()),
                          scheduler.add_noise(latents, noise, t), atol=1e-6)
    assert torch.allclose(training_target(latents, noise, t, ab, "v_prediction"),
                          scheduler.get_velocity(latents, noise, t), atol=1e-6)


def test_input_perturbation_changes_input_only():
    ab = torch.tensor([0.64])
    t = torch.tensor([0])
    x0 = torch.zeros(1, 2, 2, 2)
    noise = torch.ones(1, 2, 2, 2)
    options = NoiseOptions(ip_noise_gamma=0.1)
    noisy = add_noise(x0, noise, t, ab, options, gen(3))
    perturbation = torch.randn((1, 2, 2, 2), generator=gen(3))
    assert torch.allclose(noisy, 0.6 * (noise + 0.1 * perturbation), atol=1e-6)
    # random strength: one U(0,1) draw (before the gaussian) scales gamma for the whole batch
    g = gen(4)
    strength = torch.rand((1,), generator=g) * 0.1
    expected = 0.6 * (noise + strength * torch.randn((1, 2, 2, 2), generator=g))
    noisy_r = add_noise(x0, noise, t, ab, NoiseOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), gen(4))
    assert torch.allclose(noisy_r, expected, atol=1e-6)
    # the target is built from the unperturbed noise
    assert torch.equal(training_target(x0, noise, t, ab, "epsilon"), noise)


# --------------------------------------------------------------------------------------------- noise


def test_plain_noise_is_the_generators_gaussian():
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    noise = sample_noise(latents, NoiseOptions(), gen(0))
    assert noise.dtype == torch.float16 and noise.shape == latents.shape
    assert torch.equal(noise, torch.randn((2, 4, 8, 8), generator=gen(0)).half())


def test_noise_offset_shifts_each_channel_mean():
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, NoiseOptions(noise_offset=0.1), gen(1))
    g = gen(1)
    base = torch.randn((2, 4, 8, 8), generator=g)
    offset = torch.randn((2, 4, 1, 1), generator=g)
    shift = noise - base
    assert torch.allclose(shift, (0.1 * offset).expand_as(shift), atol=1e-6)  # constant per (B, C)
    assert torch.allclose(shift.mean(dim=(2, 3)), 0.1 * offset.flatten(1), atol=1e-6)

    g = gen(1)
    base = torch.randn((2, 4, 8, 8), generator=g)
    strength = torch.rand((1,), generator=g) * 0.1
    offset = torch.randn((2, 4, 1, 1), generator=g)
    noise_r = sample_noise(latents, NoiseOptions(noise_offset=0.1, noise_offset_random_strength=True), gen(1))
    assert 0 <= strength.item() < 0.1
    assert torch.allclose(noise_r, base + strength * offset, atol=1e-6)


def test_adaptive_noise_scale():
    # channel c of sample 0 has mean -(c+1); sample 1 has mean +2 everywhere
    latents = torch.cat([-(torch.arange(4.0) + 1).view(1, 4, 1, 1).expand(1, 4, 4, 4),
                         torch.full((1, 4, 4, 4), 2.0)])
    options = NoiseOptions(noise_offset=0.1, adaptive_noise_scale=0.05)
    noise = sample_noise(latents, options, gen(2))
    g = gen(2)
    base = torch.randn((2, 4, 4, 4), generator=g)
    offset = torch.randn((2, 4, 1, 1), generator=g)
    strength = torch.tensor([[0.15, 0.2, 0.25, 0.3], [0.2, 0.2, 0.2, 0.2]]).view(2, 4, 1, 1)  # 0.1 + 0.05 |mean|
    assert torch.allclose(noise, base + strength * offset, atol=1e-6)
    # a negative scale clamps the strength at 0: no offset at all
    clamped = sample_noise(latents, NoiseOptions(noise_offset=0.1, adaptive_noise_scale=-1.0), gen(2))
    assert torch.allclose(clamped, base, atol=1e-7)
    with pytest.raises(ValueError, match="adaptive_noise_scale requires noise_offset"):
        NoiseOptions(adaptive_noise_scale=0.05)


def test_multires_one_iteration_by_hand():
    latents = torch.zeros(1, 2, 8, 8)
    noise = sample_noise(latents, NoiseOptions(multires_noise_iterations=1, multires_noise_discount=0.5), gen(5))
    g = gen(5)
    base = torch.randn((1, 2, 8, 8), generator=g)
    torch.rand((1,), generator=g)  # the ratio draw; r**0 == 1 so level 0 is full resolution
    level0 = torch.randn((1, 2, 8, 8), generator=g)
    expected = (base + level0) / (base + level0).std()
    assert torch.allclose(noise, expected, atol=1e-6)


def test_multires_noise_is_unit_std_and_low_frequency():
    latents = torch.zeros(4, 4, 64, 64)
    noise = sample_noise(latents, NoiseOptions(multires_noise_iterations=10, multires_noise_discount=0.8), gen(6))
    assert noise.shape == latents.shape
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)

    def neighbour_correlation(x: torch.Tensor) -> float:
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    white = sample_noise(latents, NoiseOptions(), gen(6))
    assert abs(neighbour_correlation(white)) < 0.05
    assert neighbour_correlation(noise) > 0.2  # the coarse levels make neighbours alike (white: ~0)
    # works when a level reaches 1x1 before the iterations run out
    tiny = sample_noise(torch.zeros(1, 1, 3, 5), NoiseOptions(multires_noise_iterations=8), gen(7))
    assert tiny.shape == (1, 1, 3, 5) and torch.isfinite(tiny).all()


def test_same_seed_same_draws_different_seed_different():
    latents = torch.randn(2, 4, 16, 16, generator=gen(99))
    options = NoiseOptions(noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01,
                           multires_noise_iterations=4, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True,
                           min_timestep=10, max_timestep=900)
    ab = noise_schedule()

    def one_step(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = sample_noise(latents, options, g)
        t = sample_timesteps(2, options, g)
        return noise, t, add_noise(latents, noise, t, ab, options, g)

    first, again = one_step(step_generator(42, 1000, 1)), one_step(step_generator(42, 1000, 1))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other_rank = one_step(step_generator(42, 1000, 0))
    other_step = one_step(step_generator(42, 1001, 1))
    assert not torch.equal(first[0], other_rank[0]) and not torch.equal(first[0], other_step[0])
    assert step_generator(1, 0, 1).initial_seed() != step_generator(1, 1, 0).initial_seed()


def test_timesteps_range_and_dtype():
    t = sample_timesteps(2000, NoiseOptions(min_timestep=100, max_timestep=103), gen(0))
    assert t.dtype == torch.long and t.shape == (2000,)
    assert set(t.tolist()) == {100, 101, 102}  # max is exclusive
    full = sample_timesteps(3000, NoiseOptions(), gen(0))
    assert full.min().item() >= 0 and full.max().item() <= 999
    assert torch.equal(full, sample_timesteps(3000, NoiseOptions(), gen(0)))
    fixed = sample_timesteps(3, NoiseOptions(min_timestep=500, max_timestep=500), gen(0))
    assert fixed.tolist() == [500, 500, 500]
    with pytest.raises(ValueError):
        NoiseOptions(min_timestep=600, max_timestep=500)


# ------------------------------------------------------------------------------------------- weights


def test_min_snr_weights_and_snr_zero():
    eps = loss_weights(T4, TOY_AB, "epsilon", LossOptions(min_snr_gamma=1.0))
    close(eps, [0.25, 1.0, 1.0, 1.0])  # min(snr, 1)/snr; snr = 0 -> 1 (the limit), not nan
    v = loss_weights(T4, TOY_AB, "v_prediction", LossOptions(min_snr_gamma=1.0))
    close(v, [1 / 5, 1 / 2, 0.25 / 1.25, 0.0])  # min(snr, 1)/(snr + 1)
    close(loss_weights(T4, TOY_AB, "epsilon", LossOptions(min_snr_gamma=5.0)), [1.0, 1.0, 1.0, 1.0])
    close(loss_weights(T4, TOY_AB, "epsilon", LossOptions()), [1.0, 1.0, 1.0, 1.0])


def test_debiased_estimation_weights():
    eps = loss_weights(T4, TOY_AB, "epsilon", LossOptions(debiased_estimation=True))
    close(eps, [0.5, 1.0, 2.0, 1 / math.sqrt(1e-3)])  # 1/sqrt(snr); snr = 0 clamped to 1e-3: finite
    v = loss_weights(T4, TOY_AB, "v_prediction", LossOptions(debiased_estimation=True))
    close(v, [0.2, 0.5, 0.8, 1.0])  # 1/(snr + 1)
    # kohya's upper clamp: snr 2000 counts as 1000
    high = torch.tensor([2000.0 / 2001.0], dtype=torch.float64)
    close(loss_weights(torch.tensor([0]), high, "epsilon", LossOptions(debiased_estimation=True)),
          [1 / math.sqrt(1000)], rel=1e-4)


def test_v_pred_scaling_rules():
    scale = loss_weights(T4, TOY_AB, "v_prediction", LossOptions(scale_v_pred_loss_like_noise_pred=True))
    close(scale, [0.8, 0.5, 0.2, 0.0])  # snr/(snr + 1) == alpha_bar
    like = loss_weights(T4, TOY_AB, "epsilon", LossOptions(v_pred_like_loss=0.5))
    close(like, [1 + 0.5 * 5 / 4, 1 + 0.5 * 2, 1 + 0.5 * 1.25 / 0.25, 1 + 0.5 * 1.001 / 1e-3], rel=1e-4)
    with pytest.raises(ValueError, match="v_prediction"):
        loss_weights(T4, TOY_AB, "epsilon", LossOptions(scale_v_pred_loss_like_noise_pred=True))
    with pytest.raises(ValueError, match="v_prediction"):
        loss_weights(T4, TOY_AB, "v_prediction", LossOptions(v_pred_like_loss=0.5))


def test_weights_multiply_and_stay_finite_under_zero_terminal_snr():
    both = loss_weights(T4, TOY_AB, "epsilon", LossOptions(min_snr_gamma=1.0, debiased_estimation=True))
    close(both, [0.25 * 0.5, 1.0, 2.0, 1 / math.sqrt(1e-3)])
    ab = noise_schedule(None, zero_terminal_snr=True)
    t = torch.tensor([0, 500, 998, 999])
    for prediction in ("epsilon", "v_prediction"):
        for options in (LossOptions(min_snr_gamma=5.0), LossOptions(debiased_estimation=True),
                        LossOptions(min_snr_gamma=5.0, debiased_estimation=True)):
            assert torch.isfinite(loss_weights(t, ab, prediction, options)).all()
    assert torch.isfinite(loss_weights(t, ab, "epsilon", LossOptions(v_pred_like_loss=0.1))).all()


# ---------------------------------------------------------------------------------------------- losses


def test_elementwise_losses_by_hand():
    pred = torch.tensor([0.0, 1.0, -3.0])
    target = torch.zeros(3)
    close(elementwise_loss(pred, target, "l2"), [0.0, 1.0, 9.0])
    close(elementwise_loss(pred, target, "l1"), [0.0, 1.0, 3.0])
    # c = 0.5: huber 2c(sqrt(d^2 + c^2) - c), smooth_l1 2(sqrt(d^2 + c^2) - c)
    close(elementwise_loss(pred, target, "huber", 0.5), [0.0, math.sqrt(1.25) - 0.5, math.sqrt(9.25) - 0.5])
    close(elementwise_loss(pred, target, "smooth_l1", 0.5),
          [0.0, 2 * (math.sqrt(1.25) - 0.5), 2 * (math.sqrt(9.25) - 0.5)])
    # a per-sample c broadcasts over the sample's pixels
    batch = elementwise_loss(torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), "huber", torch.tensor([0.5, 1.0]))
    close(batch[:, 0, 0, 0], [math.sqrt(1.25) - 0.5, 2 * (math.sqrt(2.0) - 1.0)])
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(pred, target, "huber")


def test_huber_c_schedules():
    t = torch.tensor([0, 500, 1000])
    close(huber_c(t, LossOptions(huber_schedule="constant", huber_c=0.1, huber_scale=2.0)), [0.2, 0.2, 0.2])
    exponential = huber_c(t, LossOptions(huber_schedule="exponential", huber_c=0.1, huber_scale=2.0),
                          num_train_timesteps=1000)
    close(exponential, [2.0, 2.0 * math.sqrt(0.1), 0.2])  # scale * c ** (t / N)
    # snr: sigma = sqrt((1 - ab)/ab) = 0.5, 1, 2, inf -> (1 - c)/(1 + sigma)^2 + c
    by_snr = huber_c(T4, LossOptions(huber_schedule="snr", huber_c=0.1), TOY_AB)
    close(by_snr, [0.9 / 2.25 + 0.1, 0.9 / 4 + 0.1, 0.9 / 9 + 0.1, 0.1])
    close(huber_c(T4[:1], LossOptions(huber_c=0.1, huber_scale=3.0), TOY_AB), [3 * 0.5])


def test_masked_loss_is_not_normalised_by_mask_area():
    pred, target = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)  # l2 = 1 everywhere
    t = torch.tensor([0, 1])
    mask = torch.zeros(2, 8, 8)
    mask[0, :, :4] = 1.0  # left half
    mask[1, ::2, ::2] = 1.0  # one pixel in each 2x2 block -> 0.25 everywhere after area resize
    resized = resize_mask(mask, (4, 4))
    assert resized.shape == (2, 1, 4, 4)
    close(resized[1].flatten(), [0.25] * 16)
    loss, per_sample = training_loss(pred, target, t, TOY_AB, "epsilon", LossOptions(masked_loss=True), mask=mask)
    close(per_sample, [0.5, 0.25])
    close(loss, 0.375)
    # a (B, 1, h, w) mask works the same
    _, again = training_loss(pred, target, t, TOY_AB, "epsilon", LossOptions(), mask=mask.unsqueeze(1))
    close(again, [0.5, 0.25])
    with pytest.raises(ValueError, match="no mask"):
        training_loss(pred, target, t, TOY_AB, "epsilon", LossOptions(masked_loss=True))


def test_training_loss_combines_everything():
    # sample 0: every pixel off by 1 -> l2 mean 1; sample 1: off by 2 -> 4
    pred = torch.cat([torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)])
    target = torch.zeros(2, 4, 2, 2)
    t = torch.tensor([0, 2])  # snr 4 and 0.25
    options = LossOptions(min_snr_gamma=1.0)
    loss, per_sample = training_loss(pred, target, t, TOY_AB, "epsilon", options,
                                     sample_weights=torch.tensor([1.0, 0.5]))
    # min-SNR(eps, gamma 1): 0.25 and 1; prior weight 1 and 0.5
    close(per_sample, [1 * 1 * 0.25, 4 * 0.5 * 1.0])
    close(loss, (0.25 + 2.0) / 2)
    # smooth_l1 with the snr schedule at ab = 0.8 (c = 0.5) and ab = 0.2 (c = 0.2)
    _, smooth = training_loss(pred, target, t, TOY_AB, "epsilon", LossOptions(loss_type="smooth_l1"))
    close(smooth, [2 * (math.sqrt(1 + 0.25) - 0.5), 2 * (math.sqrt(4 + 0.04) - 0.2)])
    # half-precision predictions are computed in float32
    loss16, _ = training_loss(pred.half(), target.half(), t, TOY_AB, "epsilon", LossOptions())
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(2.5)


# ------------------------------------------------------------------------------------------ arguments


def test_arguments_defaults_and_flags():
    parser = cfg.build_parser("test", add_model_arguments, add_dataset_arguments,
                              add_training_arguments, add_noise_arguments, add_loss_arguments)
    defaults = cfg.parse_args(parser, [])
    assert defaults.noise_offset is None and defaults.multires_noise_discount == 0.3
    assert defaults.loss_type == "l2" and defaults.huber_schedule == "snr" and defaults.huber_c == 0.1
    assert noise_options_from_args(defaults) == NoiseOptions()
    assert loss_options_from_args(defaults) == LossOptions()

    args = cfg.parse_args(parser, [
        "--noise_offset", "0.1", "--noise_offset_random_strength", "--adaptive_noise_scale", "0.01",
        "--multires_noise_iterations", "6", "--multires_noise_discount", "0.4", "--ip_noise_gamma", "0.05",
        "--ip_noise_gamma_random_strength", "--min_timestep", "10", "--max_timestep", "900",
        "--zero_terminal_snr", "--v_parameterization", "--loss_type", "huber", "--huber_schedule", "exponential",
        "--huber_c", "0.2", "--huber_scale", "1.5", "--min_snr_gamma", "5", "--debiased_estimation_loss",
        "--scale_v_pred_loss_like_noise_pred", "--masked_loss"])
    assert noise_options_from_args(args) == NoiseOptions(
        noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.01, multires_noise_iterations=6,
        multires_noise_discount=0.4, ip_noise_gamma=0.05, ip_noise_gamma_random_strength=True, min_timestep=10,
        max_timestep=900, zero_terminal_snr=True)
    assert loss_options_from_args(args) == LossOptions(
        loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=1.5, min_snr_gamma=5.0,
        debiased_estimation=True, scale_v_pred_loss_like_noise_pred=True, masked_loss=True)


@pytest.mark.parametrize("argv, message", [
    (["--adaptive_noise_scale", "0.1"], "requires --noise_offset"),
    (["--scale_v_pred_loss_like_noise_pred"], "only with --v_parameterization"),
    (["--v_pred_like_loss", "0.1", "--v_parameterization"], "cannot be used with --v_parameterization"),
    (["--min_timestep", "700", "--max_timestep", "600"], "--min_timestep"),
    (["--loss_type", "mse"], "invalid choice"),
])
def test_argument_rules(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    parser = cfg.build_parser("test", add_model_arguments, add_noise_arguments, add_loss_arguments)
    with pytest.raises(SystemExit):
        cfg.parse_args(parser, argv)
    assert message in capsys.readouterr().err


def test_option_validation():
    with pytest.raises(ValueError, match="loss_type"):
        LossOptions(loss_type="mse")
    with pytest.raises(ValueError, match="huber_schedule"):
        LossOptions(huber_schedule="linear")
    with pytest.raises(ValueError, match="huber_c"):
        LossOptions(huber_c=0.0)
    assert loss_options_from_args(argparse.Namespace(min_snr_gamma=0.0)).min_snr_gamma is None  # 0 means off
