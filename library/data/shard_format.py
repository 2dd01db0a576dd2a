"""The streamed-shard format: what one webdataset sample holds and what ``index.json`` says about the shards.

``tools/make_webdataset.py`` writes it and ``library.data.shard_stream`` reads it, both only through this
module, so the two cannot drift apart. One sample per image (never per repeat):

* ``__key__``: ``s%09d``, the global sample number (no dots: webdataset splits a member name at its first dot);
* ``<ext>`` (``jpg``, ``png``, ``webp``, ...): the ORIGINAL image file bytes, never re-encoded, under its
  lower-cased extension, so training decodes exactly what a folder dataset would;
* ``json``: ``{"image_key", "caption", "tags", "original_size": [w, h], "bucket": [w, h]}``; image_key is the
  kohya metadata key (fine-tuning) or the path relative to the train_data_dir (DreamBooth folders);
* optional ``latents.safetensors``: the tensors of the npz latent cache for that image (``latents`` unscaled
  float32, ``latents_flipped`` with flip_aug, ``original_size``, ``crop_ltrb``, ``resized_size``,
  ``bucket_size``, ``alpha_mask``), so a streamed run never re-encodes what the shard carries;
* optional ``te.safetensors``: the text-encoder outputs of the sample's prompt as the text cache stores them
  (``hidden_states`` (L, D), ``pooled`` (P,) for SDXL), with the prompt they encode in the safetensors metadata.

``index.json`` beside the shards lets a run plan its steps (sample count, bucket histogram, per shard) without
opening any shard, and records what the cached tensors were made with (``latents`` / ``text_encoder_outputs``)
so a reader can refuse a run whose VAE, text encoders or settings differ (:func:`provenance_mismatches`).
"""

from __future__ import annotations

import io
import json
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.data.buckets import Size
from library.data.metadata import IMAGE_EXTENSIONS

if TYPE_CHECKING:  # torch and safetensors load on first use
    import torch

    from library.data.datasets import CachedLatents

FORMAT = "sdtrain-webdataset/1"
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"
META_FIELD = "json"
LATENTS_FIELD = "latents.safetensors"
TE_FIELD = "te.safetensors"
IMAGE_FIELDS: tuple[str, ...] = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
LATENT_TENSORS = ("latents", "latents_flipped", "original_size", "crop_ltrb", "resized_size", "bucket_size",
                  "alpha_mask")
TE_TENSORS = ("hidden_states", "pooled")
TE_PROMPT_METADATA = "prompt"


class ShardFormatError(ValueError):
    """An index.json or a sample that does not follow this format; the message names the file or sample."""


def sample_key(number: int) -> str:
    """The ``__key__`` of the global sample ``number``: ``s%09d``."""
    return f"s{int(number):09d}"


def bucket_name(size: Size) -> str:
    """``(w, h)`` -> ``"WxH"``, the key of the bucket histograms."""
    return f"{int(size[0])}x{int(size[1])}"


def parse_bucket_name(name: str) -> Size:
    """``"WxH"`` -> ``(w, h)``."""
    try:
        width, height = name.split("x")
        return int(width), int(height)
    except ValueError:
        raise ShardFormatError(f"bucket name {name!r} is not 'WIDTHxHEIGHT'") from None


# --------------------------------------------------------------------------------------------------
# index.json
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketSettings:
    """The dataset's bucket settings the shards were bucketed with (a reader compares them with its own)."""

    resolution: Size
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool

    def to_json(self) -> dict[str, Any]:
        return {"resolution": list(self.resolution), "enable_bucket": self.enable_bucket,
                "min_bucket_reso": self.min_bucket_reso, "max_bucket_reso": self.max_bucket_reso,
                "bucket_reso_steps": self.bucket_reso_steps, "bucket_no_upscale": self.bucket_no_upscale}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "BucketSettings":
        width, height = data["resolution"]
        return cls(resolution=(int(width), int(height)), enable_bucket=bool(data["enable_bucket"]),
                   min_bucket_reso=int(data["min_bucket_reso"]), max_bucket_reso=int(data["max_bucket_reso"]),
                   bucket_reso_steps=int(data["bucket_reso_steps"]), bucket_no_upscale=bool(data["bucket_no_upscale"]))


@dataclass(frozen=True)
class ShardEntry:
    """One shard file: its name (relative to the index), sample count, size in bytes and bucket histogram."""

    name: str
    samples: int
    bytes: int
    buckets: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "buckets": dict(self.buckets)}


