"""DoRA (weight-decomposed LoRA) for the native network: ``--network_module networks.lora --network_args dora_wd=True``.

A DoRA module is a LoRA (``lora_down``, ``lora_up``, ``alpha``) plus a trained magnitude per output row,
``dora_scale``: the layer computes with ``W' = dora_scale * (W + dW) / ||W + dW||`` (`library.adapters.dora`),
LyCORIS's DoRA with its default ``wd_on_output=True``. The file has LyCORIS's keys (``<name>.lora_down.weight``,
``<name>.lora_up.weight``, ``<name>.alpha``, ``<name>.dora_scale``), so LyCORIS, ComfyUI and A1111 read it.

The module is attached like every adapter, by adding ``forward(x)`` to the frozen layer's output: that
contribution is the layer's operation with the weight ``W' - W`` (no bias), so the sum is the layer with ``W'``;
it is computed as ``(s - 1) W x + s dW x`` with the per-row factor ``s``, without building ``dW``.
Differences from a LoRA module, all as in LyCORIS:
  * the multiplier interpolates the rescaling only (``dW`` is always added in full; see `dora_merged_weight`);
  * ``--network_dropout`` (dropout of the rank activations) has no place in a rebuilt weight and is refused;
    ``rank_dropout`` drops whole rank components of ``dW`` (one mask per forward pass, rescaled by 1/(1-p))
    and ``module_dropout`` skips the module;
  * max-norm regularisation (``--scale_weight_norms``) limits the low-rank part ``dW``.

`networks.lora` picks this class for ``dora_wd=True`` and for files that have ``dora_scale`` keys.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from library.adapters.dora import DORA_SCALE_SUFFIX, dora_merged_weight, dora_scale_shape, initial_dora_scale
from library.adapters.errors import LoRAWeightsError, NetworkArgumentError
from library.adapters.lora_files import DOWN_SUFFIX, UP_SUFFIX, file_dims_and_alphas
from library.adapters.network_args import NETWORK_KWARGS
from networks.base import AdapterNetwork, LowRankModule

DORA_KWARG = "dora_wd"  # LyCORIS's --network_args name for DoRA
_MATMUL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class DoRAModule(LowRankModule):
    """One DoRA update of a Linear/Conv2d: a LoRA ``up(down(x)) * alpha / rank`` plus ``dora_scale`` per row."""

    kind = "DoRA"

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, block_index: int = -1) -> None:
        if dropout:
            raise NetworkArgumentError(
                f"--network_dropout {dropout} does not apply to DoRA (dora_wd=True): DoRA rebuilds the whole weight, "
                "so there are no rank activations to drop (LyCORIS ignores it too); remove --network_dropout, or "
                "use rank_dropout=... / module_dropout=... in --network_args")
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout,
                         block_index)
        self.dora_scale = nn.Parameter(initial_dora_scale(org_module.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """What turns the layer's output ``W x`` into ``W' x``: ``(s - 1) * W x + s * dW x`` with the per-row factor
        ``s`` of `library.adapters.dora` (LyCORIS's forward computes the layer with ``W' - W``, the same sum).

        ``dW`` is never built: ``||W + dW||`` per row comes from ``||W||``, ``W down^T`` and ``down down^T``
        (rank-sized products), so the pass costs a LoRA plus one base matmul and keeps no weight-sized tensors
        for the backward pass. The norm is not detached (gradients flow through it, as in LyCORIS).
        """
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return None
        weight = self.org_module.weight.detach()
        if weight.dtype not in _MATMUL_DTYPES:  # e.g. float8 storage: compute in float32
            weight = weight.to(torch.float32)
        down, scale = self._down_and_scale()
        up = self.lora_up.weight
        factor = self._row_factor(weight, down, up, scale)
        base = self._base_op(x.to(weight.dtype), weight).to(torch.float32)
        low_rank = self._up_op(self._down_op(x.to(down.dtype), down), up) * scale
        if self.is_conv:
            factor = factor.view(-1, 1, 1)
        return (factor - 1) * base + factor * low_rank

    def _down_and_scale(self) -> tuple[torch.Tensor, float]:
        """``lora_down`` and ``alpha / rank``; in training with rank_dropout, whole rank components are dropped
        (one mask per pass) and the scale keeps the expected update."""
        down, scale = self.lora_down.weight, self.scale
        if self.training and self.rank_dropout:
            keep = (torch.rand(self.lora_dim, device=down.device) > self.rank_dropout).to(down.dtype)
            down = down * keep.view(-1, *([1] * (down.dim() - 1)))
            scale = scale / (1.0 - self.rank_dropout)
        return down, scale

    def _row_factor(self, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
        """``s = multiplier * (dora_scale / ||W + dW|| - 1) + 1`` per output row, float32, with
        ``||W + dW||^2 = ||W||^2 + 2 scale <W, up down> + scale^2 ||up down||^2`` from rank-sized products."""
        rows = weight.shape[0]
        w = weight.reshape(rows, -1)
        d = down.reshape(down.shape[0], -1)
        u = up.reshape(rows, -1)
        cross = (w @ d.to(w.dtype).T).to(torch.float32)  # (rows, rank): W down^T
        gram = d @ d.T  # (rank, rank)
        norm_sq = (torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
                   + (2 * scale) * (u * cross).sum(1) + (scale * scale) * ((u @ gram) * u).sum(1))
        norm = norm_sq.clamp_min(torch.finfo(torch.float32).tiny).sqrt() + torch.finfo(torch.float32).eps
        factor = self.dora_scale.reshape(rows).to(torch.float32) / norm
        return factor if self.multiplier == 1 else self.multiplier * (factor - 1) + 1

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The frozen layer without its bias: ``W x``."""
        org = self.org_module
        if self.is_conv:
            return F.conv2d(x, weight, None, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, weight)

    def _down_op(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, down, None, self.lora_down.stride, self.lora_down.padding)
        return F.linear(x, down)

    def _up_op(self, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, up) if self.is_conv else F.linear(x, up)

    # -- weight arithmetic (the protocol's merge / max-norm / LoRA+ / from-weights hooks) ---------------

    def merged_weight(self, weight: torch.Tensor, weights_sd: dict[str, torch.Tensor],
                      device: torch.device | str) -> torch.Tensor | None:
        """``W'`` from ``weights_sd`` at this module's multiplier, float32 (LyCORIS's merge)."""
        delta = self.merged_weight_delta(weights_sd, device)
        if delta is None:
            return None
        dora_scale = weights_sd[self.lora_name + DORA_SCALE_SUFFIX].to(device, torch.float32)
        return dora_merged_weight(weight.to(device, torch.float32), delta, dora_scale, self.multiplier)

    @classmethod
    def dims_from_weights(cls, weights_sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, int], dict[str, float]]:
        """Rank and alpha per module of a DoRA file; every module must have its ``dora_scale``."""
        check_dora_keys(weights_sd, source)
        return file_dims_and_alphas(weights_sd, source)


