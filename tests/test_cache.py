"""Latent cache (kohya npz format, validity, crops, ranks) and the sharded text-encoder output cache."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.models.families import SD1, SDXL
from library.cache.latent_files import (
    CacheStatus,
    LatentEncodingError,
    LatentJob,
    check_latent_cache,
    encode_latents,
    fill_latent_cache,
    latent_cache_path,
    load_cached_latents,
)
from library.cache.text_encoder_files import TextEncoderOutputCache, fill_text_encoder_cache, text_encoder_cache_identity
from library.models.text_encoding import PromptEncoder
from library.models.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_model("sd15", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_model("sdxl", seed=0)


def make_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def load_pixels(job: LatentJob, flipped: bool) -> torch.Tensor:
    """Resize to the job's resized size, crop the bucket window, optionally flip; [-1, 1]."""
    image = Image.open(job.image_path).convert("RGB").resize(job.resized_size, Image.BICUBIC)
    left, top, right, bottom = job.crop_ltrb
    array = np.asarray(image.crop((left, top, right, bottom)), dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return torch.flip(pixels, dims=[2]) if flipped else pixels


def job_for(path: Path, size=(40, 24), bucket=(32, 16), resized=(40, 24), crop=(4, 4), flip=False) -> LatentJob:
    return LatentJob(path, size, bucket, resized, crop, flip)


# ------------------------------------------------------------------------------------------------ latents


def test_latent_cache_path_is_kohyas_name():
    assert latent_cache_path("/data/a/cat.1.png", (832, 1216), SDXL) == Path("/data/a/cat.1_0832x1216_sdxl.npz")
    assert latent_cache_path(Path("x/dog.jpg"), (64, 48), SD1) == Path("x/dog_0064x0048_sd.npz")
    assert latent_cache_path("img.webp", (12000, 512), SDXL).name == "img_12000x0512_sdxl.npz"


def test_fill_writes_kohya_keys_and_skips_valid_entries(tmp_path, sd15):
    jobs = [job_for(make_image(tmp_path / f"img{i}.png", (40, 24), seed=i), flip=True) for i in range(3)]
    result = fill_latent_cache(jobs, sd15.vae, load_pixels, batch_size=2, family=SD1, progress=False)
    assert (result.encoded, result.skipped_valid) == (3, 0)
    path = tmp_path / "img0_0040x0024_sd.npz"
    with np.load(path) as npz:
        assert {"latents", "original_size", "crop_ltrb", "latents_flipped"} <= set(npz.files)
        assert npz["latents"].shape == (4, 2, 4) and npz["latents"].dtype == np.float32
        assert npz["latents_flipped"].shape == (4, 2, 4) and npz["latents_flipped"].dtype == np.float32
        assert npz["original_size"].tolist() == [40, 24]
        assert npz["crop_ltrb"].tolist() == [4, 4, 36, 20]
        assert "alpha_mask" not in npz.files
        assert not np.allclose(npz["latents"], npz["latents_flipped"])
    assert check_latent_cache(path, jobs[0]) == CacheStatus("valid")
    again = fill_latent_cache(jobs, sd15.vae, load_pixels, batch_size=2, family=SD1, progress=False)
    assert (again.encoded, again.skipped_valid) == (0, 3)
    assert not list(tmp_path.glob("*.tmp"))


def test_latents_are_unscaled_and_seeded_per_image(tmp_path, sd15):
    """Same seed -> same latents whatever the batch size; stored values are the unscaled VAE sample."""
    jobs = [job_for(make_image(tmp_path / f"img{i}.png", (40, 24), seed=i)) for i in range(3)]
    runs = []
    for batch in (1, 3):
        fill_latent_cache(jobs, sd15.vae, load_pixels, batch, skip_valid=False, family=SD1, seed=7, progress=False)
        runs.append([load_cached_latents(j.cache_path(SD1)).latents for j in jobs])
    # the noise depends on (seed, image) only; batched convolutions differ from single ones by ~1e-6
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*runs))
    with torch.no_grad():
        dist = sd15.vae.encode(load_pixels(jobs[0], False)[None]).latent_dist
    stored = runs[0][0]
    assert not torch.equal(stored, dist.mean[0])
    assert ((stored - dist.mean[0]).abs() <= 6 * dist.std[0] + 1e-5).all()  # a sample, not scaled by 0.18215


def write_kohya_npz(path: Path, latents_shape=(4, 2, 4)) -> None:
    np.savez(path, latents=np.zeros(latents_shape, np.float32), original_size=np.array([40, 24]),
             crop_ltrb=np.array([0, 4, 32, 20]))


