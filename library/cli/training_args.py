"""The training-loop and saving flags, and the save settings the loop reads from them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from library.cli.config import add_validator, learning_rate, positive_int
from library.cli.start_args import add_start_position_arguments
from library.models.loading import is_single_file
from library.training.checkpoints import SINGLE_FILE_FORMATS, SaveSettings, TrainState
from library.training.output_checks import OutputOptions
from library.training.process_count import launched_processes
from library.training.resume import prepare_resume
from library.training.run_settings import run_settings
from library.training.training_metadata import MetadataFlags

MIXED_PRECISION_CHOICES: tuple[str, ...] = ("no", "fp16", "bf16")
LOG_WITH_CHOICES: tuple[str, ...] = ("tensorboard", "wandb", "all")
SAVE_MODEL_FORMATS: tuple[str, ...] = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
SAVE_PRECISION_CHOICES: tuple[str, ...] = ("float", "fp16", "bf16")
DEFAULT_LEARNING_RATE = 2e-6  # kohya's add_optimizer_arguments default
DEFAULT_OUTPUT_NAME = "last"  # the saved model's name without --output_name


def add_training_arguments(parser: argparse.ArgumentParser,
                           default_learning_rate: float = DEFAULT_LEARNING_RATE) -> None:
    """Length, optimiser, precision, logging and speed knobs of the training loop.

    `default_learning_rate` is a parameter because each script has its own sensible default (a LoRA wants a
    far larger one than a full fine-tune); pass it with functools.partial to `build_parser`.
    """
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default=None, help="where models, states and samples go")
    group.add_argument("--output_name", type=str, default=None, help="base name of saved files")
    group.add_argument("--seed", type=int, default=None, help="random seed")
    group.add_argument("--max_train_steps", type=positive_int, default=1600, help="optimizer steps to train")
    group.add_argument("--max_train_epochs", type=positive_int, default=None,
                       help="epochs to train; overrides --max_train_steps")
    group.add_argument("--learning_rate", type=learning_rate, default=default_learning_rate, help="learning rate")
    group.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                       help="batches accumulated per optimizer step")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in backward to save memory")
    group.add_argument("--mixed_precision", type=str, choices=MIXED_PRECISION_CHOICES, default="no",
                       help="autocast precision")
    group.add_argument("--full_fp16", action="store_true", help="keep the trained weights themselves in fp16")
    group.add_argument("--full_bf16", action="store_true", help="keep the trained weights themselves in bf16")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 disables")
    group.add_argument("--optimizer_type", type=str, default="AdamW",
                       help="optimizer name (AdamW, AdamW8bit, Lion, Adafactor, Prodigy, ...) or module.Class")
    group.add_argument("--optimizer_args", type=str, nargs="*", default=None,
                       help="optimizer keyword arguments as key=value, e.g. weight_decay=0.01 betas=0.9,0.999")
    group.add_argument("--lr_scheduler", type=str, default="constant",
                       help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, ...")
    group.add_argument("--lr_warmup_steps", type=str, default="0",
                       help="warm-up length: steps (100), a ratio of the training steps (0.1) or a percentage (10%%)")
    group.add_argument("--logging_dir", type=str, default=None, help="TensorBoard/wandb log folder")
    group.add_argument("--log_with", type=str, choices=LOG_WITH_CHOICES, default=None,
                       help="logger; default tensorboard when --logging_dir is given")
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the log run folder name")
    group.add_argument("--log_tracker_name", type=str, default=None, help="project name of the TensorBoard/wandb run")
    group.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention")
    group.add_argument("--xformers", action="store_true", help="xformers memory-efficient attention")
    group.add_argument("--mem_eff_attn", action="store_true", help="pure-PyTorch chunked attention (slow, small)")
    group.add_argument("--torch_compile", action="store_true", help="compile the model with torch.compile")
    group.add_argument("--dynamo_backend", type=str, default="inductor",
                       help="torch.compile backend when --torch_compile is set")
    add_validator(parser, _check_full_precision)
    add_validator(parser, _note_attention_precedence)


def add_saving_arguments(parser: argparse.ArgumentParser,
                         model_formats: Sequence[str] = SAVE_MODEL_FORMATS,
                         default_model_format: str | None = None, use_safetensors_flag: bool = False) -> None:
    """What is saved, in which format, and how often; and resuming from a saved state.

    The formats are parameters because a LoRA script saves files (ckpt/pt/safetensors, default safetensors)
    while full fine-tunes also save diffusers folders (default: same format as the input model);
    ``use_safetensors_flag`` adds kohya's --use_safetensors (sdxl_train has it).
    """
    group = parser.add_argument_group("saving")
    group.add_argument("--save_model_as", type=str, choices=tuple(model_formats), default=default_model_format,
                       help="file format of saved models")
    group.add_argument("--save_precision", type=str, choices=SAVE_PRECISION_CHOICES, default=None,
                       help="dtype of saved weights; default: the training dtype")
    group.add_argument("--save_every_n_steps", type=int, default=None, help="save every N steps")
    group.add_argument("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    group.add_argument("--save_last_n_steps", type=int, default=None,
                       help="keep only the saves of the last N steps")
    group.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    group.add_argument("--save_state", action="store_true",
                       help="also save the training state (optimizer, RNG, step) with each model save")
    group.add_argument("--save_state_on_train_end", action="store_true",
                       help="save the training state at the end of training")
    group.add_argument("--resume", type=str, default=None,
                       help="training state folder to resume from, or auto: the newest one in --output_dir")
    group.add_argument("--resume_ignore_changes", action="store_true",
                       help="resume even though the base model, network shape or dataset differ from the state's")
    group.add_argument("--save_last_n_steps_state", type=int, default=None,
                       help="keep only the state folders of the last N steps (default: --save_last_n_steps)")
    group.add_argument("--save_last_n_epochs_state", type=int, default=None,
                       help="keep only the last N epoch state folders (default: --save_last_n_epochs)")
    group.add_argument("--save_n_epoch_ratio", type=int, default=None,
                       help="save about N times over the run: sets --save_every_n_epochs to max(1, epochs // N), "
                            "replacing a --save_every_n_epochs given too (as kohya)")
    if use_safetensors_flag:
        group.add_argument("--use_safetensors", action="store_true",
                           help="save in safetensors: ckpt becomes safetensors and diffusers diffusers_safetensors. "
                                "Without --save_model_as this trainer already saves safetensors (kohya would write "
                                "a .ckpt for a single-file input), so then it changes nothing")
    add_start_position_arguments(group, parser)
    group.add_argument("--overwrite", action="store_true",
                       help="replace files of an earlier run in --output_dir (checked at start-up; without it an "
                            "existing output is an error, except the run's own later saves when resuming it)")


def _check_full_precision(args: argparse.Namespace) -> str | None:
    full_fp16, full_bf16 = getattr(args, "full_fp16", False), getattr(args, "full_bf16", False)
    if full_fp16 and full_bf16:
        return "--full_fp16 and --full_bf16 are exclusive: pick one"
    mixed = getattr(args, "mixed_precision", None)
    if full_fp16 and mixed != "fp16":
        return f"--full_fp16 needs --mixed_precision fp16 (got --mixed_precision {mixed})"
    if full_bf16 and mixed != "bf16":
        return f"--full_bf16 needs --mixed_precision bf16 (got --mixed_precision {mixed})"
    return None


# kohya's train_util.replace_unet_modules takes the first of these that is set (if/elif/elif).
ATTENTION_PRECEDENCE = ("mem_eff_attn", "xformers", "sdpa")


def attention_flag_in_use(args: argparse.Namespace) -> str | None:
    """The attention flag the UNet uses: the first set one in kohya's order, or None (diffusers' default)."""
    return next((name for name in ATTENTION_PRECEDENCE if getattr(args, name, False)), None)


def _note_attention_precedence(args: argparse.Namespace) -> None:
    """Several attention flags (kohya_ss GUI presets set mem_eff_attn next to xformers or sdpa): kohya runs with
    the first in its order and so do we; a note names the one used instead of a refusal."""
    chosen = [name for name in ATTENTION_PRECEDENCE if getattr(args, name, False)]
    if len(chosen) > 1:
        print(f"note: --{' and --'.join(chosen)} are set together: using --{chosen[0]} (kohya's order: "
              "mem_eff_attn, then xformers, then sdpa)")
    return None


def save_settings_from_args(args: argparse.Namespace, extension: str, num_epochs: int | None = None) -> SaveSettings:
    """When and under which names the run saves, from the --save_* flags (0 and None both mean off).

    --save_n_epoch_ratio needs the run's epoch count: ``num_epochs`` once the plan is made, else
    --max_train_epochs (before the plan, the start-up checks know epoch saves only with that flag)."""
    output_name = args.output_name or DEFAULT_OUTPUT_NAME
    return SaveSettings(
        output_dir=Path(args.output_dir), output_name=output_name, extension=extension,
        every_n_steps=args.save_every_n_steps or None,
        every_n_epochs=ratio_save_every_n_epochs(args, num_epochs or args.max_train_epochs) or args.save_every_n_epochs or None,
        last_n_steps=args.save_last_n_steps or None, last_n_epochs=args.save_last_n_epochs or None,
        save_state=bool(args.save_state), save_state_on_train_end=bool(args.save_state_on_train_end),
        last_n_steps_state=getattr(args, "save_last_n_steps_state", None) or None,
        last_n_epochs_state=getattr(args, "save_last_n_epochs_state", None) or None,
    )


def ratio_save_every_n_epochs(args: argparse.Namespace, num_epochs: int | None) -> int | None:
    """kohya's --save_n_epoch_ratio N: an epoch save every max(1, epochs // N) epochs (None: flag unset or
    epoch count not known yet)."""
    ratio = getattr(args, "save_n_epoch_ratio", None)
    if not ratio or ratio <= 0 or not num_epochs:
        return None
    return max(1, num_epochs // ratio)


def planned_extension(args: argparse.Namespace) -> str:
    """The saved model's suffix ("" for a diffusers folder), as the scripts choose it: --save_model_as, else the
    input's format (train_sdxl; train_network and train_controlnet default to safetensors)."""
    fmt = args.save_model_as
    if not fmt:
        fmt = "safetensors" if is_single_file(str(args.pretrained_model_name_or_path or "")) else "diffusers"
    return SINGLE_FILE_FORMATS.get(with_use_safetensors(args, fmt), "")


