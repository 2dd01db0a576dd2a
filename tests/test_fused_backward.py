"""library/fused_backward.py: stepping each parameter inside backward gives the plain optimizer's weights.

Every equivalence test trains two copies of one small model on the same batches, one with the plain
optimizer (backward, then step) and one with FusedBackwardOptimizer (the hooks step during backward), and
compares the weights after each step. Both runs execute the same per-tensor kernels on CPU, so the
tolerance is tight (1e-6 relative); each test also checks that the weights really moved.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.optimization
from accelerate import Accelerator
from torch import nn

from library.cli import config
from library.cli.accelerate_args import add_accelerate_arguments
from library.cli.optim_args import add_fused_backward_arguments, add_optimizer_arguments, fused_backward_flag_error
from library.cli.training_args import add_training_arguments
from library.training.fused_backward import (
    FusedBackwardOptimizer,
    build_fused_optimizer_and_scheduler,
    fused_backward_supported,
    unsupported_optimizer_message,
)
from library.training.optim import OptimizerSettings, build_optimizer, build_optimizer_and_scheduler

TIGHT = {"rtol": 1e-6, "atol": 1e-7}
LR = 1e-2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=generator), torch.randn(6, 3, generator=generator)) for _ in range(count)]


def _groups(model: nn.Module) -> list[dict]:
    """Two groups with different LRs: the first layer at 1e-2, the rest at 3e-3."""
    return [{"params": list(model[0].parameters()), "lr": LR},
            {"params": [p for layer in model[1:] for p in layer.parameters()], "lr": 3e-3}]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, scheduler=None,
           per_tensor_clip: float = 0.0) -> list[list[float]]:
    """The plain loop (also used for the fused facade, whose step/zero_grad have nothing left to do).
    Returns the scheduler's LRs before each step."""
    lrs = []
    for x, y in batches:
        lrs.append([group["lr"] for group in optimizer.param_groups])
        nn.functional.mse_loss(model(x), y).backward()
        if per_tensor_clip:
            for param in model.parameters():
                torch.nn.utils.clip_grad_norm_(param, per_tensor_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return lrs


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")


def _assert_moved(model: nn.Module, start: nn.Module) -> None:
    for (name, p), p0 in zip(model.named_parameters(), start.parameters()):
        assert not torch.equal(p, p0), f"{name} did not change"


def _plain_and_fused(optimizer_type: str, optimizer_args: dict | None = None, max_grad_norm: float = 0.0):
    plain_model, fused_model = _model(), _model()
    plain, _ = build_optimizer(optimizer_type, _groups(plain_model), LR, optimizer_args)
    inner, _ = build_optimizer(optimizer_type, _groups(fused_model), LR, optimizer_args)
    return plain_model, plain, fused_model, FusedBackwardOptimizer(inner, max_grad_norm=max_grad_norm)


# --------------------------------------------------------------------------------------------------------
# Same weights as the plain optimizer
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4])
def test_adamw_with_weight_decay_and_two_lrs_matches_plain_step(steps: int) -> None:
    plain_model, plain, fused_model, fused = _plain_and_fused("AdamW", {"weight_decay": 0.1})
    assert fused.param_groups is fused.optimizer.param_groups  # the same dicts, not copies
    assert [g["lr"] for g in fused.param_groups] == [LR, 3e-3]
    assert fused.num_hooks == 8  # 4 layers with weight + bias
    batches = _batches(steps)
    _train(plain_model, plain, batches)
    _train(fused_model, fused, batches)
    _assert_same_weights(plain_model, fused_model)
    _assert_moved(fused_model, _model())
    # AdamW's per-parameter state sits in the wrapped optimizer, as in the plain run.
    assert all(int(fused.state[p]["step"]) == steps for p in fused_model.parameters())


