"""The loader's fast paths (issue 13, loader speed): JPEG draft decoding, the default resize filter, uint8
samples normalised on the device, and images from bytes: library/data/{images,pixels,datasets}.py,
library/training/loop._latents, library/cache/dataset_caching.load_job_pixels."""

from __future__ import annotations

import io
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from library.cache.dataset_caching import latent_jobs, load_job_pixels
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.dataset_index import load_dataset_index
from library.data.datasets import SampleKey, TrainingDataset, collate_samples
from library.data.images import (ImageReadError, crop_plan_array, load_image, plan_crop, to_tensor,
                                 to_uint8_tensor)
from library.data.pixels import normalize_pixels
from library.training.loop import _latents

# Tolerances, in levels of 0..255 (measured values in bench/RESULTS.md, "Loader speed"):
DRAFT_MEAN, DRAFT_MAX = 2.0, 48  # reduced JPEG decode + resize vs full decode + the same resize (1.4, 39 here)
FILTER_MEAN = 2.0  # the default filter vs PIL LANCZOS on a photo-like picture (0.9-1.3 measured on photo-like images)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shading, hard-edged shapes, thin lines and a little noise: what a photo's pixels look like to a
    resize filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 180.0 + 30.0
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.ellipse((x0, y0, x0 + int(rng.integers(8, width // 3)), y0 + int(rng.integers(8, height // 3))),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw.line((x0, 0, width - x0, height), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=2)
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0.0, 3.0, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, **save_kwargs)
    return buffer.getvalue()


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(diff.mean()), int(diff.max())


def test_draft_decoding_keeps_size_orientation_and_pixels(tmp_path: Path) -> None:
    """A JPEG 4x its bucket decodes at 1/4 (1/2 when EXIF-rotated by 90°, to keep covering), plans from its
    real size, and gives the pixels of a full decode within the stated tolerance."""
    upright = picture(512, 384)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (rotated 90° clockwise)
    cases = {"plain.jpg": (jpeg_bytes(upright), (128, 96), (512, 384)),
             "rotated.jpg": (jpeg_bytes(upright, exif=exif.tobytes()), (96, 128), (384, 512))}
    for name, (data, bucket, displayed) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        full = load_image(path)
        drafted = load_image(path, cover_bucket=bucket)
        assert full.original_size == drafted.original_size == displayed, name
        assert drafted.rgb.size == (displayed[0] // 4, displayed[1] // 4), name  # decoded 16x fewer pixels
        plan = plan_crop(drafted.original_size, bucket, random_crop=False, flip_aug=False, rng=random.Random(0))
        assert plan.original_size == displayed and plan.resized_size == bucket
        reference, reduced = crop_plan_array(full.rgb, plan), crop_plan_array(drafted.rgb, plan)
        assert reduced.shape == reference.shape == (bucket[1], bucket[0], 3)
        mean, worst = difference(reduced, reference)
        assert mean <= DRAFT_MEAN and worst <= DRAFT_MAX, (name, mean, worst)
        # orientation: the displayed image's top-left quadrant stays top-left
        expected = np.asarray(full.rgb.resize(bucket, Image.Resampling.BOX), dtype=np.float32)
        assert np.abs(reduced.astype(np.float32) - expected).mean() < 4.0, name
    # never below the covering size: a bucket needing more than half of the image decodes it whole
    assert load_image(tmp_path / "plain.jpg", cover_bucket=(320, 240)).rgb.size == (512, 384)
    png = tmp_path / "big.png"
    upright.save(png)
    assert load_image(png, cover_bucket=(128, 96)).rgb.size == (512, 384)  # only JPEG has DCT scaling


def test_default_filter_is_close_to_lanczos_and_equals_pil_bicubic() -> None:
    image = picture(300, 200, seed=3)
    for target in ((200, 133), (360, 240)):  # shrink and enlarge
        plans = {name: plan_crop(image.size, target, random_crop=False, flip_aug=False, rng=random.Random(0),
                                 interpolation=name) for name in (None, "lanczos", "bicubic")}
        pixels = {name: crop_plan_array(image, plan) for name, plan in plans.items()}
        mean, _ = difference(pixels[None], pixels["lanczos"])
        assert 0.0 < mean <= FILTER_MEAN, (target, mean)
        assert difference(pixels[None], pixels["bicubic"])[1] <= 1  # PIL's BICUBIC, antialiased, within rounding
    mask = Image.fromarray((np.asarray(image)[..., 0] > 128).astype(np.uint8) * 255, mode="L")
    plan = plan_crop(mask.size, (150, 100), random_crop=False, flip_aug=True, rng=random.Random(1))
    assert crop_plan_array(mask, plan).shape == (100, 150)  # "L" masks go through the same filter


def test_uint8_samples_normalise_on_the_device_to_the_old_float_values() -> None:
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    old = to_tensor(Image.fromarray(values[0].permute(1, 2, 0).numpy()))  # the float path Samples used to take
    assert torch.equal(normalize_pixels(values)[0], old)
    assert torch.equal(normalize_pixels(values, torch.bfloat16)[0], old.to(torch.bfloat16))
    assert torch.equal(normalize_pixels(old), old)  # float batches built by hand pass unchanged

    class RecordingVae(torch.nn.Module):
        def encode(self, pixels):
            self.seen = pixels
            return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator: pixels[:, :, ::8, ::8]))

    vae = RecordingVae()
    run = SimpleNamespace(vae=vae, vae_dtype=torch.float32, latent_scaling_factor=0.5, family=None)
    image = picture(64, 48)
    batch = SimpleNamespace(latents=None, pixel_values=to_uint8_tensor(image)[None], image_paths=["x"])
    _latents(run, batch, torch.device("cpu"), torch.Generator())
    assert batch.pixel_values.dtype == torch.uint8 and torch.equal(vae.seen, to_tensor(image)[None])
    # the ControlNet condition: (normalised + 1) / 2 is the old ([-1, 1] float + 1) / 2
    assert torch.equal((normalize_pixels(batch.pixel_values) + 1) / 2, (to_tensor(image)[None] + 1) / 2)


def test_samples_are_uint8_and_the_latent_cache_sees_the_same_pixels(tmp_path: Path) -> None:
    """Through the dataset: a big EXIF-rotated JPEG (drafted) and an RGBA PNG with alpha_mask; the latent-cache
    filler's pixels for the same crop equal the uncached sample's, draft included."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8
    (folder / "photo.jpg").write_bytes(jpeg_bytes(picture(512, 384, seed=5), exif=exif.tobytes()))
    rgba = np.zeros((96, 128, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:, 64:, 3] = 200, 255  # left half fully transparent: white; right half red
    Image.fromarray(rgba).save(folder / "cutout.png")
    subset = SubsetConfig(image_dir=folder, class_tokens="x", alpha_mask=True)
    index = load_dataset_index([DatasetConfig(kind="dreambooth", subsets=(subset,), resolution=(64, 64),
                                              enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                                              bucket_reso_steps=32)], min_step=32)
    dataset = TrainingDataset(index, seed=0)
    samples = {Path(s.image_path).name: s for s in (dataset[SampleKey(i)] for i in range(len(dataset)))}
    photo, cutout = samples["photo.jpg"], samples["cutout.png"]
    assert photo.plan.original_size_hw == (512, 384)  # rotated to portrait, the real size, not the decode's
    assert photo.pixel_values.dtype == cutout.pixel_values.dtype == torch.uint8
    assert photo.pixel_values.shape[1:] == photo.plan.target_size_hw
    white, red = cutout.pixel_values[:, :, :4], cutout.pixel_values[:, :, -4:]
    assert (white == 255).all() and (red[0] == 200).all() and (red[1:] == 0).all()
    assert cutout.alpha_mask is not None
    assert cutout.alpha_mask[:, :4].max() == 0 and cutout.alpha_mask[:, -4:].min() == 1
    assert photo.alpha_mask is not None and photo.alpha_mask.min() == 1  # a JPEG without alpha: all ones
    for job in latent_jobs(index):
        cached_pixels, _ = load_job_pixels(job, flipped=False)
        assert torch.equal(cached_pixels, normalize_pixels(samples[job.image_path.name].pixel_values)), job.image_path
    batch = collate_samples([photo, photo])
    assert batch.pixel_values.dtype == torch.uint8 and batch.pixel_values.shape[0] == 2


def test_load_image_from_bytes_equals_from_path(tmp_path: Path) -> None:
    rgba = np.asarray(picture(80, 60).convert("RGBA")).copy()
    rgba[:20, :, 3] = 0
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    jpeg = tmp_path / "b.jpg"
    jpeg.write_bytes(jpeg_bytes(picture(512, 384)))
    for source, kwargs in ((path, {"keep_alpha": True}), (jpeg, {"cover_bucket": (128, 96)})):
        from_path = load_image(source, **kwargs)
        from_bytes = load_image(io.BytesIO(source.read_bytes()), **kwargs)
        assert from_path.original_size == from_bytes.original_size
        assert np.array_equal(np.asarray(from_path.rgb), np.asarray(from_bytes.rgb))
        assert (from_path.alpha is None) == (from_bytes.alpha is None)
        if from_path.alpha is not None:
            assert np.array_equal(np.asarray(from_path.alpha), np.asarray(from_bytes.alpha))
    broken = path.read_bytes()[:100]
    with pytest.raises(ImageReadError, match="image bytes: cannot decode"):
        load_image(io.BytesIO(broken))
    (tmp_path / "cut.png").write_bytes(broken)
    with pytest.raises(ImageReadError, match="cut.png: cannot decode"):
        load_image(tmp_path / "cut.png")
