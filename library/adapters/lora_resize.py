"""Change the rank of a LoRA's modules by an exact SVD (the arithmetic of ``networks/resize_lora.py``, which
documents the rules and how they differ from kohya)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from library.adapters.lora_files import LoRAFactors, common_value

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
