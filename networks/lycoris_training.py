"""The optimizer's view of a LyCORIS network: block-wise learning rates and LoRA+ groups, as networks.lora has them.

lycoris-lora's kohya plug-in reads ``loraplus_*lr_ratio`` but ignores kohya's ``down_lr_weight`` /
``mid_lr_weight`` / ``up_lr_weight`` / ``block_lr_zero_threshold``. Here they work as for networks.lora: each UNet
module's kohya block comes from its kohya name (the LDM path behind it, `library.models.families.KohyaBlocks`),
and the UNet gets one param group per block at ``unet_lr * weight``. Modules outside the three block lists
(SD1/SD2's time embedding and output layers) learn at ``unet_lr``; SDXL's time/label embedding is block 0 and
its output layers the last block, as in kohya. A block whose weight is 0 keeps its modules (LyCORIS makes
them) but leaves them out of the optimizer, so they stay at their initial no-op values; networks.lora makes no
module there. kohya's block dims (block_dims, conv_block_dims, ...), which LyCORIS's plug-in also ignores, are
refused.

LoRA+ follows LyCORIS's own rule: the "up" (B) tensors trained at ``lr * ratio`` are the parameters named
``lora_up`` (LoCon, with or without ``dora_wd``). LoHa, LoKr, (IA)^3, full and OFT have no such tensor, and
LyCORIS would train them at the plain lr without a word; a LoRA+ ratio with them is refused instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from library.adapters.blocks import block_lr_weights
from library.adapters.errors import NetworkArgumentError
from library.adapters.network_args import loraplus_kwargs, text_encoder_lrs
from library.models.families import SD1, ModelFamily, family_of_unet

BLOCK_LR_KWARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
BLOCK_DIM_KWARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")  # refused: see below
PLUS_PARAMETER = "lora_up"  # LyCORIS's kohya plug-in: a parameter whose name contains this is LoRA+'s "up"
ALGOS_WITH_UP = ("lora", "locon")  # LyCORIS algorithms whose modules have a lora_up (LyCORIS's default: "lora")


@dataclass(frozen=True)
class LycorisTrainingOptions:
    """What `optimizer_param_groups` needs beyond the learning rates, from ``--network_args``."""

    block_lr_weights: tuple[float, ...] | None = None  # one per kohya block; None: one UNet group
    unet_blocks: dict[str, int] = field(default_factory=dict)  # UNet module name -> kohya block (with block LR)
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None


def check_training_network_args(network_args: dict[str, Any]) -> None:
    """Refuse, before any model loads, the settings a LyCORIS network cannot honour (LoRA+ with an algorithm
    that has no up matrix, block dims) and malformed block LR weights."""
    algo = str(network_args.get("algo") or "lora").lower()
    preset = str(network_args.get("preset") or "")
    try:
        ratios = {k: v for k, v in loraplus_kwargs(network_args).items() if v is not None}
    except ValueError as error:
        raise NetworkArgumentError(f"a loraplus_*lr_ratio in --network_args is not a number ({error}): "
                                   "e.g. loraplus_lr_ratio=16") from None
    # a preset file may map some module classes to another algo; `optimizer_param_groups` checks those
    if ratios and algo not in ALGOS_WITH_UP and not preset.endswith((".toml", ".json")):
        raise NetworkArgumentError(_no_up_message(next(iter(ratios)), f"algo={algo}"))
    try:  # the syntax (presets, numbers); lengths are padded per model later
        block_lr_weights(network_args, SD1)
    except ValueError as error:
        given = ", ".join(f"{k}={network_args[k]}" for k in BLOCK_LR_KWARGS if network_args.get(k) is not None)
        raise NetworkArgumentError(f"{given}: {error}; give a comma list of numbers or a preset "
                                   "(cosine, sine, linear, reverse_linear, zeros, optionally +number)") from None
    dims = [k for k in BLOCK_DIM_KWARGS if network_args.get(k) is not None]
    if dims:  # LyCORIS's plug-in would build every block at network_dim / conv_dim without a word
        raise NetworkArgumentError(f"{dims[0]}: LyCORIS networks have one network_dim and conv_dim for all blocks "
                                   "(block dims are networks.lora's); use --network_module networks.lora for block "
                                   "dims, or a LyCORIS preset TOML to choose the modules")


def training_options(network_args: dict[str, Any], *, unet: nn.Module | None) -> LycorisTrainingOptions:
    """The block LR weights for ``unet``'s family (with each UNet module's block) and the LoRA+ ratios."""
    check_training_network_args(network_args)
    family = family_of_unet(unet)
    weights = block_lr_weights(network_args, family)
    blocks = unet_block_indices(unet, family) if weights is not None and unet is not None else {}
    return LycorisTrainingOptions(block_lr_weights=None if weights is None else tuple(weights), unet_blocks=blocks,
                                  **loraplus_kwargs(network_args))


def unet_block_indices(unet: nn.Module, family: ModelFamily | None = None) -> dict[str, int]:
    """kohya's block index for every UNet module with weights, under both spellings of its kohya name (diffusers
    path, LDM path; the family's own spelling wins); -1 outside the blocks."""
    from library.adapters.targets import UNET_PREFIX, underscored
    from library.models.ldm_layout import unet_table

    family = family or family_of_unet(unet)
    table = unet_table(dict(unet.config))
    blocks: dict[str, int] = {}
    own: dict[str, int] = {}
    for name, module in unet.named_modules():
        if not name or getattr(module, "weight", None) is None:
            continue
        key = table.diffusers_key_to_ldm(name + ".weight")
        if key is None:
            continue
        ldm = key[: -len(".weight")]
        index = _block_of_ldm_path(family, ldm)
        ours, other = (ldm, name) if family.lora_names_from_ldm else (name, ldm)
        own[underscored(UNET_PREFIX, ours)] = index
        blocks[underscored(UNET_PREFIX, other)] = index
    return {**blocks, **own}


