"""Streamed webdataset shards: exactly-once coverage over 2 ranks x 2 workers, single-bucket batches, the same
order for the same seed, exact mid-epoch resume, the config checks, and one 2-process LoRA training."""

from __future__ import annotations

import io
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_network
from library.data.buckets import make_bucket_set
from library.data.dataset_config_loading import DatasetFlags, load_dataset_configs
from library.data.shard_config import load_shard_run
from library.data.dataset_config import DatasetConfigError
from library.data.shard_format import BucketSettings, encode_sample, latent_provenance, text_provenance
from library.data.shard_plan import plan_layout
from library.data.shard_writing import ShardSetWriter
from library.data.shard_stream import ShardBatchControl, ShardStreamDataset, make_shard_loader, stream_batches
from tests.helpers.user_paths import assert_one_error_line

# (width, height) of the images: several aspect ratios, so several buckets at resolution 128
SIZES = [(64, 64), (32, 96), (96, 32), (32, 128), (64, 64), (40, 40)] * 4 + [(64, 64)] * 3


def write_shards(folder: Path, sizes: list[tuple[int, int]], *, max_bytes: int, resolution: int, min_reso: int,
                 max_reso: int) -> str:
    """Shards written by tools/make_webdataset.py's writer (PNG bytes, caption, bucket); returns their pattern."""
    buckets = make_bucket_set(resolution, min_reso, max_reso, 64)
    settings = BucketSettings(resolution=(resolution, resolution), enable_bucket=True, min_bucket_reso=min_reso,
                              max_bucket_reso=max_reso, bucket_reso_steps=64, bucket_no_upscale=False)
    with ShardSetWriter(folder, max_bytes=max_bytes, bucket_settings=settings) as writer:
        for number, size in enumerate(sizes):
            data = io.BytesIO()
            Image.new("RGB", size, ((number * 37) % 256, (number * 91) % 256, 128)).save(data, "PNG")
            bucket = buckets.select(size).bucket
            writer.write(encode_sample(number=number, image=data.getvalue(), ext="png", image_key=f"img{number}.png",
                                       caption=f"photo {number}", tags=None, original_size=size, bucket=bucket), bucket)
        index = writer.commit()
    return f"{folder}/shard-{{000000..{len(index.shards) - 1:06d}}}.tar"


def config_file(path: Path, shards: str, *, resolution: int, batch_size: int, extra: str = "") -> Path:
    path.write_text(f"[general]\nresolution = {resolution}\nenable_bucket = true\nmin_bucket_reso = 64\n"
                    f"max_bucket_reso = {2 * resolution}\nbatch_size = {batch_size}\n\n[[datasets]]\n"
                    f"[[datasets.subsets]]\nshards = \"{shards}\"\nflip_aug = true\n{extra}")
    return path


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("shards") / "shards"
    return folder, write_shards(folder, SIZES, max_bytes=10240, resolution=128, min_reso=64, max_reso=256)


def _source(shard_dir: tuple[Path, str], tmp_path: Path, batch_size: int = 3):
    config = config_file(tmp_path / "d.toml", shard_dir[1], resolution=128, batch_size=batch_size)
    return load_shard_run(load_dataset_configs(DatasetFlags(dataset_config=str(config))))


def _loader(run, *, rank: int, world_size: int, workers: int, seed: int = 5, persistent: bool = False):
    layout = plan_layout(run.source.units, world_size=world_size, workers=workers, batch_size=3)
    control = ShardBatchControl(ShardStreamDataset(run.source, layout, rank=rank, seed=seed))
    loader = make_shard_loader(control.dataset, control, num_workers=workers if workers > 1 else 0,
                               persistent_workers=persistent)
    return layout, control, loader


def _rank_batches(run, *, rank: int, world_size: int, workers: int, seed: int = 5, epoch: int = 1, resume: int = 0):
    layout, control, loader = _loader(run, rank=rank, world_size=world_size, workers=workers, seed=seed)
    if resume:
        control.load_state_dict({"epoch": epoch, "batches_done": resume, "seed": seed})
    control.set_epoch(epoch, first_step=0)
    return layout, list(loader)


