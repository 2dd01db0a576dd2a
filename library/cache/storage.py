"""Latent and text-encoder-output caches on disk: validated before use, constant RAM however large the dataset.

Latent cache (one ``.npz`` per image, kohya-compatible so caches made by sd-scripts are reused and vice versa)
    ``<image stem>_<WWWW>x<HHHH>_sdxl.npz`` (``_sd.npz`` for SD1/SD2) beside the image; WWWWxHHHH is the
    ORIGINAL image size, zero-padded to 4 digits. Keys read by kohya:
        latents          (C, bucket_h/8, bucket_w/8) float32, UNSCALED ``latent_dist.sample()``
                         (multiply by ``vae.config.scaling_factor`` at train time, as kohya does)
        original_size    int [w, h]
        crop_ltrb        int [left, top, right, bottom] of the crop window in the resized image
        latents_flipped  optional, the horizontally flipped crop, encoded separately
        alpha_mask       optional (bucket_h, bucket_w) float32 0..1, unflipped
    Keys we add (kohya ignores unknown keys):
        cache_format     int 1, marks a file written here
        image_file_size, image_mtime_ns   int64, ``os.stat`` of the image taken before it was read
        bucket_size, resized_size         int [w, h]
    An entry is used only if ``check_latent_cache`` says it is valid; anything else is rebuilt.

Text-encoder output cache (fixed-shape shards + a compact index; see ``TextEncoderOutputCache``)
    ``<directory>/te_<hash of identity>/`` holds ``identity.json`` and shards, each three ``.npy`` files
    written once and never modified: ``<shard>.hidden.npy`` (N, L, D), ``<shard>.pooled.npy`` (N, P, SDXL
    only) in the storage dtype (float16 by default, or float32), and ``<shard>.keys.npy`` (N, 16) uint8,
    the 16-byte BLAKE2b digest of identity + caption per row. The keys file is renamed into place last,
    so its presence commits the shard.

Deviations from kohya, and why:
    * ``crop_ltrb`` is the real crop window in the resized image. kohya stores the letterbox offset of the
      image fitted inside the bucket (axis-swapped), which is not the crop SDXL was conditioned on. For a
      kohya-made file (no ``resized_size``) we keep kohya's meaning when mirroring a flip
      (left = bucket_w - right); for ours we mirror in the resized image (left = resized_w - right).
    * Validity also checks the latent shape against the bucket, that the image is unchanged (stored
      size + mtime_ns; for kohya files, npz mtime >= image mtime) and that every latent value is finite
      (a NaN from an fp16 VAE or a bad disk would otherwise stop training at its first step as a "NaN
      loss"); kohya checks key presence only. A non-finite entry is rebuilt with one warning naming it.
    * Text-encoder outputs are keyed by the final caption text + tokenizers + max_token_length + clip_skip +
      encoder weights, not by image file, so an edited caption or a changed setting is a miss, not a
      silently wrong embedding. They are stored as float16 (kohya: float32 per image), sharded, and read
      with ``os.pread`` so nothing is held in RAM but a 24-byte index entry per caption.
    * Work is sharded across ranks before the validity check (``items[rank::world_size]``), so ranks that
      start at different times still split the work the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from library.io import atomic_write_file
from library.models.text_encoding import EncodedPrompts, PromptEncoder

LATENT_CACHE_FORMAT = 1
TE_CACHE_FORMAT = 1
VAE_DOWNSCALE = 8
NON_FINITE_REASON = "latents contain NaN or inf values"

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Latent cache
# ---------------------------------------------------------------------------------------------------------


def latent_cache_path(image_path: str | os.PathLike, image_size: tuple[int, int], is_sdxl: bool) -> Path:
    """kohya's npz name: ``<stem>_<WWWW>x<HHHH>_sdxl.npz`` / ``_sd.npz`` beside the image (original w, h).

    The size is in the name so a dataset can learn image sizes from the cache without opening images.
    """
    path = Path(image_path)
    width, height = image_size
    suffix = "_sdxl.npz" if is_sdxl else "_sd.npz"
    return path.with_name(f"{path.stem}_{int(width):04d}x{int(height):04d}{suffix}")


@dataclass(frozen=True)
class LatentJob:
    """One image to encode: where it is, how it is resized and cropped into its bucket. Sizes are (w, h).

    ``crop_left_top`` is the offset of the bucket-sized window in the image resized to ``resized_size``.
    ``flip`` also encodes the flipped image (flip_aug); ``alpha_mask`` also stores the alpha channel.
    ``cache_file`` puts the npz elsewhere than kohya's place beside the image (e.g. a per-run folder).
    """

    image_path: Path
    original_size: tuple[int, int]
    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    crop_left_top: tuple[int, int] = (0, 0)
    flip: bool = False
    alpha_mask: bool = False
    cache_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.cache_file is not None:
            object.__setattr__(self, "cache_file", Path(self.cache_file))
        bw, bh = self.bucket
        rw, rh = self.resized_size
        left, top = self.crop_left_top
        if bw % VAE_DOWNSCALE or bh % VAE_DOWNSCALE or bw <= 0 or bh <= 0:
            raise ValueError(f"{self.image_path}: bucket {self.bucket} must be positive multiples of {VAE_DOWNSCALE}")
        if left < 0 or top < 0 or left + bw > rw or top + bh > rh:
            raise ValueError(
                f"{self.image_path}: crop at (left={left}, top={top}) of size {self.bucket} does not fit in the "
                f"resized image {self.resized_size}"
            )

    @property
    def crop_ltrb(self) -> tuple[int, int, int, int]:
        left, top = self.crop_left_top
        return left, top, left + self.bucket[0], top + self.bucket[1]

    def cache_path(self, is_sdxl: bool) -> Path:
        """``cache_file`` if set, else kohya's name beside the image."""
        if self.cache_file is not None:
            return self.cache_file
        return latent_cache_path(self.image_path, self.original_size, is_sdxl)


