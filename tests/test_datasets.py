"""Records, start-up checks, image transforms and batches: library/data/{records,record_sources,dataset_index,datasets,images}.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.buckets import BucketBatchSampler
from library.data.captions import CaptionOptions
from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data import datasets
from library.data.datasets import (
    Batch,
    BucketKey,
    KeyedBatchSampler,
    SampleKey,
    TrainingDataset,
    build_bucket_sampler_inputs,
    collate_samples,
    make_batch_sampler,
)
from library.data.dataset_index import build_dataset_index, load_dataset_index
from library.data.record_sources import collect_records
from library.data.records import DatasetProblems
from library.data.images import CropPlan, apply_crop_plan, load_image, plan_crop, read_image_size, verify_image
from library.data.pixels import normalize_pixels

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def save(path: Path, array_or_size, color=(128, 64, 32), **save_kwargs) -> Path:
    """Write an image: from a uint8 HxWxC array, or a (w, h) size filled with ``color``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(array_or_size, np.ndarray):
        image = Image.fromarray(array_or_size)
    else:
        image = Image.new("RGB", array_or_size, color)
    image.save(path, **save_kwargs)
    return path


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def dreambooth(*subsets: SubsetConfig, **kwargs) -> DatasetConfig:
    kwargs.setdefault("resolution", (64, 64))
    return DatasetConfig(kind="dreambooth", subsets=subsets, **kwargs)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """A Sample's (3, H, W) uint8 pixels -> (H, W, 3) as int64 (so differences do not wrap around)."""
    assert tensor.dtype == torch.uint8
    return tensor.permute(1, 2, 0).numpy().astype(np.int64)


def by_name(records) -> dict:
    return {r.image_path.name: r for r in records}


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def test_metadata_json_resolves_absolute_relative_and_stem_keys(tmp_path: Path) -> None:
    images = tmp_path / "images"
    a = save(images / "a.png", (64, 48))
    save(images / "b.jpg", (80, 64))
    save(images / "c.PNG", (96, 64))  # stem key, extension in upper case
    save(images / "sub" / "d.webp", (64, 64))
    metadata = {
        str(a): {"caption": "abs key"},
        "b.jpg": {"tags": "t1, t2"},
        "c": {"caption": "stem key", "tags": "x", "image_size": [96, 64], "train_resolution": [128, 64]},
        "sub/d": {"caption": "relative stem"},
    }
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(metadata))
    subset = SubsetConfig(image_dir=images, metadata_file=meta, num_repeats=3)
    index = collect_records([DatasetConfig(kind="finetuning", subsets=(subset,))])

    assert index.problems == ()
    records = by_name(index.records)
    assert set(records) == {"a.png", "b.jpg", "c.PNG", "d.webp"}
    assert records["a.png"].caption == "abs key" and records["a.png"].tags is None
    assert records["a.png"].image_size == (64, 48) and not records["a.png"].size_from_metadata
    assert records["b.jpg"].caption is None and records["b.jpg"].tags == "t1, t2"
    assert records["c.PNG"].image_size == (96, 64) and records["c.PNG"].size_from_metadata
    assert records["c.PNG"].train_resolution == (128, 64)
    assert records["d.webp"].image_path == images / "sub" / "d.webp"
    assert all(r.num_repeats == 3 and r.caption_source == "metadata" for r in index.records)


def test_metadata_jsonl(tmp_path: Path) -> None:
    save(tmp_path / "img" / "x.png", (64, 64))
    save(tmp_path / "img" / "y.jpeg", (64, 128))
    lines = [
        {"image_path": "x.png", "caption": "first", "tags": "a, b", "image_size": [64, 64]},
        {"image_path": "y", "caption": "second"},
    ]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    subset = SubsetConfig(image_dir=tmp_path / "img", metadata_file=meta)
    index = collect_records([DatasetConfig(kind="finetuning", subsets=(subset,))])
    assert index.problems == ()
    records = by_name(index.records)
    assert records["x.png"].tags == "a, b" and records["x.png"].size_from_metadata
    assert records["y.jpeg"].caption == "second" and records["y.jpeg"].image_size == (64, 128)


