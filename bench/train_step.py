"""Seconds per LoRA optimizer step and peak memory, through the real ``train_network.py`` path.

    python bench/train_step.py [--families sd15 sd21 sdxl] [--resolutions 64 128] [--checkpointing both] [--threads 1]
                               [--warmup 2] [--steps 8] [--json OUT]
    python bench/train_step.py --full_size [--rank 16] [--resolution 1024] [--json OUT]   # meant for a GPU

Tiny rows (default): for each family a tiny random diffusers folder (``library.tiny_models.make_tiny_model``)
and a shapes dataset (``tools/make_sample_dataset.py``) are written to a temporary folder, and
``train_network.main([...])`` trains a LoRA on them for ``warmup + steps`` optimizer steps, in this process,
with the script's defaults (UNet and text-encoder LoRA, AdamW, fp32, VAE encoding and text encoding every
step: no caches; no buckets, so every batch is resolution x resolution). The loop itself is not touched:
``train_network.train`` is wrapped so the ``TrainingRun`` it receives gets an ``extra_logs`` callback, which
the loop calls once after every optimizer step; the gaps between those calls are the step times (data
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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

TINY_FAMILIES = ("sd15", "sd21", "sdxl")


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


class StepClock:
    """Timestamps taken by the loop's ``extra_logs`` callback, i.e. right after each optimizer step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def wrap(self, previous: Callable[[], dict[str, float]] | None) -> Callable[[], dict[str, float]]:
        def extra_logs() -> dict[str, float]:
            logs = previous() if previous is not None else {}
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stamps.append(time.perf_counter())
            return logs

        return extra_logs

    def step_times(self) -> list[float]:
        """Gaps between steps; the first stamp is taken when ``train`` is entered."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


@contextlib.contextmanager
def clocked_train(clock: StepClock) -> Iterator[None]:
    """Swap ``train_network.train`` for a wrapper that installs the clock on the run, then put it back."""
    import train_network

    real_train = train_network.train

    def timed_train(run: Any) -> Any:
        run.extra_logs = clock.wrap(run.extra_logs)
        clock.stamps.append(time.perf_counter())
        return real_train(run)

    train_network.train = timed_train
    try:
        yield
    finally:
        train_network.train = real_train


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


def tiny_row(family: str, model_dir: Path, data_dir: Path, work: Path, resolution: int, batch_size: int,
             gradient_checkpointing: bool, warmup: int, steps: int) -> Row:
    import train_network

    reset_accelerate_state()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = StepClock(device)
    output = Path(tempfile.mkdtemp(prefix=f"{family}-{resolution}-", dir=work))
    argv = train_args(model_dir, data_dir, output, resolution, batch_size, gradient_checkpointing, warmup + steps)
    with peak_memory(device) as memory, clocked_train(clock):
        code = train_network.main(argv)
    reset_accelerate_state()
    if code != 0:
        raise RuntimeError(f"train_network.main exited with {code} for {family} at {resolution} px")
    timed = clock.step_times()[warmup:]
    if len(timed) != steps:
        raise RuntimeError(f"expected {steps} timed steps, the loop reported {len(timed)}")
    return Row(f"tiny {family}", resolution, batch_size, gradient_checkpointing, device.type, "fp32",
               statistics.median(timed), min(timed), max(timed), len(timed), memory["peak_mib"],
               memory["start_mib"], memory["kind"], timed,
               "train_network.main: data + VAE + text encoders + UNet, LoRA on UNet and text encoder(s)")


def prepare_inputs(work: Path, families: list[str], max_resolution: int, images: int) -> tuple[dict[str, Path], Path]:
    """Tiny model folders and one dataset big enough to crop at every resolution asked for."""
    from library.tiny_models import make_tiny_model
    from tools.make_sample_dataset import make_sample_dataset

    models = {family: make_tiny_model(family, work / f"model-{family}", seed=0) for family in families}
    # long side 2x the resolution: the 1:2 images still have a short side >= the resolution
    meta = make_sample_dataset(work / "data", count=images, size=2 * max_resolution, seed=0)
    return models, meta.parent


def tiny_rows(args: argparse.Namespace) -> list[Row]:
    rows = []
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as temp:
        work = Path(temp)
        models, data = prepare_inputs(work, args.families, max(args.resolutions),
                                      images=max(4, args.batch_size * (args.warmup + args.steps)))
        for family in args.families:
            for resolution in args.resolutions:
                for gc in checkpointing:
                    row = tiny_row(family, models[family], data, work, resolution, args.batch_size, gc,
                                   args.warmup, args.steps)
                    print(f"# {row.model} {resolution}px gc={gc}: median {row.median_step_s:.3f} s/step, "
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

    from library.families import standard_configs

    config = {k: v for k, v in standard_configs("sdxl")["unet"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def full_size_row(args: argparse.Namespace) -> Row:
    from networks.lora import create_network

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.allow_cpu:
        raise SystemExit("--full_size builds the 2.6B-parameter SDXL UNet and steps it at 1024 px: minutes per "
                         "step on a CPU. Run it on a GPU, or pass --allow_cpu to measure it here anyway.")
    dtype = torch.bfloat16
    unet = build_full_size_unet(device, dtype)
    network = create_network(1.0, args.rank, float(args.rank), None, [], unet)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    network.to(device).requires_grad_(True).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in train mode; the frozen UNet has no dropout
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    generator = torch.Generator(device="cpu").manual_seed(0)
    latent = args.resolution // 8
    batch = args.batch_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    config = unet.config  # SDXL: 2048-wide hidden states, 1280-wide pooled embedding, 6 x 256 time ids
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    latents, target = randn(batch, 4, latent, latent).to(dtype), randn(batch, 4, latent, latent)
    hidden = randn(batch, 77, config.cross_attention_dim).to(dtype)
    added = {"text_embeds": randn(batch, pooled_width).to(dtype),
             "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]],
                                      device=device, dtype=dtype).repeat(batch, 1)}
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            prediction = unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with peak_memory(device) as memory:
        for index in range(args.warmup + args.steps):
            start = time.perf_counter()
            step()
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
            print(f"# full-size step {index + 1}: {time.perf_counter() - start:.3f} s", file=sys.stderr, flush=True)
    lora_params = sum(p.numel() for p in params)
    return Row("SDXL full-size (random init)", args.resolution, batch, bool(args.gradient_checkpointing),
               device.type, "bf16 weights + autocast", statistics.median(times), min(times), max(times),
               len(times), memory["peak_mib"], memory["start_mib"], memory["kind"], times,
               f"model step only (UNet fwd+bwd+clip+AdamW), LoRA rank {args.rank} on UNet "
               f"({lora_params / 1e6:.1f}M params); no data pipeline/VAE/text encoders")


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
    lines = ["| model | px | batch | grad ckpt | device | precision | median s/step | min | max | steps | "
             "peak MiB | start MiB | peak - start | memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        start = "-" if r.start_mib is None else f"{r.start_mib:.0f}"
        growth = "-" if r.start_mib is None else f"{r.peak_mib - r.start_mib:.0f}"
        lines.append(f"| {r.model} | {r.resolution} | {r.batch_size} | {'yes' if r.gradient_checkpointing else 'no'} | "
                     f"{r.device} | {r.precision} | {r.median_step_s:.3f} | {r.min_step_s:.3f} | {r.max_step_s:.3f} | "
                     f"{r.steps_timed} | {r.peak_mib:.0f} | {start} | {growth} | {r.memory_kind} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(TINY_FAMILIES), choices=TINY_FAMILIES)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="tiny rows: square px")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="tiny rows without / with --gradient_checkpointing")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps timed (median reported)")
    parser.add_argument("--full_size", action="store_true", help="full-size SDXL UNet + LoRA model step (GPU)")
    parser.add_argument("--allow_cpu", action="store_true", help="let --full_size run on a CPU")
    parser.add_argument("--device", default=None, help="--full_size device (default: cuda if available)")
    parser.add_argument("--resolution", type=int, default=1024, help="--full_size: square px")
    parser.add_argument("--rank", type=int, default=16, help="--full_size: LoRA rank (alpha = rank)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="--full_size: checkpoint the UNet")
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
    rows = [full_size_row(args)] if args.full_size else tiny_rows(args)
    env = {**env_before, "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    print(f"torch {env['torch']}, {env['nproc']} CPUs ({env['cpu']}), {env['torch_threads']} torch threads, "
          f"load average before {env.get('loadavg_1_5_15')}, after {env['loadavg_after']}")
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