def _block_of_ldm_path(family: ModelFamily, ldm: str) -> int:
    """kohya's get_block_index: SDXL (whose list starts with the embedding block) also numbers time_embed /
    label_emb (0) and out (the last block); for SD1/SD2 they are outside the blocks (-1)."""
    blocks = family.kohya_blocks
    index = blocks.index(ldm)
    if index < 0 and blocks.input_offset > 0:
        head = ldm.split(".")[0]
        if head in ("time_embed", "label_emb"):
            return 0
        if head == "out":
            return blocks.count - 1
    return index


def optimizer_param_groups(*, text_encoder_modules: Sequence[nn.Module], unet_modules: Sequence[nn.Module],
                           options: LycorisTrainingOptions, text_encoder_lr: float | Sequence[float] | None,
                           unet_lr: float | None, default_lr: float | None,
                           ) -> tuple[list[dict[str, Any]], list[str]]:
    """kohya's ``prepare_optimizer_params`` for LyCORIS modules (each with ``lora_name``): groups and their
    descriptions named as networks.lora names them ("textencoder 1", "unet", "unet_block5", "... plus").
    A group whose LR is 0 or None is left out (it would not learn)."""
    groups: list[dict[str, Any]] = []
    descriptions: list[str] = []
    te_ratio = options.loraplus_text_encoder_lr_ratio or options.loraplus_lr_ratio
    unet_ratio = options.loraplus_unet_lr_ratio or options.loraplus_lr_ratio
    for ratio, modules, setting in ((te_ratio, text_encoder_modules, "loraplus_text_encoder_lr_ratio"),
                                    (unet_ratio, unet_modules, "loraplus_unet_lr_ratio")):
        if ratio and modules and next(iter(_plus_parameters(modules)), None) is None:
            algos = sorted({type(m).__name__ for m in modules})
            raise NetworkArgumentError(_no_up_message(setting if options.loraplus_lr_ratio is None
                                                      else "loraplus_lr_ratio", f"modules {', '.join(algos)}"))

    def add(modules: Sequence[nn.Module], lr: float | None, ratio: float | None, label: str) -> None:
        for params, value, suffix in _lr_split(modules, lr, ratio):
            if params and value:
                groups.append({"params": params, "lr": value})
                descriptions.append(label + suffix)

    by_encoder = _by_text_encoder(text_encoder_modules)
    te_lrs = text_encoder_lrs(text_encoder_lr, default_lr, len(by_encoder))
    for (label, modules), lr in zip(by_encoder, te_lrs):
        add(modules, lr, te_ratio, label)
    base_lr = unet_lr if unet_lr is not None else default_lr
    weights = options.block_lr_weights
    if weights is None:
        add(unet_modules, base_lr, unet_ratio, "unet")
        return groups, descriptions
    by_block: dict[int, list[nn.Module]] = {}
    for module in unet_modules:
        by_block.setdefault(options.unet_blocks.get(module.lora_name, -1), []).append(module)
    for index in sorted(by_block):
        weight = weights[index] if 0 <= index < len(weights) else 1.0  # outside the blocks: unet_lr
        add(by_block[index], None if base_lr is None else base_lr * weight, unet_ratio,
            "unet" if index < 0 else f"unet_block{index}")
    return groups, descriptions


def _plus_parameters(modules: Iterable[nn.Module]) -> Iterable[nn.Parameter]:
    return (p for m in modules for name, p in m.named_parameters() if PLUS_PARAMETER in name)


def _lr_split(modules: Sequence[nn.Module], lr: float | None,
              ratio: float | None) -> list[tuple[list[nn.Parameter], float | None, str]]:
    """(params, lr, suffix): the trainable ones at ``lr``, or with LoRA+ the ``lora_up`` ones apart at ``lr * ratio``
    (modules frozen because their text-encoder layer cannot reach the loss are left out)."""
    trained = [p for m in modules for p in m.parameters() if p.requires_grad]  # frozen: can't reach the loss
    if not ratio:
        return [(trained, lr, "")]
    plus = [p for p in _plus_parameters(modules) if p.requires_grad]
    chosen = {id(p) for p in plus}
    rest = [p for p in trained if id(p) not in chosen]
    return [(rest, lr, ""), (plus, None if lr is None else lr * ratio, " plus")]


def _by_text_encoder(modules: Sequence[nn.Module]) -> list[tuple[str, list[nn.Module]]]:
    """Text-encoder modules per encoder, by kohya's prefix (lora_te; SDXL's lora_te1 / lora_te2)."""
    groups: dict[str, list[nn.Module]] = {}
    for module in modules:
        groups.setdefault(module.lora_name.split("_")[1], []).append(module)
    if list(groups) == ["te"] or not groups:
        return [("textencoder", groups.get("te", []))]
    return [(f"textencoder {i}", groups.get(f"te{i}", [])) for i in (1, 2)]


def _no_up_message(setting: str, what: str) -> str:
    return (f"{setting} (LoRA+) with {what}: LoRA+ trains the up (lora_up) matrices faster, and only LyCORIS's "
            "LoCon (algo=locon, its default) has them; use algo=locon, or remove the LoRA+ ratio")
