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
  * With ``dora_wd=True`` (DoRA, LyCORIS's name): the same modules with a trained magnitude per output row,
    ``<name>.dora_scale`` in the file (`networks.dora`); files with ``dora_scale`` keys load as DoRA.
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

from library.adapters.dora import DORA_SCALE_SUFFIX
from library.adapters.errors import LoRAWeightsError, NetworkArgumentError
from library.adapters.lora_files import file_dims_and_alphas, load_lora_state_dict, lora_delta_weight
from library.adapters.network_args import NETWORK_KWARGS, flag
from networks.base import AdapterNetwork, LowRankModule
from networks.dora import DORA_KWARG, DoRANetwork, has_dora_keys
from networks.plugin import adapter_network_from_weights, create_adapter_network

# Scaling by a power of two is exact in these (no subnormal results at LoRA magnitudes); float16 could underflow.
_WIDE_EXPONENT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

__all__ = ["DoRANetwork", "LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights",
           "LoRAWeightsError", "NetworkArgumentError"]


class LoRAModule(LowRankModule):
    """One low-rank update ``up(down(x)) * multiplier * alpha / rank`` added to an existing Linear/Conv2d.

    Its state dict holds only ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` (kohya's file layout).
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, block_index: int = -1) -> None:
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, dropout, rank_dropout, module_dropout,
                         block_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA's contribution for input ``x`` (what is added to the original output), or None when
        module dropout skips it for this pass.

        It runs once per module and step, so it does only the work that changes the result (bench/RESULTS.md,
        "Network cost per step"): no cast when ``x`` has the weights' dtype, no dropout op when a dropout is
        off, ``multiplier * alpha / rank`` as one factor, applied to the rank-sized activations when it is a
        power of two (exact there: the same bits as scaling the output) and not at all when it is 1."""
        multiplier = self.multiplier
        if multiplier == 0:
            return None
        training = self.training
        if training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return None
        lora_down = self.lora_down
        if x.dtype != lora_down.weight.dtype:
            x = x.to(lora_down.weight.dtype)
        lx = lora_down(x)
        compiling = torch.compiler.is_compiling()  # torch.compile: no branch on a value read from a tensor
        scale = self.scale if compiling else self._alpha_over_rank()
        if training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)  # kohya's --network_dropout (neuron dropout)
        if training and self.rank_dropout:
            lx = lx * self._rank_mask(lx)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected update, as if the rank were smaller
        factor = multiplier * scale
        if compiling:
            return self.lora_up(lx) * factor
        if factor == 1.0:
            return self.lora_up(lx)
        if lx.dtype in _WIDE_EXPONENT_DTYPES and abs(math.frexp(factor)[0]) == 0.5:
            return self.lora_up(lx * factor)
        return self.lora_up(lx) * factor

    @torch.compiler.disable  # eager only: torch.compile reads the buffer in the traced forward (`forward`)
    def _alpha_over_rank(self) -> float:
        """alpha / rank for the forward pass. The buffer's value is read again only when the buffer changed (a
        loaded file, an in-place write, another tensor): reading a GPU tensor's value waits for the device,
        which once per module and step would stall the queue of kernels."""
        alpha = self.alpha
        if alpha.is_inference():  # no version counter to watch
            return float(alpha) / self.lora_dim
        cached = self.__dict__.get("_alpha_cache")
        if cached is None or cached[0] is not alpha or cached[1] != alpha._version:
            cached = (alpha, alpha._version, float(alpha) / self.lora_dim)
            self.__dict__["_alpha_cache"] = cached
        return cached[2]

    def _rank_mask(self, lx: torch.Tensor) -> torch.Tensor:
        """Bernoulli keep-mask per (batch, rank), broadcast over tokens (Linear) or H, W (Conv2d)."""
        mask = (torch.rand((lx.shape[0], self.lora_dim), device=lx.device) > self.rank_dropout).to(lx.dtype)
        if self.is_conv:
            return mask[:, :, None, None]
        return mask.view(lx.shape[0], *([1] * (lx.dim() - 2)), self.lora_dim)

    # -- weight arithmetic (the protocol's merge / max-norm / LoRA+ / from-weights hooks) ---------------

    delta_weight = staticmethod(lora_delta_weight)

    @classmethod
    def dims_from_weights(cls, weights_sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, int], dict[str, float]]:
        """Rank (``lora_down.shape[0]``) and alpha per module of a kohya LoRA file; alpha missing: the rank."""
        return file_dims_and_alphas(weights_sd, source)


