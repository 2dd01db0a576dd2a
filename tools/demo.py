"""End-to-end demo: a LoRA teaches the embedded tiny SDXL model a shape it has never seen, on a CPU.

    python tools/demo.py [--output_dir demo_output] [--steps 120]

1. writes the pretrained tiny SDXL model (it draws coloured circles, squares, triangles ... on plain
   backgrounds, but has never seen purple or a star) as an A1111/ComfyUI-style single-file checkpoint; when
   library/models/tiny_pretrained holds no weights (tools/pretrain_tiny.py writes them), the randomly
   initialised tiny SDXL instead, which draws noise;
2. generates the new concept: purple five-pointed stars captioned "a sks star", with a kohya metadata JSON;
3. samples "a sks star" before training, runs train_network.py (LoRA) on the stars, and samples the same
   prompts and seeds again through diffusers' own `load_lora_weights` (which also shows the file is standard);
4. writes demo_output/before_after.png, loss.png (the loss curve) and report.json with the concept scores
   (library.training.concept_score: purple pixels, five star points, white background; 1.0 is a clean star).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import train_network
from library.models.families import SDXL
from library.models.loading import load_model, save_single_file
from library.models.tiny_models import build_pretrained_tiny_model, build_tiny_model, has_pretrained_tiny_model
from library.training.concept_score import NAMED_COLOURS, Concept
from library.training.loop import Callback
from tools.make_sample_dataset import make_sample_dataset
from tools.shape_samples import contact_sheet, sample, score_images

CONCEPT_PROMPT = "a sks star"
CONCEPT = Concept(NAMED_COLOURS["purple"], "star", NAMED_COLOURS["white"])
BASE_PROMPT = "a red circle on a white background"
SAMPLE_PROMPTS = f"""\
# one prompt per line, with kohya's inline options
{CONCEPT_PROMPT} --w 64 --h 64 --s 16 --d 1 --l 4
{BASE_PROMPT} --w 64 --h 64 --s 16 --d 2 --l 4
"""


def fresh_dir(base: Path) -> Path:
    """Never write into a folder that already has files: use base, base-2, base-3, ..."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


