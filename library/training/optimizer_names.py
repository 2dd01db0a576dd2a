"""kohya's ``--optimizer_type`` names: where each optimizer class lives, its pip package, and kohya's extra kwargs.

Only the table; `library.training.optim` imports a class from it when a run names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class OptimizerSpec:
    """Where a named optimizer lives and the kwargs kohya adds to it.

    `defaults` are set only when the user did not give them (SGD-Nesterov's momentum); `forced` always win
    (nesterov=True is what makes it SGD*Nesterov*).
    """

    name: str
    module: str
    attr: str
    pip: str | None  # None: a hard dependency (torch, transformers)
    defaults: tuple[tuple[str, Any], ...] = ()
    forced: tuple[tuple[str, Any], ...] = ()


def _spec(name: str, module: str, attr: str | None = None, pip: str | None = None,
          **extra: Any) -> tuple[str, OptimizerSpec]:
    return name.lower(), OptimizerSpec(name, module, attr or name, pip, **extra)


_BNB = "bitsandbytes.optim"
_NESTEROV = {"defaults": (("momentum", 0.9),), "forced": (("nesterov", True),)}

OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType(dict([
    _spec("AdamW", "torch.optim"),
    _spec("SGDNesterov", "torch.optim", "SGD", **_NESTEROV),
    _spec("AdamW8bit", _BNB, pip="bitsandbytes"),
    _spec("PagedAdamW8bit", _BNB, pip="bitsandbytes"),
    _spec("PagedAdamW", _BNB, pip="bitsandbytes"),
    _spec("PagedAdamW32bit", _BNB, pip="bitsandbytes"),
    _spec("Lion8bit", _BNB, pip="bitsandbytes"),
    _spec("PagedLion8bit", _BNB, pip="bitsandbytes"),
    _spec("SGDNesterov8bit", _BNB, "SGD8bit", pip="bitsandbytes", **_NESTEROV),
    _spec("Lion", "lion_pytorch", pip="lion-pytorch"),
    _spec("Adafactor", "transformers.optimization"),
    _spec("Prodigy", "prodigyopt", pip="prodigyopt"),
    _spec("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", pip="dadaptation"),
    _spec("DAdaptAdamPreprint", "dadaptation.experimental", pip="dadaptation"),
    _spec("DAdaptAdaGrad", "dadaptation", pip="dadaptation"),
    _spec("DAdaptAdam", "dadaptation", pip="dadaptation"),
    _spec("DAdaptAdan", "dadaptation", pip="dadaptation"),
    _spec("DAdaptAdanIP", "dadaptation.experimental", pip="dadaptation"),
    _spec("DAdaptLion", "dadaptation", pip="dadaptation"),
    _spec("DAdaptSGD", "dadaptation", pip="dadaptation"),
    _spec("AdamWScheduleFree", "schedulefree", pip="schedulefree"),
    _spec("RAdamScheduleFree", "schedulefree", pip="schedulefree"),
    _spec("SGDScheduleFree", "schedulefree", pip="schedulefree"),
]))

# Import name -> pip name, for dotted class paths whose package spells differently on PyPI.
PIP_NAMES: Mapping[str, str] = MappingProxyType({
    "lion_pytorch": "lion-pytorch",
    "pytorch_optimizer": "pytorch-optimizer",
    "bitsandbytes": "bitsandbytes",
})
