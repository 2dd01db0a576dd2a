"""library/optim.py: optimizer names, their kohya rules and errors; every LR schedule at hand-computed steps.

Optional optimizer packages are not installed here. Their name table is checked with fake modules placed in
sys.modules (the class each name picks and the kwargs it adds), and their "pip install" errors by hiding the
module (sys.modules[name] = None), which behaves the same whether or not the package is installed.
"""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch
import transformers.optimization

from library.cli import config
from library.cli.optim_args import add_optimizer_arguments, optimizer_settings_from_args
from library.cli.training_args import add_training_arguments
from library.training.optimizer_names import OPTIMIZERS
from library.training.optim import (
    OptimizerSettings,
    build_optimizer,
    build_optimizer_and_scheduler,
    build_scheduler,
    effective_scheduler_name,
    is_schedule_free,
    parse_optimizer_args,
    parse_step_count,
    scheduler_steps,
)

def _params(n: int = 1) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.full((4,), 2.0)) for _ in range(n)]


def _sgd(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD(_params(), lr=lr)


def _lrs(scheduler, optimizer, steps: list[int]) -> list[float]:
    """The LR after stepping the scheduler to each of `steps` (ascending), as the training loop would."""
    out, current = [], 0
    for target in steps:
        while current < target:
            optimizer.step()
            scheduler.step()
            current += 1
        out.append(scheduler.get_last_lr()[0])
    return out


# --------------------------------------------------------------------------------------------------------
# --optimizer_args
# --------------------------------------------------------------------------------------------------------


def test_parse_optimizer_args_reads_python_literals_and_keeps_other_text():
    parsed = parse_optimizer_args(["weight_decay=0.01", "betas=(0.9,0.99)", "betas2=0.9, 0.999", "decouple=True",
                                   "use_bias_correction=false", "safeguard=NONE", "eps=1e-8", "d_coef=auto",
                                   "n=3", "step_rules=1:10,0.1"])
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.99), "betas2": (0.9, 0.999), "decouple": True,
                      "use_bias_correction": False, "safeguard": None, "eps": 1e-8, "d_coef": "auto", "n": 3,
                      "step_rules": "1:10,0.1"}
    assert parse_optimizer_args(None) == {}


@pytest.mark.parametrize("items, fragment", [
    (["weight_decay=0.1", "momentum"], "--optimizer_args: 'momentum' is not key=value"),
    (["=0.1"], "'=0.1' is not key=value"),
    (["weight decay=0.1"], "'weight decay=0.1' is not key=value"),
    (["eps=1", "eps=2"], "'eps' is given twice"),
])
def test_parse_optimizer_args_names_the_bad_item(items, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_optimizer_args(items)
    with pytest.raises(ValueError, match="--lr_scheduler_args"):
        parse_optimizer_args(items, flag="--lr_scheduler_args")


# --------------------------------------------------------------------------------------------------------
# Optimizers from torch / transformers (installed)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, "", "AdamW", "adamw", "ADAMW"])
def test_adamw_is_the_case_insensitive_default(name):
    optimizer, description = build_optimizer(name, _params(), 1e-4, {"weight_decay": 0.01, "betas": (0.9, 0.99)})
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["lr"] == 1e-4
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert description == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert build_optimizer(name, _params(), 1e-4, {})[1] == "torch.optim.adamw.AdamW"


def test_sgd_nesterov_defaults_momentum_and_forces_nesterov():
    optimizer, description = build_optimizer("sgdnesterov", _params(), 0.1, {})
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.1, 0.9, True)
    assert description == "torch.optim.sgd.SGD(momentum=0.9,nesterov=True)"

    optimizer, _ = build_optimizer("SGDNesterov", _params(), 0.1, {"momentum": 0.5, "nesterov": False})
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["nesterov"]) == (0.5, True)


def test_param_group_dicts_are_copied_not_mutated():
    first, second = _params(2)
    groups = [{"params": [first], "lr": 1e-3}, {"params": [second], "lr": 1e-4}]
    optimizer, _ = build_optimizer("AdamW", groups, 1e-5, {})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]

    optimizer, _ = build_optimizer("Adafactor", groups, 1e-5, {})  # pops the group lrs, on its own copies
    assert groups == [{"params": [first], "lr": 1e-3}, {"params": [second], "lr": 1e-4}]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-5]


