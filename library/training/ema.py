"""Exponential moving average (EMA) of the trainable weights, kept in fp32 and by default in CPU memory.

Why our own: kohya has no EMA, and diffusers' `EMAModel` keeps its fp32 copy on the GPU (about 10 GB for
SDXL's 2.6B-parameter UNet, the difference between fitting and not on a 24-48 GB card). Here the shadow copy
lives in CPU memory by default (`--ema_device cpu`); the GPU only pays one device-to-host copy of the weights
per update into pinned staging buffers, and the averaging itself runs on the CPU.

The update, for each tracked parameter w and its shadow e (both seen as fp32):

    e <- d_n * e + (1 - d_n) * w                      (a lerp: e.lerp_(w, 1 - d_n))

with d_n the decay of the n-th averaging update (n = 0, 1, 2, ...):

    s   = n * update_every                           optimizer steps already covered by earlier updates
    d_n = min(decay, (1 + s) / (10 + s)) ** update_every    with warm-up (the classic schedule)
    d_n = decay ** update_every                               without warm-up

Raising to `update_every` keeps the time constant in optimizer steps unchanged: N steps of constant weights
move the EMA by 1 - decay**N whether it updates every step or every k steps. Measuring the warm-up in steps
(s = n * update_every, not n) does the same for the warm-up; with update_every = 1 it is exactly the classic
(1 + t) / (10 + t) with t = updates since the start, and the first averaging update uses 1/10 (90% of the
new weights). The warm-up matters because a 0.9999 EMA started from the pretrained weights would otherwise
need ~10,000 steps before the fine-tuned weights show at all.

Before `start_step` (and on it), due updates copy the weights instead of averaging, so averaging starts from
the weights of step `start_step` (StableCascade's `ema_start_iters`). An update is due when
`global_step % update_every == 0`, plus once on `start_step` itself.

Not supported: parameters sharded by FSDP or DeepSpeed ZeRO-3 (each rank only holds a shard; the shadow would
average the shards). DDP and ZeRO-1/2 keep full parameters and work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_DECAY = 0.9999
EMA_DEVICES: tuple[str, ...] = ("cpu", "same")
STATE_VERSION = 1
# Wrappers that prefix parameter names: DDP / DeepSpeed (`module.`) and torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# When the weights are not fp32 they are upcast in groups of at most this many elements before the lerp,
# so the temporary fp32 copies stay small (256 MB) instead of one full fp32 copy of the model.
_CAST_CHUNK_NUMEL = 1 << 26


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EMASettings:
    """How the EMA averages; see the module docstring for the formulas.

    `decay` and `beta` are the same number under two names (diffusers says decay, StableCascade/kohya-style
    configs say beta): give either. When neither is given the decay is 0.9999; after construction `decay`
    always holds the value in use. `device="cpu"` keeps the fp32 shadow in CPU memory, `"same"` next to each
    parameter. `foreach` uses the multi-tensor `torch._foreach_*` kernels (fewer launches, same numbers).
    """

    decay: float | None = None
    beta: float | None = None
    update_every: int = 1
    start_step: int = 0
    warmup: bool = True
    device: str = "cpu"
    foreach: bool = True

    def __post_init__(self) -> None:
        if self.decay is not None and self.beta is not None and self.decay != self.beta:
            raise ValueError(f"EMA decay {self.decay} and beta {self.beta} differ: they are one setting, give one")
        decay = self.decay if self.decay is not None else self.beta
        object.__setattr__(self, "decay", DEFAULT_DECAY if decay is None else float(decay))
        if not 0.0 <= self.decay <= 1.0:  # type: ignore[operator]
            raise ValueError(f"EMA decay must be in [0, 1], got {self.decay}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"EMA update_every must be an integer >= 1, got {self.update_every!r}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"EMA start_step must be an integer >= 0, got {self.start_step!r}")
        if self.device not in EMA_DEVICES:
            raise ValueError(f"EMA device must be one of {EMA_DEVICES}, got {self.device!r}")

    def decay_at(self, update_index: int) -> float:
        """Decay of the `update_index`-th averaging update (0-based), already raised to `update_every`."""
        per_step = float(self.decay)  # type: ignore[arg-type]
        if self.warmup:
            steps = update_index * self.update_every
            per_step = min(per_step, (1.0 + steps) / (10.0 + steps))
        return per_step ** self.update_every

    def is_due(self, global_step: int) -> bool:
        """Whether optimizer step `global_step` updates the EMA (copy or average)."""
        return global_step % self.update_every == 0 or (self.start_step > 0 and global_step == self.start_step)


# --------------------------------------------------------------------------------------------------------
# The average
# --------------------------------------------------------------------------------------------------------


def _strip_wrappers(name: str) -> str:
    """`module._orig_mod.down.0.weight` -> `down.0.weight`: one name whether or not the model is wrapped."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    return name


