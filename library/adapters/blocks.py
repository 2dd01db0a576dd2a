"""Per-block settings of the UNet's adapters (kohya's block_dims, block_alphas, conv_block_*, down/mid/up_lr_weight).

Block indices are kohya's get_block_index (the family's ``kohya_blocks``, `library.models.families`): SD1/SD2 have 25 entries
(0..11 down = LDM input_blocks 0..11, 12 mid, 13..24 up = output_blocks 0..11); SDXL has 23
(0 time/label embedding, 1..9 input_blocks 0..8, 10..12 middle_block 0..2, 13..21 output_blocks 0..8, 22 out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from library.adapters.errors import NetworkArgumentError
from library.adapters.network_args import DEFAULT_CONV_ALPHA, number_list, opt_float
from library.models.families import ModelFamily
from library.toml_values import is_number


@dataclass
class BlockSettings:
    """Per-block dims/alphas and LR weights for the UNet (kohya's block_dims & co.); None = not block-wise."""

    dims: list[int] | None = None
    alphas: list[float] | None = None
    conv_dims: list[int] | None = None
    conv_alphas: list[float] | None = None
    lr_weights: list[float] | None = None


def block_settings(kwargs: dict[str, Any], *, family: ModelFamily, network_dim: int, network_alpha: float,
                   conv_dim: int | None, conv_alpha: float | None) -> BlockSettings:
    """The block settings ``--network_args`` ask for; a block whose LR weight is 0 gets dim 0 (no module)."""
    total = family.kohya_blocks.count
    lr_weights = block_lr_weights(kwargs, family)
    block_dims = kwargs.get("block_dims")
    if block_dims is None and lr_weights is None and kwargs.get("conv_block_dims") is None:
        return BlockSettings()
    dims = number_list(block_dims, int, "block_dims", total) or [network_dim] * total
    alphas = number_list(kwargs.get("block_alphas"), float, "block_alphas", total) or [network_alpha] * total
    conv_dims = number_list(kwargs.get("conv_block_dims"), int, "conv_block_dims", total)
    conv_alphas = number_list(kwargs.get("conv_block_alphas"), float, "conv_block_alphas", total)
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


def block_lr_weights(kwargs: dict[str, Any], family: ModelFamily) -> list[float] | None:
    """One LR weight per block from down/mid/up_lr_weight (below block_lr_zero_threshold: 0); None if unset."""
    down, mid, up = (kwargs.get(k) for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"))
    if down is None and mid is None and up is None:
        return None
    blocks = family.kohya_blocks  # down blocks [0, mid), up blocks [first_up, count)
    total, first_down, mids, first_up = blocks.count, 0, blocks.mid, blocks.first_up
    down_len, up_len = mids[0] - first_down, total - first_up
    weights = [1.0] * total
    for start, values in ((first_down, _lr_weight_list(down, down_len, "down_lr_weight")),
                          (first_up, _lr_weight_list(up, up_len, "up_lr_weight"))):
        for offset, value in enumerate(values or []):
            weights[start + offset] = value
    if mid is not None:
        for index in mids:
            weights[index] = float(mid)
    threshold = opt_float(kwargs.get("block_lr_zero_threshold")) or 0.0
    return [0.0 if w < threshold else w for w in weights]


def _lr_weight_list(value: Any, length: int, name: str) -> list[float] | None:
    """kohya's down/up_lr_weight: a comma list or a preset (cosine|sine|linear|reverse_linear|zeros)[+base]."""
    if value is None:
        return None
    if isinstance(value, str) and "," not in value and not is_number(value):
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
    weights = number_list(value, float, name)
    return (weights + [1.0] * length)[:length]  # kohya pads short lists with 1.0 and truncates long ones