def test_kohya_made_npz_accepted_when_newer_than_image(tmp_path):
    image = make_image(tmp_path / "k.png", (40, 24))
    job = job_for(image)
    path = job.cache_path(family=SDXL)
    write_kohya_npz(path)
    image_mtime = os.stat(image).st_mtime_ns
    os.utime(path, ns=(image_mtime + 10**9, image_mtime + 10**9))
    assert check_latent_cache(path, job).is_valid
    os.utime(path, ns=(image_mtime - 10**9, image_mtime - 10**9))
    status = check_latent_cache(path, job)
    assert status.state == "stale" and "older" in status.reason
    # kohya's crop_ltrb is in bucket coordinates: a flip mirrors it against the bucket width
    loaded = load_cached_latents(path, flipped=False)
    assert loaded.crop_top_left == (4, 0) and loaded.original_size_hw == (24, 40)
    with pytest.raises(ValueError, match="latents_flipped"):
        load_cached_latents(path, flipped=True)


def test_missing_unreadable_and_wrong_shape_are_not_valid(tmp_path, sd15):
    image = make_image(tmp_path / "s.png", (40, 24))
    job = job_for(image)
    path = job.cache_path(family=SD1)
    assert check_latent_cache(path, job).state == "missing"
    fill_latent_cache([job], sd15.vae, load_pixels, family=SD1, progress=False)
    other_bucket = job_for(image, bucket=(24, 24), crop=(8, 0))  # same file name, different bucket
    status = check_latent_cache(path, other_bucket)
    assert status.state == "stale" and "shape" in status.reason
    flip_wanted = job_for(image, flip=True)
    assert check_latent_cache(path, flip_wanted).state == "stale"
    moved_crop = job_for(image, crop=(0, 0))
    assert "crop_ltrb" in check_latent_cache(path, moved_crop).reason
    path.write_bytes(b"not a zip")
    assert check_latent_cache(path, job).state == "stale"
    assert fill_latent_cache([job], sd15.vae, load_pixels, family=SD1, progress=False).rebuilt == 1
    assert check_latent_cache(path, job).is_valid


def test_changed_image_makes_entry_stale_and_fill_rebuilds(tmp_path, sd15):
    image = make_image(tmp_path / "c.png", (40, 24), seed=1)
    job = job_for(image)
    path = job.cache_path(family=SD1)
    fill_latent_cache([job], sd15.vae, load_pixels, family=SD1, progress=False)
    before = load_cached_latents(path).latents
    old = os.stat(image)
    make_image(image, (40, 24), seed=2)  # same size in pixels, different bytes
    os.utime(image, ns=(old.st_atime_ns, old.st_mtime_ns + 5 * 10**9))
    os.utime(path, ns=(old.st_mtime_ns + 10 * 10**9,) * 2)  # npz newer: a kohya-style mtime check would pass
    status = check_latent_cache(path, job)
    assert status.state == "stale" and "changed" in status.reason
    result = fill_latent_cache([job], sd15.vae, load_pixels, family=SD1, progress=False)
    assert (result.encoded, result.rebuilt) == (1, 1)
    assert check_latent_cache(path, job).is_valid
    assert not torch.equal(before, load_cached_latents(path).latents)


def test_crop_round_trips_and_mirrors_on_flip(tmp_path, sd15):
    image = make_image(tmp_path / "w.png", (60, 40))
    job = LatentJob(image, (60, 40), bucket=(32, 32), resized_size=(48, 32), crop_left_top=(10, 0), flip=True)
    fill_latent_cache([job], sd15.vae, load_pixels, family=SDXL, progress=False)
    path = tmp_path / "w_0060x0040_sdxl.npz"
    plain = load_cached_latents(path, flipped=False)
    assert plain.crop_top_left == (0, 10) and plain.original_size_hw == (40, 60)
    assert plain.target_size_hw == (32, 32) and not plain.flipped
    flipped = load_cached_latents(path, flipped=True)
    assert flipped.crop_top_left == (0, 48 - 42) and flipped.flipped
    with np.load(path) as npz:
        assert torch.equal(flipped.latents, torch.from_numpy(npz["latents_flipped"]))


