"""ControlNet conditioning: filters that compute a control image from a target image, and the control-fidelity
metric that checks whether a generated image follows its control image.

A filter is a small frozen dataclass (:class:`ConditioningFilter` is the protocol it satisfies)::

    cond = make_filter("canny", ["low=100", "high=200"])   # --conditioning_filter canny --conditioning_filter_args ...
    control = cond(cropped_target)                          # PIL RGB -> PIL RGB, same size
    control_fidelity(cond, generated, control)              # 1.0 = the generated image has exactly those edges

Why filters run on the *cropped* target: the training dataset (``library.data.datasets``) applies the filter after
the bucket resize/crop/flip, so the control image is pixel-aligned with what the model sees, and no second
folder of pre-computed control images has to be kept in sync (``tools/canny.py`` writes such a folder when
one is wanted, with the same filter, so both routes give identical maps). Adding a filter is one dataclass
with ``name``, ``is_edge_map``, its typed fields and ``__call__``, plus one entry in :data:`FILTERS`;
:func:`make_filter` parses ``key=value`` options from the dataclass field types.

Control fidelity (how closely a generated image follows its condition): the condition is re-extracted from
the generated image with the same filter and compared with the condition it was generated from.

* Edge maps (``is_edge_map``, e.g. canny): :func:`edge_f1`, the boundary F1 score of edge detection benchmarks
  (BSDS): a predicted edge pixel counts as correct when a reference edge lies within ``tolerance_px``
  (Chebyshev distance), and vice versa for recall. Exact pixel overlap would punish a one-pixel shift, which
  Canny produces from a half-pixel change in where a gradient peaks.
* Other filters (e.g. blur): ``1 - mean(|a - b|) / 255`` over all pixels and RGB channels, so 1.0 is identical
  and 0.0 is black versus white everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image, ImageFilter

EDGE_THRESHOLD = 127  # a pixel of an edge-map image with gray value above this is an edge


@runtime_checkable
class ConditioningFilter(Protocol):
    """Computes a ControlNet control image from a (cropped) target image."""

    name: ClassVar[str]
    is_edge_map: ClassVar[bool]  # True: the output is white edges on black, compared with edge_f1

    def __call__(self, image: Image.Image) -> Image.Image:
        """RGB image -> RGB control image of the same size."""
        ...

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ConditioningFilter:
        """Build the filter from option values (strings are parsed with the field types)."""
        ...


# --------------------------------------------------------------------------------------------------
# Option parsing, shared by every filter
# --------------------------------------------------------------------------------------------------


_TYPE_NAMES = types.MappingProxyType({int: "an integer", float: "a number", bool: "a boolean (true/false)",
                                      str: "a string"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def accepted_keys(cls: type) -> str:
    """``low (int, default 100), high (int, default 200)``: what an error message lists."""
    types_ = _field_types(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return ", ".join(f"{key} ({typ.__name__}, default {defaults[key]!r})" for key, typ in types_.items())


def _convert(value: Any, typ: type) -> Any:
    """A string from the command line parsed as ``typ``; a typed value (from a TOML file) checked."""
    if isinstance(value, str):
        text = value.strip()
        if typ is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(f"{value!r} is not {_TYPE_NAMES[bool]}")
        if typ is str:
            return value
        try:
            return typ(text)
        except ValueError:  # int("1.5"), float("x")
            raise ValueError(f"{value!r} is not {_TYPE_NAMES.get(typ, typ.__name__)}") from None
    if typ is bool and isinstance(value, bool):
        return value
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{value!r} is not {_TYPE_NAMES.get(typ, typ.__name__)}")


class _OptionsMixin:
    """``from_options`` for a dataclass filter: parse each option with its field's type, reject unknown keys."""

    name: ClassVar[str]

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Any:
        types_ = _field_types(cls)
        unknown = sorted(set(options) - set(types_))
        if unknown:
            raise ValueError(f"{cls.name} filter: unknown option(s) {', '.join(unknown)}; "
                             f"accepted: {accepted_keys(cls)}")
        values = {}
        for key, value in options.items():
            try:
                values[key] = _convert(value, types_[key])
            except ValueError as error:
                raise ValueError(f"{cls.name} filter: bad value for {key}: {error}; "
                                 f"accepted: {accepted_keys(cls)}") from None
        return cls(**values)


