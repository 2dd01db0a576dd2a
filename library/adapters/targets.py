"""Which modules of a model carry an adapter, and their kohya names (what A1111, ComfyUI and diffusers read).

What gets an adapter (kohya's choice, matched by module class and structure, not by class-level lists):
  * UNet: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside a ``Transformer2DModel`` (attn1/attn2 q/k/v/out,
    ff.net.0.proj, ff.net.2, proj_in/proj_out).
  * With conv blocks (LoCon): the layers of ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` too (3x3 convs,
    time_emb_proj, conv_shortcut). conv_in/conv_out and the time/added embeddings never get one.
  * Text encoders: ``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1/fc2`` of every CLIP encoder layer whose
    output reaches the conditioning (`text_encoder_layers_in_use`).

Names: ``lora_unet_`` + module path with ``.`` -> ``_``. SD1/SD2 use diffusers paths
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); SDXL uses the original SAI/LDM paths
because kohya trains SDXL on that UNet (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
Text encoders: ``lora_te_`` (one) or ``lora_te1_``/``lora_te2_`` (SDXL) + the ``text_model.``-rooted path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from library.models.families import ModelFamily, family_of_unet

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"  # one text encoder (SD1/SD2)
TE_PREFIXES_SDXL = ("lora_te1", "lora_te2")

# Module classes (diffusers) whose children get an adapter. Checked by class name so that subclasses and
# look-alike classes from other code bases (kohya's own SAI UNet uses the same names) are treated alike.
TRANSFORMER_CLASSES = ("Transformer2DModel",)
CONV_BLOCK_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_TARGET = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])")


@dataclass(frozen=True)
class AdapterTarget:
    """One module that can carry an adapter, with its kohya name and the block it belongs to."""

    lora_name: str
    module: nn.Module
    is_unet: bool
    block_index: int  # -1 for text encoders

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _ldm_paths(unet: nn.Module) -> Any:
    from library.models.ldm_layout import unet_table

    return unet_table(dict(unet.config))


def unet_targets(unet: nn.Module, include_conv_blocks: bool) -> list[AdapterTarget]:
    """Every Linear/Conv2d in the UNet's transformer blocks (and, for LoCon, in resnet/down/up blocks)."""
    family = family_of_unet(unet)
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
            lora_name = underscored(UNET_PREFIX, ldm if family.lora_names_from_ldm else path)
            targets.append(AdapterTarget(lora_name, child, True, family.kohya_blocks.index(ldm)))
    return targets


def _ldm_module_path(table: Any, path: str) -> str:
    ldm = table.diffusers_key_to_ldm(path + ".weight")
    if ldm is None:
        raise KeyError(f"UNet module {path} has no LDM equivalent; cannot name its LoRA")
    return ldm[: -len(".weight")]


def text_encoder_targets(text_encoder: nn.Module, prefix: str, layers: int | None = None) -> list[AdapterTarget]:
    """q/k/v/out projections and fc1/fc2 of the CLIP encoder layers, named from ``text_model.``.

    ``layers``: only the first ``layers`` encoder layers (those whose output is used); None: all of them.
    """
    targets = []
    for name, module in text_encoder.named_modules():
        match = _TE_TARGET.fullmatch(name)
        if isinstance(module, nn.Linear) and match and (layers is None or int(match.group(1)) < layers):
            canonical = name if name.startswith("text_model.") else "text_model." + name
            targets.append(AdapterTarget(underscored(prefix, canonical), module, False, -1))
    return targets


def text_encoder_layers_in_use(text_encoders: Sequence[nn.Module], family: ModelFamily,
                               clip_skip: int | None = None) -> list[int]:
    """How many leading encoder layers of each text encoder can change the conditioning (see
    `library.models.text_encoding` and `ModelFamily.text_encoder_layers_in_use`)."""
    return family.text_encoder_layers_in_use([_layer_count(te) for te in text_encoders], clip_skip)


def _layer_count(text_encoder: nn.Module) -> int:
    config = getattr(text_encoder, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) is not None:
        return int(config.num_hidden_layers)
    indices = {int(m.group(1)) for name, _ in text_encoder.named_modules() if (m := _TE_TARGET.fullmatch(name))}
    return max(indices, default=-1) + 1


def text_encoder_prefixes(count: int) -> tuple[str, ...]:
    return (TE_PREFIX,) if count == 1 else tuple(f"{TE_PREFIX}{i + 1}" for i in range(count))


def underscored(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def name_aliases(unet: nn.Module | None, text_encoders: Sequence[nn.Module]) -> dict[str, str]:
    """Other spellings of our module names that other tools write -> our name.

    SDXL files from diffusers-based trainers name UNet modules by diffusers paths (kohya converts them,
    ``convert_diffusers_to_sai_if_needed``); for SD1/SD2 we accept the LDM spelling the same way; text-encoder
    names without the ``text_model_`` level are accepted too.
    """
    aliases: dict[str, str] = {}
    if unet is not None:
        names_from_ldm = family_of_unet(unet).lora_names_from_ldm
        table = _ldm_paths(unet)
        for name, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                ldm = table.diffusers_key_to_ldm(name + ".weight")
                if ldm is None:
                    continue
                ours, other = (ldm[: -len(".weight")], name) if names_from_ldm else (name, ldm[: -len(".weight")])
                aliases[underscored(UNET_PREFIX, other)] = underscored(UNET_PREFIX, ours)
    for prefix, te in zip(text_encoder_prefixes(len(text_encoders)), text_encoders):
        for target in text_encoder_targets(te, prefix):
            short = target.lora_name.replace(f"{prefix}_text_model_", f"{prefix}_", 1)
            aliases[short] = target.lora_name
    return aliases


def rename_key(key: str, aliases: dict[str, str]) -> str:
    """``key`` (``<module name>.<tensor>``) with its module name spelled our way."""
    name, _, rest = key.partition(".")
    return f"{aliases.get(name, name)}.{rest}" if rest else key
