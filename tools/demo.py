"""End-to-end demo: train a LoRA on the embedded tiny SDXL model, on a generated dataset, on a CPU.

    python tools/demo.py [--output_dir demo_output] [--steps 40]

1. builds the tiny SDXL model and writes it as an A1111/ComfyUI-style single-file checkpoint;
2. generates a captioned dataset of shapes at several aspect ratios, with a kohya metadata JSON
   (captions and tags);
3. runs train_network.py on it (buckets, long prompts, sample images, TensorBoard logs);
4. loads the trained LoRA with diffusers' own `load_lora_weights` to show the file is standard.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import train_network
from library.models.loading import load_model, save_single_file
from library.models.families import SDXL
from library.models.tiny_models import build_tiny_model
from tools.make_sample_dataset import make_sample_dataset

SAMPLE_PROMPTS = """\
# one prompt per line, with kohya's inline options
a red circle on a white background --w 64 --h 64 --s 8 --d 1
a blue square on a black background --n blurry --w 96 --h 64 --s 8 --d 2
a yellow triangle on a grey background, a simple flat illustration of a single shape centred in the frame, \
clean edges, plain colours, no texture, no shadow, no gradient, high contrast between the shape and the \
background, in the style of a children's picture book, drawn with a thick marker --w 64 --h 96 --s 8 --d 3
"""


def fresh_dir(base: Path) -> Path:
    """Never write into a folder that already has files: use base, base-2, base-3, ..."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    out = fresh_dir(Path(args.output_dir))
    t0 = time.perf_counter()

    checkpoint = out / "tiny_sdxl.safetensors"
    save_single_file(build_tiny_model(SDXL, seed=0), checkpoint)
    print(f"[1/4] tiny SDXL checkpoint (single file, original layout): {checkpoint}")

    meta = make_sample_dataset(out / "data", count=12, size=96, seed=0)
    prompts = out / "prompts.txt"
    prompts.write_text(SAMPLE_PROMPTS)
    print(f"[2/4] dataset: 12 captioned images at 5 aspect ratios, metadata {meta}")

    print("[3/4] training the LoRA ...")
    code = train_network.main([
        "--pretrained_model_name_or_path", str(checkpoint), "--in_json", str(meta),
        "--train_data_dir", str(out / "data" / "images"), "--resolution", "96", "--enable_bucket",
        "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
        "--caption_tag_mode", "random", "--max_token_length", "150",
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
        "--learning_rate", "1e-3", "--max_train_steps", str(args.steps), "--seed", "0",
        "--output_dir", str(out / "lora"), "--output_name", "shapes_lora", "--save_every_n_steps", str(args.steps // 2),
        "--sample_prompts", str(prompts), "--sample_every_n_steps", str(args.steps // 2), "--sample_sampler", "euler_a",
        "--logging_dir", str(out / "logs"), "--max_data_loader_n_workers", "0",
    ])
    if code != 0:
        return code
    lora = out / "lora" / "shapes_lora.safetensors"

    pipe = load_model(checkpoint).to_pipeline()
    pipe.load_lora_weights(str(lora))
    image = pipe("a red circle on a white background", height=64, width=64, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out / "diffusers_with_lora.png")
    print(f"[4/4] diffusers' load_lora_weights read the file and sampled {out / 'diffusers_with_lora.png'}")
    samples = sorted((out / "lora" / "sample").glob("*.png"))
    print(f"\nLoRA: {lora}\nsample images: {len(samples)} in {out / 'lora' / 'sample'}\n"
          f"TensorBoard: tensorboard --logdir {out / 'logs'}\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
