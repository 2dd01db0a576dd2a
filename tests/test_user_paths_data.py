"""Issue 9, data items (B5, D11, D12): what users do with their own folders, run as they type it.

Every test here failed before the fix: a flat ControlNet folder with a filter was refused; a PNG with valid CRCs
but broken compressed data passed the start-up check; 16-bit images trained almost white; a NaN in a cached
latent stopped training; GIFs, 5x upscales and over-long captions went unmentioned; some data errors were
tracebacks.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data.dataset_config import DatasetConfig, SubsetConfig
from library.data.datasets import TrainingDataset
from library.data.images import load_image, to_tensor, verify_image
from library.data.pixels import normalize_pixels
from library.data.dataset_index import build_dataset_index
from tests.helpers.user_paths import assert_one_error_line


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the verified-image cache of every test (in-process and in subprocesses) out of the real ~/.cache."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def lora_args(model: Path, output: Path, steps: int, *data: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), *data, "--resolution", "64", "--enable_bucket",
            "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--network_dim", "4", "--network_alpha", "2",
            "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0",
            "--output_dir", str(output), "--output_name", "lora", "--max_train_steps", str(steps)]


def copy_dataset(shapes_data: Path, target: Path) -> Path:
    shutil.copytree(shapes_data, target)
    return target


# --------------------------------------------------------------------------------------------------
# B5: a flat ControlNet folder with --conditioning_filter
# --------------------------------------------------------------------------------------------------


def test_controlnet_trains_on_a_flat_folder_with_a_filter(run_script, tiny_model_dirs, shapes_data, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for image in sorted((shapes_data / "images").glob("*.png")):
        shutil.copy(image, imgs / image.name)
        caption = image.with_suffix(".caption").read_text(encoding="utf-8")
        (imgs / f"{image.stem}.txt").write_text(caption, encoding="utf-8")  # kohya's usual sidecar
    output = tmp_path / "out"
    result = run_script("train_controlnet.py", [
        "--pretrained_model_name_or_path", tiny_model_dirs["sd15"], "--train_data_dir", imgs,
        "--conditioning_filter", "canny", "--caption_extension", ".txt", "--resolution", "64",
        "--learning_rate", "1e-3", "--seed", "2", "--max_data_loader_n_workers", "0", "--output_dir", output,
        "--output_name", "cn", "--max_train_steps", "2"])
    assert (output / "cn.safetensors").is_file(), result.stdout[-2000:]


def test_flat_folder_captions_come_from_the_caption_extension(tmp_path):
    """Without a sidecar in --caption_extension (and no class tokens) the image is a problem naming it."""
    from library.cli.config import build_parser
    from library.cli.data_args import add_conditioning_arguments, add_dataset_arguments, dataset_flags_from_args
    from library.data.dataset_config_loading import load_dataset_configs

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(imgs / "a.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(imgs / "b.png")
    (imgs / "a.txt").write_text("a photo of a\n", encoding="utf-8")
    parser = build_parser("t", add_dataset_arguments, add_conditioning_arguments)
    args = parser.parse_args(["--train_data_dir", str(imgs), "--conditioning_filter", "canny",
                              "--caption_extension", ".txt", "--resolution", "64"])
    index = build_dataset_index(load_dataset_configs(dataset_flags_from_args(args)), verify_images=False)
    assert [r.caption for r in index.records if r.image_path.name == "a.png"] == ["a photo of a"]
    assert [p.location for p in index.problems] == [str(imgs / "b.png")]
    assert "no caption file b.txt" in index.problems[0].what


# --------------------------------------------------------------------------------------------------
# D11: a PNG whose CRCs are valid but whose compressed data is broken
# --------------------------------------------------------------------------------------------------


def break_png_data(path: Path) -> None:
    """Corrupt the middle of the IDAT zlib stream and recompute the chunk CRC, so only inflating notices."""
    data = bytearray(path.read_bytes())
    position = 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"IDAT":
            start = position + 8
            middle = start + length // 2
            data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
            crc = zlib.crc32(bytes(data[position + 4:start + length])) & 0xFFFFFFFF
            data[start + length:start + length + 4] = struct.pack(">I", crc)
            path.write_bytes(bytes(data))
            return
        position += 12 + length
    raise AssertionError("no IDAT chunk")


def noisy_png(path: Path, size: tuple[int, int] = (96, 96), seed: int = 0) -> Path:
    """Noise compresses badly, so the IDAT stream is long enough to break in its middle."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_broken_png_helper_passes_verify_but_not_load(tmp_path):
    path = noisy_png(tmp_path / "x.png")
    break_png_data(path)
    with Image.open(path) as image:
        image.verify()  # CRCs and IEND are fine
    with pytest.raises(Exception), Image.open(path) as image:
        image.load()
    with pytest.raises(ValueError):
        verify_image(path)


