"""Inspect a kohya-format LoRA file: its modules, ranks, alphas, which model parts it touches, dead modules.

    python networks/check_lora_weights.py lora.safetensors [-s|--show_all]

For every module one line ``name  rank  alpha  mean|down|  mean|up|``, then a summary: module count per part
(``unet``, ``te`` for SD1/SD2, ``te1``/``te2`` for SDXL), the ranks and alphas found, and a warning for each
module whose ``lora_up`` is all zeros: such a module was never trained (kohya initialises up to zero), so it
changes nothing. ``-s`` also lists the tensors that belong to no LoRA module. kohya's tool prints one CSV
line per tensor (mean and min of |value|); we print per module, which is what one checks a LoRA for.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from library.adapters.errors import LoRAFileError
from library.adapters.lora_files import DOWN_SUFFIX, group_modules, read_lora_file


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