def test_alpha_mask_is_stored_and_flipped(tmp_path, sd15):
    image = make_image(tmp_path / "m.png", (32, 16))
    job = LatentJob(image, (32, 16), (32, 16), (32, 16), (0, 0), flip=True, alpha_mask=True)
    alpha = torch.linspace(0, 1, 32).expand(16, 32).contiguous()

    def with_alpha(j: LatentJob, flipped: bool):
        return load_pixels(j, flipped), alpha

    fill_latent_cache([job], sd15.vae, with_alpha, family=SD1, progress=False)
    path = job.cache_path(SD1)
    assert check_latent_cache(path, job).is_valid
    assert torch.equal(load_cached_latents(path).alpha_mask, alpha)
    assert torch.equal(load_cached_latents(path, flipped=True).alpha_mask, torch.flip(alpha, dims=[1]))


def test_nan_latents_raise_naming_the_image(tmp_path, sd15):
    with pytest.raises(LatentEncodingError, match="bad.png"):
        encode_latents(sd15.vae, torch.full((1, 3, 16, 16), float("nan")), names=["bad.png"])
    image = make_image(tmp_path / "nan.png", (40, 24))
    with pytest.raises(LatentEncodingError, match="nan.png"):
        fill_latent_cache([job_for(image)], sd15.vae, lambda j, f: torch.full((3, 16, 32), float("nan")),
                          family=SD1, progress=False)
    assert not list(tmp_path.glob("*.npz"))
    half_vae = build_tiny_model("sd15").vae.half()
    with pytest.raises(LatentEncodingError, match="no_half_vae"):
        encode_latents(half_vae, torch.full((1, 3, 16, 16), float("nan")))


def test_ranks_fill_disjoint_shares_that_cover_everything(tmp_path, sd15):
    jobs = [job_for(make_image(tmp_path / f"r{i}.png", (40, 24), seed=i)) for i in range(5)]
    paths = [j.cache_path(SD1) for j in jobs]
    r0 = fill_latent_cache(jobs, sd15.vae, load_pixels, 2, rank=0, world_size=2, family=SD1, progress=False)
    done0 = {p for p in paths if p.exists()}
    r1 = fill_latent_cache(jobs, sd15.vae, load_pixels, 2, rank=1, world_size=2, family=SD1, progress=False)
    done1 = {p for p in paths if p.exists()} - done0
    assert (r0.encoded, r1.encoded) == (3, 2)
    assert done0 == set(paths[0::2]) and done1 == set(paths[1::2])
    assert all(check_latent_cache(p, j).is_valid for p, j in zip(paths, jobs))


# ------------------------------------------------------------------------------------------ text encoders

PROMPTS = ["a photo of a cat", "a dog, sitting", "long " * 100, "a photo of a cat", ""]


