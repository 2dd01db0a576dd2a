"""LyCORIS and DoRA files: which algorithm each module of a network file uses, told by its tensor keys, and
LyCORIS itself (the optional ``lycoris-lora`` package) for the algorithms whose arithmetic is its own.

A network file holds ``<module name>.<key>`` tensors. The keys say the algorithm, as LyCORIS's own
``get_module`` tells them apart: ``lora_down.weight``/``lora_up.weight`` (LoRA/LoCon; with ``lora_mid.weight``
LoCon's Tucker form), ``hada_w1_a`` (LoHa), ``lokr_w1``/``lokr_w1_a`` (LoKr), ``on_input`` + ``weight`` ((IA)³),
``diff`` (full fine-tune delta), ``oft_blocks`` (diagonal or butterfly OFT), ``w_norm``/``b_norm`` (norm layers),
``a1.weight`` (GLoRA); a ``dora_scale`` next to any of them makes it weight-decomposed (DoRA).

Plain LoRA and LoRA + DoRA are ours (``lora_files``, ``dora``); every other algorithm's update is computed by
LyCORIS's own module classes, imported only when such a file is met: we do not re-derive its algorithms.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from library.adapters.errors import LoRAFileError

LYCORIS_PACKAGE = "lycoris-lora==4.1.3"

LORA_KEYS = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})
DORA_KEY = "dora_scale"
# marker key -> algorithm (LyCORIS's names); the first marker a module has decides
KIND_MARKERS: tuple[tuple[str, str], ...] = (
    ("hada_w1_a", "loha"),
    ("lokr_w1", "lokr"),
    ("lokr_w1_a", "lokr"),
    ("on_input", "ia3"),
    ("diff", "full"),
    ("oft_blocks", "oft"),
    ("w_norm", "norm"),
    ("b_norm", "norm"),
    ("a1.weight", "glora"),
    ("lora_down.weight", "lora"),
)
KIND_TITLES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)³", "full": "full",
               "diag-oft": "diag-OFT", "boft": "BOFT", "oft": "OFT", "norm": "norm", "glora": "GLoRA"}


@dataclass(frozen=True)
class AdapterModuleTensors:
    """The tensors of one module of a network file, by key (``lora_down.weight``, ``hada_w1_a``, ...)."""

    name: str
    tensors: dict[str, torch.Tensor]

    @property
    def algorithm(self) -> str | None:
        """LyCORIS's algorithm name (lora, loha, lokr, ia3, full, diag-oft, boft, norm, glora), None if unknown."""
        for marker, kind in KIND_MARKERS:
            if marker in self.tensors:
                if kind == "oft":  # LyCORIS: diag-OFT stores (blocks, n, n), butterfly OFT one more dimension
                    return "boft" if self.tensors[marker].dim() == 4 else "diag-oft"
                return kind
        return None

    @property
    def has_dora(self) -> bool:
        return DORA_KEY in self.tensors

    @property
    def kind(self) -> str | None:
        """What a user calls it: the algorithm, ``dora`` for LoRA + dora_scale, ``<algo>+dora`` for others."""
        algorithm = self.algorithm
        if algorithm is None or not self.has_dora:
            return algorithm
        return "dora" if algorithm == "lora" else f"{algorithm}+dora"

    @property
    def is_plain_lora(self) -> bool:
        """kohya's LoRA/LoCon module: down, up and maybe alpha, nothing else."""
        return self.algorithm == "lora" and set(self.tensors) <= LORA_KEYS

    @property
    def is_lora_or_dora(self) -> bool:
        """A module whose update is ``up @ down * alpha / rank`` (plus DoRA's rescale): ours to compute."""
        return self.algorithm == "lora" and set(self.tensors) <= LORA_KEYS | {DORA_KEY}

    @property
    def alpha(self) -> float | None:
        alpha = self.tensors.get("alpha")
        return None if alpha is None else float(alpha)

    @property
    def rank(self) -> int | None:
        """The rank of the low-rank factors (LoRA, LoHa, a factorised LoKr side), None where there is none."""
        t = self.tensors
        if "lora_down.weight" in t:
            return int(t["lora_down.weight"].shape[0])
        if "hada_w1_b" in t:
            return int(t["hada_w1_b"].shape[0])
        if "lokr_w1_a" in t:  # (a, rank)
            return int(t["lokr_w1_a"].shape[1])
        if "lokr_w2_a" in t:  # (b, rank), or (rank, b) in the Tucker form
            return int(t["lokr_w2_a"].shape[0 if "lokr_t2" in t else 1])
        return None


def module_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, AdapterModuleTensors], list[str]]:
    """(modules by name, keys that belong to no module: no ``.`` or no algorithm recognised)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, dot, rest = key.partition(".")
        if dot:
            grouped.setdefault(name, {})[rest] = value
    modules, others = {}, []
    for name, tensors in grouped.items():
        module = AdapterModuleTensors(name, tensors)
        if module.algorithm is None:
            others.extend(f"{name}.{key}" for key in tensors)
        else:
            modules[name] = module
    others.extend(key for key in state_dict if "." not in key)
    return modules, sorted(others)


def kind_counts(modules: dict[str, AdapterModuleTensors]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in modules.values():
        counts[module.kind] = counts.get(module.kind, 0) + 1
    return dict(sorted(counts.items()))


def describe_kinds(counts: dict[str, int]) -> str:
    """``LoHa (206 modules)`` / ``DoRA (12 modules), LoRA (3 modules)`` for messages."""
    def title(kind: str) -> str:
        base, plus, extra = kind.partition("+")
        return KIND_TITLES.get(base, base) + (" + DoRA" if plus else "")

    return ", ".join(f"{title(kind)} ({count} module{'s' if count != 1 else ''})" for kind, count in counts.items())


def is_plain_lora_file(state_dict: dict[str, torch.Tensor]) -> bool:
    """Every module is a kohya LoRA/LoCon module (no LyCORIS algorithm, no DoRA scale)."""
    modules, _ = module_tensors(state_dict)
    return all(module.is_plain_lora for module in modules.values())


def not_plain_lora_reason(state_dict: dict[str, torch.Tensor], source: str) -> str | None:
    """Why a tool that handles kohya LoRA/LoCon only cannot take this file (its kinds), or None if it can."""
    modules, _ = module_tensors(state_dict)
    other = {name: m for name, m in modules.items() if not m.is_plain_lora}
    if not other:
        return None
    example = next(iter(other.values()))
    key = next(k for k in example.tensors if k not in LORA_KEYS)
    return f"{source} holds {describe_kinds(kind_counts(other))}, e.g. {example.name}.{key}"


def import_lycoris(module: str, source: str, what: str) -> ModuleType:
    """``lycoris.<module>``, or the one-line reason (the install command) when the optional package is missing."""
    try:
        return importlib.import_module(f"lycoris.{module}")
    except ImportError as error:
        raise LoRAFileError(f"{source} is a LyCORIS file ({what}): reading it needs the lycoris-lora package: "
                            f"pip install {LYCORIS_PACKAGE}") from error