@pytest.fixture
def broken_dataset(shapes_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    data = copy_dataset(shapes_data, tmp_path / "data")
    broken = data / "images" / "shape_002.png"
    noisy_png(broken, (96, 96))
    break_png_data(broken)
    return data, broken


def test_check_dataset_reports_a_png_with_broken_data(run_script, broken_dataset):
    data, broken = broken_dataset
    result = run_script("tools/check_dataset.py", ["--in_json", data / "meta.json", "--train_data_dir",
                                                   data / "images", "--resolution", "64", "--enable_bucket",
                                                   "--min_bucket_reso", "64", "--max_bucket_reso", "128"],
                        expect_rc=1)
    assert "no problems found" not in result.stdout
    assert f"{broken}: corrupt or truncated image" in result.stdout


def test_training_refuses_a_png_with_broken_data_at_start_up(run_script, tiny_model_dirs, broken_dataset, tmp_path):
    data, broken = broken_dataset
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], tmp_path / "out", 6, "--in_json",
                                                      data / "meta.json", "--train_data_dir", data / "images"),
                        expect_rc=1)
    assert_one_error_line(result, str(broken), "corrupt or truncated image")


def test_verified_images_are_remembered_and_rechecked_when_changed(shapes_data, tmp_path, private_cache):
    data = copy_dataset(shapes_data, tmp_path / "data")
    dataset = DatasetConfig(kind="dreambooth", subsets=(SubsetConfig(image_dir=data / "images"),),
                            resolution=(64, 64))
    assert not build_dataset_index([dataset]).problems
    files = list(private_cache.rglob("*.json"))
    assert len(files) == 1  # one small file per image folder, in the user's cache, not in the dataset
    entries = json.loads(files[0].read_text())["images"]
    assert sorted(entries) == [f"shape_{i:03d}.png" for i in range(6)]
    assert not any(p.suffix == ".json" for p in (data / "images").iterdir())

    # The cache is trusted only for the same size and mtime: a file broken afterwards is decoded again.
    broken = data / "images" / "shape_004.png"
    noisy_png(broken, (96, 96))
    break_png_data(broken)
    problems = build_dataset_index([dataset]).problems
    assert [p.location for p in problems] == [str(broken)]


def test_verified_cache_that_cannot_be_written_is_harmless(shapes_data, tmp_path):
    from library.data.images import VerifiedImages

    data = copy_dataset(shapes_data, tmp_path / "data")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    dataset = DatasetConfig(kind="dreambooth", subsets=(SubsetConfig(image_dir=data / "images"),),
                            resolution=(64, 64))
    index = build_dataset_index([dataset], verified_cache_dir=blocker / "cache")
    assert not index.problems and len(index.records) == 6
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    cache = VerifiedImages(garbage)
    cache._file_for((data / "images").resolve()).write_text("{not json")
    assert cache.lookup(data / "images" / "shape_000.png", os.stat(data / "images" / "shape_000.png")) is None


def test_decode_error_during_training_names_the_file(shapes_data, tmp_path):
    """If an image breaks after the start-up check, the error names it (ImageReadError is a one-line error)."""
    from library.data.images import ImageReadError

    data = copy_dataset(shapes_data, tmp_path / "data")
    dataset = DatasetConfig(kind="dreambooth", subsets=(SubsetConfig(image_dir=data / "images"),),
                            resolution=(64, 64))
    index = build_dataset_index([dataset], verified_cache_dir=None)
    broken = data / "images" / "shape_000.png"
    noisy_png(broken, Image.open(broken).size)
    break_png_data(broken)
    training = TrainingDataset(index, seed=0)
    position = next(i for i, r in enumerate(training.records) if r.image_path == broken)
    with pytest.raises(ImageReadError, match="shape_000.png: cannot decode the image"):
        training[position]

    from library.cli.setup_from_args import user_errors

    assert issubclass(ImageReadError, user_errors())


# --------------------------------------------------------------------------------------------------
# D11: high-bit-depth and other unusual modes
# --------------------------------------------------------------------------------------------------


def gradient(height: int = 32, width: int = 64) -> np.ndarray:
    """0..1 left to right: the mean is exactly one half."""
    return np.tile(np.linspace(0.0, 1.0, width), (height, 1))