def test_two_ranks_two_workers_see_every_sample_once_in_single_bucket_batches(shard_dir, tmp_path):
    run = _source(shard_dir, tmp_path)
    assert run.samples == len(SIZES) and len(run.source.units) >= 5  # more shards than the 4 streams
    seen: Counter[str] = Counter()
    lengths = []
    for rank in (0, 1):
        layout, batches = _rank_batches(run, rank=rank, world_size=2, workers=2)
        lengths.append(len(batches))
        for batch in batches:
            assert batch.pixel_values.shape[0] == len(batch) <= 3
            assert len({tuple(t.tolist()) for t in batch.target_sizes_hw}) == 1  # one bucket per batch
            assert tuple(batch.pixel_values.shape[2:]) == tuple(batch.target_sizes_hw[0].tolist())
            seen.update(batch.image_paths)
    assert lengths == [layout.batches_per_rank] * 2  # every rank runs the same number of steps
    # Every sample exactly once, plus the repeated (padding) batches the plan reports, read back by themselves.
    padded: Counter[str] = Counter()
    for stream in layout.streams:
        if stream.padding:
            source = stream_batches(run.source, layout, stream.padding_source, seed=5, epoch=1)
            for _, raw_batch in zip(range(stream.padding), source):
                padded.update(raw.fields["__key__"] for raw in raw_batch)
    keys = Counter(path.split()[1] for path in seen.elements())
    assert sorted(keys - padded) == sorted(f"s{n:09d}" for n in range(len(SIZES)))
    assert keys - padded == Counter({f"s{n:09d}": 1 for n in range(len(SIZES))})
    assert sum(padded.values()) == sum(seen.values()) - len(SIZES)


def test_same_seed_same_order_and_mid_epoch_resume_is_exact(shard_dir, tmp_path):
    run = _source(shard_dir, tmp_path)
    _, control, loader = _loader(run, rank=0, world_size=1, workers=2, persistent=True)
    control.set_epoch(1)
    first = list(loader)
    control.set_epoch(2)  # the persistent workers read the new epoch from shared memory
    other_epoch = list(loader)
    _, again = _rank_batches(run, rank=0, world_size=1, workers=2)
    _, fresh_epoch_2 = _rank_batches(run, rank=0, world_size=1, workers=2, epoch=2)
    assert [b.image_paths for b in other_epoch] == [b.image_paths for b in fresh_epoch_2]
    assert [b.image_paths for b in first] == [b.image_paths for b in again]
    assert [b.captions for b in first] == [b.captions for b in again]
    assert [b.image_paths for b in other_epoch] != [b.image_paths for b in first]
    assert sorted(p for b in other_epoch for p in b.image_paths) == sorted(p for b in first for p in b.image_paths)
    # the same shards through a pipe: command (how object storage is read), index.json given beside it
    folder, pattern = shard_dir
    piped = config_file(tmp_path / "pipe.toml", f"pipe:cat {pattern}", resolution=128, batch_size=3,
                        extra=f'shards_index = "{folder}/index.json"\n')
    run_piped = load_shard_run(load_dataset_configs(DatasetFlags(dataset_config=str(piped))))
    _, through_pipe = _rank_batches(run_piped, rank=0, world_size=1, workers=2)
    assert [b.image_paths for b in through_pipe] == [b.image_paths for b in first]
    skip = 5  # odd: the two workers have yielded 3 and 2 batches
    _, resumed = _rank_batches(run, rank=0, world_size=1, workers=2, resume=skip)
    assert [b.image_paths for b in resumed] == [b.image_paths for b in first[skip:]]
    for a, b in zip(resumed, first[skip:]):
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.flipped, b.flipped)


