"""Inspect a kohya-format LoRA file: its modules, ranks, alphas, which model parts it touches, dead modules.

    python networks/check_lora_weights.py lora.safetensors [-s|--show_all]

For every module one line ``name  rank  alpha  mean|down|  mean|up|``, then a summary: module count per part
(``unet``, ``te`` for SD1/SD2, ``te1``/``te2`` for SDXL), the ranks and alphas found, and a warning for each
module whose ``lora_up`` is all zeros: such a module was never trained (kohya initialises up to zero), so it
changes nothing. ``-s`` also lists the tensors that belong to no LoRA module. kohya's tool prints one CSV
line per tensor (mean and min of |value|); we print per module, which is what one checks a LoRA for.

This module also holds the small file helpers the other LoRA tools share (read a LoRA file, group its tensors
into modules, write one with kohya's metadata hashes, refuse to overwrite), so that each tool reads files
exactly the way this checker describes them.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


import torch

DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
# longest prefix first: "lora_te1_..." must not be read as "lora_te" + "1_..."
PARTS = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))
PRECISIONS = ("float", "fp16", "bf16")  # kohya's --save_precision / --precision choices


class LoRAFileError(ValueError):
    """A file the LoRA tools cannot use; the message names the file and the offending key."""


# --------------------------------------------------------------------------------------------------
# reading


@dataclass
class LoRAFactors:
    """One module of a LoRA file: ``delta W = up @ down * alpha / rank`` (alpha missing: alpha = rank)."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def is_kxk_conv(self) -> bool:
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def part(self) -> str:
        return lora_part(self.name)

    def delta(self) -> torch.Tensor:
        """The dense update in the original weight's shape, in float32 (networks.lora's arithmetic)."""
        from networks.lora import LoRAModule

        return LoRAModule.delta_weight(self.down.float(), self.up.float(), self.scale)


