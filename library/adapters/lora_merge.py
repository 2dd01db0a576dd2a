"""Several LoRAs into one: kohya's summed factors, or exact rank concatenation (the arithmetic of
``networks/merge_lora.py``, which documents both and how they differ from kohya)."""

from __future__ import annotations

import math

import torch

from library.adapters.errors import LoRAFileError
from library.adapters.lora_files import LoRAFactors


def merge_lora_modules(loras: list[tuple[dict[str, LoRAFactors], float]], concat: bool = False,
                       shuffle: bool = False) -> dict[str, LoRAFactors]:
    """One LoRA from ``(modules, ratio)`` pairs: kohya's summed factors, or exact rank concatenation."""
    contributions: dict[str, list[tuple[LoRAFactors, float]]] = {}
    for modules, ratio in loras:
        for name, factors in modules.items():
            contributions.setdefault(name, []).append((factors, ratio))
    merged = {}
    for name, items in contributions.items():
        module = _concatenated(name, items) if concat else _summed(name, items)
        merged[name] = _shuffled(module) if shuffle else module
    return merged


def _summed(name: str, items: list[tuple[LoRAFactors, float]]) -> LoRAFactors:
    first = items[0][0]
    base_alpha = first.effective_alpha
    down = torch.zeros_like(first.down)
    up = torch.zeros_like(first.up)
    for factors, ratio in items:
        if factors.down.shape != first.down.shape or factors.up.shape != first.up.shape:
            raise LoRAFileError(f"{name}: shapes {tuple(first.down.shape)} and {tuple(factors.down.shape)} differ "
                                "(other rank or model); merge LoRAs of different ranks with --concat")
        scale = math.sqrt(factors.effective_alpha / base_alpha) * ratio
        down = down + factors.down * scale
        up = up + factors.up * abs(scale)
    return LoRAFactors(name, down, up, base_alpha)


def _concatenated(name: str, items: list[tuple[LoRAFactors, float]]) -> LoRAFactors:
    first = items[0][0]
    total_rank = sum(factors.rank for factors, _ in items)
    out_alpha = first.effective_alpha
    downs, ups = [], []
    for factors, ratio in items:
        if factors.down.shape[1:] != first.down.shape[1:] or factors.up.shape[0] != first.up.shape[0]:
            raise LoRAFileError(f"{name}: the LoRAs target weights of different shapes "
                                f"({tuple(first.down.shape[1:])} vs {tuple(factors.down.shape[1:])}); are they for one model?")
        coefficient = ratio * factors.scale * total_rank / out_alpha
        magnitude = math.sqrt(abs(coefficient))
        downs.append(factors.down * math.copysign(magnitude, coefficient))
        ups.append(factors.up * magnitude)
    return LoRAFactors(name, torch.cat(downs, dim=0), torch.cat(ups, dim=1), out_alpha)


def _shuffled(module: LoRAFactors) -> LoRAFactors:
    perm = torch.randperm(module.rank)
    return LoRAFactors(module.name, module.down[perm], module.up[:, perm], module.alpha)
