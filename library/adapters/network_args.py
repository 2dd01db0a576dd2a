"""``--network_args`` values as the adapters read them: strings from the command line, numbers from Python
callers, kohya's defaults, and the checks that refuse a value no network can use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from library.adapters.errors import NetworkArgumentError

DEFAULT_NETWORK_DIM = 4  # kohya's defaults when --network_dim / --network_alpha are not given
DEFAULT_NETWORK_ALPHA = 1.0
DEFAULT_CONV_ALPHA = 1.0

NETWORK_KWARGS = (
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout",
    "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "verbose",
)
LORAPLUS_KWARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def opt_float(value: Any) -> float | None:
    return None if value is None or value == "" or str(value).lower() == "none" else float(value)


def opt_int(value: Any) -> int | None:
    return None if value is None or value == "" or str(value).lower() == "none" else int(value)


def flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def number_list(value: Any, kind: type, name: str, length: int | None = None) -> list[Any] | None:
    """A comma-separated string (or a sequence) of numbers; ``length``: the count the model needs."""
    if value is None:
        return None
    items = [kind(v) for v in (value.split(",") if isinstance(value, str) else value)]
    if length is not None and len(items) != length:
        raise NetworkArgumentError(f"{name} needs {length} comma-separated values for this model, got {len(items)}")
    return items


def check_kwargs(kwargs: dict[str, Any], *, accepted: tuple[str, ...], module_name: str) -> None:
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise NetworkArgumentError(f"unknown network argument(s) {', '.join(unknown)} for {module_name}; "
                                   f"accepted: {', '.join(accepted)}")


def check_probability(name: str, value: float | None, allow_one: bool) -> None:
    if value is not None and not (0 <= value < 1 or (allow_one and value == 1)):
        raise NetworkArgumentError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {value}")


def loraplus_kwargs(kwargs: dict[str, Any]) -> dict[str, float | None]:
    """The LoRA+ ratios (``lora_up`` learns at lr * ratio) as floats, None where not given."""
    return {name: opt_float(kwargs.get(name)) for name in LORAPLUS_KWARGS}


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``--network_args k=v ...`` as a dict of strings (what the network module and the metadata get)."""
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--network_args {item!r}: expected key=value")
        result[key.strip()] = value.strip()
    return result


def text_encoder_lrs(text_encoder_lr: float | Sequence[float | None] | None, default_lr: float | None,
                     count: int) -> list[float | None]:
    """One LR per text encoder: ``--text_encoder_lr`` (one value, or one per encoder), else the default."""
    if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and not text_encoder_lr):
        return [default_lr] * count
    if isinstance(text_encoder_lr, (int, float)):
        return [float(text_encoder_lr)] * count
    lrs = list(text_encoder_lr)
    if len(lrs) == 1:
        return lrs * count
    if len(lrs) != count:
        raise NetworkArgumentError(f"--text_encoder_lr lists {len(lrs)} values for a model with {count} text encoders")
    return [default_lr if lr is None else lr for lr in lrs]
