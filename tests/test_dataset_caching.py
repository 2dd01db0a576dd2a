"""Latent / text-encoder caches wired into the dataset (library/dataset_caching.py), the two caching tools,
and the cache report of tools/check_dataset.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from library.models.families import SD1, SDXL
from library.cli import config
from library.cli.data_args import add_dataset_arguments, latent_cache_mode, text_cache_mode
from library.cache.latent_files import latent_cache_path
from library.data.cacheable import NotCacheableError, check_cacheable
from library.data.captions import CaptionOptions
from library.cache.dataset_caching import (
    LatentCacheLocation,
    dataset_prompts,
    default_text_cache_dir,
    fill_latent_caches,
    fill_text_cache,
    latent_cache_status,
    latent_jobs,
)
from library.data.dataset_config import DatasetConfig, DatasetConfigError, SubsetConfig
from library.data.dataset_config_loading import DatasetFlags, load_dataset_configs
from library.data.datasets import (
    SampleKey,
    TrainingDataset,
    build_bucket_sampler_inputs,
    make_batch_sampler,
    make_loader,
)
from library.data.dataset_index import load_dataset_index
from library.models.loading import load_model
from library.models.text_encoding import PromptEncoder
from tools import cache_text_encoder_outputs, check_dataset, prepare_buckets_latents

SIZES = {"wide": (128, 80), "tall": (80, 128), "square": (96, 96), "small": (64, 64)}
BUCKETS = ["--max_resolution", "96,96", "--min_bucket_reso", "32", "--max_bucket_reso", "192",
           "--bucket_reso_steps", "32"]


def save_noise(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def finetune_folder(root: Path) -> tuple[Path, Path]:
    """Images plus a metadata JSON keyed by stem (what the merge tools write)."""
    images = root / "img"
    for i, (stem, size) in enumerate(SIZES.items()):
        save_noise(images / f"{stem}.png", size, seed=i)
    meta = root / "meta.json"
    meta.write_text(json.dumps({stem: {"caption": f"a {stem} picture", "tags": "noise"} for stem in SIZES}))
    return images, meta


def finetune_config(images: Path, meta: Path, **subset_kwargs) -> DatasetConfig:
    """The dataset training builds from the prepare tool's output with the same bucket flags."""
    subset = SubsetConfig(image_dir=images, metadata_file=meta, **subset_kwargs)
    return DatasetConfig(kind="finetuning", subsets=(subset,), batch_size=2, resolution=(96, 96), enable_bucket=True,
                         min_bucket_reso=32, max_bucket_reso=192, bucket_reso_steps=32)


def loader_for(dataset: TrainingDataset, index, seed: int, epoch: int, num_workers: int = 0) -> DataLoader:
    sampler = make_batch_sampler(build_bucket_sampler_inputs(index), seed)
    sampler.set_epoch(epoch)
    return make_loader(dataset, sampler, num_workers=num_workers)


def prepare(images: Path, meta: Path, out: Path, model: Path, *extra: str) -> int:
    return prepare_buckets_latents.main([str(images), str(meta), str(out), str(model), *BUCKETS, "--flip_aug",
                                         "--seed", "0", "--max_data_loader_n_workers", "0", *extra])


# --------------------------------------------------------------------------------------------------
# prepare_buckets_latents -> TrainingDataset with cached latents
# --------------------------------------------------------------------------------------------------


