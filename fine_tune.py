"""Fine-tune a whole SD1.x or SD2.x model: the UNet, and optionally its text encoder (train_sdxl.py for SDXL).

    accelerate launch fine_tune.py --pretrained_model_name_or_path sd15.safetensors \\
        --in_json meta.json --train_data_dir imgs --output_dir out --output_name my_model \\
        --learning_rate 2e-6 --max_train_steps 10000 --mixed_precision bf16 --gradient_checkpointing

kohya's flag names, ``--config_file`` and ``--dataset_config`` work as in sd-scripts' fine_tune.py (a DreamBooth
folder layout works too, as in its train_db.py). The result is saved in the input's format by default (a
single file loads in A1111/ComfyUI and diffusers' ``from_single_file``; a folder in ``from_pretrained``).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Sequence

from library.cli import config, full_fine_tune, script_flow
from library.cli.optim_args import add_ema_arguments, add_fused_backward_arguments
from library.cli.training_args import add_saving_arguments
from library.models.families import SD1, SD2
from library.training.loop import Callback


def add_fine_tune_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sd1.x / sd2.x fine-tuning")
    group.add_argument("--train_text_encoder", action="store_true", help="also train the text encoder")
    group.add_argument("--learning_rate_te", type=config.learning_rate, default=None,
                       help="text encoder learning rate (default --learning_rate; 0 freezes it)")


def build_parser() -> argparse.ArgumentParser:
    return script_flow.build_script_parser(__doc__, 2e-6, partial(add_saving_arguments, use_safetensors_flag=True),
                                           add_fine_tune_arguments,
                                           add_ema_arguments,
                                           add_fused_backward_arguments)


def fine_tune(args: argparse.Namespace, parser: argparse.ArgumentParser, *, callbacks: Sequence[Callback] = ()) -> int:
    return full_fine_tune.train_whole_model(args, parser, families=(SD1, SD2), text_encoder_lrs=(args.learning_rate_te,),
                                            project_name="finetune", callbacks=callbacks)


def main(argv: list[str] | None = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """``callbacks`` hook into the loop (tests, benchmarks): see library.training.loop.Callback."""
    return script_flow.run_main(build_parser(), partial(fine_tune, callbacks=callbacks), argv)


if __name__ == "__main__":
    sys.exit(main())
