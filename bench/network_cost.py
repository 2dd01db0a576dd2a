"""What a network costs per step over the frozen base's own forward + backward (tiny SDXL UNet, CPU).

    python bench/network_cost.py [--rows base lora dora loha lokr lora_attn peft_attn] [--resolution 128] [--batch 2]
                                 [--rank 4] [--steps 60] [--warmup 5] [--repeats 3] [--threads 1] [--json OUT]
    python bench/network_cost.py --profile lora [--steps 10]      # torch.profiler: where a step's time goes

Every row builds the tiny SDXL (``library.models.tiny_models.build_tiny_model("sdxl")``, seed 0), freezes it,
attaches one network to its UNet (rank ``--rank``, alpha = rank, network in train mode, base in eval mode as
``train_network.py`` leaves it) and times ``steps`` steps of: UNet forward on fixed random latents
(``--resolution``/8 square, ``--batch``), fixed text embeddings and SDXL's added conditioning, MSE against a
fixed target, backward. The latents have ``requires_grad`` in every row, base included, so the base's backward
runs through the whole UNet in every row and the rows differ only by the network. The optimizer step is not
timed (it is the same AdamW over a few thousand parameters whatever the kind). Rows:

  base       the frozen UNet alone (the reference)
  lora       networks.lora (what ``--network_module networks.lora`` trains on the UNet)
  dora       networks.lora with ``dora_wd=True``
  loha/lokr  networks.lycoris_kohya, ``algo=loha`` / ``algo=lokr`` (``--network_module lycoris.kohya``)
  lora_attn  networks.lora on the diffusers SDXL LoRA example's targets only (attention to_q/to_k/to_v/to_out.0)
  peft_attn  peft's LoRA on those targets (``unet.add_adapter(LoraConfig(...))``, as the diffusers example does)

A row whose network cannot be built here (a package or a network missing) is reported with the reason and
no numbers. The rows are run in turn ``--repeats`` times (interleaved, so a change in machine load hits every
row alike). Time is the CPU time of the thread that steps (``time.thread_time``; with one torch thread on a
CPU the forward and the backward both run on it), because on a machine shared with other jobs the wall time
mostly measures the waits for a core; the wall time is in the table too. Each run's figure is the median of
its ``steps`` step times; the table gives the median of the runs with the min and max beside it.
Overhead = (row - base) / base on the medians; the forward columns time the forward pass (and the loss) alone.

Memory, on CPU: "saved for backward" is the activations autograd keeps for the backward during one forward (the
distinct storages handed to ``saved_tensors_hooks``, weights left out): deterministic. "step peak RSS" is measured after all timings, one
fresh process per row started with glibc told to give freed blocks of 64 KiB and up back to the kernel at once
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``), so that RSS follows the live tensors: the process's
VmHWM over one step (reset through ``/proc/self/clear_refs``) minus its RSS before the step, median of 3 steps. It includes what the step allocates and frees (activations,
gradients, temporaries), not the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.models.tiny_models import build_tiny_model
from train_step import _proc_status_kib, reset_peak_rss  # run as a script, bench/ is on the import path

ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora_sdxl.py target_modules
ATTN_SUFFIXES = ("_to_q", "_to_k", "_to_v", "_to_out_0")


@dataclass
class Row:
    name: str
    what: str
    ms_per_step: list[float] = field(default_factory=list)  # CPU time of the stepping thread: one median per repeat
    wall_ms_per_step: list[float] = field(default_factory=list)  # wall time, the same way
    forward_ms: list[float] = field(default_factory=list)  # CPU time of the forward pass alone, the same way
    saved_mib: float | None = None
    peak_rss_delta_mib: list[float] = field(default_factory=list)
    trainable_params: int = 0
    modules: int = 0
    error: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms_per_step)


# --------------------------------------------------------------------------------------------------
# networks


def _kohya_network(module_name: str, rank: int, **network_args: str) -> Callable[[Any], tuple[Any, int]]:
    def attach(model: Any) -> tuple[Any, int]:
        import importlib

        module = importlib.import_module(module_name)
        network = module.create_network(1.0, rank, float(rank), None, model.text_encoders, model.unet, **network_args)
        network.apply_to(model.text_encoders, model.unet, apply_text_encoder=False, apply_unet=True)
        network.train()
        return network, len(network.unet_loras)
    return attach


def _lora_attn(rank: int) -> Callable[[Any], tuple[Any, int]]:
    def attach(model: Any) -> tuple[Any, int]:
        from networks.lora import create_network

        network = create_network(1.0, rank, float(rank), None, model.text_encoders, model.unet)
        kept = [lora for lora in network.unet_loras if lora.lora_name.endswith(ATTN_SUFFIXES)]
        for lora in kept:
            lora.apply_to()
            lora.train()
        params = [p for lora in kept for p in lora.parameters()]
        return params, len(kept)
    return attach


def _peft_attn(rank: int) -> Callable[[Any], tuple[Any, int]]:
    def attach(model: Any) -> tuple[Any, int]:
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(ATTN_TARGETS))
        model.unet.add_adapter(config)
        params = [p for p in model.unet.parameters() if p.requires_grad]
        modules = sum(1 for name, _ in model.unet.named_modules() if name.endswith(".lora_A"))
        return params, modules
    return attach


def row_builders(rank: int) -> dict[str, tuple[str, Callable[[Any], tuple[Any, int]] | None]]:
    return {
        "base": ("frozen UNet alone", None),
        "lora": ("networks.lora", _kohya_network("networks.lora", rank)),
        "dora": ("networks.lora dora_wd=True", _kohya_network("networks.lora", rank, dora_wd="True")),
        "loha": ("networks.lycoris_kohya algo=loha", _kohya_network("networks.lycoris_kohya", rank, algo="loha")),
        "lokr": ("networks.lycoris_kohya algo=lokr", _kohya_network("networks.lycoris_kohya", rank, algo="lokr")),
        "lora_attn": ("networks.lora on to_q/k/v/out.0", _lora_attn(rank)),
        "peft_attn": ("peft LoRA on to_q/k/v/out.0", _peft_attn(rank)),
    }


# --------------------------------------------------------------------------------------------------
# one step


def unet_inputs(unet: torch.nn.Module, resolution: int, batch: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    size = resolution // 8
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=g).requires_grad_(True),
        "timestep": torch.tensor([100, 700][:batch] + [500] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, text_dim, generator=g),
                              "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                                       dtype=torch.float32)},
        "target": torch.randn(batch, config.in_channels, size, size, generator=g),
    }


def step(unet: torch.nn.Module, inputs: dict[str, Any], params: list[torch.nn.Parameter]) -> float:
    """One forward + backward; returns the CPU time of the forward pass (loss included)."""
    kwargs = {k: v for k, v in inputs.items() if k != "target"}
    start = time.thread_time()
    loss = torch.nn.functional.mse_loss(unet(**kwargs).sample, inputs["target"])
    forward = time.thread_time() - start
    loss.backward()
    inputs["sample"].grad = None
    for p in params:
        p.grad = None
    return forward


def saved_for_backward_mib(unet: torch.nn.Module, inputs: dict[str, Any], params: list[torch.nn.Parameter]) -> float:
    """Activations autograd keeps for the backward, MiB: distinct storages, weights (frozen or trained) left out."""
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in [*unet.parameters(), *params]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    kwargs = {k: v for k, v in inputs.items() if k != "target"}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(**kwargs).sample
    del out
    return sum(storages.values()) / 2**20


def build_row_model(row: Row, attach: Callable[[Any], tuple[Any, int]] | None,
                    args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any], list[torch.nn.Parameter]]:
    """The tiny SDXL, frozen, with the row's network attached; its inputs; the trainable parameters."""
    model = build_tiny_model("sdxl")
    for module in (model.unet, *model.text_encoders):
        module.requires_grad_(False)
        module.eval()
    params: list[torch.nn.Parameter] = []
    if attach is not None:
        network, row.modules = attach(model)
        params = [p for p in (network if isinstance(network, list) else network.parameters()) if p.requires_grad]
        row.trainable_params = sum(p.numel() for p in params)
    return model.unet, unet_inputs(model.unet, args.resolution, args.batch), params


