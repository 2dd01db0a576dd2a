"""Optimizers and learning-rate schedulers by name (kohya's `--optimizer_type` / `--lr_scheduler` vocabulary).

The training loop uses this module in four calls::

    settings = OptimizerSettings(...)       # from the flags by library.cli.optim_args.optimizer_settings_from_args
    optimizer, scheduler, description = build_optimizer_and_scheduler(
        settings, param_groups, max_train_steps, accelerator.num_processes)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    ...
    if is_schedule_free(optimizer): optimizer.eval()  # before sampling/saving; optimizer.train() after

Things the loop author must know:

* **Step units.** accelerate's prepared scheduler steps `num_processes` times per optimizer step (it assumes
  the per-process batches grew the global batch), and does not step at all on accumulation micro-steps. So
  the scheduler must be built for `max_train_steps * num_processes` steps. `build_scheduler` takes counts in
  *scheduler* steps and does no conversion; `scheduler_steps()` converts, and
  `build_optimizer_and_scheduler` applies it to the total, the warm-up and the decay alike. (kohya scaled the
  total and ratio warm-ups but not an integer `--lr_warmup_steps`, so on 2 GPUs its warm-up was half as long
  in optimizer steps; we scale all three.)
* **Adafactor** with `relative_step=True` (its default here, as in kohya) computes its own step size and
  warm-up. The LR you give is only reported (it is stored in the param groups for logging and ignored by the
  update), per-group LRs are dropped, and `build_scheduler` replaces whatever `--lr_scheduler` names with
  transformers' `AdafactorSchedule` - kohya's rewrite to `adafactor:<lr>`, done here without mutating the flags.
  A non-zero warm-up is an error there: ask Adafactor for one with `warmup_init=True`.
* **Schedule-free** optimizers (`*ScheduleFree`) keep two weight sequences; they must be in `train()` mode
  for steps and `eval()` mode to sample or save. `build_optimizer` leaves them in train mode;
  `is_schedule_free` tells the loop when to switch. They get a constant scheduler (a real `LambdaLR`, so
  accelerate can checkpoint it) that never changes the LR.
* The description string is kohya's `ss_optimizer` metadata format: `module.Class(k=v,k=v)`.

Optional packages (bitsandbytes, lion-pytorch, prodigyopt, dadaptation, schedulefree) are imported only
when named, and a missing one fails with the pip command.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import torch

from library.training.optimizer_names import OPTIMIZERS, PIP_NAMES, OptimizerSpec

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# --optimizer_args / --lr_scheduler_args
# --------------------------------------------------------------------------------------------------------

_WORD_LITERALS: Mapping[str, Any] = MappingProxyType({"true": True, "false": False, "none": None, "null": None})


class OptimizerArgumentsError(TypeError):
    """The optimizer class refused ``--optimizer_args`` (a user error: reported as one line)."""


def parse_optimizer_args(items: Iterable[str] | None, flag: str = "--optimizer_args") -> dict[str, Any]:
    """`["weight_decay=0.01", "betas=(0.9,0.99)"]` -> `{"weight_decay": 0.01, "betas": (0.9, 0.99)}`.

    Values are Python literals (ast.literal_eval); anything that is not one stays a string, so
    `decouple=True` is a bool but `d_coef=auto` is "auto". `true`/`false`/`none` in any case are read as the
    literals too, because a TOML or shell user writes them that way and the string "false" is truthy.
    Also used for `--lr_scheduler_args` (pass `flag` so the error names the right flag).
    """
    parsed: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{flag}: '{item}' is not key=value (e.g. weight_decay=0.01 betas=(0.9,0.999))")
        if key in parsed:
            raise ValueError(f"{flag}: '{key}' is given twice")
        parsed[key] = _literal(text)
    return parsed


def _literal(text: str) -> Any:
    if text.lower() in _WORD_LITERALS:
        return _WORD_LITERALS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# --------------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------------


def known_optimizer_names() -> list[str]:
    """The table's canonical names, for help texts and error messages."""
    return [spec.name for spec in OPTIMIZERS.values()]