def lora_part(name: str) -> str:
    """unet / te / te1 / te2 from the kohya prefix; "other" for names that follow no kohya prefix."""
    for prefix, part in PARTS:
        if name.startswith(prefix):
            return part
    return "other"


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` LoRA, or tensors of a ``.pt``/``.ckpt`` one."""
    from library.models.loading import ModelLoadError, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"{path} does not exist or is not a file")
    try:
        return read_checkpoint(path)
    except ModelLoadError as error:
        raise LoRAFileError(str(error)) from error


def group_modules(state_dict: dict[str, torch.Tensor], source: str = "weights") -> tuple[dict[str, LoRAFactors], list[str]]:
    """(modules by name, keys that belong to no kohya LoRA module). A down without its up is an error."""
    modules: dict[str, LoRAFactors] = {}
    for key, value in state_dict.items():
        if key.endswith(DOWN_SUFFIX):
            name = key[: -len(DOWN_SUFFIX)]
            up = state_dict.get(name + UP_SUFFIX)
            if up is None:
                raise LoRAFileError(f"{source}: {key} has no matching {name + UP_SUFFIX}")
            if up.shape[1] != value.shape[0]:
                raise LoRAFileError(f"{source}: {name} has down rank {value.shape[0]} but up rank {up.shape[1]}")
            alpha = state_dict.get(name + ALPHA_SUFFIX)
            modules[name] = LoRAFactors(name, value, up, None if alpha is None else float(alpha))
    known = {name + suffix for name in modules for suffix in (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX)}
    others = sorted(k for k in state_dict if k not in known)
    return modules, others


def read_lora_modules(path: str | os.PathLike, require_only_lora: bool = True) -> tuple[dict[str, LoRAFactors], dict[str, str]]:
    """The modules and metadata of a kohya LoRA file, for tools that rewrite it: other tensors (LyCORIS
    factors, DoRA scales, ...) are an error there, since silently dropping them would change the file's effect."""
    state_dict, metadata = read_lora_file(path)
    modules, others = group_modules(state_dict, str(path))
    if not modules:
        raise LoRAFileError(f"{path} holds no kohya LoRA module (no *{DOWN_SUFFIX} keys); is it a LyCORIS or PEFT file?")
    if require_only_lora and others:
        raise LoRAFileError(f"{path} has {len(others)} tensor(s) that are not plain LoRA factors, e.g. {others[0]}; "
                            "this tool handles kohya LoRA/LoCon files only")
    return modules, metadata


# --------------------------------------------------------------------------------------------------
# writing


def precision_dtype(name: str | None) -> torch.dtype | None:
    """kohya's precision names (float/fp16/bf16) -> torch dtype; None stays None."""
    if name is None:
        return None
    from library.models.loading import SAVE_DTYPES

    return SAVE_DTYPES[name]


def refuse_existing(path: str | os.PathLike) -> None:
    """Outputs are never overwritten: a merge or resize over its own input would destroy the input."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists; choose a new output path (nothing was written)")


def modules_state_dict(modules: dict[str, LoRAFactors], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya's file layout: down, up and a 0-dim alpha per module (alpha = rank where none was given)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        out[name + DOWN_SUFFIX] = module.down.detach().to("cpu", dtype or module.down.dtype).contiguous()
        out[name + UP_SUFFIX] = module.up.detach().to("cpu", dtype or module.up.dtype).contiguous()
        out[name + ALPHA_SUFFIX] = torch.tensor(module.effective_alpha, dtype=dtype or torch.float32)
    return out


def save_lora_file(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None) -> None:
    """``.safetensors`` with metadata and the sshs_* hashes (as ``LoRANetwork.save_weights``), else torch.save."""
    from library.io import atomic_save_safetensors, atomic_torch_save
    from networks.lora import precalculate_safetensors_hashes

    if Path(path).suffix.lower() != ".safetensors":
        atomic_torch_save(state_dict, path)
        return
    metadata = {k: str(v) for k, v in (metadata or {}).items() if not k.startswith("sshs_")}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(state_dict, metadata)
    atomic_save_safetensors(state_dict, path, metadata)


def common_value(values: list[float] | list[int]) -> str:
    """kohya's ss_network_dim / ss_network_alpha: the one value all modules share, else "Dynamic"."""
    distinct = sorted(set(values))
    if len(distinct) != 1:
        return "Dynamic"
    value = distinct[0]
    return str(int(value)) if isinstance(value, int) else str(float(value))


# --------------------------------------------------------------------------------------------------
# the check


@dataclass
class ModuleInfo:
    name: str
    part: str
    rank: int
    alpha: float
    mean_abs_down: float
    mean_abs_up: float

    @property
    def untrained(self) -> bool:
        return self.mean_abs_up == 0.0


@dataclass
class LoRAReport:
    """What the checker found in one file."""

    modules: list[ModuleInfo]
    other_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def parts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.modules:
            counts[module.part] = counts.get(module.part, 0) + 1
        return counts

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules})

    @property
    def untrained(self) -> list[str]:
        return [m.name for m in self.modules if m.untrained]


def check_lora_file(path: str | os.PathLike) -> LoRAReport:
    state_dict, _ = read_lora_file(path)
    modules, others = group_modules(state_dict, str(path))
    infos = [
        ModuleInfo(name, module.part, module.rank, module.effective_alpha,
                   float(module.down.float().abs().mean()), float(module.up.float().abs().mean()))
        for name, module in sorted(modules.items())
    ]
    return LoRAReport(infos, {k: tuple(state_dict[k].shape) for k in others})


def format_report(report: LoRAReport, show_all: bool) -> list[str]:
    lines = [f"{'module':<80} {'rank':>4} {'alpha':>8} {'mean|down|':>11} {'mean|up|':>11}"]
    for m in report.modules:
        lines.append(f"{m.name:<80} {m.rank:>4} {m.alpha:>8g} {m.mean_abs_down:>11.3e} {m.mean_abs_up:>11.3e}")
    if show_all:
        for key, shape in report.other_keys.items():
            lines.append(f"{key:<80} (not a LoRA factor) shape {shape}")
    parts = ", ".join(f"{part}: {count}" for part, count in sorted(report.parts.items()))
    lines.append(f"number of LoRA modules: {len(report.modules)} ({parts or 'none'})")
    ranks = ", ".join(map(str, report.ranks)) or "-"
    alphas = ", ".join(f"{a:g}" for a in report.alphas) or "-"
    lines.append(f"rank(s): {ranks}; alpha(s): {alphas}")
    if report.other_keys:
        lines.append(f"{len(report.other_keys)} tensor(s) belong to no LoRA module" + ("" if show_all else " (-s lists them)"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="LoRA file to check (.safetensors, .pt, .ckpt)")
    parser.add_argument("-s", "--show_all", "--show_all_keys", dest="show_all", action="store_true",
                        help="also list tensors that belong to no LoRA module")
    args = parser.parse_args(argv)
    try:
        report = check_lora_file(args.file)
    except LoRAFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(format_report(report, args.show_all)))
    for name in report.untrained:
        print(f"warning: {name}: lora_up is all zeros, this module was never trained and changes nothing",
              file=sys.stderr)
    if not report.modules:
        print(f"warning: {args.file} holds no kohya LoRA module (*{DOWN_SUFFIX} keys)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
