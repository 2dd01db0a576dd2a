"""tools/make_webdataset.py as a user runs it: shards that plain webdataset and tarfile read, holding the original
image bytes, captions, tags, sizes and buckets of the training dataset, at most --shard_size_mb each, with an
index.json that matches their content; cached latents / text-encoder outputs equal to the caches'; refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from library.cache.text_encoder_files import TextEncoderOutputCache
from library.data.buckets import make_bucket_set
from library.data.shard_format import ShardFormatError, decode_sample, read_index, shard_cached_latents
from library.models.tiny_models import make_tiny_model
from tests.helpers.user_paths import assert_one_error_line
from tools import make_webdataset
from tools.make_sample_dataset import make_sample_dataset

# (folder, file, size, caption or None): two kohya repeats folders, PNG and JPEG, several buckets
FOLDER_IMAGES = [
    ("10_cat", "a.jpg", (96, 96), "a cat on a mat"),
    ("10_cat", "b.png", (120, 40), "a long cat"),
    ("10_cat", "c.jpg", (64, 128), "a tall cat"),
    ("2_dog", "d.jpg", (96, 64), "a dog"),
    ("2_dog", "e.webp", (64, 96), None),  # no caption file: trains on the class tokens "dog"
    ("2_dog", "f.jpg", (80, 80), "a small dog"),
]
SHARD_MB = 0.04


def _noise_image(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny SD1.5 model (only the family this module needs)."""
    return make_tiny_model("sd15", tmp_path_factory.mktemp("tiny") / "sd15", seed=0)


def _read_tars(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every member of every shard, grouped by sample key, read with tarfile alone."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {"__shard__": shard.name.encode()})[field] = tar.extractfile(member).read()
    return samples


def test_folder_dataset_written_as_shards_from_the_command_line(tmp_path, run_script):
    images = tmp_path / "imgs"
    for number, (folder, name, size, caption) in enumerate(FOLDER_IMAGES):
        (images / folder).mkdir(parents=True, exist_ok=True)
        _noise_image(images / folder / name, size, number)
        if caption is not None:
            (images / folder / name).with_suffix(".txt").write_text(caption)
    output = tmp_path / "not" / "yet" / "shards"
    result = run_script("tools/make_webdataset.py", [
        "--train_data_dir", images, "--output_dir", output, "--shard_size_mb", SHARD_MB, "--resolution", "64",
        "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
        "--caption_extension", ".txt"])
    assert "wrote 6 samples" in result.stdout, result.stdout

    index = read_index(output)
    shards = sorted(output.glob("shard-*.tar"))
    assert sorted(p.name for p in output.iterdir()) == sorted([p.name for p in shards] + ["index.json"])  # no temp
    assert len(shards) >= 3 and [s.name for s in index.shards] == [p.name for p in shards]
    for entry, path in zip(index.shards, shards):
        assert entry.bytes == path.stat().st_size <= SHARD_MB * 1_000_000

    bucket_set = make_bucket_set((64, 64), 32, 128, 32, min_step=32)
    expected = {f"{folder}/{name}": (size, caption if caption is not None else folder.split("_", 1)[1])
                for folder, name, size, caption in FOLDER_IMAGES}
    raw = _read_tars(output)
    streamed = {s["__key__"]: decode_sample(s) for s in webdataset.WebDataset(
        [str(p) for p in shards], shardshuffle=False)}
    assert sorted(raw) == sorted(streamed) == [f"s{n:09d}" for n in range(6)]
    per_shard: dict[str, Counter] = {}
    for key, sample in streamed.items():
        size, caption = expected.pop(sample.image_key)
        source = images / sample.image_key
        assert sample.ext == source.suffix[1:] and sample.image == source.read_bytes() == raw[key][sample.ext]
        assert json.loads(raw[key]["json"]) == {"image_key": sample.image_key, "caption": caption, "tags": None,
                                                "original_size": list(size),
                                                "bucket": list(bucket_set.select(size).bucket)}
        assert sample.latents is None and sample.te is None
        shard = raw[key]["__shard__"].decode()
        per_shard.setdefault(shard, Counter())[f"{sample.bucket[0]}x{sample.bucket[1]}"] += 1
    assert not expected  # every image once
    assert index.samples == 6 and len(set(index.buckets)) >= 3
    assert index.buckets == dict(sum(per_shard.values(), Counter()))
    assert {s.name: s.buckets for s in index.shards} == {name: dict(c) for name, c in per_shard.items()}
    assert {s.name: s.samples for s in index.shards} == {name: sum(c.values()) for name, c in per_shard.items()}
    assert index.bucket_settings.resolution == (64, 64) and index.bucket_settings.enable_bucket
    assert index.latents is None and index.text_encoder_outputs is None


def _run(capsys, *argv: object) -> subprocess.CompletedProcess:
    code = make_webdataset.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["make_webdataset.py"], code, out, err)