def save_16bit_gradient(path: Path) -> Path:
    Image.fromarray(np.round(gradient() * 65535).astype(np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")
    return path


def test_16bit_png_trains_at_its_real_brightness(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    save_16bit_gradient(images / "grad.png")
    (images / "grad.caption").write_text("a gradient")
    dataset = DatasetConfig(kind="dreambooth", subsets=(SubsetConfig(image_dir=images),), resolution=(64, 32))
    index = build_dataset_index([dataset], verified_cache_dir=None)
    assert not index.problems
    pixels = normalize_pixels(TrainingDataset(index, seed=0)[0].pixel_values)
    assert abs(float(pixels.mean())) < 0.02, float(pixels.mean())  # was +0.996 (mean 254.5 of 255)
    assert float(pixels.min()) < -0.95 and float(pixels.max()) > 0.95


def _mode_image(mode: str) -> Image.Image:
    """A gradient (or half-and-half image) in ``mode`` whose mean brightness is 127.5 of 255."""
    g = gradient()
    if mode in ("I;16", "I;16B"):
        image = Image.fromarray(np.round(g * 65535).astype(np.uint16))
        return image if mode == "I;16" else Image.frombytes("I;16B", image.size, image.tobytes("raw", "I;16B"))
    if mode == "I":
        return Image.fromarray(np.round(g * 65535).astype(np.int32))
    if mode == "F":
        return Image.fromarray(g.astype(np.float32))
    eight = Image.fromarray(np.round(g * 255).astype(np.uint8), mode="L")
    if mode == "LA":
        return Image.merge("LA", (eight, Image.new("L", eight.size, 255)))
    if mode == "CMYK":
        return eight.convert("RGB").convert("CMYK")
    if mode == "1":
        half = np.zeros(g.shape, dtype=np.uint8)
        half[:, g.shape[1] // 2:] = 255
        return Image.fromarray(half, mode="L").convert("1", dither=Image.Dither.NONE)
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F", "LA", "CMYK", "1"])
def test_unusual_modes_keep_their_brightness(mode):
    from library.data.images import to_rgb_and_alpha

    image = _mode_image(mode)
    assert image.mode == mode
    rgb, _ = to_rgb_and_alpha(image)
    assert rgb.mode == "RGB"
    mean = float(np.asarray(rgb, dtype=np.float64).mean())
    assert abs(mean - 127.5) < 1.0, (mode, mean)  # PIL's own convert gives 254.5 for I;16 and I, 0.0 for F


@pytest.mark.parametrize("mode,suffix", [("I;16", ".png"), ("LA", ".png"), ("CMYK", ".jpg"), ("1", ".png")])
def test_unusual_mode_files_load_at_their_brightness(tmp_path, mode, suffix):
    path = tmp_path / f"x{suffix}"
    _mode_image(mode).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    pixels = to_tensor(load_image(path).rgb)
    assert abs(float(pixels.mean())) < 0.025, (mode, float(pixels.mean()))


def test_palette_with_transparency_goes_on_white(tmp_path):
    """P + tRNS: transparent pixels become white (as RGBA images do), the opaque half keeps its colour."""
    image = Image.new("P", (64, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (32, 0, 64, 32))
    path = tmp_path / "p.png"
    image.save(path, transparency=1)
    loaded = load_image(path, keep_alpha=True)
    array = np.asarray(loaded.rgb)
    assert array[:, :32].max() == 0 and array[:, 32:].min() == 255
    alpha = np.asarray(loaded.alpha)
    assert alpha[:, :32].min() == 255 and alpha[:, 32:].max() == 0


# --------------------------------------------------------------------------------------------------
# D11: NaN/inf inside a cached latent
# --------------------------------------------------------------------------------------------------


def test_nan_in_a_cached_latent_is_rebuilt_not_trained_on(run_script, run_in_process, tiny_model_dirs, shapes_data,
                                                         tmp_path):
    data = copy_dataset(shapes_data, tmp_path / "data")
    flags = ("--in_json", data / "meta.json", "--train_data_dir", data / "images", "--cache_latents_to_disk")
    run_in_process("train_network.py", lora_args(tiny_model_dirs["sd15"], tmp_path / "first", 1, *flags))  # the caches
    caches = sorted((data / "images").glob("*_sd.npz"))
    assert len(caches) == 6
    poisoned = caches[1]
    with np.load(poisoned) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["latents"][0, 0, 0] = np.nan
    arrays["latents"][1, 2, 3] = np.inf
    stat = poisoned.stat()
    np.savez(poisoned, **arrays)
    os.utime(poisoned, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], tmp_path / "second", 6, *flags))
    output = result.stdout + result.stderr
    named = [line for line in output.splitlines() if str(poisoned) in line]
    assert len(named) == 1 and "NaN or inf" in named[0], output[-3000:]
    assert "learning rate" not in output
    with np.load(poisoned) as npz:
        assert np.isfinite(npz["latents"]).all()


# --------------------------------------------------------------------------------------------------
# D11: skipped files, big upscales and long captions are mentioned at start-up
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def untidy_dreambooth(shapes_data: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """``root/3_shape`` with the six shapes, two GIFs and a TIFF, one 12x12 image and one very long caption."""
    folder = tmp_path / "root" / "3_shape"
    shutil.copytree(shapes_data / "images", folder)
    Image.new("P", (64, 64)).save(folder / "anim.gif")
    Image.new("P", (64, 64)).save(folder / "anim2.gif")
    Image.new("RGB", (64, 64)).save(folder / "scan.tiff")
    tiny = folder / "tiny.png"
    Image.new("RGB", (12, 12), (200, 10, 10)).save(tiny)
    (folder / "tiny.caption").write_text("a tiny red square", encoding="utf-8")
    long_caption = ", ".join(f"tag{i} word{i}" for i in range(60))
    (folder / "shape_000.caption").write_text(long_caption, encoding="utf-8")
    return tmp_path / "root", folder, tiny


def expect_notices(text: str, folder: Path, tiny: Path) -> None:
    lines = [line for line in text.splitlines() if line.startswith("warning:")]
    skipped = [line for line in lines if "not used" in line]
    assert len(skipped) == 1 and "3 file(s)" in skipped[0], lines
    for name in ("anim.gif", "anim2.gif", "scan.tiff"):
        assert str(folder / name) in skipped[0]
    upscaled = [line for line in lines if "upscaled more than 4x" in line]
    assert len(upscaled) == 1 and str(tiny) in upscaled[0] and "1 image(s)" in upscaled[0], lines
    long = [line for line in lines if "longer than 75 tokens" in line]
    assert len(long) == 1 and "1 caption(s)" in long[0] and "shape_000.png" in long[0], lines


def test_check_dataset_mentions_skipped_files_upscales_and_long_captions(run_script, untidy_dreambooth):
    root, folder, tiny = untidy_dreambooth
    result = run_script("tools/check_dataset.py", ["--train_data_dir", root, "--resolution", "64",
                                                   "--enable_bucket", "--min_bucket_reso", "64",
                                                   "--max_bucket_reso", "128"])
    expect_notices(result.stdout, folder, tiny)
    assert "no problems found" in result.stdout


def test_training_summary_mentions_skipped_files_upscales_and_long_captions(run_script, tiny_model_dirs,
                                                                              untidy_dreambooth, tmp_path):
    root, folder, tiny = untidy_dreambooth
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], tmp_path / "out", 1,
                                                      "--train_data_dir", root))
    expect_notices(result.stdout, folder, tiny)
    assert (tmp_path / "out" / "lora.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# D12: data errors are one line
# --------------------------------------------------------------------------------------------------


def test_different_batch_sizes_are_one_error_line(run_script, tiny_model_dirs, shapes_data, tmp_path):
    config = tmp_path / "data.toml"
    images = (shapes_data / "images").as_posix()
    config.write_text(f'[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
                      f'[[datasets]]\nbatch_size = 2\nresolution = 128\n[[datasets.subsets]]\nimage_dir = "{images}"\n')
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], tmp_path / "out", 1,
                                                      "--dataset_config", config), expect_rc=1)
    assert_one_error_line(result, "batch_size")


