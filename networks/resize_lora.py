"""Change the rank of a kohya LoRA by SVD, keeping its effect as far as the new rank allows (kohya's resize_lora.py).

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 8 [--new_conv_rank 4]
    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Per module: ``M = up @ down`` (convolutions flattened to out x (in*kh*kw)), its SVD ``U S Vh``, and the best
rank-``r`` approximation kept as ``up = U_r S_r``, ``down = Vh_r``. The new alpha is ``alpha_old / rank_old *
r`` (kohya's rule), so ``alpha / rank`` is unchanged and the module's update is the truncation of the old one:
a LoRA whose modules truly have rank <= r comes out with the same effect.

The rank ``r`` is ``--new_rank`` (``--new_conv_rank`` for 3x3 LoCon convs, default --new_rank), or chosen per
module by ``--dynamic_method`` with ``--new_rank`` as the cap (kohya's rules on the singular values S):
  * ``sv_ratio X``: keep the singular values larger than ``S[0] / X``;
  * ``sv_fro X``: the smallest rank whose Frobenius norm is at least the fraction X of the whole;
  * ``sv_cumulative X``: the smallest rank whose sum of singular values is at least the fraction X of the sum.
An all-zero module keeps rank 1. ``--verbose`` prints, per module, the fraction of sum(S) and of the
Frobenius norm retained (``||new update|| / ||old update||``) and S[0]/S[r-1]; the mean Frobenius retention
is always printed.

Metadata: the input's is kept; ``ss_network_dim``/``ss_network_alpha`` become the new values, or "Dynamic"
with a dynamic method, and ``ss_training_comment`` gets kohya's note about the resize. The hashes are renewed.

Differences from kohya: the SVD is computed exactly from the rank-``r_old`` factors (QR of up and down, then
the SVD of an r_old x r_old core), so no ``svd_lowrank`` approximation is ever needed and ``--svd_lowrank_niter``
has no effect; a rank cannot grow beyond the module's old rank (kohya pads with singular values ~0); 1x1
convolutions (SD1's proj_in/proj_out) take ``--new_rank`` like the Linear layers they are trained with, where
kohya gives every 4-D weight ``--new_conv_rank``; ``ss_network_alpha`` is the alpha all Linear modules share
(kohya writes the last module's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path


import torch

from networks.check_lora_weights import (
    PRECISIONS,
    LoRAFactors,
    LoRAFileError,
    common_value,
    modules_state_dict,
    precision_dtype,
    read_lora_modules,
    refuse_existing,
    save_lora_file,
)

MIN_SV = 1e-6  # kohya: a module whose largest singular value is below this is all zeros
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


# --------------------------------------------------------------------------------------------------
# choosing the rank


def rank_by_sv_ratio(s: torch.Tensor, ratio: float) -> int:
    """How many singular values exceed S[0] / ratio (at least 1)."""
    return max(1, int((s > s[0] / ratio).sum()))


def rank_by_sv_fro(s: torch.Tensor, fraction: float) -> int:
    """The smallest r with ||S[:r]||_2 >= fraction * ||S||_2."""
    energy = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
    return min(len(s), int(torch.searchsorted(energy, torch.tensor([fraction ** 2], dtype=energy.dtype))) + 1)


def rank_by_sv_cumulative(s: torch.Tensor, fraction: float) -> int:
    """The smallest r with sum(S[:r]) >= fraction * sum(S)."""
    share = torch.cumsum(s.double(), 0) / float(s.double().sum())
    return min(len(s), int(torch.searchsorted(share, torch.tensor([fraction], dtype=share.dtype))) + 1)


RANK_RULES = {"sv_ratio": rank_by_sv_ratio, "sv_fro": rank_by_sv_fro, "sv_cumulative": rank_by_sv_cumulative}


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None, param: float | None) -> int:
    """kohya's rank_resize: the fixed or dynamic rank, capped at ``max_rank``; 1 for an all-zero module."""
    if len(s) == 0 or float(s[0]) <= MIN_SV:
        return 1
    rank = RANK_RULES[method](s, param) if method else max_rank
    return max(1, min(rank, max_rank, len(s)))