def measure(row: Row, attach: Callable[[Any], tuple[Any, int]] | None, args: argparse.Namespace) -> None:
    unet, inputs, params = build_row_model(row, attach, args)
    if row.saved_mib is None:
        row.saved_mib = round(saved_for_backward_mib(unet, inputs, params), 2)
    for _ in range(args.warmup):
        step(unet, inputs, params)
    cpu_times, wall_times, forward_times = [], [], []
    for _ in range(args.steps):
        c0, w0 = time.thread_time(), time.perf_counter()
        forward_times.append(step(unet, inputs, params))
        cpu_times.append(time.thread_time() - c0)
        wall_times.append(time.perf_counter() - w0)
    row.ms_per_step.append(1000 * statistics.median(cpu_times))
    row.wall_ms_per_step.append(1000 * statistics.median(wall_times))
    row.forward_ms.append(1000 * statistics.median(forward_times))


def measure_peak(row: Row, attach: Callable[[Any], tuple[Any, int]] | None, args: argparse.Namespace) -> None:
    """VmHWM over one step minus the RSS before it, median of 3 steps after a warm-up step; run in a fresh
    process started with glibc's mmap and trim thresholds fixed at 64 KiB (`peak_in_subprocess`)."""
    unet, inputs, params = build_row_model(row, attach, args)
    step(unet, inputs, params)
    for _ in range(3):
        if not reset_peak_rss():
            return
        start = _proc_status_kib("VmRSS")
        step(unet, inputs, params)
        row.peak_rss_delta_mib.append((_proc_status_kib("VmHWM") - start) / 1024)


