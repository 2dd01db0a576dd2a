"""Memory per process of full-size SDXL fine-tuning sharded with DeepSpeed ZeRO-3 or FSDP2 (a GPU machine).

    accelerate launch --num_processes N bench/sharded_step.py --mode zero3|zero3_offload|fsdp|fsdp_offload|ddp
        [--resolution 1024] [--warmup 1] [--steps 3] [--json OUT]
    # one GPU: accelerate launch --num_processes 1 --use_deepspeed --zero_stage 3 bench/sharded_step.py --mode zero3

The rows of bench/train_step.py's ``--full_size`` fine-tune setup, but through the same Accelerator and prepare
path the scripts use (library.training.accelerate_utils.build_accelerator / prepare_for_deepspeed with the
options ``--deepspeed --zero_stage 3 [--offload_param_device cpu --offload_optimizer_device cpu]`` or ``--fsdp
[--fsdp_offload_params]`` give): the random-init full-size SDXL UNet (fp32 master weights, bf16 autocast, every
weight trains, AdamW), one step = UNet forward at --resolution on random latents and text embeddings, MSE,
backward, clipping to 1.0, optimizer step. Each rank reports ``torch.cuda.max_memory_allocated`` over the steps
("step peak"), and then over one save-time gather of the complete weights
(library.training.sharded_state.complete_weights, which the scripts run at every save) ("save peak"), plus
the seconds that gather took. Rank 0 prints one markdown row per rank and writes --json.

With N processes the sharded states are cut N ways: the per-process step peak is what tells whether a run
fits a card. ``ddp`` is the unsharded reference (every rank holds everything). Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.train_step import build_full_size_unet, random_unet_inputs, unet_loss
from library.training import sharded_state
from library.training.accelerate_utils import (
    AcceleratorOptions,
    build_accelerator,
    prepare_for_deepspeed,
)

MODES = {
    "ddp": {},
    "zero3": {"deepspeed": True, "zero_stage": 3},
    "zero3_offload": {"deepspeed": True, "zero_stage": 3, "offload_param_device": "cpu",
                      "offload_optimizer_device": "cpu"},
    "fsdp": {"fsdp": True},
    "fsdp_offload": {"fsdp": True, "fsdp_offload_params": True},
}


def gib(value: float) -> float:
    return round(value / 2**30, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(MODES), required=True)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/sharded_step.py measures GPU memory per process: run it on a GPU machine")

    options = AcceleratorOptions(mixed_precision="bf16", max_grad_norm=1.0, train_batch_size=1, **MODES[args.mode])
    accelerator = build_accelerator(options)
    device = accelerator.device
    unet = build_full_size_unet(device, torch.float32).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    prepared = prepare_for_deepspeed(accelerator, {"unet": unet}, optimizer)
    model = prepared.models["unet"]
    inputs = random_unet_inputs(unet, args.resolution, 1, device, torch.bfloat16)

    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        with prepared.autocast():
            loss = unet_loss(model, inputs, device, torch.bfloat16)
        prepared.backward(loss)
        prepared.clip_grad_norm(1.0)
        prepared.optimizer.step()
        prepared.optimizer.zero_grad()
        torch.cuda.synchronize(device)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    step_peak = torch.cuda.max_memory_allocated(device)

    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with sharded_state.complete_weights(accelerator, [unet]):
        accelerator.wait_for_everyone()
    gather_s = time.perf_counter() - start
    save_peak = torch.cuda.max_memory_allocated(device)

    row = {"mode": args.mode, "processes": accelerator.num_processes, "rank": accelerator.process_index,
           "resolution": args.resolution, "step_s": round(sorted(times)[len(times) // 2], 3),
           "step_peak_gib": gib(step_peak), "save_peak_gib": gib(save_peak), "gather_s": round(gather_s, 2),
           "gpu": torch.cuda.get_device_name(device)}
    rows = [None] * accelerator.num_processes
    if accelerator.num_processes > 1:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    if accelerator.is_main_process:
        print("| mode | processes | rank | s/step | step peak GiB | save peak GiB | gather s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['mode']} | {r['processes']} | {r['rank']} | {r['step_s']} | {r['step_peak_gib']} | "
                  f"{r['save_peak_gib']} | {r['gather_s']} |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
