"""Images/s from 1024-px JPEGs to bucketed (3, H, W) tensors through the real DataLoader path.

    python bench/dataloader.py [--count 32] [--workers 0 1 2] [--epochs 3]

Generates ``--count`` synthetic JPEGs (long side 1024, mixed aspect ratios, smooth content plus noise so
decoding costs what a photo costs) in a temporary folder, builds a DreamBooth dataset at 1024² with
buckets (steps 64, SDXL granularity), and times full epochs of
``make_loader(TrainingDataset, make_batch_sampler(...))`` (the training script's loader) per worker count.
Workers are persistent and one warm-up epoch is not timed, so the numbers are steady-state throughput.
Not run by CI.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.datasets import TrainingDataset, build_bucket_sampler_inputs, make_batch_sampler, make_loader
from library.data.dataset_index import load_dataset_index

SIZES = [(1024, 1024), (1024, 768), (768, 1024), (1024, 576), (576, 1024), (1024, 832), (832, 1024), (1024, 680)]


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs (quality 90) with a caption file each."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200.0
        pixels = np.clip(base + rng.normal(0.0, 20.0, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.jpg", quality=90)
        (folder / f"img{i:03d}.txt").write_text("a photo, of something, synthetic")


def images_per_second(folder: Path, workers: int, epochs: int, batch_size: int, flip: bool, random_crop: bool) -> float:
    """Steady-state images/s over ``epochs`` timed epochs (after one warm-up epoch)."""
    subset = SubsetConfig(image_dir=folder, caption_extension=".txt", flip_aug=flip, random_crop=random_crop)
    config = DatasetConfig(kind="dreambooth", subsets=(subset,), batch_size=batch_size, resolution=(1024, 1024),
                           enable_bucket=True, min_bucket_reso=512, max_bucket_reso=2048, bucket_reso_steps=64)
    index = load_dataset_index([config], min_step=32, verify_images=False)
    inputs = build_bucket_sampler_inputs(index)
    sampler = make_batch_sampler(inputs, seed=0)
    loader = make_loader(TrainingDataset(index, seed=0), sampler, num_workers=workers, persistent_workers=True)
    images = 0
    start = 0.0
    for epoch in range(1, epochs + 2):
        if epoch == 2:
            start = time.perf_counter()
        sampler.set_epoch(epoch)
        for batch in loader:
            if epoch >= 2:
                images += len(batch)
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--no_flip", action="store_true")
    parser.add_argument("--center_crop", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_jpegs(folder, args.count)
        start = time.perf_counter()
        load_dataset_index([DatasetConfig(kind="dreambooth", subsets=(SubsetConfig(
            image_dir=folder, caption_extension=".txt"),), resolution=(1024, 1024))], min_step=32)
        print(f"start-up index with full verification: {time.perf_counter() - start:.3f} s for {args.count} images")
        for workers in args.workers:
            rate = images_per_second(folder, workers, args.epochs, args.batch_size,
                                     flip=not args.no_flip, random_crop=not args.center_crop)
            print(f"num_workers={workers}: {rate:.1f} images/s")


if __name__ == "__main__":
    main()
