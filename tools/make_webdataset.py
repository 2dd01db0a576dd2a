"""Write a dataset as webdataset tar shards for streamed training (``shards = ...`` in a dataset config).

    python tools/make_webdataset.py --train_data_dir imgs [--in_json meta.json | --dataset_config d.toml] \\
        --output_dir shards --shard_size_mb 64 [--resolution 1024 --enable_bucket --min_bucket_reso 256 \\
        --max_bucket_reso 2048 --bucket_reso_steps 64 --bucket_no_upscale] [--caption_extension .txt] \\
        [--pretrained_model_name_or_path MODEL (--cache_latents | --cache_latents_to_disk | --latents_from_cache) \\
         --cache_text_encoder_outputs]

Takes the training scripts' dataset flags (and --config_file) and builds the dataset exactly as training
does (``library.data.dataset_index``: captions, tags, repeats folders, metadata, buckets, the same problem
checks), then writes one sample per image (``library.data.shard_format``): the original image bytes, its
caption and tags, original size and bucket, into ``shard-000000.tar``, ``shard-000001.tar``, ... of at most
--shard_size_mb MB (10^6 bytes) each, and ``index.json`` (sample count, bucket histogram per shard and in
total, the bucket settings). Everything is written into a hidden temporary folder inside --output_dir and
renamed into place at the end, index.json last; a folder that already holds shards is refused unless
--overwrite (which replaces the shards and index.json and keeps other files).

Cached tensors (a model is needed: --pretrained_model_name_or_path):

* ``--cache_latents_to_disk``: the npz cache beside the images, as training uses it (valid files are taken,
  missing or stale ones encoded and kept); ``--cache_latents``: encoded afresh into a temporary folder;
  ``--latents_from_cache``: the npz cache only, refusing (before the model loads) if an image's file is
  missing or stale. Each sample then carries ``latents.safetensors``.
* ``--cache_text_encoder_outputs_to_disk`` (the --text_encoder_cache_dir cache, filled as needed) or
  ``--cache_text_encoder_outputs`` (a temporary one): each sample carries ``te.safetensors`` for its prompt.

index.json records what they were made with (VAE weight fingerprint, family, flip/alpha; the text cache's
identity), so a streamed run with another model or settings refuses them instead of training on them. Both
hash the weights as cast, so pass the training run's --mixed_precision / --no_half_vae (the VAE and text
encoders are cast as training casts them).

Regularisation subsets and ControlNet datasets are refused (the format has no place for them); all datasets
must share one bucket setup (write one shard set per setup).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import torch

from library.cache import dataset_caching
from library.cache.dataset_caching import LatentCacheLocation
from library.cache.latent_files import CacheFileError, LatentEncodingError
from library.cache.text_encoder_files import TextEncoderOutputCache
from library.cache.shard_caches import (
    latent_tensors,
    shard_latent_provenance,
    shard_text_provenance,
    text_tensors,
    unusable_latents,
)
from library.cli.config import build_parser, parse_args
from library.cli.data_args import add_dataset_arguments, dataset_flags_from_args, latent_cache_mode, text_cache_mode
from library.cli.model_args import add_model_arguments
from library.data.cacheable import NotCacheableError, raise_if_not_cacheable
from library.data.dataset_config import DatasetConfig, DatasetConfigError
from library.data.dataset_config_loading import load_dataset_configs
from library.data.dataset_index import load_dataset_index
from library.data.images import ImageReadError
from library.data.records import DatasetIndex, DatasetProblems, ImageRecord
from library.data.shard_format import BucketSettings, ShardIndex, encode_sample
from library.data.shard_writing import (
    ShardSetWriter,
    ShardWriteError,
    existing_shard_files,
    require_webdataset,
    tar_file_bytes,
    tar_member_bytes,
)
from library.models.families import FINEST_BUCKET_STEP, SD2, ModelFamily, detect_family, resolve_family
from library.models.model_files import ModelLoadError
from library.models.text_encoding import PromptEncoder

MB = 1_000_000
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")  # library.cli.training_args's, whose import loads diffusers


class ToolError(Exception):
    """Bad input: printed as one ``error:`` line (with indented details), exit status 2."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_shard_parser() -> argparse.ArgumentParser:
    """The training scripts' model and dataset flags (and --config_file), plus the shard options."""
    parser = build_parser("Write a dataset as webdataset tar shards with index.json.", add_model_arguments,
                          add_dataset_arguments)
    group = parser.add_argument_group("shards")
    group.add_argument("--output_dir", type=str, default=None, help="folder the shards and index.json go to")
    group.add_argument("--shard_size_mb", type=_positive_float, default=64.0,
                       help="largest shard file in MB (10^6 bytes; default 64)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the shards and index.json already in --output_dir")
    group.add_argument("--latents_from_cache", action="store_true",
                       help="put the latents of the npz cache beside the images into the shards (every image's "
                            "file must be valid; nothing is encoded); needs --pretrained_model_name_or_path")
    group.add_argument("--skip_verify", action="store_true",
                       help="do not decode every image before writing (faster; corrupt files are then not found)")
    group.add_argument("--seed", type=int, default=None, help="seed of the sampled latents (default: random)")
    group.add_argument("--mixed_precision", type=str, choices=MIXED_PRECISION_CHOICES, default="no",
                       help="precision of the VAE and text encoders, as in training (with --no_half_vae): give the "
                            "training run's, so the fingerprints in index.json match it")
    return parser