@dataclass(frozen=True)
class CacheStatus:
    """Result of ``check_latent_cache``: ``state`` is valid / missing / stale; ``reason`` says why not valid."""

    state: Literal["valid", "missing", "stale"]
    reason: str = ""

    @property
    def is_valid(self) -> bool:
        return self.state == "valid"


@dataclass
class CachedLatents:
    """A cached latent and the SDXL size conditioning that belongs to exactly that latent. Sizes are (h, w).

    ``latents`` are unscaled (multiply by the VAE scaling factor); ``crop_top_left`` is already mirrored
    when ``flipped``; ``alpha_mask`` (H, W) is flipped with the latent.
    """

    latents: torch.Tensor
    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size_hw: tuple[int, int]
    flipped: bool
    alpha_mask: torch.Tensor | None = None


@dataclass
class LatentFillResult:
    """What ``fill_latent_cache`` did on this rank."""

    encoded: int
    skipped_valid: int
    rebuilt: int  # among ``encoded``: entries that existed but were stale


class LatentEncodingError(RuntimeError):
    """The VAE returned NaN/inf latents."""


class CacheFileError(ValueError):
    """A cache file that cannot be written (read-only dataset folder, full disk) or read back while training
    (deleted or damaged after the start-up check, or trusted with --skip_cache_check); names the file."""

    def __str__(self) -> str:
        from library.data.images import worker_message

        return worker_message(super().__str__())


def _npz_array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, reading only the .npy headers (not the data)."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(".npy"):
                continue
            with archive.open(name) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            headers[name[: -len(".npy")]] = (tuple(shape), dtype)
    return headers


