"""A tiny multi-process training run, launched by tests/test_accelerate_utils.py under `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 ... tests/helpers/ddp_probe.py OUT_DIR [--deepspeed ...]

Each rank trains the same nn.Linear for STEPS AdamW steps on its OWN data (rank-dependent inputs and
targets) through build_accelerator + prepare_for_deepspeed, exactly as a training script would, and writes
OUT_DIR/rank<i>.json. If gradients are averaged, every rank ends with the weights that one process gets by
training on all ranks' batches at once; `train_reference` computes those in-process for the test.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from library.training.accelerate_utils import (
    broadcast_seed,
    build_accelerator,
    gather_state_dict,
    prepare_for_deepspeed,
)
from library.cli.accelerate_args import accelerator_options_from_args, add_accelerate_arguments
from library.cli.config import build_parser, parse_args
from library.cli.data_args import add_dataset_arguments
from library.cli.training_args import add_training_arguments

STEPS = 3
BATCH = 4
LEARNING_RATE = 0.1
WEIGHT_DECAY = 0.01
INITIAL_WEIGHT = (0.1, -0.2, 0.3, -0.4)
INITIAL_BIAS = 0.05


def build_model() -> nn.Linear:
    """The same starting weights in every process, without touching the global RNG."""
    model = nn.Linear(len(INITIAL_WEIGHT), 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([INITIAL_WEIGHT]))
        model.bias.fill_(INITIAL_BIAS)
    return model


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def rank_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets that differ per rank, so unsynchronised ranks would drift apart."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, len(INITIAL_WEIGHT), generator=generator)
    y = x.sum(dim=1, keepdim=True) * (rank + 1) + rank
    return x, y


def train_reference(ranks: Sequence[int], max_grad_norm: float) -> dict[str, list]:
    """One process, one batch made of the given ranks' batches: the mean loss over all of them.

    With equal per-rank batch sizes its gradient is the average of the per-rank gradients, which is what
    DDP all-reduce and ZeRO reduce-scatter compute.
    """
    model = build_model()
    optimizer = make_optimizer(model.parameters())
    for step in range(STEPS):
        batches = [rank_batch(rank, step) for rank in ranks]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return {"weight": model.weight.detach().flatten().tolist(), "bias": model.bias.detach().tolist()}


def main(argv: Sequence[str]) -> None:
    out_dir = Path(argv[0])
    parser = build_parser("ddp probe", add_dataset_arguments, add_training_arguments, add_accelerate_arguments)
    args = parse_args(parser, list(argv[1:]))
    accelerator = build_accelerator(accelerator_options_from_args(args))
    seed = broadcast_seed(accelerator, args.seed)

    model = build_model()
    prepared = prepare_for_deepspeed(accelerator, {"linear": model}, make_optimizer(model.parameters()))
    for step in range(STEPS):
        x, y = (t.to(accelerator.device) for t in rank_batch(accelerator.process_index, step))
        with prepared.autocast():
            prediction = prepared.models["linear"](x)
        loss = nn.functional.mse_loss(prediction.float(), y)
        prepared.backward(loss)
        prepared.clip_grad_norm(args.max_grad_norm)
        prepared.optimizer.step()
        prepared.optimizer.zero_grad()

    state = gather_state_dict(accelerator, prepared.models["linear"])
    result = {
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "distributed_type": str(accelerator.distributed_type),
        "deepspeed": prepared.uses_deepspeed,
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if prepared.uses_deepspeed else None,
        "seed": seed,
        "weight": state["weight"].float().flatten().tolist(),
        "bias": state["bias"].float().tolist(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
