"""`--fused_backward_pass`: step each parameter inside backward and free its gradient at once.

Why: a full fine-tune normally holds every gradient until `optimizer.step()`. Stepping a parameter as soon
as autograd has accumulated its gradient, then dropping that gradient, means the whole set never exists at
once (kohya measured about 17 GB for an SDXL full fine-tune at batch 1). This is exact only for optimizers
whose update of one parameter reads nothing but that parameter's gradient and state (AdamW, Adafactor, ...);
Prodigy/D-Adaptation estimate a step size from statistics over *all* parameters and schedule-free
optimizers keep their schedule in the param groups, so they are refused.

Design: `FusedBackwardOptimizer(optimizer)` wraps the optimizer `library.training.optim.build_optimizer` made (same
class, arguments and param groups) and, per trainable parameter, builds a one-parameter optimizer of the
same class plus a `register_post_accumulate_grad_hook` that clips that tensor's gradient (optional), steps
it and sets `.grad = None`. The wrapped optimizer stays the single source of truth:

* `param_groups` *is* the wrapped optimizer's list (the same dicts), so an LR scheduler built on the facade
  (or on the wrapped optimizer) sets every parameter's LR; each hook copies its group's hyperparameters
  (lr, betas, weight decay, ...) into its one-parameter optimizer just before stepping.
* `state` is the wrapped optimizer's state (the one-parameter optimizers write into it), so
  `state_dict()`/`load_state_dict()` are exactly the plain optimizer's: a checkpoint from a plain run
  resumes under fused backward and the other way round.
* `step()` and `zero_grad()` do nothing the hooks have not done (step runs a closure if given, zero_grad
  clears any gradient left, normally none), so the training loop keeps its usual calls.
* `.optimizer` is the wrapped optimizer, as on accelerate's AcceleratedOptimizer, so
  `library.training.optim.build_scheduler` still recognises relative-step Adafactor (-> AdafactorSchedule).

How the loop uses it::

    optimizer, scheduler, description = build_fused_optimizer_and_scheduler(
        settings, param_groups, max_train_steps, max_grad_norm=max_grad_norm)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)   # preparing is fine
    ...
    accelerator.backward(loss)      # the hooks clip, step and free every gradient here
    # no accelerator.clip_grad_norm_: the gradients are gone (clipping happened per tensor in the hooks)
    optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)   # as usual

Limits (each one an error, not a silent change):

* Gradient clipping is **per tensor**: each parameter's gradient is clipped to `--max_grad_norm` on its
  own. A global norm needs every gradient at once, which is what this mode avoids (kohya does the same).
* `--gradient_accumulation_steps` must be 1 (a gradient is consumed by the step that made it).
* Not with DeepSpeed (it owns the gradients and the optimizer step) and not with several processes: DDP
  averages gradients only after the hooks ran, so every rank would step its own local gradient.
* Not with `--mixed_precision fp16`: the GradScaler must see every gradient to skip a step that overflowed,
  but by then most parameters have stepped. Use bf16 or no mixed precision.
* transformers' AdafactorSchedule reads Adafactor's step size only from parameters that still hold a
  gradient; here none does when it runs, so it reports its initial LR. The updates are unaffected.
* One backward = one optimizer step for every parameter it reaches: do not call backward on a second loss
  (or with retain_graph) within a step. Call `remove_hooks()` to stop stepping.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from library.training.optim import (
    OptimizerSettings,
    build_optimizer,
    build_scheduler,
    parse_step_count,
    scheduler_steps,
)

# torch.optim classes whose update of one tensor reads only that tensor's gradient and state.
_TORCH_PER_PARAMETER = ("Adam", "AdamW", "SGD", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad")
# --optimizer_type names (library.training.optim's table) that build one of the classes above.
_TABLE_PER_PARAMETER = ("AdamW", "SGDNesterov", "Adafactor")
_GLOBAL_STATISTICS_PREFIXES = ("prodigy", "dadapt")


# --------------------------------------------------------------------------------------------------------
# Which optimizers can step one parameter at a time
# --------------------------------------------------------------------------------------------------------


def supported_optimizer_names() -> list[str]:
    """The --optimizer_type values fused backward accepts, for help texts and errors."""
    extra = [name for name in _TORCH_PER_PARAMETER if name not in _TABLE_PER_PARAMETER]
    return list(_TABLE_PER_PARAMETER) + extra


def fused_backward_supported(optimizer_type: str | None) -> bool:
    """Whether `--optimizer_type optimizer_type` updates each parameter independently (empty = AdamW).

    Accepts library.training.optim's table names, bare torch.optim class names and dotted paths
    (`torch.optim.AdamW`, `transformers.optimization.Adafactor`), in any case.
    """
    name = (optimizer_type or "AdamW").strip().lower()
    if name in {n.lower() for n in _TABLE_PER_PARAMETER + _TORCH_PER_PARAMETER}:
        return True
    module, _, attr = name.rpartition(".")
    if module.startswith("torch.optim"):
        return attr in {n.lower() for n in _TORCH_PER_PARAMETER}
    return module.startswith("transformers") and attr == "adafactor"


def unsupported_optimizer_message(optimizer_type: str | None) -> str | None:
    """The error for an optimizer fused backward cannot drive, or None when it can."""
    if fused_backward_supported(optimizer_type):
        return None
    name = (optimizer_type or "").strip()
    lowered = name.lower().rpartition(".")[2]
    if lowered.startswith(_GLOBAL_STATISTICS_PREFIXES):
        why = "it estimates its step size from statistics over all parameters"
    elif "schedulefree" in lowered:
        why = "it keeps its schedule in the param groups, shared by all parameters"
    else:
        why = "it is not known to update each parameter independently"
    return (f"--fused_backward_pass supports {', '.join(supported_optimizer_names())} (optimizers that update "
            f"each parameter from its own gradient alone); got {name}: {why}")


def _class_is_supported(cls: type) -> bool:
    if cls.__module__.startswith("torch.optim"):
        return cls.__name__ in _TORCH_PER_PARAMETER
    return cls.__name__ == "Adafactor" and cls.__module__.startswith("transformers")


# --------------------------------------------------------------------------------------------------------
# The optimizer facade
# --------------------------------------------------------------------------------------------------------


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """Steps `optimizer`'s parameters one by one from autograd hooks; see the module docstring.

    It subclasses torch.optim.Optimizer so torch/transformers/diffusers LR schedulers and
    `accelerator.prepare` accept it, but it deliberately does not call Optimizer.__init__: its
    `param_groups`, `state` and `defaults` are the wrapped optimizer's own objects, not copies.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0) -> None:
        if isinstance(optimizer, FusedBackwardOptimizer):
            raise TypeError("the optimizer is already a FusedBackwardOptimizer")
        if not _class_is_supported(type(optimizer)):
            message = unsupported_optimizer_message(f"{type(optimizer).__module__}.{type(optimizer).__name__}")
            raise ValueError(message)
        _check_single_process()
        self.optimizer = optimizer
        self.max_grad_norm = float(max_grad_norm or 0.0)
        # The hook tables and profiler patch Optimizer.__init__ would set up, minus the groups/state/defaults
        # we share; __setstate__ is torch's own re-initialisation (it also adds defaults["differentiable"]).
        self.__setstate__({})
        self._steppers: list[torch.optim.Optimizer] = []
        self._handles: list[RemovableHandle] = []
        for group_index, group in enumerate(optimizer.param_groups):
            self._register_group(group_index, group)

    # The wrapped optimizer's objects, never copies (a scheduler writes the LR into these very dicts).
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def _register_group(self, group_index: int, group: dict[str, Any]) -> None:
        """One single-parameter optimizer and one hook per trainable parameter of the group."""
        kwargs = _constructor_kwargs(type(self.optimizer), self.optimizer.defaults)
        for param in group["params"]:
            if not param.requires_grad:
                continue  # it never gets a gradient, so it never steps (as in the plain optimizer)
            single = _hyperparameters(group)
            single["params"] = [param]
            stepper = type(self.optimizer)([single], **kwargs)
            stepper.state = self.optimizer.state  # drop any state the constructor made (Adagrad's sums)
            self._steppers.append(stepper)
            self._handles.append(param.register_post_accumulate_grad_hook(self._make_hook(group_index, stepper)))

    def _make_hook(self, group_index: int, stepper: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(param, self.max_grad_norm)
            # Looked up at every step: a scheduler or load_state_dict may have replaced these since.
            stepper.param_groups[0].update(_hyperparameters(self.optimizer.param_groups[group_index]))
            stepper.state = self.optimizer.state
            stepper.step()
            param.grad = None
        return hook

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Nothing to do: the hooks stepped each parameter during backward. A closure (which runs the
        forward and backward) is still called, so its backward steps the parameters."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The hooks already freed every gradient; clears any left by parameters without a hook."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict: the same format as a plain (non-fused) run."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads into the wrapped optimizer; accepts what a fused or a plain run saved."""
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds the group to the wrapped optimizer and hooks its parameters."""
        self.optimizer.add_param_group(param_group)
        self._register_group(len(self.optimizer.param_groups) - 1, self.optimizer.param_groups[-1])

    def remove_hooks(self) -> None:
        """Stop stepping in backward (the parameters then keep their gradients like plain training)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def num_hooks(self) -> int:
        """How many parameters are stepped from backward (the trainable ones)."""
        return len(self._handles)

    def __repr__(self) -> str:
        return (f"FusedBackwardOptimizer({type(self.optimizer).__name__}, {self.num_hooks} hooked parameters, "
                f"per-tensor max_grad_norm={self.max_grad_norm})")


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"}


def _constructor_kwargs(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults the class's constructor takes (AdamW's defaults hold decoupled_weight_decay, which
    its constructor does not). Each group carries all hyperparameters anyway; these only have to pass
    the constructor's own checks (relative-step Adafactor needs lr=None there)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in defaults.items() if key in accepted}


def _check_single_process() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError(MULTI_PROCESS_MESSAGE)


MULTI_PROCESS_MESSAGE = ("--fused_backward_pass works in a single process only: DDP averages the gradients "
                          "after the per-parameter hooks have already stepped, so every rank would train on its "
                          "own gradient")


# --------------------------------------------------------------------------------------------------------
# Building it the way library.training.optim builds the plain pair
# --------------------------------------------------------------------------------------------------------


def build_fused_optimizer_and_scheduler(settings: OptimizerSettings, params: Iterable[Any], max_train_steps: int,
                                        max_grad_norm: float = 0.0) -> tuple[FusedBackwardOptimizer, Any, str]:
    """library.training.optim.build_optimizer_and_scheduler, with the scheduler built on the fused facade.

    The scheduler must see the facade (whose `step()` the loop calls) rather than the wrapped optimizer,
    or torch warns that `lr_scheduler.step()` ran before `optimizer.step()`. One process only, so
    scheduler steps equal optimizer steps.
    """
    message = unsupported_optimizer_message(settings.optimizer_type)
    if message:
        raise ValueError(message)
    optimizer, description = build_optimizer(settings.optimizer_type, params, settings.learning_rate,
                                             settings.optimizer_args)
    fused = FusedBackwardOptimizer(optimizer, max_grad_norm=max_grad_norm)
    warmup = parse_step_count(settings.lr_warmup_steps, max_train_steps, "--lr_warmup_steps")
    decay = parse_step_count(settings.lr_decay_steps, max_train_steps, "--lr_decay_steps")
    scheduler = build_scheduler(
        settings.lr_scheduler, fused,
        num_training_steps=scheduler_steps(max_train_steps, 1), num_warmup_steps=scheduler_steps(warmup, 1),
        num_cycles=settings.lr_scheduler_num_cycles, power=settings.lr_scheduler_power,
        timescale=settings.lr_scheduler_timescale, min_lr_ratio=settings.lr_scheduler_min_lr_ratio,
        decay_steps=scheduler_steps(decay, 1), scheduler_type=settings.lr_scheduler_type,
        scheduler_args=settings.lr_scheduler_args)
    return fused, scheduler, description + " [fused backward]"