def build_optimizer(optimizer_type: str | None, params: Iterable[Any], learning_rate: float,
                    optimizer_args: Mapping[str, Any] | None = None) -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer `optimizer_type` names, with kohya's per-optimizer rules.

    `optimizer_type` is a table name (case-insensitive; empty = AdamW), a dotted class path
    (`torch.optim.RAdam`, `bitsandbytes.optim.AdEMAMix8bit`) or a bare torch.optim class name (`RAdam`,
    any case). `params` is what torch optimizers take: tensors or param-group dicts (which are copied, never
    mutated). Returns the optimizer and its `module.Class(k=v,...)` description for logs and metadata.
    """
    kwargs = dict(optimizer_args or {})
    groups = _copy_param_groups(params)
    name = (optimizer_type or "AdamW").strip()
    spec = OPTIMIZERS.get(name.lower())
    cls = optimizer_class(name)
    if spec is not None:
        for key, value in spec.defaults:
            kwargs.setdefault(key, value)
        kwargs.update(spec.forced)

    lr: float | None = learning_rate
    relative_step = False
    if _is_adafactor_class(cls):
        relative_step = _apply_adafactor_rules(kwargs, groups, learning_rate)
        if relative_step:
            lr = None  # transformers refuses an lr together with relative_step
    if spec is not None and (spec.name.startswith("DAdapt") or spec.name == "Prodigy"):
        _warn_adaptive_lr(spec.name, groups, learning_rate)

    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except TypeError as error:
        raise OptimizerArgumentsError(f"--optimizer_type {name}: {cls.__module__}.{cls.__name__} rejected the "
                                      f"arguments {kwargs} ({error}); check --optimizer_args") from error

    if relative_step:
        # Reported LR only (AdafactorSchedule reports it before the first step; the update ignores it).
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
    if is_schedule_free(optimizer):
        optimizer.train()
    args_text = ",".join(f"{key}={value}" for key, value in kwargs.items())
    description = f"{cls.__module__}.{cls.__name__}" + (f"({args_text})" if args_text else "")
    logger.info("optimizer: %s, lr=%s", description, learning_rate)
    return optimizer, description


def optimizer_class(optimizer_type: str | None) -> type:
    """The class `--optimizer_type` names, imported (a missing optional package is an ImportError naming it).

    Cheap and model-free, so start-up can check it before any weights load.
    """
    name = (optimizer_type or "AdamW").strip()
    spec = OPTIMIZERS.get(name.lower())
    return _import_spec_class(spec) if spec is not None else _resolve_custom_class(name)


def is_schedule_free(optimizer: Any) -> bool:
    """True for schedule-free optimizers, which the loop must switch with train()/eval().

    Recognised by class (a `*ScheduleFree*` class or one from the schedulefree package) that has both
    methods; accelerate's AcceleratedOptimizer wrapper is looked through.
    """
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        cls = type(candidate)
        named = "schedulefree" in cls.__name__.lower() or cls.__module__.split(".")[0] == "schedulefree"
        if candidate is not None and named and _has_train_eval(candidate):
            return True
    return False


def _has_train_eval(obj: Any) -> bool:
    return callable(getattr(obj, "train", None)) and callable(getattr(obj, "eval", None))


def _copy_param_groups(params: Iterable[Any]) -> list[Any]:
    """A list torch optimizers accept; dict groups are copied so popping 'lr' never touches the caller's."""
    items = list(params)
    if not items:
        raise ValueError("the optimizer got no parameters to train")
    return [dict(item) if isinstance(item, Mapping) else item for item in items]


def _import_spec_class(spec: OptimizerSpec) -> type:
    module = _import_for(spec.module, f"--optimizer_type {spec.name}", spec.pip)
    cls = getattr(module, spec.attr, None)
    if cls is None:
        package = spec.pip or spec.module.split(".")[0]
        raise ImportError(f"--optimizer_type {spec.name} needs {spec.module}.{spec.attr}, which the installed "
                          f"{package} lacks: pip install -U {package}")
    return cls