def test_adafactor_defaults_to_relative_step_and_forces_its_scheduler(caplog):
    with caplog.at_level(logging.WARNING, logger="library.training.optim"):
        optimizer, description = build_optimizer("adafactor", _params(), 1e-3, {})
    assert "only reported" in caplog.text
    assert type(optimizer) is transformers.optimization.Adafactor
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    assert optimizer.param_groups[0]["lr"] == 1e-3  # reported only
    assert description == "transformers.optimization.Adafactor(relative_step=True)"
    assert effective_scheduler_name("cosine", optimizer) == "adafactor:0.001"

    scheduler = build_scheduler("cosine", optimizer, num_training_steps=100, num_warmup_steps=0)
    assert type(scheduler) is transformers.optimization.AdafactorSchedule
    assert scheduler.get_last_lr() == [1e-3]  # before the first step: the initial lr
    optimizer.param_groups[0]["params"][0].grad = torch.ones(4)
    optimizer.step()
    scheduler.step()
    # Adafactor's own step size at step 1: min(1e-2, 1/sqrt(1)) * RMS(param) = 0.01 * 2.
    assert scheduler.get_last_lr() == [pytest.approx(0.02)]

    explicit = build_scheduler("adafactor:0.5", build_optimizer("Adafactor", _params(), 1e-3, {})[0], 100, 0)
    assert explicit.get_last_lr() == [0.5]


def test_adafactor_relative_step_rules():
    optimizer, description = build_optimizer("Adafactor", _params(), 1e-3, {"relative_step": False,
                                                                             "warmup_init": True})
    assert optimizer.defaults["relative_step"] is True  # warmup_init needs it
    assert description == "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"
    with pytest.raises(ValueError, match="warmup_init=True to --optimizer_args"):
        build_scheduler("constant_with_warmup", optimizer, num_training_steps=100, num_warmup_steps=10)

    args = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    optimizer, _ = build_optimizer("Adafactor", _params(), 1e-3, args)
    assert optimizer.defaults["lr"] == 1e-3
    scheduler = build_scheduler("linear", optimizer, num_training_steps=100, num_warmup_steps=10)
    assert type(scheduler) is torch.optim.lr_scheduler.LambdaLR
    assert _lrs(scheduler, optimizer, [5]) == [pytest.approx(5e-4)]
    assert effective_scheduler_name("linear", optimizer) == "linear"
    with pytest.raises(ValueError, match="needs --optimizer_type Adafactor with relative_step=True"):
        build_scheduler("adafactor", optimizer, num_training_steps=100, num_warmup_steps=0)


@pytest.mark.parametrize("name, cls", [
    ("torch.optim.RAdam", torch.optim.RAdam),
    ("RAdam", torch.optim.RAdam),
    ("radam", torch.optim.RAdam),
    ("Adagrad", torch.optim.Adagrad),
    ("transformers.optimization.Adafactor", transformers.optimization.Adafactor),
])
def test_dotted_paths_and_bare_torch_names(name, cls):
    optimizer, description = build_optimizer(name, _params(), 1e-3, {})
    assert type(optimizer) is cls
    assert description.startswith(f"{cls.__module__}.{cls.__name__}")


def test_unknown_names_and_bad_paths_fail_clearly():
    with pytest.raises(ValueError, match=r"unknown --optimizer_type 'AdamW9bit'\. Did you mean AdamW8bit") as info:
        build_optimizer("AdamW9bit", _params(), 1e-3, {})
    assert "Prodigy" in str(info.value) and "torch.optim.RAdam" in str(info.value)
    with pytest.raises(ValueError, match="Did you mean Prodigy"):
        build_optimizer("prodigi", _params(), 1e-3, {})
    with pytest.raises(ValueError, match="module torch.optim has no class Nope"):
        build_optimizer("torch.optim.Nope", _params(), 1e-3, {})
    with pytest.raises(ImportError, match="--optimizer_type notapkg.optim.Foo needs notapkg: pip install notapkg"):
        build_optimizer("notapkg.optim.Foo", _params(), 1e-3, {})
    with pytest.raises(TypeError, match="rejected the arguments.*check --optimizer_args"):
        build_optimizer("AdamW", _params(), 1e-3, {"momentum": 0.9})
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer("AdamW", [], 1e-3, {})


# --------------------------------------------------------------------------------------------------------
# Optional packages: errors when absent, and the name table against fake modules
# --------------------------------------------------------------------------------------------------------