def check_latent_cache(cache_path: str | os.PathLike, job: LatentJob, latent_channels: int = 4) -> CacheStatus:
    """Is the npz at ``cache_path`` a usable latent for ``job``? Stale entries must be rebuilt, never used.

    Valid means: the file opens; ``latents`` has shape (C, bucket_h/8, bucket_w/8); ``latents_flipped`` is
    there (same shape) when flip is wanted, ``alpha_mask`` when alpha is wanted; and the image is unchanged:
    our stored size + mtime_ns match, or, for a kohya-made file without them, the npz is not older than the
    image. For our files the stored original/resized size and crop must also match the job.
    """
    path = Path(cache_path)
    if not path.exists():
        return CacheStatus("missing", "no cache file")
    try:
        headers = _npz_array_headers(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        return CacheStatus("stale", f"unreadable cache file: {err}")
    expected = (latent_channels, job.bucket[1] // VAE_DOWNSCALE, job.bucket[0] // VAE_DOWNSCALE)
    if "latents" not in headers:
        return CacheStatus("stale", "no 'latents' array")
    if headers["latents"][0] != expected:
        return CacheStatus("stale", f"latents shape {headers['latents'][0]} does not match bucket {job.bucket} "
                                    f"(expected {expected})")
    if job.flip and headers.get("latents_flipped", (None,))[0] != expected:
        return CacheStatus("stale", "flip wanted but no 'latents_flipped' of the right shape")
    if job.alpha_mask and headers.get("alpha_mask", (None,))[0] != (job.bucket[1], job.bucket[0]):
        return CacheStatus("stale", "alpha mask wanted but no 'alpha_mask' of the bucket's size")
    try:
        image_stat = os.stat(job.image_path)
    except OSError as err:
        return CacheStatus("stale", f"image not readable: {err}")

    small = [k for k in ("cache_format", "image_file_size", "image_mtime_ns", "original_size", "resized_size",
                         "crop_ltrb") if k in headers]
    try:
        with np.load(path) as npz:
            meta = {k: npz[k] for k in small}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        return CacheStatus("stale", f"unreadable cache file: {err}")
    if "image_file_size" in meta and "image_mtime_ns" in meta:
        if int(meta["image_file_size"]) != image_stat.st_size or int(meta["image_mtime_ns"]) != image_stat.st_mtime_ns:
            return CacheStatus("stale", "image changed since it was encoded (size or mtime differ)")
        checks = {"original_size": job.original_size, "resized_size": job.resized_size, "crop_ltrb": job.crop_ltrb}
        for key, want in checks.items():
            if key in meta and tuple(int(v) for v in meta[key]) != tuple(want):
                return CacheStatus("stale", f"{key} {tuple(meta[key].tolist())} differs from {tuple(want)}")
    elif path.stat().st_mtime_ns < image_stat.st_mtime_ns:
        return CacheStatus("stale", "cache file (kohya format) is older than the image")
    return _check_finite(path, ("latents", "latents_flipped") if job.flip else ("latents",))


def _check_finite(path: Path, keys: Sequence[str]) -> CacheStatus:
    """Read the latent values (the only check that needs the data, ~40 KB per SD 512px entry, so it is last)."""
    try:
        with np.load(path) as npz:
            finite = all(np.isfinite(npz[key]).all() for key in keys)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        return CacheStatus("stale", f"unreadable cache file: {err}")
    return CacheStatus("valid") if finite else CacheStatus("stale", NON_FINITE_REASON)


def load_cached_latents(cache_path: str | os.PathLike, flipped: bool = False) -> CachedLatents:
    """Latents (unscaled, float32) plus the crop they were made from, mirrored if ``flipped``.

    Raises FileNotFoundError for a missing file and :class:`CacheFileError` naming it for an unreadable one.
    """
    key = "latents_flipped" if flipped else "latents"
    try:
        with np.load(cache_path) as npz:
            if key not in npz:
                raise CacheFileError(f"{cache_path}: no '{key}' (cache it with flip_aug to train with flipped "
                                     "latents)")
            latents = torch.from_numpy(np.asarray(npz[key], dtype=np.float32))
            original_w, original_h = (int(v) for v in npz["original_size"])
            left, top, right, _ = (int(v) for v in npz["crop_ltrb"])
            alpha = torch.from_numpy(np.asarray(npz["alpha_mask"], dtype=np.float32)) if "alpha_mask" in npz else None
            resized_w = int(npz["resized_size"][0]) if "resized_size" in npz else None
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise CacheFileError(f"{cache_path}: cannot read the cached latents ({type(error).__name__}: {error}); "
                             "delete the file (it is rebuilt at the next start) or run without "
                             "--skip_cache_check") from error
    target_h, target_w = latents.shape[1] * VAE_DOWNSCALE, latents.shape[2] * VAE_DOWNSCALE
    if flipped:
        # Ours: mirror the crop window in the resized image. kohya's crop_ltrb lives in bucket coordinates.
        left = (resized_w if resized_w is not None else target_w) - right
        if alpha is not None:
            alpha = torch.flip(alpha, dims=[1])
    return CachedLatents(latents, (original_h, original_w), (top, left), (target_h, target_w), flipped, alpha)


def encode_latents(
    vae: nn.Module,
    pixel_values: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """UNSCALED ``latent_dist.sample(generator)`` (float32 on CPU), as kohya caches it; raises on NaN/inf.

    Stored unscaled so kohya's caches and ours are interchangeable; the trainer multiplies by
    ``vae.config.scaling_factor``. ``names`` (one per image) go into the error message.
    """
    with torch.no_grad():
        pixels = pixel_values.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    latents = latents.float().cpu()
    bad = ~torch.isfinite(latents.flatten(1)).all(dim=1)
    if bad.any():
        which = [names[i] if names else f"batch item {i}" for i in bad.nonzero().flatten().tolist()]
        hint = ""
        if vae.dtype == torch.float16:
            hint = " The VAE runs in float16; the SDXL VAE overflows in fp16: use --no_half_vae (or an fp16-fix VAE)."
        raise LatentEncodingError(f"the VAE produced NaN/inf latents for: {', '.join(which)}.{hint}")
    return latents


def _stable_seed(seed: int, text: str) -> int:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temp file in the same folder, then rename: a reader never sees a half-written npz.

    Raises :class:`CacheFileError` naming the file when the folder is not writable or the disk is full.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(path, lambda handle: np.savez(handle, **arrays))
    except OSError as error:
        raise CacheFileError(f"{path}: cannot write the latent cache ({error}); make the folder writable and free "
                              "disk space, or use --cache_latents (a per-run cache in --output_dir) instead of "
                              "--cache_latents_to_disk") from error


PixelLoader = Callable[[LatentJob, bool], Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


def fill_latent_cache(
    jobs: Sequence[LatentJob],
    vae: nn.Module,
    load_pixels: PixelLoader,
    batch_size: int = 1,
    rank: int = 0,
    world_size: int = 1,
    skip_valid: bool = True,
    *,
    is_sdxl: bool,
    seed: int | None = None,
    load_workers: int = 0,
    progress: bool = True,
) -> LatentFillResult:
    """Encode this rank's share of ``jobs`` into kohya-format npz files (atomic writes).

    ``load_pixels(job, flipped)`` returns the cropped (3, bucket_h, bucket_w) pixels in [-1, 1] (flipped if
    asked), or ``(pixels, alpha (bucket_h, bucket_w) in 0..1)`` when ``job.alpha_mask``. Jobs are
    de-duplicated by cache path, then rank r takes those with index % world_size == r (before checking
    validity, so every rank splits the same way), and batches are formed per (bucket, flip, alpha) so they
    are same-shape. ``seed`` makes each image's sample depend only on the seed and the image path, not on
    batch size or world size.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    unique: dict[Path, LatentJob] = {}
    for job in jobs:
        unique.setdefault(job.cache_path(is_sdxl), job)
    share = list(unique.items())[rank::world_size]

    channels = getattr(getattr(vae, "config", None), "latent_channels", 4)
    todo: list[tuple[Path, LatentJob]] = []
    skipped = rebuilt = 0
    for path, job in share:
        status = check_latent_cache(path, job, channels) if skip_valid else None
        if status is not None and status.is_valid:
            skipped += 1
            continue
        if status is not None and status.reason == NON_FINITE_REASON:
            logger.warning("%s: the cached latents contain NaN or inf values; encoding them again", path)
        rebuilt += int(path.exists())  # stale (or not checked): overwritten
        todo.append((path, job))

    groups: dict[tuple, list[tuple[Path, LatentJob]]] = {}
    for path, job in todo:
        groups.setdefault((job.bucket, job.flip, job.alpha_mask), []).append((path, job))
    batches = [
        entries[i : i + batch_size]
        for key in sorted(groups, key=lambda k: (k[0][0] * k[0][1], k))
        for entries in [groups[key]]
        for i in range(0, len(entries), batch_size)
    ]

    def load(entry: tuple[Path, LatentJob]) -> tuple[os.stat_result, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        _, job = entry
        stat = os.stat(job.image_path)  # before reading: a change during encoding makes the entry stale
        loaded = load_pixels(job, False)
        pixels, alpha = loaded if isinstance(loaded, tuple) else (loaded, None)
        if job.alpha_mask and alpha is None:
            raise ValueError(f"{job.image_path}: alpha_mask wanted but load_pixels returned no alpha")
        flipped = load_pixels(job, True) if job.flip else None
        flipped = flipped[0] if isinstance(flipped, tuple) else flipped
        expected = (3, job.bucket[1], job.bucket[0])
        for tensor in (pixels, flipped):
            if tensor is not None and tuple(tensor.shape) != expected:
                raise ValueError(f"{job.image_path}: load_pixels returned {tuple(tensor.shape)}, expected {expected}")
        return stat, pixels, flipped, alpha

    def generators(entries: list[tuple[Path, LatentJob]], tag: str) -> list[torch.Generator] | None:
        if seed is None:
            return None
        return [torch.Generator().manual_seed(_stable_seed(seed, f"{job.image_path}{tag}")) for _, job in entries]

    pool = ThreadPoolExecutor(load_workers) if load_workers > 0 else None
    try:
        bar = tqdm(total=len(todo), desc="caching latents", disable=not progress or rank != 0)
        for entries in batches:
            loaded = list(pool.map(load, entries) if pool else map(load, entries))
            names = [str(job.image_path) for _, job in entries]
            latents = encode_latents(vae, torch.stack([x[1] for x in loaded]), generators(entries, ""), names)
            flipped = None
            if entries[0][1].flip:
                flipped = encode_latents(vae, torch.stack([x[2] for x in loaded]), generators(entries, "#flip"), names)
            for i, ((path, job), (stat, _, _, alpha)) in enumerate(zip(entries, loaded)):
                arrays = {
                    "latents": latents[i].numpy(),
                    "original_size": np.array(job.original_size, dtype=np.int64),
                    "crop_ltrb": np.array(job.crop_ltrb, dtype=np.int64),
                    "cache_format": np.array(LATENT_CACHE_FORMAT, dtype=np.int64),
                    "image_file_size": np.array(stat.st_size, dtype=np.int64),
                    "image_mtime_ns": np.array(stat.st_mtime_ns, dtype=np.int64),
                    "bucket_size": np.array(job.bucket, dtype=np.int64),
                    "resized_size": np.array(job.resized_size, dtype=np.int64),
                }
                if flipped is not None:
                    arrays["latents_flipped"] = flipped[i].numpy()
                if alpha is not None:
                    arrays["alpha_mask"] = alpha.float().cpu().numpy()
                _write_npz_atomic(path, arrays)
            bar.update(len(entries))
        bar.close()
    finally:
        if pool:
            pool.shutdown()
    return LatentFillResult(encoded=len(todo), skipped_valid=skipped, rebuilt=rebuilt)


# ---------------------------------------------------------------------------------------------------------
# Text-encoder output cache
# ---------------------------------------------------------------------------------------------------------


def _hash_hex(data: Iterable[bytes], size: int = 16) -> str:
    h = hashlib.blake2b(digest_size=size)
    for chunk in data:
        h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of what decides token ids: vocabulary/merges/normaliser and the BOS/EOS/PAD ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # runtime state the tokenizer call itself changes
        spec.pop("padding", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                           tokenizer.pad_token_id])
    return _hash_hex([body.encode(), specials.encode()], 8)


def module_fingerprint(module: nn.Module) -> str:
    """Short hash of every parameter and buffer (names, shapes, dtypes, bytes): ~1 s per GB on CPU."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def text_encoder_cache_identity(prompt_encoder: PromptEncoder, model_id: str | None = None) -> str:
    """Everything besides the caption that decides an encoding: family, tokenizers, max_token_length,
    clip_skip, and the encoders (``model_id`` if given, e.g. a checkpoint hash, else a hash of the weights)."""
    encoders = model_id if model_id is not None else ",".join(module_fingerprint(m) for m in prompt_encoder.text_encoders)
    tokenizers = ",".join(tokenizer_fingerprint(t) for t in prompt_encoder.tokenizers)
    return (f"family={prompt_encoder.family};max_token_length={prompt_encoder.max_token_length};"
            f"clip_skip={prompt_encoder.clip_skip};tokenizers={tokenizers};encoders={encoders}")


@dataclass(frozen=True)
class _Shard:
    name: str
    rows: int
    hidden_offset: int
    pooled_offset: int | None


def _npy_data_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not expected")
        return f.tell(), tuple(shape), dtype


def _save_npy_atomic(path: Path, array: np.ndarray) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    return Path(tmp)


class TextEncoderOutputCache:
    """Text-encoder outputs on disk, keyed by caption text under one ``identity``; RAM use ~24 B per caption.

    Layout: ``directory/te_<hash(identity, dtype)>/``; a different identity is a different folder, so it
    simply misses. Entries are written in immutable shards of about ``shard_bytes``; ``add`` buffers rows
    until a shard is full (or ``flush``). The index (opened lazily, rebuilt by ``refresh``) is a sorted
    array of 16-byte digests with parallel int32 shard/row arrays. Reads use ``os.pread`` on files opened
    lazily per process (at most ``max_open_files`` at a time), so page cache is not charged to the process
    and no file handle is ever pickled: the object can be handed to DataLoader workers after ``flush``.

    Multi-rank writing: every writer names its shards with a fresh uuid, so ranks never write the same file;
    an index built after all ranks flushed (e.g. after a barrier, ``refresh()``) merges every shard.

    Storage dtype: float16 by default (half the disk of kohya's float32; bf16 encoder outputs fit fp16's
    range, and numpy has no bf16), or float32 for exact fp32 outputs. ``get`` returns that dtype.
    """

    def __init__(self, directory: str | os.PathLike, identity: str, *, storage_dtype: str = "float16",
                 shard_bytes: int = 256 << 20, max_open_files: int = 32) -> None:
        if storage_dtype not in ("float16", "float32"):
            raise ValueError(f"storage_dtype must be float16 or float32, got {storage_dtype!r}")
        self.identity = identity
        self.storage_dtype = np.dtype(storage_dtype)
        self.shard_bytes = shard_bytes
        self.max_open_files = max_open_files
        tag = _hash_hex([identity.encode("utf-8"), b"\0", storage_dtype.encode()], 8)
        self.folder = Path(directory) / f"te_{tag}"
        self._reset_process_state()
        # Index: sorted segments of (S16 digests, int32 shard ids, int32 rows); None until first needed.
        self._segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._shards: list[_Shard] = []
        self._shape: tuple[tuple[int, int], int | None] | None = None  # ((L, D), P or None)
        # Write buffer: digest -> row of one preallocated shard-sized array (freed after each flush).
        self._pending: dict[bytes, int] = {}
        self._buffer_hidden: np.ndarray | None = None
        self._buffer_pooled: np.ndarray | None = None

    # -- per-process state (never pickled) ------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict[str, int] = OrderedDict()

    def __getstate__(self) -> dict:
        if self._pending:
            raise RuntimeError("TextEncoderOutputCache has unflushed entries: call flush() before pickling it")
        state = self.__dict__.copy()
        del state["_files"], state["_pid"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # forked: close this process's copies of the parent's descriptors
            for inherited in self._files.values():
                os.close(inherited)
            self._reset_process_state()
        key = str(path)
        fd = self._files.get(key)
        if fd is None:
            fd = os.open(key, os.O_RDONLY)
            self._files[key] = fd
            while len(self._files) > self.max_open_files:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(key)
        return fd

    def close(self) -> None:
        """Close the file descriptors this process opened (pending rows are kept; ``flush`` writes them)."""
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._reset_process_state()

    def __enter__(self) -> "TextEncoderOutputCache":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.close()

    # -- index -----------------------------------------------------------------------------------------
    def digest(self, prompt: str) -> bytes:
        """The 16-byte key of ``prompt`` under this cache's identity."""
        return hashlib.blake2b(f"{self.identity}\0{prompt}".encode("utf-8"), digest_size=16).digest()

    def refresh(self) -> None:
        """Re-read the shard list (e.g. after other ranks wrote theirs) and rebuild the index."""
        self._shards = []
        self._segments = []
        if self.folder.is_dir():
            for keys_path in sorted(self.folder.glob("*.keys.npy")):
                self._add_shard_to_index(keys_path.name[: -len(".keys.npy")], np.load(keys_path))
        self._merge_segments()

    def _add_shard_to_index(self, name: str, keys: np.ndarray) -> None:
        offset, hidden_shape, dtype = _npy_data_offset(self.folder / f"{name}.hidden.npy")
        pooled_path = self.folder / f"{name}.pooled.npy"
        pooled_offset = pooled_dim = None
        if pooled_path.exists():
            pooled_offset, pooled_shape, _ = _npy_data_offset(pooled_path)
            pooled_dim = pooled_shape[1]
        shape = ((hidden_shape[1], hidden_shape[2]), pooled_dim)
        if dtype != self.storage_dtype or keys.shape != (hidden_shape[0], 16):
            raise ValueError(f"{self.folder / name}: shard does not match this cache ({dtype}, {keys.shape})")
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"{self.folder / name}: entry shape {shape} differs from this cache's {self._shape}")
        self._shape = shape
        shard_id = len(self._shards)
        self._shards.append(_Shard(name, hidden_shape[0], offset, pooled_offset))
        flat = np.ascontiguousarray(keys).view("S16").reshape(-1)
        order = np.argsort(flat, kind="stable")
        self._segments.append((flat[order], np.full(len(flat), shard_id, dtype=np.int32), order.astype(np.int32)))
        if len(self._segments) > 16:
            self._merge_segments()

    def _merge_segments(self) -> None:
        """Fold all index segments into one sorted array (duplicates keep one copy)."""
        if len(self._segments) == 1:
            return
        if not self._segments:
            self._segments = [(np.empty(0, dtype="S16"), np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int32))]
            return
        keys = np.concatenate([s[0] for s in self._segments])
        shard_ids = np.concatenate([s[1] for s in self._segments])
        rows = np.concatenate([s[2] for s in self._segments])
        keys, first = np.unique(keys, return_index=True)
        self._segments = [(keys, shard_ids[first], rows[first])]

    def _ensure_index(self) -> None:
        if self._segments is None:
            self.refresh()

    def _find(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised lookup of S16 digests: (found mask, shard ids, rows); -1 where not found."""
        self._ensure_index()
        found = np.zeros(len(digests), dtype=bool)
        shard_ids = np.full(len(digests), -1, dtype=np.int64)
        rows = np.full(len(digests), -1, dtype=np.int64)
        for keys, seg_shards, seg_rows in self._segments:
            if not len(keys):
                continue
            pos = np.minimum(np.searchsorted(keys, digests), len(keys) - 1)
            hit = (keys[pos] == digests) & ~found
            shard_ids[hit], rows[hit] = seg_shards[pos[hit]], seg_rows[pos[hit]]
            found |= hit
        return found, shard_ids, rows

    def _has(self, digests: list[bytes]) -> np.ndarray:
        if not digests:
            return np.zeros(0, dtype=bool)
        on_disk = self._find(np.array(digests, dtype="S16"))[0]
        return on_disk | np.array([d in self._pending for d in digests], dtype=bool)

    def index_nbytes(self) -> int:
        """Bytes held by the in-RAM index arrays (for the < 1 KB/entry budget)."""
        self._ensure_index()
        return sum(a.nbytes for segment in self._segments for a in segment)

    def __len__(self) -> int:
        self._ensure_index()
        self._merge_segments()
        return len(self._segments[0][0]) + len(self._pending)

    def __contains__(self, prompt: str) -> bool:
        return bool(self._has([self.digest(prompt)])[0])

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """The distinct prompts (in first-seen order) that have no entry yet."""
        distinct = list(dict.fromkeys(prompts))
        present = self._has([self.digest(p) for p in distinct])
        return [p for p, here in zip(distinct, present) if not here]

    # -- writing ---------------------------------------------------------------------------------------
    def add(self, prompts: Sequence[str], encoded: EncodedPrompts) -> None:
        """Store ``encoded`` row b under ``prompts[b]`` (prompts already present are skipped)."""
        dtype = torch.float16 if self.storage_dtype == np.float16 else torch.float32
        hidden = encoded.hidden_states.detach().to("cpu", dtype).numpy()
        pooled = None if encoded.pooled is None else encoded.pooled.detach().to("cpu", dtype).numpy()
        if hidden.ndim != 3 or hidden.shape[0] != len(prompts) or (pooled is not None and pooled.shape[0] != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but hidden states {hidden.shape}"
                             f"{'' if pooled is None else f' and pooled {pooled.shape}'}")
        self._ensure_index()
        shape = ((hidden.shape[1], hidden.shape[2]), None if pooled is None else pooled.shape[1])
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"entries of shape {shape} do not fit this cache's {self._shape}: "
                             "was max_token_length or the model changed without changing the identity?")
        self._shape = shape
        digests = [self.digest(p) for p in prompts]
        (length, dim), pooled_dim = shape
        row_bytes = (length * dim + (pooled_dim or 0)) * self.storage_dtype.itemsize
        shard_rows = max(1, self.shard_bytes // row_bytes)
        for b, (digest, present) in enumerate(zip(digests, self._has(digests))):
            if present or digest in self._pending:  # also catches a prompt repeated within this call
                continue
            if self._buffer_hidden is None:
                self._buffer_hidden = np.empty((shard_rows, length, dim), self.storage_dtype)
                self._buffer_pooled = None if pooled is None else np.empty((shard_rows, pooled_dim), self.storage_dtype)
            row = len(self._pending)
            self._pending[digest] = row
            self._buffer_hidden[row] = hidden[b]
            if pooled is not None:
                self._buffer_pooled[row] = pooled[b]
            if row + 1 == len(self._buffer_hidden):
                self.flush()

    def flush(self) -> None:
        """Write buffered entries as one new shard (data files first, the keys file last = commit)."""
        if not self._pending:
            return
        try:
            self._write_shard()
        except OSError as error:
            raise CacheFileError(f"{self.folder}: cannot write the text-encoder output cache ({error}); make it "
                                  "writable or pass --text_encoder_cache_dir DIR") from error
        self._pending, self._buffer_hidden, self._buffer_pooled = {}, None, None

    def _write_shard(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "identity.json"
        if not meta.exists():
            tmp = self.folder / f".identity.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps({"identity": self.identity, "storage_dtype": self.storage_dtype.name,
                                       "format": TE_CACHE_FORMAT}, indent=1))
            os.replace(tmp, meta)
        name = f"shard-{uuid.uuid4().hex[:16]}"
        keys = np.frombuffer(b"".join(self._pending), dtype=np.uint8).reshape(-1, 16)
        rows = len(self._pending)
        parts = [(f"{name}.hidden.npy", self._buffer_hidden[:rows])]
        if self._buffer_pooled is not None:
            parts.append((f"{name}.pooled.npy", self._buffer_pooled[:rows]))
        parts.append((f"{name}.keys.npy", keys))
        written = [(_save_npy_atomic(self.folder / n, a), self.folder / n) for n, a in parts]
        for tmp, final in written:
            os.replace(tmp, final)
        self._ensure_index()
        self._add_shard_to_index(name, keys)

    # -- reading ---------------------------------------------------------------------------------------
    def _read(self, path: Path, nbytes: int, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        buf = bytearray(nbytes)
        got = os.preadv(self._fd(path), [buf], offset)
        if got != nbytes:
            raise OSError(f"{path}: short read ({got} of {nbytes} bytes at {offset})")
        return torch.from_numpy(np.frombuffer(buf, dtype=self.storage_dtype).reshape(shape))

    def get(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden_states (L, D), pooled (P,) or None) for ``prompt``; KeyError if it was never added."""
        digest = self.digest(prompt)
        if digest in self._pending:
            i = self._pending[digest]
            pooled = None if self._buffer_pooled is None else torch.from_numpy(self._buffer_pooled[i].copy())
            return torch.from_numpy(self._buffer_hidden[i].copy()), pooled
        found, shard_ids, rows = self._find(np.array([digest], dtype="S16"))
        if not found[0]:
            raise KeyError(f"no cached text-encoder output for caption {prompt!r} in {self.folder}")
        shard, row = self._shards[int(shard_ids[0])], int(rows[0])
        (length, dim), pooled_dim = self._shape
        size = self.storage_dtype.itemsize
        hidden = self._read(self.folder / f"{shard.name}.hidden.npy", length * dim * size,
                            shard.hidden_offset + row * length * dim * size, (length, dim))
        pooled = None
        if pooled_dim is not None:
            pooled = self._read(self.folder / f"{shard.name}.pooled.npy", pooled_dim * size,
                                shard.pooled_offset + row * pooled_dim * size, (pooled_dim,))
        return hidden, pooled

    def get_many(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked ``get``: hidden (B, L, D) and pooled (B, P) or None."""
        entries = [self.get(p) for p in prompts]
        hidden = torch.stack([h for h, _ in entries])
        pooled = torch.stack([p for _, p in entries]) if entries and entries[0][1] is not None else None
        return hidden, pooled


def fill_text_encoder_cache(
    prompts: Iterable[str],
    prompt_encoder: PromptEncoder,
    cache: TextEncoderOutputCache,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Encode this rank's share of the distinct prompts (plus "", for caption dropout) that are missing.

    The sorted distinct prompts are split ``[rank::world_size]`` before checking what is cached, so ranks
    that open the cache at different moments still split identically. Each rank writes its own shards;
    after a barrier, ``cache.refresh()`` sees everyone's. Returns how many prompts this rank encoded.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    share = sorted(set(prompts) | {""})[rank::world_size]
    todo = cache.missing(share)
    with torch.no_grad():
        for start in tqdm(range(0, len(todo), batch_size), desc="caching text encoder outputs",
                          disable=not progress or rank != 0):
            batch = todo[start : start + batch_size]
            cache.add(batch, prompt_encoder.encode(batch))
    cache.flush()
    return len(todo)