def _import_for(module_name: str, what: str, pip: str | None) -> Any:
    """Import `module_name`; a missing package becomes '<what> needs <pip>: pip install <pip>'."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        top = module_name.split(".")[0]
        package = pip or PIP_NAMES.get(top, top)
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ImportError(f"{what} needs {package}: pip install {package}") from error
        raise ImportError(f"{what}: importing {module_name} failed: {error}") from error


def _resolve_custom_class(name: str) -> type:
    """A dotted path `pkg.mod.Class`, or a bare torch.optim class name in any case."""
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        module = _import_for(module_name, f"--optimizer_type {name}", None)
        cls = getattr(module, attr, None)
        if not callable(cls):
            raise ValueError(f"--optimizer_type {name}: module {module_name} has no class {attr}")
        return cls
    torch_classes = _torch_optimizer_classes()
    cls = torch_classes.get(name.lower())
    if cls is not None:
        return cls
    raise ValueError(_unknown_optimizer_message(name, torch_classes))


def _torch_optimizer_classes() -> dict[str, type]:
    classes = {}
    for attr in dir(torch.optim):
        value = getattr(torch.optim, attr)
        if isinstance(value, type) and issubclass(value, torch.optim.Optimizer) and value is not torch.optim.Optimizer:
            classes[attr.lower()] = value
    return classes


def _unknown_optimizer_message(name: str, torch_classes: Mapping[str, type]) -> str:
    known = known_optimizer_names()
    torch_names = sorted(cls.__name__ for key, cls in torch_classes.items() if key not in OPTIMIZERS)
    candidates = {n.lower(): n for n in known + torch_names}
    close = difflib.get_close_matches(name.lower(), list(candidates), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(candidates[c] for c in close)}?" if close else ""
    return (f"unknown --optimizer_type '{name}'.{hint} Known: {', '.join(known)}; torch.optim: "
            f"{', '.join(torch_names)}; or a dotted class path such as torch.optim.RAdam.")


def _is_adafactor_class(cls: type) -> bool:
    return cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers")


def _apply_adafactor_rules(kwargs: dict[str, Any], groups: list[Any], learning_rate: float) -> bool:
    """kohya's Adafactor defaults; returns whether Adafactor runs its own (relative-step) schedule.

    relative_step defaults to True; warmup_init needs it, so warmup_init=True turns it on. With it, the LR
    is not used for updates: per-group LRs are dropped (with a warning) and the scheduler is forced.
    """
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; turning it on")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return False
    if learning_rate:
        logger.warning("Adafactor with relative_step=True sets its own step size; learning_rate=%s is only "
                       "reported (pass relative_step=False scale_parameter=False warmup_init=False in "
                       "--optimizer_args to use it)", learning_rate)
    dropped = [group.pop("lr") for group in groups if isinstance(group, dict) and "lr" in group]
    if dropped:
        logger.warning("Adafactor with relative_step=True: the per-group learning rates %s are ignored", dropped)
    return True


def _warn_adaptive_lr(name: str, groups: list[Any], learning_rate: float) -> None:
    """D-Adaptation/Prodigy estimate the step size; the LR is a multiplier that should be about 1.0."""
    lrs = [group.get("lr", learning_rate) for group in groups if isinstance(group, dict)] or [learning_rate]
    if lrs[0] <= 0.1:
        logger.warning("%s: learning rate %s is very low; these optimizers expect about 1.0", name, lrs[0])
    if len(set(lrs)) > 1:
        logger.warning("%s with several learning rates %s: the step size is estimated once, so the groups "
                       "only scale it", name, sorted(set(lrs)))


# --------------------------------------------------------------------------------------------------------
# Step counts
# --------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^\+?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INTEGER = re.compile(r"^\+?\d+$")


def parse_step_count(value: str | int | float, total_steps: int, what: str) -> int:
    """Steps from `100`, a ratio `0.1` (of total_steps, rounded up) or a percentage `"10%"`.

    Strings are read the way the CLI and TOML deliver them ("100", "0.1", "10%"). A float of 1 or more
    must be whole (100.0 = 100 steps). Errors name `what` (the flag) and reject negatives and counts past
    `total_steps`.
    """
    spec = parse_step_spec(value, what)
    steps = spec if isinstance(spec, int) else math.ceil(spec * total_steps)
    if steps > total_steps:
        raise ValueError(f"{what} {value} is {steps} steps, more than the {total_steps} training steps")
    return steps


def parse_step_spec(value: str | int | float, what: str) -> int | Fraction:
    """Syntax half of parse_step_count: an int of steps, or an exact Fraction of the total.

    Ratios are read exactly from their decimal text: in floats 0.07 * 100 is 7.000000000000001, which
    ceil would turn into 8 steps.
    """
    text = "" if isinstance(value, bool) else str(value).strip()
    percent = text.endswith("%")
    body = text[:-1].strip() if percent else text
    if body.startswith("-") and _NUMBER.match(body[1:]):
        raise ValueError(f"{what} must not be negative, got {value!r}")
    if not _NUMBER.match(body):
        raise ValueError(f"{what} must be steps (100), a ratio below 1 (0.1) or a percentage (10%), "
                         f"got {value!r}")
    number = Fraction(body)
    if percent:
        if number > 100:
            raise ValueError(f"{what} {value!r}: a percentage must be at most 100%")
        return number / 100
    if _INTEGER.match(body):
        return int(number)
    if number < 1:
        return number
    if number.denominator == 1:
        return int(number)
    raise ValueError(f"{what} {value!r}: a ratio must be below 1 (0.1 = 10%) and a step count whole")


def scheduler_steps(optimizer_steps: int, num_processes: int) -> int:
    """Scheduler steps for `optimizer_steps` under accelerate: it steps a prepared scheduler num_processes
    times per optimizer step (and not on accumulation micro-steps)."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    return optimizer_steps * num_processes


