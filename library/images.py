"""Image files -> training pixels: load, resize to cover the bucket, crop, flip, colour jitter, to tensor.

The one place that touches pixels, so that the target image, its alpha mask and a ControlNet conditioning
image all go through *the same* geometric transform (:func:`apply_crop_plan`) and stay pixel-aligned::

    loaded = load_image(path, keep_alpha=subset.alpha_mask)          # EXIF-rotated, alpha on white
    plan = plan_crop(loaded.rgb.size, bucket, random_crop=..., flip_aug=..., rng=rng)
    pixels = to_tensor(apply_crop_plan(loaded.rgb, plan))            # (3, H, W) in [-1, 1]
    cond = to_tensor(apply_crop_plan(load_rgb(cond_path), plan))     # same resize, crop and flip
    plan.original_size_hw, plan.crop_top_left, plan.target_size_hw   # SDXL micro-conditioning

Choices, and why:

* **Resize filter: PIL LANCZOS, both directions.** PIL's filters are antialiased (the kernel support grows
  with the reduction factor), so a LANCZOS downscale is a windowed-sinc low-pass: no aliasing, like cv2's
  INTER_AREA, but sharper than INTER_AREA's box average. The same filter is right for the (rare) upscale,
  where INTER_AREA degenerates to bilinear, and it works unchanged on "RGB" images and "L" masks, so the
  alpha mask and the conditioning image get the identical resampling without PIL<->numpy round trips.
  Its cost (~20 ms per 1 MP output on one core) is the largest per-sample cost after JPEG decoding.
* **Transparency is composited on white.** Fully transparent pixels often hold arbitrary colours (black,
  or leftovers from editing) that the VAE would otherwise see; white is the usual "no background".
  With ``alpha_mask`` the RGB is still composited (the VAE sees the same clean image) and the alpha is
  returned as a mask in [0, 1] for the masked loss; an image without alpha gives an all-ones mask.
* **Colour augmentation** (``color_aug``): a hue rotation drawn uniformly in ±8° and a brightness
  (HSV value) factor in [0.9, 1.1], both from the sample's seeded ``random.Random``. It is applied to
  the training image only: a ControlNet conditioning image (edges, depth) must not change colour.
* **Integrity check** (:func:`verify_image`): PIL's ``verify()`` (PNG: every chunk CRC and the IEND
  chunk, so truncation and bit rot are caught; WebP: container structure), then a decode: JPEG in draft
  mode at 1/8 scale (the entropy decoder still reads the whole file, so truncation is caught, at ~4 ms
  for a 1024 px photo on one core), and WebP/BMP fully (they have no checksums). PNG is not decoded:
  its CRCs already cover every byte. A JPEG with flipped bits inside the entropy-coded data decodes
  "fine" and is not detected; nothing short of looking at it would notice.

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

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from library.buckets import Size, cover_resize, crop_box, crop_top_left
from library.metadata import IMAGE_EXTENSIONS  # one list for every reader of image folders

RESAMPLE = Image.Resampling.LANCZOS
HUE_JITTER_DEGREES = 8.0
BRIGHTNESS_JITTER = 0.1

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # 90° rotations: width and height swap
_WHITE = (255, 255, 255, 255)


def is_image_file(path: Path) -> bool:
    """True for the extensions in :data:`IMAGE_EXTENSIONS`, in any letter case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def _oriented_size(image: Image.Image) -> Size:
    """The displayed (EXIF-rotated) size, read from the header without decoding pixels."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: PIL's exif_transpose ignores it too
        orientation = 1
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def read_image_size(path: Path) -> Size:
    """(width, height) as displayed, i.e. after the EXIF orientation, from the header only.

    Raises OSError (PIL's UnidentifiedImageError is one) when the file is not a readable image.
    """
    with Image.open(path) as image:
        return _oriented_size(image)


def verify_image(path: Path) -> Size:
    """Check that ``path`` decodes (see the module docstring for what is checked) and return its size.

    Raises ValueError with PIL's reason when the file is corrupt or truncated.
    """
    try:
        with Image.open(path) as image:
            file_format = image.format
            image.verify()  # must come first after open, and leaves the image unusable: reopen
        with Image.open(path) as image:
            size = _oriented_size(image)
            if file_format != "PNG":
                if file_format == "JPEG":
                    image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
                image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ValueError(f"{type(error).__name__}: {error}") from error
    return size


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


@dataclass(frozen=True)
class LoadedImage:
    """An image as the model should see it: RGB (transparency on white) and, if asked for, the alpha."""

    rgb: Image.Image
    alpha: Image.Image | None  # mode "L"; all 255 for an image without transparency


def load_image(path: Path, keep_alpha: bool = False) -> LoadedImage:
    """Decode ``path``, apply its EXIF orientation and composite any transparency on white.

    ``keep_alpha`` (the subset's ``alpha_mask``) also returns the alpha channel as an "L" image, so the
    masked loss can ignore transparent areas.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    else:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        alpha = None
    if keep_alpha and alpha is None:
        alpha = Image.new("L", rgb.size, 255)
    return LoadedImage(rgb=rgb, alpha=alpha if keep_alpha else None)


def load_rgb(path: Path) -> Image.Image:
    """:func:`load_image` without the alpha: for conditioning images."""
    return load_image(path).rgb


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
    image_size: Size, bucket: Size, *, random_crop: bool, flip_aug: bool, rng: random.Random
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
    )


def apply_crop_plan(image: Image.Image, plan: CropPlan) -> Image.Image:
    """Resize, crop and flip ``image`` exactly as ``plan`` says: THE function for the target image, its
    alpha mask and a ControlNet conditioning image, so they stay pixel-aligned.

    ``image`` must have the plan's original size (a conditioning image of another size is a dataset
    problem reported at start-up, not something to stretch silently).
    """
    if image.size != plan.original_size:
        raise ValueError(f"image size {image.size} differs from the planned original size {plan.original_size}")
    if image.size != plan.resized_size:
        image = image.resize(plan.resized_size, RESAMPLE)
    left, top = plan.crop_left_top
    image = image.crop((left, top, left + plan.bucket[0], top + plan.bucket[1]))
    if plan.flipped:
        image = ImageOps.mirror(image)
    return image


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


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1], the range the VAE expects."""
    if image.mode != "RGB":
        image = image.convert("RGB")
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