# --------------------------------------------------------------------------------------------------
# the SVD


def low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of ``up @ down`` (out x r @ r x in) without forming the out x in matrix: QR of both
    factors, then the SVD of the small core ``R_up @ R_down^T``. Returns U (out x k), S (k), Vh (k x in)."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


@dataclass(frozen=True)
class ResizeInfo:
    """What resizing did to one module (the numbers --verbose prints)."""

    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float

    def line(self, dynamic: bool) -> str:
        text = (f"{self.name:75} | sum(S) retained: {self.sum_retained:.1%}, fro retained: {self.fro_retained:.1%}, "
                f"max(S) ratio: {self.max_ratio:0.1f}")
        return text + (f", dynamic | dim: {self.new_rank}, alpha: {self.new_alpha:g}" if dynamic else "")


def resize_module(module: LoRAFactors, max_rank: int, method: str | None = None, param: float | None = None,
                  device: str | torch.device = "cpu") -> tuple[LoRAFactors, ResizeInfo]:
    """The module at its new rank, with alpha chosen so that alpha / rank stays what it was."""
    up = module.up.reshape(module.up.shape[0], -1).to(device, torch.float64)
    down = module.down.reshape(module.rank, -1).to(device, torch.float64)
    u, s, vh = low_rank_svd(up, down)
    rank = choose_rank(s, max_rank, method, param)
    new_up = (u[:, :rank] * s[:rank]).float().cpu()
    new_down = vh[:rank].float().cpu()
    if module.down.dim() == 4:
        new_down = new_down.reshape(rank, *module.down.shape[1:])
        new_up = new_up.reshape(module.up.shape[0], rank, 1, 1)
    new_alpha = module.scale * rank
    sum_all, fro_all = float(s.sum()), float(s.pow(2).sum().sqrt())
    info = ResizeInfo(
        module.name, module.rank, rank, new_alpha,
        sum_retained=float(s[:rank].sum()) / sum_all if sum_all else math.nan,
        fro_retained=float(s[:rank].pow(2).sum().sqrt()) / fro_all if fro_all else math.nan,
        max_ratio=float(s[0] / s[rank - 1]) if len(s) >= rank and float(s[rank - 1]) else math.nan,
    )
    return LoRAFactors(module.name, new_down, new_up, new_alpha), info


def resize_lora_modules(modules: dict[str, LoRAFactors], new_rank: int, new_conv_rank: int | None = None,
                        method: str | None = None, param: float | None = None,
                        device: str | torch.device = "cpu") -> tuple[dict[str, LoRAFactors], list[ResizeInfo]]:
    conv_rank = new_conv_rank if new_conv_rank is not None else new_rank
    resized, infos = {}, []
    with torch.no_grad():
        for name, module in modules.items():
            resized[name], info = resize_module(module, conv_rank if module.is_kxk_conv else new_rank, method, param, device)
            infos.append(info)
    return resized, infos


# --------------------------------------------------------------------------------------------------
# metadata