# --------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------


def _opencv() -> Any:
    try:
        import cv2
    except ImportError as error:
        raise ImportError("the canny filter and the edge metric need OpenCV: "
                          "pip install opencv-python-headless") from error
    return cv2


@dataclasses.dataclass(frozen=True)
class CannyFilter(_OptionsMixin):
    """Canny edges of the grayscale image as white (255) on black, in 3 channels like the original ControlNet's
    canny maps (lllyasviel/ControlNet ``HWC3(cv2.Canny(img, low, high))``)."""

    low: int = 100
    high: int = 200
    name: ClassVar[str] = "canny"
    is_edge_map: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"canny filter: need 0 <= low <= high, got low={self.low} high={self.high}")

    def __call__(self, image: Image.Image) -> Image.Image:
        cv2 = _opencv()
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        edges = cv2.Canny(gray, self.low, self.high)
        return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), mode="RGB")


@dataclasses.dataclass(frozen=True)
class BlurFilter(_OptionsMixin):
    """A Gaussian blur of ``radius`` pixels (standard deviation): the condition of a super-resolution or
    tile ControlNet, which learns to restore the detail the blur removed."""

    radius: float = 4.0
    name: ClassVar[str] = "blur"
    is_edge_map: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.radius < math.inf:
            raise ValueError(f"blur filter: radius must be a finite number >= 0, got {self.radius}")

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB").filter(ImageFilter.GaussianBlur(self.radius))


FILTERS: Mapping[str, type[ConditioningFilter]] = types.MappingProxyType({
    CannyFilter.name: CannyFilter,
    BlurFilter.name: BlurFilter,
})


def parse_filter_args(items: Sequence[str]) -> dict[str, str]:
    """``["low=100", "high=200"]`` -> ``{"low": "100", "high": "200"}``; a missing ``=`` or a repeated key
    is an error (the last one silently winning would hide a typo)."""
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"option {item!r} is not KEY=VALUE")
        if key in parsed:
            raise ValueError(f"option {key} is given twice")
        parsed[key] = value
    return parsed


def make_filter(name: str, items: Sequence[str] = ()) -> ConditioningFilter:
    """The filter ``name`` with ``KEY=VALUE`` options (``--conditioning_filter_args low=50 high=150``).

    Raises ValueError naming the accepted filters, or the filter's accepted options, for anything else.
    """
    if name not in FILTERS:
        raise ValueError(f"unknown conditioning filter {name!r}; choose one of {', '.join(sorted(FILTERS))}")
    cls = FILTERS[name]
    try:
        options = parse_filter_args(items)
    except ValueError as error:
        raise ValueError(f"{name} filter: {error}; accepted: {accepted_keys(cls)}") from None
    return cls.from_options(options)


# --------------------------------------------------------------------------------------------------
# Control fidelity
# --------------------------------------------------------------------------------------------------


def _dilate(edges: np.ndarray, tolerance_px: int) -> np.ndarray:
    """Every pixel within Chebyshev distance ``tolerance_px`` of an edge pixel."""
    if tolerance_px == 0:
        return edges
    cv2 = _opencv()
    kernel = np.ones((2 * tolerance_px + 1, 2 * tolerance_px + 1), dtype=np.uint8)
    return cv2.dilate(edges.astype(np.uint8), kernel).astype(bool)


