"""Image files -> training pixels: load, resize to cover the bucket, crop, flip, colour jitter, to tensor.

The one place that touches pixels, so that the target image, its alpha mask and a ControlNet conditioning
image all go through *the same* geometric transform (:func:`apply_crop_plan`) and stay pixel-aligned::

    loaded = load_image(path, keep_alpha=subset.alpha_mask, cover_bucket=bucket)  # EXIF-rotated, alpha on
                                                                     # white, big JPEGs decoded reduced
    plan = plan_crop(loaded.original_size, bucket, random_crop=..., flip_aug=..., rng=rng)
    pixels = to_uint8_tensor(crop_plan_array(loaded.rgb, plan))      # (3, H, W) uint8, 4x less than float
    cond = to_uint8_tensor(apply_crop_plan(load_rgb(cond_path), plan))  # same resize, crop and flip
    plan.original_size_hw, plan.crop_top_left, plan.target_size_hw   # SDXL micro-conditioning
    normalize_pixels(batch.pixel_values.to(device))                   # on the device: float in [-1, 1]

Choices, and why:

* **Resize filter: antialiased bicubic (library.data.pixels), both directions**, unless the subset names
  one (``resize_interpolation``: PIL's filters, as before). Like PIL's LANCZOS, which was the default until
  it proved to be half of the loader's time, it grows its support with the reduction factor, so shrinking
  does not alias (unlike cv2's bicubic/LANCZOS4) and stays sharper than cv2's INTER_AREA box average; it is
  3-6x faster than PIL's LANCZOS and 0.03-0.35 dB PSNR below it (module docstring there). The target, its
  "L" alpha mask and the conditioning image all go through it, so they stay aligned.
* **JPEG draft decoding** (``load_image(..., cover_bucket=)``): a JPEG at least twice as large as the size
  that covers its bucket, in both directions, is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (DCT scaling:
  a 4032x3024 photo for a 1216x912 resize decodes at 2016x1512; load + resize + crop went from 305 to 101 ms),
  never below the covering size, so the resize that follows still only shrinks; pixels differ from
  a full decode + the same resize by 1.1 of 255 on average. The plan keeps the true original size.
* **uint8 batches.** Samples carry uint8 (3, H, W) pixels; :func:`normalize_pixels` turns them into the
  VAE's [-1, 1] on the device (a 256-entry table, so the values equal the old float path bit for bit on
  any device), which keeps the float conversion and 4x the memory out of the DataLoader workers.
* **Transparency is composited on white.** Fully transparent pixels often hold arbitrary colours (black,
  or leftovers from editing) that the VAE would otherwise see; white is the usual "no background".
  With ``alpha_mask`` the RGB is still composited (the VAE sees the same clean image) and the alpha is
  returned as a mask in [0, 1] for the masked loss; an image without alpha gives an all-ones mask.
* **Colour augmentation** (``color_aug``): a hue rotation drawn uniformly in ±8° and a brightness
  (HSV value) factor in [0.9, 1.1], both from the sample's seeded ``random.Random``. It is applied to
  the training image only: a ControlNet conditioning image (edges, depth) must not change colour.
* **Integrity check** (:func:`verify_image`): PIL's ``verify()`` (PNG: every chunk CRC and the IEND
  chunk, so truncation and bit rot are caught; WebP: container structure), then a full decode of every
  format. PNG needs it too: a file can be written with valid CRCs over a broken zlib stream (a buggy
  exporter, a bad copy recomputed by a tool), which only inflating finds. JPEG is decoded in draft mode at
  1/8 scale: the entropy decoder still reads every coefficient of the whole file, so truncation and broken
  Huffman data are caught at a third of the cost. A JPEG with flipped bits that still form valid codes
  decodes "fine" and is not detected; nothing short of looking at it would notice. Images that passed are
  remembered by path, size and mtime (:class:`VerifiedImages`), so a restart decodes only what changed.
* **Unusual modes are brought to 8-bit RGB by their meaning, not by PIL's clipping.** PIL's ``convert``
  clips 16-bit ("I;16", "I") and float ("F") pixels to 0..255, so a 16-bit PNG trains as an almost white
  image. Integer images are scaled from their bit depth (16-bit: /257; "I" is read as 16-bit when any value
  exceeds 255, which is how PIL decodes 16-bit PNG/TIFF into it, else as 8-bit), float images from 0..1
  (or clipped to 0..255 when values exceed 1). Palette images with transparency, "LA"/"PA" go through
  RGBA (and so onto white); CMYK, "1", YCbCr etc. use PIL's own conversion.

SDXL crop conditioning, and how it differs from kohya: SDXL's UNet is conditioned on
``crops_coords_top_left``, which its training data pipeline set to the number of pixels cut from the top
and the left of the resized image (SDXL paper, §2.2). We report exactly that: the real offset of the crop
in the resized image, including random crops, and mirrored (left' = resized_w - bucket_w - left) when the
crop is flipped, because after the flip the pixels missing on the left are those that were cut on the
right. kohya's ``get_crop_ltrb`` instead computes the letterbox offset of the image *fitted inside* the
bucket, which swaps the axes: a 1000x2000 image in a 1024² bucket gets (top 0, left 256), although the
real crop cut ~512 px from the top and nothing from the left; random crops are not tracked at all. The
model then learns "cropped" for uncropped images and vice versa, which is what the conditioning exists to
avoid. The original size is likewise always the true decoded size (kohya reports the post-crop size for
unbucketed images), and the target size is the bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from library.data.buckets import Size, cover_resize, crop_box, crop_top_left
from library.data.metadata import IMAGE_EXTENSIONS  # one list for every reader of image folders
from library.data.pixels import FAST_RESIZE_MODES, normalize_pixels, resize_uint8  # noqa: F401 (re-exported)
from library.io import atomic_write_file

RESAMPLE = Image.Resampling.LANCZOS  # for modes library.data.resize does not take (16-bit, float, palette)
# kohya's --resize_interpolation names -> PIL filters (kohya uses cv2 for some; PIL's antialiased BOX is the
# pixel-area average cv2's INTER_AREA computes when shrinking). None: antialiased bicubic, see above.
RESIZE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}
HUE_JITTER_DEGREES = 8.0
BRIGHTNESS_JITTER = 0.1

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # 90° rotations: width and height swap
_WHITE = (255, 255, 255, 255)
_WIDE_INTEGER_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
VERIFIED_CACHE_FORMAT = 1

logger = logging.getLogger(__name__)


class ImageReadError(ValueError):
    """An image that could not be decoded while training; the message names the file and the fix, so the
    scripts print it as one ``error:`` line."""

    def __str__(self) -> str:
        return worker_message(super().__str__())


def worker_message(text: str) -> str:
    """The original one-line message of an error a DataLoader worker re-raised in the main process.

    torch re-raises a worker's exception as the same type with "Caught X in DataLoader worker process N" and
    the worker's whole traceback as the message; its last line is "module.X: <the original message>".
    """
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def is_image_file(path: Path) -> bool:
    """True for the extensions in :data:`IMAGE_EXTENSIONS`, in any letter case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, without decoding pixels.

    PIL's ``getexif()`` on a PNG decodes the whole image to look for an eXIf chunk after the pixel data (and a
    decode error there would go unnoticed); the PNG spec puts eXIf before IDAT, which ``open`` has parsed.
    """
    try:
        if image.format == "PNG":
            raw = image.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_EXIF_ORIENTATION, 1))
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block: PIL's exif_transpose ignores it too
        return 1


def _oriented_size(image: Image.Image, size: Size | None = None) -> Size:
    """The displayed (EXIF-rotated) size of ``image`` (or of ``size``, its size before a JPEG draft)."""
    width, height = size or image.size
    if _orientation(image) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def read_image_size(path: Path) -> Size:
    """(width, height) as displayed, i.e. after the EXIF orientation, from the header only.

    Raises OSError (PIL's UnidentifiedImageError is one) when the file is not a readable image.
    """
    with Image.open(path) as image:
        return _oriented_size(image)


def verify_image(path: Path) -> Size:
    """Check that ``path`` decodes completely (see the module docstring) and return its displayed size.

    Raises ValueError with PIL's reason when the file is corrupt or truncated.
    """
    try:
        with Image.open(path) as image:
            file_format = image.format
            image.verify()  # must come first after open, and leaves the image unusable: reopen
        with Image.open(path) as image:
            stored_size = image.size
            if file_format == "JPEG":
                image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
            size = _oriented_size(image, stored_size)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, struct.error, ...
        raise ValueError(f"{type(error).__name__}: {error}") from error
    return size


def default_verified_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sd-trainer/verified-images`` (``~/.cache/...`` without it): the user's cache, not the
    dataset folder, which may be read-only or shared and should not gain files from a check."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sd-trainer" / "verified-images"


@dataclass
class VerifiedImages:
    """Images that decoded completely, remembered by (file size, mtime_ns) so a restart skips them.

    One small JSON file per image folder under ``directory``, holding only the entries this run verified
    there, so files never grow with the history of a folder. Reads and writes never raise: a missing,
    corrupt or unwritable cache only means decoding again. Writes are atomic (temp file + rename), so
    concurrent ranks each leave a complete file. ``directory`` None keeps nothing.
    """

    directory: Path | None
    _loaded: dict[Path, dict[str, list[int]]] = field(default_factory=dict)
    _verified: dict[Path, dict[str, list[int]]] = field(default_factory=dict)

    def _file_for(self, folder: Path) -> Path:
        digest = hashlib.blake2b(str(folder).encode("utf-8"), digest_size=8).hexdigest()
        return self.directory / f"{digest}.json"  # type: ignore[operator]

    def _entries(self, folder: Path) -> dict[str, list[int]]:
        if folder not in self._loaded:
            entries: dict[str, list[int]] = {}
            try:
                data = json.loads(self._file_for(folder).read_text(encoding="utf-8"))
                if data.get("format") == VERIFIED_CACHE_FORMAT and data.get("folder") == str(folder):
                    entries = {k: v for k, v in data["images"].items() if isinstance(v, list) and len(v) == 4}
            except (OSError, ValueError, TypeError, AttributeError, KeyError):
                pass
            self._loaded[folder] = entries
        return self._loaded[folder]

    def lookup(self, path: Path, stat: os.stat_result) -> Size | None:
        """The size remembered for ``path`` if the file still has the size and mtime it had then."""
        if self.directory is None:
            return None
        entry = self._entries(path.parent).get(path.name)
        if entry is None or entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
            return None
        self._verified.setdefault(path.parent, {})[path.name] = entry
        return int(entry[2]), int(entry[3])

    def remember(self, path: Path, stat: os.stat_result, size: Size) -> None:
        """Record a successful decode; ``stat`` is taken before reading, so a file changed meanwhile is stale."""
        if self.directory is not None:
            self._verified.setdefault(path.parent, {})[path.name] = [stat.st_size, stat.st_mtime_ns, size[0], size[1]]

    def save(self) -> None:
        """Write each folder's verified entries (atomically); any OSError is ignored."""
        if self.directory is None:
            return
        for folder, entries in self._verified.items():
            if entries == self._loaded.get(folder):
                continue
            target = self._file_for(folder)
            text = json.dumps({"format": VERIFIED_CACHE_FORMAT, "folder": str(folder), "images": entries})
            try:
                _write_text_atomic(target, text)
            except OSError as error:
                logger.debug("cannot write the verified-image cache %s: %s", target, error)


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda handle: handle.write(text.encode("utf-8")))