def peak_in_subprocess(row: Row, args: argparse.Namespace) -> None:
    """A fresh process, so that no earlier row's freed memory is reused, with glibc handing every freed block
    of 64 KiB and up back to the kernel, so that RSS follows the live tensors."""
    import os
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--peak_of", row.name, "--resolution", str(args.resolution),
               "--batch", str(args.batch), "--rank", str(args.rank), "--threads", str(args.threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        row.peak_rss_delta_mib = json.loads(lines[-1])


def profile(name: str, attach: Callable[[Any], tuple[Any, int]] | None, args: argparse.Namespace) -> None:
    """torch.profiler over ``steps`` steps of one row: the ops by self CPU time, and the forward and backward
    passes as two labelled ranges (``forward``, ``backward``)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    unet, inputs, params = build_row_model(Row(name, name), attach, args)
    kwargs = {k: v for k, v in inputs.items() if k != "target"}
    for _ in range(args.warmup):
        step(unet, inputs, params)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            with record_function("forward"):
                loss = torch.nn.functional.mse_loss(unet(**kwargs).sample, inputs["target"])
            with record_function("backward"):
                loss.backward()
            inputs["sample"].grad = None
            for p in params:
                p.grad = None
    print(f"== {name}: {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


# --------------------------------------------------------------------------------------------------
# report


def environment() -> dict[str, Any]:
    import os

    return {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def markdown(rows: list[Row]) -> str:
    base = next((r for r in rows if r.name == "base" and r.ms_per_step), None)
    lines = ["| row | network | modules | trainable params | CPU ms/step (min–max) | overhead | forward CPU ms "
             "| forward overhead | wall ms/step | saved for backward MiB | step peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.what} | not available: {r.error} | | | | | | | | |")
            continue
        overhead = forward_overhead = ""
        if base is not None and r is not base:
            overhead = f"{100 * (r.median_ms / base.median_ms - 1):+.0f}%"
            forward_overhead = f"{100 * (statistics.median(r.forward_ms) / statistics.median(base.forward_ms) - 1):+.0f}%"
        rss = f"{statistics.median(r.peak_rss_delta_mib):.1f}" if r.peak_rss_delta_mib else "n/a"
        lines.append(f"| {r.name} | {r.what} | {r.modules} | {r.trainable_params} | {_spread(r.ms_per_step)} | "
                     f"{overhead} | {statistics.median(r.forward_ms):.1f} | {forward_overhead} | "
                     f"{statistics.median(r.wall_ms_per_step):.1f} | {r.saved_mib} | {rss} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=["base", "lora", "dora", "loha", "lokr", "lora_attn", "peft_attn"])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", metavar="ROW", help="profile this row (and base) instead of timing the rows")
    parser.add_argument("--profile_rows", type=int, default=25)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--peak_of", metavar="ROW", help=argparse.SUPPRESS)  # the memory pass's child process
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    builders = row_builders(args.rank)
    unknown = [name for name in [*args.rows, args.profile, args.peak_of] if name is not None and name not in builders]
    if unknown:
        print(f"error: --rows/--profile: unknown row {unknown[0]}; choose from {', '.join(builders)}", file=sys.stderr)
        return 2
    if args.peak_of:
        row = Row(args.peak_of, builders[args.peak_of][0])
        measure_peak(row, builders[args.peak_of][1], args)
        print(json.dumps(row.peak_rss_delta_mib))
        return 0
    if args.profile:
        for name in ("base", args.profile):
            profile(name, builders[name][1], args)
        return 0
    rows = [Row(name, builders[name][0]) for name in args.rows]
    for repeat in range(args.repeats):
        for row in rows:
            if row.error:
                continue
            try:
                measure(row, builders[row.name][1], args)
            except (ImportError, TypeError, ValueError, RuntimeError) as exc:  # a network this checkout lacks
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            else:
                print(f"repeat {repeat + 1}/{args.repeats} {row.name}: {row.ms_per_step[-1]:.1f} ms/step", flush=True)
    for row in rows:
        if not row.error:
            peak_in_subprocess(row, args)
    env = environment()
    print(json.dumps(env))
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