# --------------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------------


def _family(args: argparse.Namespace) -> ModelFamily | None:
    if args.family:
        return resolve_family(args.family)
    if args.v2:
        return SD2
    model = args.pretrained_model_name_or_path
    if not model:
        return None
    if not Path(model).exists():
        raise ToolError(f"--pretrained_model_name_or_path {model} does not exist: pass a diffusers model folder or "
                        "a .safetensors/.ckpt file")
    try:
        return detect_family(model)
    except ModelLoadError as error:  # a damaged file, or one that is not what its name says
        raise ToolError(str(error)) from None


def _bucket_settings(datasets: Sequence[DatasetConfig]) -> BucketSettings:
    settings = {BucketSettings(resolution=d.resolution, enable_bucket=d.enable_bucket,
                               min_bucket_reso=d.min_bucket_reso, max_bucket_reso=d.max_bucket_reso,
                               bucket_reso_steps=d.bucket_reso_steps, bucket_no_upscale=d.bucket_no_upscale)
                for d in datasets}
    if len(settings) != 1:
        raise ToolError(f"the {len(datasets)} datasets have different resolution/bucket settings; one shard set "
                        "has one bucket setup: write each dataset into its own --output_dir")
    return settings.pop()


def _check_kinds(datasets: Sequence[DatasetConfig]) -> None:
    if any(d.kind == "controlnet" for d in datasets):
        raise ToolError("ControlNet datasets cannot be written into shards (no place for conditioning images); "
                        "use the folder dataset for ControlNet")
    if any(s.is_reg for d in datasets for s in d.subsets):
        raise ToolError("regularisation subsets (--reg_data_dir, is_reg) cannot be mixed into training shards (a "
                        "sample does not say it is one): write them as their own shard set (the regularisation "
                        "folder as --train_data_dir) and set is_reg = true on that shards subset")


def _check_output_dir(args: argparse.Namespace) -> Path:
    if not args.output_dir:
        raise ToolError("--output_dir is required: the folder the shards and index.json go to")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise ToolError(f"--output_dir {output} is a file; pass a folder")
    found = existing_shard_files(output)
    if found and not args.overwrite:
        raise ToolError(f"--output_dir {output} already holds shards ({found[0].name}, ... {len(found)} files); "
                        "pass --overwrite to replace them, or choose another folder")
    return output


def _check_cache_flags(args: argparse.Namespace) -> tuple[str | None, str | None]:
    latent_mode = "disk" if args.latents_from_cache else latent_cache_mode(args)
    text_mode = text_cache_mode(args)
    wanted = [flag for flag, on in (("--latents_from_cache", args.latents_from_cache),
                                    ("--cache_latents", latent_mode is not None and not args.latents_from_cache),
                                    ("--cache_text_encoder_outputs", text_mode is not None)) if on]
    if wanted and not args.pretrained_model_name_or_path:
        raise ToolError(f"{wanted[0]} needs --pretrained_model_name_or_path: the model's VAE / text encoders make "
                        "the cached tensors, and index.json records which")
    return latent_mode, text_mode