@dataclass(frozen=True)
class ShardIndex:
    """The parsed ``index.json``. ``latents`` / ``text_encoder_outputs``: None when the shards carry none, else
    what they were made with (see :func:`latent_provenance` / :func:`text_provenance`)."""

    samples: int
    buckets: dict[str, int]
    bucket_settings: BucketSettings
    shards: tuple[ShardEntry, ...]
    latents: dict[str, Any] | None = None
    text_encoder_outputs: dict[str, Any] | None = None
    format: str = FORMAT
    location: str | None = field(default=None, compare=False)  # where it was read from (not written)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "samples": self.samples, "buckets": dict(self.buckets),
                "bucket_settings": self.bucket_settings.to_json(),
                "shards": [shard.to_json() for shard in self.shards],
                "latents": self.latents, "text_encoder_outputs": self.text_encoder_outputs}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], location: str | None = None) -> "ShardIndex":
        """Parse and check the counts (shards add up to the totals); :class:`ShardFormatError` otherwise."""
        where = location or INDEX_NAME
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ShardFormatError(f"{where}: format {found!r} is not {FORMAT!r}; write the shards with "
                                   "tools/make_webdataset.py")
        try:
            shards = tuple(ShardEntry(name=str(s["name"]), samples=int(s["samples"]), bytes=int(s["bytes"]),
                                      buckets={str(k): int(v) for k, v in s["buckets"].items()})
                           for s in data["shards"])
            index = cls(samples=int(data["samples"]), buckets={str(k): int(v) for k, v in data["buckets"].items()},
                        bucket_settings=BucketSettings.from_json(data["bucket_settings"]), shards=shards,
                        latents=data.get("latents"), text_encoder_outputs=data.get("text_encoder_outputs"),
                        format=FORMAT, location=location)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ShardFormatError(f"{where}: malformed index ({type(error).__name__}: {error})") from None
        problem = index.inconsistency()
        if problem:
            raise ShardFormatError(f"{where}: {problem}; write the shards again with tools/make_webdataset.py")
        return index

    def inconsistency(self) -> str | None:
        """Why the totals do not match the shards (None when they do)."""
        if sum(s.samples for s in self.shards) != self.samples:
            return f"the shards hold {sum(s.samples for s in self.shards)} samples but samples is {self.samples}"
        if sum(self.buckets.values()) != self.samples:
            return f"the bucket histogram counts {sum(self.buckets.values())} samples, not {self.samples}"
        summed: dict[str, int] = {}
        for shard in self.shards:
            if sum(shard.buckets.values()) != shard.samples:
                return f"{shard.name}: bucket histogram does not add up to its {shard.samples} samples"
            for name, count in shard.buckets.items():
                summed[name] = summed.get(name, 0) + count
        if summed != {k: v for k, v in self.buckets.items() if v}:
            return "the shards' bucket histograms do not add up to the total one"
        return None

    def shard_paths(self, directory: str | os.PathLike | None = None) -> list[str]:
        """The shard locations, resolved against ``directory`` (default: the folder the index came from)."""
        base = directory if directory is not None else (_index_base(self.location) if self.location else None)
        if base is None:
            return [s.name for s in self.shards]
        base = str(base)
        return [f"{base.rstrip('/')}/{s.name}" if "://" in base else str(Path(base) / s.name) for s in self.shards]


def _index_base(location: str) -> str:
    return location.rsplit("/", 1)[0] if "://" in location else str(Path(location).parent)


def index_location(path_or_url_dir: str | os.PathLike) -> str:
    """Where the index.json of ``path_or_url_dir`` is: the file itself, ``DIR/index.json`` for a folder, or
    the index beside a shard pattern/file (``DIR/shard-{000000..000009}.tar`` -> ``DIR/index.json``).
    http(s)/file URLs work the same way; a ``pipe:`` command has no place to look: pass the index's own path."""
    text = os.fspath(path_or_url_dir)
    if text.startswith("pipe:"):
        raise ShardFormatError(f"{text!r}: cannot find index.json beside a pipe: command; copy index.json to a "
                               "local folder and pass that folder (or the file)")
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        if text.endswith(".json"):
            return text
        if text.endswith(".tar") or "{" in text.rsplit("/", 1)[-1]:
            return f"{text.rsplit('/', 1)[0]}/{INDEX_NAME}"
        return f"{text.rstrip('/')}/{INDEX_NAME}"
    path = Path(text)
    if path.suffix == ".json":
        return str(path)
    if path.is_dir():
        return str(path / INDEX_NAME)
    return str(path.parent / INDEX_NAME)  # a shard file or a brace pattern