# --------------------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------------------

# Names served by diffusers' schedule functions, and by transformers' (diffusers lacks these three).
DIFFUSERS_SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                         "constant_with_warmup", "piecewise_constant")
TRANSFORMERS_SCHEDULERS: tuple[str, ...] = ("inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
SCHEDULER_NAMES: tuple[str, ...] = DIFFUSERS_SCHEDULERS + TRANSFORMERS_SCHEDULERS + ("adafactor",)
_NO_WARMUP = ("constant", "piecewise_constant")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, num_training_steps: int,
                    num_warmup_steps: int, num_cycles: int = 1, power: float = 1.0,
                    timescale: int | None = None, min_lr_ratio: float | None = None,
                    decay_steps: int | None = None, scheduler_type: str | None = None,
                    scheduler_args: Mapping[str, Any] | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR scheduler `name` (kohya's get_scheduler_fix semantics), all counts in *scheduler* steps.

    Use `scheduler_steps()` to convert optimizer steps (see the module docstring). The schedule
    functions come from diffusers (DIFFUSERS_SCHEDULERS) and transformers (TRANSFORMERS_SCHEDULERS);
    `scheduler_args` are passed to them as extra keyword arguments (`lr_end=1e-6` for polynomial,
    `step_rules="1:10,0.1:20,0.01"` for piecewise_constant, whose thresholds are absolute steps).
    As in kohya, cosine_with_min_lr and warmup_stable_decay get `num_cycles / 2` (1 = one half-cosine).
    `scheduler_type` (a dotted class path or a torch.optim.lr_scheduler name) overrides `name`.
    A flag a schedule would silently ignore (warm-up on constant, decay steps outside
    warmup_stable_decay) is an error.
    """
    extra = dict(scheduler_args or {})
    warmup, decay = int(num_warmup_steps or 0), int(decay_steps or 0)
    lowered = (name or "constant").strip().lower()
    if is_schedule_free(optimizer):
        return _schedule_free_scheduler(optimizer, lowered, warmup, scheduler_type)
    if _is_relative_step_adafactor(optimizer):
        return _adafactor_scheduler(optimizer, lowered, warmup, scheduler_type)
    if lowered.startswith("adafactor") and not scheduler_type:
        raise ValueError("--lr_scheduler adafactor needs --optimizer_type Adafactor with relative_step=True "
                         "(its default)")
    if scheduler_type:
        _reject_extra(f"--lr_scheduler_type {scheduler_type}", warmup=warmup, decay=decay)
        return _custom_scheduler(scheduler_type, optimizer, extra)
    if lowered not in SCHEDULER_NAMES:
        close = difflib.get_close_matches(lowered, SCHEDULER_NAMES, n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown --lr_scheduler '{name}'.{hint} Known: {', '.join(SCHEDULER_NAMES)}; or give "
                         "a class with --lr_scheduler_type module.Class")
    if lowered != "warmup_stable_decay" and decay:
        raise ValueError(f"--lr_decay_steps is only used by warmup_stable_decay, not {lowered}")
    if lowered in _NO_WARMUP and warmup:
        raise ValueError(f"--lr_scheduler {lowered} has no warm-up; set --lr_warmup_steps 0"
                         + (" or use constant_with_warmup" if lowered == "constant" else ""))
    if warmup > num_training_steps:
        raise ValueError(f"{warmup} warm-up steps exceed the {num_training_steps} training steps")
    kwargs = _named_schedule_kwargs(lowered, num_training_steps, warmup, num_cycles, power, timescale,
                                    min_lr_ratio, decay)
    return _call_schedule(lowered, optimizer, kwargs, extra)


def effective_scheduler_name(name: str, optimizer: Any) -> str:
    """The scheduler build_scheduler really builds, for logs: kohya's `adafactor:<lr>` / `constant`."""
    if is_schedule_free(optimizer):
        return "constant"
    if _is_relative_step_adafactor(optimizer):
        return f"adafactor:{optimizer.param_groups[0]['lr']}"
    return name


def _named_schedule_kwargs(name: str, total: int, warmup: int, num_cycles: int, power: float,
                           timescale: int | None, min_lr_ratio: float | None, decay: int) -> dict[str, Any]:
    """The keyword arguments each named schedule function takes, from the flags."""
    if name in _NO_WARMUP:
        return {}
    if name == "constant_with_warmup":
        return {"num_warmup_steps": warmup}
    if name == "inverse_sqrt":
        return {"num_warmup_steps": warmup, "timescale": timescale}
    if name == "warmup_stable_decay":
        stable = total - warmup - decay
        if stable < 0:
            raise ValueError(f"warmup_stable_decay: {warmup} warm-up + {decay} decay steps exceed the {total} "
                             "training steps")
        return {"num_warmup_steps": warmup, "num_stable_steps": stable, "num_decay_steps": decay,
                "num_cycles": num_cycles / 2, "min_lr_ratio": min_lr_ratio or 0.0}
    kwargs: dict[str, Any] = {"num_warmup_steps": warmup, "num_training_steps": total}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    elif name == "polynomial":
        kwargs["power"] = power
    elif name == "cosine_with_min_lr":
        if min_lr_ratio is None:
            raise ValueError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        kwargs.update(num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio)
    return kwargs


def _call_schedule(name: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any],
                   extra: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    function = _schedule_function(name)
    accepted = set(inspect.signature(function).parameters) - {"optimizer"}
    clashing = sorted(set(extra) & set(kwargs))
    if clashing:
        raise ValueError(f"--lr_scheduler_args {', '.join(clashing)}: set by the dedicated --lr_* flags; "
                         "use those instead")
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise ValueError(f"--lr_scheduler_args {', '.join(unknown)}: not a parameter of the {name} schedule "
                         f"(it takes {', '.join(sorted(accepted - set(kwargs)))})")
    if name == "piecewise_constant" and "step_rules" not in extra:
        raise ValueError("--lr_scheduler piecewise_constant needs --lr_scheduler_args "
                         "step_rules=\"1:10,0.1:20,0.01\" (multiplier:until_step, ..., final multiplier)")
    return function(optimizer, **kwargs, **extra)


def _schedule_function(name: str) -> Any:
    if name in DIFFUSERS_SCHEDULERS:
        from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION as TRANSFORMERS_FUNCTIONS
    from transformers.trainer_utils import SchedulerType as TransformersSchedulerType
    return TRANSFORMERS_FUNCTIONS[TransformersSchedulerType(name)]


def _reject_extra(what: str, warmup: int = 0, decay: int = 0) -> None:
    if warmup:
        raise ValueError(f"{what} does not use --lr_warmup_steps; set it to 0")
    if decay:
        raise ValueError(f"{what} does not use --lr_decay_steps; set it to 0")


def _custom_scheduler(scheduler_type: str, optimizer: torch.optim.Optimizer,
                      extra: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    """`module.Class` or a bare torch.optim.lr_scheduler name, built as Class(optimizer, **extra)."""
    if "." in scheduler_type:
        module_name, _, attr = scheduler_type.rpartition(".")
        module = _import_for(module_name, f"--lr_scheduler_type {scheduler_type}", None)
    else:
        module, attr = torch.optim.lr_scheduler, scheduler_type
    cls = getattr(module, attr, None)
    if not callable(cls):
        raise ValueError(f"--lr_scheduler_type {scheduler_type}: no such class in {module.__name__}")
    try:
        return cls(optimizer, **extra)
    except TypeError as error:
        raise TypeError(f"--lr_scheduler_type {scheduler_type} rejected --lr_scheduler_args {extra}: {error}") \
            from error


def _schedule_free_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int,
                             scheduler_type: str | None) -> torch.optim.lr_scheduler.LRScheduler:
    """A constant LambdaLR: schedule-free optimizers must not have their LR scheduled from outside."""
    if warmup:
        raise ValueError("schedule-free optimizers warm up themselves: set --lr_warmup_steps 0 and pass "
                         "warmup_steps=N in --optimizer_args")
    if scheduler_type or name != "constant":
        logger.warning("schedule-free optimizer: ignoring --lr_scheduler %s, the LR stays constant",
                       scheduler_type or name)
    from diffusers.optimization import get_constant_schedule
    return get_constant_schedule(optimizer)


def _is_relative_step_adafactor(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)
    return _is_adafactor_class(type(inner)) and bool(inner.defaults.get("relative_step"))


def _adafactor_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int,
                         scheduler_type: str | None) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' AdafactorSchedule: reports Adafactor's own step size (kohya's forced `adafactor:<lr>`).

    The initial LR it reports before the first step is the one in `adafactor:<lr>`, else the learning rate
    build_optimizer stored in the param groups.
    """
    if warmup:
        raise ValueError("Adafactor with relative_step=True schedules its own LR: set --lr_warmup_steps 0 "
                         "(add warmup_init=True to --optimizer_args for its built-in warm-up) or pass "
                         "relative_step=False scale_parameter=False warmup_init=False to use --lr_scheduler")
    if scheduler_type or not name.startswith("adafactor"):
        logger.info("Adafactor with relative_step=True: using the adafactor scheduler instead of %s",
                    scheduler_type or name)
    initial_lr = optimizer.param_groups[0].get("lr") or 0.0
    if name.startswith("adafactor:"):
        try:
            initial_lr = float(name.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--lr_scheduler {name}: expected adafactor:<initial lr>") from None
    from transformers.optimization import AdafactorSchedule
    return AdafactorSchedule(optimizer, initial_lr)


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSettings:
    """What the loop needs from the optimizer/scheduler flags, parsed once (the flags are not mutated)."""

    optimizer_type: str
    learning_rate: float
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: str | int | float = "0"
    lr_decay_steps: str | int | float = "0"
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str | None = None
    lr_scheduler_args: dict[str, Any] = field(default_factory=dict)


def build_optimizer_and_scheduler(settings: OptimizerSettings, params: Iterable[Any], max_train_steps: int,
                                  num_processes: int = 1) -> tuple[torch.optim.Optimizer, Any, str]:
    """Optimizer, scheduler and description; warm-up/decay ratios are of `max_train_steps` (optimizer
    steps), and every count is then scaled to accelerate's scheduler steps with `scheduler_steps`."""
    optimizer, description = build_optimizer(settings.optimizer_type, params, settings.learning_rate,
                                             settings.optimizer_args)
    warmup = parse_step_count(settings.lr_warmup_steps, max_train_steps, "--lr_warmup_steps")
    decay = parse_step_count(settings.lr_decay_steps, max_train_steps, "--lr_decay_steps")
    scheduler = build_scheduler(
        settings.lr_scheduler, optimizer,
        num_training_steps=scheduler_steps(max_train_steps, num_processes),
        num_warmup_steps=scheduler_steps(warmup, num_processes),
        num_cycles=settings.lr_scheduler_num_cycles, power=settings.lr_scheduler_power,
        timescale=settings.lr_scheduler_timescale, min_lr_ratio=settings.lr_scheduler_min_lr_ratio,
        decay_steps=scheduler_steps(decay, num_processes), scheduler_type=settings.lr_scheduler_type,
        scheduler_args=settings.lr_scheduler_args)
    return optimizer, scheduler, description
