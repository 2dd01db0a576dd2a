"""A toy adapter kind behind the adapter protocol: a dense ``delta`` added to each target's weight.

It shows what a new network type costs: one `AdapterModule` subclass, a one-line network class and kohya's two
entry points; targets, names, block settings, files, LR groups, max-norm and merging come from the protocol.
Usable as ``--network_module tests.helpers.scaled_delta_network``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from networks.base import AdapterModule, AdapterNetwork
from networks.plugin import adapter_network_from_weights, create_adapter_network


class ScaledDeltaModule(AdapterModule):
    """``output += multiplier * delta_scale * op(x, delta)``: a full-size update of the target weight, starting
    at zero; ``delta_scale`` is this kind's own ``--network_args`` value."""

    network_args = ("delta_scale",)

    @classmethod
    def options_from_network_args(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"delta_scale": float(kwargs.get("delta_scale", 1.0))}

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 1,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, block_index: int = -1, delta_scale: float = 1.0) -> None:
        super().__init__(lora_name, org_module, multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         module_dropout=module_dropout, block_index=block_index)
        self.lora_dim = int(lora_dim)
        self.delta_scale = delta_scale
        weight = org_module.weight
        self.delta = nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
        self.register_buffer("alpha", torch.tensor(float(alpha or 1.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        target = self.org_module
        x = x.to(self.delta.dtype)
        if isinstance(target, nn.Conv2d):
            out = F.conv2d(x, self.delta, None, target.stride, target.padding, target.dilation, target.groups)
        else:
            out = F.linear(x, self.delta)
        return out * (self.multiplier * self.delta_scale)

    def weight_delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self.delta.to(device, torch.float32) * self.delta_scale

    def merged_weight_delta(self, weights_sd: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor | None:
        delta = weights_sd.get(self.lora_name + ".delta")
        return None if delta is None else delta.to(device, torch.float32) * self.delta_scale

    def scale_weights(self, ratio: float) -> None:
        self.delta.mul_(ratio)

    @classmethod
    def dims_from_weights(cls, weights_sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, int], dict[str, float]]:
        names = [key[: -len(".delta")] for key in weights_sd if key.endswith(".delta")]
        return {name: 1 for name in names}, {name: float(weights_sd.get(name + ".alpha", 1.0)) for name in names}


class ScaledDeltaNetwork(AdapterNetwork):
    module_class = ScaledDeltaModule


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: nn.Module, neuron_dropout: float | None = None,
                   clip_skip: int | None = None, **kwargs: Any) -> ScaledDeltaNetwork:
    return create_adapter_network(ScaledDeltaNetwork, multiplier=multiplier, network_dim=network_dim,
                                  network_alpha=network_alpha, text_encoder=text_encoder, unet=unet,
                                  neuron_dropout=neuron_dropout, clip_skip=clip_skip, kwargs=kwargs)


def create_network_from_weights(multiplier: float, file: Any, vae: Any, text_encoder: Any, unet: nn.Module,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                clip_skip: int | None = None, **kwargs: Any) -> tuple[ScaledDeltaNetwork, dict]:
    return adapter_network_from_weights(ScaledDeltaNetwork, multiplier=multiplier, file=file, text_encoder=text_encoder,
                                        unet=unet, weights_sd=weights_sd, for_inference=for_inference,
                                        clip_skip=clip_skip, kwargs=kwargs)