def hide_package(monkeypatch: pytest.MonkeyPatch, top: str) -> None:
    """Make ``import top`` and ``import top.anything`` fail as if the package were not installed (bitsandbytes
    is installed for the test suite, and an earlier test may already have imported its submodules)."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, top, None)


@pytest.mark.parametrize("name", [spec.name for spec in OPTIMIZERS.values() if spec.pip])
def test_missing_optional_package_names_pip(name, monkeypatch):
    spec = OPTIMIZERS[name.lower()]
    hide_package(monkeypatch, spec.module.split(".")[0])  # the test means the same whether or not it is installed
    with pytest.raises(ImportError) as info:
        build_optimizer(name, _params(), 1.0, {})
    assert str(info.value) == f"--optimizer_type {name} needs {spec.pip}: pip install {spec.pip}"


def test_missing_package_message_for_adamw8bit_is_kohya_users_friendly(monkeypatch):
    hide_package(monkeypatch, "bitsandbytes")
    with pytest.raises(ImportError, match=r"^--optimizer_type AdamW8bit needs bitsandbytes: pip install "
                                          r"bitsandbytes$"):
        build_optimizer("adamw8bit", _params(), 1e-4, {})
    with pytest.raises(ImportError, match="needs bitsandbytes: pip install bitsandbytes"):
        build_optimizer("bitsandbytes.optim.AdEMAMix8bit", _params(), 1e-4, {})


def _fake_class(name: str, module: str, schedule_free: bool = False) -> type:
    class Fake(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3, **kwargs):
            self.kwargs = kwargs
            self.mode = None
            super().__init__(params, {"lr": lr, **kwargs})

        def step(self, closure=None):
            return None

    if schedule_free:
        Fake.train = lambda self: setattr(self, "mode", "train")
        Fake.eval = lambda self: setattr(self, "mode", "eval")
    Fake.__name__ = Fake.__qualname__ = name
    Fake.__module__ = module
    return Fake


@pytest.fixture
def fake_packages(monkeypatch):
    """Fake bitsandbytes/lion_pytorch/prodigyopt/dadaptation/schedulefree modules holding every table class."""
    modules: dict[str, types.ModuleType] = {}
    for spec in OPTIMIZERS.values():
        if not spec.pip:
            continue
        parts = spec.module.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in modules:
                modules[name] = types.ModuleType(name)
                if depth > 1:
                    setattr(modules[".".join(parts[:depth - 1])], parts[depth - 1], modules[name])
        setattr(modules[spec.module], spec.attr,
                _fake_class(spec.attr, spec.module, schedule_free=spec.module == "schedulefree"))
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("name, path", [
    ("AdamW8bit", "bitsandbytes.optim.AdamW8bit"),
    ("PagedAdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"),
    ("PagedAdamW", "bitsandbytes.optim.PagedAdamW"),
    ("PagedAdamW32bit", "bitsandbytes.optim.PagedAdamW32bit"),
    ("Lion8bit", "bitsandbytes.optim.Lion8bit"),
    ("PagedLion8bit", "bitsandbytes.optim.PagedLion8bit"),
    ("Lion", "lion_pytorch.Lion"),
    ("Prodigy", "prodigyopt.Prodigy"),
    ("DAdaptation", "dadaptation.experimental.DAdaptAdamPreprint"),
    ("DAdaptAdamPreprint", "dadaptation.experimental.DAdaptAdamPreprint"),
    ("DAdaptAdaGrad", "dadaptation.DAdaptAdaGrad"),
    ("DAdaptAdam", "dadaptation.DAdaptAdam"),
    ("DAdaptAdan", "dadaptation.DAdaptAdan"),
    ("DAdaptAdanIP", "dadaptation.experimental.DAdaptAdanIP"),
    ("DAdaptLion", "dadaptation.DAdaptLion"),
    ("DAdaptSGD", "dadaptation.DAdaptSGD"),
    ("AdamWScheduleFree", "schedulefree.AdamWScheduleFree"),
    ("RAdamScheduleFree", "schedulefree.RAdamScheduleFree"),
    ("SGDScheduleFree", "schedulefree.SGDScheduleFree"),
])
def test_optional_names_pick_their_class(name, path, fake_packages):
    optimizer, description = build_optimizer(name.upper(), _params(), 1.0, {"weight_decay": 0.1})
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == path
    assert optimizer.param_groups[0]["lr"] == 1.0 and optimizer.kwargs == {"weight_decay": 0.1}
    assert description == f"{path}(weight_decay=0.1)"
    assert is_schedule_free(optimizer) == name.endswith("ScheduleFree")


def test_sgd_nesterov_8bit_gets_momentum_and_nesterov(fake_packages):
    optimizer, description = build_optimizer("SGDNesterov8bit", _params(), 0.1, {})
    assert type(optimizer).__name__ == "SGD8bit" and optimizer.kwargs == {"momentum": 0.9, "nesterov": True}
    assert description == "bitsandbytes.optim.SGD8bit(momentum=0.9,nesterov=True)"


def test_old_bitsandbytes_without_the_class(fake_packages, monkeypatch):
    monkeypatch.delattr(sys.modules["bitsandbytes.optim"], "PagedAdamW8bit")
    with pytest.raises(ImportError, match="needs bitsandbytes.optim.PagedAdamW8bit, which the installed "
                                          "bitsandbytes lacks: pip install -U bitsandbytes"):
        build_optimizer("PagedAdamW8bit", _params(), 1.0, {})


def test_adaptive_optimizers_warn_about_low_and_multiple_lrs(fake_packages, caplog):
    first, second = _params(2)
    with caplog.at_level(logging.WARNING, logger="library.training.optim"):
        build_optimizer("Prodigy", [{"params": [first], "lr": 0.05}, {"params": [second], "lr": 1.0}], 1.0, {})
    assert "learning rate 0.05 is very low" in caplog.text
    assert "several learning rates [0.05, 1.0]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.training.optim"):
        optimizer, _ = build_optimizer("DAdaptAdam", _params(), 1.0, {})
    assert caplog.text == ""
    # A D-Adapt optimizer may still be scheduled (the schedule scales its estimated step).
    scheduler = build_scheduler("cosine", optimizer, num_training_steps=100, num_warmup_steps=0)
    assert _lrs(scheduler, optimizer, [50]) == [pytest.approx(0.5)]


def test_schedule_free_is_in_train_mode_and_gets_a_constant_scheduler(fake_packages, caplog):
    optimizer, _ = build_optimizer("AdamWScheduleFree", _params(), 0.01, {})
    assert optimizer.mode == "train" and is_schedule_free(optimizer)
    assert not is_schedule_free(_sgd())
    assert is_schedule_free(types.SimpleNamespace(optimizer=optimizer))  # seen through a wrapper (accelerate's)
    with caplog.at_level(logging.WARNING, logger="library.training.optim"):
        scheduler = build_scheduler("cosine", optimizer, num_training_steps=100, num_warmup_steps=0)
    assert "ignoring --lr_scheduler cosine" in caplog.text
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert _lrs(scheduler, optimizer, [1, 50, 100]) == [0.01, 0.01, 0.01]
    assert effective_scheduler_name("cosine", optimizer) == "constant"
    with pytest.raises(ValueError, match="warmup_steps=N in --optimizer_args"):
        build_scheduler("constant", optimizer, num_training_steps=100, num_warmup_steps=5)


# --------------------------------------------------------------------------------------------------------
# Schedulers at hand-computed steps (lr 1.0, so the LR is the schedule's factor)
# --------------------------------------------------------------------------------------------------------


def _schedule(name: str, steps: list[int], total: int = 100, warmup: int = 0, **kwargs) -> list[float]:
    optimizer = _sgd(1.0)
    scheduler = build_scheduler(name, optimizer, num_training_steps=total, num_warmup_steps=warmup, **kwargs)
    return _lrs(scheduler, optimizer, steps)


def test_linear_warms_up_then_decays_to_zero():
    # warm-up 10 of 100: s/10, then (100 - s) / 90
    assert _schedule("linear", [0, 5, 10, 55, 100], warmup=10) == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


def test_cosine():
    half_cos_quarter = 0.5 * (1 + math.cos(math.pi / 4))
    assert _schedule("cosine", [0, 25, 50, 100]) == pytest.approx([1.0, half_cos_quarter, 0.5, 0.0])
    assert _schedule("COSINE", [5, 60], total=110, warmup=10) == pytest.approx([0.5, 0.5])


def test_constant_and_constant_with_warmup():
    assert _schedule("constant", [0, 50, 100]) == [1.0, 1.0, 1.0]
    assert _schedule("constant_with_warmup", [0, 2, 4, 90], warmup=4) == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_cosine_with_restarts_cycles():
    # 2 cycles over 100 steps: 0.5 * (1 + cos(pi * ((2 * s / 100) mod 1)))
    expected = [1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 0.98)), 1.0, 0.5, 0.0]
    assert _schedule("cosine_with_restarts", [0, 25, 49, 50, 75, 100], num_cycles=2) == pytest.approx(expected)


def test_polynomial_power_two():
    # (1 - lr_end) * (1 - (s - 10) / 100) ** 2 + lr_end, lr_end 1e-7 (diffusers' default) or from the args
    lr_end = 1e-7
    assert _schedule("polynomial", [5, 60, 110], total=110, warmup=10, power=2.0) == pytest.approx(
        [0.5, (1 - lr_end) * 0.25 + lr_end, lr_end])
    assert _schedule("polynomial", [60], total=110, warmup=10, power=2.0, scheduler_args={"lr_end": 0.2}) == \
        pytest.approx([0.8 * 0.25 + 0.2])


def test_inverse_sqrt():
    # timescale defaults to the warm-up: 1 / sqrt(s / 4) after 4 warm-up steps
    assert _schedule("inverse_sqrt", [2, 4, 16], warmup=4) == pytest.approx([0.5, 1.0, 0.5])
    # timescale 10, no warm-up: 1 / sqrt((s + 10) / 10)
    assert _schedule("inverse_sqrt", [30], timescale=10) == pytest.approx([0.5])


def test_cosine_with_min_lr_is_one_half_cosine_per_cycle():
    # min 0.1: 0.1 + 0.9 * 0.5 * (1 + cos(pi * s / 100))
    assert _schedule("cosine_with_min_lr", [0, 50, 100], min_lr_ratio=0.1) == pytest.approx([1.0, 0.55, 0.1])
    with pytest.raises(ValueError, match="needs --lr_scheduler_min_lr_ratio"):
        _schedule("cosine_with_min_lr", [0])


def test_warmup_stable_decay():
    # 10 warm-up, 70 stable, 20 cosine decay to 0.1 (all phases scaled into [0.1, 1])
    values = _schedule("warmup_stable_decay", [5, 10, 50, 79, 90, 100], warmup=10, decay_steps=20,
                       min_lr_ratio=0.1)
    assert values == pytest.approx([0.55, 1.0, 1.0, 1.0, 0.55, 0.1])
    with pytest.raises(ValueError, match="10 warm-up \\+ 95 decay steps exceed the 100"):
        _schedule("warmup_stable_decay", [0], warmup=10, decay_steps=95)


def test_piecewise_constant_thresholds_are_absolute_steps():
    values = _schedule("piecewise_constant", [0, 9, 10, 19, 20, 90],
                       scheduler_args={"step_rules": "1:10,0.1:20,0.01"})
    assert values == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="needs --lr_scheduler_args step_rules="):
        _schedule("piecewise_constant", [0])


def test_custom_scheduler_class():
    for scheduler_type in ("torch.optim.lr_scheduler.StepLR", "StepLR"):
        assert _schedule("constant", [1, 2, 4], scheduler_type=scheduler_type,
                         scheduler_args={"step_size": 2, "gamma": 0.5}) == pytest.approx([1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="does not use --lr_warmup_steps"):
        _schedule("constant", [0], warmup=5, scheduler_type="StepLR", scheduler_args={"step_size": 2})
    with pytest.raises(ValueError, match="no such class"):
        _schedule("constant", [0], scheduler_type="torch.optim.lr_scheduler.Nope")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "cosin"}, "unknown --lr_scheduler 'cosin'. Did you mean cosine"),
    ({"name": "constant", "warmup": 5}, "has no warm-up; set --lr_warmup_steps 0 or use constant_with_warmup"),
    ({"name": "linear", "decay_steps": 5}, "--lr_decay_steps is only used by warmup_stable_decay"),
    ({"name": "linear", "warmup": 101}, "101 warm-up steps exceed the 100 training steps"),
    ({"name": "polynomial", "scheduler_args": {"lr_min": 0.1}}, "lr_min: not a parameter of the polynomial"),
    ({"name": "cosine_with_restarts", "scheduler_args": {"num_cycles": 3}}, "set by the dedicated --lr_\\* flags"),
    ({"name": "adafactor"}, "needs --optimizer_type Adafactor"),
])
def test_scheduler_errors(kwargs, fragment):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=fragment):
        _schedule(name, [0], **{"warmup": 0, **kwargs})


# --------------------------------------------------------------------------------------------------------
# Step counts, num_processes, flags
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, total, steps", [
    ("100", 1000, 100), (100, 1000, 100), ("0", 10, 0), (0.1, 1000, 100), ("0.1", 95, 10), ("10%", 95, 10),
    ("0.07", 100, 7), (0.07, 100, 7), ("7.5%", 100, 8), ("100%", 40, 40), ("100.0", 1000, 100), ("1e2", 500, 100),
])
def test_parse_step_count_forms(value, total, steps):
    assert parse_step_count(value, total, "--lr_warmup_steps") == steps


@pytest.mark.parametrize("value, fragment", [
    ("-5", "--lr_warmup_steps must not be negative"), (-0.1, "must not be negative"),
    ("150%", "at most 100%"), ("1.5", "a ratio must be below 1"), ("abc", "steps \\(100\\), a ratio"),
    ("1/2", "steps \\(100\\), a ratio"), (True, "steps \\(100\\)"), ("2000", "2000 steps, more than the 1000"),
])
def test_parse_step_count_errors(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_step_count(value, 1000, "--lr_warmup_steps")


def test_scheduler_steps_scale_with_processes():
    assert scheduler_steps(50, 4) == 200
    with pytest.raises(ValueError):
        scheduler_steps(50, 0)


def test_build_optimizer_and_scheduler_scales_all_counts_by_processes():
    settings = OptimizerSettings(optimizer_type="AdamW", learning_rate=1.0, lr_scheduler="linear",
                                 lr_warmup_steps="10%")
    optimizer, scheduler, description = build_optimizer_and_scheduler(settings, _params(), 50, num_processes=2)
    assert description == "torch.optim.adamw.AdamW"
    # 100 scheduler steps, 10 of warm-up (5 optimizer steps x 2 processes)
    assert [scheduler.lr_lambdas[0](s) for s in (5, 10, 55, 100)] == pytest.approx([0.5, 1.0, 0.5, 0.0])


def _parse(argv: list[str]):
    parser = config.build_parser("test", add_training_arguments, add_optimizer_arguments)
    return config.parse_args(parser, argv)


def test_flags_defaults_and_settings():
    settings = optimizer_settings_from_args(_parse([]))
    assert settings == OptimizerSettings(optimizer_type="AdamW", learning_rate=2e-6, optimizer_args={},
                                         lr_scheduler="constant", lr_warmup_steps="0", lr_decay_steps="0")
    args = _parse(["--optimizer_type", "Prodigy", "--optimizer_args", "d_coef=2", "betas=(0.9,0.99)",
                   "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "5%", "--lr_decay_steps", "0.2",
                   "--lr_scheduler_num_cycles", "3", "--lr_scheduler_power", "2", "--lr_scheduler_timescale", "7",
                   "--lr_scheduler_min_lr_ratio", "0.1", "--lr_scheduler_args", "warmup_type=cosine"])
    assert optimizer_settings_from_args(args) == OptimizerSettings(
        optimizer_type="Prodigy", learning_rate=2e-6, optimizer_args={"d_coef": 2, "betas": (0.9, 0.99)},
        lr_scheduler="warmup_stable_decay", lr_warmup_steps="5%", lr_decay_steps="0.2", lr_scheduler_num_cycles=3,
        lr_scheduler_power=2.0, lr_scheduler_timescale=7, lr_scheduler_min_lr_ratio=0.1,
        lr_scheduler_args={"warmup_type": "cosine"})


@pytest.mark.parametrize("flag, target", [("--use_8bit_adam", "AdamW8bit"), ("--use_lion_optimizer", "Lion")])
def test_legacy_flags_map_with_a_deprecation_warning(flag, target, caplog):
    with caplog.at_level(logging.WARNING, logger="library.training.optim"):
        settings = optimizer_settings_from_args(_parse([flag]))
    assert settings.optimizer_type == target
    assert f"{flag} is deprecated: use --optimizer_type {target}" in caplog.text


@pytest.mark.parametrize("argv, fragment", [
    (["--use_8bit_adam", "--use_lion_optimizer"], "are exclusive"),
    (["--use_lion_optimizer", "--optimizer_type", "Prodigy"], "--use_lion_optimizer conflicts with --optimizer_type"),
    (["--optimizer_args", "lr"], "'lr' is not key=value"),
    (["--lr_scheduler_args", "oops"], "--lr_scheduler_args: 'oops'"),
    (["--lr_warmup_steps", "ten"], "--lr_warmup_steps must be steps"),
    (["--lr_decay_steps", "-3"], "--lr_decay_steps must not be negative"),
    (["--lr_scheduler", "cosine_restarts"], "Did you mean cosine_with_restarts"),
])
def test_flag_errors_at_parse_time(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert fragment in capsys.readouterr().err