class DoRANetwork(AdapterNetwork):
    """All DoRA modules for one model, registered under their kohya names (so ``state_dict()`` is the file)."""

    module_class = DoRAModule
    accepted_kwargs = NETWORK_KWARGS + (DORA_KWARG,)

    def load_state_dict_checked(self, weights_sd: dict[str, torch.Tensor], source: str = "weights") -> Any:
        """As for LoRA, and a file without ``dora_scale`` (a plain LoRA) is refused: DoRA could not continue it."""
        check_dora_keys(weights_sd, source)
        return super().load_state_dict_checked(weights_sd, source)


def has_dora_keys(weights_sd: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(DORA_SCALE_SUFFIX) for key in weights_sd)


def check_dora_keys(weights_sd: dict[str, torch.Tensor], source: str) -> None:
    """Every module with ``lora_down`` has a ``dora_scale`` of one value per output row."""
    for key, down in weights_sd.items():
        if not key.endswith(DOWN_SUFFIX):
            continue
        name = key[: -len(DOWN_SUFFIX)]
        scale = weights_sd.get(name + DORA_SCALE_SUFFIX)
        if scale is None:
            raise LoRAWeightsError(
                f"{source}: {name} has no dora_scale: this is a plain LoRA file, not DoRA; remove dora_wd=True "
                "from --network_args to train or load it as LoRA")
        up = weights_sd.get(name + UP_SUFFIX)
        if up is not None and scale.numel() != up.shape[0]:
            raise LoRAWeightsError(
                f"{source}: {name}.dora_scale has shape {tuple(scale.shape)}, expected "
                f"{dora_scale_shape(up.shape[:1] + down.shape[1:])} (one value per output row, LyCORIS's "
                "wd_on_output=True); files made with wd_on_output=False are not supported")
