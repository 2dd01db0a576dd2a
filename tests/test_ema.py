"""library/ema.py: the EMA against closed-form values, its schedule, checkpoint state, swapping and flags."""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from library.cli.config import build_parser, parse_args
from library.cli.optim_args import add_ema_arguments, ema_settings_from_args
from library.training.ema import EMASettings, ExponentialMovingAverage


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _scalar(value: float = 0.0) -> dict[str, nn.Parameter]:
    return {"w": nn.Parameter(torch.tensor([value]))}


def _set(params: dict[str, nn.Parameter], value: float) -> None:
    with torch.no_grad():
        params["w"].fill_(value)


def _perturb(module: nn.Module, generator: torch.Generator) -> None:
    """A known weight change, as if an optimizer step happened."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---- settings ----------------------------------------------------------------------------------------------


def test_settings_decay_and_beta_are_one_setting():
    assert EMASettings().decay == 0.9999
    assert EMASettings(beta=0.999).decay == 0.999
    assert EMASettings(decay=0.99, beta=0.99).decay == 0.99
    with pytest.raises(ValueError, match="differ"):
        EMASettings(decay=0.99, beta=0.999)
    # replace() keeps working on a resolved object
    assert dataclasses.replace(EMASettings(beta=0.9), update_every=3).decay == 0.9


@pytest.mark.parametrize("kwargs", [dict(decay=1.5), dict(decay=-0.1), dict(update_every=0), dict(update_every=1.5),
                                    dict(start_step=-1), dict(device="cuda")])
def test_settings_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        EMASettings(**kwargs)


def test_warmup_decays_follow_the_classic_schedule():
    s = EMASettings(decay=0.5, warmup=True)
    # min(0.5, (1 + t) / (10 + t)) for t = 0, 1, 2, 8, 9, 100
    assert [s.decay_at(t) for t in (0, 1, 2, 8, 9, 100)] == pytest.approx([0.1, 2 / 11, 0.25, 0.5, 0.5, 0.5])
    assert EMASettings(decay=0.5, warmup=False).decay_at(0) == 0.5
    # update_every = 3: the warm-up is measured in steps (t = 3n) and each update uses decay**3
    s3 = EMASettings(decay=0.9, update_every=3)
    assert [s3.decay_at(n) for n in (0, 1, 2, 1000)] == pytest.approx([0.1 ** 3, (4 / 13) ** 3, (7 / 16) ** 3, 0.729])


# ---- values ------------------------------------------------------------------------------------------------


def test_constant_decay_matches_closed_form():
    d, k = 0.8, 6
    model = _model()
    ema = ExponentialMovingAverage(model, EMASettings(decay=d, warmup=False))
    g = torch.Generator().manual_seed(1)
    w = [_snapshot(model)]
    for step in range(1, k + 1):
        _perturb(model, g)
        w.append(_snapshot(model))
        assert ema.maybe_update(step)
    averaged = ema.averaged_state_dict()
    assert set(averaged) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for name, value in averaged.items():
        # ema_k = d^k w_0 + sum_{i=1..k} (1 - d) d^(k-i) w_i
        expected = d ** k * w[0][name].double() + sum((1 - d) * d ** (k - i) * w[i][name].double()
                                                     for i in range(1, k + 1))
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)
    assert ema.num_updates == k


def test_warmup_hand_computed_values():
    params = _scalar(0.0)
    ema = ExponentialMovingAverage(params, EMASettings(decay=0.9999))
    expected = [0.9, 1.8, 3.45]  # 0.1*0 + 0.9*1; (2/11)*0.9 + (9/11)*2; 0.25*1.8 + 0.75*4
    for step, (weight, value) in enumerate(zip([1.0, 2.0, 4.0], expected), start=1):
        _set(params, weight)
        ema.maybe_update(step)
        assert ema.averaged_state_dict()["w"].item() == pytest.approx(value, abs=1e-6)
    assert ema.next_decay == pytest.approx(4 / 13)


def test_update_every_three_updates_on_multiples_with_cubed_decay():
    d = 0.9
    model = _model()
    ema = ExponentialMovingAverage(model, EMASettings(decay=d, update_every=3, warmup=False))
    g = torch.Generator().manual_seed(2)
    w0 = _snapshot(model)
    seen, due = [], []
    for step in range(1, 10):
        _perturb(model, g)
        if ema.maybe_update(step):
            due.append(step)
            seen.append(_snapshot(model))
    assert due == [3, 6, 9]
    D = d ** 3
    for name, value in ema.averaged_state_dict().items():
        expected = D ** 3 * w0[name].double() + sum((1 - D) * D ** (3 - i) * seen[i - 1][name].double()
                                                    for i in (1, 2, 3))
        torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("warmup", [False, True])
def test_time_constant_in_steps_does_not_depend_on_update_every(warmup):
    """A step from 0 to 1 held for 12 steps moves the EMA equally with updates every 1 or every 3 steps."""
    results = []
    for every in (1, 3):
        params = _scalar(0.0)
        ema = ExponentialMovingAverage(params, EMASettings(decay=0.95, update_every=every, warmup=warmup))
        _set(params, 1.0)
        for step in range(1, 13):
            ema.maybe_update(step)
        results.append(ema.averaged_state_dict()["w"].item())
    if not warmup:
        assert results[0] == pytest.approx(1 - 0.95 ** 12, abs=1e-6)
        assert results[1] == pytest.approx(results[0], abs=1e-6)
    else:  # 1 - product of the decays: per-step warm-up at t = 0..11 vs at t = 0, 3, 6, 9 cubed
        every_step = math.prod(min(0.95, (1 + t) / (10 + t)) for t in range(12))
        every_third = math.prod(min(0.95, (1 + t) / (10 + t)) ** 3 for t in (0, 3, 6, 9))
        assert results[0] == pytest.approx(1 - every_step, abs=1e-6)
        assert results[1] == pytest.approx(1 - every_third, abs=1e-6)


def test_start_step_copies_then_averages():
    params = _scalar(0.0)
    ema = ExponentialMovingAverage(params, EMASettings(decay=0.5, start_step=4, warmup=False))
    for step in range(1, 5):
        _set(params, float(step))
        assert ema.maybe_update(step)
        assert ema.averaged_state_dict()["w"].item() == float(step)  # copied exactly
    assert ema.num_updates == 0
    for step, expected in [(5, 4.5), (6, 5.25)]:  # 0.5*4 + 0.5*5; 0.5*4.5 + 0.5*6
        _set(params, float(step))
        ema.maybe_update(step)
        assert ema.averaged_state_dict()["w"].item() == pytest.approx(expected)
    assert ema.num_updates == 2


def test_start_step_with_warmup_and_interval():
    params = _scalar(0.0)
    ema = ExponentialMovingAverage(params, EMASettings(decay=0.5, start_step=5, update_every=2, warmup=True))
    due = []
    for step in range(1, 9):
        _set(params, float(step))
        if ema.maybe_update(step):
            due.append(step)
        if step == 5:
            assert ema.averaged_state_dict()["w"].item() == 5.0  # the start step itself copies
    assert due == [2, 4, 5, 6, 8]
    # step 6: decay 0.1**2 -> 0.01*5 + 0.99*6 = 5.99; step 8: min(0.5, 3/12)**2 = 0.0625 -> 0.0625*5.99 + 0.9375*8
    assert ema.averaged_state_dict()["w"].item() == pytest.approx(0.0625 * 5.99 + 0.9375 * 8, abs=1e-5)


def test_repeated_step_is_not_counted_twice():
    params = _scalar(0.0)
    ema = ExponentialMovingAverage(params, EMASettings(decay=0.5, warmup=False))
    _set(params, 1.0)
    assert ema.maybe_update(1)
    assert not ema.maybe_update(1)  # e.g. called on every micro-batch of a gradient-accumulation cycle
    assert ema.averaged_state_dict()["w"].item() == 0.5 and ema.num_updates == 1


@pytest.mark.parametrize("device", ["cpu", "same"])
@pytest.mark.parametrize("foreach", [True, False])
def test_device_and_foreach_modes_give_the_same_numbers(device, foreach):
    ref_model, model = _model(), _model()
    reference = ExponentialMovingAverage(ref_model, EMASettings(decay=0.7, warmup=False))
    ema = ExponentialMovingAverage(model, EMASettings(decay=0.7, warmup=False, device=device, foreach=foreach))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for step in range(1, 4):
        _perturb(model, g1)
        _perturb(ref_model, g2)
        ema.maybe_update(step)
        reference.maybe_update(step)
    for name, value in ema.averaged_state_dict().items():
        assert value.device == dict(model.named_parameters())[name].device
        torch.testing.assert_close(value, reference.averaged_state_dict()[name], atol=1e-7, rtol=1e-7)


def test_bf16_model_keeps_fp32_shadow():
    params = {"w": nn.Parameter(torch.ones(2, dtype=torch.bfloat16))}
    ema = ExponentialMovingAverage(params, EMASettings(decay=0.99, warmup=False))
    assert ema.averaged_state_dict()["w"].dtype == torch.float32
    with torch.no_grad():
        params["w"].fill_(1 + 2 ** -7)  # the next bf16 number above 1
    ema.maybe_update(1)
    value = ema.averaged_state_dict()["w"]
    # 0.99 * 1 + 0.01 * (1 + 2^-7) = 1.000078125: kept in fp32, would round back to 1.0 in bf16
    torch.testing.assert_close(value, torch.full((2,), 1.000078125), atol=1e-7, rtol=0)
    assert value.to(torch.bfloat16).float().tolist() == [1.0, 1.0]
    with ema.swapped_into():
        assert params["w"].dtype == torch.bfloat16 and params["w"].float().tolist() == [1.0, 1.0]
    assert params["w"].float().tolist() == [1 + 2 ** -7] * 2


# ---- what is tracked ---------------------------------------------------------------------------------------


def test_only_trainable_parameters_are_tracked():
    model = _model()
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    ema = ExponentialMovingAverage(model, EMASettings(decay=0.5, warmup=False))
    assert ema.names == ["1.weight", "1.bias"]
    assert list(ema.averaged_state_dict()) == ["1.weight", "1.bias"]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with ema.swapped_into(model):
        assert torch.equal(model[0].weight, frozen + 1.0)  # untouched by the swap
    with pytest.raises(ValueError, match="no trainable"):
        ExponentialMovingAverage(model.requires_grad_(False), EMASettings())


# ---- checkpoint state --------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    settings = EMASettings(decay=0.9, update_every=2, start_step=2, warmup=True)
    model_a = _model()
    ema_a = ExponentialMovingAverage(model_a, settings)
    g = torch.Generator().manual_seed(4)
    deltas = [[torch.randn(p.shape, generator=g) for p in model_a.parameters()] for _ in range(11)]

    def step(model, i):
        with torch.no_grad():
            for p, delta in zip(model.parameters(), deltas[i - 1]):
                p.add_(delta)

    for i in range(1, 6):
        step(model_a, i)
        ema_a.maybe_update(i)
    buffer = io.BytesIO()
    torch.save(ema_a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    model_b = copy.deepcopy(model_a)
    ema_b = ExponentialMovingAverage(model_b, settings)  # starts from the current weights: different
    assert not torch.equal(ema_b.averaged_state_dict()["0.weight"], ema_a.averaged_state_dict()["0.weight"])
    ema_b.load_state_dict(state)
    assert ema_b.num_updates == ema_a.num_updates == 1  # step 2 copied (the start), step 4 averaged
    for i in range(6, 12):
        step(model_a, i)
        step(model_b, i)
        assert ema_a.maybe_update(i) == ema_b.maybe_update(i)
    assert ema_b.num_updates == ema_a.num_updates == 4
    for name, value in ema_a.averaged_state_dict().items():
        assert torch.equal(ema_b.averaged_state_dict()[name], value)


def test_load_state_dict_rejects_other_parameters():
    ema = ExponentialMovingAverage(_model(), EMASettings())
    other = ExponentialMovingAverage(nn.Sequential(nn.Linear(4, 3)), EMASettings())
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict(other.state_dict())
    bigger = ExponentialMovingAverage(nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2)), EMASettings())
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict(bigger.state_dict())


def test_accelerate_save_state_and_load_state(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    params = _scalar(0.0)
    ema = ExponentialMovingAverage(params, EMASettings(decay=0.5, warmup=False))
    accelerator.register_for_checkpointing(ema)
    _set(params, 1.0)
    ema.maybe_update(1)
    accelerator.save_state(str(tmp_path / "state"))
    _set(params, 3.0)
    ema.maybe_update(2)
    assert ema.averaged_state_dict()["w"].item() == 1.75
    accelerator.load_state(str(tmp_path / "state"))
    assert ema.averaged_state_dict()["w"].item() == 0.5 and ema.num_updates == 1
    assert ema.maybe_update(2)  # the restored last step is 1, so step 2 is due again


# ---- swapping ----------------------------------------------------------------------------------------------


def _trained_ema(model: nn.Module) -> ExponentialMovingAverage:
    ema = ExponentialMovingAverage(model, EMASettings(decay=0.6, warmup=False))
    g = torch.Generator().manual_seed(5)
    for step in range(1, 4):
        _perturb(model, g)
        ema.maybe_update(step)
    return ema


def test_swapped_into_puts_ema_in_and_restores_raw_exactly():
    model = _model()
    ema = _trained_ema(model)
    raw = _snapshot(model)
    averaged = {n: v.clone() for n, v in ema.averaged_state_dict().items()}
    with ema.swapped_into(model) as swapped:
        assert swapped is model
        for name, p in model.named_parameters():
            assert torch.equal(p, averaged[name])
        with pytest.raises(RuntimeError, match="swapped"):
            ema.maybe_update(10)
        with pytest.raises(RuntimeError, match="already"):
            with ema.swapped_into(model):
                pass
    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name])
    assert ema.maybe_update(10)  # usable again


def test_swapped_into_restores_on_exception():
    model = _model()
    ema = _trained_ema(model)
    raw = _snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with ema.swapped_into(model):
            1 / 0
    for name, p in model.named_parameters():
        assert torch.equal(p, raw[name])
    with ema.swapped_into():  # not stuck in the swapped state
        pass


def test_swapped_into_a_wrapped_model_by_name():
    class Wrapper(nn.Module):  # like DDP: parameters appear as module.<name>
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    model = _model()
    ema = _trained_ema(model)
    copy_of_model = Wrapper(copy.deepcopy(model))
    raw = _snapshot(copy_of_model)
    with ema.swapped_into(copy_of_model):
        assert torch.equal(copy_of_model.module[1].bias, ema.averaged_state_dict()["1.bias"])
    assert torch.equal(copy_of_model.module[1].bias, raw["module.1.bias"])
    with pytest.raises(KeyError):
        with ema.swapped_into(nn.Linear(4, 3)):
            pass


# ---- flags -------------------------------------------------------------------------------------------------


def _parse(argv: list[str]):
    return parse_args(build_parser("test", add_ema_arguments), argv)


def test_flag_defaults_mean_no_ema():
    args = _parse([])
    assert (args.use_ema, args.ema_decay, args.ema_beta, args.ema_update_every, args.ema_start_step,
            args.ema_warmup, args.ema_device, args.save_raw_too) == (False, None, None, 1, 0, True, "cpu", False)
    assert ema_settings_from_args(args) is None
    assert ema_settings_from_args(_parse(["--use_ema"])) == EMASettings(decay=0.9999)


def test_flags_build_settings():
    args = _parse(["--use_ema", "--ema_beta", "0.999", "--ema_update_every", "5", "--ema_start_step", "100",
                   "--no_ema_warmup", "--ema_device", "same", "--save_raw_too"])
    assert ema_settings_from_args(args) == EMASettings(beta=0.999, update_every=5, start_step=100, warmup=False,
                                                       device="same")
    assert ema_settings_from_args(args).decay == 0.999 and args.save_raw_too


def test_config_file_sets_warmup_off(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("use_ema = true\nema_warmup = false\nema_decay = 0.99\n")
    settings = ema_settings_from_args(_parse(["--config_file", str(config)]))
    assert (settings.warmup, settings.decay) == (False, 0.99)


@pytest.mark.parametrize("argv, message", [
    (["--use_ema", "--ema_decay", "0.99", "--ema_beta", "0.9"], "differ"),
    (["--save_raw_too"], "--save_raw_too requires --use_ema"),
    (["--ema_decay", "0.99"], "--ema_decay requires --use_ema"),
    (["--use_ema", "--ema_update_every", "0"], "must be >= 1"),
])
def test_bad_flag_combinations_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