def test_dreambooth_sidecars_and_class_token_fallback(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    save(folder / "a.png", (64, 64))
    save(folder / "b.jpg", (64, 64))
    save(folder / "c.JPEG", (64, 64))
    (folder / "a.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    (folder / "c.txt").write_bytes("\ufeffbom caption".encode("utf-8"))
    (folder / "notes.md").write_text("not an image")
    (folder / "._a.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    plain = SubsetConfig(image_dir=folder, caption_extension=".txt", class_tokens="sks dog")
    index = collect_records([dreambooth(plain)])
    assert index.problems == ()
    records = by_name(index.records)
    assert set(records) == {"a.png", "b.jpg", "c.JPEG"}
    assert records["a.png"].caption == "first line" and records["a.png"].caption_source == "caption_file"
    assert records["b.jpg"].caption == "sks dog" and records["b.jpg"].caption_source == "class_tokens"
    assert records["c.JPEG"].caption == "bom caption"

    wild = SubsetConfig(image_dir=folder, caption_extension=".txt", class_tokens="sks dog",
                        captions=CaptionOptions(enable_wildcard=True))
    records = by_name(collect_records([dreambooth(wild)]).records)
    assert records["a.png"].caption == "first line\nsecond line"


def test_image_without_caption_or_class_tokens_is_a_problem(tmp_path: Path) -> None:
    save(tmp_path / "a.png", (64, 64))
    index = collect_records([dreambooth(SubsetConfig(image_dir=tmp_path, caption_extension=".txt"))])
    assert len(index.problems) == 1
    assert "a.png" in index.problems[0].location and "class_tokens" in index.problems[0].what


def test_controlnet_pairs_by_stem_and_reports_missing_extra_and_size_mismatch(tmp_path: Path) -> None:
    images, cond = tmp_path / "images", tmp_path / "cond"
    for name in ("a", "b", "c"):
        save(images / f"{name}.png", (64, 64))
    save(cond / "a.jpg", (64, 64))  # any extension pairs
    save(cond / "b.png", (64, 80))  # size mismatch
    save(cond / "z.png", (64, 64))  # extra; c has none
    subset = SubsetConfig(image_dir=images, conditioning_data_dir=cond, class_tokens="x")
    index = collect_records([DatasetConfig(kind="controlnet", subsets=(subset,))])

    assert by_name(index.records)["a.png"].conditioning_path == cond / "a.jpg"
    text = "\n".join(str(p) for p in index.problems)
    assert len(index.problems) == 3, text
    assert "b.png" in text and "64x80" in text  # size mismatch
    assert "no conditioning image named c" in text  # missing
    assert "z.png" in text and "no target image" in text  # extra
    with pytest.raises(DatasetProblems):
        load_dataset_index([DatasetConfig(kind="controlnet", subsets=(subset,))])


def test_regularisation_repeats_are_raised_round_robin(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / "train" / f"t{i}.png", (64, 64))
    for i in range(4):
        save(tmp_path / "reg" / f"r{i}.png", (64, 64))
    train = SubsetConfig(image_dir=tmp_path / "train", num_repeats=2, class_tokens="sks dog")
    reg = SubsetConfig(image_dir=tmp_path / "reg", is_reg=True, class_tokens="dog")
    index = collect_records([dreambooth(train, reg)])
    reg_repeats = [r.num_repeats for r in index.records if r.is_reg]
    assert reg_repeats == [2, 2, 1, 1]  # 4 registered, then +1 for r0 and r1: 6 = 3 x 2 train samples
    assert sum(reg_repeats) == sum(r.num_repeats for r in index.records if not r.is_reg)
    assert index.unused_reg_images == ()

    few = SubsetConfig(image_dir=tmp_path / "train", num_repeats=1, class_tokens="sks dog")
    index = collect_records([dreambooth(few, reg)])
    assert [r.num_repeats for r in index.records if r.is_reg] == [1, 1, 1]
    assert [p.name for p in index.unused_reg_images] == ["r3.png"]


def test_every_startup_problem_is_reported_in_one_exception(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    (folder).mkdir()
    (folder / "garbage.png").write_bytes(b"this is not a png")
    good = save(folder / "ok.png", noise(64, 64))
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    save(folder / "latin1.png", (64, 64))
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    save(folder / "empty.png", (64, 64))
    (folder / "empty.txt").write_text("  \n\n")
    db = SubsetConfig(image_dir=folder, caption_extension=".txt", class_tokens="thing")

    images = tmp_path / "ft"
    save(images / "one.png", (64, 64))
    save(images / "two.png", (64, 64))
    meta = tmp_path / "meta.json"
    # "two.png" twice (json.load keeps the last silently), "one" and "one.png" name the same image
    meta.write_text('{"two.png": {"caption": "a"}, "two.png": {"caption": "b"}, '
                    '"one": {"caption": "c"}, "one.png": {"caption": "d"}, "missing": {"caption": "e"}}')
    ft = SubsetConfig(image_dir=images, metadata_file=meta)

    with pytest.raises(DatasetProblems) as caught:
        load_dataset_index([dreambooth(db), DatasetConfig(kind="finetuning", subsets=(ft,))])
    message = str(caught.value)
    problems = caught.value.problems
    assert len(problems) == 7, message
    for expected in ("garbage.png", "truncated.png", "latin1.txt", "not UTF-8", "empty.txt", "is empty",
                     "'missing'", "image not found", "'two.png' appears more than once",
                     "keys 'one' and 'one.png' both refer to"):
        assert expected in message, expected
    assert all(p.fix for p in problems)


def test_too_small_image_under_bucket_no_upscale_names_the_file(tmp_path: Path) -> None:
    save(tmp_path / "tiny.png", (40, 100))
    save(tmp_path / "fine.png", (128, 128))
    subset = SubsetConfig(image_dir=tmp_path, class_tokens="x")
    config = dreambooth(subset, resolution=(128, 128), enable_bucket=True, bucket_no_upscale=True)
    index = build_dataset_index([config])
    assert [r.image_path.name for r in index.records] == ["fine.png"]
    assert [r.image_path.name for r in index.dropped] == ["tiny.png"]
    assert len(index.problems) == 1 and "tiny.png" in index.problems[0].location
    assert "40x100" in index.problems[0].what


def test_stale_metadata_image_size_is_a_problem(tmp_path: Path) -> None:
    save(tmp_path / "a.png", (64, 96))
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"a": {"caption": "x", "image_size": [96, 64]}}))
    subset = SubsetConfig(image_dir=tmp_path, metadata_file=meta)
    index = build_dataset_index([DatasetConfig(kind="finetuning", subsets=(subset,))])
    assert len(index.problems) == 1 and "differs" in index.problems[0].what


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, :40] = (255, 0, 0)  # left half red
    array[:, 40:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = save(tmp_path / "rot.jpg", array, exif=exif.tobytes(), quality=95)
    assert read_image_size(path) == (40, 80)
    rgb = np.asarray(load_image(path).rgb)
    assert rgb.shape == (80, 40, 3)
    assert rgb[10, 20, 0] > 200 and rgb[10, 20, 2] < 60  # top is the old left: red
    assert rgb[70, 20, 2] > 200 and rgb[70, 20, 0] < 60  # bottom is the old right: blue


def test_rgba_composited_on_white_or_alpha_kept_as_mask(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, 32:, 3] = 255  # left half transparent (black RGB underneath), right opaque
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    plain = load_image(path)
    assert plain.alpha is None
    rgb = np.asarray(plain.rgb)
    assert tuple(rgb[5, 5]) == (255, 255, 255) and tuple(rgb[5, 50]) == (10, 20, 30)
    masked = load_image(path, keep_alpha=True)
    assert tuple(np.asarray(masked.rgb)[5, 5]) == (255, 255, 255)
    alpha = np.asarray(masked.alpha)
    assert alpha[5, 5] == 0 and alpha[5, 50] == 255

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(load_image(tmp_path / "p.png").rgb)
    assert tuple(rgb[0, 0]) == (200, 0, 0) and tuple(rgb[4, 4]) == (255, 255, 255)

    # in a batch: the alpha_mask subset gives (B, H, W) masks in [0, 1]
    subset = SubsetConfig(image_dir=tmp_path, alpha_mask=True, class_tokens="x")
    dataset = TrainingDataset(load_dataset_index([dreambooth(subset)]), seed=0)
    batch = collate_samples([dataset[0]])
    assert batch.alpha_masks.shape == (1, 64, 64)
    assert batch.alpha_masks[0, 5, 5] == 0.0 and batch.alpha_masks[0, 5, 50] == 1.0


def coordinate_image(width: int, height: int, divide: int = 1) -> np.ndarray:
    """R = x // divide, G = y // divide: the crop offset can be read back from the output pixels."""
    x = np.arange(width) // divide
    y = np.arange(height) // divide
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = x[None, :]
    array[..., 1] = y[:, None]
    return array


def test_true_crop_offsets_with_and_without_flip(tmp_path: Path) -> None:
    save(tmp_path / "wide.png", coordinate_image(200, 64))
    save(tmp_path / "tall.png", coordinate_image(64, 200))
    subset = SubsetConfig(image_dir=tmp_path, class_tokens="x", random_crop=True, flip_aug=True)
    index = load_dataset_index([dreambooth(subset, resolution=(64, 64))])
    dataset = TrainingDataset(index, seed=1)
    seen_flips, lefts, tops = set(), set(), set()
    for epoch in range(1, 9):
        for sample_index, name in ((0, "tall.png"), (1, "wide.png")):
            sample = dataset[SampleKey(sample_index, epoch, 0)]
            assert sample.image_path.endswith(name)
            pixels = to_uint8(sample.pixel_values)
            top, left = sample.plan.crop_top_left
            assert sample.plan.original_size_hw == ((200, 64) if name == "tall.png" else (64, 200))
            assert sample.plan.target_size_hw == (64, 64)
            if name == "wide.png":
                lefts.add(left)
                # the output's column 0 is column `left` of the (possibly mirrored) resized image
                expected = 199 - (left + np.arange(64)) if sample.plan.flipped else left + np.arange(64)
                assert np.array_equal(pixels[0, :, 0], expected)
                seen_flips.add(sample.plan.flipped)
            else:
                tops.add(top)
                assert left == 0
                assert np.array_equal(pixels[:, 0, 1], top + np.arange(64))
    assert seen_flips == {True, False} and len(lefts) > 2 and len(tops) > 2


def test_crop_offset_is_in_resized_pixels_after_a_downscale(tmp_path: Path) -> None:
    save(tmp_path / "wide.png", coordinate_image(400, 128, divide=2))  # resized 2x down to 200x64
    subset = SubsetConfig(image_dir=tmp_path, class_tokens="x", random_crop=True)
    dataset = TrainingDataset(load_dataset_index([dreambooth(subset, resolution=(64, 64))]), seed=0)
    for epoch in range(1, 5):
        sample = dataset[SampleKey(0, epoch, 0)]
        assert sample.plan.resized_size == (200, 64) and sample.plan.original_size_hw == (128, 400)
        _, left = sample.plan.crop_top_left
        row = to_uint8(sample.pixel_values)[32, 4:60, 0]
        assert np.abs(row - (left + np.arange(4, 60))).max() <= 1


def test_conditioning_image_stays_pixel_aligned(tmp_path: Path) -> None:
    images, cond = tmp_path / "images", tmp_path / "cond"
    for i, (w, h) in enumerate([(150, 100), (90, 160), (130, 130)]):
        array = noise(w, h, seed=i)
        save(images / f"im{i}.png", array)
        save(cond / f"im{i}.bmp", array)  # same pixels, other format
    subset = SubsetConfig(image_dir=images, conditioning_data_dir=cond, class_tokens="x",
                          random_crop=True, flip_aug=True)
    config = DatasetConfig(kind="controlnet", subsets=(subset,), resolution=(128, 128), enable_bucket=True,
                           min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)
    dataset = TrainingDataset(load_dataset_index([config]), seed=5)
    flips, offsets = set(), set()
    for epoch in range(1, 7):
        for index in range(len(dataset)):
            sample = dataset[SampleKey(index, epoch, 0)]
            assert sample.conditioning_pixel_values is not None
            assert torch.equal(sample.pixel_values, sample.conditioning_pixel_values)
            flips.add(sample.plan.flipped)
            offsets.add(sample.plan.crop_left_top)
    assert flips == {True, False} and len(offsets) > 3


def test_verify_image_catches_truncated_jpeg_and_png(tmp_path: Path) -> None:
    for name in ("a.jpg", "a.png"):
        good = save(tmp_path / name, noise(96, 64))
        assert verify_image(good) == (96, 64)
        bad = tmp_path / f"cut_{name}"
        bad.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
        with pytest.raises(ValueError, match="runcated"):
            verify_image(bad)


def test_color_aug_changes_pixels_but_not_captions(tmp_path: Path) -> None:
    plain = TrainingDataset(load_dataset_index([make_mixed_dataset(tmp_path)], min_step=32), seed=3)
    jitter = TrainingDataset(load_dataset_index([make_mixed_dataset(tmp_path, color_aug=True)], min_step=32), seed=3)
    a, b = plain[SampleKey(1, 2, 0)], jitter[SampleKey(1, 2, 0)]
    assert a.caption == b.caption and a.plan == b.plan
    difference = (normalize_pixels(a.pixel_values) - normalize_pixels(b.pixel_values)).abs().mean().item()
    assert 0.0 < difference < 0.2  # a small jitter
    assert torch.equal(b.pixel_values, jitter[SampleKey(1, 2, 0)].pixel_values)  # seeded


def test_apply_crop_plan_rejects_a_differently_sized_image() -> None:
    plan = plan_crop((100, 80), (64, 64), random_crop=False, flip_aug=False, rng=random.Random(0))
    assert isinstance(plan, CropPlan)
    with pytest.raises(ValueError):
        apply_crop_plan(Image.new("RGB", (80, 100)), plan)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def make_mixed_dataset(tmp_path: Path, **subset_kwargs) -> DatasetConfig:
    folder = tmp_path / "mixed"
    sizes = [(128, 128), (160, 96), (96, 160), (128, 128), (140, 100), (100, 140), (128, 120), (96, 96)]
    for i, size in enumerate(sizes):
        save(folder / f"img{i}.png", noise(*size, seed=i))
        (folder / f"img{i}.txt").write_text(f"keep{i}, alpha, beta, gamma, delta, epsilon")
    subset = SubsetConfig(image_dir=folder, caption_extension=".txt", num_repeats=2, **subset_kwargs)
    return dreambooth(subset, resolution=(128, 128), enable_bucket=True, min_bucket_reso=64,
                      max_bucket_reso=256, bucket_reso_steps=32, batch_size=3)


def make_loader(index, seed: int, num_workers: int, epoch: int = 1, first_step: int = 0):
    sampler = make_batch_sampler(build_bucket_sampler_inputs(index), seed)
    sampler.set_epoch(epoch, first_step)
    return datasets.make_loader(TrainingDataset(index, seed=seed), sampler, num_workers=num_workers)


def test_batch_shapes_and_dtypes(tmp_path: Path) -> None:
    index = load_dataset_index([make_mixed_dataset(tmp_path, flip_aug=True)], min_step=32)
    batches = list(make_loader(index, seed=0, num_workers=0))
    assert sum(len(b.captions) for b in batches) == 16  # 8 images x 2 repeats
    for batch in batches:
        b, _, h, w = batch.pixel_values.shape
        assert batch.pixel_values.dtype == torch.uint8  # normalised to [-1, 1] on the device
        normalized = normalize_pixels(batch.pixel_values)
        assert normalized.dtype == torch.float32 and -1.0 <= normalized.min() and normalized.max() <= 1.0
        for key in ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw"):
            assert getattr(batch, key).shape == (b, 2) and getattr(batch, key).dtype == torch.long
        assert (batch.target_sizes_hw == torch.tensor([h, w])).all()
        assert batch.flipped.dtype == torch.bool and batch.flipped.shape == (b,)
        assert batch.is_reg.dtype == torch.bool and not batch.is_reg.any()
        assert batch.alpha_masks is None and batch.conditioning_pixel_values is None
        assert len(batch.captions) == len(batch.image_paths) == b
        sizes = {tuple(Image.open(p).size[::-1]) for p in batch.image_paths}
        assert {tuple(s) for s in batch.original_sizes_hw.tolist()} == sizes


def test_collate_returns_a_batch_of_one_bucket_with_masks(tmp_path: Path) -> None:
    """Two buckets (wide, tall), two images each: every Batch holds one bucket, with a mask per image."""
    for i, (width, height) in enumerate([(96, 64), (96, 64), (64, 96), (64, 96)]):
        rgba = np.full((height, width, 4), 255, dtype=np.uint8)
        rgba[: height // 2, :, 3] = 0  # top half transparent, bottom half opaque
        Image.fromarray(rgba).save(tmp_path / f"img{i}.png")
    subset = SubsetConfig(image_dir=tmp_path, alpha_mask=True, class_tokens="x")
    config = dreambooth(subset, resolution=(64, 64), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                        bucket_reso_steps=32, batch_size=2)
    batches = list(make_loader(load_dataset_index([config], min_step=32), seed=0, num_workers=0))
    assert len(batches) == 2 and all(isinstance(batch, Batch) for batch in batches)
    assert len({tuple(batch.target_sizes_hw[0].tolist()) for batch in batches}) == 2
    for batch in batches:
        assert batch.pixel_values is not None and batch.latents is None
        b, channels, h, w = batch.pixel_values.shape
        assert (b, channels) == (2, 3) and len(batch) == len(batch.captions) == len(batch.image_paths) == 2
        assert batch.alpha_masks is not None and batch.alpha_masks.shape == (2, h, w)
        assert (batch.alpha_masks[:, 0] == 0).all() and (batch.alpha_masks[:, -1] == 1).all()
        for sizes in (batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw):
            assert sizes.shape == (2, 2) and sizes.dtype == torch.long
        assert (batch.target_sizes_hw == torch.tensor([h, w])).all()
        assert batch.is_reg.shape == batch.flipped.shape == (2,) and batch.is_reg.dtype == torch.bool
        assert batch.conditioning_pixel_values is None and batch.text_hidden_states is None
        assert batch.text_pooled is None


def test_same_batches_with_0_and_2_workers(tmp_path: Path) -> None:
    config = make_mixed_dataset(tmp_path, flip_aug=True, random_crop=True, color_aug=True,
                                captions=CaptionOptions(shuffle_caption=True, keep_tokens=1))
    index = load_dataset_index([config], min_step=32)
    serial = list(make_loader(index, seed=7, num_workers=0, epoch=2, first_step=10))
    parallel = list(make_loader(index, seed=7, num_workers=2, epoch=2, first_step=10))
    assert len(serial) == len(parallel) > 1
    for a, b in zip(serial, parallel):
        assert a.image_paths == b.image_paths and a.captions == b.captions
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert torch.equal(a.crop_top_lefts, b.crop_top_lefts) and torch.equal(a.flipped, b.flipped)
    other_epoch = list(make_loader(index, seed=7, num_workers=0, epoch=3))
    assert [b.captions for b in other_epoch] != [b.captions for b in serial]


def test_caption_pipeline_is_applied(tmp_path: Path) -> None:
    config = make_mixed_dataset(tmp_path, captions=CaptionOptions(shuffle_caption=True, keep_tokens=1,
                                                                  caption_prefix="photo of"))
    dataset = TrainingDataset(load_dataset_index([config], min_step=32), seed=0)
    prompts = [dataset[SampleKey(0, epoch, 0)].caption for epoch in range(1, 11)]
    for prompt in prompts:
        tokens = prompt.split(", ")
        assert tokens[0] == "photo of keep0"  # prefix joined by a space, kept token first
        assert sorted(tokens[1:]) == ["alpha", "beta", "delta", "epsilon", "gamma"]
    assert len(set(prompts)) > 3  # shuffled differently per epoch


def test_keyed_sampler_carries_epoch_and_step() -> None:
    sampler = KeyedBatchSampler([[0, 1], [2, 3], [4, 5]], batches_per_step=2)
    sampler.set_epoch(4, first_step=10)
    batches = list(sampler)
    assert batches[0] == [SampleKey(0, 4, 10), SampleKey(1, 4, 10)]
    assert [b[0].step for b in batches] == [10, 10, 11] and len(sampler) == 3


def test_batches_never_mix_datasets_and_batch_sizes_must_agree(tmp_path: Path) -> None:
    save(tmp_path / "one" / "a.png", (64, 64))
    save(tmp_path / "two" / "b.png", (64, 64))
    first = dreambooth(SubsetConfig(image_dir=tmp_path / "one", class_tokens="x", num_repeats=2))
    second = dreambooth(SubsetConfig(image_dir=tmp_path / "two", class_tokens="y", num_repeats=2))
    inputs = build_bucket_sampler_inputs(load_dataset_index([first, second]))
    assert inputs.bucket_keys == (BucketKey(0, 64, 64),) * 2 + (BucketKey(1, 64, 64),) * 2
    batches = list(BucketBatchSampler(inputs.bucket_keys, 2, seed=0))
    assert sorted(sorted(b) for b in batches) == [[0, 1], [2, 3]]

    third = dreambooth(SubsetConfig(image_dir=tmp_path / "two", class_tokens="y"), batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        build_bucket_sampler_inputs(load_dataset_index([first, third]))


# --------------------------------------------------------------------------------------------------
# tools/check_dataset.py
# --------------------------------------------------------------------------------------------------


def test_check_dataset_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from tools import check_dataset

    train, reg = tmp_path / "train", tmp_path / "reg"
    save(train / "square.png", (128, 128))
    save(train / "wide.png", (384, 128))  # aspect 3: the 192x64 bucket
    save(train / "small.png", (64, 64))  # upscaled into 128x128
    (train / "square.txt").write_text("a caption")
    (train / "wide.txt").write_bytes(b"\xff\xfe bad")
    for i in range(5):
        save(reg / f"r{i}.png", (128, 128))
    bucketed = dict(resolution=(128, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256)
    config = dreambooth(SubsetConfig(image_dir=train, caption_extension=".txt", class_tokens="sks", num_repeats=2),
                        SubsetConfig(image_dir=reg, is_reg=True, class_tokens="thing"), **bucketed)
    report = check_dataset.check_datasets([config], min_step=64)

    assert (report.train_images, report.train_samples) == (3, 6)
    assert (report.reg_images, report.reg_samples, len(report.unused_reg_images)) == (5, 6, 0)
    rows = {row.bucket: row for row in report.buckets}
    assert rows[(128, 128)].images == 7 and rows[(128, 128)].upscaled == 1
    assert (rows[(192, 64)].images, rows[(192, 64)].samples, rows[(192, 64)].upscaled) == (1, 2, 0)
    assert report.coverage.caption == 1 and report.coverage.neither == 7 and report.coverage.class_tokens == 6
    assert not report.ok and len(report.problems) == 1 and "wide.txt" in report.problems[0].location
    assert "not UTF-8" in report.format()

    (train / "wide.txt").write_text("fixed")
    monkeypatch.setattr("tools.check_dataset.load_dataset_configs", lambda args: [config])
    assert check_dataset.main(["--family", "sd15"]) == 0
    assert "no problems found" in capsys.readouterr().out