class LoRANetwork(AdapterNetwork):
    """All LoRA modules for one model, registered under their kohya names (so ``state_dict()`` is the file)."""

    module_class = LoRAModule
    accepted_kwargs = NETWORK_KWARGS + (DORA_KWARG,)  # dora_wd=True builds a `DoRANetwork` instead

    def load_state_dict_checked(self, weights_sd: dict[str, torch.Tensor], source: str = "weights") -> Any:
        """As for any adapter, with the fix named when the file is DoRA (has ``dora_scale``) and this network not."""
        dora = sorted(k for k in weights_sd if k.endswith(DORA_SCALE_SUFFIX))
        if dora:
            raise LoRAWeightsError(f"{source} is a DoRA file ({dora[0]}): add dora_wd=True to --network_args to "
                                   "continue it, or use --dim_from_weights")
        return super().load_state_dict_checked(weights_sd, source)


def network_class_for(kwargs: dict[str, Any],
                      weights_sd: dict[str, torch.Tensor] | None = None) -> type[AdapterNetwork]:
    """`DoRANetwork` for ``dora_wd=True`` in ``--network_args`` or a file with ``dora_scale`` keys, else
    `LoRANetwork`."""
    value = kwargs.get(DORA_KWARG, False)
    if isinstance(value, str) and value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise NetworkArgumentError(f"dora_wd={value} in --network_args: use dora_wd=True (DoRA) or dora_wd=False")
    if flag(value) or (weights_sd is not None and has_dora_keys(weights_sd)):
        return DoRANetwork
    return LoRANetwork


# --------------------------------------------------------------------------------------------------
# kohya's plug-in entry points


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module,
                   neuron_dropout: float | None = None, clip_skip: int | None = None, **kwargs: Any) -> AdapterNetwork:
    """A fresh LoRA network (kohya's signature). ``kwargs`` are ``--network_args`` values, usually strings:
    conv_dim, conv_alpha, rank_dropout, module_dropout, block_dims, block_alphas, conv_block_dims,
    conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold, loraplus_*lr_ratio, and dora_wd=True for
    DoRA (`networks.dora`).

    ``clip_skip`` (the training run's) decides which text-encoder layers reach the loss and get modules.
    """
    return create_adapter_network(network_class_for(kwargs), multiplier=multiplier, network_dim=network_dim,
                                  network_alpha=network_alpha, text_encoder=text_encoder, unet=unet,
                                  neuron_dropout=neuron_dropout, clip_skip=clip_skip, kwargs=kwargs)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any,
                                text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module,
                                weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                clip_skip: int | None = None, **kwargs: Any) -> tuple[AdapterNetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file: its modules, ranks (``lora_down.shape[0]``) and alphas (default:
    the rank); LoCon modules come with it. Returns ``(network, weights_sd)`` as kohya does, with the weights
    already loaded and ``weights_sd`` renamed to our names (diffusers-named SDXL keys become SAI names).

    Dims in ``kwargs`` are not used (the file decides: kohya's ``--dim_from_weights``); dropouts
    (``neuron_dropout`` as in ``create_network``), block LR weights and LoRA+ ratios apply. For training
    (not ``for_inference``) the file's modules on text-encoder layers that cannot reach the loss under
    ``clip_skip`` are left out, as `create_network` does; for inference (merging, extracting) every module is kept.
    A file with ``dora_scale`` keys (or ``dora_wd=True``) gives DoRA modules.
    """
    if weights_sd is None and file is not None:
        weights_sd = load_lora_state_dict(file)
    return adapter_network_from_weights(network_class_for(kwargs, weights_sd), multiplier=multiplier, file=file,
                                        text_encoder=text_encoder, unet=unet, weights_sd=weights_sd,
                                        for_inference=for_inference, clip_skip=clip_skip, kwargs=kwargs)


def merge_into_model(model: Any, files: list[str], ratios: list[float],
                     merge_dtype: torch.dtype = torch.float32) -> None:
    """Bake each network file into ``model`` (a library.models.loading.StableDiffusionModel) at its ratio: what
    merge_lora.py --sd_model writes and what train_network.py --base_weights trains on top of. kohya LoRA/LoCon
    files go through this network; DoRA and LyCORIS files (LoHa, LoKr, (IA)³, ...) through
    `library.adapters.lycoris_merge`, which gives LyCORIS's own merge result."""
    from library.adapters.lycoris_files import describe_kinds, is_plain_lora_file
    from library.adapters.lycoris_merge import merge_network_weights

    for module in (model.unet, *model.text_encoders):
        module.to(merge_dtype)
    for file, ratio in zip(files, ratios):
        weights_sd = load_lora_state_dict(file)
        if not is_plain_lora_file(weights_sd):
            counts = merge_network_weights(model.unet, model.text_encoders, weights_sd, ratio, str(file))
            print(f"{file}: merged {describe_kinds(counts)} at ratio {ratio}")
            continue
        network, weights_sd = create_network_from_weights(ratio, file, None, model.text_encoders, model.unet,
                                                          weights_sd=weights_sd, for_inference=True)
        network.merge_to(model.text_encoders, model.unet, weights_sd)
        print(f"{file}: merged {len(network.loras)} modules at ratio {ratio}")