def read_index(path_or_url_dir: str | os.PathLike) -> ShardIndex:
    """The :class:`ShardIndex` of a shard folder, an index.json, a shard pattern/file beside it, or an http(s)
    URL of any of those (see :func:`index_location`). Raises :class:`ShardFormatError` naming the place."""
    location = index_location(path_or_url_dir)
    try:
        if "://" in location:
            with urllib.request.urlopen(location, timeout=60) as response:  # noqa: S310 (user-given URL)
                text = response.read().decode("utf-8")
        else:
            text = Path(location).read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        raise ShardFormatError(f"{location}: cannot read the shard index ({error}); write the shards with "
                               "tools/make_webdataset.py, which puts index.json beside them") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ShardFormatError(f"{location}: not valid JSON ({error})") from None
    return ShardIndex.from_json(data, location=location)


def write_index(index: ShardIndex, directory: str | os.PathLike) -> Path:
    """Write ``directory/index.json`` atomically; returns its path."""
    from library.io import atomic_write_file

    path = Path(directory) / INDEX_NAME
    text = json.dumps(index.to_json(), indent=1, sort_keys=False) + "\n"
    atomic_write_file(path, lambda handle: handle.write(text.encode("utf-8")), fsync=True)
    return path


# --------------------------------------------------------------------------------------------------
# What the cached tensors were made with
# --------------------------------------------------------------------------------------------------


def latent_provenance(*, family: str, vae: str, flip_aug: bool, alpha_mask: bool,
                      resize_interpolation: str | None, latent_channels: int = 4) -> dict[str, Any]:
    """The index's ``latents`` entry. ``vae``: a fingerprint of the VAE weights
    (``library.cache.text_encoder_files.module_fingerprint``) or another id both sides compute alike."""
    return {"family": family, "vae": vae, "flip_aug": bool(flip_aug), "alpha_mask": bool(alpha_mask),
            "resize_interpolation": resize_interpolation, "latent_channels": int(latent_channels),
            "scaled": False, "crop": "centre"}


def text_provenance(*, identity: str, storage_dtype: str) -> dict[str, Any]:
    """The index's ``text_encoder_outputs`` entry: the text cache's identity string
    (``text_encoder_files.text_encoder_cache_identity``) and the stored dtype."""
    return {"identity": identity, "storage_dtype": storage_dtype}