class LossLog(Callback):
    """Keeps every step's loss for the loss curve."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_end(self, run, state, logs) -> None:
        self.losses.append(float(logs["loss/current"]))


def draw_loss_curve(losses: list[float], path: Path, size: tuple[int, int] = (480, 240)) -> None:
    """The step losses (grey) and their running mean over 10 steps (blue), drawn with PIL (no matplotlib)."""
    width, height = size
    margin = 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
    top, bottom = max(losses), min(losses)
    span = (top - bottom) or 1.0

    def point(i: int, value: float) -> tuple[float, float]:
        x = margin + (width - 2 * margin) * i / max(1, len(losses) - 1)
        return x, margin + (height - 2 * margin) * (top - value) / span

    draw.rectangle((margin, margin, width - margin, height - margin), outline="black")
    if len(losses) > 1:
        draw.line([point(i, v) for i, v in enumerate(losses)], fill=(180, 180, 180), width=1)
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(40, 80, 220), width=2)
    draw.text((margin, 8), f"loss per step (mean of 10 in blue), {len(losses)} steps", fill="black")
    draw.text((4, margin), f"{top:.3f}", fill="black")
    draw.text((4, height - margin - 10), f"{bottom:.3f}", fill="black")
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--learning_rate", default="3e-3", help="the LoRA's learning rate")
    parser.add_argument("--seeds", type=int, default=16, help="images per prompt for the before/after scores")
    parser.add_argument("--sample_steps", type=int, default=16, help="sampling steps of every image")
    args = parser.parse_args(argv)
    out = fresh_dir(Path(args.output_dir))
    t0 = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    checkpoint = out / "tiny_sdxl.safetensors"
    if has_pretrained_tiny_model(SDXL):
        save_single_file(build_pretrained_tiny_model(SDXL), checkpoint)
        print(f"[1/4] pretrained tiny SDXL checkpoint (single file, original layout): {checkpoint}")
    else:  # the weights tools/pretrain_tiny.py writes are not in this checkout: nothing to see, but every step runs
        save_single_file(build_tiny_model(SDXL, seed=0), checkpoint)
        print(f"[1/4] tiny SDXL checkpoint (single file, original layout): {checkpoint}\n      RANDOM weights: no "
              "pretrained tiny model in library/models/tiny_pretrained (python tools/pretrain_tiny.py writes it), "
              "so the images are noise before and after")

    meta = make_sample_dataset(out / "data", count=16, size=64, seed=0, variety="concept", concept_caption=CONCEPT_PROMPT)
    prompts = out / "prompts.txt"
    prompts.write_text(SAMPLE_PROMPTS.replace("--s 16", f"--s {args.sample_steps}"))
    print(f"[2/4] new concept: 16 purple five-pointed stars captioned {CONCEPT_PROMPT!r}, metadata {meta}")

    seeds = list(range(args.seeds))
    pipe = load_model(checkpoint).to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = {prompt: sample(pipe, prompt, seeds, steps=args.sample_steps) for prompt in (CONCEPT_PROMPT, BASE_PROMPT)}
    score_before = score_images(before[CONCEPT_PROMPT], CONCEPT)

    print(f"[3/4] training the LoRA ({args.steps} steps) ...")
    losses = LossLog()
    code = train_network.main([
        "--pretrained_model_name_or_path", str(checkpoint), "--in_json", str(meta),
        "--train_data_dir", str(out / "data" / "images"), "--resolution", "64", "--train_batch_size", "4",
        "--max_token_length", "150",
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "16",
        "--network_args", "conv_dim=16", "conv_alpha=16",  # LoCon: attention alone does not change the shape drawn
        "--learning_rate", args.learning_rate, "--max_train_steps", str(args.steps), "--seed", "0",
        "--output_dir", str(out / "lora"), "--output_name", "star_lora", "--save_every_n_steps", str(max(1, args.steps // 2)),
        "--sample_prompts", str(prompts), "--sample_every_n_steps", str(args.steps), "--sample_sampler", "euler",
        "--logging_dir", str(out / "logs"), "--max_data_loader_n_workers", "0",
    ], callbacks=[losses])
    if code != 0:
        return code
    lora = out / "lora" / "star_lora.safetensors"
    draw_loss_curve(losses.losses, out / "loss.png")

    pipe.load_lora_weights(str(lora))  # diffusers' own loader reads our kohya-format file
    after = {prompt: sample(pipe, prompt, seeds, steps=args.sample_steps) for prompt in (CONCEPT_PROMPT, BASE_PROMPT)}
    score_after = score_images(after[CONCEPT_PROMPT], CONCEPT)
    shown = seeds[:8]
    labels = [f"{CONCEPT_PROMPT!r}\nbefore", "after", f"{BASE_PROMPT.split(' on ')[0]!r}\nbefore", "after"]
    contact_sheet([before[CONCEPT_PROMPT][:len(shown)], after[CONCEPT_PROMPT][:len(shown)],
                   before[BASE_PROMPT][:len(shown)], after[BASE_PROMPT][:len(shown)]], labels,
                  label_width=100).save(out / "before_after.png")
    report = {
        "concept_prompt": CONCEPT_PROMPT, "seeds": seeds, "steps": args.steps,
        "concept_score_before": round(score_before, 4), "concept_score_after": round(score_after, 4),
        "base_prompt": BASE_PROMPT, "base_prompt_score_before": round(score_images(before[BASE_PROMPT], BASE_PROMPT), 4),
        "base_prompt_score_after": round(score_images(after[BASE_PROMPT], BASE_PROMPT), 4),
        "loss_first_10": round(sum(losses.losses[:10]) / max(1, len(losses.losses[:10])), 4),
        "loss_last_10": round(sum(losses.losses[-10:]) / max(1, len(losses.losses[-10:])), 4),
        "lora": str(lora), "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[4/4] diffusers' load_lora_weights read the file; same prompts and seeds before and after: "
          f"{out / 'before_after.png'} (rows: {CONCEPT_PROMPT!r} before, after; {BASE_PROMPT!r} before, after)")
    print(f"\nconcept score of {CONCEPT_PROMPT!r} over {len(seeds)} seeds: before {score_before:.3f}, after {score_after:.3f}"
          f"\nLoRA: {lora}\nloss curve: {out / 'loss.png'}\nreport: {out / 'report.json'}\n"
          f"sample images: {len(sorted((out / 'lora' / 'sample').glob('*.png')))} in {out / 'lora' / 'sample'}\n"
          f"TensorBoard: tensorboard --logdir {out / 'logs'}\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
