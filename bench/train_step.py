"""Seconds per optimizer step and peak memory of LoRA (``train_network.py``), full fine-tune (``train_sdxl.py``)
and ControlNet (``train_controlnet.py``) training.

    python bench/train_step.py [--trainers lora finetune controlnet] [--families sd15 sd21 sdxl] [--resolutions 64 128]
                               [--checkpointing both] [--finetune_setups ...] [--finetune_resolution 64]
                               [--controlnet_families sd15 sdxl] [--controlnet_resolution 64]
                               [--threads 1] [--warmup 2] [--steps 8] [--json OUT]
    python bench/train_step.py --full_size [--trainers lora finetune controlnet] [--rank 16] [--resolution 1024]
                               [--lora_setups sdpa fp8 xformers] [--finetune_setups adamw adamw8bit adafactor_fused adamw_ema]
                               [--full_bf16]
                               [--json OUT]  # a GPU

Tiny rows (default): for each family a tiny random diffusers folder (``library.models.tiny_models.make_tiny_model``)
and a shapes dataset (``tools/make_sample_dataset.py``) are written to a temporary folder, and
``train_network.main([...])`` trains a LoRA on them for ``warmup + steps`` optimizer steps, in this process,
with the script's defaults (UNet and text-encoder LoRA, AdamW, fp32, VAE encoding and text encoding every
step: no caches; no buckets, so every batch is resolution x resolution). The loop itself is not touched:
``main(argv, callbacks=[StepClock(...)])`` hands the loop a callback whose ``after_optimizer_step`` hook the
loop calls once after every optimizer step; the gaps between those calls are the step times (data
loading, VAE, text encoders, UNet forward/backward, clip, AdamW, scheduler, logging). The first ``warmup``
gaps are dropped and the median of the rest is reported, so model loading, caching and the final save
are not counted.

Peak memory: with CUDA, ``torch.cuda.max_memory_allocated`` since the run started; on CPU the process's peak
RSS (VmHWM, reset before each row through ``/proc/self/clear_refs`` so each row has its own peak; where that
is not possible, ``ru_maxrss``, which never goes down, and the table says so). The peak includes what the
Python process already held (torch, diffusers: a few hundred MB), so the "start" RSS is printed beside it.

``--full_size``: the full-size SDXL UNet (``standard_configs("sdxl")``, random weights: random weights run at
the real speed, and nothing is downloaded) is built on the device in bf16, a rank-16 LoRA is applied with
``networks.lora.create_network`` (UNet only), and one step is UNet forward under bf16 autocast on random
latents (1024 px -> 128x128) and random text embeddings, MSE loss, backward, grad clipping and AdamW on the
LoRA weights. That row measures the model step only: no data pipeline, VAE or text encoders (as with
--cache_latents --cache_text_encoder_outputs --network_train_unet_only). On CPU it refuses unless
``--allow_cpu`` (minutes per step). Not run by CI.

Sharded rows (ZeRO-3 / FSDP2 memory per process of the full-size SDXL fine-tune, a GPU machine): bench/sharded_step.py
under ``accelerate launch --num_processes N`` with ``--mode zero3|zero3_offload|fsdp|fsdp_offload|ddp``.

Full fine-tune rows (``--trainers finetune``, ``FINETUNE_SETUPS``): each setup is a list of ``train_sdxl.py``
flags (optimizer, --gradient_checkpointing, --fused_backward_pass, --use_ema --ema_device cpu). Tiny rows run
``train_sdxl.main([...])`` on the tiny SDXL folder, timed by the same clock callback (the script's EMA
callback comes first in the list the loop calls, so the EMA update is inside the step time). UNet only
unless ``--train_text_encoder``.

``--full_size`` fine-tune rows parse the same setup flags with ``train_sdxl``'s parser plus ``--mixed_precision
bf16 --full_bf16``, and build the optimizer (``library.training.optim``, or ``library.training.fused_backward`` for
--fused_backward_pass) and the EMA (``library.training.ema``) exactly as ``train_sdxl`` does, on the random-init full-size
SDXL UNet in bf16. One step: UNet forward under bf16 autocast at 1024 px, MSE, backward (the fused optimizer
steps inside it), global grad clipping unless fused (fused clips per tensor), optimizer and scheduler step,
EMA update. Every UNet weight trains. Peak memory is ``torch.cuda.max_memory_allocated``; the bf16 weights
are already held when the window opens ("start"); gradients, optimizer state and activations are what
the row adds. The CPU EMA copy is not CUDA memory, so its host peak RSS goes in the note.

ControlNet rows (``--trainers controlnet``): tiny rows run ``train_controlnet.main([...])`` for each of
``--controlnet_families`` on the same shapes dataset, with Canny maps of its images written by ``tools/canny.py``
(``--train_data_dir images --conditioning_data_dir canny --caption_extension .caption``), at
``--controlnet_resolution``, with the script's defaults (a new ControlNet copied from the UNet's encoder, frozen
UNet, AdamW, lr 1e-5, fp32, no caches), timed by the same clock callback. ``--checkpointing`` selects
``--gradient_checkpointing``, which train_controlnet applies to the frozen UNet (and text encoders) only, not
to the ControlNet. ``--full_size`` ControlNet row: ``library.models.controlnet_models.create_controlnet`` on the
random-init full-size SDXL UNet (bf16, frozen), and one step is ControlNet forward on a random 1024² condition
image, UNet forward with its residuals (both under bf16 autocast), MSE, backward, clipping to 1.0 and AdamW on
the ControlNet. The ControlNet's weights are fp32 as with train_controlnet ``--mixed_precision bf16``, or bf16
with ``--full_bf16`` (the script's ``--full_bf16``). ``--gradient_checkpointing`` checkpoints the UNet only, as the script
does. Model step only, like the other full-size rows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


import torch

from library.training.loop import Callback

TINY_FAMILIES = ("sd15", "sd21", "sdxl")
TINY_CONTROLNET_FAMILIES = ("sd15", "sdxl")
TRAINERS = ("lora", "finetune", "controlnet")


@dataclass
class Row:
    """One measured configuration; times in seconds, memory in MiB."""

    model: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    device: str
    precision: str
    median_step_s: float
    min_step_s: float
    max_step_s: float
    steps_timed: int
    peak_mib: float
    start_mib: float | None
    memory_kind: str
    step_times_s: list[float] = field(default_factory=list)
    note: str = ""
    script: str = "train_network.py"
    setup: str = ""  # fine-tune rows: the FinetuneSetup label (optimizer, checkpointing, fused, EMA)


@dataclass(frozen=True)
class FinetuneSetup:
    """One full fine-tune configuration, as the ``train_sdxl.py`` flags that select it."""

    name: str
    label: str
    flags: tuple[str, ...]


_ADAFACTOR_FIXED_LR = ("--optimizer_type", "Adafactor", "--optimizer_args", "scale_parameter=False",
                       "relative_step=False", "warmup_init=False")  # kohya's SDXL fine-tune recipe (fixed LR)
FINETUNE_SETUPS: tuple[FinetuneSetup, ...] = (
    FinetuneSetup("adamw", "AdamW", ("--optimizer_type", "AdamW")),
    FinetuneSetup("adamw_gc", "AdamW + grad ckpt", ("--optimizer_type", "AdamW", "--gradient_checkpointing")),
    FinetuneSetup("adamw8bit", "AdamW8bit", ("--optimizer_type", "AdamW8bit")),
    FinetuneSetup("adafactor", "Adafactor", _ADAFACTOR_FIXED_LR),
    FinetuneSetup("adafactor_fused", "Adafactor + fused backward", _ADAFACTOR_FIXED_LR + ("--fused_backward_pass",)),
    FinetuneSetup("adamw_ema", "AdamW + EMA (cpu)", ("--optimizer_type", "AdamW", "--use_ema", "--ema_device", "cpu")),
)
TINY_FINETUNE_DEFAULT = ("adamw", "adamw_gc", "adafactor", "adafactor_fused", "adamw_ema")
FULL_SIZE_FINETUNE_DEFAULT = ("adamw", "adamw8bit", "adafactor_fused", "adamw_ema")


def finetune_setup(name: str) -> FinetuneSetup:
    return next(setup for setup in FINETUNE_SETUPS if setup.name == name)


# --------------------------------------------------------------------------------------------------
# memory


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def current_rss_mib() -> float | None:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib(resettable: bool) -> tuple[float, str]:
    """(peak MiB, how it was measured). ru_maxrss is KiB on Linux and bytes on macOS."""
    if resettable:
        return _proc_status_kib("VmHWM") / 1024, "peak RSS (VmHWM)"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 1024
    return maxrss / scale, "peak RSS since process start (ru_maxrss)"


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Measures the peak of the block: CUDA allocations on a GPU, process RSS on CPU."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["start_mib"] = torch.cuda.memory_allocated(device) / 2**20
        yield out
        torch.cuda.synchronize(device)
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["kind"] = "torch.cuda.max_memory_allocated"
        return
    resettable = reset_peak_rss()
    out["start_mib"] = current_rss_mib()
    yield out
    out["peak_mib"], out["kind"] = peak_rss_mib(resettable)


# --------------------------------------------------------------------------------------------------
# tiny rows: the real train_network.py path


class StepClock(Callback):
    """A loop callback: a time stamp when training starts and right after each optimizer step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def _stamp(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def on_train_start(self, run: Any, state: Any) -> None:
        self._stamp()

    def after_optimizer_step(self, run: Any, state: Any) -> dict[str, float]:
        self._stamp()
        return {}

    def step_times(self) -> list[float]:
        """Gaps between steps; the first stamp is taken when training starts."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def reset_accelerate_state() -> None:
    """accelerate keeps one process-wide state; each in-process run must start from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    for name in [n for n in os.environ if n.startswith("ACCELERATE_")]:
        del os.environ[name]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_args(model_dir: Path, data_dir: Path, output_dir: Path, resolution: int, batch_size: int,
               gradient_checkpointing: bool, total_steps: int) -> list[str]:
    """train_network.py flags: defaults except a fixed square resolution (no buckets) and a small LoRA."""
    args = ["--pretrained_model_name_or_path", str(model_dir), "--in_json", str(data_dir / "meta.json"),
            "--train_data_dir", str(data_dir / "images"), "--resolution", str(resolution),
            "--train_batch_size", str(batch_size), "--network_dim", "4", "--network_alpha", "1",
            "--learning_rate", "1e-4", "--seed", "0", "--max_data_loader_n_workers", "0",
            "--output_dir", str(output_dir), "--output_name", "bench", "--max_train_steps", str(total_steps)]
    return args + (["--gradient_checkpointing"] if gradient_checkpointing else [])


def timed_main(main: Callable[..., int], argv: list[str], what: str, warmup: int,
               steps: int) -> tuple[list[float], dict[str, Any], torch.device]:
    """Run a trainer's ``main(argv)`` in this process with the step clock callback, in the peak-memory window."""
    reset_accelerate_state()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = StepClock(device)
    with peak_memory(device) as memory:
        code = main(argv, callbacks=[clock])
    reset_accelerate_state()
    if code != 0:
        raise RuntimeError(f"{what}: main exited with {code}")
    timed = clock.step_times()[warmup:]
    if len(timed) != steps:
        raise RuntimeError(f"{what}: expected {steps} timed steps, the loop reported {len(timed)}")
    return timed, memory, device


def tiny_row(family: str, model_dir: Path, data_dir: Path, work: Path, resolution: int, batch_size: int,
             gradient_checkpointing: bool, warmup: int, steps: int) -> Row:
    import train_network

    output = Path(tempfile.mkdtemp(prefix=f"{family}-{resolution}-", dir=work))
    argv = train_args(model_dir, data_dir, output, resolution, batch_size, gradient_checkpointing, warmup + steps)
    timed, memory, device = timed_main(train_network.main, argv, f"train_network {family} {resolution} px",
                                       warmup, steps)
    return Row(f"tiny {family}", resolution, batch_size, gradient_checkpointing, device.type, "fp32",
               statistics.median(timed), min(timed), max(timed), len(timed), memory["peak_mib"],
               memory["start_mib"], memory["kind"], timed,
               "train_network.main: data + VAE + text encoders + UNet, LoRA on UNet and text encoder(s)")


def finetune_args(model_dir: Path, data_dir: Path, output_dir: Path, resolution: int, batch_size: int,
                  total_steps: int, setup: FinetuneSetup, train_text_encoder: bool) -> list[str]:
    """train_sdxl.py flags: its defaults (lr 1e-6, max_grad_norm 1, fp32) plus the setup's flags."""
    args = ["--pretrained_model_name_or_path", str(model_dir), "--in_json", str(data_dir / "meta.json"),
            "--train_data_dir", str(data_dir / "images"), "--resolution", str(resolution),
            "--train_batch_size", str(batch_size), "--seed", "0", "--max_data_loader_n_workers", "0",
            "--output_dir", str(output_dir), "--output_name", "bench", "--max_train_steps", str(total_steps),
            *setup.flags]
    return args + (["--train_text_encoder"] if train_text_encoder else [])


def tiny_finetune_row(setup: FinetuneSetup, model_dir: Path, data_dir: Path, work: Path, resolution: int,
                      batch_size: int, train_text_encoder: bool, warmup: int, steps: int) -> Row:
    import train_sdxl

    output = Path(tempfile.mkdtemp(prefix=f"finetune-{setup.name}-", dir=work))
    argv = finetune_args(model_dir, data_dir, output, resolution, batch_size, warmup + steps, setup,
                         train_text_encoder)
    timed, memory, device = timed_main(train_sdxl.main, argv, f"train_sdxl {setup.name}", warmup, steps)
    trained = "UNet + both text encoders" if train_text_encoder else "UNet"
    return Row("tiny sdxl", resolution, batch_size, "--gradient_checkpointing" in setup.flags, device.type, "fp32",
               statistics.median(timed), min(timed), max(timed), len(timed), memory["peak_mib"],
               memory["start_mib"], memory["kind"], timed,
               f"train_sdxl.main: data + VAE + text encoders + UNet; {trained} trained; {' '.join(setup.flags)}",
               script="train_sdxl.py", setup=setup.label)


def controlnet_args(model_dir: Path, data_dir: Path, output_dir: Path, resolution: int, batch_size: int,
                    gradient_checkpointing: bool, total_steps: int) -> list[str]:
    """train_controlnet.py flags: its defaults (new ControlNet, frozen UNet, lr 1e-5, fp32), folder + canny data."""
    args = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir / "images"),
            "--conditioning_data_dir", str(data_dir / "canny"), "--caption_extension", ".caption",
            "--resolution", str(resolution), "--train_batch_size", str(batch_size), "--seed", "0",
            "--max_data_loader_n_workers", "0", "--output_dir", str(output_dir), "--output_name", "bench",
            "--max_train_steps", str(total_steps)]
    return args + (["--gradient_checkpointing"] if gradient_checkpointing else [])