def provenance_mismatches(recorded: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> list[str]:
    """``"key: shards have X, this run Y"`` for every key of ``expected`` that ``recorded`` differs in (a reader
    uses the shards' tensors only when this is empty); one line saying so when the shards carry none."""
    if recorded is None:
        return ["the shards carry no such cached tensors"]
    return [f"{key}: shards have {recorded.get(key)!r}, this run {value!r}" for key, value in expected.items()
            if recorded.get(key) != value]


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSample:
    """One decoded sample. Sizes are (w, h); ``latents`` / ``te`` hold the tensors named in
    ``LATENT_TENSORS`` / ``TE_TENSORS`` (None when the shard carries none); ``meta`` is the whole json."""

    key: str
    image: bytes
    ext: str
    image_key: str
    caption: str | None
    tags: str | None
    original_size: Size
    bucket: Size
    meta: dict[str, Any]
    latents: dict[str, "torch.Tensor"] | None = None
    te: dict[str, "torch.Tensor"] | None = None
    te_prompt: str | None = None  # the prompt ``te`` encodes

    @property
    def url(self) -> str | None:
        """The shard this sample came from, when webdataset said so (``__url__``)."""
        return self.meta.get("__url__")


def _safetensors_bytes(tensors: Mapping[str, "torch.Tensor"], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, metadata=metadata)


def _safetensors_load(data: bytes, where: str) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    from library.io import read_safetensors_header

    try:
        _, header = read_safetensors_header(io.BytesIO(data))
        return load(bytes(data)), dict(header.get("__metadata__") or {})
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:
        raise ShardFormatError(f"{where}: unreadable safetensors ({error})") from None


def encode_sample(*, number: int, image: bytes, ext: str, image_key: str, caption: str | None, tags: str | None,
                  original_size: Size, bucket: Size, latents: Mapping[str, "torch.Tensor"] | None = None,
                  te: Mapping[str, "torch.Tensor"] | None = None, te_prompt: str | None = None
                  ) -> dict[str, Any]:
    """The webdataset sample (``__key__`` str, every other field bytes) for ``ShardWriter.write``."""
    field_name = ext.lower().lstrip(".")
    if field_name not in IMAGE_FIELDS:
        raise ShardFormatError(f"{image_key}: image extension {ext!r} is not one of {', '.join(IMAGE_FIELDS)}")
    meta = {"image_key": image_key, "caption": caption, "tags": tags,
            "original_size": [int(original_size[0]), int(original_size[1])],
            "bucket": [int(bucket[0]), int(bucket[1])]}
    sample: dict[str, Any] = {"__key__": sample_key(number), field_name: bytes(image),
                              META_FIELD: json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    if latents is not None:
        unknown = set(latents) - set(LATENT_TENSORS)
        if unknown or "latents" not in latents:
            raise ShardFormatError(f"{image_key}: latent tensors must include 'latents' and be among "
                                   f"{LATENT_TENSORS}, got {sorted(latents)}")
        sample[LATENTS_FIELD] = _safetensors_bytes(latents)
    if te is not None:
        if "hidden_states" not in te or set(te) - set(TE_TENSORS):
            raise ShardFormatError(f"{image_key}: text-encoder tensors must be {TE_TENSORS}, got {sorted(te)}")
        sample[TE_FIELD] = _safetensors_bytes(te, None if te_prompt is None else {TE_PROMPT_METADATA: te_prompt})
    return sample


def _size(value: Any, name: str, where: str) -> Size:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ShardFormatError(f"{where}: {name} must be [width, height], got {value!r}")
    return int(value[0]), int(value[1])


def decode_sample(sample: Mapping[str, Any]) -> ShardSample:
    """A raw webdataset sample (bytes per field, as ``webdataset.WebDataset(urls)`` yields it without a
    decoder; a ``json`` field already decoded to a dict is accepted too) -> :class:`ShardSample`."""
    key = str(sample.get("__key__", "?"))
    where = f"{sample.get('__url__', 'shard')} sample {key}"
    images = [name for name in IMAGE_FIELDS if name in sample]
    if len(images) != 1:
        raise ShardFormatError(f"{where}: expected one image field ({', '.join(IMAGE_FIELDS)}), found "
                               f"{images or sorted(k for k in sample if not k.startswith('__'))}")
    raw_meta = sample.get(META_FIELD)
    if raw_meta is None:
        raise ShardFormatError(f"{where}: no '{META_FIELD}' field")
    try:
        meta = dict(raw_meta) if isinstance(raw_meta, Mapping) else json.loads(bytes(raw_meta).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ShardFormatError(f"{where}: '{META_FIELD}' is not valid JSON ({error})") from None
    if not isinstance(meta.get("image_key"), str):
        raise ShardFormatError(f"{where}: json has no image_key")
    if "__url__" in sample:
        meta["__url__"] = sample["__url__"]
    latents = te = te_prompt = None
    if sample.get(LATENTS_FIELD) is not None:
        latents, _ = _safetensors_load(sample[LATENTS_FIELD], f"{where} {LATENTS_FIELD}")
    if sample.get(TE_FIELD) is not None:
        te, te_meta = _safetensors_load(sample[TE_FIELD], f"{where} {TE_FIELD}")
        te_prompt = te_meta.get(TE_PROMPT_METADATA)
    return ShardSample(key=key, image=bytes(sample[images[0]]), ext=images[0], image_key=meta["image_key"],
                       caption=meta.get("caption"), tags=meta.get("tags"),
                       original_size=_size(meta.get("original_size"), "original_size", where),
                       bucket=_size(meta.get("bucket"), "bucket", where), meta=meta,
                       latents=latents, te=te, te_prompt=te_prompt)


def shard_cached_latents(latents: Mapping[str, "torch.Tensor"], *, flipped: bool) -> "CachedLatents":
    """A sample's ``latents`` tensors -> the :class:`CachedLatents` a training Sample takes (the mirrored latent
    and crop when ``flipped``), with the same meaning as ``latent_files.load_cached_latents`` gives an npz."""
    import torch

    from library.data.datasets import CachedLatents

    name = "latents_flipped" if flipped else "latents"
    if name not in latents:
        raise ShardFormatError(f"the shard's latents have no '{name}' (write the shards with flip_aug to train "
                               "with flipped latents)")
    tensor = latents[name].float()
    original_w, original_h = (int(v) for v in latents["original_size"])
    left, top, right, _ = (int(v) for v in latents["crop_ltrb"])
    alpha = latents["alpha_mask"].float() if "alpha_mask" in latents else None
    target_h, target_w = tensor.shape[1] * 8, tensor.shape[2] * 8
    if flipped:  # mirror the crop window in the resized image, as for our npz files
        resized_w = int(latents["resized_size"][0]) if "resized_size" in latents else target_w
        left = resized_w - right
        if alpha is not None:
            alpha = torch.flip(alpha, dims=[1])
    return CachedLatents(tensor, (original_h, original_w), (top, left), (target_h, target_w), flipped, alpha)