def test_config_refuses_shards_that_do_not_fit_the_run(shard_dir, tmp_path, tiny_model_dirs, capsys):
    shard_dir = shard_dir[0]

    def run(config: Path) -> subprocess.CompletedProcess:
        argv = ["--pretrained_model_name_or_path", str(tiny_model_dirs["sd15"]), "--dataset_config", str(config),
                "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]
        code = train_network.main(argv)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    pattern = f"{shard_dir}/shard-{{000000..000001}}.tar"
    other_buckets = config_file(tmp_path / "a.toml", pattern, resolution=192, batch_size=2)
    assert_one_error_line(run(other_buckets), "bucketed with other settings", "resolution (128, 128) in the shards",
                          "tools/make_webdataset.py --resolution 192,192")
    (tmp_path / "empty").mkdir()
    no_index = config_file(tmp_path / "b.toml", f"{tmp_path}/empty/shard-{{000000..000001}}.tar", resolution=128,
                           batch_size=2)
    assert_one_error_line(run(no_index), "cannot read the shard index", "shards_index")
    unlisted = config_file(tmp_path / "c.toml", f"{shard_dir}/shard-{{000098..000099}}.tar", resolution=128,
                           batch_size=2)
    assert_one_error_line(run(unlisted), "shard-000098.tar", "does not list")
    fits = config_file(tmp_path / "d.toml", pattern, resolution=128, batch_size=2)
    assert train_network.main(["--pretrained_model_name_or_path", str(tiny_model_dirs["sd15"]), "--dataset_config",
                               str(fits), "--output_dir", str(tmp_path / "out"), "--debug_dataset"]) == 0
    preview = capsys.readouterr().out.splitlines()
    assert "streamed shards" in preview[0] and "shard-000000.tar" in preview[0]
    assert preview[2].startswith("  shard-000000.tar s000000001 (img1.png): bucket 64x192, original 32x96")


def test_two_processes_train_a_lora_from_shards(tiny_model_dirs, tmp_path, launch_two_cpu_processes):
    folder = tmp_path / "data" / "shards"
    sizes = [(64, 64), (48, 48), (64, 96), (80, 64)] * 2 + [(64, 64), (72, 72)]
    pattern = write_shards(folder, sizes, max_bytes=10240, resolution=64, min_reso=64, max_reso=128)
    config = config_file(tmp_path / "d.toml", pattern, resolution=64, batch_size=2, extra="caption_prefix = \"sks, \"\n")
    output = tmp_path / "runs" / "nested" / "out"
    result = launch_two_cpu_processes("train_network.py", [
        "--pretrained_model_name_or_path", tiny_model_dirs["sd15"], "--dataset_config", config,
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2",
        "--seed", "3", "--max_data_loader_n_workers", "1", "--output_dir", output, "--output_name", "lora",
        "--max_train_steps", "2"])
    assert "10 samples per epoch" in result.stdout, result.stdout[-3000:]
    # each process runs the batches planned from index.json: its own shards, padded to the longer process
    layout = plan_layout(load_shard_run(load_dataset_configs(DatasetFlags(dataset_config=str(config)))).source.units,
                         world_size=2, workers=1, batch_size=2)
    assert layout.repeated_batches > 0  # 3 shards of 4, 4 and 2 samples: one process reads 6, the other 4
    assert (f"batches per epoch per process: {layout.batches_per_rank} ({layout.short_batches} short last-of-bucket "
            f"batches kept, {layout.repeated_batches} repeated to even out ranks)") in result.stdout
    weights = load_file(output / "lora.safetensors")
    ups = [v for k, v in weights.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for v in ups)  # trained: lora_up starts at zero


def test_latents_and_text_encoder_outputs_in_shards_are_used_not_recomputed(tmp_path):
    """Shards that carry latents and text-encoder outputs: batches hold exactly those tensors (the flipped latent
    when the draw flips); a run whose settings would change them is refused at config load."""
    settings = BucketSettings(resolution=(64, 64), enable_bucket=False, min_bucket_reso=64, max_bucket_reso=128,
                              bucket_reso_steps=64, bucket_no_upscale=False)
    stored = {}
    with ShardSetWriter(tmp_path / "shards", max_bytes=10**6, bucket_settings=settings) as writer:
        for number in range(6):
            data = io.BytesIO()
            Image.new("RGB", (64, 64), (number * 40, 0, 0)).save(data, "PNG")
            latent = torch.full((4, 8, 8), float(number)) + torch.arange(8.0)  # flipping it changes it
            hidden = torch.full((77, 32), float(number), dtype=torch.float16)
            stored[f"photo {number}"] = (latent, hidden)
            latents = {"latents": latent, "latents_flipped": latent.flip(2), "original_size": torch.tensor([64, 64]),
                       "crop_ltrb": torch.tensor([0, 0, 64, 64]), "resized_size": torch.tensor([64, 64]),
                       "bucket_size": torch.tensor([64, 64])}
            writer.write(encode_sample(number=number, image=data.getvalue(), ext="png", image_key=f"{number}.png",
                                       caption=f"photo {number}", tags=None, original_size=(64, 64), bucket=(64, 64),
                                       latents=latents, te={"hidden_states": hidden}, te_prompt=f"photo {number}"),
                         (64, 64))
        writer.commit(latents=latent_provenance(family="sd1", vae="v", flip_aug=True, alpha_mask=False,
                                                resize_interpolation=None),
                      text_encoder_outputs=text_provenance(identity="te", storage_dtype="float16"))

    def config(extra: str) -> list:
        path = tmp_path / "d.toml"
        path.write_text(f"[general]\nresolution = 64\nbatch_size = 2\n[[datasets]]\n[[datasets.subsets]]\n"
                        f"shards = \"{tmp_path}/shards/shard-000000.tar\"\nflip_aug = true\n{extra}")
        return load_dataset_configs(DatasetFlags(dataset_config=str(path)))

    run = load_shard_run(config(""), family="sd1", text_outputs_wanted=True)
    assert run.source.use_latents and run.source.use_text
    layout = plan_layout(run.source.units, world_size=1, workers=1, batch_size=2)
    control = ShardBatchControl(ShardStreamDataset(run.source, layout, rank=0, seed=2))
    control.set_epoch(1)
    batches = list(make_shard_loader(control.dataset, control))
    assert len(batches) == 3 and all(b.pixel_values is None for b in batches)
    flips = []
    for batch in batches:
        for caption, latent, flipped, hidden in zip(batch.captions, batch.latents, batch.flipped,
                                                    batch.text_hidden_states):
            expected, expected_hidden = stored[caption]
            assert torch.equal(latent, expected.flip(2) if flipped else expected)
            assert torch.equal(hidden, expected_hidden)
            flips.append(bool(flipped))
    assert len(set(flips)) == 2  # both the stored and the flipped latents were drawn
    with pytest.raises(DatasetConfigError, match="random_crop cannot be used with shards that carry latents"):
        load_shard_run(config("random_crop = true"), family="sd1")
    with pytest.raises(DatasetConfigError, match="family: shards have 'sd1', this run 'sdxl'"):
        load_shard_run(config(""), family="sdxl")
    with pytest.raises(DatasetConfigError, match="caption settings make each prompt change"):
        load_shard_run(config("shuffle_caption = true"), family="sd1", text_outputs_wanted=True)


def test_resumed_streamed_run_ends_with_the_same_weights(shard_dir, tmp_path, tiny_model_dirs, run_in_process):
    """train_network.py on shards with --save_state, then --resume from the state saved mid-epoch: the same LoRA;
    with more worker streams (another order) the resume is one error line."""
    config = config_file(tmp_path / "d.toml", shard_dir[1], resolution=128, batch_size=3,
                         extra="shuffle_caption = true\ncaption_dropout_rate = 0.3\n")

    def train(output: Path, *extra: str) -> dict[str, torch.Tensor]:
        assert train_network.main(["--pretrained_model_name_or_path", str(tiny_model_dirs["sd15"]),
                                   "--dataset_config", str(config), "--network_module", "networks.lora",
                                   "--network_dim", "4", "--learning_rate", "1e-2", "--seed", "3",
                                   "--max_data_loader_n_workers", "0", "--max_train_steps", "4",
                                   "--output_dir", str(output), "--output_name", "lora", *extra]) == 0
        return load_file(output / "lora.safetensors")

    whole = train(tmp_path / "whole", "--save_every_n_steps", "2", "--save_state")
    resumed = train(tmp_path / "resumed", "--resume", str(tmp_path / "whole" / "lora-step00000002-state"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert any(v.abs().sum() > 0 for k, v in whole.items() if k.endswith("lora_up.weight"))

    args = ["--pretrained_model_name_or_path", tiny_model_dirs["sd15"], "--dataset_config", config,
            "--network_module", "networks.lora", "--network_dim", "4", "--seed", "3", "--max_train_steps", "4",
            "--max_data_loader_n_workers", "2", "--output_dir", tmp_path / "other", "--output_name", "lora",
            "--resume", tmp_path / "whole" / "lora-step00000002-state"]
    line = assert_one_error_line(run_in_process("train_network.py", args, expect_rc=1))
    assert "1 worker stream(s)" in line and "--max_data_loader_n_workers 1" in line
