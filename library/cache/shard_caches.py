"""The latent and text-encoder caches as a shard writer reads them: one record's tensors, ready for
``library.data.shard_format.encode_sample``, and what they were made with.

The caches are filled exactly as training fills them (``dataset_caching.fill_latent_caches`` /
``fill_text_cache``: once per image / prompt, each rank its share); the writer then copies each record's
entry into its shard sample, so a streamed run finds the same tensors the npz / text cache hold and never
re-encodes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from library.cache.dataset_caching import LatentCacheLocation, cached_prompt, latent_cache_status
from library.cache.latent_files import CacheFileError
from library.cache.text_encoder_files import TextEncoderOutputCache, module_fingerprint
from library.data.records import DatasetIndex, ImageRecord
from library.data.shard_format import LATENT_TENSORS, latent_provenance, text_provenance


def latent_tensors(location: LatentCacheLocation, record: ImageRecord) -> dict[str, torch.Tensor]:
    """The record's npz entry as tensors (the keys of ``shard_format.LATENT_TENSORS`` it holds)."""
    path = location.path_for(record)
    try:
        with np.load(path) as npz:
            return {name: torch.from_numpy(np.array(npz[name])) for name in LATENT_TENSORS if name in npz}
    except (OSError, ValueError, KeyError) as error:
        raise CacheFileError(f"{path}: cannot read the cached latents of {record.image_path} ({error})") from error


def text_tensors(cache: TextEncoderOutputCache, record: ImageRecord) -> tuple[dict[str, torch.Tensor], str]:
    """(``{"hidden_states", "pooled"}`` as the text cache stores them, the prompt they encode)."""
    prompt = cached_prompt(record)
    hidden, pooled = cache.get(prompt)
    tensors = {"hidden_states": hidden}
    if pooled is not None:
        tensors["pooled"] = pooled
    return tensors, prompt


def unusable_latents(index: DatasetIndex, location: LatentCacheLocation) -> list[str]:
    """``"npz: reason"`` for every image whose cache entry training would not use (missing or stale)."""
    return [f"{path}: {status.reason}" for _, path, status in latent_cache_status(index, location)
            if not status.is_valid]


def _uniform(values: Sequence[Any]) -> Any:
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "mixed"


def shard_latent_provenance(records: Sequence[ImageRecord], vae: nn.Module, family: str) -> dict[str, Any]:
    """index.json's ``latents``: the VAE's weight fingerprint, the family, and the subsets' flip / alpha /
    resize settings (True only when every sample carries the flipped latent / the mask)."""
    channels = int(getattr(getattr(vae, "config", None), "latent_channels", 4))
    return latent_provenance(family=family, vae=module_fingerprint(vae),
                             flip_aug=all(r.subset.flip_aug for r in records),
                             alpha_mask=all(r.subset.alpha_mask for r in records),
                             resize_interpolation=_uniform([r.subset.resize_interpolation for r in records]),
                             latent_channels=channels)


def shard_text_provenance(cache: TextEncoderOutputCache) -> dict[str, Any]:
    """index.json's ``text_encoder_outputs``: the text cache's identity (tokenizers, max_token_length,
    clip_skip, encoder weights) and storage dtype."""
    return text_provenance(identity=cache.identity, storage_dtype=cache.storage_dtype.name)
