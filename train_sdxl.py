"""Fine-tune a whole SDXL model: the UNet, and optionally both text encoders.

    accelerate launch train_sdxl.py --pretrained_model_name_or_path sdxl.safetensors \\
        --in_json meta.json --train_data_dir imgs --output_dir out --output_name my_model \\
        --learning_rate 1e-6 --max_train_steps 10000 --mixed_precision bf16 --gradient_checkpointing

kohya's flag names, ``--config_file`` and ``--dataset_config`` work as in sd-scripts' sdxl_train.py. The
result is saved in the input's format by default (a single file loads in A1111/ComfyUI and diffusers'
``from_single_file``; a folder in ``from_pretrained``).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Sequence

from library.cli import config, full_fine_tune, script_flow
from library.cli.optim_args import add_ema_arguments, add_fused_backward_arguments, check_block_lr_flag
from library.cli.training_args import add_saving_arguments
from library.models.families import SDXL
from library.models.sdxl_blocks import parse_block_lr
from library.training.loop import Callback


def add_sdxl_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sdxl fine-tuning")
    group.add_argument("--train_text_encoder", action="store_true", help="also train both text encoders")
    group.add_argument("--learning_rate_te1", type=config.learning_rate, default=None,
                       help="text encoder 1 learning rate (default --learning_rate; 0 freezes it)")
    group.add_argument("--learning_rate_te2", type=config.learning_rate, default=None,
                       help="text encoder 2 learning rate (default --learning_rate; 0 freezes it)")
    group.add_argument("--block_lr", type=str, default=None,
                       help="23 comma-separated UNet learning rates: 0 time/label embedding, 1-9 input blocks, "
                            "10-12 middle, 13-21 output blocks, 22 out; 0 freezes a block")
    config.add_validator(parser, check_block_lr_flag)


def build_parser() -> argparse.ArgumentParser:
    return script_flow.build_script_parser(__doc__, 1e-6, partial(add_saving_arguments, use_safetensors_flag=True),
                                           add_sdxl_arguments,
                                           add_ema_arguments,
                                           partial(add_fused_backward_arguments, optimizer_groups_flag=True))


def train_sdxl(args: argparse.Namespace, parser: argparse.ArgumentParser, *, callbacks: Sequence[Callback] = ()) -> int:
    block_lrs = parse_block_lr(args.block_lr) if args.block_lr else None  # a bad --block_lr before any loading
    return full_fine_tune.train_whole_model(args, parser, families=(SDXL,),
                                            text_encoder_lrs=(args.learning_rate_te1, args.learning_rate_te2),
                                            block_lrs=block_lrs, project_name="sdxl_finetune", callbacks=callbacks)


def main(argv: list[str] | None = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """``callbacks`` hook into the loop (tests, benchmarks): see library.training.loop.Callback."""
    return script_flow.run_main(build_parser(), partial(train_sdxl, callbacks=callbacks), argv)


if __name__ == "__main__":
    sys.exit(main())
