"""Pretrain the tiny SDXL and SD1.5 architectures from scratch on procedural shapes, so that they can draw.

    python tools/pretrain_tiny.py --work_dir pretrain_work                   # SDXL: VAE, then UNet
    python tools/pretrain_tiny.py --work_dir pretrain_work --family sd15     # SD1.5: UNet on the same VAE

1. writes the shapes dataset at 64 px (tools/make_sample_dataset.py --variety full: 3000 images);
2. trains the VAE for reconstruction (L1 on batches of 32 random 32 px crops that hold part of a shape), then
   rescales its latent so that ``latent * scaling_factor`` has unit spread and makes the encoder deterministic,
   then trains the decoder alone (``--decoder_steps``, encoder frozen) on whole images, half shapes in uniformly
   random RGB colours (the data keeps purple back for the demo; the decoder must still be able to draw it);
   ``--stage decoder --vae_from VAE`` applies this step to a finished VAE and rewrites only the exported VAE.
   Both families share this VAE (same architecture; SD1.5 reads it with its own scaling factor 0.18215, so its
   latents have a spread of 1.4 instead of 1): the SD1.5 run takes the one the SDXL run left in --work_dir;
3. trains the UNet with the project's own full fine-tuning scripts, train_sdxl.py for SDXL and fine_tune.py for
   SD1.5 (``main(argv)``: cached latents and text-encoder outputs, min-SNR weighting, caption dropout for
   classifier-free guidance, constant learning rate after 50 warm-up steps, so the checkpoint at step N is what
   an N-step run gives); the text encoders stay at their seeded random initialisation (trained ones would add
   ~8 MB fp16, over the budget);
4. exports the UNet and VAE in fp16 (``--export_to``, by default ``library/models/tiny_pretrained/``, which
   `library.models.tiny_models.build_pretrained_tiny_model` loads); the text encoders are rebuilt from the
   seed there and checked against the hash written next to the weights; prints the concept scores
   (library.training.concept_score) of a few prompts and the score of each prompt's images against the OTHER
   prompts ("mismatched": what a model that ignores its prompt gets).

Everything is seeded and runs on one thread: the same command writes the same bytes (tests/test_concept_score.py
checks it at toy sizes). The committed weights are exactly what the two commands above write with their defaults,
run end to end from an empty --work_dir on 2 cores shared with other jobs:
- SDXL: about 1720 s CPU. VAE 1000 steps of batch 32 (~560 s CPU; L1 8.1/255, mean-colour error 4.7/255),
  decoder stage 400 steps of batch 16 (~370 s; purple (140, 50, 200) decodes as (164, 137, 190) instead of
  cyan, colour error 2.5/255), UNet stage 791 s CPU (826 s wall: 2000 steps of batch 32 at lr 1e-3, ~0.35 s
  CPU a step, with the caching and the evaluation). Mean concept score over EVAL_PROMPTS x 16 seeds (guidance
  4): 0.625, mismatched 0.115; "a red circle on a white background" 0.83, yellow triangle 0.77, green circle
  0.85; the weak prompts are a blue square (0.29) and a white diamond (0.38), which come out as round blobs.
  By UNet step (an earlier run of the same recipe): 500: 0.22, 1000: 0.38, 1500: 0.52, 2000: 0.63, 2500: 0.58,
  3000: 0.47, 3500: 0.57 (with the constant rate the score swings between checkpoints; 2000 was the best).
- SD1.5: 1016 s CPU, 1053 s wall: 3000 UNet steps of batch 32 at lr 1e-3 (~0.3 s CPU a step) on the SDXL run's
  VAE, all images in the 64x64 bucket (SD1.5 buckets step by 64 px). Its UNet is narrower
  (tiny_models.PRETRAINED_SD1_UNET_WIDTHS, 0.62 M parameters) to fit the budget; narrower ones never learned
  to follow the prompt. Mean concept score 0.44, mismatched 0.14; red circle 0.60, green circle 0.64, yellow
  triangle 0.40, white diamond 0.43, blue square 0.15. By UNet step (an earlier run, 8 seeds): 1000: 0.25
  (mismatched 0.18), 1500: 0.34 (0.16), 2000: 0.36 (0.16), 2500: 0.43 (0.12), 3000: 0.46 (0.14).

Why the recipe is what it is (measured): batches of 8 crops left the VAE's colours desaturated (error 17-24/255
after 800-1200 steps), batches of 32 fixed that. Without the decoder stage purple decoded as cyan and the demo's
LoRA drew cyan stars (score 0.03 -> 0.24; with it 0.13 -> 0.54 on an earlier base, 0.10 -> 0.53 on this one).
800 SDXL UNet steps were too few to follow the prompt (it starts near 1000). Short captions (``--captions
short``) were behind at 1000 and 1500 steps. Image latents are sampled with seeds from the file names, not the
paths, so the --work_dir does not change the result.

The models are built with ``pretrained_layout`` (library.models.tiny_models.PRETRAINED_NORM_GROUPS): at the
tiny widths, GroupNorm's 32 groups are one channel each, a per-channel instance norm that removes every
channel's mean over the image, so flat colours cannot pass the VAE and the UNet can hardly set its output's
mean (measured: mean colour error of the VAE after 400 steps 24/255 with 32 groups, 17/255 with 8). Flat
crops (no shape in them) have zero variance under those norms and made the VAE's loss jump; they are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from library.models.families import SD1, SDXL, resolve_family
from library.models.loading import load_model, save_single_file
from library.io import atomic_save_safetensors
from library.models.tiny_models import (
    PRETRAINED_DIR,
    SHARED_VAE_METADATA,
    build_pretrained_tiny_model,
    build_tiny_model,
    pretrained_file,
    text_encoder_hash,
    write_pretrained,
)
from tools.make_sample_dataset import FULL_SHAPES, POSITIONS, PURPLE, make_sample_dataset, paint, place
from tools.shape_samples import EVAL_PROMPTS, contact_sheet, sample, score_images

SEED = 0
UNET_STEPS = {SDXL.name: 2000, SD1.name: 3000}  # the committed weights' steps; SD1.5's narrower UNet follows prompts later
DECODER_STEPS = 400  # decoder-only steps of batch 16 on random colours


def load_pixels(images: Path) -> list[torch.Tensor]:
    """Every image as a (3, H, W) tensor in [-1, 1]."""
    out = []
    for path in sorted(images.glob("*.png")):
        with Image.open(path) as image:
            data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            out.append(data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1)
    return out


def crop_batch(pixels: list[torch.Tensor], batch: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops that each hold part of a shape (std over the crop above 0.05, up to 20 tries each): a flat
    crop has no spatial variance, so the VAE's GroupNorms divide by ~0 and blow its gradients up; whole images,
    what the VAE encodes later, always hold a shape."""
    crops = []
    while len(crops) < batch:
        for _ in range(20):
            crop_ = random_crops(pixels, 1, crop, gen)
            if float(crop_.std((2, 3)).max()) > 0.05:
                break
        crops.append(crop_)
    return torch.cat(crops)


