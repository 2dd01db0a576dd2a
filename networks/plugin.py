"""kohya's network plug-in API: what a ``--network_module`` provides, and both entry points for any adapter kind.

A ``--network_module`` is a Python module with ``create_network`` and ``create_network_from_weights``
(`NetworkModule`); the network they return is an ``nn.Module`` with kohya's method names (apply_to,
load_weights, prepare_optimizer_params, save_weights, apply_max_norm_regularization). Ours (``networks.lora``)
builds them with `create_adapter_network` / `adapter_network_from_weights` from its
`networks.base.AdapterNetwork` subclass; external modules (kohya's own, LyCORIS) only need the two functions.
`build_network` is how the trainer calls any of them.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from library.adapters.blocks import BlockSettings, block_lr_weights, block_settings
from library.adapters.errors import NetworkArgumentError
from library.adapters.lora_files import load_lora_state_dict
from library.adapters.network_args import (
    DEFAULT_CONV_ALPHA,
    DEFAULT_NETWORK_ALPHA,
    DEFAULT_NETWORK_DIM,
    check_kwargs,
    flag,
    loraplus_kwargs,
    opt_float,
    opt_int,
)
from library.adapters.targets import name_aliases, rename_key, text_encoder_layers_in_use
from library.models.families import family_of_unet
from networks.base import AdapterNetwork


class NetworkModule(Protocol):
    """A ``--network_module``: kohya's two entry points (extra keyword arguments are ``--network_args``)."""

    def create_network(self, multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                       text_encoder: Any, unet: Any, neuron_dropout: float | None = None, **kwargs: Any) -> nn.Module: ...

    def create_network_from_weights(self, multiplier: float, file: str | None, vae: Any, text_encoder: Any, unet: Any,
                                    weights_sd: dict[str, torch.Tensor] | None = None, for_inference: bool = False,
                                    **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class NetworkOptions:
    """The trainer's network settings (``--network_*`` flags; ``network_args`` already split into key=value)."""

    network_dim: int | None = None
    network_alpha: float | None = None
    network_dropout: float | None = None
    network_args: dict[str, str] = field(default_factory=dict)
    network_weights: str | None = None
    dim_from_weights: bool = False
    clip_skip: int | None = None


# --network_module names served by one of ours. LyCORIS's own ``lycoris.kohya`` finds its target modules by
# the class names and paths of kohya's UNet classes; ours is diffusers' UNet2DConditionModel, on which it
# picks other modules and stops with "duplicated lora name" (SDXL). networks.lycoris_kohya runs LyCORIS's
# create_network on a kohya-named view of our UNet, so `lycoris.kohya`, as kohya users type it, works here.
ROUTED_NETWORK_MODULES = {"lycoris.kohya": "networks.lycoris_kohya"}


def import_network_module(name: str) -> NetworkModule:
    """The ``--network_module`` by its import path (``networks.lora``, kohya's modules; ``lycoris.kohya`` is
    served by ``networks.lycoris_kohya``, see `ROUTED_NETWORK_MODULES`)."""
    return importlib.import_module(ROUTED_NETWORK_MODULES.get(name, name))


def build_network(module: NetworkModule, *, options: NetworkOptions, vae: Any, text_encoders: Sequence[nn.Module],
                  unet: nn.Module) -> nn.Module:
    """A fresh network at multiplier 1, or one shaped like ``network_weights`` with ``dim_from_weights``."""
    kwargs = dict(options.network_args)
    if options.network_weights and options.dim_from_weights:
        create = module.create_network_from_weights
        network, _ = create(1.0, options.network_weights, vae, text_encoders, unet,
                            **_clip_skip_kwarg(create, options.clip_skip), **kwargs)
        return network
    return module.create_network(1.0, options.network_dim or 4, options.network_alpha, vae, text_encoders, unet,
                                 neuron_dropout=options.network_dropout,
                                 **_clip_skip_kwarg(module.create_network, options.clip_skip), **kwargs)


def _clip_skip_kwarg(create: Any, clip_skip: int | None) -> dict[str, Any]:
    """``clip_skip`` for network modules that take it (ours: no modules on text-encoder layers the loss never
    sees, which DDP would stop on); kohya's plug-in signature has no such argument, so others get nothing."""
    return {"clip_skip": clip_skip} if "clip_skip" in inspect.signature(create).parameters else {}


def as_module_list(text_encoder: Any) -> list[nn.Module]:
    """kohya passes one text encoder, or a list of SDXL's two."""
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def _check_kwargs(network_class: type[AdapterNetwork], kwargs: dict[str, Any]) -> None:
    accepted = network_class.accepted_kwargs + network_class.module_class.network_args
    check_kwargs(kwargs, accepted=accepted, module_name=network_class.__module__)


def create_adapter_network(network_class: type[AdapterNetwork], *, multiplier: float, network_dim: int | None,
                           network_alpha: float | None, text_encoder: nn.Module | Sequence[nn.Module] | None,
                           unet: nn.Module, neuron_dropout: float | None, clip_skip: int | None,
                           kwargs: dict[str, Any]) -> AdapterNetwork:
    """kohya's ``create_network`` for ``network_class``: a fresh network from dims and ``--network_args``."""
    _check_kwargs(network_class, kwargs)
    network_dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    if network_dim < 1:
        raise NetworkArgumentError(f"network_dim (the LoRA rank) must be at least 1, got {network_dim}")
    network_alpha = DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    conv_dim = opt_int(kwargs.get("conv_dim"))
    conv_alpha = opt_float(kwargs.get("conv_alpha"))
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = DEFAULT_CONV_ALPHA
    family = family_of_unet(unet)  # SD1's rules without a UNet
    blocks = block_settings(kwargs, family=family, network_dim=network_dim, network_alpha=network_alpha,
                            conv_dim=conv_dim, conv_alpha=conv_alpha)
    text_encoders = as_module_list(text_encoder)
    return network_class(
        text_encoders, unet, multiplier, network_dim, network_alpha, dropout=opt_float(neuron_dropout),
        rank_dropout=opt_float(kwargs.get("rank_dropout")), module_dropout=opt_float(kwargs.get("module_dropout")),
        conv_lora_dim=conv_dim, conv_alpha=conv_alpha, blocks=blocks, verbose=flag(kwargs.get("verbose")),
        text_encoder_layers=text_encoder_layers_in_use(text_encoders, family, clip_skip), **loraplus_kwargs(kwargs),
        module_options=network_class.module_class.options_from_network_args(kwargs),
    )


def adapter_network_from_weights(network_class: type[AdapterNetwork], *, multiplier: float,
                                 file: str | os.PathLike | None, text_encoder: nn.Module | Sequence[nn.Module] | None,
                                 unet: nn.Module, weights_sd: dict[str, torch.Tensor] | None, for_inference: bool,
                                 clip_skip: int | None, kwargs: dict[str, Any],
                                 ) -> tuple[AdapterNetwork, dict[str, torch.Tensor]]:
    """kohya's ``create_network_from_weights`` for ``network_class``: a network shaped like a weights file
    (its modules, dims and alphas, read by the module class), with the weights loaded; ``weights_sd`` comes
    back renamed to our names. For training (not ``for_inference``) modules on text-encoder layers that
    cannot reach the loss under ``clip_skip`` are left out; for inference every module is kept."""
    neuron_dropout = kwargs.pop("neuron_dropout", None)
    _check_kwargs(network_class, kwargs)
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_lora_state_dict(file)
    text_encoders = as_module_list(text_encoder)
    aliases = name_aliases(unet, text_encoders)
    weights_sd = {rename_key(key, aliases): value for key, value in weights_sd.items()}
    modules_dim, modules_alpha = network_class.module_class.dims_from_weights(weights_sd, str(file or "weights"))
    family = family_of_unet(unet)  # SD1's rules without a UNet
    lr_weights = block_lr_weights(kwargs, family)
    layers = None if for_inference else text_encoder_layers_in_use(text_encoders, family, clip_skip)
    network = network_class(
        text_encoders, unet, multiplier, dropout=opt_float(neuron_dropout),
        rank_dropout=opt_float(kwargs.get("rank_dropout")), module_dropout=opt_float(kwargs.get("module_dropout")),
        blocks=BlockSettings(lr_weights=lr_weights), modules_dim=modules_dim, modules_alpha=modules_alpha,
        verbose=flag(kwargs.get("verbose")), text_encoder_layers=layers, **loraplus_kwargs(kwargs),
        module_options=network_class.module_class.options_from_network_args(kwargs),
    )
    network.load_state_dict_checked(weights_sd, source=str(file or "weights"))
    if for_inference:
        network.eval().requires_grad_(False)
    return network, weights_sd
