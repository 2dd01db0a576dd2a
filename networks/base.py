"""The adapter protocol: what a trainable network module is, how it attaches to its target, saves and loads.

An `AdapterModule` wraps one target ``nn.Linear``/``nn.Conv2d`` of the base model. It is attached with a forward
hook (the base model's modules, parameters and state-dict keys stay untouched; ``restore()`` removes it) and adds
``forward(x)`` to the target's output. Its state dict is its part of the file, under its kohya name. A new kind
of adapter (LoHa, LoKr, DoRA, ...) is one subclass that implements the abstract methods below.

An `AdapterNetwork` holds the modules of one model: it builds them from `library.adapters.targets` with its
``module_class``, registers them under their kohya names (so ``state_dict()`` is the file), and implements
kohya's network API (apply_to, load_weights, save_weights, prepare_optimizer_params, max-norm, merge_to) for
any module class. kohya's entry points for a network class are in `networks.plugin`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from library.adapters.blocks import BlockSettings
from library.adapters.errors import LoRAWeightsError
from library.adapters.lora_files import file_delta_weight, load_lora_state_dict, lora_delta_weight, save_lora_file
from library.adapters.network_args import (
    DEFAULT_NETWORK_ALPHA,
    DEFAULT_NETWORK_DIM,
    NETWORK_KWARGS,
    check_probability,
    text_encoder_lrs,
)
from library.adapters.targets import (
    AdapterTarget,
    name_aliases,
    rename_key,
    text_encoder_prefixes,
    text_encoder_targets,
    unet_targets,
)


class AdapterModule(nn.Module):
    """One trainable update attached to one target module (the protocol every adapter kind implements).

    The constructor takes kohya's module arguments: ``(lora_name, org_module, multiplier, lora_dim, alpha,
    dropout, rank_dropout, module_dropout, *, block_index)``. Every module has ``lora_name``, ``lora_dim``,
    ``multiplier``, ``block_index`` (UNet block for block-wise LR, -1 for text encoders) and an ``alpha`` buffer.
    """

    lora_dim: int
    network_args: ClassVar[tuple[str, ...]] = ()  # --network_args this kind reads beyond the shared ones

    @classmethod
    def options_from_network_args(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments for every module's constructor, from the `network_args` values (strings)."""
        return {}

    def __init__(self, lora_name: str, org_module: nn.Module, *, multiplier: float, dropout: float | None,
                 rank_dropout: float | None, module_dropout: float | None, block_index: int) -> None:
        """The settings every kind shares; the target is referenced, not registered, so that this module's
        state dict holds only its own tensors (kohya's file layout)."""
        super().__init__()
        self.lora_name = lora_name
        self.block_index = block_index
        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = (org_module,)  # a tuple keeps nn.Module from registering it as a child
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    # -- applying -------------------------------------------------------------------------------------

    def apply_to(self) -> None:
        if self._hook is None:
            self._hook = self.org_module.register_forward_hook(self._add_to_output, with_kwargs=True)

    def restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def applied(self) -> bool:
        return self._hook is not None

    def _add_to_output(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                       output: torch.Tensor) -> torch.Tensor:
        delta = self(args[0] if args else kwargs["input"])
        if delta is None:
            return output
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    # -- what an adapter kind implements --------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The contribution added to the target's output for input ``x``, or None when it adds nothing."""
        raise NotImplementedError

    def weight_delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense update of the current weights in the target weight's shape, float32, without the multiplier."""
        raise NotImplementedError

    def merged_weight_delta(self, weights_sd: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor | None:
        """Like `weight_delta`, but of this module's tensors in ``weights_sd`` (None where the file has none)."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor, weights_sd: dict[str, torch.Tensor],
                      device: torch.device | str) -> torch.Tensor | None:
        """The target's weight with this module's tensors in ``weights_sd`` merged in at its multiplier, float32
        (None where the file has none). Additive kinds keep this default; DoRA rescales the sum."""
        delta = self.merged_weight_delta(weights_sd, device)
        return None if delta is None else weight.to(device, torch.float32) + delta * self.multiplier

    def scale_weights(self, ratio: float) -> None:
        """Scale the trainable tensors so that the update is multiplied by ``ratio`` (max-norm regularisation)."""
        raise NotImplementedError

    def plus_parameters(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at lr * ratio; none by default."""
        return []

    @classmethod
    def dims_from_weights(cls, weights_sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, int], dict[str, float]]:
        """(dim, alpha) per module name of a weights file, to build a network shaped like it."""
        raise NotImplementedError