def test_prepared_latents_feed_the_dataset(tmp_path: Path, tiny_model_dirs, capsys) -> None:
    images, meta = finetune_folder(tmp_path)
    out = tmp_path / "meta_lat.json"
    assert prepare(images, meta, out, tiny_model_dirs["sdxl"]) == 0
    assert "4 encoded" in capsys.readouterr().out

    written = json.loads(out.read_text())
    for stem, size in SIZES.items():
        npz = images / f"{stem}_{size[0]:04d}x{size[1]:04d}_sdxl.npz"  # kohya's name, beside the image
        assert npz.is_file()
        entry = written[stem]
        assert entry["image_size"] == list(size) and entry["caption"] == f"a {stem} picture"
        with np.load(npz) as arrays:
            assert arrays["latents"].shape == (4, entry["train_resolution"][1] // 8, entry["train_resolution"][0] // 8)
            assert "latents_flipped" in arrays.files
    assert written["wide"]["train_resolution"][0] > written["wide"]["train_resolution"][1]

    # Training with the same bucket flags finds every file valid: nothing would be re-encoded.
    index = load_dataset_index([finetune_config(images, out, flip_aug=True)], min_step=32)
    location = LatentCacheLocation(family=SDXL)
    assert [status.state for _, _, status in latent_cache_status(index, location)] == ["valid"] * 4
    assert len(latent_jobs(index, location)) == 4  # one per image, not per repeat

    cached = TrainingDataset(index, seed=3, latent_cache=location)
    pixels = TrainingDataset(index, seed=3)
    flips_seen = set()
    for epoch in (1, 2, 3):
        for batch in loader_for(cached, index, seed=3, epoch=epoch):
            assert batch.pixel_values is None
            for i, path in enumerate(batch.image_paths):
                size = Image.open(path).size
                flipped = bool(batch.flipped[i])
                flips_seen.add(flipped)
                with np.load(latent_cache_path(path, size, SDXL)) as npz:
                    expected = npz["latents_flipped" if flipped else "latents"]
                    left, top, right, _ = npz["crop_ltrb"].tolist()
                    resized_w = int(npz["resized_size"][0])
                    assert batch.original_sizes_hw[i].tolist() == npz["original_size"].tolist()[::-1]
                assert torch.equal(batch.latents[i], torch.from_numpy(expected))
                assert batch.crop_top_lefts[i].tolist() == [top, resized_w - right if flipped else left]
                assert batch.target_sizes_hw[i].tolist() == [s * 8 for s in expected.shape[1:]]
    assert flips_seen == {False, True}

    # The seeded flip and the crop are the ones the pixel path takes for the same sample.
    for index_ in range(len(cached)):
        key = SampleKey(index_, epoch=2)
        a, b = cached[key], pixels[key]
        assert (a.cached.flipped, a.cached.crop_top_left) == (b.plan.flipped, b.plan.crop_top_left)
        assert a.caption == b.caption


def test_skip_existing_keeps_valid_files_and_check_dataset_counts_states(tmp_path: Path, tiny_model_dirs,
                                                                         capsys) -> None:
    images, meta = finetune_folder(tmp_path)
    out = tmp_path / "meta_lat.json"
    model = tiny_model_dirs["sdxl"]
    assert prepare(images, meta, out, model) == 0
    assert prepare(images, meta, out, model, "--skip_existing") == 0
    assert "0 encoded" in capsys.readouterr().out

    # One image changes, one npz is deleted.
    save_noise(images / "wide.png", SIZES["wide"], seed=99)
    stat = os.stat(images / "wide.png")
    os.utime(images / "wide.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (images / "tall_0080x0128_sdxl.npz").unlink()

    report = check_dataset.check_datasets([finetune_config(images, out, flip_aug=True)], min_step=32,
                                          disk_latents=LatentCacheLocation(family=SDXL))
    assert report.ok
    assert (report.latent_cache.valid, report.latent_cache.missing) == (2, 1)
    (stale_path, reason), = report.latent_cache.stale
    assert stale_path.name == "wide_0128x0080_sdxl.npz" and "image changed" in reason
    text = report.format()
    assert "latent cache: 2 valid, 1 missing, 1 stale" in text and "wide_0128x0080_sdxl.npz" in text

    argv = ["--in_json", str(out), "--train_data_dir", str(images), "--resolution", "96", "--enable_bucket",
            "--min_bucket_reso", "32", "--max_bucket_reso", "192", "--bucket_reso_steps", "32", "--flip_aug",
            "--family", "sdxl", "--cache_latents_to_disk"]
    capsys.readouterr()
    assert check_dataset.main(argv) == 0
    assert "latent cache: 2 valid, 1 missing, 1 stale" in capsys.readouterr().out

    # --skip_existing rebuilds the stale and the missing one only.
    assert prepare(images, meta, out, model, "--skip_existing") == 0
    printed = capsys.readouterr().out
    assert "2 encoded (1 of them replaced stale or existing files), 2 already valid" in printed
    report = check_dataset.check_datasets([finetune_config(images, out, flip_aug=True)], min_step=32,
                                          disk_latents=LatentCacheLocation(family=SDXL))
    assert report.latent_cache.valid == 4

    # Options the cache refuses make the check fail.
    refused = check_dataset.check_datasets([finetune_config(images, out, random_crop=True)], min_step=32,
                                           disk_latents=LatentCacheLocation(family=SDXL))
    assert not refused.ok and "random_crop" in refused.format()


def test_prepare_reports_unknown_keys_and_bad_input(tmp_path: Path, tiny_model_dirs, capsys) -> None:
    images, meta = finetune_folder(tmp_path)
    save_noise(images / "extra.png", (64, 64), seed=7)  # not in the metadata: skipped, listed
    out = tmp_path / "out.json"
    assert prepare(images, meta, out, tiny_model_dirs["sdxl"]) == 0
    assert "extra" in capsys.readouterr().err and "extra" not in json.loads(out.read_text())
    assert not (images / "extra_0064x0064_sdxl.npz").exists()
    # Keys in another style than the flags ask for: nothing matches, nothing written.
    assert prepare(images, meta, tmp_path / "none.json", tiny_model_dirs["sdxl"], "--full_path") == 2
    assert "--full_path" in capsys.readouterr().err and not (tmp_path / "none.json").exists()


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def dreambooth_folder(root: Path, captions: dict[str, str]) -> Path:
    for i, (stem, caption) in enumerate(captions.items()):
        save_noise(root / f"{stem}.png", (64, 64), seed=i)
        (root / f"{stem}.txt").write_text(caption)
    return root


def test_refusals_name_the_subset_and_the_option(tmp_path: Path) -> None:
    one = dreambooth_folder(tmp_path / "one", {"a": "red, blue"})
    two = dreambooth_folder(tmp_path / "two", {"b": "line one\nline two"})
    three = dreambooth_folder(tmp_path / "three", {"c": "plain caption"})
    subsets = (
        SubsetConfig(image_dir=one, caption_extension=".txt", random_crop=True, source="cfg.toml subset #1",
                     captions=CaptionOptions(shuffle_caption=True)),
        SubsetConfig(image_dir=two, caption_extension=".txt", color_aug=True, source="cfg.toml subset #2",
                     captions=CaptionOptions(enable_wildcard=True)),
        SubsetConfig(image_dir=three, caption_extension=".txt", source="cfg.toml subset #3",
                     captions=CaptionOptions(enable_wildcard=True, caption_dropout_rate=0.5)),
    )
    index = load_dataset_index([DatasetConfig(kind="dreambooth", subsets=subsets, resolution=(64, 64))])

    latent = check_cacheable(index, cache_latents=True, cache_text=False)
    assert len(latent) == 2
    assert latent[0].startswith("cfg.toml subset #1: random_crop = true cannot be used with latent caching")
    assert "set random_crop = false for this subset" in latent[0]
    assert latent[1].startswith("cfg.toml subset #2: color_aug = true")

    text = check_cacheable(index, cache_latents=False, cache_text=True)
    assert len(text) == 2  # subset #3: one line and no {a|b}, and dropout only ever gives "" (cached)
    assert text[0].startswith("cfg.toml subset #1: shuffle_caption makes the caption change between draws")
    assert text[1].startswith("cfg.toml subset #2: enable_wildcard = true") and "b.png" in text[1]

    with pytest.raises(NotCacheableError, match="random_crop"):
        TrainingDataset(index, seed=0, latent_cache=LatentCacheLocation(family=SD1))
    with pytest.raises(NotCacheableError, match="shuffle_caption"):
        fill_text_cache(index, None, tmp_path / "te")  # type: ignore[arg-type]  # refused before encoding
    assert not (tmp_path / "te").exists()


def test_modes_from_flags_and_cache_info_is_rejected(tmp_path: Path) -> None:
    parser = config.build_parser("t", add_dataset_arguments)
    assert latent_cache_mode(config.parse_args(parser, ["--cache_latents_to_disk"])) == "disk"
    assert latent_cache_mode(config.parse_args(parser, ["--cache_latents"])) == "run"
    args = config.parse_args(parser, ["--cache_text_encoder_outputs_to_disk"])
    assert text_cache_mode(args) == "disk" and latent_cache_mode(args) is None and args.vae_batch_size == 1
    assert text_cache_mode(config.parse_args(parser, ["--cache_text_encoder_outputs"])) == "run"

    (tmp_path / "img").mkdir()
    cfg = tmp_path / "ds.toml"
    cfg.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\ncache_info = true\n')
    with pytest.raises(DatasetConfigError, match="cache_info is a kohya key that is not supported yet"):
        load_dataset_configs(DatasetFlags(dataset_config=str(cfg)))


# --------------------------------------------------------------------------------------------------
# Text-encoder outputs
# --------------------------------------------------------------------------------------------------


def test_text_cached_batches_match_a_fresh_encoding(tmp_path: Path, tiny_model_dirs) -> None:
    folder = dreambooth_folder(tmp_path / "db", {f"i{n}": f"thing {n}, detail" for n in range(6)})
    options = CaptionOptions(caption_prefix="photo of", caption_dropout_rate=0.3)
    subset = SubsetConfig(image_dir=folder, caption_extension=".txt", num_repeats=2, captions=options)
    dataset_config = DatasetConfig(kind="dreambooth", subsets=(subset,), resolution=(64, 64), batch_size=4)
    index = load_dataset_index([dataset_config])
    model = load_model(tiny_model_dirs["sdxl"])
    encoder = PromptEncoder("sdxl", model.tokenizers, model.text_encoders)

    cache_dir = default_text_cache_dir([dataset_config])
    assert cache_dir == folder / ".te_cache"
    cache = fill_text_cache(index, encoder, cache_dir, batch_size=4, progress=False)
    assert sorted(dataset_prompts(index)) == sorted(f"photo of thing {n}, detail" for n in range(6))
    assert len(cache) == 7  # six prompts and "" for dropout

    dataset = TrainingDataset(index, seed=5, text_cache=cache)
    captions = []
    for batch in loader_for(dataset, index, seed=5, epoch=1, num_workers=1):
        with torch.no_grad():
            fresh = encoder.encode(batch.captions)
        assert batch.text_hidden_states.dtype == torch.float16
        torch.testing.assert_close(batch.text_hidden_states.float(), fresh.hidden_states, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(batch.text_pooled.float(), fresh.pooled, rtol=2e-3, atol=2e-3)
        assert batch.pixel_values is not None and batch.latents is None
        captions += batch.captions
    assert len(captions) == 12 and "" in captions and any(c.startswith("photo of thing") for c in captions)


def test_cache_text_encoder_outputs_tool(tmp_path: Path, tiny_model_dirs, capsys) -> None:
    train = tmp_path / "train"
    dreambooth_folder(train / "3_sks", {"a": "one caption", "b": "another caption"})
    argv = ["--pretrained_model_name_or_path", str(tiny_model_dirs["sd15"]), "--train_data_dir", str(train),
            "--caption_extension", ".txt", "--resolution", "64"]
    assert cache_text_encoder_outputs.main(argv) == 0
    assert "2 distinct prompts" in capsys.readouterr().out
    assert len(list((train / "3_sks" / ".te_cache").glob("te_*/*.keys.npy"))) == 1
    assert cache_text_encoder_outputs.main(argv + ["--shuffle_caption"]) == 2
    assert "shuffle_caption" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Two datasets from one TOML
# --------------------------------------------------------------------------------------------------


def test_toml_with_two_resolutions_builds_batches_with_and_without_cached_latents(tmp_path: Path,
                                                                                   tiny_model_dirs) -> None:
    folder = dreambooth_folder(tmp_path / "imgs", {f"p{n}": f"pic {n}" for n in range(3)})
    save_noise(folder / "wide.png", (128, 64), seed=5)
    (folder / "wide.txt").write_text("wide pic")
    cfg = tmp_path / "ds.toml"
    cfg.write_text(f"""
[general]
enable_bucket = true
caption_extension = ".txt"
batch_size = 2
bucket_reso_steps = 32
min_bucket_reso = 32
max_bucket_reso = 256

[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{folder}"

[[datasets]]
resolution = [128, 96]
  [[datasets.subsets]]
  image_dir = "{folder}"
  num_repeats = 2
""")
    datasets = load_dataset_configs(DatasetFlags(dataset_config=str(cfg)))
    index = load_dataset_index(datasets, min_step=32)
    batches = list(loader_for(TrainingDataset(index, seed=1), index, seed=1, epoch=1))
    assert sum(len(b.captions) for b in batches) == 4 + 8
    areas = {b.pixel_values.shape[2] * b.pixel_values.shape[3] for b in batches}
    assert max(areas) > 64 * 64 >= min(areas)  # both resolutions are trained

    # Beside the images one npz per image cannot hold two buckets: refused, naming both datasets.
    disk = LatentCacheLocation(family=SD1)
    conflicts = check_cacheable(index, True, False, disk.conflicts(index))
    assert conflicts and "[[datasets]] #1" in conflicts[0] and "[[datasets]] #2" in conflicts[0]
    # A per-run folder keeps one file per dataset, so it works, with the same batches as pixels.
    run = LatentCacheLocation(family=SD1, directory=tmp_path / "run")
    vae = load_model(tiny_model_dirs["sd15"]).vae
    result = fill_latent_caches(index, vae, run, batch_size=4, seed=0, progress=False)
    assert result.encoded == 8  # 4 images x 2 datasets
    cached = list(loader_for(TrainingDataset(index, seed=1, latent_cache=run), index, seed=1, epoch=1))
    assert [b.image_paths for b in cached] == [b.image_paths for b in batches]
    for with_latents, with_pixels in zip(cached, batches):
        assert with_latents.latents.shape[2:] == tuple(s // 8 for s in with_pixels.pixel_values.shape[2:])
        assert torch.equal(with_latents.target_sizes_hw, with_pixels.target_sizes_hw)
        assert torch.equal(with_latents.crop_top_lefts, with_pixels.crop_top_lefts)
    again = fill_latent_caches(index, vae, run, batch_size=4, skip_cache_check=True, progress=False)
    assert (again.encoded, again.skipped_valid) == (0, 8)
