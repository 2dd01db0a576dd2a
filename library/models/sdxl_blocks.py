"""kohya's 23 SDXL UNet blocks, for ``--block_lr``, on diffusers parameter names.

kohya numbers blocks on the original (SAI/LDM) module names: 0 = time and label embeddings, 1-9 =
``input_blocks.0-8``, 10-12 = ``middle_block.0-2``, 13-21 = ``output_blocks.0-8``, 22 = ``out``. We train
diffusers' UNet, so each parameter name goes through the same key table the single-file converter uses.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from library.models.ldm_layout import unet_table

NUM_BLOCKS = 23


def block_index(ldm_key: str) -> int:
    head, _, rest = ldm_key.partition(".")
    if head in ("time_embed", "label_emb"):
        return 0
    number = int(rest.split(".", 1)[0]) if rest else 0
    if head == "input_blocks":
        return 1 + number
    if head == "middle_block":
        return 10 + number
    if head == "output_blocks":
        return 13 + number
    if head == "out":
        return 22
    raise ValueError(f"{ldm_key} is not an SDXL UNet parameter")


def parse_block_lr(text: str) -> list[float]:
    values = [v.strip() for v in text.split(",")]
    if len(values) != NUM_BLOCKS:
        raise ValueError(f"--block_lr takes {NUM_BLOCKS} comma-separated values (0 = time/label embedding, 1-9 input "
                         f"blocks, 10-12 middle, 13-21 output blocks, 22 out), got {len(values)}")
    try:
        rates = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--block_lr {text!r}: every value must be a number") from None
    if any(not 0 <= rate < float("inf") for rate in rates):
        raise ValueError(f"--block_lr {text!r}: every value must be a finite number >= 0 (0 freezes a block)")
    return rates


def block_param_groups(unet: nn.Module, block_lrs: list[float]) -> list[dict[str, Any]]:
    """One optimizer group per block with a non-zero LR; a block with LR 0 is left out (frozen)."""
    table = unet_table(dict(unet.config))
    groups: dict[int, list[nn.Parameter]] = {}
    for name, parameter in unet.named_parameters():
        ldm = table.diffusers_key_to_ldm(name)
        if ldm is None:
            raise ValueError(f"UNet parameter {name} has no SDXL block")
        groups.setdefault(block_index(ldm), []).append(parameter)
    out = []
    for index in sorted(groups):
        lr = block_lrs[index]
        if lr == 0:
            for parameter in groups[index]:
                parameter.requires_grad_(False)
            continue
        out.append({"params": groups[index], "lr": lr, "name": f"block{index}"})
    return out