@pytest.mark.parametrize("relative_step", [True, False])
def test_adafactor_matches_plain_step(relative_step: bool) -> None:
    args = {} if relative_step else {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    plain_model, plain, fused_model, fused = _plain_and_fused("Adafactor", args)
    assert fused.defaults["relative_step"] is relative_step
    batches = _batches(3)
    _train(plain_model, plain, batches)
    _train(fused_model, fused, batches)
    _assert_same_weights(plain_model, fused_model)
    _assert_moved(fused_model, _model())
    # The 8x4 weight keeps Adafactor's factored row/column statistics, shapes (8,) and (4,).
    state = fused.state[fused_model[0].weight]
    assert state["step"] == 3 and state["exp_avg_sq_row"].shape == (8,) and state["exp_avg_sq_col"].shape == (4,)


@pytest.mark.parametrize("optimizer_type", ["Adam", "SGDNesterov", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad"])
def test_other_per_parameter_optimizers_match_plain_step(optimizer_type: str) -> None:
    plain_model, plain, fused_model, fused = _plain_and_fused(optimizer_type, {"weight_decay": 0.01})
    batches = _batches(3)
    _train(plain_model, plain, batches)
    _train(fused_model, fused, batches)
    _assert_same_weights(plain_model, fused_model)
    _assert_moved(fused_model, _model())


def test_per_tensor_clipping_equals_clip_grad_norm_on_each_tensor() -> None:
    plain_model, plain, fused_model, fused = _plain_and_fused("SGDNesterov", max_grad_norm=0.05)
    global_model = _model()
    global_opt, _ = build_optimizer("SGDNesterov", _groups(global_model), LR)
    batches = _batches(3)
    _train(plain_model, plain, batches, per_tensor_clip=0.05)
    _train(fused_model, fused, batches)
    _assert_same_weights(plain_model, fused_model)
    # It is not a global clip: clipping the total norm to 0.05 gives other weights.
    for x, y in batches:
        nn.functional.mse_loss(global_model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(global_model.parameters(), 0.05)
        global_opt.step()
        global_opt.zero_grad()
    assert not torch.allclose(global_model[0].weight, fused_model[0].weight, rtol=1e-4, atol=1e-6)


def test_clipping_really_bounds_each_tensor_step() -> None:
    """SGD without momentum and lr 1 moves a tensor by exactly its clipped gradient: norm <= max_grad_norm."""
    model = _model()
    start = copy.deepcopy(model)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    FusedBackwardOptimizer(inner, max_grad_norm=0.001)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    for p, p0 in zip(model.parameters(), start.parameters()):
        assert torch.linalg.vector_norm(p - p0).item() == pytest.approx(0.001, rel=1e-3)


# --------------------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------------------


def _settings(optimizer_type: str, **kwargs) -> OptimizerSettings:
    return OptimizerSettings(optimizer_type=optimizer_type, learning_rate=LR, **kwargs)


def test_linear_warmup_scheduler_on_the_facade_sets_every_parameters_lr() -> None:
    settings = _settings("AdamW", optimizer_args={"weight_decay": 0.1}, lr_scheduler="linear", lr_warmup_steps="2")
    plain_model, fused_model = _model(), _model()
    plain, plain_scheduler, _ = build_optimizer_and_scheduler(settings, _groups(plain_model), 5)
    fused, fused_scheduler, description = build_fused_optimizer_and_scheduler(settings, _groups(fused_model), 5)
    assert isinstance(fused, FusedBackwardOptimizer) and fused_scheduler.optimizer is fused
    assert isinstance(fused_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert description.startswith("torch.optim.adamw.AdamW(weight_decay=0.1)")
    batches = _batches(5)
    plain_lrs = _train(plain_model, plain, batches, plain_scheduler)
    fused_lrs = _train(fused_model, fused, batches, fused_scheduler)
    # 2 warm-up steps then linear decay to 0 at step 5: factors 0, 1/2, 1, 2/3, 1/3.
    expected = [[f * LR, f * 3e-3] for f in (0.0, 0.5, 1.0, 2 / 3, 1 / 3)]
    for got, want in zip(fused_lrs, expected):
        assert got == pytest.approx(want, rel=1e-12)
    assert fused_lrs == plain_lrs
    _assert_same_weights(plain_model, fused_model)
    _assert_moved(fused_model, _model())


def test_adafactor_schedule_on_the_facade() -> None:
    """Relative-step Adafactor gets transformers' AdafactorSchedule through the facade's `.optimizer`; the
    weights match, and the reported LR stays the initial one (documented: no gradient is left to read)."""
    settings = _settings("Adafactor")
    plain_model, fused_model = _model(), _model()
    plain, plain_scheduler, _ = build_optimizer_and_scheduler(settings, _groups(plain_model), 3)
    fused, fused_scheduler, _ = build_fused_optimizer_and_scheduler(settings, _groups(fused_model), 3)
    assert isinstance(fused_scheduler, transformers.optimization.AdafactorSchedule)
    batches = _batches(3)
    _train(plain_model, plain, batches, plain_scheduler)
    _train(fused_model, fused, batches, fused_scheduler)
    _assert_same_weights(plain_model, fused_model)
    assert fused_scheduler.get_last_lr() == [LR, LR]


# --------------------------------------------------------------------------------------------------------
# Memory: the gradients never exist together
# --------------------------------------------------------------------------------------------------------


def test_at_most_one_gradient_exists_during_backward_and_none_after() -> None:
    model = _model()
    start = copy.deepcopy(model)
    params = list(model.parameters())
    alive_counts: list[int] = []
    # Registered before the facade's hooks, so these run first: they see the gradient just accumulated.
    for param in params:
        param.register_post_accumulate_grad_hook(
            lambda p: alive_counts.append(sum(q.grad is not None for q in params)))
    inner, _ = build_optimizer("AdamW", _groups(model), LR)
    FusedBackwardOptimizer(inner)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert alive_counts == [1] * len(params)
    assert all(p.grad is None for p in params)
    _assert_moved(model, start)  # stepped inside backward, before any optimizer.step()


def test_remove_hooks_restores_plain_backward() -> None:
    model = _model()
    start = copy.deepcopy(model)
    inner, _ = build_optimizer("AdamW", _groups(model), LR)
    fused = FusedBackwardOptimizer(inner)
    fused.remove_hooks()
    assert fused.num_hooks == 0
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    _assert_same_weights(model, start)


def test_frozen_parameters_get_no_hook_and_stay_put() -> None:
    model = _model()
    model[0].requires_grad_(False)
    start = copy.deepcopy(model)
    fused = FusedBackwardOptimizer(torch.optim.AdamW(model.parameters(), lr=LR))
    assert fused.num_hooks == 6
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    assert torch.equal(model[0].weight, start[0].weight)
    assert not torch.equal(model[4].weight, start[4].weight)


def test_add_param_group_hooks_the_new_parameters() -> None:
    model = _model()
    model[0].requires_grad_(False)
    inner = torch.optim.SGD(model[4].parameters(), lr=0.5)
    fused = FusedBackwardOptimizer(inner)
    fused.add_param_group({"params": list(model[0].parameters()), "lr": 0.25})
    model[0].requires_grad_(True)  # only trainable parameters are hooked, so this group got none
    assert fused.num_hooks == 2 and len(fused.param_groups) == 2
    fused.add_param_group({"params": list(model[2].parameters()), "lr": 0.25})
    assert fused.num_hooks == 4
    start = copy.deepcopy(model)
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    # Plain SGD: the step is lr * gradient; recompute the gradient on the starting weights to compare.
    nn.functional.mse_loss(start(x), y).backward()
    torch.testing.assert_close(model[2].weight, start[2].weight - 0.25 * start[2].weight.grad, **TIGHT)
    torch.testing.assert_close(model[4].bias, start[4].bias - 0.5 * start[4].bias.grad, **TIGHT)
    assert model[0].weight.grad is not None  # in the optimizer but never hooked: plain backward behaviour


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_into_a_new_facade_continues_identically() -> None:
    model_a = _model()
    inner_a, _ = build_optimizer("AdamW", _groups(model_a), LR, {"weight_decay": 0.1})
    fused_a = FusedBackwardOptimizer(inner_a)
    batches = _batches(4)
    _train(model_a, fused_a, batches[:2])
    saved = copy.deepcopy(fused_a.state_dict())
    # The plain optimizer's format: the two original groups, state keyed 0..7.
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2, 3, 4, 5, 6, 7]]
    assert sorted(saved["state"]) == list(range(8)) and int(saved["state"][0]["step"]) == 2

    model_b = _model(seed=5)
    model_b.load_state_dict(model_a.state_dict())
    inner_b, _ = build_optimizer("AdamW", _groups(model_b), LR, {"weight_decay": 0.1})
    fused_b = FusedBackwardOptimizer(inner_b)
    fused_b.load_state_dict(saved)
    _train(model_a, fused_a, batches[2:])
    _train(model_b, fused_b, batches[2:])
    _assert_same_weights(model_a, model_b)
    assert int(fused_b.state[model_b[0].weight]["step"]) == 4


def test_a_plain_checkpoint_resumes_under_fused_backward() -> None:
    plain_model = _model()
    plain, _ = build_optimizer("Adafactor", _groups(plain_model), LR)
    batches = _batches(4)
    _train(plain_model, plain, batches[:2])
    fused_model = _model(seed=5)
    fused_model.load_state_dict(plain_model.state_dict())
    inner, _ = build_optimizer("Adafactor", _groups(fused_model), LR)
    fused = FusedBackwardOptimizer(inner)
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))
    _train(plain_model, plain, batches[2:])
    _train(fused_model, fused, batches[2:])
    _assert_same_weights(plain_model, fused_model)


def test_accelerate_prepare_and_save_state_round_trip(tmp_path) -> None:
    """accelerate wraps the facade like any optimizer; its save_state/load_state restore it."""
    settings = _settings("AdamW", lr_scheduler="linear", lr_warmup_steps="1")
    plain_model, fused_model = _model(), _model()
    plain, plain_scheduler, _ = build_optimizer_and_scheduler(settings, _groups(plain_model), 4)
    fused, scheduler, _ = build_fused_optimizer_and_scheduler(settings, _groups(fused_model), 4)
    accelerator = Accelerator(cpu=True)
    model, optimizer, prepared_scheduler = accelerator.prepare(fused_model, fused, scheduler)
    assert optimizer.optimizer is fused
    batches = _batches(4)
    _train(plain_model, plain, batches[:2], plain_scheduler)
    for x, y in batches[:2]:
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        prepared_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    _assert_same_weights(plain_model, fused_model)
    accelerator.save_state(str(tmp_path / "state"))
    # Train on, then load the saved state back: the run repeats steps 3-4 exactly.
    _train(fused_model, fused, batches[2:], scheduler)
    after_first_pass = copy.deepcopy(fused_model)
    accelerator.load_state(str(tmp_path / "state"))
    assert int(fused.state[fused_model[0].weight]["step"]) == 2
    _train(fused_model, fused, batches[2:], scheduler)
    _assert_same_weights(after_first_pass, fused_model)
    _train(plain_model, plain, batches[2:], plain_scheduler)
    _assert_same_weights(plain_model, fused_model)


# --------------------------------------------------------------------------------------------------------
# What is refused
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, supported", [
    (None, True), ("AdamW", True), ("adafactor", True), ("SGDNesterov", True), ("torch.optim.AdamW", True),
    ("RAdam", True), ("transformers.optimization.Adafactor", True), ("Prodigy", False), ("DAdaptAdam", False),
    ("AdamW8bit", False), ("AdamWScheduleFree", False), ("Lion", False), ("torch.optim.LBFGS", False),
])
def test_fused_backward_supported(name: str | None, supported: bool) -> None:
    assert fused_backward_supported(name) is supported