def resize_metadata(metadata: dict[str, str], resized: dict[str, LoRAFactors], infos: list[ResizeInfo],
                    new_rank: int, new_conv_rank: int, method: str | None, param: float | None) -> dict[str, str]:
    """The input's metadata with kohya's resize comment and the new dim/alpha (or "Dynamic")."""
    out = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    comment = metadata.get("ss_training_comment", "")
    old_dim = max(info.old_rank for info in infos)
    linear = [m for m in resized.values() if not m.is_kxk_conv] or list(resized.values())
    conv = [m for m in resized.values() if m.is_kxk_conv]
    if method:
        out["ss_training_comment"] = f"Dynamic resize with {method}: {param:g} from {old_dim}; {comment}"
        out["ss_network_dim"] = out["ss_network_alpha"] = "Dynamic"
        return out
    conv_desc = "" if new_rank == new_conv_rank else f" (conv: {new_conv_rank})"
    out["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}{conv_desc}; {comment}"
    out["ss_network_dim"] = common_value([m.rank for m in linear])
    out["ss_network_alpha"] = common_value([float(m.effective_alpha) for m in linear])
    if conv and "ss_network_args" in out:
        out["ss_network_args"] = _with_conv_args(out["ss_network_args"], conv)
    return out


def _with_conv_args(network_args: str, conv: list[LoRAFactors]) -> str:
    """Keep ss_network_args' conv_dim/conv_alpha in step with the resized LoCon modules."""
    try:
        args = json.loads(network_args)
    except json.JSONDecodeError:
        return network_args
    if not isinstance(args, dict) or "conv_dim" not in args:
        return network_args
    dim, alpha = common_value([m.rank for m in conv]), common_value([float(m.effective_alpha) for m in conv])
    if dim != "Dynamic":
        args["conv_dim"] = dim
    if alpha != "Dynamic":
        args["conv_alpha"] = alpha
    return json.dumps(args)


# --------------------------------------------------------------------------------------------------
# command line


def add_resize_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """kohya's resize_lora.py flags and defaults."""
    parser.add_argument("--model", required=True, help="LoRA to resize (.safetensors, .pt, .ckpt)")
    parser.add_argument("--save_to", required=True, help="output .safetensors/.pt/.ckpt/.pth; never overwritten")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the output (the cap with --dynamic_method)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank for 3x3 conv (LoCon) modules (default: --new_rank)")
    parser.add_argument("--save_precision", choices=PRECISIONS, default=None, help="dtype of the output (default float)")
    parser.add_argument("--device", default="cpu", help="device for the SVDs, e.g. cuda")
    parser.add_argument("--verbose", action="store_true", help="print the retained fractions for every module")
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, default=None,
                        help="choose each module's rank from its singular values (--new_rank caps it)")
    parser.add_argument("--dynamic_param", type=float, default=None,
                        help="sv_ratio: S[0]/S[r] limit (> 1); sv_fro, sv_cumulative: fraction to keep (0-1]")
    parser.add_argument("--svd_lowrank_niter", type=int, default=2,
                        help="accepted for kohya command lines; has no effect (the SVD here is exact and cheap)")


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if Path(args.save_to).suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth"):
        parser.error("--save_to must be a .safetensors, .ckpt, .pt or .pth file")
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        parser.error("--new_rank and --new_conv_rank must be at least 1")
    if args.dynamic_method and args.dynamic_param is None:
        parser.error(f"--dynamic_method {args.dynamic_method} needs --dynamic_param")
    if args.dynamic_param is not None and not args.dynamic_method:
        parser.error("--dynamic_param is used only with --dynamic_method")
    if args.dynamic_method == "sv_ratio" and args.dynamic_param <= 1:
        parser.error("--dynamic_param for sv_ratio is the largest S[0]/S[r] kept and must be > 1")
    if args.dynamic_method in ("sv_fro", "sv_cumulative") and not 0 < args.dynamic_param <= 1:
        parser.error(f"--dynamic_param for {args.dynamic_method} is a fraction in (0, 1]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_resize_lora_arguments(parser)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    try:
        refuse_existing(args.save_to)
        modules, metadata = read_lora_modules(args.model)
    except (FileExistsError, LoRAFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.dynamic_method:
        print(f"choosing ranks with {args.dynamic_method} {args.dynamic_param:g}, at most {args.new_rank}")
    resized, infos = resize_lora_modules(modules, args.new_rank, conv_rank, args.dynamic_method, args.dynamic_param,
                                         args.device)
    if args.verbose:
        for info in infos:
            print(info.line(bool(args.dynamic_method)))
    fro = torch.tensor([i.fro_retained for i in infos if not math.isnan(i.fro_retained)])
    if len(fro):
        print(f"Average Frobenius norm retention: {float(fro.mean()):.2%} | std: {float(fro.std(unbiased=False)):0.3f}")
    new_metadata = resize_metadata(metadata, resized, infos, args.new_rank, conv_rank, args.dynamic_method, args.dynamic_param)
    save_lora_file(modules_state_dict(resized, precision_dtype(args.save_precision) or torch.float32), args.save_to, new_metadata)
    ranks = sorted({m.rank for m in resized.values()})
    print(f"resized {len(resized)} modules (rank(s) {ranks}) -> {args.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
