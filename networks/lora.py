"""LoRA / LoCon for SD1.x, SD2.x and SDXL, saved in kohya's format (what A1111, ComfyUI and diffusers read).

This module is a kohya ``--network_module``: it provides ``create_network``, ``create_network_from_weights``
and a network object with kohya's method names, so ``train_network.py`` (ours or kohya's) can drive it. LoRA is
one implementation of the adapter protocol (`networks.base`): `LoRAModule` is the module class, `LoRANetwork`
the network; which modules get one and their kohya names are in `library.adapters.targets`, block-wise
settings in `library.adapters.blocks`, the file format in `library.adapters.lora_files`.

  * LoRA: every Linear and 1x1 conv of the UNet's transformer blocks and of the CLIP attention/MLP layers.
  * With ``conv_dim`` (LoCon): the 3x3 convs of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` get
    ``conv_dim``/``conv_alpha``; the Linear/1x1 layers in them (time_emb_proj, conv_shortcut) get the
    normal ``network_dim``.
  * Unlike kohya, no module is made on a text-encoder layer that cannot change the loss: SDXL's text encoder 1
    is read at its penultimate layer, so its last layer gets none, and with ``clip_skip`` k the last k-1 layers
    of an SD1/SD2 encoder get none. Such a module would never learn, and under DDP its parameters, which
    receive no gradient, stop training at step 2. The file has fewer ``lora_te`` keys than kohya's; A1111,
    ComfyUI and diffusers load it all the same.

Saved key names: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``. The LoRA is applied
with a forward hook on the original module: the base model is untouched, and ``restore()`` removes the hooks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from library.adapters.errors import LoRAWeightsError, NetworkArgumentError
from library.adapters.lora_files import ALPHA_SUFFIX, DOWN_SUFFIX, UP_SUFFIX, lora_delta_weight
from networks.base import AdapterModule, AdapterNetwork
from networks.plugin import adapter_network_from_weights, create_adapter_network

__all__ = ["LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights", "LoRAWeightsError",
           "NetworkArgumentError"]


class LoRAModule(AdapterModule):
    """One low-rank update ``up(down(x)) * multiplier * alpha / rank`` added to an existing Linear/Conv2d.

    Its state dict holds only ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` (kohya's file layout).
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, block_index: int = -1) -> None:
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        super().__init__(lora_name, org_module, multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         module_dropout=module_dropout, block_index=block_index)
        self.lora_dim = int(lora_dim)
        weight = org_module.weight
        factory = {"device": weight.device, "dtype": torch.float32}
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, bias=False, **factory)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, bias=False, **factory)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False, **factory)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = self.lora_dim if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=weight.device))

    @property
    def is_conv(self) -> bool:
        return isinstance(self.lora_down, nn.Conv2d)

    @property
    def scale(self) -> float:
        """alpha / rank, read from the buffer so that loading a file with another alpha takes effect."""
        return float(self.alpha) / self.lora_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA's contribution for input ``x`` (what is added to the original output), or None when
        module dropout skips it for this pass."""
        if self.multiplier == 0:
            return None
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return None
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)  # kohya's --network_dropout (neuron dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            lx = lx * self._rank_mask(lx)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected update, as if the rank were smaller
        return self.lora_up(lx) * (self.multiplier * scale)

    def _rank_mask(self, lx: torch.Tensor) -> torch.Tensor:
        """Bernoulli keep-mask per (batch, rank), broadcast over tokens (Linear) or H, W (Conv2d)."""
        mask = (torch.rand((lx.shape[0], self.lora_dim), device=lx.device) > self.rank_dropout).to(lx.dtype)
        if self.is_conv:
            return mask[:, :, None, None]
        return mask.view(lx.shape[0], *([1] * (lx.dim() - 2)), self.lora_dim)

    # -- weight arithmetic (the protocol's merge / max-norm / LoRA+ / from-weights hooks) ---------------

    delta_weight = staticmethod(lora_delta_weight)

    def weight_delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        down = self.lora_down.weight.to(device, torch.float32)
        up = self.lora_up.weight.to(device, torch.float32)
        return lora_delta_weight(down, up, self.scale)

    def merged_weight_delta(self, weights_sd: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor | None:
        down = weights_sd.get(self.lora_name + DOWN_SUFFIX)
        if down is None:
            return None
        up = weights_sd[self.lora_name + UP_SUFFIX]
        alpha = weights_sd.get(self.lora_name + ALPHA_SUFFIX)
        scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
        return lora_delta_weight(down.to(device, torch.float32), up.to(device, torch.float32), scale)

    def scale_weights(self, ratio: float) -> None:
        self.lora_up.weight.mul_(math.sqrt(ratio))
        self.lora_down.weight.mul_(math.sqrt(ratio))

    def plus_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up.weight]

    @classmethod
    def dims_from_weights(cls, weights_sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, int], dict[str, float]]:
        """Rank (``lora_down.shape[0]``) and alpha per module of a kohya LoRA file; alpha missing: the rank."""
        modules_dim, modules_alpha = {}, {}
        for key, value in weights_sd.items():
            name, _, rest = key.partition(".")
            if rest == "alpha":
                modules_alpha[name] = float(value)
            elif rest == "lora_down.weight":
                modules_dim[name] = int(value.shape[0])
        missing_down = sorted(set(modules_alpha) - set(modules_dim))
        if missing_down:
            raise LoRAWeightsError(f"{source}: {missing_down[0]} has an alpha but no lora_down.weight")
        return modules_dim, modules_alpha


class LoRANetwork(AdapterNetwork):
    """All LoRA modules for one model, registered under their kohya names (so ``state_dict()`` is the file)."""

    module_class = LoRAModule


# --------------------------------------------------------------------------------------------------
# kohya's plug-in entry points


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module,
                   neuron_dropout: float | None = None, clip_skip: int | None = None, **kwargs: Any) -> LoRANetwork:
    """A fresh LoRA network (kohya's signature). ``kwargs`` are ``--network_args`` values, usually strings:
    conv_dim, conv_alpha, rank_dropout, module_dropout, block_dims, block_alphas, conv_block_dims,
    conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold, loraplus_*lr_ratio.

    ``clip_skip`` (the training run's) decides which text-encoder layers reach the loss and get modules.
    """
    return create_adapter_network(LoRANetwork, multiplier=multiplier, network_dim=network_dim,
                                  network_alpha=network_alpha, text_encoder=text_encoder, unet=unet,
                                  neuron_dropout=neuron_dropout, clip_skip=clip_skip, kwargs=kwargs)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any,
                                text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                clip_skip: int | None = None, **kwargs: Any) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file: its modules, ranks (``lora_down.shape[0]``) and alphas (default:
    the rank); LoCon modules come with it. Returns ``(network, weights_sd)`` as kohya does, with the weights
    already loaded and ``weights_sd`` renamed to our names (diffusers-named SDXL keys become SAI names).

    Dims in ``kwargs`` are not used (the file decides: kohya's ``--dim_from_weights``); dropouts
    (``neuron_dropout`` as in ``create_network``), block LR weights and LoRA+ ratios apply. For training
    (not ``for_inference``) the file's modules on text-encoder layers that cannot reach the loss under
    ``clip_skip`` are left out, as `create_network` does; for inference (merging, extracting) every module is kept.
    """
    return adapter_network_from_weights(LoRANetwork, multiplier=multiplier, file=file, text_encoder=text_encoder,
                                        unet=unet, weights_sd=weights_sd, for_inference=for_inference,
                                        clip_skip=clip_skip, kwargs=kwargs)


def merge_into_model(model: Any, files: list[str], ratios: list[float],
                     merge_dtype: torch.dtype = torch.float32) -> None:
    """Bake each LoRA file into ``model`` (a library.models.loading.StableDiffusionModel) at its ratio: what
    merge_lora.py --sd_model writes and what train_network.py --base_weights trains on top of."""
    for module in (model.unet, *model.text_encoders):
        module.to(merge_dtype)
    for file, ratio in zip(files, ratios):
        network, weights_sd = create_network_from_weights(ratio, file, None, model.text_encoders, model.unet,
                                                          for_inference=True)
        network.merge_to(model.text_encoders, model.unet, weights_sd)
        print(f"{file}: merged {len(network.loras)} modules at ratio {ratio}")
