"""A LoRA from the weight difference of two models of one family: SVD per target module (the arithmetic of
``networks/extract_lora_from_models.py``, which documents the rules and how they differ from kohya)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from library.adapters.errors import LoRAFileError

if TYPE_CHECKING:
    from library.models.loading import StableDiffusionModel


def signed_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation, without its limit of 16M elements."""
    ordered = values.flatten().sort().values
    position = q * (ordered.numel() - 1)
    low = int(math.floor(position))
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def low_rank_factors(diff: torch.Tensor, rank: int, clamp_quantile: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) in LoRA shapes with ``up @ down`` the best rank-``rank`` approximation of ``diff``
    (S kept on up, as kohya), clamped at the ``clamp_quantile`` quantile of their values (< 1 only)."""
    out_dim = diff.shape[0]
    matrix = diff.reshape(out_dim, -1).float()
    rank = max(1, min(rank, *matrix.shape))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if clamp_quantile < 1:
        high = signed_quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    if diff.dim() == 4:
        return down.reshape(rank, *diff.shape[1:]), up.reshape(out_dim, rank, 1, 1)
    return down, up


# --------------------------------------------------------------------------------------------------
# which weights differ


def target_weights(model: StableDiffusionModel, conv: bool) -> tuple[list[dict[str, nn.Module]], dict[str, nn.Module]]:
    """networks.lora's target modules by kohya name: one dict per text encoder, and the UNet's."""
    from library.adapters.targets import text_encoder_prefixes, text_encoder_targets, unet_targets

    prefixes = text_encoder_prefixes(len(model.text_encoders))
    tes = [{t.lora_name: t.module for t in text_encoder_targets(te, prefix)}
           for prefix, te in zip(prefixes, model.text_encoders)]
    unet = {t.lora_name: t.module for t in unet_targets(model.unet, conv)}
    return tes, unet


def weight_diffs(org: dict[str, nn.Module], tuned: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    if org.keys() != tuned.keys():
        raise LoRAFileError("the two models have different modules; are they of one architecture?")
    diffs = {}
    for name, module in org.items():
        a, b = module.weight, tuned[name].weight
        if a.shape != b.shape:
            raise LoRAFileError(f"{name}: weight shapes {tuple(a.shape)} and {tuple(b.shape)} differ; "
                                "the models are not of one architecture")
        diffs[name] = b.detach().float() - a.detach().float()
    return diffs


def extract_lora_state_dict(model_org: StableDiffusionModel, model_tuned: StableDiffusionModel, dim: int,
                            conv_dim: int | None = None, clamp_quantile: float = 0.99, min_diff: float = 0.01,
                            device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """kohya-format tensors (down, up, alpha = rank) of the LoRA from ``model_org`` to ``model_tuned``."""
    tes_o, unet_o = target_weights(model_org, conv_dim is not None)
    tes_t, unet_t = target_weights(model_tuned, conv_dim is not None)
    diffs: dict[str, torch.Tensor] = {}
    for index, (te_o, te_t) in enumerate(zip(tes_o, tes_t)):
        te_diffs = weight_diffs(te_o, te_t)
        largest = max((float(d.abs().max()) for d in te_diffs.values()), default=0.0)
        label = "text encoder" if len(tes_o) == 1 else f"text encoder {index + 1}"
        if largest > min_diff:
            print(f"{label} differs (largest change {largest:.3g} > --min_diff {min_diff:g}): extracted")
            diffs.update(te_diffs)
        else:
            print(f"{label} is the same (largest change {largest:.3g} <= --min_diff {min_diff:g}): not extracted")
    diffs.update(weight_diffs(unet_o, unet_t))
    state_dict: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, diff in diffs.items():
            kxk = diff.dim() == 4 and tuple(diff.shape[2:]) != (1, 1)
            rank = conv_dim if kxk and conv_dim is not None else dim
            down, up = low_rank_factors(diff.to(device), rank, clamp_quantile)
            state_dict[f"{name}.lora_down.weight"] = down.cpu().contiguous()
            state_dict[f"{name}.lora_up.weight"] = up.cpu().contiguous()
            state_dict[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return state_dict