def _image_key(record: ImageRecord, train_data_dir: str | None) -> str:
    """The kohya metadata key, or the path relative to --train_data_dir (else to the subset folder's parent)."""
    if record.metadata_key is not None:
        return record.metadata_key
    for base in ([Path(train_data_dir).resolve()] if train_data_dir else []) + \
                ([Path(record.subset.image_dir).resolve().parent] if record.subset.image_dir else []):
        try:
            return record.image_path.resolve().relative_to(base).as_posix()
        except ValueError:
            continue
    return record.image_path.name


def _check_sizes(records: Sequence[ImageRecord], max_bytes: int) -> None:
    """Refuse before any work an image that alone (with its headers and a 1 KB json) is larger than a shard."""
    too_big = []
    for record in records:
        need = tar_file_bytes(tar_member_bytes(record.image_path.stat().st_size) + tar_member_bytes(1024))
        if need > max_bytes:
            too_big.append((need, record.image_path))
    if too_big:
        need, path = max(too_big)
        raise ToolError(f"{len(too_big)} image(s) do not fit in a shard of --shard_size_mb {max_bytes / MB:g} "
                        f"(largest: {path}, {need / MB:.2f} MB with its tar headers); raise --shard_size_mb")


# --------------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------------


@dataclass
class _Caches:
    latents: LatentCacheLocation | None = None
    text: TextEncoderOutputCache | None = None
    latent_provenance: dict[str, Any] | None = None
    text_provenance: dict[str, Any] | None = None


def _check_cacheable(index: DatasetIndex, family: ModelFamily | None, latent_mode: str | None,
                     text_mode: str | None, temp_root: Path) -> LatentCacheLocation | None:
    """Refuse what the caches cannot hold before the model loads; returns the latent cache location."""
    if latent_mode is None and text_mode is None:
        return None
    if family is None:
        raise ToolError("cannot tell the model family of --pretrained_model_name_or_path; pass --family")
    location = None
    if latent_mode is not None:
        location = LatentCacheLocation(family, None if latent_mode == "disk" else temp_root / "latents")
    try:
        raise_if_not_cacheable(index, cache_latents=location is not None, cache_text=text_mode is not None,
                               latent_conflicts=location.conflicts(index) if location else [])
    except NotCacheableError as error:
        raise ToolError(str(error)) from None
    return location


def _fill_caches(args: argparse.Namespace, index: DatasetIndex, location: LatentCacheLocation | None,
                 text_mode: str | None, datasets: Sequence[DatasetConfig], temp_root: Path) -> _Caches:
    """Load the model, then fill the caches as training does and note what made them."""
    from library.cli.setup_from_args import model_dtypes  # these load diffusers: only when a model is used
    from library.models.loading import load_model
    from library.training.run_setup import move_module

    if args.latents_from_cache:
        unusable = unusable_latents(index, location)
        if unusable:
            raise ToolError(f"--latents_from_cache: {len(unusable)} image(s) have no valid latent cache file; fill "
                            "it with --cache_latents_to_disk instead:\n  " + "\n  ".join(unusable[:10]))
    try:
        model = load_model(args.pretrained_model_name_or_path, family=args.family or (SD2.cli_name if args.v2 else None),
                           vae=args.vae)
    except (ModelLoadError, ValueError) as error:
        raise ToolError(str(error)) from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the training run's dtypes: the VAE fingerprint and the text cache identity hash the weights as cast
    weight_dtype, vae_dtype, _ = model_dtypes(argparse.Namespace(**{**vars(args), "save_precision": None}), model)
    caches = _Caches(latents=location)
    with torch.no_grad():
        if location is not None:
            vae = model.vae.eval()
            move_module(vae, device, vae_dtype)
            if not args.latents_from_cache:
                dataset_caching.fill_latent_caches(index, vae, location, batch_size=args.vae_batch_size,
                                                   skip_cache_check=args.skip_cache_check, seed=args.seed)
            caches.latent_provenance = shard_latent_provenance(index.records, vae, model.family.name)
        if text_mode is not None:
            encoders = [encoder.eval() for encoder in model.text_encoders]
            for module in encoders:
                move_module(module, device, weight_dtype)
            encoder = PromptEncoder(model.family.name, model.tokenizers, encoders,
                                    max_token_length=args.max_token_length or 75, clip_skip=args.clip_skip,
                                    weighted=args.weighted_captions)
            cache_dir = temp_root / "text" if text_mode == "run" else (
                Path(args.text_encoder_cache_dir) if args.text_encoder_cache_dir
                else dataset_caching.default_text_cache_dir(datasets))
            caches.text = dataset_caching.fill_text_cache(index, encoder, cache_dir)
            caches.text_provenance = shard_text_provenance(caches.text)
    return caches


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_shards(index: DatasetIndex, output: Path, *, max_bytes: int, settings: BucketSettings, overwrite: bool,
                 caches: _Caches, train_data_dir: str | None) -> ShardIndex:
    """One sample per record, in index order; returns the committed ShardIndex."""
    with ShardSetWriter(output, max_bytes=max_bytes, bucket_settings=settings, overwrite=overwrite) as writer:
        for number, record in enumerate(tqdm(index.records, desc="writing shards", unit="image")):
            assert record.bucket is not None
            latents = latent_tensors(caches.latents, record) if caches.latents is not None else None
            te, prompt = text_tensors(caches.text, record) if caches.text is not None else (None, None)
            sample = encode_sample(number=number, image=record.image_path.read_bytes(), ext=record.image_path.suffix,
                                   image_key=_image_key(record, train_data_dir), caption=record.caption,
                                   tags=record.tags, original_size=record.image_size, bucket=record.bucket.bucket,
                                   latents=latents, te=te, te_prompt=prompt)
            writer.write(sample, record.bucket.bucket)
        return writer.commit(latents=caches.latent_provenance, text_encoder_outputs=caches.text_provenance)