def low_rank_layers(org_module: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    """``(down, up)`` in float32 for a Linear/Conv2d target, as kohya makes them: ``down`` has the target's kernel,
    stride and padding (LoCon), ``up`` is 1x1; ``down`` kaiming-uniform, ``up`` zero, so the update starts at 0."""
    factory = {"device": org_module.weight.device, "dtype": torch.float32}
    if isinstance(org_module, nn.Conv2d):
        down: nn.Module = nn.Conv2d(org_module.in_channels, rank, org_module.kernel_size, org_module.stride,
                                    org_module.padding, bias=False, **factory)
        up: nn.Module = nn.Conv2d(rank, org_module.out_channels, 1, 1, bias=False, **factory)
    else:
        down = nn.Linear(org_module.in_features, rank, bias=False, **factory)
        up = nn.Linear(rank, org_module.out_features, bias=False, **factory)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    return down, up


class LowRankModule(AdapterModule):
    """An adapter built on kohya's ``lora_down``/``lora_up`` pair and ``alpha`` buffer (LoRA, DoRA): their shared
    construction and weight arithmetic; a kind adds its forward and whatever else it stores."""

    kind: ClassVar[str] = "LoRA"

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, block_index: int = -1) -> None:
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: {self.kind} wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        super().__init__(lora_name, org_module, multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                         module_dropout=module_dropout, block_index=block_index)
        self.lora_dim = int(lora_dim)
        self.lora_down, self.lora_up = low_rank_layers(org_module, self.lora_dim)
        alpha = self.lora_dim if alpha is None or float(alpha) == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=org_module.weight.device))

    @property
    def is_conv(self) -> bool:
        return isinstance(self.lora_down, nn.Conv2d)

    @property
    def scale(self) -> float:
        """alpha / rank, read from the buffer so that loading a file with another alpha takes effect."""
        return float(self.alpha) / self.lora_dim

    def weight_delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``up @ down * alpha / rank`` (DoRA: the low-rank part, which max-norm limits, as LyCORIS does)."""
        down = self.lora_down.weight.to(device, torch.float32)
        up = self.lora_up.weight.to(device, torch.float32)
        return lora_delta_weight(down, up, self.scale)

    def merged_weight_delta(self, weights_sd: dict[str, torch.Tensor], device: torch.device | str) -> torch.Tensor | None:
        return file_delta_weight(weights_sd, self.lora_name, device)

    def scale_weights(self, ratio: float) -> None:
        self.lora_up.weight.mul_(math.sqrt(ratio))
        self.lora_down.weight.mul_(math.sqrt(ratio))

    def plus_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up.weight]


class AdapterNetwork(nn.Module):
    """All adapter modules for one model, registered under their kohya names (so ``state_dict()`` is the file)."""

    module_class: ClassVar[type[AdapterModule]]
    accepted_kwargs: ClassVar[tuple[str, ...]] = NETWORK_KWARGS  # the --network_args this network reads

    def __init__(self, text_encoders: Sequence[nn.Module], unet: nn.Module | None, multiplier: float = 1.0,
                 lora_dim: int = DEFAULT_NETWORK_DIM, alpha: float = DEFAULT_NETWORK_ALPHA,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None,
                 conv_alpha: float | None = None, blocks: BlockSettings | None = None,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None,
                 loraplus_lr_ratio: float | None = None, loraplus_unet_lr_ratio: float | None = None,
                 loraplus_text_encoder_lr_ratio: float | None = None, verbose: bool = False,
                 text_encoder_layers: Sequence[int | None] | None = None,
                 module_options: dict[str, Any] | None = None) -> None:
        """``text_encoder_layers``: per text encoder, how many leading layers get modules (None: all), from
        `text_encoder_layers_in_use`; the modules left out are remembered so their keys in a file are skipped.
        ``module_options``: extra constructor arguments of every module (`AdapterModule.options_from_network_args`)."""
        super().__init__()
        check_probability("network_dropout", dropout, allow_one=False)
        check_probability("rank_dropout", rank_dropout, allow_one=False)  # it rescales by 1/(1-p)
        check_probability("module_dropout", module_dropout, allow_one=True)
        self.multiplier = float(multiplier)
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.blocks = blocks or BlockSettings()
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        self.module_options = dict(module_options or {})
        self.text_encoder_prefixes = text_encoder_prefixes(len(text_encoders))
        self._aliases = name_aliases(unet, text_encoders)

        self.text_encoder_loras: list[AdapterModule] = []
        limits = list(text_encoder_layers) if text_encoder_layers is not None else [None] * len(text_encoders)
        left_out: set[str] = set()
        for prefix, te, limit in zip(self.text_encoder_prefixes, text_encoders, limits):
            used = text_encoder_targets(te, prefix, limit)
            left_out |= {t.lora_name for t in text_encoder_targets(te, prefix)} - {t.lora_name for t in used}
            self.text_encoder_loras += self._create_modules(used, modules_dim, modules_alpha)
        self.left_out = frozenset(left_out)  # text-encoder modules that could not change the output
        self.unet_loras: list[AdapterModule] = []
        if unet is not None:
            with_conv = modules_dim is not None or conv_lora_dim is not None or self.blocks.conv_dims is not None
            self.unet_loras = self._create_modules(unet_targets(unet, with_conv), modules_dim, modules_alpha)
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
            if verbose:
                self._log().info("LoRA %s: rank %d, alpha %g", lora.lora_name, lora.lora_dim, float(lora.alpha))
        self._log().info("LoRA: %d text-encoder modules, %d UNet modules", len(self.text_encoder_loras),
                         len(self.unet_loras))

    def _log(self) -> logging.Logger:
        """The implementation's logger (``networks.lora`` for LoRA), so log lines name the network kind."""
        return logging.getLogger(type(self).__module__)

    def _create_modules(self, targets: Iterable[AdapterTarget], modules_dim: dict[str, int] | None,
                        modules_alpha: dict[str, float] | None) -> list[AdapterModule]:
        """One ``module_class`` per target that gets a dim, in target order (which fixes the init RNG draws)."""
        modules = []
        for target in targets:
            dim, alpha = self._dim_and_alpha(target, modules_dim, modules_alpha)
            if not dim:
                continue
            modules.append(self.module_class(target.lora_name, target.module, self.multiplier, dim, alpha, self.dropout,
                                             self.rank_dropout, self.module_dropout, block_index=target.block_index,
                                             **self.module_options))
        return modules

    def _dim_and_alpha(self, target: AdapterTarget, modules_dim: dict[str, int] | None,
                       modules_alpha: dict[str, float] | None) -> tuple[int | None, float | None]:
        if modules_dim is not None:  # from a weights file: exactly the modules it has
            dim = modules_dim.get(target.lora_name)
            return dim, (modules_alpha or {}).get(target.lora_name, dim)
        blocks = self.blocks
        if target.is_kxk_conv:
            if not target.is_unet:
                return None, None
            if blocks.conv_dims is not None:
                return blocks.conv_dims[target.block_index], blocks.conv_alphas[target.block_index]
            return self.conv_lora_dim, self.conv_alpha
        if target.is_unet and blocks.dims is not None:
            return blocks.dims[target.block_index], blocks.alphas[target.block_index]
        return self.lora_dim, self.alpha

    # -- kohya's network API ---------------------------------------------------------------------------

    def apply_to(self, text_encoder: Any = None, unet: Any = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Hook the modules into the targets they were created for; a part not applied is dropped entirely
        (not trained, not saved), as in kohya. The model arguments are accepted for API compatibility."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def _drop(self, loras: list[AdapterModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self) -> None:
        """Remove every hook: the base model computes exactly what it did before ``apply_to``."""
        for lora in self.loras:
            lora.restore()

    @property
    def loras(self) -> list[AdapterModule]:
        return self.text_encoder_loras + self.unet_loras

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.loras:
            lora.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapter runs inside the hooked module's call, so checkpointing the base model's
        blocks recomputes it with them (the RNG state is replayed, so dropout masks match)."""

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Param groups (text encoder(s), UNet or UNet per block, LoRA+ groups) and a description of each.
        ``text_encoder_lr`` may list one LR per encoder; missing LRs fall back to ``default_lr``; a group whose
        LR ends up 0 or None is left out (it would not learn)."""
        te_lrs = text_encoder_lrs(text_encoder_lr, default_lr, len(self.text_encoder_prefixes))
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        def add(loras: list[AdapterModule], lr: float | None, ratio: float | None, label: str) -> None:
            for params, lr_value, suffix in _param_groups(loras, lr, ratio):
                if not lr_value:
                    self._log().info("LoRA: no learning rate for %s%s, its parameters are not trained", label, suffix)
                    continue
                groups.append({"params": params, "lr": lr_value})
                descriptions.append(label + suffix)

        for index, prefix in enumerate(self.text_encoder_prefixes):
            loras = [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix + "_")]
            label = "textencoder" if len(self.text_encoder_prefixes) == 1 else f"textencoder {index + 1}"
            add(loras, te_lrs[index], te_ratio, label)
        base_unet_lr = unet_lr if unet_lr is not None else default_lr
        if self.blocks.lr_weights is None:
            add(self.unet_loras, base_unet_lr, unet_ratio, "unet")
        else:
            by_block: dict[int, list[AdapterModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault(lora.block_index, []).append(lora)
            for index in sorted(by_block):
                lr = None if base_unet_lr is None else base_unet_lr * self.blocks.lr_weights[index]
                add(by_block[index], lr, unet_ratio, f"unet_block{index}")
        return groups, descriptions

    # -- max-norm regularisation (--scale_weight_norms) ------------------------------------------------

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str) -> tuple[int, float, float]:
        """Scale each module so that the norm of its update is at most ``max_norm_value``.

        Returns (number of modules scaled, mean norm after scaling, max norm after scaling), kohya's values.
        """
        keys_scaled, norms = 0, []
        for lora in self.loras:
            norm = float(lora.weight_delta(device).norm())
            # kohya: norms below max/2 are treated as max/2 (ratio 1), which also avoids dividing by zero
            clamped = max(norm, max_norm_value / 2)
            ratio = min(clamped, max_norm_value) / clamped
            if ratio != 1:
                keys_scaled += 1
                lora.scale_weights(ratio)
            norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # -- files ----------------------------------------------------------------------------------------

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, Any] | None = None) -> None:
        """kohya's network file: ``.safetensors`` (with metadata and the sshs_* hashes A1111 extensions read,
        written atomically) or ``.pt``/``.ckpt`` (torch.save, no metadata)."""
        state_dict = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_lora_file(state_dict, file, metadata)

    def normalise_keys(self, weights_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename other tools' spellings of our module names (diffusers-named SDXL UNet keys, ...) to ours."""
        return {rename_key(key, self._aliases): value for key, value in weights_sd.items()}

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load a network file into this network. Keys for modules this network lacks are an error (a file for
        another model or another ``conv_dim``); returns torch's load info (the missing keys)."""
        weights_sd = self.normalise_keys(load_lora_state_dict(file))
        return self.load_state_dict_checked(weights_sd, source=str(file))

    def load_state_dict_checked(self, weights_sd: dict[str, torch.Tensor], source: str = "weights") -> Any:
        """Load ``weights_sd``; keys of modules this network left out on purpose (text-encoder layers that
        cannot change the output, as kohya's files have) are skipped, any other unknown key is an error."""
        own = self.state_dict()
        skipped = {k for k in weights_sd if k not in own and k.partition(".")[0] in self.left_out}
        if skipped:
            self._log().info("LoRA: %s: skipped %d tensors of text-encoder layers that do not reach the output",
                             source, len(skipped))
            weights_sd = {k: v for k, v in weights_sd.items() if k not in skipped}
        unknown = sorted(k for k in weights_sd if k not in own)
        if unknown:
            raise LoRAWeightsError(
                f"{source} does not fit this model: {len(unknown)} key(s) match no LoRA module, e.g. "
                f"{', '.join(unknown[:2])}; it was trained for another model family or with another conv_dim "
                "(LoCon) / block dims: use a LoRA made for this model, or --dim_from_weights to take its layout")
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights_sd.items() if v.shape != own[k].shape]
        if wrong:
            raise LoRAWeightsError(
                f"{source} has another rank/shape than this network ({'; '.join(wrong[:2])}): pass the "
                "--network_dim/--network_alpha it was trained with, or --dim_from_weights")
        return self.load_state_dict(weights_sd, strict=False)

    # -- merging into the base weights -----------------------------------------------------------------

    @torch.no_grad()
    def merge_to(self, text_encoder: Any = None, unet: Any = None, weights_sd: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Merge each module into its original weight at its multiplier (`AdapterModule.merged_weight`; kohya's
        --base_weights).

        The update is computed in float32 on ``device`` and written back in each weight's own dtype
        (``dtype`` is accepted for kohya compatibility). Only modules present in ``weights_sd`` (default:
        this network's own weights) are merged. A network whose hooks are applied cannot be merged too.
        """
        if any(lora.applied for lora in self.loras):
            raise RuntimeError("merge_to on an applied network would add the LoRA twice; call restore() first")
        weights_sd = self.normalise_keys(weights_sd) if weights_sd is not None else self.state_dict()
        merged = 0
        for lora in self.loras:
            weight = lora.org_module.weight
            target = device if device is not None else weight.device
            new = lora.merged_weight(weight, weights_sd, target)
            if new is None:
                continue
            weight.copy_(new.to(weight.device, weight.dtype))
            merged += 1
        self._log().info("LoRA: merged %d modules into the base weights", merged)


def _param_groups(modules: list[AdapterModule], lr: float | None,
                  plus_ratio: float | None) -> list[tuple[list[nn.Parameter], float | None, str]]:
    """(params, lr, description suffix): one group, or two with LoRA+ (`plus_parameters` at lr * ratio)."""
    if not modules:
        return []
    if not plus_ratio:
        return [([p for module in modules for p in module.parameters()], lr, "")]
    plus = {id(p) for module in modules for p in module.plus_parameters()}
    base = [p for module in modules for p in module.parameters() if id(p) not in plus]
    ups = [p for module in modules for p in module.plus_parameters()]
    return [(base, lr, ""), (ups, None if lr is None else lr * plus_ratio, " plus")]

