"""Assign buckets and cache latents for a fine-tuning metadata JSON (kohya's finetune/prepare_buckets_latents.py).

    python tools/prepare_buckets_latents.py train_data_dir meta_clean.json meta_lat.json MODEL \\
        --max_resolution 1024,1024 --min_bucket_reso 256 --max_bucket_reso 2048 --flip_aug --skip_existing

For every image of train_data_dir whose key (bare stem; relative path with --recursive; absolute path with
--full_path, as written by the merge tools) is in in_json, it picks the bucket exactly as training does
(``library.data.buckets`` via ``datasets.make_dataset_bucket_set``), encodes the centre crop with the model's
VAE (and the mirrored crop with --flip_aug) into kohya's ``<stem>_<WWWW>x<HHHH>_sd.npz`` /
``_sdxl.npz`` beside the image, and writes out_json (atomically) with each entry's ``train_resolution``
([w, h], the bucket) and ``image_size`` ([w, h], as displayed). Train on it with
``--in_json out_json --train_data_dir train_data_dir --cache_latents_to_disk`` and the same resolution and
bucket flags: the files are then valid and nothing is re-encoded; with other flags, training rebuilds them.

Where this differs from kohya's script:

* kohya's current script writes neither the npz files nor ``train_resolution``; this one writes both, in
  the format kohya's training and ours read.
* ``--skip_existing`` skips only VALID files (right latent shape, flip present if asked, image unchanged,
  same crop); a stale one is rebuilt. kohya checked the shape only.
* Images whose key is not in in_json are listed and left out (kohya adds an empty entry, which then
  trains on an empty caption); keys with no image are kept unchanged in out_json and listed.
* The family comes from the model (SD1/SD2/SDXL, any of our loadable formats); ``--v2`` only asserts SD2.
  The bucket step must suit it (multiples of 64 for SD1/SD2, of 32 for SDXL).
* ``--seed`` (ours) makes the sampled latents reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from library.cache.latent_files import LatentJob, fill_latent_cache
from library.cli.config import positive_int
from library.cli.training_args import MIXED_PRECISION_CHOICES
from library.cache.dataset_caching import latent_job_for, load_job_pixels
from library.data.dataset_config import DatasetConfig, parse_resolution
from library.data.dataset_index import make_dataset_bucket_set
from library.data.images import read_image_size
from library.data.metadata import (
    MetadataError,
    assign_keys,
    format_names,
    list_images,
    load_metadata,
    write_json_atomic,
)
from library.models.families import SD2
from library.models.loading import ModelLoadError, load_model

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    """kohya's command line (same positionals, flags and defaults), plus --seed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_data_dir", help="folder of the training images")
    parser.add_argument("in_json", help="metadata JSON to read (e.g. from merge_captions_to_metadata.py)")
    parser.add_argument("out_json",
                        help="metadata JSON to write, with train_resolution and image_size (may be in_json)")
    parser.add_argument("model_name_or_path", help="model whose VAE encodes the latents (diffusers folder or file)")
    parser.add_argument("--v2", action="store_true", help="the model is Stable Diffusion 2.x")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="images per VAE batch")
    parser.add_argument("--max_data_loader_n_workers", type=int, default=None,
                        help="threads loading images (default: min(4, CPU count))")
    parser.add_argument("--max_resolution", type=str, default="512,512",
                        help="training resolution 'WIDTH,HEIGHT' (or 'SIZE'): the buckets' maximum area")
    parser.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    parser.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    parser.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    parser.add_argument("--bucket_no_upscale", action="store_true", help="never upscale an image to fit a bucket")
    parser.add_argument("--mixed_precision", type=str, choices=MIXED_PRECISION_CHOICES, default="no",
                        help="VAE precision (the SDXL VAE overflows in fp16: prefer no or bf16)")
    parser.add_argument("--full_path", action="store_true", help="metadata keys are absolute image paths")
    parser.add_argument("--flip_aug", action="store_true", help="also cache the latents of the mirrored image")
    parser.add_argument("--skip_existing", action="store_true",
                        help="keep npz files that are still valid (stale ones are rebuilt)")
    parser.add_argument("--recursive", action="store_true",
                        help="also look in sub-folders (keys are relative paths unless --full_path)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampled latents (default: random)")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Bucket, encode, write out_json; 0 on success, 2 on bad input (nothing written then)."""
    args = build_parser().parse_args(argv)
    try:
        resolution = parse_resolution(args.max_resolution)
    except ValueError as error:
        return _fail(f"--max_resolution {args.max_resolution!r} {error}")
    root = Path(args.train_data_dir)
    try:
        metadata = load_metadata(args.in_json)
        images = assign_keys(list_images(root, args.recursive), root, full_path=args.full_path,
                             recursive=args.recursive)
    except MetadataError as error:
        return _fail(str(error))
    try:
        model = load_model(args.model_name_or_path, family=SD2.cli_name if args.v2 else None)
    except (ModelLoadError, ValueError) as error:
        return _fail(str(error))
    bucket_setup = DatasetConfig(kind="finetuning", subsets=(), resolution=resolution, enable_bucket=True,
                                 min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
                                 bucket_reso_steps=args.bucket_reso_steps, bucket_no_upscale=args.bucket_no_upscale)
    try:
        bucket_set = make_dataset_bucket_set(bucket_setup, min_step=model.family.bucket_step)
    except ValueError as error:
        return _fail(f"bucket settings: {error}")
    assert bucket_set is not None
    for warning in bucket_set.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    not_in_json = [key for key in images if key not in metadata]
    jobs: dict[str, LatentJob] = {}
    problems: list[str] = []
    for key, path in images.items():
        if key not in metadata:
            continue
        try:
            size = read_image_size(path)
            assignment = bucket_set.select(size)
        except (OSError, ValueError) as error:
            problems.append(f"{path}: {error}")
            continue
        jobs[key] = latent_job_for(path, size, assignment.bucket, flip=args.flip_aug)
    if problems:
        return _fail("these images cannot be used, fix or remove them first:\n  " + "\n  ".join(problems))
    if not jobs:
        return _fail(f"none of the {len(images)} images in {root} has an entry in {args.in_json}: check "
                     "--full_path / --recursive (they choose the key style) and the folder")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = model.vae.to(device).eval()
    if args.mixed_precision != "no":
        vae = vae.to(dtype=_DTYPES[args.mixed_precision])
    workers = args.max_data_loader_n_workers
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    result = fill_latent_cache(list(jobs.values()), vae, load_job_pixels, batch_size=args.batch_size,
                               skip_valid=args.skip_existing, family=model.family, seed=args.seed,
                               load_workers=workers)

    out = {key: dict(entry) for key, entry in metadata.items()}
    for key, job in jobs.items():
        out[key]["train_resolution"] = list(job.bucket)
        out[key]["image_size"] = list(job.original_size)
    try:
        write_json_atomic(args.out_json, out)
    except MetadataError as error:
        return _fail(str(error))

    counts = Counter(job.bucket for job in jobs.values())
    print(f"{len(jobs)} images in {len(counts)} buckets:")
    for (width, height), count in sorted(counts.items()):
        print(f"  {width}x{height}: {count}")
    print(f"latents: {result.encoded} encoded ({result.rebuilt} of them replaced stale or existing files), "
          f"{result.skipped_valid} already valid")
    if not_in_json:
        print(f"warning: {len(not_in_json)} image(s) have no entry in {args.in_json} and were skipped: "
              f"{format_names(not_in_json)}", file=sys.stderr)
    without_image = [key for key in metadata if key not in images]
    if without_image:
        print(f"warning: {len(without_image)} entr{'y' if len(without_image) == 1 else 'ies'} of {args.in_json} "
              f"with no image in {root} copied unchanged: {format_names(without_image)}", file=sys.stderr)
    print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
