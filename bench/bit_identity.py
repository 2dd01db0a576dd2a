"""Train a LoRA, a full SDXL fine-tune and a ControlNet with fixed seeds and flags, and print a fingerprint of
every tensor and sample image they write; two checkouts that print the same fingerprints train bit-identically.

    python bench/bit_identity.py --repo . --work /tmp/bits --json after.json [--compare before.json]

The tiny models and datasets are made once under --work (by whichever checkout runs first) and reused, so a
change in how the inputs are built cannot hide or fake a change in training. Safetensors metadata and
TensorBoard events hold times and are left out; tensors and pixels are what must match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file


def _run(repo: Path, script: str, *args: object) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, str(repo / script), *map(str, args)], cwd=repo, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {script} failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _inputs(repo: Path, work: Path) -> dict[str, Path]:
    paths = {"sd15": work / "models" / "sd15", "sdxl": work / "models" / "sdxl", "data": work / "data" / "shapes" / "images",
             "canny": work / "data" / "canny"}
    for family in ("sd15", "sdxl"):
        if not paths[family].exists():
            _run(repo, "tools/make_tiny_model.py", "--family", family, "--output", paths[family], "--seed", "0")
    if not paths["data"].exists():
        _run(repo, "tools/make_sample_dataset.py", "--output", paths["data"].parent, "--count", "6", "--size", "96")
    if not paths["canny"].exists():
        _run(repo, "tools/make_controlnet_dataset.py", paths["data"], paths["canny"])
    prompts = work / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 3 --d 7\n")
    paths["prompts"] = prompts
    return paths


def _runs(p: dict[str, Path]) -> dict[str, tuple[str, list[object]]]:
    data = ["--in_json", p["data"].parent / "meta.json", "--train_data_dir", p["data"], "--resolution", "64",
            "--max_data_loader_n_workers", "0", "--learning_rate", "1e-3", "--max_train_steps", "4"]
    sample = ["--sample_prompts", p["prompts"], "--sample_every_n_steps", "4"]
    return {
        "lora_sdxl": ("train_network.py", [
            "--pretrained_model_name_or_path", p["sdxl"], *data, *sample, "--seed", "3", "--network_dim", "4",
            "--network_alpha", "2", "--network_args", "conv_dim=2", "conv_alpha=1", "--enable_bucket",
            "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--cache_latents", "--noise_offset", "0.05",
            "--min_snr_gamma", "5", "--save_every_n_steps", "2", "--save_state", "--validation_split", "0.34"]),
        "lora_sd15_te": ("train_network.py", [
            "--pretrained_model_name_or_path", p["sd15"], *data, "--seed", "4", "--network_dim", "4",
            "--text_encoder_lr", "5e-4", "--caption_dropout_rate", "0.2", "--shuffle_caption", "--flip_aug",
            "--v_parameterization", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine"]),
        "full_sdxl": ("train_sdxl.py", [
            "--pretrained_model_name_or_path", p["sdxl"], *data, *sample, "--seed", "5", "--train_text_encoder",
            "--use_ema", "--ema_decay", "0.9", "--save_model_as", "safetensors", "--save_every_n_steps", "2",
            "--save_state", "--optimizer_type", "Adafactor", "--fused_backward_pass", "--max_grad_norm", "0"]),
        "controlnet_sd15": ("train_controlnet.py", [
            "--pretrained_model_name_or_path", p["sd15"], "--in_json", p["canny"] / "prompt.json", *data[4:],
            *sample, "--seed", "2", "--save_model_as", "safetensors"]),
    }


def _fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every tensor and sample image's pixels. Left out: the process-wide Python and NumPy RNG states
    in a state's rng files (never seeded by a run, so they differ between two runs of the same checkout) and the
    time stamp in sample file names."""
    prints = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            for key, array in sorted(load_file(path).items()):
                if path.name.startswith("rng_") and key.split("/")[0] in ("numpy", "python"):
                    continue
                prints[f"{name}:{key}"] = hashlib.sha256(array.tobytes()).hexdigest()[:16]
        elif path.suffix == ".png":
            name = re.sub(r"_\d{14}_", "_", name)
            prints[name] = hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()[:16]
    return prints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="checkout whose scripts run")
    parser.add_argument("--work", type=Path, required=True, help="folder for the shared inputs and the outputs")
    parser.add_argument("--json", type=Path, required=True, help="where to write the fingerprints")
    parser.add_argument("--compare", type=Path, help="fingerprints of another checkout to compare against")
    parser.add_argument("--only", nargs="*", help="run names to run (default all)")
    args = parser.parse_args(argv)
    repo, work = args.repo.resolve(), args.work.resolve()
    inputs = _inputs(repo, work)
    label = hashlib.sha256(str(repo).encode()).hexdigest()[:8]
    results = {}
    for name, (script, run_args) in _runs(inputs).items():
        if args.only and name not in args.only:
            continue
        output = work / f"out-{label}" / name
        if output.exists():
            subprocess.run(["rm", "-rf", str(output)], check=True)
        _run(repo, script, *run_args, "--output_dir", output, "--output_name", name)
        results[name] = _fingerprint(output)
        print(f"{name}: {len(results[name])} tensors and images")
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = 0
        for name, prints in results.items():
            other = before.get(name, {})
            changed = sorted(k for k in prints.keys() | other.keys() if prints.get(k) != other.get(k))
            differ += bool(changed)
            print(f"{name}: {'bit-identical' if not changed else f'{len(changed)} differ, e.g. {changed[:3]}'}"
                  f" ({len(prints)} entries)")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