def test_prodigy_error_names_the_reason() -> None:
    message = unsupported_optimizer_message("Prodigy")
    assert message.startswith("--fused_backward_pass supports AdamW, SGDNesterov, Adafactor")
    assert "got Prodigy: it estimates its step size from statistics over all parameters" in message
    assert "schedule in the param groups" in unsupported_optimizer_message("AdamWScheduleFree")
    with pytest.raises(ValueError, match="got Prodigy"):  # refused before prodigyopt is imported
        build_fused_optimizer_and_scheduler(_settings("Prodigy"), _groups(_model()), 3)


def test_the_facade_refuses_a_non_per_parameter_optimizer_object() -> None:
    model = _model()
    with pytest.raises(ValueError, match="got torch.optim.lbfgs.LBFGS"):
        FusedBackwardOptimizer(torch.optim.LBFGS(model.parameters()))
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def _parse(*argv: str):
    parser = config.build_parser("test", add_training_arguments, add_optimizer_arguments,
                                 add_accelerate_arguments, add_fused_backward_arguments)
    return config.parse_args(parser, list(argv))


def test_flag_parses_with_compatible_settings() -> None:
    args = _parse("--fused_backward_pass", "--optimizer_type", "Adafactor", "--mixed_precision", "bf16")
    assert args.fused_backward_pass is True
    assert _parse().fused_backward_pass is False


@pytest.mark.parametrize("argv, message", [
    (["--gradient_accumulation_steps", "2"], "set --gradient_accumulation_steps 1 (got 2)"),
    (["--deepspeed"], "cannot be used with --deepspeed"),
    (["--mixed_precision", "fp16"], "Use --mixed_precision bf16 or no"),
    (["--optimizer_type", "Prodigy"], "got Prodigy"),
    (["--use_8bit_adam"], "got AdamW8bit"),
])
def test_flag_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse("--fused_backward_pass", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_several_processes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = _parse()
    args.fused_backward_pass = True
    assert "single process only" in fused_backward_flag_error(args)