def edge_f1(predicted_edges: np.ndarray, reference_edges: np.ndarray, tolerance_px: int = 1) -> float:
    """Boundary F1 of two boolean HxW edge maps, matching edges up to ``tolerance_px`` apart (Chebyshev).

    precision = predicted edge pixels with a reference edge within the tolerance / predicted edge pixels;
    recall = reference edge pixels with a predicted edge within the tolerance / reference edge pixels;
    F1 = 2PR / (P + R). Both maps empty -> 1.0 (nothing to draw, nothing drawn); exactly one empty -> 0.0.
    """
    predicted = np.asarray(predicted_edges).astype(bool)
    reference = np.asarray(reference_edges).astype(bool)
    if predicted.ndim != 2 or predicted.shape != reference.shape:
        raise ValueError(f"edge maps must be two HxW arrays of one shape, got {predicted.shape} and {reference.shape}")
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    n_predicted, n_reference = int(predicted.sum()), int(reference.sum())
    if n_predicted == 0 and n_reference == 0:
        return 1.0
    if n_predicted == 0 or n_reference == 0:
        return 0.0
    precision = np.count_nonzero(predicted & _dilate(reference, tolerance_px)) / n_predicted
    recall = np.count_nonzero(reference & _dilate(predicted, tolerance_px)) / n_reference
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def edges_of(image: Image.Image) -> np.ndarray:
    """An edge-map image (white on black, any mode) -> boolean HxW."""
    return np.asarray(image.convert("L")) > EDGE_THRESHOLD


def _resize_edges(edges: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean edge map resized so that an output pixel is an edge when any edge falls in its footprint
    (a box average above 0): thin edges survive a downscale instead of fading under a threshold."""
    mask = Image.fromarray(edges.astype(np.uint8) * 255, mode="L")
    return np.asarray(mask.resize(size, Image.Resampling.BOX)) > 0


def control_fidelity(conditioning_filter: ConditioningFilter, generated_image: Image.Image,
                     condition_image: Image.Image, tolerance_px: int = 1) -> float:
    """How well ``generated_image`` follows ``condition_image``, in [0, 1]: the condition is re-extracted from
    the generated image with the same filter and compared (edge maps: :func:`edge_f1` with ``tolerance_px``;
    other filters: 1 - mean absolute error / 255). A condition of another size is resized to the generated
    image's size first (edges: any edge in a pixel's footprint; others: LANCZOS)."""
    extracted = conditioning_filter(generated_image.convert("RGB"))
    size = extracted.size
    if conditioning_filter.is_edge_map:
        reference = edges_of(condition_image)
        if condition_image.size != size:
            reference = _resize_edges(reference, size)
        return edge_f1(edges_of(extracted), reference, tolerance_px)
    condition = condition_image.convert("RGB")
    if condition.size != size:
        condition = condition.resize(size, Image.Resampling.LANCZOS)
    difference = np.abs(np.asarray(extracted, dtype=np.float64) - np.asarray(condition, dtype=np.float64))
    return float(1.0 - difference.mean() / 255.0)


# --------------------------------------------------------------------------------------------------
# Conditioning dropout
# --------------------------------------------------------------------------------------------------


def apply_conditioning_dropout(conditioning: torch.Tensor, rate: float, generator: torch.Generator | None = None,
                               fill: float = 0.0) -> torch.Tensor:
    """Replace each sample's conditioning (B, C, H, W) by a constant ``fill`` (default all zeros) with
    probability ``rate``, so the ControlNet also learns to add nothing when given no control.

    Mind the range: 0.0 is mid-gray for a condition in [-1, 1] (``library.data.images.to_tensor``); pass
    ``fill=-1.0`` for a black control image there. A new tensor is returned (the input when ``rate`` is 0);
    the draws use ``generator`` (on the CPU) so a seeded run drops the same samples.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"conditioning dropout rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return conditioning
    drop = torch.rand(conditioning.shape[0], generator=generator) < rate
    drop = drop.to(conditioning.device).view(-1, *([1] * (conditioning.dim() - 1)))
    return torch.where(drop, torch.full_like(conditioning, fill), conditioning)