def write_canny_maps(data_dir: Path) -> None:
    """``data_dir/canny``: the conditioning images, written by the same tool a user runs."""
    from tools import canny

    if canny.main([str(data_dir / "images"), str(data_dir / "canny")]) != 0:
        raise RuntimeError(f"tools/canny.py could not write the edge maps of {data_dir / 'images'}")


def tiny_controlnet_row(family: str, model_dir: Path, data_dir: Path, work: Path, resolution: int, batch_size: int,
                        gradient_checkpointing: bool, warmup: int, steps: int) -> Row:
    import train_controlnet

    output = Path(tempfile.mkdtemp(prefix=f"controlnet-{family}-", dir=work))
    argv = controlnet_args(model_dir, data_dir, output, resolution, batch_size, gradient_checkpointing,
                           warmup + steps)
    timed, memory, device = timed_main(train_controlnet.main, argv, f"train_controlnet {family}", warmup, steps)
    return Row(f"tiny {family}", resolution, batch_size, gradient_checkpointing, device.type, "fp32",
               statistics.median(timed), min(timed), max(timed), len(timed), memory["peak_mib"],
               memory["start_mib"], memory["kind"], timed,
               "train_controlnet.main: data + canny maps + VAE + text encoders + ControlNet + frozen UNet; "
               "ControlNet trained; --gradient_checkpointing checkpoints the UNet only",
               script="train_controlnet.py")