def with_use_safetensors(args: argparse.Namespace, save_format: str) -> str:
    """kohya's --use_safetensors: a ckpt is written as safetensors, a diffusers folder with safetensors weights."""
    if not getattr(args, "use_safetensors", False):
        return save_format
    return {"ckpt": "safetensors", "diffusers": "diffusers_safetensors"}.get(save_format, save_format)


def output_options_from_args(args: argparse.Namespace) -> OutputOptions:
    """What the start-up output checks compare against the files already in --output_dir."""
    return OutputOptions(
        output_name=args.output_name, output_dir=args.output_dir,
        save=save_settings_from_args(args, planned_extension(args)) if args.output_dir else None,
        overwrite=bool(getattr(args, "overwrite", False)), resume=args.resume,
        max_train_steps=args.max_train_steps, max_train_epochs=args.max_train_epochs,
        raw_ema_copy=bool(getattr(args, "use_ema", False) and getattr(args, "save_raw_too", False)),
        unet_decoder_copy=bool(getattr(args, "train_unet_decoder", False)),
    )


def resume_from_args(args: argparse.Namespace, printer: Any = print) -> TrainState | None:
    """`prepare_resume` for these flags, its decision written back into the flags: ``--resume auto`` becomes the
    folder found (or None), --seed the state's and, for a state of another process count,
    --gradient_accumulation_steps the one that keeps its global batch, so what is logged and saved says what the
    run used. With --resume_from_huggingface the Hub state is downloaded first and --resume becomes its local
    folder."""
    from library.cli.hub_args import hub_resume_folder

    downloaded = hub_resume_folder(args)
    if downloaded is not None:
        args.resume = downloaded
    decision = prepare_resume(
        output_dir=getattr(args, "output_dir", None), output_name=getattr(args, "output_name", None),
        resume=getattr(args, "resume", None),
        settings=run_settings(vars(args)) if getattr(args, "resume", None) else {},
        ignore_changes=bool(getattr(args, "resume_ignore_changes", False)), printer=printer,
        num_processes=launched_processes())
    if decision.folder != getattr(args, "resume", None):
        args.resume = decision.folder
    if decision.gradient_accumulation_steps is not None:  # a state of another process count: its global batch kept
        args.gradient_accumulation_steps = decision.gradient_accumulation_steps
    if decision.state is not None:
        args.seed = decision.state.seed
    return decision.state


def metadata_flags_from_args(args: argparse.Namespace) -> MetadataFlags:
    """The flags recorded in the ``ss_*`` metadata; a flag this script lacks keeps its default."""
    values = {f.name: getattr(args, f.name, f.default) for f in fields(MetadataFlags)}
    values["cache_latents"] = getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False)
    return MetadataFlags(**values)