def prompt_encoder(model, max_token_length: int = 75) -> PromptEncoder:
    return PromptEncoder(model.family.name, model.tokenizers, model.text_encoders, max_token_length)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_te_cache_returns_what_the_encoder_gives(tmp_path, family, sd15, sdxl):
    model = sd15 if family == "sd15" else sdxl
    encoder = prompt_encoder(model, max_token_length=150)
    identity = text_encoder_cache_identity(encoder)
    cache = TextEncoderOutputCache(tmp_path, identity)
    assert fill_text_encoder_cache(PROMPTS, encoder, cache, batch_size=2, progress=False) == 4
    assert len(cache) == 4

    reopened = TextEncoderOutputCache(tmp_path, identity)  # as another process would see it
    assert reopened.missing(PROMPTS) == []
    with torch.no_grad():
        fresh = encoder.encode(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        hidden, pooled = reopened.get(prompt)
        assert hidden.dtype == torch.float16 and hidden.shape == (152, fresh.hidden_states.shape[-1])
        assert torch.equal(hidden, fresh.hidden_states[b].half())
        if family == "sdxl":
            assert torch.equal(pooled, fresh.pooled[b].half())
        else:
            assert pooled is None
    hidden, pooled = reopened.get_many(PROMPTS[:3])
    assert torch.equal(hidden, fresh.hidden_states[:3].half())
    assert (pooled is None) == (family == "sd15")


def test_te_cache_float32_storage_is_exact(tmp_path, sdxl):
    encoder = prompt_encoder(sdxl)
    cache = TextEncoderOutputCache(tmp_path, text_encoder_cache_identity(encoder, "tiny"), storage_dtype="float32")
    with torch.no_grad():
        fresh = encoder.encode(["x y z"])
    cache.add(["x y z"], fresh)
    assert torch.equal(cache.get("x y z")[0], fresh.hidden_states[0])  # from the write buffer
    cache.flush()
    hidden, pooled = TextEncoderOutputCache(tmp_path, cache.identity, storage_dtype="float32").get("x y z")
    assert torch.equal(hidden, fresh.hidden_states[0]) and torch.equal(pooled, fresh.pooled[0])


def test_te_cache_misses_on_caption_or_setting_change(tmp_path, sd15):
    encoder = prompt_encoder(sd15)
    cache = TextEncoderOutputCache(tmp_path, text_encoder_cache_identity(encoder))
    fill_text_encoder_cache(["a red car"], encoder, cache, progress=False)
    assert cache.missing(["a red car", "a red car, parked"]) == ["a red car, parked"]
    with pytest.raises(KeyError, match="parked"):
        cache.get("a red car, parked")
    longer = prompt_encoder(sd15, max_token_length=225)
    assert TextEncoderOutputCache(tmp_path, text_encoder_cache_identity(longer)).missing(["a red car"]) == ["a red car"]
    other_model = text_encoder_cache_identity(encoder, model_id="some-other-checkpoint")
    assert TextEncoderOutputCache(tmp_path, other_model).missing(["a red car"]) == ["a red car"]
    retrained = prompt_encoder(build_tiny_model("sd15", seed=1))
    assert text_encoder_cache_identity(retrained) != cache.identity
    assert text_encoder_cache_identity(prompt_encoder(sd15)) == cache.identity  # deterministic
    with pytest.raises(ValueError, match="shape"):  # a wrong-shaped entry cannot slip into the shards
        cache.add(["x"], longer.encode(["x"]))


def test_empty_caption_is_cached_once_and_shared(tmp_path, sd15):
    encoder = prompt_encoder(sd15)
    cache = TextEncoderOutputCache(tmp_path, text_encoder_cache_identity(encoder))
    fill_text_encoder_cache(["only caption"], encoder, cache, progress=False)  # "" added for caption dropout
    assert "" in cache and len(cache) == 2
    fill_text_encoder_cache(["", "", "only caption"], encoder, cache, progress=False)
    cache.add(["", ""], encoder.encode(["", ""]))
    cache.flush()
    assert len(TextEncoderOutputCache(tmp_path, cache.identity)) == 2


def test_te_cache_ranks_write_separate_shards(tmp_path, sd15):
    encoder = prompt_encoder(sd15)
    identity = text_encoder_cache_identity(encoder)
    prompts = [f"caption number {i}" for i in range(7)]
    counts = [fill_text_encoder_cache(prompts, encoder, TextEncoderOutputCache(tmp_path, identity), 3, rank, 2,
                                      progress=False) for rank in (0, 1)]
    assert sorted(counts) == [4, 4] and sum(counts) == 8  # 7 captions + ""
    merged = TextEncoderOutputCache(tmp_path, identity)
    assert merged.missing(prompts + [""]) == [] and len(merged) == 8
    assert len(list(merged.folder.glob("*.keys.npy"))) == 2


class CaptionDataset(torch.utils.data.Dataset):
    def __init__(self, cache: TextEncoderOutputCache, prompts: list[str]) -> None:
        self.cache, self.prompts = cache, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache.get(self.prompts[i])[0]


def test_te_cache_reads_from_dataloader_worker(tmp_path, sd15):
    encoder = prompt_encoder(sd15)
    cache = TextEncoderOutputCache(tmp_path, text_encoder_cache_identity(encoder))
    prompts = ["one", "two", "three"]
    fill_text_encoder_cache(prompts, encoder, cache, progress=False)
    expected = torch.stack([cache.get(p)[0] for p in prompts])  # opens files in this process first
    loader = torch.utils.data.DataLoader(CaptionDataset(cache, prompts), batch_size=3, num_workers=1)
    assert torch.equal(next(iter(loader)), expected)

    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.get("two")[0], expected[1])
    cache.add(["four"], encoder.encode(["four"]))
    with pytest.raises(RuntimeError, match="flush"):
        pickle.dumps(cache)


def test_te_cache_ignores_uncommitted_shard(tmp_path, sd15):
    """A shard whose keys file never landed (crash mid-write) is invisible."""
    encoder = prompt_encoder(sd15)
    cache = TextEncoderOutputCache(tmp_path, text_encoder_cache_identity(encoder))
    fill_text_encoder_cache(["kept"], encoder, cache, progress=False)
    (cache.folder / "shard-crashed.hidden.npy").write_bytes(b"partial")
    assert TextEncoderOutputCache(tmp_path, cache.identity).missing(["kept", ""]) == []