def prepare_inputs(work: Path, families: list[str], max_resolution: int, images: int) -> tuple[dict[str, Path], Path]:
    """Tiny model folders and one dataset big enough to crop at every resolution asked for."""
    from library.models.tiny_models import make_tiny_model
    from tools.make_sample_dataset import make_sample_dataset

    models = {family: make_tiny_model(family, work / f"model-{family}", seed=0) for family in families}
    # long side 2x the resolution: the 1:2 images still have a short side >= the resolution
    meta = make_sample_dataset(work / "data", count=images, size=2 * max_resolution, seed=0)
    return models, meta.parent


def tiny_rows(args: argparse.Namespace) -> list[Row]:
    rows = []
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    lora = "lora" in args.trainers
    setups = [finetune_setup(name) for name in args.finetune_setups or TINY_FINETUNE_DEFAULT] \
        if "finetune" in args.trainers else []
    controlnet_families = args.controlnet_families if "controlnet" in args.trainers else []
    families = sorted(set(args.families if lora else []) | ({"sdxl"} if setups else set()) | set(controlnet_families))
    max_resolution = max((args.resolutions if lora else []) + ([args.finetune_resolution] if setups else [])
                         + ([args.controlnet_resolution] if controlnet_families else []))
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as temp:
        work = Path(temp)
        models, data = prepare_inputs(work, families, max_resolution,
                                      images=max(4, args.batch_size * (args.warmup + args.steps)))
        for family in args.families if lora else []:
            for resolution in args.resolutions:
                for gc_on in checkpointing:
                    row = tiny_row(family, models[family], data, work, resolution, args.batch_size, gc_on,
                                   args.warmup, args.steps)
                    print(f"# {row.model} {resolution}px gc={gc_on}: median {row.median_step_s:.3f} s/step, "
                          f"peak {row.peak_mib:.0f} MiB", file=sys.stderr, flush=True)
                    rows.append(row)
        for setup in setups:
            row = tiny_finetune_row(setup, models["sdxl"], data, work, args.finetune_resolution, args.batch_size,
                                    args.train_text_encoder, args.warmup, args.steps)
            print(f"# fine-tune {setup.label}: median {row.median_step_s:.3f} s/step, peak {row.peak_mib:.0f} MiB",
                  file=sys.stderr, flush=True)
            rows.append(row)
        if controlnet_families:
            write_canny_maps(data)
        for family in controlnet_families:
            for gc_on in checkpointing:
                row = tiny_controlnet_row(family, models[family], data, work, args.controlnet_resolution,
                                          args.batch_size, gc_on, args.warmup, args.steps)
                print(f"# controlnet {row.model} gc={gc_on}: median {row.median_step_s:.3f} s/step, "
                      f"peak {row.peak_mib:.0f} MiB", file=sys.stderr, flush=True)
                rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# full-size SDXL: the model step