def random_crops(pixels: list[torch.Tensor], batch: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    picks = torch.randint(len(pixels), (batch,), generator=gen).tolist()
    crops = []
    for index in picks:
        image = pixels[index]
        top = int(torch.randint(image.shape[1] - crop + 1, (1,), generator=gen))
        left = int(torch.randint(image.shape[2] - crop + 1, (1,), generator=gen))
        crops.append(image[:, top:top + crop, left:left + crop])
    return torch.stack(crops)


def optimizer_step(loss: torch.Tensor, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler, losses: list[float]) -> None:
    """Backward, clip to 1, step the optimizer and the schedule; the VAE and decoder stages share it."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())


def log_every_50(log: Path, stage: str, step: int, steps: int, losses: list[float], start: float) -> None:
    if step % 50 == 0 or step == steps - 1:
        with log.open("a") as f:
            f.write(f"{stage} step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                    f"t {time.perf_counter() - start:.0f}s\n")


def train_vae(vae: torch.nn.Module, pixels: list[torch.Tensor], *, steps: int, log: Path, batch: int = 32,
              device: str = "cpu", max_seconds: float | None = None, eval_every: int = 0) -> list[float]:
    """Reconstruction training of a plain autoencoder (the posterior mean; its variance is switched off after,
    in `normalise_latent`): L1 + 0.1 * MSE on batches of random 32 px crops, and a small pull of the latent towards zero.

    The crops are drawn on the CPU from a seeded generator whatever the device, so the data order never depends
    on it. ``max_seconds`` ends the loop early (a GPU sweep with a fixed budget); ``eval_every`` logs
    `vae_metrics` every that many steps, to see how many steps colour needs."""
    gen = torch.Generator().manual_seed(SEED)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            with log.open("a") as f:
                f.write(f"vae stopped at step {step} of {steps}: --vae_max_seconds {max_seconds:g} reached\n")
            break
        x = crop_batch(pixels, batch, 32, gen).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + 0.1 * (recon - x).pow(2).mean() + 1e-4 * z.pow(2).mean()
        optimizer_step(loss, list(vae.parameters()), optimizer, schedule, losses)
        log_every_50(log, "vae", step, steps, losses, start)
        if eval_every and (step + 1) % eval_every == 0:
            vae.eval()
            with log.open("a") as f:
                f.write(f"vae metrics step {step + 1} {json.dumps(vae_metrics(vae, pixels, device))}\n")
            vae.train()
    vae.eval()
    return losses


def random_colour_shapes(count: int, rng: random.Random, size: int = 64) -> torch.Tensor:
    """Shapes in uniformly random RGB colours on random (or white) backgrounds: the colours the pretraining data
    lacks (purple among them), so the decoder can draw any colour a LoRA asks of the UNet."""
    images = []
    for _ in range(count):
        background = tuple(rng.randint(0, 255) for _ in range(3)) if rng.random() < 0.5 else (245, 245, 245)
        image = Image.new("RGB", (size, size), background)
        box = place((size, size), rng.randint(size * 5 // 16, size * 27 // 32), rng.choice(POSITIONS), rng)
        paint(image, rng.choice(FULL_SHAPES), tuple(rng.randint(0, 255) for _ in range(3)), box)
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
        images.append(data.permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(images)


def train_decoder(vae: torch.nn.Module, pixels: list[torch.Tensor], *, steps: int, log: Path, batch: int = 16,
                  lr: float = 5e-4, device: str = "cpu") -> list[float]:
    """Fine-tune only the decoder (and post_quant_conv) on whole 64 px images, half shapes of random colours and
    half pretraining images (so known colours stay). The encoder is frozen, so the latents the UNet learnt are
    unchanged and this can run on a finished model. Same loss as `train_vae`, cosine decay from ``lr``."""
    rng, gen = random.Random(SEED), torch.Generator().manual_seed(SEED)
    square = [p for p in pixels if p.shape[1] == p.shape[2]]
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in vae.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    vae.eval()  # no dropout or batch statistics in this VAE; eval keeps the frozen encoder exactly as it was
    losses, start = [], time.perf_counter()
    for step in range(steps):
        known = torch.stack([square[i] for i in torch.randint(len(square), (batch - batch // 2,), generator=gen).tolist()])
        x = torch.cat([random_colour_shapes(batch // 2, rng), known]).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + 0.1 * (recon - x).pow(2).mean()
        optimizer_step(loss, params, optimizer, schedule, losses)
        log_every_50(log, "decoder", step, steps, losses, start)
    for param in vae.parameters():
        param.requires_grad_(True)
    return losses


@torch.no_grad()
def decoded_colour(vae: torch.nn.Module, colour: tuple[int, int, int] = PURPLE, device: str = "cpu") -> list[int]:
    """The mean decoded colour of a star painted in ``colour`` on white (the demo's concept): what the VAE can draw."""
    image = Image.new("RGB", (64, 64), (245, 245, 245))
    paint(image, "star", colour, (10, 10, 54, 54))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(64, 64, 3).permute(2, 0, 1).float() / 127.5 - 1
    recon = vae.decode(vae.encode(x[None].to(device)).latent_dist.mean).sample.float().cpu()[0].clamp(-1, 1)
    inside = (x - torch.tensor(colour).view(3, 1, 1) / 127.5 + 1).norm(dim=0) < 0.1
    return [round(float(v)) for v in (recon[:, inside].mean(1) + 1) * 127.5]


@torch.no_grad()
def vae_metrics(vae: torch.nn.Module, pixels: list[torch.Tensor], device: str = "cpu", count: int = 256) -> dict[str, float]:
    """Reconstruction of the first ``count`` square images at full size, in 0-255 units: ``l1`` per pixel,
    ``colour_error`` (how far each image's mean colour moves) and ``chroma_ratio`` (mean max-min channel spread
    of the reconstruction over the original's: below 1 is the desaturation seen on CPU)."""
    square = torch.stack([p for p in pixels if p.shape[1] == p.shape[2]][:count])
    recon = torch.cat([vae.decode(vae.encode(chunk.to(device)).latent_dist.mean).sample.float().cpu()
                       for chunk in square.split(64)]).clamp(-1, 1)
    to255 = 127.5

    def chroma(x: torch.Tensor) -> torch.Tensor:
        return (x.amax(1) - x.amin(1)).mean()

    return {"l1": round(float((recon - square).abs().mean()) * to255, 2),
            "colour_error": round(float((recon.mean((2, 3)) - square.mean((2, 3))).abs().mean()) * to255, 2),
            "chroma_ratio": round(float(chroma(recon) / chroma(square)), 3)}


@torch.no_grad()
def normalise_latent(vae: torch.nn.Module, pixels: list[torch.Tensor], device: str = "cpu") -> float:
    """Rescale the latent (an exact reparametrisation) so that latent * scaling_factor has unit spread, and make
    the encoder deterministic (log-variance -20: sampling the posterior gives its mean)."""
    square = torch.stack([p for p in pixels if p.shape[1] == p.shape[2]][:256]).to(device)
    mean = vae.encode(square).latent_dist.mean
    k = 1.0 / (float(mean.std()) * vae.config.scaling_factor)
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= k
    vae.quant_conv.bias[:channels] *= k
    vae.quant_conv.weight[channels:] = 0
    vae.quant_conv.bias[channels:] = -20.0
    vae.post_quant_conv.weight /= k
    return k


def vae_stage(family: str, work: Path, steps: int, log: Path, *, batch: int = 32, device: str = "cpu",
              max_seconds: float | None = None, eval_every: int = 0, vae_from: Path | None = None,
              decoder_steps: int = 0) -> Path:
    """Train the VAE, then its decoder alone on random colours (or take ``vae_from``, a VAE state dict this tool
    wrote); write a single-file base (seeded random UNet and text encoders, trained VAE)."""
    base = work / f"{family}_base.safetensors"
    if base.exists():
        return base
    torch.manual_seed(SEED)
    model = build_tiny_model(family, seed=SEED, pretrained_layout=True)
    shared = vae_from or work / "vae.safetensors"
    if shared.exists():  # both families use the same tiny VAE architecture: train it once
        from safetensors.torch import load_file
        model.vae.load_state_dict({k: v.to(torch.float32) for k, v in load_file(shared).items()})
    else:
        pixels = load_pixels(work / "data" / "images")
        model.vae.to(device)
        train_vae(model.vae, pixels, steps=steps, log=log, batch=batch, device=device, max_seconds=max_seconds,
                  eval_every=eval_every)
        k = normalise_latent(model.vae, pixels, device)
        if decoder_steps:
            train_decoder(model.vae, pixels, steps=decoder_steps, log=log, device=device)
        metrics = vae_metrics(model.vae, pixels, device) if eval_every else None
        model.vae.to("cpu")
        with log.open("a") as f:
            f.write(f"latent rescaled by {k:.3f}\n" + (f"vae metrics final {json.dumps(metrics)}\n" if metrics else ""))
        from safetensors.torch import save_file
        save_file({k_: v.contiguous() for k_, v in model.vae.state_dict().items()}, shared)
    save_single_file(model, base)
    return base


def decoder_stage(family: str, work: Path, vae_from: Path, steps: int, log: Path, export_to: Path, *,
                  device: str = "cpu") -> dict:
    """Apply the decoder-only stage to an existing VAE (``--stage decoder``): the UNet trained on its latents
    stays valid, so only the VAE file in ``export_to`` is rewritten (fp16)."""
    from safetensors.torch import load_file
    vae = build_tiny_model(family, seed=SEED, pretrained_layout=True).vae
    vae.load_state_dict({k: v.to(torch.float32) for k, v in load_file(vae_from).items()})
    vae.to(device).eval()
    pixels = load_pixels(work / "data" / "images")
    before = {"purple": decoded_colour(vae, device=device), **vae_metrics(vae, pixels, device)}
    train_decoder(vae, pixels, steps=steps, log=log, device=device)
    after = {"purple": decoded_colour(vae, device=device), **vae_metrics(vae, pixels, device)}
    path = pretrained_file(family, "vae", export_to)
    atomic_save_safetensors({k: v.detach().cpu().to(torch.float16).contiguous() for k, v in vae.state_dict().items()},
                            path, metadata=SHARED_VAE_METADATA)
    return {"vae": str(path), "before": before, "after": after}


def short_captions_meta(work: Path) -> Path:
    """A copy of the dataset's meta.json whose captions stop at the first comma ("a red circle on a white
    background", without ", large, top left"), written into the work dir so a shared dataset stays untouched."""
    meta = json.loads((work / "data" / "meta.json").read_text(encoding="utf-8"))
    short = {stem: {**item, "caption": item["caption"].split(",")[0]} for stem, item in meta.items()}
    path = work / "meta_short.json"
    path.write_text(json.dumps(short, indent=2) + "\n", encoding="utf-8")
    return path


def unet_argv(family: str, base: Path, work: Path, steps: int, batch: int, lr: float, *, in_json: Path | None = None,
              train_text_encoder: bool = False, te_lr: float | None = None, lr_scheduler: str = "constant_with_warmup",
              save_every: int | None = None) -> list[str]:
    """train_sdxl's (fine_tune's for SD1.5) command line. A trained text encoder changes its outputs every step, so they are cached only
    when the encoders stay frozen."""
    te_flags = ("--learning_rate_te1", "--learning_rate_te2") if family == SDXL.name else ("--learning_rate_te",)
    text = (["--train_text_encoder", *(arg for flag in te_flags for arg in (flag, str(te_lr or lr)))]
            if train_text_encoder else ["--cache_text_encoder_outputs"])
    # SD1.5's UNet halves the latent three times (SDXL's twice), so its buckets step by 64 px: at 64 px every
    # image goes to the 64x64 bucket
    step = 32 if family == SDXL.name else 64
    buckets = ["--min_bucket_reso", str(step), "--max_bucket_reso", "128", "--bucket_reso_steps", str(step)]
    return [
        "--pretrained_model_name_or_path", str(base), "--in_json", str(in_json or work / "data" / "meta.json"),
        "--train_data_dir", str(work / "data" / "images"), "--resolution", "64", "--enable_bucket",
        *buckets,
        "--cache_latents", *text, "--vae_batch_size", "32", "--train_batch_size", str(batch),
        "--learning_rate", str(lr), "--optimizer_type", "AdamW", "--lr_scheduler", lr_scheduler,
        "--lr_warmup_steps", str(min(50, steps // 10)), "--max_train_steps", str(steps), "--seed", str(SEED),
        "--max_data_loader_n_workers", "0", "--output_dir", str(work / "out"), "--output_name", f"{family}_trained",
        "--save_model_as", "safetensors", "--max_grad_norm", "1.0", "--caption_dropout_rate", "0.1",
        "--min_snr_gamma", "5", "--save_every_n_steps", str(save_every or max(1, steps // 4)),
    ]


def unet_stage(family: str, work: Path, base: Path, argv: list[str]) -> Path:
    """The project's own full fine-tuning script: train_sdxl.py for SDXL, fine_tune.py for SD1.5."""
    import fine_tune
    import train_sdxl

    out = work / "out" / f"{family}_trained.safetensors"
    if not out.exists():
        code = (train_sdxl if family == SDXL.name else fine_tune).main(argv)
        if code != 0:
            raise SystemExit(code)
    return out


def checkpoints(work: Path, family: str) -> list[tuple[int, Path]]:
    """(step, file) of every UNet checkpoint train_sdxl wrote in ``work/out``, the final one last (step -1 when
    its step is unknown)."""
    found = []
    for path in (work / "out").glob(f"{family}_trained*.safetensors"):
        match = re.fullmatch(re.escape(family) + r"_trained-step(\d{8})\.safetensors", path.name)
        if match:
            found.append((int(match.group(1)), path))
        elif path.name == f"{family}_trained.safetensors":
            found.append((10**9, path))
    return sorted(found)


def evaluate(model, prompts: tuple[str, ...] = EVAL_PROMPTS, seeds: int = 16, *, device: str = "cpu",
             guidance: float = 4.0, images: dict[str, list[Image.Image]] | None = None) -> dict[str, float]:
    """Mean concept score of each prompt over seeds 0..seeds-1 (library.training.concept_score); the sampled
    images go into ``images`` when it is given."""
    pipe = model.to_pipeline().to(device)
    pipe.set_progress_bar_config(disable=True)
    scores = {}
    for prompt in prompts:
        drawn = sample(pipe, prompt, range(seeds), guidance=guidance)
        scores[prompt] = round(score_images(drawn, prompt), 4)
        if images is not None:
            images[prompt] = drawn
    return scores


def mismatched_score(images: dict[str, list[Image.Image]]) -> float:
    """Mean concept score of each prompt's images against every OTHER prompt: a model that ignores its prompt
    scores as well here as on its own prompts; the gap between the two is how much it follows the prompt."""
    scores = [score_images(drawn, other) for prompt, drawn in images.items() for other in images if other != prompt]
    return round(sum(scores) / len(scores), 4)


def evaluate_checkpoints(work: Path, family: str, *, seeds: int, device: str, guidances: list[float],
                         only_steps: set[int] | None = None) -> Path:
    """Concept scores of the checkpoints in ``work/out`` (all, or those at ``only_steps`` and the last), one JSON
    line per checkpoint appended to ``work/eval.jsonl`` as soon as it is known (a killed run keeps what it got);
    the last checkpoint is also scored at the further ``guidances`` and drawn to ``work/samples.png``. The last
    checkpoint goes first, so a time limit cuts the intermediate ones, not the result."""
    found = checkpoints(work, family)
    if not found:
        raise FileNotFoundError(f"no {family}_trained*.safetensors in {work / 'out'}: run --stage unet first")
    picked = [found[-1]] + [item for item in found[:-1] if only_steps is None or item[0] in only_steps]
    results = work / "eval.jsonl"
    for index, (step, path) in enumerate(picked):
        last = index == 0
        for guidance in guidances if last else guidances[:1]:
            drawn: dict[str, list[Image.Image]] = {}
            start = time.perf_counter()
            scores = evaluate(load_model(path), seeds=seeds, device=device, guidance=guidance, images=drawn)
            line = {"checkpoint": path.name, "step": None if step == 10**9 else step, "guidance": guidance,
                    "mean": round(sum(scores.values()) / len(scores), 4), "mismatched": mismatched_score(drawn),
                    "scores": scores,
                    "eval_s": round(time.perf_counter() - start, 1)}
            with results.open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)
            if last and guidance == guidances[0]:
                labels = [f"{p.split(' on ')[0]}\n{scores[p]:.2f}" for p in drawn]
                contact_sheet([images[:8] for images in drawn.values()], labels, label_width=110).save(work / "samples.png")
    return results


def pick_device(name: str | None) -> str:
    """``--device``: cuda when one is there, else cpu. ``cpu`` on a GPU machine also hides the GPUs from
    train_sdxl (accelerate takes any GPU it sees)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: no CUDA GPU is visible; use --device cpu")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="folder for the dataset, caches and checkpoints")
    parser.add_argument("--family", choices=(SDXL.name, SD1.name, SD1.cli_name), default=SDXL.name,
                        help="sdxl: train_sdxl.py trains the UNet; sd1 (sd15): fine_tune.py trains its narrower UNet "
                             "on the latents of the VAE an sdxl run in the same --work_dir trained (or --vae_from)")
    parser.add_argument("--images", type=int, default=3000, help="images in the shapes dataset")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device of the VAE stage and of the evaluation (default: cuda when there is one); "
                             "train_sdxl takes the GPU by itself, and --device cpu hides it")
    parser.add_argument("--vae_steps", type=int, default=1000, help="VAE training steps")
    parser.add_argument("--vae_batch", type=int, default=32, help="32 px crops per VAE step (8 loses colour)")
    parser.add_argument("--vae_max_seconds", type=float, default=None,
                        help="end VAE training early after this many seconds (GPU sweeps with a fixed budget)")
    parser.add_argument("--vae_eval_every", type=int, default=0,
                        help="log the VAE's L1, mean-colour error and chroma ratio every N steps and at the end (0: never)")
    parser.add_argument("--vae_from", type=Path, default=None,
                        help="a vae.safetensors written by an earlier run (or an exported fp16 VAE): skip VAE training")
    parser.add_argument("--decoder_steps", type=int, default=DECODER_STEPS,
                        help="decoder-only steps after the VAE stage, on shapes of random colours (0: none)")
    parser.add_argument("--unet_steps", type=int, default=None,
                        help=f"UNet steps (--max_train_steps; default: {UNET_STEPS})")
    parser.add_argument("--batch", type=int, default=32, help="UNet batch size")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="UNet learning rate")
    parser.add_argument("--lr_scheduler", default="constant_with_warmup",
                        help="train_sdxl --lr_scheduler (constant_with_warmup makes intermediate checkpoints comparable)")
    parser.add_argument("--captions", choices=("full", "short"), default="full",
                        help="full: the dataset's captions; short: only 'a <colour> <shape> on a <bg> background'")
    parser.add_argument("--train_text_encoder", action="store_true",
                        help="train both text encoders too (their outputs are then not cached, and the result no "
                             "longer matches the seeded encoders the exported model rebuilds)")
    parser.add_argument("--te_learning_rate", type=float, default=None, help="text-encoder learning rate (default: --learning_rate)")
    parser.add_argument("--save_every", type=int, default=None, help="UNet checkpoint every N steps (default: a quarter of the steps)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one keeps runs bit-identical)")
    parser.add_argument("--stage", choices=("vae", "decoder", "unet", "eval", "all"), default="all",
                        help="eval: score the checkpoints in WORK_DIR/out (see --eval_steps) into WORK_DIR/eval.jsonl; "
                             "decoder: only the decoder stage, on --vae_from, rewriting the VAE in --export_to")
    parser.add_argument("--export_to", default=str(PRETRAINED_DIR), help="where the fp16 weights go")
    parser.add_argument("--eval_seeds", type=int, default=16, help="seeds per prompt for the concept scores")
    parser.add_argument("--eval_steps", default=None,
                        help="--stage eval: comma-separated steps whose checkpoints to score (the last is always scored)")
    parser.add_argument("--eval_guidance", default="4",
                        help="--stage eval: comma-separated guidance scales; the first for every checkpoint, the "
                             "others only for the last one")
    args = parser.parse_args(argv)
    if args.stage == "decoder" and args.vae_from is None:
        parser.error("--stage decoder needs --vae_from (e.g. library/models/tiny_pretrained/vae.safetensors)")
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "pretrain.log"
    start, cpu = time.perf_counter(), time.process_time()
    if not (work / "data" / "meta.json").exists():
        make_sample_dataset(work / "data", count=args.images, size=64, seed=SEED, variety="full")
    family = resolve_family(args.family).name
    if args.stage == "eval":
        guidances = [float(g) for g in args.eval_guidance.split(",")]
        steps = {int(s) for s in args.eval_steps.split(",")} if args.eval_steps else None
        evaluate_checkpoints(work, family, seeds=args.eval_seeds, device=device, guidances=guidances, only_steps=steps)
        return 0
    if args.vae_from is not None and not args.vae_from.is_file():
        parser.error(f"--vae_from {args.vae_from} is not a file: pass the vae.safetensors of an earlier run")
    if args.stage == "decoder":
        result = decoder_stage(family, work, args.vae_from, args.decoder_steps, log, Path(args.export_to), device=device)
        result.update(wall_s=round(time.perf_counter() - start), cpu_s=round(time.process_time() - cpu))
        print(json.dumps(result))
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        return 0
    base = vae_stage(family, work, args.vae_steps, log, batch=args.vae_batch, device=device,
                     max_seconds=args.vae_max_seconds, eval_every=args.vae_eval_every, vae_from=args.vae_from,
                     decoder_steps=args.decoder_steps)
    print(f"VAE ready: {base} ({time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU)")
    if args.stage == "vae":
        return 0
    in_json = short_captions_meta(work) if args.captions == "short" else None
    trained = unet_stage(family, work, base, unet_argv(
        family, base, work, args.unet_steps or UNET_STEPS[family], args.batch, args.learning_rate, in_json=in_json,
        train_text_encoder=args.train_text_encoder, te_lr=args.te_learning_rate, lr_scheduler=args.lr_scheduler,
        save_every=args.save_every))
    if args.stage == "unet":
        return 0
    model = load_model(trained)
    written = write_pretrained(model, Path(args.export_to))
    summary = {"family": family, "wall_s": round(time.perf_counter() - start), "cpu_s": round(time.process_time() - cpu),
               "files": [str(p) for p in written], "text_encoder_hash": text_encoder_hash(model)}
    drawn: dict[str, list[Image.Image]] = {}
    summary["concept_scores"] = evaluate(build_pretrained_tiny_model(family, Path(args.export_to)), seeds=args.eval_seeds,
                                         device=device, images=drawn)
    summary["mean"] = round(sum(summary["concept_scores"].values()) / len(drawn), 4)
    summary["mismatched"] = mismatched_score(drawn)
    print(json.dumps(summary, indent=2))
    with log.open("a") as f:
        f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
