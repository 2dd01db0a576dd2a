"""Latent cache files: one ``.npz`` per image, validated before use, kohya-compatible.

kohya-compatible so caches made by sd-scripts are reused and vice versa:
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

Deviations from kohya, and why:
    * ``crop_ltrb`` is the real crop window in the resized image. kohya stores the letterbox offset of the
      image fitted inside the bucket (axis-swapped), which is not the crop SDXL was conditioned on. For a
      kohya-made file (no ``resized_size``) we keep kohya's meaning when mirroring a flip
      (left = bucket_w - right); for ours we mirror in the resized image (left = resized_w - right).
    * Validity also checks the latent shape against the bucket, that the image is unchanged (stored
      size + mtime_ns; for kohya files, npz mtime >= image mtime) and that every latent value is finite
      (a NaN from an fp16 VAE or a bad disk would otherwise stop training at its first step as a "NaN
      loss"); kohya checks key presence only. A non-finite entry is rebuilt with one warning naming it.
    * Work is sharded across ranks before the validity check (``library.data.sharding.rank_share``), so
      ranks that start at different times still split the work the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from library.data.datasets import CachedLatents
from library.data.sharding import rank_share
from library.io import atomic_write_file, read_npy_header
from library.models.families import ModelFamily

LATENT_CACHE_FORMAT = 1
VAE_DOWNSCALE = 8
NON_FINITE_REASON = "latents contain NaN or inf values"

logger = logging.getLogger(__name__)


def latent_cache_path(image_path: str | os.PathLike, image_size: tuple[int, int], family: ModelFamily) -> Path:
    """kohya's npz name: ``<stem>_<WWWW>x<HHHH>`` and the family's suffix (``_sdxl.npz`` / ``_sd.npz``) beside
    the image (original w, h).

    The size is in the name so a dataset can learn image sizes from the cache without opening images.
    """
    path = Path(image_path)
    width, height = image_size
    return path.with_name(f"{path.stem}_{int(width):04d}x{int(height):04d}{family.latent_cache_suffix}")


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
    interpolation: str | None = None  # the resize filter (--resize_interpolation); None: LANCZOS

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

    def cache_path(self, family: ModelFamily) -> Path:
        """``cache_file`` if set, else kohya's name beside the image."""
        if self.cache_file is not None:
            return self.cache_file
        return latent_cache_path(self.image_path, self.original_size, family)


@dataclass(frozen=True)
class CacheStatus:
    """Result of ``check_latent_cache``: ``state`` is valid / missing / stale; ``reason`` says why not valid."""

    state: Literal["valid", "missing", "stale"]
    reason: str = ""

    @property
    def is_valid(self) -> bool:
        return self.state == "valid"


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
                shape, _, dtype = read_npy_header(f)
            headers[name[: -len(".npy")]] = (shape, dtype)
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
    family: ModelFamily,
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
    unique: dict[Path, LatentJob] = {}
    for job in jobs:
        unique.setdefault(job.cache_path(family), job)
    share = rank_share(list(unique.items()), rank=rank, world_size=world_size)

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
        # seeded by the file's name, not its path: the same dataset in another folder gets the same latents
        return [torch.Generator().manual_seed(_stable_seed(seed, f"{job.image_path.name}{tag}")) for _, job in entries]

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