def verify_image_cached(path: Path, verified: VerifiedImages) -> Size:
    """:func:`verify_image`, skipped when ``verified`` remembers this exact file (same size and mtime)."""
    stat = os.stat(path)
    size = verified.lookup(path, stat)
    if size is None:
        size = verify_image(path)
        verified.remember(path, stat, size)
    return size


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float single-channel image as "L", scaled by its range (module docstring)."""
    array = np.asarray(image)
    if image.mode == "F":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scaled = array * 255.0 if array.size and array.max() <= 1.0 else array
    else:
        array = array.astype(np.float64)
        sixteen_bit = image.mode != "I" or (array.size and array.max() > 255)
        scaled = array / 257.0 if sixteen_bit else array
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """(RGB with any transparency composited on white, alpha as "L" or None without transparency)."""
    if image.mode in _WIDE_INTEGER_MODES or image.mode == "F":
        image = _wide_to_8bit(image)  # a 16-bit colour key (tRNS) cannot be mapped to 8 bits: dropped
        return image.convert("RGB"), None
    if _has_alpha(image):
        if image.mode == "La":
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB"), alpha
    return (image if image.mode == "RGB" else image.convert("RGB")), None


@dataclass(frozen=True)
class LoadedImage:
    """An image as the model should see it: RGB (transparency on white) and, if asked for, the alpha.

    ``rgb`` (and ``alpha``) may be a JPEG decoded at 1/2, 1/4 or 1/8 scale (``load_image``'s
    ``cover_bucket``); ``full_size`` is then the image's real displayed size, which plans and SDXL's
    original-size conditioning use. None: ``rgb`` has the full size.
    """

    rgb: Image.Image
    alpha: Image.Image | None  # mode "L"; all 255 for an image without transparency
    full_size: Size | None = None

    @property
    def original_size(self) -> Size:
        """(width, height) of the image as displayed, before any reduced decoding: what to plan the crop from."""
        return self.full_size if self.full_size is not None else self.rgb.size


ImageSource = Union[str, os.PathLike, BinaryIO]
"""A file path, or a binary file object (``io.BytesIO`` of a shard's image bytes)."""


def _source_name(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "image bytes"


def _draft_for_bucket(opened: Image.Image, cover_bucket: Size) -> None:
    """Let libjpeg decode ``opened`` at 1/2, 1/4 or 1/8 scale when the result still covers the size the
    crop plan resizes to (PIL picks the largest such scale and rounds up), so the later resize only shrinks."""
    if opened.format != "JPEG":
        return
    needed, _ = cover_resize(_oriented_size(opened), cover_bucket)
    if _orientation(opened) in _TRANSPOSING_ORIENTATIONS:
        needed = (needed[1], needed[0])  # draft works on the stored (unrotated) pixels
    if opened.size[0] >= 2 * needed[0] and opened.size[1] >= 2 * needed[1]:
        opened.draft(opened.mode, needed)


def load_image(source: ImageSource, keep_alpha: bool = False, *, cover_bucket: Size | None = None) -> LoadedImage:
    """Decode ``source`` (a path or a binary file object), apply its EXIF orientation, bring any mode to
    8-bit RGB and composite transparency on white.

    ``keep_alpha`` (the subset's ``alpha_mask``) also returns the alpha channel as an "L" image, so the
    masked loss can ignore transparent areas. ``cover_bucket``: the bucket the image will be resized to
    cover (``plan_crop``); a JPEG at least twice that covering size is decoded reduced (module docstring),
    and ``original_size`` keeps its real size. An image that no longer decodes raises
    :class:`ImageReadError` naming the file (the start-up check passed, so it changed or broke since).
    """
    try:
        with Image.open(source) as opened:
            full_size = _oriented_size(opened)
            if cover_bucket is not None:
                _draft_for_bucket(opened, cover_bucket)
            image = ImageOps.exif_transpose(opened)
            image.load()
        rgb, alpha = to_rgb_and_alpha(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise ImageReadError(f"{_source_name(source)}: cannot decode the image ({type(error).__name__}: {error}); "
                             "re-export it or remove it, and check the dataset with tools/check_dataset.py") from error
    if keep_alpha and alpha is None:
        alpha = Image.new("L", rgb.size, 255)
    return LoadedImage(rgb=rgb, alpha=alpha if keep_alpha else None,
                       full_size=full_size if full_size != rgb.size else None)


def load_rgb(source: ImageSource, *, cover_bucket: Size | None = None) -> Image.Image:
    """:func:`load_image` without the alpha: for conditioning images. With ``cover_bucket`` the result may be
    a reduced decode (see :func:`load_image`), which :func:`apply_crop_plan` accepts."""
    return load_image(source, cover_bucket=cover_bucket).rgb


# --------------------------------------------------------------------------------------------------
# Geometry: one plan, applied identically to every image of a sample
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropPlan:
    """Resize ``original_size`` -> ``resized_size`` (covers the bucket), crop ``bucket`` at
    ``crop_left_top``, then mirror if ``flipped``. All sizes are (width, height)."""

    original_size: Size
    resized_size: Size
    crop_left_top: Size  # (left, top) in the resized image, before any flip
    bucket: Size
    flipped: bool
    interpolation: str | None = None  # a RESIZE_FILTERS name; None: LANCZOS

    @property
    def original_size_hw(self) -> tuple[int, int]:
        """SDXL ``original_size`` as (height, width): the decoded image size before any resize."""
        return self.original_size[1], self.original_size[0]

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """SDXL ``crops_coords_top_left`` as (top, left): the true offset, mirrored when flipped."""
        return crop_top_left(self.bucket, self.resized_size, self.crop_left_top, self.flipped)

    @property
    def target_size_hw(self) -> tuple[int, int]:
        """SDXL ``target_size`` as (height, width): the bucket."""
        return self.bucket[1], self.bucket[0]


def plan_crop(
    image_size: Size, bucket: Size, *, random_crop: bool, flip_aug: bool, rng: random.Random,
    interpolation: str | None = None,
) -> CropPlan:
    """Decide the resize, crop and flip for one draw of an image (rng: the sample's seeded generator).

    The resize is computed from the *decoded* size, so a stale ``image_size`` in metadata cannot stretch
    the image; the bucket stays the one the sampler grouped it in. The rng draws the crop (two draws,
    only with ``random_crop``) and then the flip (one draw, only with ``flip_aug``).
    """
    resized, _ = cover_resize(image_size, bucket)
    left_top = crop_box(resized, bucket, random_crop, rng)
    flipped = flip_aug and rng.random() < 0.5
    return CropPlan(
        original_size=(image_size[0], image_size[1]),
        resized_size=resized,
        crop_left_top=left_top,
        bucket=(bucket[0], bucket[1]),
        flipped=flipped,
        interpolation=interpolation,
    )


def face_in_file_name(path: Path) -> tuple[int, int, int, int] | None:
    """kohya's face position in a file name, ``<name>_<cx>_<cy>_<w>_<h>.png`` (pixels of the original image),
    or None when the name does not end with four integers or the centre x is 0 (kohya: no face)."""
    tokens = path.stem.split("_")
    if len(tokens) < 5 or not all(t.isdigit() for t in tokens[-4:]):
        return None
    cx, cy, w, h = (int(t) for t in tokens[-4:])
    return (cx, cy, w, h) if cx > 0 and max(w, h) > 0 else None


def plan_face_crop(image_size: Size, bucket: Size, *, face: tuple[int, int, int, int], aug_range: tuple[float, float],
                   random_crop: bool, flip_aug: bool, rng: random.Random, interpolation: str | None = None) -> CropPlan:
    """kohya's --face_crop_aug_range crop: scale the image so the face's longer side is between
    ``bucket_short_side / aug_range[1]`` and ``/ aug_range[0]`` (never above 1, never below covering the
    bucket), then cut the bucket centred on the face (random_crop: shifted at random to show more background;
    a range that is not one value: jittered by up to 1/20 of the face size for faces of 40 px and more)."""
    width, height = image_size
    bucket_w, bucket_h = bucket
    cx, cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    short = min(bucket_w, bucket_h)
    cover = max(bucket_h / height, bucket_w / width)
    min_scale = min(1.0, max(cover, short / (face_size * aug_range[1])))
    max_scale = min(1.0, max(min_scale, short / (face_size * aug_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    scale = max(scale, cover)  # an image smaller than the bucket is enlarged to cover it (kohya stops there)
    resized = (max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5)))
    offsets = []
    for target, length, centre in ((bucket_h, resized[1], int(cy * scale + 0.5)),
                                   (bucket_w, resized[0], int(cx * scale + 0.5))):
        start = centre - target // 2
        if random_crop:
            spread = max(length - centre, centre)
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif aug_range[0] != aug_range[1] and face_size > short // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(start, length - target)))
    flipped = flip_aug and rng.random() < 0.5
    return CropPlan(original_size=(width, height), resized_size=resized, crop_left_top=(offsets[1], offsets[0]),
                    bucket=(bucket_w, bucket_h), flipped=flipped, interpolation=interpolation)


def _check_planned_size(size: Size, plan: CropPlan) -> None:
    """``size`` must be the plan's original size or a JPEG draft of it (1/2, 1/4, 1/8, rounded up)."""
    width, height = plan.original_size
    if size == plan.original_size or any(size == (-(-width // s), -(-height // s)) for s in (2, 4, 8)):
        return
    raise ValueError(f"image size {size} differs from the planned original size {plan.original_size}")


def _uses_fast_resize(image: Image.Image, plan: CropPlan) -> bool:
    return plan.interpolation not in RESIZE_FILTERS and image.mode in FAST_RESIZE_MODES


def crop_plan_array(image: Image.Image, plan: CropPlan) -> np.ndarray:
    """:func:`apply_crop_plan` as uint8 pixels (H, W, C) or (H, W) for "L", without a PIL image at the end
    (a view; :func:`to_uint8_tensor` makes the one copy). Only for the 8-bit modes the fast resize takes."""
    if image.mode not in FAST_RESIZE_MODES:
        raise ValueError(f"crop_plan_array takes {sorted(FAST_RESIZE_MODES)} images, got mode {image.mode}")
    _check_planned_size(image.size, plan)
    if image.size == plan.resized_size:
        array = np.asarray(image)
    elif _uses_fast_resize(image, plan):
        array = resize_uint8(np.array(image), plan.resized_size)
    else:
        array = np.asarray(image.resize(plan.resized_size, RESIZE_FILTERS[plan.interpolation or ""]))
    left, top = plan.crop_left_top
    array = array[top:top + plan.bucket[1], left:left + plan.bucket[0]]
    return array[:, ::-1] if plan.flipped else array


def apply_crop_plan(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize, crop and flip ``image`` exactly as ``plan`` says: THE function for the target image, its
    alpha mask and a ControlNet conditioning image, so they stay pixel-aligned.

    ``image`` must have the plan's original size, or be a reduced JPEG decode of it (``load_image``'s
    ``cover_bucket``); a conditioning image of another size is a dataset problem reported at start-up,
    not something to stretch silently.
    """
    if image.mode in FAST_RESIZE_MODES:
        return Image.fromarray(np.ascontiguousarray(crop_plan_array(image, plan)), mode=image.mode)
    _check_planned_size(image.size, plan)
    if image.size != plan.resized_size:
        image = image.resize(plan.resized_size, RESIZE_FILTERS.get(plan.interpolation or "", RESAMPLE))
    left, top = plan.crop_left_top
    image = image.crop((left, top, left + plan.bucket[0], top + plan.bucket[1]))
    if plan.flipped:
        image = ImageOps.mirror(image)
    return image


def draft_bucket(plan: CropPlan) -> Size | None:
    """The ``cover_bucket`` to load an image for ``plan`` with: its bucket when the plan resizes to cover it
    (``plan_crop``), None for face crops, which may keep more pixels than that."""
    return plan.bucket if plan.resized_size == cover_resize(plan.original_size, plan.bucket)[0] else None


# --------------------------------------------------------------------------------------------------
# Colour and tensors
# --------------------------------------------------------------------------------------------------


def color_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """Hue rotation in ±8° and brightness x[0.9, 1.1] (HSV value), drawn from ``rng`` (two draws)."""
    hue_shift = rng.uniform(-HUE_JITTER_DEGREES, HUE_JITTER_DEGREES) / 360.0 * 256.0
    brightness = rng.uniform(1.0 - BRIGHTNESS_JITTER, 1.0 + BRIGHTNESS_JITTER)
    hsv = np.asarray(image.convert("HSV"), dtype=np.float32)
    hue = np.mod(np.rint(hsv[..., 0] + hue_shift), 256.0)  # hue wraps around
    value = np.clip(np.rint(hsv[..., 2] * brightness), 0.0, 255.0)
    channels = [Image.fromarray(np.ascontiguousarray(c, dtype=np.uint8)) for c in (hue, hsv[..., 1], value)]
    return Image.merge("HSV", channels).convert("RGB")


def to_uint8_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (or (H, W, 3) uint8 pixels) -> uint8 tensor (3, H, W): what a Sample carries; the model
    sees :func:`normalize_pixels` of it (other modes are converted by their meaning, see :func:`to_rgb_and_alpha`)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image if image.mode == "RGB" else to_rgb_and_alpha(image)[0])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"to_uint8_tensor takes (H, W, 3) uint8 pixels, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1], the range the VAE expects (other modes are converted
    by their meaning, see :func:`to_rgb_and_alpha`). The latent-cache filler uses it; training Samples carry
    :func:`to_uint8_tensor` and normalise on the device."""
    if image.mode != "RGB":
        image = to_rgb_and_alpha(image)[0]
    # numpy, not torch ops: torch's intra-op thread pool made this 10x slower in the main process
    # (num_workers=0) on a small machine; the result is identical.
    array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    array /= 127.5
    array -= 1.0
    return torch.from_numpy(array)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """"L" mask -> float32 tensor (H, W) in [0, 1] (1 = fully opaque, trained on)."""
    array = np.asarray(mask.convert("L"), dtype=np.uint8).astype(np.float32)
    array /= 255.0
    return torch.from_numpy(array)