def test_unwritable_latent_cache_is_one_error_naming_the_file(tmp_path):
    from library.cache.latent_files import CacheFileError, _write_npz_atomic
    from library.cli.setup_from_args import user_errors

    blocker = tmp_path / "images"
    blocker.write_text("a file where the image folder should be")
    with pytest.raises(CacheFileError, match=str(blocker / "x_sd.npz")):
        _write_npz_atomic(blocker / "x_sd.npz", {"latents": np.zeros(1)})
    assert issubclass(CacheFileError, user_errors())


def test_damaged_cached_latent_while_training_is_one_error_naming_it(tmp_path):
    from library.cache.latent_files import CacheFileError, load_cached_latents

    damaged = tmp_path / "x_0064x0064_sd.npz"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CacheFileError, match="x_0064x0064_sd.npz: cannot read the cached latents"):
        load_cached_latents(damaged)


def test_errors_re_raised_by_a_dataloader_worker_keep_their_one_line_message(shapes_data, tmp_path):
    """torch re-raises a worker's error with the worker's traceback as its message; the user sees one line."""
    import torch

    from library.data.datasets import collate_samples
    from library.data.images import ImageReadError

    data = copy_dataset(shapes_data, tmp_path / "data")
    dataset = DatasetConfig(kind="dreambooth", subsets=(SubsetConfig(image_dir=data / "images"),),
                            resolution=(64, 64))
    training = TrainingDataset(build_dataset_index([dataset], verified_cache_dir=None), seed=0)
    for record in training.records:
        noisy_png(record.image_path, record.image_size)
        break_png_data(record.image_path)
    loader = torch.utils.data.DataLoader(training, batch_size=1, num_workers=1, collate_fn=collate_samples)
    with pytest.raises(ImageReadError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(data / "images")), message
    assert ": cannot decode the image" in message
