"""Inspect a network file (kohya LoRA/LoCon, DoRA, LyCORIS): its modules, ranks, alphas, which model parts it
touches, dead modules.

    python networks/check_lora_weights.py lora.safetensors [-s|--show_all]

For every module one line ``name  rank  alpha  mean|down|  mean|up|``, then a summary: module count per part
(``unet``, ``te`` for SD1/SD2, ``te1``/``te2`` for SDXL), the ranks and alphas found, and a warning for each
module whose ``lora_up`` is all zeros: such a module was never trained (kohya initialises up to zero), so it
changes nothing. ``-s`` also lists the tensors that belong to no LoRA module. kohya's tool prints one CSV
line per tensor (mean and min of |value|); we print per module, which is what one checks a LoRA for.

DoRA and LyCORIS modules (told apart by their keys, `library.adapters.lycoris_files`) get a second table:
``name  kind  rank  alpha  norm`` with kind = lora/dora/loha/lokr/ia3/full/diag-oft/boft/...; the norm is the
Frobenius norm of the module's update at multiplier 1 (for DoRA before its rescale), computed by LyCORIS's
functions for LoHa/LoKr; for kinds whose update depends on the base weight ((IA)³, OFT, norms) it is the norm
of the trained tensors, marked ``*``. A module whose norm is zero changes nothing (DoRA excepted: its scale may).
LoHa/LoKr files need the optional lycoris-lora package.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch

from library.adapters.errors import LoRAFileError
from library.adapters.lora_files import DOWN_SUFFIX, group_modules, lora_part, read_lora_file
from library.adapters.lycoris_files import AdapterModuleTensors, module_tensors
from library.adapters.lycoris_merge import update_of_module

NOT_TRAINED_TENSORS = ("alpha", "on_input", "dora_scale")


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
class AdapterModuleInfo:
    """A DoRA or LyCORIS module: its kind, rank (None where the algorithm has none) and the norm of its update
    (``norm_of_update``) or, where that needs the base weight, of its trained tensors."""

    name: str
    part: str
    kind: str
    rank: int | None
    alpha: float | None
    norm: float
    norm_of_update: bool

    @property
    def untrained(self) -> bool:
        return self.norm == 0.0 and not self.kind.endswith("dora")


@dataclass
class LoRAReport:
    """What the checker found in one file."""

    modules: list[ModuleInfo]
    other_keys: dict[str, tuple[int, ...]] = field(default_factory=dict)
    adapter_modules: list[AdapterModuleInfo] = field(default_factory=list)

    @property
    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for module in self.adapter_modules:
            counts[module.kind] = counts.get(module.kind, 0) + 1
        return dict(sorted(counts.items()))

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
        return sorted([m.name for m in self.modules if m.untrained] + [m.name for m in self.adapter_modules if m.untrained])


def check_lora_file(path: str | os.PathLike) -> LoRAReport:
    state_dict, _ = read_lora_file(path)
    all_modules, _ = module_tensors(state_dict)
    adapters = {name: m for name, m in all_modules.items() if not m.is_plain_lora}
    plain = {k: v for k, v in state_dict.items() if k.partition(".")[0] not in adapters}
    modules, others = group_modules(plain, str(path))
    infos = [
        ModuleInfo(name, module.part, module.rank, module.effective_alpha,
                   float(module.down.float().abs().mean()), float(module.up.float().abs().mean()))
        for name, module in sorted(modules.items())
    ]
    adapter_infos = [adapter_module_info(module, str(path)) for _, module in sorted(adapters.items())]
    return LoRAReport(infos, {k: tuple(state_dict[k].shape) for k in others}, adapter_infos)


def adapter_module_info(module: AdapterModuleTensors, source: str) -> AdapterModuleInfo:
    update = update_of_module(module, source)
    if update is not None:
        norm = float(update.float().norm())
    else:
        trained = [v.float().flatten() for k, v in module.tensors.items() if k not in NOT_TRAINED_TENSORS]
        norm = float(torch.cat(trained).norm()) if trained else 0.0
    return AdapterModuleInfo(module.name, lora_part(module.name), module.kind, module.rank, module.alpha, norm,
                             update is not None)


def format_report(report: LoRAReport, show_all: bool) -> list[str]:
    lines = []
    if report.modules or not report.adapter_modules:
        lines.append(f"{'module':<80} {'rank':>4} {'alpha':>8} {'mean|down|':>11} {'mean|up|':>11}")
        for m in report.modules:
            lines.append(f"{m.name:<80} {m.rank:>4} {m.alpha:>8g} {m.mean_abs_down:>11.3e} {m.mean_abs_up:>11.3e}")
        parts = ", ".join(f"{part}: {count}" for part, count in sorted(report.parts.items()))
        lines.append(f"number of LoRA modules: {len(report.modules)} ({parts or 'none'})")
        ranks = ", ".join(map(str, report.ranks)) or "-"
        alphas = ", ".join(f"{a:g}" for a in report.alphas) or "-"
        lines.append(f"rank(s): {ranks}; alpha(s): {alphas}")
    if report.adapter_modules:
        lines.extend(format_adapter_modules(report))
    if show_all:
        for key, shape in report.other_keys.items():
            lines.append(f"{key:<80} (not a LoRA factor) shape {shape}")
    if report.other_keys:
        lines.append(f"{len(report.other_keys)} tensor(s) belong to no LoRA module" + ("" if show_all else " (-s lists them)"))
    return lines


def format_adapter_modules(report: LoRAReport) -> list[str]:
    lines = [f"{'module':<80} {'kind':>9} {'rank':>4} {'alpha':>8} {'norm':>11}"]
    for m in report.adapter_modules:
        rank = "-" if m.rank is None else str(m.rank)
        alpha = "-" if m.alpha is None else f"{m.alpha:g}"
        lines.append(f"{m.name:<80} {m.kind:>9} {rank:>4} {alpha:>8} {m.norm:>11.3e}{'' if m.norm_of_update else '*'}")
    parts: dict[str, int] = {}
    for m in report.adapter_modules:
        parts[m.part] = parts.get(m.part, 0) + 1
    kinds = ", ".join(f"{kind}: {count}" for kind, count in report.kinds.items())
    part_counts = ", ".join(f"{part}: {count}" for part, count in sorted(parts.items()))
    lines.append(f"number of DoRA/LyCORIS modules: {len(report.adapter_modules)} ({kinds}; {part_counts})")
    lines.append("norm: of the update at multiplier 1 (DoRA: before its rescale); *: of the trained tensors, the "
                 "update of this kind depends on the base weight")
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
    plain_untrained = {m.name for m in report.modules if m.untrained}
    for name in report.untrained:
        what = "lora_up is all zeros" if name in plain_untrained else "its update is all zeros"
        print(f"warning: {name}: {what}, this module was never trained and changes nothing", file=sys.stderr)
    if not report.modules and not report.adapter_modules:
        print(f"warning: {args.file} holds no kohya LoRA module (*{DOWN_SUFFIX} keys)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
