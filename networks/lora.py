"""LoRA / LoCon for SD1.x, SD2.x and SDXL, saved in kohya's format (what A1111, ComfyUI and diffusers read).

This module is a kohya ``--network_module``: it provides ``create_network``, ``create_network_from_weights``
and a network object with kohya's method names, so ``train_network.py`` (ours or kohya's) can drive it.

What gets a LoRA (kohya's choice, matched here by module class and structure, not by class-level lists):
  * UNet: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside a ``Transformer2DModel`` (attn1/attn2 q/k/v/out,
    ff.net.0.proj, ff.net.2, proj_in/proj_out).
  * With ``conv_dim`` (LoCon): the 3x3 convs of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` get
    ``conv_dim``/``conv_alpha``; the Linear/1x1 layers in them (time_emb_proj, conv_shortcut) get the
    normal ``network_dim``. conv_in/conv_out and the time/added embeddings never get one.
  * Text encoders: ``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1/fc2`` of every CLIP encoder layer whose
    output reaches the conditioning (`text_encoder_layers_in_use`). Unlike kohya, no module is made on a layer
    that cannot change the loss: SDXL's text encoder 1 is read at its penultimate layer, so its last layer
    gets none, and with ``clip_skip`` k the last k-1 layers of an SD1/SD2 encoder get none. Such a module
    would never learn, and under DDP its parameters, which receive no gradient, stop training at step 2.
    The file has fewer ``lora_te`` keys than kohya's; A1111, ComfyUI and diffusers load it all the same.

Saved key names (``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``):
  * ``lora_unet_`` + module path with ``.`` -> ``_``. SD1/SD2 use diffusers paths
    (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); SDXL uses the original
    SAI/LDM paths because kohya trains SDXL on that UNet (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
    LoCon ``lora_unet_input_blocks_1_0_in_layers_2``).
  * ``lora_te_`` (one text encoder) or ``lora_te1_``/``lora_te2_`` (SDXL) + the ``text_model.``-rooted
    path, whether or not the transformers class still has a ``text_model`` level.

The LoRA is applied with a forward hook on the original module: the base model's modules, parameters and
state-dict keys are untouched, and ``restore()`` removes the hooks again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"  # one text encoder (SD1/SD2)
TE_PREFIXES_SDXL = ("lora_te1", "lora_te2")

DEFAULT_NETWORK_DIM = 4  # kohya's defaults when --network_dim / --network_alpha are not given
DEFAULT_NETWORK_ALPHA = 1.0
DEFAULT_CONV_ALPHA = 1.0

# Module classes (diffusers) whose children get a LoRA. Checked by class name so that subclasses and
# look-alike classes from other code bases (kohya's own SAI UNet uses the same names) are treated alike.
TRANSFORMER_CLASSES = ("Transformer2DModel",)
CONV_BLOCK_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_TARGET = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])")

# Block indices for block-wise dims/LR (kohya's get_block_index): SD1/SD2 have 25 entries
# (0..11 down = LDM input_blocks 0..11, 12 mid, 13..24 up = output_blocks 0..11); SDXL has 23
# (0 time/label embedding, 1..9 input_blocks 0..8, 10..12 middle_block 0..2, 13..21 output_blocks 0..8, 22 out).
NUM_BLOCKS = {"sd": 25, "sdxl": 23}
# (first down index, mid indices, first up index) per layout; down/up lists cover [first, mid) and [up, end).
_BLOCK_LAYOUT = {"sd": (0, (12,), 13), "sdxl": (0, (10, 11, 12), 13)}

NETWORK_KWARGS = (
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "verbose",
)


class LoRAWeightsError(ValueError):
    """A weights file that does not fit the model; the message says which keys and why."""


class NetworkArgumentError(ValueError):
    """A network setting (``--network_dim``, ``--network_args`` value) that cannot work; the message names it."""


# --------------------------------------------------------------------------------------------------
# the module


class LoRAModule(nn.Module):
    """One low-rank update ``up(down(x)) * multiplier * alpha / rank`` added to an existing Linear/Conv2d.

    The original module is referenced, not registered, so this module's state dict holds only
    ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` (kohya's file layout).
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, block_index: int = -1) -> None:
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.block_index = block_index  # UNet block for block-wise LR (-1: text encoder)
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
        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = (org_module,)  # a tuple keeps nn.Module from registering it as a child
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.lora_down, nn.Conv2d)

    @property
    def scale(self) -> float:
        """alpha / rank, read from the buffer so that loading a file with another alpha takes effect."""
        return float(self.alpha) / self.lora_dim

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
        return output if delta is None else output + delta.to(output.dtype)

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

    # -- weight arithmetic ----------------------------------------------------------------------------

    @staticmethod
    def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
        """The dense update ``up @ down * scale`` in the original weight's shape (Linear, 1x1 or kxk conv)."""
        if down.dim() == 2:
            return up @ down * scale
        if down.shape[2:] == (1, 1):
            return (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None] * scale
        # kxk down followed by 1x1 up: compose the two convolutions into one kxk kernel.
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


# --------------------------------------------------------------------------------------------------
# which modules, and their names


@dataclass(frozen=True)
class LoRATarget:
    """One module that can carry a LoRA, with its kohya name and the block it belongs to."""

    lora_name: str
    module: nn.Module
    is_unet: bool
    block_index: int  # -1 for text encoders

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL conditions on pooled text + sizes through ``add_embedding`` ("text_time"); SD1/SD2 do not."""
    config = getattr(unet, "config", None)
    return config is not None and config.get("addition_embed_type") == "text_time"


def _ldm_paths(unet: nn.Module) -> Any:
    from library.models.ldm_layout import unet_table

    return unet_table(dict(unet.config))


def unet_targets(unet: nn.Module, include_conv_blocks: bool) -> list[LoRATarget]:
    """Every Linear/Conv2d in the UNet's transformer blocks (and, for LoCon, in resnet/down/up blocks)."""
    sdxl = is_sdxl_unet(unet)
    table = _ldm_paths(unet)
    classes = TRANSFORMER_CLASSES + (CONV_BLOCK_CLASSES if include_conv_blocks else ())
    targets = []
    for name, parent in unet.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_name, child in parent.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            path = f"{name}.{child_name}"
            ldm = _ldm_module_path(table, path)
            lora_name = _underscored(UNET_PREFIX, ldm if sdxl else path)
            targets.append(LoRATarget(lora_name, child, True, _block_index(ldm, sdxl)))
    return targets


def _ldm_module_path(table: Any, path: str) -> str:
    ldm = table.diffusers_key_to_ldm(path + ".weight")
    if ldm is None:
        raise KeyError(f"UNet module {path} has no LDM equivalent; cannot name its LoRA")
    return ldm[: -len(".weight")]


def _block_index(ldm_path: str, sdxl: bool) -> int:
    """kohya's get_block_index, read off the LDM path (see NUM_BLOCKS); -1 outside the three block lists."""
    parts = ldm_path.split(".")
    offset = 1 if sdxl else 0
    if parts[0] == "input_blocks":
        return offset + int(parts[1])
    if parts[0] == "middle_block":
        return (10 + int(parts[1])) if sdxl else 12
    if parts[0] == "output_blocks":
        return 13 + int(parts[1])
    return -1


def text_encoder_targets(text_encoder: nn.Module, prefix: str, layers: int | None = None) -> list[LoRATarget]:
    """q/k/v/out projections and fc1/fc2 of the CLIP encoder layers, named from ``text_model.``.

    ``layers``: only the first ``layers`` encoder layers (those whose output is used); None: all of them.
    """
    targets = []
    for name, module in text_encoder.named_modules():
        match = _TE_TARGET.fullmatch(name)
        if isinstance(module, nn.Linear) and match and (layers is None or int(match.group(1)) < layers):
            canonical = name if name.startswith("text_model.") else "text_model." + name
            targets.append(LoRATarget(_underscored(prefix, canonical), module, False, -1))
    return targets


def text_encoder_layers_in_use(text_encoders: Sequence[nn.Module], sdxl: bool, clip_skip: int | None = None) -> list[int]:
    """How many leading encoder layers of each text encoder can change the conditioning (see
    `library.text_encoding`): SD1/SD2 read the output of layer ``n - clip_skip``; SDXL reads encoder 1's and
    encoder 2's penultimate layers, and encoder 2's last layer too, through the pooled vector."""
    counts = [_layer_count(te) for te in text_encoders]
    if sdxl:
        return [counts[0] - 1, *counts[1:]]
    skip = max(int(clip_skip or 1), 1)
    return [max(count - (skip - 1), 0) for count in counts]


def _layer_count(text_encoder: nn.Module) -> int:
    config = getattr(text_encoder, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) is not None:
        return int(config.num_hidden_layers)
    indices = {int(m.group(1)) for name, _ in text_encoder.named_modules() if (m := _TE_TARGET.fullmatch(name))}
    return max(indices, default=-1) + 1


def text_encoder_prefixes(count: int) -> tuple[str, ...]:
    return (TE_PREFIX,) if count == 1 else tuple(f"{TE_PREFIX}{i + 1}" for i in range(count))


def _underscored(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _name_aliases(unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> dict[str, str]:
    """Other spellings of our module names that other tools write -> our name.

    SDXL files from diffusers-based trainers name UNet modules by diffusers paths (kohya converts them,
    ``convert_diffusers_to_sai_if_needed``); for SD1/SD2 we accept the LDM spelling the same way; text-encoder
    names without the ``text_model_`` level are accepted too.
    """
    aliases: dict[str, str] = {}
    if unet is not None:
        sdxl = is_sdxl_unet(unet)
        table = _ldm_paths(unet)
        for name, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                ldm = table.diffusers_key_to_ldm(name + ".weight")
                if ldm is None:
                    continue
                ours, other = (ldm[: -len(".weight")], name) if sdxl else (name, ldm[: -len(".weight")])
                aliases[_underscored(UNET_PREFIX, other)] = _underscored(UNET_PREFIX, ours)
    for prefix, te in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        for target in text_encoder_targets(te, prefix):
            short = target.lora_name.replace(f"{prefix}_text_model_", f"{prefix}_", 1)
            aliases[short] = target.lora_name
    return aliases


# --------------------------------------------------------------------------------------------------
# kwargs from --network_args (strings) or from Python callers (numbers)


def _opt_float(value: Any) -> float | None:
    return None if value is None or value == "" or str(value).lower() == "none" else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None or value == "" or str(value).lower() == "none" else int(value)


def _number_list(value: Any, kind: type, name: str, length: int | None = None) -> list[Any] | None:
    if value is None:
        return None
    items = [kind(v) for v in (value.split(",") if isinstance(value, str) else value)]
    if length is not None and len(items) != length:
        raise NetworkArgumentError(f"{name} needs {length} comma-separated values for this model, got {len(items)}")
    return items


def _lr_weight_list(value: Any, length: int, name: str) -> list[float] | None:
    """kohya's down/up_lr_weight: a comma list or a preset (cosine|sine|linear|reverse_linear|zeros)[+base]."""
    if value is None:
        return None
    if isinstance(value, str) and "," not in value and not _is_number(value):
        preset, _, base = value.partition("+")
        offset = float(base) if base else 0.0
        ramp = [i / (length - 1) for i in range(length)]
        presets = {
            "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
            "sine": [math.sin(math.pi * r / 2) for r in ramp],
            "linear": ramp,
            "reverse_linear": list(reversed(ramp)),
            "zeros": [0.0] * length,
        }
        if preset not in presets:
            raise NetworkArgumentError(f"{name}={value!r}: expected a comma list or one of {', '.join(presets)} (optionally +base)")
        return [w + offset for w in presets[preset]]
    weights = _number_list(value, float, name)
    return (weights + [1.0] * length)[:length]  # kohya pads short lists with 1.0 and truncates long ones


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class BlockSettings:
    """Per-block dims/alphas and LR weights for the UNet (kohya's block_dims & co.); None = not block-wise."""

    dims: list[int] | None = None
    alphas: list[float] | None = None
    conv_dims: list[int] | None = None
    conv_alphas: list[float] | None = None
    lr_weights: list[float] | None = None


def _block_settings(kwargs: dict[str, Any], sdxl: bool, network_dim: int, network_alpha: float,
                    conv_dim: int | None, conv_alpha: float | None) -> BlockSettings:
    layout = "sdxl" if sdxl else "sd"
    total = NUM_BLOCKS[layout]
    lr_weights = _block_lr_weights(kwargs, layout)
    block_dims = kwargs.get("block_dims")
    if block_dims is None and lr_weights is None and kwargs.get("conv_block_dims") is None:
        return BlockSettings()
    dims = _number_list(block_dims, int, "block_dims", total) or [network_dim] * total
    alphas = _number_list(kwargs.get("block_alphas"), float, "block_alphas", total) or [network_alpha] * total
    conv_dims = _number_list(kwargs.get("conv_block_dims"), int, "conv_block_dims", total)
    conv_alphas = _number_list(kwargs.get("conv_block_alphas"), float, "conv_block_alphas", total)
    if conv_dims is None and conv_dim is not None:
        conv_dims = [conv_dim] * total
    if conv_dims is not None and conv_alphas is None:
        conv_alphas = [conv_alpha if conv_alpha is not None else DEFAULT_CONV_ALPHA] * total
    if lr_weights is not None:  # a block that does not learn gets no module at all (kohya)
        for index, weight in enumerate(lr_weights):
            if weight == 0:
                dims[index] = 0
                if conv_dims is not None:
                    conv_dims[index] = 0
    return BlockSettings(dims, alphas, conv_dims, conv_alphas, lr_weights)


def _block_lr_weights(kwargs: dict[str, Any], layout: str) -> list[float] | None:
    down, mid, up = (kwargs.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    if down is None and mid is None and up is None:
        return None
    total = NUM_BLOCKS[layout]
    first_down, mids, first_up = _BLOCK_LAYOUT[layout]
    down_len, up_len = mids[0] - first_down, total - first_up
    weights = [1.0] * total
    for start, values in ((first_down, _lr_weight_list(down, down_len, "down_lr_weight")),
                          (first_up, _lr_weight_list(up, up_len, "up_lr_weight"))):
        for offset, value in enumerate(values or []):
            weights[start + offset] = value
    if mid is not None:
        for index in mids:
            weights[index] = float(mid)
    threshold = _opt_float(kwargs.get("block_lr_zero_threshold")) or 0.0
    return [0.0 if w < threshold else w for w in weights]


# --------------------------------------------------------------------------------------------------
# the network


class LoRANetwork(nn.Module):
    """All LoRA modules for one model, registered under their kohya names (so ``state_dict()`` is the file)."""

    def __init__(self, text_encoders: Sequence[nn.Module], unet: nn.Module | None, multiplier: float = 1.0,
                 lora_dim: int = DEFAULT_NETWORK_DIM, alpha: float = DEFAULT_NETWORK_ALPHA,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, conv_lora_dim: int | None = None,
                 conv_alpha: float | None = None, blocks: BlockSettings | None = None,
                 modules_dim: dict[str, int] | None = None, modules_alpha: dict[str, float] | None = None,
                 loraplus_lr_ratio: float | None = None, loraplus_unet_lr_ratio: float | None = None,
                 loraplus_text_encoder_lr_ratio: float | None = None, verbose: bool = False,
                 text_encoder_layers: Sequence[int | None] | None = None) -> None:
        """``text_encoder_layers``: per text encoder, how many leading layers get modules (None: all), from
        `text_encoder_layers_in_use`; the modules left out are remembered so their keys in a file are skipped."""
        super().__init__()
        _check_probability("network_dropout", dropout, allow_one=False)
        _check_probability("rank_dropout", rank_dropout, allow_one=False)  # it rescales by 1/(1-p)
        _check_probability("module_dropout", module_dropout, allow_one=True)
        self.multiplier = float(multiplier)
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.blocks = blocks or BlockSettings()
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        self.is_sdxl = unet is not None and is_sdxl_unet(unet)
        self.text_encoder_prefixes = text_encoder_prefixes(len(text_encoders))
        self._aliases = _name_aliases(unet, text_encoders)

        self.text_encoder_loras: list[LoRAModule] = []
        limits = list(text_encoder_layers) if text_encoder_layers is not None else [None] * len(text_encoders)
        left_out: set[str] = set()
        for prefix, te, limit in zip(self.text_encoder_prefixes, text_encoders, limits):
            used = text_encoder_targets(te, prefix, limit)
            left_out |= {t.lora_name for t in text_encoder_targets(te, prefix)} - {t.lora_name for t in used}
            self.text_encoder_loras += self._create_modules(used, modules_dim, modules_alpha)
        self.left_out = frozenset(left_out)  # text-encoder modules that could not change the output
        self.unet_loras: list[LoRAModule] = []
        if unet is not None:
            with_conv = modules_dim is not None or conv_lora_dim is not None or self.blocks.conv_dims is not None
            self.unet_loras = self._create_modules(unet_targets(unet, with_conv), modules_dim, modules_alpha)
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
            if verbose:
                logger.info("LoRA %s: rank %d, alpha %g", lora.lora_name, lora.lora_dim, float(lora.alpha))
        logger.info("LoRA: %d text-encoder modules, %d UNet modules", len(self.text_encoder_loras), len(self.unet_loras))

    def _create_modules(self, targets: Iterable[LoRATarget], modules_dim: dict[str, int] | None,
                        modules_alpha: dict[str, float] | None) -> list[LoRAModule]:
        loras = []
        for target in targets:
            dim, alpha = self._dim_and_alpha(target, modules_dim, modules_alpha)
            if not dim:
                continue
            lora = LoRAModule(target.lora_name, target.module, self.multiplier, dim, alpha,
                              self.dropout, self.rank_dropout, self.module_dropout, target.block_index)
            loras.append(lora)
        return loras

    def _dim_and_alpha(self, target: LoRATarget, modules_dim: dict[str, int] | None,
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
        """Hook the LoRAs into the modules they were created for; a part not applied is dropped entirely
        (not trained, not saved), as in kohya. The model arguments are accepted for API compatibility."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self) -> None:
        """Remove every hook: the base model computes exactly what it did before ``apply_to``."""
        for lora in self.loras:
            lora.restore()

    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for lora in self.loras:
            lora.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA runs inside the hooked module's call, so checkpointing the base model's
        blocks recomputes it with them (the RNG state is replayed, so dropout masks match)."""

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def get_trainable_params(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Param groups (text encoder(s), UNet or UNet per block, LoRA+ ``lora_up`` groups) and a description
        of each. ``text_encoder_lr`` may list one LR per encoder; missing LRs fall back to ``default_lr``;
        a group whose LR ends up 0 or None is left out (it would not learn)."""
        te_lrs = self._text_encoder_lrs(text_encoder_lr, default_lr)
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        def add(loras: list[LoRAModule], lr: float | None, ratio: float | None, label: str) -> None:
            for params, lr_value, suffix in _lora_param_groups(loras, lr, ratio):
                if not lr_value:
                    logger.info("LoRA: no learning rate for %s%s, its parameters are not trained", label, suffix)
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
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault(lora.block_index, []).append(lora)
            for index in sorted(by_block):
                lr = None if base_unet_lr is None else base_unet_lr * self.blocks.lr_weights[index]
                add(by_block[index], lr, unet_ratio, f"unet_block{index}")
        return groups, descriptions

    def _text_encoder_lrs(self, text_encoder_lr: float | Sequence[float] | None,
                          default_lr: float | None) -> list[float | None]:
        count = len(self.text_encoder_prefixes)
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
            return [default_lr] * count
        if isinstance(text_encoder_lr, (int, float)):
            return [float(text_encoder_lr)] * count
        lrs = list(text_encoder_lr)
        if len(lrs) == 1:
            return lrs * count
        if len(lrs) != count:
            raise NetworkArgumentError(f"text_encoder_lr lists {len(lrs)} values for a model with {count} text encoders")
        return [default_lr if lr is None else lr for lr in lrs]

    # -- max-norm regularisation (--scale_weight_norms) ------------------------------------------------

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str) -> tuple[int, float, float]:
        """Scale each module's up and down by sqrt(ratio) so that ||up @ down * scale|| <= max_norm_value.

        Returns (number of modules scaled, mean norm after scaling, max norm after scaling), kohya's values.
        """
        keys_scaled, norms = 0, []
        for lora in self.loras:
            down = lora.lora_down.weight.to(device, torch.float32)
            up = lora.lora_up.weight.to(device, torch.float32)
            norm = float(LoRAModule.delta_weight(down, up, lora.scale).norm())
            # kohya: norms below max/2 are treated as max/2 (ratio 1), which also avoids dividing by zero
            clamped = max(norm, max_norm_value / 2)
            ratio = min(clamped, max_norm_value) / clamped
            if ratio != 1:
                keys_scaled += 1
                lora.lora_up.weight.mul_(math.sqrt(ratio))
                lora.lora_down.weight.mul_(math.sqrt(ratio))
            norms.append(norm * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # -- files ----------------------------------------------------------------------------------------

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, Any] | None = None) -> None:
        """kohya's LoRA file: ``.safetensors`` (with metadata and the sshs_* hashes A1111 extensions read,
        written atomically) or ``.pt``/``.ckpt`` (torch.save, no metadata)."""
        from library.io import atomic_save_safetensors, atomic_torch_save

        state_dict = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        if Path(file).suffix.lower() == ".safetensors":
            metadata = {k: str(v) for k, v in (metadata or {}).items()}
            model_hash, legacy_hash = precalculate_safetensors_hashes(state_dict, metadata)
            metadata["sshs_model_hash"] = model_hash
            metadata["sshs_legacy_hash"] = legacy_hash
            atomic_save_safetensors(state_dict, file, metadata)
        else:
            atomic_torch_save(state_dict, file)

    def normalise_keys(self, weights_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename other tools' spellings of our module names (diffusers-named SDXL UNet keys, ...) to ours."""
        return {_rename(key, self._aliases): value for key, value in weights_sd.items()}

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load a LoRA file into this network. Keys for modules this network lacks are an error (a file for
        another model or another ``conv_dim``); returns torch's load info (the missing keys)."""
        weights_sd = self.normalise_keys(load_lora_state_dict(file))
        return self.load_state_dict_checked(weights_sd, source=str(file))

    def load_state_dict_checked(self, weights_sd: dict[str, torch.Tensor], source: str = "weights") -> Any:
        """Load ``weights_sd``; keys of modules this network left out on purpose (text-encoder layers that
        cannot change the output, as kohya's files have) are skipped, any other unknown key is an error."""
        own = self.state_dict()
        skipped = {k for k in weights_sd if k not in own and k.partition(".")[0] in self.left_out}
        if skipped:
            logger.info("LoRA: %s: skipped %d tensors of text-encoder layers that do not reach the output",
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
        """Add ``multiplier * up @ down * alpha/rank`` into the original weights (kohya's --base_weights).

        The update is computed in float32 on ``device`` and written back in each weight's own dtype
        (``dtype`` is accepted for kohya compatibility). Only modules present in ``weights_sd`` (default:
        this network's own weights) are merged. A network whose hooks are applied cannot be merged too.
        """
        if any(lora.applied for lora in self.loras):
            raise RuntimeError("merge_to on an applied network would add the LoRA twice; call restore() first")
        weights_sd = self.normalise_keys(weights_sd) if weights_sd is not None else self.state_dict()
        merged = 0
        for lora in self.loras:
            down = weights_sd.get(f"{lora.lora_name}.lora_down.weight")
            if down is None:
                continue
            up = weights_sd[f"{lora.lora_name}.lora_up.weight"]
            alpha = weights_sd.get(f"{lora.lora_name}.alpha")
            scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
            weight = lora.org_module.weight
            target = device if device is not None else weight.device
            delta = LoRAModule.delta_weight(down.to(target, torch.float32), up.to(target, torch.float32), scale)
            new = weight.to(target, torch.float32) + delta * lora.multiplier
            weight.copy_(new.to(weight.device, weight.dtype))
            merged += 1
        logger.info("LoRA: merged %d modules into the base weights", merged)


def _check_probability(name: str, value: float | None, allow_one: bool) -> None:
    if value is not None and not (0 <= value < 1 or (allow_one and value == 1)):
        raise NetworkArgumentError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {value}")


def _lora_param_groups(loras: list[LoRAModule], lr: float | None,
                       loraplus_ratio: float | None) -> list[tuple[list[nn.Parameter], float | None, str]]:
    """(params, lr, description suffix): one group, or two with LoRA+ (``lora_up`` at lr * ratio)."""
    if not loras:
        return []
    if not loraplus_ratio:
        return [([p for lora in loras for p in lora.parameters()], lr, "")]
    down = [lora.lora_down.weight for lora in loras]
    up = [lora.lora_up.weight for lora in loras]
    return [(down, lr, ""), (up, None if lr is None else lr * loraplus_ratio, " plus")]


# --------------------------------------------------------------------------------------------------
# kohya's plug-in entry points


def _as_list(text_encoder: Any) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(NETWORK_KWARGS))
    if unknown:
        raise NetworkArgumentError(f"unknown network argument(s) {', '.join(unknown)} for networks.lora; "
                         f"accepted: {', '.join(NETWORK_KWARGS)}")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: nn.Module | Sequence[nn.Module] | None, unet: nn.Module,
                   neuron_dropout: float | None = None, clip_skip: int | None = None, **kwargs: Any) -> LoRANetwork:
    """A fresh LoRA network (kohya's signature). ``kwargs`` are ``--network_args`` values, usually strings:
    conv_dim, conv_alpha, rank_dropout, module_dropout, block_dims, block_alphas, conv_block_dims,
    conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold, loraplus_*lr_ratio.

    ``clip_skip`` (the training run's) decides which text-encoder layers reach the loss and get modules.
    """
    _check_kwargs(kwargs)
    network_dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
    if network_dim < 1:
        raise NetworkArgumentError(f"network_dim (the LoRA rank) must be at least 1, got {network_dim}")
    network_alpha = DEFAULT_NETWORK_ALPHA if network_alpha is None else float(network_alpha)
    conv_dim = _opt_int(kwargs.get("conv_dim"))
    conv_alpha = _opt_float(kwargs.get("conv_alpha"))
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = DEFAULT_CONV_ALPHA
    sdxl = unet is not None and is_sdxl_unet(unet)
    blocks = _block_settings(kwargs, sdxl, network_dim, network_alpha, conv_dim, conv_alpha)
    text_encoders = _as_list(text_encoder)
    return LoRANetwork(
        text_encoders, unet, multiplier, network_dim, network_alpha, dropout=_opt_float(neuron_dropout),
        rank_dropout=_opt_float(kwargs.get("rank_dropout")), module_dropout=_opt_float(kwargs.get("module_dropout")),
        conv_lora_dim=conv_dim, conv_alpha=conv_alpha, blocks=blocks, verbose=_flag(kwargs.get("verbose")),
        text_encoder_layers=text_encoder_layers_in_use(text_encoders, sdxl, clip_skip), **_loraplus_kwargs(kwargs),
    )


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def _loraplus_kwargs(kwargs: dict[str, Any]) -> dict[str, float | None]:
    names = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    return {name: _opt_float(kwargs.get(name)) for name in names}


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
    neuron_dropout = kwargs.pop("neuron_dropout", None)
    _check_kwargs(kwargs)
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        weights_sd = load_lora_state_dict(file)
    text_encoders = _as_list(text_encoder)
    aliases = _name_aliases(unet, text_encoders)
    weights_sd = {_rename(key, aliases): value for key, value in weights_sd.items()}
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            modules_alpha[name] = float(value)
        elif rest == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
    missing_down = sorted(set(modules_alpha) - set(modules_dim))
    if missing_down:
        raise LoRAWeightsError(f"{file or 'weights'}: {missing_down[0]} has an alpha but no lora_down.weight")
    sdxl = unet is not None and is_sdxl_unet(unet)
    lr_weights = _block_lr_weights(kwargs, "sdxl" if sdxl else "sd")
    layers = None if for_inference else text_encoder_layers_in_use(text_encoders, sdxl, clip_skip)
    network = LoRANetwork(
        text_encoders, unet, multiplier, dropout=_opt_float(neuron_dropout),
        rank_dropout=_opt_float(kwargs.get("rank_dropout")), module_dropout=_opt_float(kwargs.get("module_dropout")),
        blocks=BlockSettings(lr_weights=lr_weights), modules_dim=modules_dim, modules_alpha=modules_alpha,
        verbose=_flag(kwargs.get("verbose")), text_encoder_layers=layers, **_loraplus_kwargs(kwargs),
    )
    network.load_state_dict_checked(weights_sd, source=str(file or "weights"))
    if for_inference:
        network.eval().requires_grad_(False)
    return network, weights_sd


def _rename(key: str, aliases: dict[str, str]) -> str:
    name, _, rest = key.partition(".")
    return f"{aliases.get(name, name)}.{rest}" if rest else key


def load_lora_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file: safetensors, or a torch pickle (.pt/.ckpt) read with ``weights_only``."""
    path = Path(file)
    if not path.is_file():
        raise LoRAWeightsError(f"{path} does not exist: pass the path of a LoRA .safetensors file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any read failure means the same to the user: a broken file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise LoRAWeightsError(f"{path} could not be read as a LoRA file ({reason}): it is truncated or not a "
                               "LoRA; download or save it again") from error


# --------------------------------------------------------------------------------------------------
# hashes written into the metadata (sd-webui-additional-networks reads them instead of hashing the file)


def addnet_hash_safetensors(data: bytes) -> str:
    """sha256 of a safetensors file's tensor data (everything after the header): metadata edits keep it."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def addnet_hash_legacy(data: bytes) -> str:
    """The old A1111 model hash: sha256 of the 64 KiB at offset 1 MiB (header included), first 8 hex digits.
    For a file under 1 MiB that is the hash of nothing (``e3b0c442``), as in kohya/A1111."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def precalculate_safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of ``tensors`` serialised with only the ``ss_*`` metadata, so
    that later user edits of other metadata do not change them (kohya's precalculate_safetensors_hashes)."""
    from safetensors.torch import save

    training_metadata = {k: str(v) for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, training_metadata)
    return addnet_hash_safetensors(data), addnet_hash_legacy(data)
