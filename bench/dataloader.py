"""Images/s and memory of the training loader (1024-px JPEGs -> bucketed batches), against kohya's loader.

    python bench/dataloader.py [--count 64] [--workers 0 2] [--epochs 2] [--rounds 3] [--threads 1]
                               [--kohya_dir PATH/TO/sd-scripts] [--cases loader draft filter] [--json out.json]

``loader``: generates ``--count`` synthetic JPEGs (mixed aspect ratios around 1024², smooth content plus
noise, so decoding costs what a photo costs), and times the real loader path (``make_loader(TrainingDataset,
make_batch_sampler(...))``) at resolution 1024, buckets 256-2048 in steps of 64, flip + random crop, batch 4,
no caching. Each measurement runs in a fresh child process: one warm-up epoch, then ``--epochs`` timed epochs
with persistent workers; memory is the peak PSS of the child plus its DataLoader workers (sampled every batch).
With ``--kohya_dir`` (a checkout of kohya-ss/sd-scripts, its requirements importable) kohya's own
DreamBoothDataset + collator + DataLoader run on the same folder and settings, alternating with ours
(ours 0, kohya 0, ours 2, kohya 2, ... for ``--rounds`` rounds); captions are tokenised by a no-op strategy
(no tokenizer is downloaded; ours does not tokenise in the loader either). If torchvision cannot be imported,
bench/kohya_shim stands in for it (same tensor operations; the output says so).
``draft``: a 4032x3024 photo-like JPEG to its 1216x912 resize: full decode + PIL LANCZOS (the old path),
full decode + the new filter, draft decode + the new filter; times and pixel differences.
``filter``: the default filter against PIL LANCZOS on photo-like images: time, mean/max difference, and PSNR
against the scene rendered directly at the target size from a 3x master. Not run by CI.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = [(1024, 1024), (1024, 768), (768, 1024), (1024, 576), (576, 1024), (1024, 832), (832, 1024), (1024, 680)]
REPO = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "kohya_shim"
RESOLUTION, MIN_BUCKET, MAX_BUCKET, STEPS = 1024, 256, 2048, 64


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs (quality 90) with a caption file each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200.0
        pixels = np.clip(base + rng.normal(0.0, 20.0, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.jpg", quality=90)
        (folder / f"img{i:03d}.txt").write_text("a photo, of something, synthetic")


def photo_like(width: int, height: int, seed: int = 0) -> bytes:
    """JPEG (q90) bytes of a photo-like image: 1/f amplitude spectrum (natural-image statistics), hard-edged
    shapes, thin lines and sensor noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.sqrt(fx * fx + fy * fy)
    frequency[0, 0] = 1.0
    phase = rng.uniform(0, 2 * np.pi, frequency.shape)
    channels = []
    for _ in range(3):
        field = np.fft.irfft2(np.exp(1j * (phase + rng.normal(0, 0.6, phase.shape))) / frequency, s=(height, width))
        channels.append((field - field.mean()) / field.std())
    image = Image.fromarray(np.clip(np.stack(channels, -1) * 40 + 120, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        points = [(int(x0 + rng.normal(0, width / 8)), int(y0 + rng.normal(0, height / 8))) for _ in range(4)]
        draw.polygon(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(60):
        ends = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(ends, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, 3, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Memory: PSS of a process and its children (the DataLoader workers)
# --------------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return found


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def tree_pss_mb() -> float:
    """PSS of this process plus its children (shared pages counted once over all of them)."""
    pid = os.getpid()
    return _pss_mb(pid) + sum(_pss_mb(child) for child in _children(pid))


def time_epochs(batches_of_epoch, epochs: int) -> dict:
    """One untimed warm-up epoch, then ``epochs`` timed ones; images/s and peak PSS (MB)."""
    images, peak, start = 0, 0.0, 0.0
    for epoch in range(1, epochs + 2):
        if epoch == 2:
            start = time.perf_counter()
        for count in batches_of_epoch(epoch):
            if epoch >= 2:
                images += count
            peak = max(peak, tree_pss_mb())
    return {"images_per_s": images / (time.perf_counter() - start), "peak_pss_mb": peak, "images": images}


# --------------------------------------------------------------------------------------------------
# Children: ours and kohya's loader, each in a fresh process
# --------------------------------------------------------------------------------------------------


def run_ours(folder: Path, workers: int, epochs: int, batch_size: int) -> dict:
    from library.data.dataset_config import DatasetConfig, SubsetConfig
    from library.data.dataset_index import load_dataset_index
    from library.data.datasets import TrainingDataset, build_bucket_sampler_inputs, make_batch_sampler, make_loader

    subset = SubsetConfig(image_dir=folder, caption_extension=".txt", flip_aug=True, random_crop=True)
    config = DatasetConfig(kind="dreambooth", subsets=(subset,), batch_size=batch_size,
                           resolution=(RESOLUTION, RESOLUTION), enable_bucket=True, min_bucket_reso=MIN_BUCKET,
                           max_bucket_reso=MAX_BUCKET, bucket_reso_steps=STEPS)
    index = load_dataset_index([config], min_step=32, verify_images=False)
    sampler = make_batch_sampler(build_bucket_sampler_inputs(index), seed=0)
    loader = make_loader(TrainingDataset(index, seed=0), sampler, num_workers=workers, persistent_workers=True)

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        for batch in loader:
            yield len(batch)

    return time_epochs(batches, epochs)


def run_kohya(folder: Path, workers: int, epochs: int, batch_size: int) -> dict:
    """kohya's DreamBoothDataset, collator and DataLoader as its train_network.py builds them."""
    import multiprocessing

    import torch

    shim = os.environ.get("BENCH_TORCHVISION_SHIM")
    if shim:  # transformers and diffusers must first decide that torchvision is absent (they cache it)
        from diffusers.utils import import_utils as diffusers_imports
        from transformers.utils import import_utils as transformers_imports

        transformers_imports.is_torchvision_available()
        getattr(diffusers_imports, "is_torchvision_available", lambda: False)()
        sys.path.insert(0, shim)
    import types

    # kohya's sampling pipelines import names newer transformers dropped; the loader never uses them
    for name, attribute in (("library.lpw_stable_diffusion", "StableDiffusionLongPromptWeightingPipeline"),
                            ("library.sdxl_lpw_stable_diffusion", "SdxlStableDiffusionLongPromptWeightingPipeline")):
        sys.modules[name] = types.ModuleType(name)
        setattr(sys.modules[name], attribute, None)
    from library import train_util  # kohya's package: its checkout is first on PYTHONPATH in this child
    from library.strategy_base import TokenizeStrategy

    class NoTokens(TokenizeStrategy):  # captions are processed; tokenising is left out (no tokenizer download)
        def tokenize(self, text):
            return [torch.zeros(1, 77, dtype=torch.long)]

    TokenizeStrategy.set_strategy(NoTokens())
    subset = train_util.DreamBoothSubset(
        image_dir=str(folder), is_reg=False, class_tokens=None, caption_extension=".txt", cache_info=False,
        alpha_mask=False, num_repeats=1, shuffle_caption=False, caption_separator=",", keep_tokens=0,
        keep_tokens_separator=None, secondary_separator=None, enable_wildcard=False, color_aug=False, flip_aug=True,
        face_crop_aug_range=None, random_crop=True, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0, caption_prefix=None, caption_suffix=None, token_warmup_min=1,
        token_warmup_step=0)
    dataset = train_util.DreamBoothDataset(
        subsets=[subset], is_training_dataset=True, batch_size=batch_size, resolution=(RESOLUTION, RESOLUTION),
        network_multiplier=1.0, enable_bucket=True, min_bucket_reso=MIN_BUCKET, max_bucket_reso=MAX_BUCKET,
        bucket_reso_steps=STEPS, bucket_no_upscale=False, prior_loss_weight=1.0, debug_dataset=False,
        validation_split=0.0, validation_seed=None, resize_interpolation=None)
    dataset.make_buckets()
    dataset.set_seed(0)
    group = train_util.DatasetGroup([dataset])
    group.set_current_strategies()  # as kohya's train_network.py does before building the DataLoader
    current_epoch, current_step = multiprocessing.Value("i", 0), multiprocessing.Value("i", 0)
    collator = train_util.collator_class(current_epoch, current_step, group)
    loader = torch.utils.data.DataLoader(group, batch_size=1, shuffle=True, collate_fn=collator,
                                         num_workers=workers, persistent_workers=workers > 0)

    def batches(epoch: int):
        current_epoch.value = epoch
        group.set_current_epoch(epoch)
        for batch in loader:
            yield len(batch["images"])

    return time_epochs(batches, epochs)


def child_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    run = run_kohya if args.child == "kohya" else run_ours  # "base": our loader from --baseline_dir
    result = run(Path(args.folder), args.workers[0], args.epochs, args.batch_size)
    if args.child == "kohya":
        import torchvision

        result["torchvision"] = "stand-in" if getattr(torchvision, "BENCH_SHIM", False) else torchvision.__version__
    print("RESULT " + json.dumps(result), flush=True)


def measure(which: str, folder: Path, workers: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if which == "kohya":
        paths = [str(Path(args.kohya_dir).resolve())]
        probe = subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True)
        if probe.returncode != 0:
            env["BENCH_TORCHVISION_SHIM"] = str(SHIM)
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    else:
        root = str(Path(args.baseline_dir).resolve()) if which == "base" else str(REPO)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    command = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--folder", str(folder),
               "--workers", str(workers), "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
               "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          cwd=args.kohya_dir if which == "kohya" else env["PYTHONPATH"].split(os.pathsep)[0])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{which} child failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def loader_case(args: argparse.Namespace) -> dict:
    implementations = ["ours"] + (["kohya"] if args.kohya_dir else []) + (["base"] if args.baseline_dir else [])
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_jpegs(folder, args.count)
        for round_number in range(1, args.rounds + 1):
            for workers in args.workers:
                for which in implementations:
                    result = measure(which, folder, workers, args)
                    rows.setdefault(f"{which} workers={workers}", []).append(result)
                    print(f"round {round_number} {which:5s} num_workers={workers}: "
                          f"{result['images_per_s']:6.1f} images/s, peak PSS {result['peak_pss_mb']:6.0f} MB"
                          + (" (torchvision stand-in)" if result.get("torchvision") == "stand-in" else ""), flush=True)
    summary = {}
    for key, results in rows.items():
        rates = sorted(r["images_per_s"] for r in results)
        summary[key] = {"median_images_per_s": rates[len(rates) // 2], "all_images_per_s": rates,
                        "max_peak_pss_mb": max(r["peak_pss_mb"] for r in results)}
    for workers in args.workers:
        ours = summary[f"ours workers={workers}"]
        for other in ("kohya", "base"):
            theirs = summary.get(f"{other} workers={workers}")
            if theirs:
                print(f"num_workers={workers}: ours {ours['median_images_per_s']:.1f} vs {other} "
                      f"{theirs['median_images_per_s']:.1f} images/s (median of {args.rounds}): "
                      f"{ours['median_images_per_s'] / theirs['median_images_per_s']:.2f}x; peak PSS "
                      f"{ours['max_peak_pss_mb']:.0f} vs {theirs['max_peak_pss_mb']:.0f} MB")
    return summary


# --------------------------------------------------------------------------------------------------
# Draft decoding and the filter, in this process
# --------------------------------------------------------------------------------------------------


def _best_ms(function, repeats: int = 5):
    result, best = function(), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best * 1000.0


def _difference(a: np.ndarray, b: np.ndarray) -> dict:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"mean": round(float(diff.mean()), 3), "max": int(diff.max()), "p99": float(np.percentile(diff, 99))}


def draft_case(args: argparse.Namespace) -> dict:
    from PIL import Image

    from library.data.images import crop_plan_array, load_image, plan_crop

    data, bucket = photo_like(4032, 3024, seed=1), (1216, 896)  # covers 1216x896 at 1216x912

    def old_path():  # what main did before: full decode, PIL LANCZOS, crop
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
        plan = plan_crop(image.size, bucket, random_crop=False, flip_aug=False, rng=random.Random(0))
        left, top = plan.crop_left_top
        resized = image.resize(plan.resized_size, Image.Resampling.LANCZOS)
        return np.asarray(resized.crop((left, top, left + bucket[0], top + bucket[1])))

    def new_path(cover):
        loaded = load_image(io.BytesIO(data), cover_bucket=cover)
        plan = plan_crop(loaded.original_size, bucket, random_crop=False, flip_aug=False, rng=random.Random(0))
        return np.ascontiguousarray(crop_plan_array(loaded.rgb, plan)), loaded.rgb.size, plan.resized_size

    old, old_ms = _best_ms(old_path)
    (full, _, resized), full_ms = _best_ms(lambda: new_path(None))
    (draft, decoded, _), draft_ms = _best_ms(lambda: new_path(bucket))
    result = {"image": "4032x3024", "resized": list(resized), "draft_decoded": list(decoded),
              "old_full_lanczos_ms": round(old_ms, 1), "full_new_filter_ms": round(full_ms, 1),
              "draft_new_filter_ms": round(draft_ms, 1), "draft_vs_full_new": _difference(draft, full),
              "draft_vs_old": _difference(draft, old), "full_new_vs_old": _difference(full, old)}
    print(f"draft: 4032x3024 -> {resized[0]}x{resized[1]} (decoded at {decoded[0]}x{decoded[1]}): old full decode + "
          f"LANCZOS {old_ms:.0f} ms, full decode + new filter {full_ms:.0f} ms, draft + new filter {draft_ms:.0f} ms; "
          f"draft vs full decode (same filter) {result['draft_vs_full_new']}, draft vs old {result['draft_vs_old']}")
    return result


def filter_case(args: argparse.Namespace) -> list[dict]:
    from PIL import Image

    from library.data.pixels import resize_uint8

    rows = []
    for source, target in [((1024, 768), (1088, 816)), ((1024, 1024), (896, 896)), ((1024, 680), (960, 637)),
                           ((2048, 1536), (1216, 912)), ((1024, 1024), (512, 512))]:
        master = Image.open(io.BytesIO(photo_like(source[0] * 3, source[1] * 3, seed=7))).convert("RGB")
        truth = np.asarray(master.resize(target, Image.Resampling.LANCZOS)).astype(np.float64)
        buffer = io.BytesIO()
        master.resize(source, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=90)
        image = Image.open(buffer).convert("RGB")
        array = np.array(image)
        lanczos, lanczos_ms = _best_ms(lambda: np.asarray(image.resize(target, Image.Resampling.LANCZOS)))
        ours, ours_ms = _best_ms(lambda: resize_uint8(array, target))

        def psnr(x):
            return round(float(10 * np.log10(255.0 ** 2 / np.mean((x.astype(np.float64) - truth) ** 2))), 2)

        row = {"from": list(source), "to": list(target), "lanczos_ms": round(lanczos_ms, 1),
               "new_ms": round(ours_ms, 1), "difference": _difference(ours, lanczos),
               "psnr_lanczos_db": psnr(lanczos), "psnr_new_db": psnr(ours)}
        rows.append(row)
        print(f"filter {source} -> {target}: LANCZOS {lanczos_ms:.1f} ms {row['psnr_lanczos_db']} dB, new "
              f"{ours_ms:.1f} ms {row['psnr_new_db']} dB; difference {row['difference']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) per process")
    parser.add_argument("--kohya_dir", help="a kohya-ss/sd-scripts checkout to compare against")
    parser.add_argument("--cases", nargs="+", default=["loader", "draft", "filter"],
                        choices=["loader", "draft", "filter"])
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--baseline_dir", help="another checkout of this repository (e.g. the previous commit) "
                        "whose loader runs as 'base' in the same alternation")
    parser.add_argument("--child", choices=["ours", "kohya", "base"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for case in args.cases:
        results[case] = {"loader": loader_case, "draft": draft_case, "filter": filter_case}[case](args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
