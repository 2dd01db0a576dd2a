"""kohya LoRA files: read them, group their tensors into modules, write them with kohya's metadata hashes.

One module of a file is ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha``; its update
is ``up @ down * alpha / rank`` (`lora_delta_weight`). The training network (``networks.lora``) and the
command-line tools (merge, resize, extract, check) read and write files through this module only, so that they
agree on every detail.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from library.adapters.errors import LoRAFileError, LoRAWeightsError

DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
# longest prefix first: "lora_te1_..." must not be read as "lora_te" + "1_..."
PARTS = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))
PRECISIONS = ("float", "fp16", "bf16")  # kohya's --save_precision / --precision choices
LORA_ONLY = "this tool handles kohya LoRA/LoCon files only (lora_down/lora_up/alpha keys)"


def lora_delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense update ``up @ down * scale`` in the original weight's shape (Linear, 1x1 or kxk conv)."""
    if down.dim() == 2:
        return up @ down * scale
    if down.shape[2:] == (1, 1):
        return (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None] * scale
    # kxk down followed by 1x1 up: compose the two convolutions into one kxk kernel.
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


# --------------------------------------------------------------------------------------------------
# reading


@dataclass
class LoRAFactors:
    """One module of a LoRA file: ``delta W = up @ down * alpha / rank`` (alpha missing: alpha = rank)."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha

    @property
    def is_kxk_conv(self) -> bool:
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def part(self) -> str:
        return lora_part(self.name)

    def delta(self) -> torch.Tensor:
        """The dense update in the original weight's shape, in float32 (the training network's arithmetic)."""
        return lora_delta_weight(self.down.float(), self.up.float(), self.scale)


def file_delta_weight(weights_sd: dict[str, torch.Tensor], lora_name: str,
                      device: torch.device | str) -> torch.Tensor | None:
    """The float32 update ``up @ down * alpha / rank`` of module ``lora_name`` in a file (None if it has none)."""
    down = weights_sd.get(lora_name + DOWN_SUFFIX)
    if down is None:
        return None
    up = weights_sd[lora_name + UP_SUFFIX]
    alpha = weights_sd.get(lora_name + ALPHA_SUFFIX)
    scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
    return lora_delta_weight(down.to(device, torch.float32), up.to(device, torch.float32), scale)


def file_dims_and_alphas(weights_sd: dict[str, torch.Tensor], source: str) -> tuple[dict[str, int], dict[str, float]]:
    """Rank (``lora_down.shape[0]``) and alpha per module of a kohya LoRA/DoRA file; alpha missing: the rank."""
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, rest = key.partition(".")
        if rest == "alpha":
            modules_alpha[name] = float(value)
        elif rest == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
    missing_down = sorted(set(modules_alpha) - set(modules_dim))
    if missing_down:
        raise LoRAWeightsError(f"{source}: {missing_down[0]} has an alpha but no lora_down.weight")
    return modules_dim, modules_alpha


def lora_part(name: str) -> str:
    """unet / te / te1 / te2 from the kohya prefix; "other" for names that follow no kohya prefix."""
    for prefix, part in PARTS:
        if name.startswith(prefix):
            return part
    return "other"


def load_lora_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file for a network: safetensors, or a torch pickle (.pt/.ckpt) read with ``weights_only``."""
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


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` LoRA, or tensors of a ``.pt``/``.ckpt`` one (for the tools).
    A .safetensors file is read without importing the model code (diffusers): the tools start in seconds."""
    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"{path} does not exist or is not a file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        from library.io import read_safetensors_metadata

        try:
            return load_file(str(path)), read_safetensors_metadata(path)
        except Exception as error:  # noqa: BLE001 - the message names the file, that is what the user needs
            raise LoRAFileError(f"{path} could not be read as a safetensors file ({error})") from error
    from library.models.loading import ModelLoadError, read_checkpoint

    try:
        return read_checkpoint(path)
    except ModelLoadError as error:
        raise LoRAFileError(str(error)) from error


def group_modules(state_dict: dict[str, torch.Tensor], source: str = "weights") -> tuple[dict[str, LoRAFactors], list[str]]:
    """(modules by name, keys that belong to no kohya LoRA module). A down without its up is an error."""
    modules: dict[str, LoRAFactors] = {}
    for key, value in state_dict.items():
        if key.endswith(DOWN_SUFFIX):
            name = key[: -len(DOWN_SUFFIX)]
            up = state_dict.get(name + UP_SUFFIX)
            if up is None:
                raise LoRAFileError(f"{source}: {key} has no matching {name + UP_SUFFIX}")
            if up.shape[1] != value.shape[0]:
                raise LoRAFileError(f"{source}: {name} has down rank {value.shape[0]} but up rank {up.shape[1]}")
            alpha = state_dict.get(name + ALPHA_SUFFIX)
            modules[name] = LoRAFactors(name, value, up, None if alpha is None else float(alpha))
    known = {name + suffix for name in modules for suffix in (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX)}
    others = sorted(k for k in state_dict if k not in known)
    return modules, others


def read_lora_modules(path: str | os.PathLike, require_only_lora: bool = True,
                      refusal: str = LORA_ONLY) -> tuple[dict[str, LoRAFactors], dict[str, str]]:
    """The modules and metadata of a kohya LoRA file, for tools that rewrite it: other tensors (LyCORIS
    factors, DoRA scales, ...) are an error there, since silently dropping them would change the file's effect;
    the message names the file's kinds (LoHa, DoRA, ...), then ``refusal`` (what the tool takes instead)."""
    from library.adapters.lycoris_files import not_plain_lora_reason

    state_dict, metadata = read_lora_file(path)
    reason = not_plain_lora_reason(state_dict, str(path)) if require_only_lora else None
    if reason is not None:
        raise LoRAFileError(f"{reason}: {refusal}")
    modules, others = group_modules(state_dict, str(path))
    if not modules:
        raise LoRAFileError(f"{path} holds no kohya LoRA module (no *{DOWN_SUFFIX} keys); is it a LyCORIS or PEFT file?")
    if require_only_lora and others:
        raise LoRAFileError(f"{path} has {len(others)} tensor(s) that are not plain LoRA factors, e.g. {others[0]}; "
                            "this tool handles kohya LoRA/LoCon files only")
    return modules, metadata


# --------------------------------------------------------------------------------------------------
# writing


def precision_dtype(name: str | None) -> torch.dtype | None:
    """kohya's precision names (float/fp16/bf16) -> torch dtype; None stays None."""
    if name is None:
        return None
    from library.models.loading import SAVE_DTYPES

    return SAVE_DTYPES[name]


def refuse_existing(path: str | os.PathLike) -> None:
    """Outputs are never overwritten: a merge or resize over its own input would destroy the input."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists; choose a new output path (nothing was written)")


def modules_state_dict(modules: dict[str, LoRAFactors], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya's file layout: down, up and a 0-dim alpha per module (alpha = rank where none was given)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        out[name + DOWN_SUFFIX] = module.down.detach().to("cpu", dtype or module.down.dtype).contiguous()
        out[name + UP_SUFFIX] = module.up.detach().to("cpu", dtype or module.up.dtype).contiguous()
        out[name + ALPHA_SUFFIX] = torch.tensor(module.effective_alpha, dtype=dtype or torch.float32)
    return out


def save_lora_file(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None) -> None:
    """kohya's network file: ``.safetensors`` (with metadata and the sshs_* hashes A1111 extensions read,
    written atomically; stale sshs_* values are replaced) or ``.pt``/``.ckpt`` (torch.save, no metadata)."""
    from library.io import atomic_save_safetensors, atomic_torch_save

    if Path(path).suffix.lower() != ".safetensors":
        atomic_torch_save(state_dict, path)
        return
    metadata = {k: str(v) for k, v in (metadata or {}).items() if not k.startswith("sshs_")}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(state_dict, metadata)
    atomic_save_safetensors(state_dict, path, metadata)


def common_value(values: list[float] | list[int]) -> str:
    """kohya's ss_network_dim / ss_network_alpha: the one value all modules share, else "Dynamic"."""
    distinct = sorted(set(values))
    if len(distinct) != 1:
        return "Dynamic"
    value = distinct[0]
    return str(int(value)) if isinstance(value, int) else str(float(value))


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
