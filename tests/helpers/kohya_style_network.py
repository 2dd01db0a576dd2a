"""A third-party ``--network_module`` that knows nothing of this project: kohya's plug-in API only.

``create_network`` has kohya's exact signature (no ``clip_skip``), and the network is a plain ``nn.Module``
with kohya's method names: a rank-1 LoRA on every ``to_q`` of the UNet, applied by replacing ``forward`` as
kohya's LoRAModule does. ``CALLS`` records what the trainer passed, for the test to check.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CALLS: list[dict[str, Any]] = []


class _Rank1(nn.Module):
    def __init__(self, org: nn.Linear) -> None:
        super().__init__()
        self.down = nn.Linear(org.in_features, 1, bias=False)
        self.up = nn.Linear(1, org.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.org_forward = org.forward
        org.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.org_forward(x) + self.up(self.down(x.float())).to(x.dtype)


class KohyaStyleNetwork(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.targets = [(name, module) for name, module in unet.named_modules() if name.endswith("to_q")]
        self.loras = nn.ModuleDict()

    def apply_to(self, text_encoder: Any, unet: Any, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        for name, module in self.targets:
            self.loras[name.replace(".", "_")] = _Rank1(module)

    def load_weights(self, file: str) -> Any:
        return self.load_state_dict(load_file(file), strict=False)

    def prepare_optimizer_params(self, text_encoder_lr: Any, unet_lr: Any, default_lr: Any) -> tuple[list, list]:
        return [{"params": list(self.parameters()), "lr": unet_lr or default_lr}], ["unet"]

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, file, metadata)

    def apply_max_norm_regularization(self, max_norm_value: float, device: Any) -> tuple[int, float, float]:
        return 0, 0.0, 0.0


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    CALLS.append({"multiplier": multiplier, "network_dim": network_dim, "network_alpha": network_alpha,
                  "neuron_dropout": neuron_dropout, **kwargs})
    return KohyaStyleNetwork(unet)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    network = KohyaStyleNetwork(unet)
    return network, weights_sd
