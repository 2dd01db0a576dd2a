"""DoRA (weight-decomposed LoRA) arithmetic, in LyCORIS's convention, shared by the training module and the tools.

DoRA keeps, per output row of a weight, a trained magnitude ``dora_scale`` (the file key, LyCORIS's name) and
rescales the LoRA-updated weight so that each row has that norm::

    W' = (W + dW) * (multiplier * (dora_scale / (||W + dW||_row + eps) - 1) + 1)

``dW`` is the LoRA update ``up @ down * alpha / rank`` without the multiplier. With multiplier 1 this is
``dora_scale * (W + dW) / ||W + dW||``; other multipliers interpolate the rescaling only (``dW`` is always added
in full), exactly as LyCORIS 4.1.3's ``weight_decompose`` with ``wd_on_out=True`` (its default) does. The norm
is not detached: gradients reach ``dW`` through it too, as in LyCORIS.

A file's ``dora_scale`` has the shape ``(out, 1)`` for Linear and ``(out, 1, 1, 1)`` for Conv2d weights.
"""

from __future__ import annotations

import torch

DORA_SCALE_SUFFIX = ".dora_scale"


def dora_scale_shape(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``dora_scale`` for a weight of ``weight_shape``: one value per output row."""
    return (int(weight_shape[0]), *([1] * (len(weight_shape) - 1)))


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output row (Linear) or output channel (Conv2d) of ``weight``, in `dora_scale_shape`."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(dora_scale_shape(weight.shape))


def initial_dora_scale(weight: torch.Tensor) -> torch.Tensor:
    """A fresh module's ``dora_scale``: the row norms of the frozen weight (so that W' = W while dW = 0), float32."""
    return row_norms(weight.detach().to(torch.float32))


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
                       multiplier: float) -> torch.Tensor:
    """The weight DoRA computes with (and that a merge writes): ``W'`` above, float32.

    ``weight``: the frozen base weight; ``delta``: the LoRA update in the weight's shape, without the multiplier;
    ``dora_scale``: the magnitudes (`dora_scale_shape`). Differentiable in ``delta`` and ``dora_scale``.
    """
    merged = weight.to(torch.float32) + delta.to(torch.float32).reshape(weight.shape)
    norm = row_norms(merged) + torch.finfo(torch.float32).eps
    scale = dora_scale.to(merged.device, torch.float32).reshape(dora_scale_shape(weight.shape)) / norm
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return merged * scale