def _trainable(named_parameters: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    items = named_parameters.named_parameters() if isinstance(named_parameters, nn.Module) else named_parameters.items()
    tracked: dict[str, torch.Tensor] = {}
    for name, param in items:
        if not param.requires_grad:
            continue
        key = _strip_wrappers(name)
        if key in tracked:
            raise ValueError(f"two trainable parameters are both named {key!r} once wrapper prefixes are removed")
        tracked[key] = param
    if not tracked:
        raise ValueError("EMA: no trainable (requires_grad) parameters to track")
    return tracked


def _chunks(targets: list[torch.Tensor], sources: list[torch.Tensor],
            max_numel: int) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Consecutive groups of (target, source) pairs holding at most `max_numel` elements (or one tensor)."""
    start, total = 0, 0
    for i, t in enumerate(targets):
        if i > start and total + t.numel() > max_numel:
            yield targets[start:i], sources[start:i]
            start, total = i, 0
        total += t.numel()
    if start < len(targets):
        yield targets[start:], sources[start:]


@torch.no_grad()
def _lerp_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float, foreach: bool) -> None:
    """targets += weight * (sources - targets), in the targets' dtype; sources of another dtype are upcast
    a chunk at a time (lerp needs equal dtypes)."""
    if all(s.dtype == t.dtype for t, s in zip(targets, sources)):
        groups: Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]] = iter([(targets, sources)])
    else:
        groups = _chunks(targets, sources, _CAST_CHUNK_NUMEL)
    for group_targets, group_sources in groups:
        cast = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(group_targets, group_sources)]
        if foreach:
            torch._foreach_lerp_(group_targets, cast, weight)
        else:
            for t, s in zip(group_targets, cast):
                t.lerp_(s, weight)


class ExponentialMovingAverage:
    """fp32 shadow copies of the trainable parameters, updated from the live parameters by `maybe_update`
    (after every optimizer step, by the loop callback `library.training.callbacks.EmaUpdate`).

    It holds references to the live parameters (DDP and `accelerator.prepare` keep the same Parameter
    objects, so build it before or after `prepare`, either works). Pass it to `script_flow.run_training(...,
    register_for_checkpointing=(ema,))` so `--save_state`/`--resume` save and restore it: its state dict holds
    only tensors, ints and strings, written as safetensors + JSON by `library.training.train_state_io` (never pickled).
    Names are stored without `module.`/`_orig_mod.` prefixes, so a state saved from a wrapped model loads
    into an unwrapped one and vice versa.
    """

    def __init__(self, named_parameters: Mapping[str, torch.Tensor] | nn.Module, settings: EMASettings) -> None:
        self.settings = settings
        tracked = _trainable(named_parameters)
        self._names: list[str] = list(tracked)
        self._params: list[torch.Tensor] = list(tracked.values())
        with torch.no_grad():
            self._shadow: list[torch.Tensor] = [
                p.detach().to(device=self._shadow_device(p), dtype=torch.float32, copy=True) for p in self._params
            ]
        self._staging: list[torch.Tensor | None] | None = None  # pinned CPU buffers, made on first need
        self._num_updates = 0  # averaging updates done since start_step (drives the warm-up)
        self._last_step = -1  # optimizer step of the last copy/average: a repeated step is not counted twice
        self._swapped = False

    # ---- bookkeeping -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Tracked parameter names (wrapper prefixes removed), in update order."""
        return list(self._names)

    @property
    def num_updates(self) -> int:
        """Averaging updates done so far (copies before `start_step` do not count)."""
        return self._num_updates

    @property
    def next_decay(self) -> float:
        """The decay the next averaging update will use (for logging)."""
        return self.settings.decay_at(self._num_updates)

    def _shadow_device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.settings.device == "cpu" else param.device

    # ---- updating ----------------------------------------------------------------------------------

    @torch.no_grad()
    def maybe_update(self, global_step: int) -> bool:
        """Update after optimizer step `global_step` if one is due; return whether it did.

        Call it once per optimizer step (after `optimizer.step()`), with the number of optimizer steps done.
        Calling it again with the same or an earlier step does nothing, so calling it on every micro-batch
        of a gradient-accumulation cycle is harmless.
        """
        if self._swapped:
            raise RuntimeError("EMA update while the EMA weights are swapped into the model")
        if global_step <= self._last_step or not self.settings.is_due(global_step):
            return False
        sources = self._gather_sources()
        if global_step <= self.settings.start_step:
            for shadow, source in zip(self._shadow, sources):
                shadow.copy_(source)
        else:
            decay = self.settings.decay_at(self._num_updates)
            _lerp_(self._shadow, sources, 1.0 - decay, self.settings.foreach)
            self._num_updates += 1
        self._last_step = global_step
        return True

    def _gather_sources(self) -> list[torch.Tensor]:
        """The live weights, on the shadows' devices.

        GPU weights bound for a CPU shadow are copied with non_blocking=True into pinned buffers (in the
        weights' own dtype: half the PCIe traffic for bf16), then one synchronize per device; a blocking
        `.cpu()` would stall once per tensor, 1,680 times for the SDXL UNet. The pinned buffers stay
        allocated (5 GB for a bf16 SDXL UNet) so later updates do not pin memory again.
        """
        sources = [p.detach() for p in self._params]
        remote = [i for i, (p, s) in enumerate(zip(sources, self._shadow)) if p.device != s.device]
        if not remote:
            return sources
        if self._staging is None:
            self._staging = [None] * len(sources)
        devices = set()
        for i in remote:
            param = sources[i]
            buffer = self._staging[i]
            if buffer is None:
                pin = param.device.type == "cuda" and self._shadow[i].device.type == "cpu"
                buffer = torch.empty(param.shape, dtype=param.dtype, device=self._shadow[i].device, pin_memory=pin)
                self._staging[i] = buffer
            buffer.copy_(param, non_blocking=True)
            devices.add(param.device)
            sources[i] = buffer
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return sources

    # ---- checkpoint state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Shadow weights and counters (plain tensors, ints and strings: loads with weights_only=True)."""
        return {
            "version": STATE_VERSION,
            "shadow": dict(zip(self._names, self._shadow)),
            "num_updates": self._num_updates,
            "last_step": self._last_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned, into this EMA's existing fp32 shadows (devices kept)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"EMA state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        shadow = {_strip_wrappers(k): v for k, v in state["shadow"].items()}
        missing = [n for n in self._names if n not in shadow]
        unexpected = [n for n in shadow if n not in set(self._names)]
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the tracked parameters: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
        for name, target in zip(self._names, self._shadow):
            if tuple(shadow[name].shape) != tuple(target.shape):
                raise ValueError(f"EMA state {name!r} has shape {tuple(shadow[name].shape)}, "
                                 f"the parameter {tuple(target.shape)}")
        for name, target in zip(self._names, self._shadow):
            target.copy_(shadow[name])
        self._num_updates = int(state["num_updates"])
        self._last_step = int(state["last_step"])

    def averaged_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{name: averaged weight} for the tracked parameters only.

        Without `dtype` the values are the live fp32 shadows (no copy: do not modify them); with `dtype`
        they are new tensors. To save a whole model (frozen parameters and buffers included) save it inside
        `swapped_into` instead.
        """
        if dtype is None:
            return dict(zip(self._names, self._shadow))
        return {name: s.to(dtype) for name, s in zip(self._names, self._shadow)}

    # ---- using the averaged weights ----------------------------------------------------------------

    def _targets(self, module: nn.Module | None) -> list[torch.Tensor]:
        if module is None:
            return self._params
        by_name = {_strip_wrappers(n): p for n, p in module.named_parameters()}
        missing = [n for n in self._names if n not in by_name]
        if missing:
            raise KeyError(f"the module has no parameters named {missing[:5]} ({len(missing)} missing)")
        return [by_name[n] for n in self._names]

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module | None = None) -> Iterator[nn.Module | None]:
        """Put the EMA weights into the live parameters for the `with` block, then restore the raw weights.

        Use it for sampling and saving. `module` (default: the parameters tracked at construction) may be
        the wrapped or unwrapped model. The raw weights are backed up once, in their own dtype (on the CPU
        when the EMA lives there, to leave GPU memory to sampling), restored bit-exactly also when the block
        raises, and the backup is freed on exit.
        """
        if self._swapped:
            raise RuntimeError("the EMA weights are already swapped in")
        targets = self._targets(module)
        self._swapped = True
        try:
            with torch.no_grad():
                backup = [t.detach().to(self._shadow_device(t), copy=True) for t in targets]
            try:
                with torch.no_grad():
                    for target, shadow in zip(targets, self._shadow):
                        target.copy_(shadow)
                yield module
            finally:
                with torch.no_grad():
                    for target, saved in zip(targets, backup):
                        target.copy_(saved)
                backup.clear()
        finally:
            self._swapped = False
