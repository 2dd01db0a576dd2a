"""Frozen base weights stored as float8_e4m3fn and upcast one layer at a time (kohya's --fp8_base/--fp8_base_unet).

kohya casts the whole frozen U-Net (and text encoders) to float8 and relies on CUDA autocast to upcast each
op's operands. Here every frozen ``nn.Linear``/``nn.Conv2d`` keeps its weight Parameter in float8 (same
state-dict key, half the bytes of bf16) and becomes a small subclass that upcasts it inside its own forward:

- ``layer.weight`` reads as the upcast copy in the dtype the layer had before (bf16/fp16), so code that reads
  the base weight (DoRA's norm, LyCORIS's rebuilt weights, kohya's pooled projection) gets a usable tensor;
  float8 tensors support almost no arithmetic ("Promotion for Float8 Types is not supported").
- the forward saves the float8 Parameter, not the upcast copy, for backward, and upcasts again there: the
  gradient reaching a LoRA upstream never holds more than one layer's upcast copy alive.
- ``isinstance(layer, nn.Linear)`` stays true, forward hooks stay (networks.lora attaches by forward hooks;
  LyCORIS picks layers by isinstance and wraps ``layer.forward``), and ``.to(dtype)`` keeps the storage float8.
  A LyCORIS module attached before the conversion (kohya's order) calls the forward it captured, nn.Linear's,
  which reads the upcast ``weight``: correct, but there autograd keeps that layer's upcast copy until backward
  (as under kohya's autocast), unless --gradient_checkpointing recomputes the block.

Biases, norms and embeddings stay in the compute dtype: they are a few percent of the bytes, and kohya too keeps
the text encoders' embeddings out of float8 (``nn.Embedding`` has no float8 kernels). diffusers'
``enable_layerwise_casting`` was not used: it swaps ``param.data`` only during the layer's forward, so a forward
hook or a DoRA module reading the weight after it sees float8, and autograd keeps each upcast copy until backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def float8_dtype() -> torch.dtype | None:
    """torch.float8_e4m3fn, or None on a torch build without it (looked up at call time)."""
    return getattr(torch, "float8_e4m3fn", None)


def fp8_unavailable_reason() -> str | None:
    """Why this torch cannot store weights in float8_e4m3fn, or None when it can (a cast round trip works)."""
    dtype = float8_dtype()
    if dtype is None:
        return f"this torch build ({torch.__version__}) has no torch.float8_e4m3fn"
    try:
        torch.ones(2).to(dtype).to(torch.bfloat16)
    except (RuntimeError, TypeError) as error:
        return f"this torch build ({torch.__version__}) cannot cast to float8_e4m3fn ({error})"
    return None


class _UpcastLinear(torch.autograd.Function):
    """F.linear with a float8 weight: upcast for the product, and again in backward (only the float8 is saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stored: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(stored)
        ctx.dtype = dtype
        return F.linear(x, stored.to(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (stored,) = ctx.saved_tensors
        weight = stored.to(ctx.dtype)
        return grad.to(weight.dtype) @ weight, None, None, None


class _UpcastConv2d(torch.autograd.Function):
    """F.conv2d with a float8 weight, saving only the float8 weight and the input's shape for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stored: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                stride: Any, padding: Any, dilation: Any, groups: int) -> torch.Tensor:
        ctx.save_for_backward(stored)
        ctx.dtype, ctx.input_shape, ctx.conv = dtype, x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, stored.to(dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (stored,) = ctx.saved_tensors
        weight = stored.to(ctx.dtype)
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad.to(weight.dtype), *ctx.conv)
        return (grad_input,) + (None,) * 7


class Float8Stored:
    """The mixin of the float8 layers: ``weight`` reads upcast, ``stored_weight`` is the float8 Parameter."""

    compute_dtype: torch.dtype
    _parameters: dict[str, Any]

    @property
    def weight(self) -> torch.Tensor:
        return self._parameters["weight"].to(self.compute_dtype)

    @property
    def stored_weight(self) -> nn.Parameter:
        return self._parameters["weight"]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """Device moves apply as usual; a dtype cast (``.to(torch.float16)``, DeepSpeed's ``.half()``) becomes the
        compute dtype while the storage stays float8 (float8 values are exact in fp16/bf16/fp32: no loss)."""
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        stored, fp8 = self._parameters["weight"], float8_dtype()
        if stored.dtype != fp8:
            self._parameters["weight"] = stored = nn.Parameter(stored.detach().to(fp8), requires_grad=False)
        cast = fn(torch.empty(0, dtype=self.compute_dtype, device=stored.device)).dtype
        if cast in COMPUTE_DTYPES:
            self.compute_dtype = cast
        return result


class Float8StoredLinear(Float8Stored, nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in float8 (not named Fp8Linear: LyCORIS reserves that name
    for its scaled-fp8 layers)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _UpcastLinear.apply(input, self._parameters["weight"], self.bias, self.compute_dtype)


class Float8StoredConv2d(Float8Stored, nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is stored in float8."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(input)  # padded by F.pad or 'same': nn.Conv2d's path on the upcast weight
        return _UpcastConv2d.apply(input, self._parameters["weight"], self.bias, self.compute_dtype, self.stride,
                                   self.padding, self.dilation, self.groups)


_FLOAT8_CLASS: dict[type, type] = {nn.Linear: Float8StoredLinear, nn.Conv2d: Float8StoredConv2d}


@dataclass(frozen=True)
class Float8Storage:
    """What `store_frozen_weights_in_fp8` converted: layer count and the weights' bytes before and after."""

    layers: int
    bytes_before: int
    bytes_after: int


def store_frozen_weights_in_fp8(root: nn.Module) -> Float8Storage:
    """Store the weight of every frozen ``nn.Linear``/``nn.Conv2d`` under ``root`` in float8_e4m3fn, in place.

    A layer with a trainable parameter (e.g. a fully trained layer) is left as it is, and so are subclasses of
    Linear/Conv2d (their forward may differ). Call it after anything that writes the base weights (kohya's
    --base_weights merge): writes into ``layer.weight`` afterwards land in a temporary copy.
    """
    fp8 = float8_dtype()
    if fp8 is None:
        raise RuntimeError(fp8_unavailable_reason())
    layers = before = after = 0
    for module in list(root.modules()):
        float8_class = _FLOAT8_CLASS.get(type(module))
        if float8_class is None or any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        weight = module._parameters["weight"]
        if weight is None or weight.dtype not in COMPUTE_DTYPES:
            continue
        stored = nn.Parameter(weight.detach().to(fp8), requires_grad=False)
        module.__class__ = float8_class
        module.compute_dtype = weight.dtype
        module._parameters["weight"] = stored
        layers += 1
        before += weight.numel() * weight.element_size()
        after += stored.numel() * stored.element_size()
    return Float8Storage(layers=layers, bytes_before=before, bytes_after=after)


def float8_parameter_names(root: nn.Module) -> list[str]:
    """The names of ``root``'s float8-stored parameters: DDP must leave them out of its start-up broadcast (gloo
    has no float8; every rank loaded the same frozen base, so there is nothing to sync)."""
    return [name for name, param in root.named_parameters() if param.dtype == float8_dtype()]


@dataclass(frozen=True)
class Fp8BaseOptions:
    """--fp8_base: U-Net and text encoders in float8; --fp8_base_unet: the U-Net only (kohya's meaning)."""

    unet: bool = False
    text_encoders: bool = False


def store_base_model_in_fp8(*, unet: nn.Module, text_encoders: list[nn.Module], options: Fp8BaseOptions) -> str | None:
    """Apply ``options`` to a loaded model's frozen parts; returns the line to print (None when off)."""
    if not options.unet:
        return None
    parts = [("U-Net", store_frozen_weights_in_fp8(unet))]
    if options.text_encoders:
        parts += [(f"text encoder {i + 1}" if len(text_encoders) > 1 else "text encoder",
                   store_frozen_weights_in_fp8(te)) for i, te in enumerate(text_encoders)]
    described = ", ".join(f"{name} {s.layers} layers {s.bytes_before / 2**20:.1f} -> {s.bytes_after / 2**20:.1f} MiB"
                          for name, s in parts)
    return f"fp8 base weights (float8_e4m3fn, upcast per layer): {described}"