def build_full_size_unet(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The SDXL 1.0 UNet with random weights, initialised directly on ``device`` (no 10 GB trip through RAM).

    Only the UNet is built: the step under test feeds it random latents and text embeddings, so the text
    encoders and VAE of ``build_model("sdxl", standard_configs("sdxl"))`` would only cost memory and time.
    """
    from diffusers import UNet2DConditionModel

    from library.models.family_configs import standard_configs

    config = {k: v for k, v in standard_configs("sdxl")["unet"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def full_size_device(args: argparse.Namespace) -> torch.device:
    """The device for the full-size rows; a CPU only when asked for (minutes per step)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.allow_cpu:
        raise SystemExit("--full_size builds the 2.6B-parameter SDXL UNet and steps it at 1024 px: minutes per "
                         "step on a CPU. Run it on a GPU, or pass --allow_cpu to measure it here anyway.")
    return device


@dataclass
class UNetInputs:
    """Random latents, target and SDXL conditioning for one full-size step (the same every step)."""

    latents: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    hidden: torch.Tensor
    added: dict[str, torch.Tensor]


def random_unet_inputs(unet: torch.nn.Module, resolution: int, batch: int, device: torch.device,
                       dtype: torch.dtype) -> UNetInputs:
    generator = torch.Generator(device="cpu").manual_seed(0)
    latent = resolution // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    config = unet.config  # SDXL: 2048-wide hidden states, 1280-wide pooled embedding, 6 x 256 time ids
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    latents, target = randn(batch, 4, latent, latent).to(dtype), randn(batch, 4, latent, latent)
    hidden = randn(batch, 77, config.cross_attention_dim).to(dtype)
    added = {"text_embeds": randn(batch, pooled_width).to(dtype),
             "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                      device=device, dtype=dtype).repeat(batch, 1)}
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    return UNetInputs(latents, target, timesteps, hidden, added)


def unet_loss(unet: torch.nn.Module, inputs: UNetInputs, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(device.type, dtype=dtype):
        prediction = unet(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.hidden,
                          added_cond_kwargs=inputs.added).sample
    return torch.nn.functional.mse_loss(prediction.float(), inputs.target)


def timed_steps(step: Callable[[int], None], device: torch.device, warmup: int, steps: int,
                what: str) -> tuple[list[float], dict[str, Any]]:
    """Call ``step(index)`` warmup + steps times inside the peak-memory window; the times after warm-up."""
    times = []
    with peak_memory(device) as memory:
        for index in range(warmup + steps):
            start = time.perf_counter()
            step(index)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if index >= warmup:
                times.append(elapsed)
            print(f"# {what} step {index + 1}: {elapsed:.3f} s", file=sys.stderr, flush=True)
    return times, memory


FULL_SIZE_LORA_SETUPS = {
    "sdpa": "diffusers' default attention (PyTorch SDPA)",
    "xformers": "xformers attention (train_network --xformers)",
    "fp8": "frozen UNet weights stored in float8_e4m3fn, upcast per layer (train_network --fp8_base)",
}


def full_size_row(args: argparse.Namespace, setup: str = "sdpa") -> Row:
    """One LoRA row; ``setup`` is a key of FULL_SIZE_LORA_SETUPS (what train_network's flag would change)."""
    from networks.lora import create_network

    device = full_size_device(args)
    dtype = torch.bfloat16
    unet = build_full_size_unet(device, dtype)
    if setup == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    network = create_network(1.0, args.rank, float(args.rank), None, [], unet)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    network.to(device).requires_grad_(True).train()
    if setup == "fp8":  # after the LoRA wraps the layers, as train_network stores the base (kohya's order)
        from library.models.fp8_weights import store_frozen_weights_in_fp8

        store_frozen_weights_in_fp8(unet)
        release_cached_memory()  # the bf16 copies are gone: let the window start at the float8 footprint
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in train mode; the frozen UNet has no dropout
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = random_unet_inputs(unet, args.resolution, args.batch_size, device, dtype)

    def step(index: int) -> None:
        unet_loss(unet, inputs, device, dtype).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, memory = timed_steps(step, device, args.warmup, args.steps, "full-size LoRA")
    lora_params = sum(p.numel() for p in params)
    precision = "fp8 weights + bf16 autocast" if setup == "fp8" else "bf16 weights + autocast"
    return Row("SDXL full-size (random init)", args.resolution, args.batch_size, bool(args.gradient_checkpointing),
               device.type, precision, statistics.median(times), min(times), max(times),
               len(times), memory["peak_mib"], memory["start_mib"], memory["kind"], times,
               f"model step only (UNet fwd+bwd+clip+AdamW), LoRA rank {args.rank} on UNet "
               f"({lora_params / 1e6:.1f}M params); no data pipeline/VAE/text encoders; {FULL_SIZE_LORA_SETUPS[setup]}",
               setup=f"LoRA, {setup}")


def full_size_finetune_row(args: argparse.Namespace, setup: FinetuneSetup) -> Row:
    """Every weight of the full-size UNet trains, with train_sdxl's optimizer / fused backward / EMA code."""
    import train_sdxl
    from library.cli import config
    from library.cli.optim_args import ema_settings_from_args, optimizer_settings_from_args
    from library.training import ema, fused_backward, optim

    device = full_size_device(args)
    flags = [*setup.flags, "--mixed_precision", "bf16", "--full_bf16"]
    if args.gradient_checkpointing and "--gradient_checkpointing" not in flags:
        flags.append("--gradient_checkpointing")
    parsed = config.parse_args(train_sdxl.build_parser(), flags)  # train_sdxl's defaults: lr 1e-6, max_grad_norm 1
    settings = optimizer_settings_from_args(parsed)
    total_steps = args.warmup + args.steps
    dtype = torch.bfloat16
    unet = build_full_size_unet(device, dtype).requires_grad_(True).train()  # --full_bf16: bf16 weights train
    if parsed.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [{"params": list(unet.parameters()), "lr": settings.learning_rate, "name": "unet"}]
    if parsed.fused_backward_pass:
        optimizer, scheduler, description = fused_backward.build_fused_optimizer_and_scheduler(
            settings, params, total_steps, parsed.max_grad_norm)
    else:
        optimizer, scheduler, description = optim.build_optimizer_and_scheduler(settings, params, total_steps)
    ema_settings = ema_settings_from_args(parsed)
    averaged = ema.ExponentialMovingAverage({f"unet.{k}": p for k, p in unet.named_parameters()}, ema_settings) \
        if ema_settings is not None else None
    inputs = random_unet_inputs(unet, args.resolution, args.batch_size, device, dtype)
    clip = parsed.max_grad_norm if not parsed.fused_backward_pass else 0.0  # fused clips each tensor in its hook

    def step(index: int) -> None:
        unet_loss(unet, inputs, device, dtype).backward()  # the fused optimizer steps every tensor in here
        if clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if averaged is not None:
            averaged.maybe_update(index + 1)

    host_resettable = reset_peak_rss()
    times, memory = timed_steps(step, device, args.warmup, args.steps, f"full-size fine-tune {setup.name}")
    host_peak, _ = peak_rss_mib(host_resettable)
    count = sum(p.numel() for p in unet.parameters())
    if parsed.fused_backward_pass:
        optimizer.remove_hooks()  # the hooks hold the parameters; the next row needs this UNet freed
    return Row("SDXL full-size (random init)", args.resolution, args.batch_size, bool(parsed.gradient_checkpointing),
               device.type, "bf16 weights (--full_bf16) + autocast", statistics.median(times), min(times),
               max(times), len(times), memory["peak_mib"], memory["start_mib"], memory["kind"], times,
               f"model step only (UNet fwd+bwd+{'per-tensor clip in hooks' if not clip else 'clip'}+optimizer"
               f"{'+EMA' if averaged is not None else ''}), all {count / 1e6:,.1f}M UNet params trained; "
               f"{description}; host peak RSS {host_peak:.0f} MiB; no data pipeline/VAE/text encoders",
               script="train_sdxl.py", setup=setup.label)


def full_size_controlnet_row(args: argparse.Namespace) -> Row:
    """train_controlnet's model step at full size: a ControlNet made from the frozen SDXL UNet steers it."""
    from library.models.controlnet_models import create_controlnet

    device = full_size_device(args)
    dtype = torch.bfloat16
    unet = build_full_size_unet(device, dtype)  # frozen, as train_controlnet keeps it without --train_unet_decoder
    with torch.device(device):  # diffusers builds the 1.2B-parameter copy here, not in host RAM
        controlnet = create_controlnet(unet)
    controlnet.to(device, dtype=dtype if args.full_bf16 else torch.float32).requires_grad_(True).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # as train_controlnet: the frozen UNet and the trained ControlNet
        controlnet.enable_gradient_checkpointing()
    params = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)  # train_controlnet's default learning rate
    inputs = random_unet_inputs(unet, args.resolution, args.batch_size, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(1)
    condition = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=generator).to(device, dtype)

    def step(index: int) -> None:
        with torch.autocast(device.type, dtype=dtype):
            down, mid = controlnet(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.hidden,
                                   controlnet_cond=condition, added_cond_kwargs=inputs.added, return_dict=False)
            prediction = unet(inputs.latents, inputs.timesteps, encoder_hidden_states=inputs.hidden,
                              added_cond_kwargs=inputs.added,
                              down_block_additional_residuals=[d.to(dtype) for d in down],
                              mid_block_additional_residual=mid.to(dtype)).sample
        torch.nn.functional.mse_loss(prediction.float(), inputs.target).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, memory = timed_steps(step, device, args.warmup, args.steps, "full-size ControlNet")
    count = sum(p.numel() for p in params)
    weights = "bf16 (--full_bf16)" if args.full_bf16 else "fp32"
    return Row("SDXL full-size (random init)", args.resolution, args.batch_size, bool(args.gradient_checkpointing),
               device.type, f"bf16 UNet, {weights} ControlNet + autocast", statistics.median(times), min(times),
               max(times), len(times), memory["peak_mib"], memory["start_mib"], memory["kind"], times,
               f"model step only (ControlNet fwd + UNet fwd with residuals + bwd + clip + AdamW), "
               f"{count / 1e6:,.1f}M ControlNet params trained, UNet frozen; no data pipeline/VAE/text encoders",
               script="train_controlnet.py")


def release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def full_size_row_specs(args: argparse.Namespace) -> list[list[str]]:
    """The requested full-size rows, each as the flags that select it alone."""
    specs = [["--trainers", "lora", "--lora_setups", s] for s in args.lora_setups] if "lora" in args.trainers else []
    if "finetune" in args.trainers:
        specs += [["--trainers", "finetune", "--finetune_setups", n] for n in args.finetune_setups or FULL_SIZE_FINETUNE_DEFAULT]
    return specs + ([["--trainers", "controlnet"]] if "controlnet" in args.trainers else [])


def full_size_rows(args: argparse.Namespace) -> list[Row]:
    """One row in this process; several rows each in a process of their own.

    On an H200, rows run one after another in one process kept the previous row's weights and optimizer state
    alive on the GPU (a fine-tune row started at 19,996 MiB instead of 5,002 MiB), although gc and
    empty_cache ran between them and the same check on CPU showed nothing alive. A fresh process per row is the
    only peak that can be trusted. With --json, the rows so far are written after each one, so a row that fails
    or runs out of time on a lent GPU keeps the rows before it.
    """
    specs = full_size_row_specs(args)
    if len(specs) == 1:
        if "lora" in args.trainers:
            return [full_size_row(args, args.lora_setups[0])]
        if "finetune" in args.trainers:
            return [full_size_finetune_row(args, finetune_setup((args.finetune_setups or FULL_SIZE_FINETUNE_DEFAULT)[0]))]
        return [full_size_controlnet_row(args)]
    common = ["--full_size", "--resolution", str(args.resolution), "--rank", str(args.rank), "--batch_size",
              str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    common += [flag for flag, on in (("--full_bf16", args.full_bf16), ("--allow_cpu", args.allow_cpu),
                                     ("--gradient_checkpointing", args.gradient_checkpointing)) if on]
    common += (["--device", args.device] if args.device else []) + (["--threads", str(args.threads)] if args.threads else [])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as work:
        for index, spec in enumerate(specs):
            out = Path(work) / f"row{index}.json"
            code = subprocess.call([sys.executable, "-m", "bench.train_step", *common, *spec, "--json", str(out)],
                                   cwd=Path(__file__).resolve().parent.parent)
            if code != 0 or not out.exists():
                print(f"# row {' '.join(spec)} failed (exit {code}); the other rows go on", file=sys.stderr)
                continue
            rows += [Row(**r) for r in json.loads(out.read_text())["rows"]]
            if args.json:
                Path(args.json).write_text(json.dumps({"environment": environment(), "partial": True,
                                                       "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return rows


# --------------------------------------------------------------------------------------------------
# output


def environment() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
                            "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1_5_15"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(rows: list[Row]) -> str:
    """One table; a "setup" column after "model" when any row has one (the fine-tune rows)."""
    with_setup = any(r.setup for r in rows)
    setup_head, setup_rule = ("setup | ", "---|") if with_setup else ("", "")
    lines = [f"| model | {setup_head}px | batch | grad ckpt | device | precision | median s/step | min | max | steps | "
             "peak MiB | start MiB | peak - start | memory |",
             f"|---|{setup_rule}---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        start = "-" if r.start_mib is None else f"{r.start_mib:.0f}"
        growth = "-" if r.start_mib is None else f"{r.peak_mib - r.start_mib:.0f}"
        setup = f"{r.setup} | " if with_setup else ""
        lines.append(f"| {r.model} | {setup}{r.resolution} | {r.batch_size} | "
                     f"{'yes' if r.gradient_checkpointing else 'no'} | "
                     f"{r.device} | {r.precision} | {r.median_step_s:.3f} | {r.min_step_s:.3f} | {r.max_step_s:.3f} | "
                     f"{r.steps_timed} | {r.peak_mib:.0f} | {start} | {growth} | {r.memory_kind} |")
    return "\n".join(lines)


def markdown_tables(rows: list[Row]) -> str:
    """One table per trainer script, headed by its name, in the order the rows ran."""
    scripts = list(dict.fromkeys(r.script for r in rows))
    return "\n\n".join(f"{script}\n\n{markdown_table([r for r in rows if r.script == script])}" for script in scripts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS),
                        help="lora: train_network.py rows; finetune: train_sdxl.py full fine-tune rows; "
                             "controlnet: train_controlnet.py rows")
    parser.add_argument("--families", nargs="+", default=list(TINY_FAMILIES), choices=TINY_FAMILIES,
                        help="tiny LoRA rows")
    parser.add_argument("--controlnet_families", nargs="+", default=list(TINY_CONTROLNET_FAMILIES),
                        choices=TINY_FAMILIES, help="tiny ControlNet rows")
    parser.add_argument("--controlnet_resolution", type=int, default=64, help="tiny ControlNet rows: square px")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="tiny rows: square px")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="tiny rows without / with --gradient_checkpointing")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps timed (median reported)")
    parser.add_argument("--finetune_setups", nargs="+", choices=[f.name for f in FINETUNE_SETUPS], default=None,
                        help=f"fine-tune rows (default tiny: {' '.join(TINY_FINETUNE_DEFAULT)}; "
                             f"--full_size: {' '.join(FULL_SIZE_FINETUNE_DEFAULT)})")
    parser.add_argument("--finetune_resolution", type=int, default=64, help="tiny fine-tune rows: square px")
    parser.add_argument("--train_text_encoder", action="store_true",
                        help="tiny fine-tune rows: also train both text encoders (train_sdxl --train_text_encoder)")
    parser.add_argument("--full_size", action="store_true",
                        help="full-size SDXL UNet model step: LoRA, full fine-tune and/or ControlNet (GPU)")
    parser.add_argument("--allow_cpu", action="store_true", help="let --full_size run on a CPU")
    parser.add_argument("--device", default=None, help="--full_size device (default: cuda if available)")
    parser.add_argument("--resolution", type=int, default=1024, help="--full_size: square px")
    parser.add_argument("--rank", type=int, default=16, help="--full_size: LoRA rank (alpha = rank)")
    parser.add_argument("--lora_setups", nargs="+", choices=list(FULL_SIZE_LORA_SETUPS), default=["sdpa"],
                        help="--full_size LoRA rows: " + "; ".join(f"{k}: {v}" for k, v in FULL_SIZE_LORA_SETUPS.items()))
    parser.add_argument("--full_bf16", action="store_true",
                        help="--full_size ControlNet row: bf16 ControlNet weights (train_controlnet --full_bf16); "
                             "default fp32 weights under bf16 autocast (--mixed_precision bf16)")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="--full_size: checkpoint the UNet in every row (tiny rows use --checkpointing and "
                             "the adamw_gc fine-tune setup; ControlNet rows checkpoint the ControlNet too, as train_controlnet does)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before measuring; 1 gives stable numbers on a loaded machine "
                             "(spinning OpenMP threads that compete with other processes slow every step)")
    parser.add_argument("--json", default=None, help="write the rows and the environment here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1 (the first step includes one-off costs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    env_before = environment()
    rows = full_size_rows(args) if args.full_size else tiny_rows(args)
    env = {**env_before, "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    print(f"torch {env['torch']}, {env['nproc']} CPUs ({env['cpu']}), {env['torch_threads']} torch threads, "
          f"load average before {env.get('loadavg_1_5_15')}, after {env['loadavg_after']}")
    print(markdown_tables(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
