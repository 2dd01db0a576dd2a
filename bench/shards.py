"""Streamed webdataset shards vs the folder loader, and the stream's memory over 100k samples.

    python bench/shards.py [--count 32] [--workers 0 2] [--epochs 2] [--rss_samples 100000]

1. Throughput: ``--count`` synthetic 1024-px JPEGs (bench/dataloader.py's) are written once as a folder and
   once as shards (tools/make_webdataset.py's writer, the original JPEG bytes), both read at resolution 1024 with
   buckets 256-2048/64, flip + random crop, batch 4, no caching; images/s per worker count over ``--epochs`` timed
   epochs after one warm-up epoch, the two loaders alternating (best of two rounds), both with persistent
   workers. ``--shard_mb`` (default 4) makes enough shards that every worker reads some.
2. Memory: ``--rss_samples`` tiny JPEGs (24x24, one bucket at 64 px) in 64 MB shards streamed once with no
   worker; the process RSS is read at points along the epoch, and the growth per sample is the slope between
   the first point (after the shuffle buffer has filled) and the end.
Not run by CI.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dataloader import make_jpegs  # bench/dataloader.py, beside this script

from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.datasets import (TrainingDataset, build_bucket_sampler_inputs, make_batch_sampler,
                                    make_loader)
from library.data.dataset_index import load_dataset_index
from library.data.shard_config import load_shard_run
from library.data.shard_format import BucketSettings, encode_sample
from library.data.shard_plan import plan_layout
from library.data.shard_stream import ShardBatchControl, ShardStreamDataset, make_shard_loader
from library.data.shard_writing import ShardSetWriter


def _dataset(subset: SubsetConfig, *, resolution: int, batch_size: int, buckets: bool) -> DatasetConfig:
    return DatasetConfig(kind="dreambooth", subsets=(subset,), batch_size=batch_size,
                         resolution=(resolution, resolution), enable_bucket=buckets, min_bucket_reso=256,
                         max_bucket_reso=2048, bucket_reso_steps=64)


def _settings(config: DatasetConfig) -> BucketSettings:
    return BucketSettings(resolution=config.resolution, enable_bucket=config.enable_bucket,
                          min_bucket_reso=config.min_bucket_reso, max_bucket_reso=config.max_bucket_reso,
                          bucket_reso_steps=config.bucket_reso_steps, bucket_no_upscale=config.bucket_no_upscale)


def folder_images_per_second(folder: Path, workers: int, epochs: int, batch_size: int) -> float:
    """The folder loader of training (TrainingDataset + bucket sampler), persistent workers."""
    subset = SubsetConfig(image_dir=folder, caption_extension=".txt", flip_aug=True, random_crop=True)
    index = load_dataset_index([_dataset(subset, resolution=1024, batch_size=batch_size, buckets=True)], min_step=32,
                               verify_images=False)
    sampler = make_batch_sampler(build_bucket_sampler_inputs(index), seed=0)
    loader = make_loader(TrainingDataset(index, seed=0), sampler, num_workers=workers, persistent_workers=True)
    return timed_epochs(sampler.set_epoch, loader, epochs)


def timed_epochs(set_epoch, loader, epochs: int) -> float:
    """Images per second over ``epochs`` epochs after one untimed warm-up epoch (workers started, files cached)."""
    images, start = 0, 0.0
    for epoch in range(1, epochs + 2):
        if epoch == 2:
            start = time.perf_counter()
        set_epoch(epoch)
        for batch in loader:
            images += len(batch) if epoch >= 2 else 0
    return images / (time.perf_counter() - start)


def folder_to_shards(folder: Path, output: Path, batch_size: int, shard_mb: float) -> str:
    """The folder dataset written as shards (original file bytes, caption, bucket); returns the shard pattern."""
    config = _dataset(SubsetConfig(image_dir=folder, caption_extension=".txt"), resolution=1024,
                      batch_size=batch_size, buckets=True)
    index = load_dataset_index([config], min_step=32, verify_images=False)
    with ShardSetWriter(output, max_bytes=int(shard_mb * 10**6), bucket_settings=_settings(config)) as writer:
        for number, record in enumerate(index.records):
            bucket = record.bucket.bucket
            writer.write(encode_sample(number=number, image=record.image_path.read_bytes(), ext="jpg",
                                       image_key=record.image_path.name, caption=record.caption, tags=record.tags,
                                       original_size=record.image_size, bucket=bucket), bucket)
        written = writer.commit()
    return f"{output}/shard-{{000000..{len(written.shards) - 1:06d}}}.tar"


def stream_loader(pattern: str, *, workers: int, batch_size: int, resolution: int, buckets: bool, flip: bool,
                  random_crop: bool):
    subset = SubsetConfig(shards=pattern, flip_aug=flip, random_crop=random_crop)
    run = load_shard_run([_dataset(subset, resolution=resolution, batch_size=batch_size, buckets=buckets)])
    layout = plan_layout(run.source.units, world_size=1, workers=max(1, workers), batch_size=batch_size)
    control = ShardBatchControl(ShardStreamDataset(run.source, layout, rank=0, seed=0))
    return control, make_shard_loader(control.dataset, control, num_workers=workers, persistent_workers=True)


def stream_images_per_second(pattern: str, workers: int, epochs: int, batch_size: int) -> float:
    control, loader = stream_loader(pattern, workers=workers, batch_size=batch_size, resolution=1024, buckets=True,
                                    flip=True, random_crop=True)
    return timed_epochs(control.set_epoch, loader, epochs)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_per_sample(count: int, folder: Path, batch_size: int = 16) -> list[tuple[int, float]]:
    """(samples streamed, RSS MB) along one epoch over ``count`` tiny samples."""
    rng = np.random.default_rng(0)
    settings = BucketSettings(resolution=(64, 64), enable_bucket=False, min_bucket_reso=512, max_bucket_reso=2048,
                              bucket_reso_steps=64, bucket_no_upscale=False)
    images = []
    for i in range(16):  # a few distinct files, reused (their bytes are copied into every sample anyway)
        data = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(data, "JPEG", quality=90)
        images.append(data.getvalue())
    with ShardSetWriter(folder, max_bytes=64 * 10**6, bucket_settings=settings) as writer:
        for number in range(count):
            writer.write(encode_sample(number=number, image=images[number % 16], ext="jpg",
                                       image_key=f"img{number:06d}.jpg", caption=f"a photo number {number}",
                                       tags=None, original_size=(24, 24), bucket=(64, 64)), (64, 64))
        written = writer.commit()
    pattern = f"{folder}/shard-{{000000..{len(written.shards) - 1:06d}}}.tar"
    control, loader = stream_loader(pattern, workers=0, batch_size=batch_size, resolution=64, buckets=False,
                                    flip=True, random_crop=False)
    control.set_epoch(1)
    points, seen, every = [], 0, max(1, count // 10)
    for batch in loader:
        seen += len(batch)
        if seen % every < batch_size:
            points.append((seen, rss_mb()))
    points.append((seen, rss_mb()))
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--rss_samples", type=int, default=100_000)
    parser.add_argument("--shard_mb", type=float, default=4.0,
                        help="shard size for the throughput part: enough shards that every worker has some")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        folder.mkdir()
        make_jpegs(folder, args.count)
        pattern = folder_to_shards(folder, shards, args.batch_size, args.shard_mb)
        print(f"{args.count} JPEGs, {sum(p.stat().st_size for p in shards.glob('*.tar')) / 1e6:.1f} MB in "
              f"{len(list(shards.glob('*.tar')))} shards", flush=True)
        for workers in args.workers:
            rates = {"folder": [], "shards": []}
            for _ in range(2):  # alternate, so a change in the machine's load hits both
                rates["folder"].append(folder_images_per_second(folder, workers, args.epochs, args.batch_size))
                rates["shards"].append(stream_images_per_second(pattern, workers, args.epochs, args.batch_size))
            folder_rate, shard_rate = max(rates["folder"]), max(rates["shards"])
            print(f"{workers} workers: folder {folder_rate:.1f} images/s, shards {shard_rate:.1f} images/s "
                  f"({shard_rate / folder_rate:.2f}x)", flush=True)
    if args.rss_samples:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            points = rss_per_sample(args.rss_samples, Path(tmp))
            first, last = points[0], points[-1]
            growth = (last[1] - first[1]) * 1024 * 1024 / max(1, last[0] - first[0])
            print(f"RSS over {last[0]} streamed samples: " + ", ".join(f"{n // 1000}k {mb:.0f} MB" for n, mb in points))
            print(f"RSS growth {growth:.2f} bytes/sample between {first[0]} and {last[0]} samples "
                  f"({time.perf_counter() - start:.0f} s with writing)")


if __name__ == "__main__":
    main()