def summary(index: ShardIndex, output: Path) -> str:
    """The closing report: samples, shards, bytes, bucket histogram, cached tensors."""
    total = sum(shard.bytes for shard in index.shards)
    lines = [f"wrote {index.samples} samples in {len(index.shards)} shard(s), {total} bytes "
             f"({total / MB:.1f} MB), to {output} (index.json)", "buckets (WxH: samples):"]
    lines += [f"  {name}: {count}" for name, count in index.buckets.items()]
    if index.latents is not None:
        lines.append(f"latents: {index.latents['family']} VAE {index.latents['vae']}, "
                     f"flip_aug {index.latents['flip_aug']}")
    if index.text_encoder_outputs is not None:
        lines.append(f"text-encoder outputs: {index.text_encoder_outputs['storage_dtype']}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    output = _check_output_dir(args)
    latent_mode, text_mode = _check_cache_flags(args)
    try:
        require_webdataset()
        datasets = load_dataset_configs(dataset_flags_from_args(args))
    except (ShardWriteError, DatasetConfigError) as error:
        raise ToolError(str(error)) from None
    _check_kinds(datasets)
    settings = _bucket_settings(datasets)
    family = _family(args)
    min_step = family.bucket_step if family is not None else FINEST_BUCKET_STEP
    try:
        index = load_dataset_index(datasets, min_step=min_step, verify_images=not args.skip_verify)
    except DatasetProblems as error:
        raise ToolError(str(error)) from None
    for notice in index.notices:
        print(f"warning: {notice}", file=sys.stderr)
    max_bytes = int(args.shard_size_mb * MB)
    _check_sizes(index.records, max_bytes)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".caches-", dir=output) as temp:
        location = _check_cacheable(index, family, latent_mode, text_mode, Path(temp))
        try:
            caches = _fill_caches(args, index, location, text_mode, datasets, Path(temp)) \
                if (latent_mode or text_mode) else _Caches()
        except (ImageReadError, CacheFileError, LatentEncodingError) as error:
            raise ToolError(str(error)) from None
        try:
            written = write_shards(index, output, max_bytes=max_bytes, settings=settings, overwrite=args.overwrite,
                                   caches=caches, train_data_dir=args.train_data_dir)
        except (ValueError, OSError) as error:  # shard or cache files that cannot be written or read
            raise ToolError(str(error)) from None
        finally:
            if caches.text is not None:
                caches.text.close()
    print(summary(written, output))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the shards are written; 2 on bad input (one ``error:`` line, nothing written)."""
    args = parse_args(build_shard_parser(), argv)
    created = bool(args.output_dir) and not Path(args.output_dir).exists()
    try:
        return _run(args)
    except ToolError as error:
        if created and Path(args.output_dir).is_dir() and not any(Path(args.output_dir).iterdir()):
            Path(args.output_dir).rmdir()  # leave no empty folder behind a refused run
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