def test_metadata_dataset_with_cached_latents_and_text_outputs(tmp_path, capsys, sd15):
    data = make_sample_dataset(tmp_path / "shapes", count=6, size=96, seed=0).parent
    metadata = json.loads((data / "meta.json").read_text())
    output, te_dir = tmp_path / "shards", tmp_path / "te"
    common = ["--train_data_dir", data / "images", "--in_json", data / "meta.json", "--output_dir", output,
              "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
              "--pretrained_model_name_or_path", sd15, "--flip_aug"]
    written = _run(capsys, *common, "--cache_latents_to_disk", "--seed", "1",
                   "--cache_text_encoder_outputs_to_disk", "--text_encoder_cache_dir", te_dir)
    assert written.returncode == 0, written.stderr

    index = read_index(output / "shard-{000000..000000}.tar")
    assert index.latents["family"] == "sd1" and index.latents["flip_aug"] and len(index.latents["vae"]) == 16
    text_cache = TextEncoderOutputCache(te_dir, index.text_encoder_outputs["identity"])
    npz_files = sorted((data / "images").glob("*_sd.npz"))
    assert len(npz_files) == 6
    mtimes = [p.stat().st_mtime_ns for p in npz_files]
    samples = [decode_sample(s) for s in webdataset.WebDataset(index.shard_paths(), shardshuffle=False)]
    first_latents = {}
    for sample in samples:
        entry = metadata[sample.image_key]
        assert (sample.caption, sample.tags) == (entry["caption"], entry["tags"])
        assert sample.image == (data / "images" / f"{sample.image_key}.png").read_bytes()
        (npz_path,) = (data / "images").glob(f"{sample.image_key}_*_sd.npz")
        with np.load(npz_path) as npz:
            assert set(sample.latents) == {"latents", "latents_flipped", "original_size", "crop_ltrb",
                                           "resized_size", "bucket_size"}
            for name, tensor in sample.latents.items():
                assert np.array_equal(tensor.numpy(), npz[name]), name
        assert tuple(sample.latents["bucket_size"].tolist()) == sample.bucket
        flipped = shard_cached_latents(sample.latents, flipped=True)
        assert flipped.flipped and torch.equal(flipped.latents, sample.latents["latents_flipped"])
        hidden, _ = text_cache.get(sample.te_prompt)
        assert entry["caption"] in sample.te_prompt and torch.equal(sample.te["hidden_states"], hidden)
        first_latents[sample.key] = sample.latents["latents"]

    # From the filled cache only, replacing the set: the same tensors, nothing encoded again.
    again = _run(capsys, *common, "--latents_from_cache", "--overwrite", "--shard_size_mb", "0.03")
    assert again.returncode == 0, again.stderr
    assert [p.stat().st_mtime_ns for p in npz_files] == mtimes
    replaced = read_index(output)
    assert len(replaced.shards) > 1 and replaced.text_encoder_outputs is None
    assert replaced.latents == index.latents
    assert sorted(p.name for p in output.glob("shard-*.tar")) == [s.name for s in replaced.shards]
    for raw in webdataset.WebDataset(replaced.shard_paths(), shardshuffle=False):
        sample = decode_sample(raw)
        assert torch.equal(sample.latents["latents"], first_latents[sample.key]) and sample.te is None

    # A cache that is no longer complete is refused before the model loads; the shards stay as they were.
    npz_files[2].unlink()
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    refused = _run(capsys, *common, "--latents_from_cache", "--overwrite")
    assert_one_error_line(refused, "--latents_from_cache", npz_files[2].name, "--cache_latents_to_disk")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    images = tmp_path / "imgs" / "3_thing"
    images.mkdir(parents=True)
    _noise_image(images / "x.jpg", (64, 64), 0)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "shard-000000.tar").write_bytes(b"old")
    (taken / "notes.txt").write_text("mine")
    base = ["--train_data_dir", tmp_path / "imgs", "--resolution", "64"]

    assert_one_error_line(_run(capsys, *base, "--output_dir", taken), "--overwrite", str(taken))
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt", "shard-000000.tar"]
    assert (taken / "shard-000000.tar").read_bytes() == b"old"

    fresh = tmp_path / "fresh"
    assert_one_error_line(_run(capsys, "--train_data_dir", tmp_path / "missing", "--output_dir", fresh),
                          "--train_data_dir", "does not exist")
    bad_json = tmp_path / "meta.json"
    bad_json.write_text('{"x": ')
    assert_one_error_line(_run(capsys, *base, "--in_json", bad_json, "--output_dir", fresh), str(bad_json), "JSON")
    assert_one_error_line(_run(capsys, *base, "--output_dir", fresh, "--cache_latents"),
                          "--pretrained_model_name_or_path")
    assert_one_error_line(_run(capsys, *base, "--output_dir", fresh, "--shard_size_mb", "0.001"),
                          "--shard_size_mb", "x.jpg")
    with monkeypatch.context() as without:
        without.setitem(sys.modules, "webdataset", None)  # as if not installed: `import webdataset` fails
        assert_one_error_line(_run(capsys, *base, "--output_dir", fresh), "pip install webdataset==1.0.2")
    assert not fresh.exists()

    # --overwrite replaces the old set (and only it)
    assert _run(capsys, *base, "--output_dir", taken, "--overwrite").returncode == 0
    assert sorted(p.name for p in taken.iterdir()) == ["index.json", "notes.txt", "shard-000000.tar"]
    assert read_index(taken).samples == 1
    with tarfile.open(taken / "shard-000000.tar") as tar:
        assert tar.getnames() == ["s000000000.jpg", "s000000000.json"]
    tampered = json.loads((taken / "index.json").read_text())
    tampered["samples"] = 2  # an index whose counts do not add up is refused, naming the file
    (taken / "index.json").write_text(json.dumps(tampered))
    with pytest.raises(ShardFormatError, match="index.json: the shards hold 1 samples but samples is 2"):
        read_index(taken / "shard-000000.tar")
