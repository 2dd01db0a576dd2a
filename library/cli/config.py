"""Command-line arguments shared by the training scripts, and the `--config_file` TOML merged under them.

Each script builds one parser from the `add_*_arguments` groups below (kohya's flag names, types and
defaults, because our users bring their command lines and TOML files with them) and calls `parse_args`.

`--config_file x.toml` behaves like kohya's: tables are flattened, keys are argparse dest names, and the
precedence is explicit CLI > file > defaults. Unlike kohya we validate every file value exactly as argparse
would validate the same text on the command line (type, choices, booleans, lists), reject unknown keys with a
suggestion, and reject a key given two different values in two tables, so a typo fails at start-up instead of
silently training with a default.

Cross-flag rules ("pick one attention backend") are validators registered on the parser by the group that
owns the flags; `parse_args` runs them after the merge, so they see the values from the file too.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import toml

from library.data.captions import CAPTION_TAG_MODES

# A validator looks at the merged namespace and returns an error message (naming the flags involved as
# `--flag`) or None when the values are fine.
Validator = Callable[[argparse.Namespace], str | None]

FAMILY_CHOICES: tuple[str, ...] = ("sd15", "sd21", "sdxl")
MIXED_PRECISION_CHOICES: tuple[str, ...] = ("no", "fp16", "bf16")
LOG_WITH_CHOICES: tuple[str, ...] = ("tensorboard", "wandb", "all")
SAVE_MODEL_FORMATS: tuple[str, ...] = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")
SAVE_PRECISION_CHOICES: tuple[str, ...] = ("float", "fp16", "bf16")
TOKEN_CHUNK = 75  # tokens per CLIP chunk without BOS/EOS; --max_token_length is a multiple of it
DEFAULT_LEARNING_RATE = 2e-6  # kohya's add_optimizer_arguments default

# `--output_config` given without a PATH: write to the --config_file path (kohya's behaviour).
OUTPUT_TO_CONFIG_FILE = ""
# Keys that only steer the config machinery itself; they are neither read from nor written to a file.
_CONFIG_DESTS = frozenset({"config_file", "output_config"})


class TrainingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that also carries the cross-flag validators its argument groups registered.

    Keeping the validators on the parser (not in a module-level registry) lets two scripts, or two tests,
    build different parsers in one process without seeing each other's rules.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validators: list[Validator] = []

    def error(self, message: str) -> Any:
        """One line naming the flag, not argparse's full usage: these parsers have hundreds of flags, and the
        usage dump buried the one line that mattered."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_validator(parser: argparse.ArgumentParser, validator: Validator) -> None:
    """Register a cross-flag rule that `parse_args` checks after merging the config file and the CLI.

    Works on a plain ArgumentParser too (the list is attached on first use), so a group function can be
    reused on any parser.
    """
    validators = getattr(parser, "validators", None)
    if validators is None:
        validators = []
        parser.validators = validators  # type: ignore[attr-defined]
    validators.append(validator)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size), with the same message on the CLI and in a file."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a step, a pixel tolerance)."""
    return _int_at_least(text, 0)


FLOAT32_MAX = 3.4028234663852886e38


def learning_rate(text: str) -> float:
    """argparse type: a finite learning rate >= 0 that fits in float32.

    Optimizers keep the rate next to fp32 weights: 1e39 becomes inf there and every weight NaN at step 1, and a
    negative rate climbs the loss; both are refused before any work instead.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value != value or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 freezes), got {text}")
    if value > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text} overflows float32 (max 3.4e38); learning rates are usually "
                                         "1e-7 to 1e-3")
    return value


# --------------------------------------------------------------------------------------------------------
# Argument groups
# --------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Which base model to load and how its text encoders read prompts."""
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="base model: a diffusers folder, a single .safetensors/.ckpt file, or a hub id")
    group.add_argument("--vae", type=str, default=None, help="VAE to use instead of the model's own")
    group.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    group.add_argument("--v_parameterization", action="store_true",
                       help="train with v-prediction (SD 2.x 768-v models)")
    group.add_argument("--family", type=str, choices=FAMILY_CHOICES, default=None,
                       help="model family; default: detected from the checkpoint")
    group.add_argument("--clip_skip", type=int, default=None,
                       help="use the output of the n-th last text-encoder layer (2 for many anime models)")
    group.add_argument("--max_token_length", type=int, default=None,
                       help="prompt length in tokens, a multiple of 75 (75, 150, 225, ...); default 75")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None,
                       help="accepted for compatibility with kohya; tokenizers are bundled and never downloaded")
    group.add_argument("--no_half_vae", action="store_true",
                       help="keep the VAE in fp32 under mixed precision (the SDXL VAE overflows in fp16)")
    add_validator(parser, _check_max_token_length)


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the images come from and how they are batched and augmented (the basic kohya flags)."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="folder of training images (DreamBooth '<repeats>_<name>' subfolders or a fine-tune folder)")
    group.add_argument("--reg_data_dir", type=str, default=None, help="folder of regularisation images")
    group.add_argument("--in_json", type=str, default=None, help="metadata JSON for fine-tuning datasets")
    group.add_argument("--dataset_config", type=str, default=None,
                       help="dataset config TOML ([general]/[[datasets]]/[[datasets.subsets]])")
    group.add_argument("--resolution", type=str, default=None,
                       help="training resolution: 'SIZE' or 'WIDTH,HEIGHT', e.g. 512 or 512,768")
    group.add_argument("--train_batch_size", type=int, default=1, help="batch size per device")
    group.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption files")
    group.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    group.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    group.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    group.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    group.add_argument("--bucket_no_upscale", action="store_true", help="never upscale an image to fit a bucket")
    group.add_argument("--shuffle_caption", action="store_true", help="shuffle the separated caption tokens")
    group.add_argument("--keep_tokens", type=int, default=0,
                       help="keep the first N caption tokens in place when shuffling")
    group.add_argument("--caption_separator", type=str, default=",", help="separator of caption tokens")
    group.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    group.add_argument("--color_aug", action="store_true", help="random hue shifts (disables latent caching)")
    group.add_argument("--random_crop", action="store_true", help="random instead of centre crops")
    group.add_argument("--dataset_repeats", type=int, default=1,
                       help="repeats per epoch of a subset that sets no num_repeats (fine-tune datasets)")
    group.add_argument("--keep_tokens_separator", type=str, default="",
                       help="marker splitting a caption into fixed head / shuffled middle / fixed tail, e.g. '|||'")
    group.add_argument("--secondary_separator", type=str, default=None,
                       help="separator that joins tokens into one unit when shuffling; replaced by "
                            "--caption_separator afterwards, e.g. ';;;'")
    group.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    group.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    group.add_argument("--enable_wildcard", action="store_true",
                       help="'{a|b|c}' picks one choice; a multi-line caption picks one random line")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0,
                       help="probability of training a sample with an empty caption")
    group.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                       help="train with empty captions every N-th epoch (0: off)")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                       help="probability of dropping each shuffled caption token")
    group.add_argument("--token_warmup_min", type=int, default=1,
                       help="caption tokens kept at step 0 of token warm-up")
    group.add_argument("--token_warmup_step", type=float, default=0,
                       help="token warm-up length: steps (>= 1) or a fraction of the training steps (< 1); 0: off")
    group.add_argument("--caption_tag_mode", type=str, choices=CAPTION_TAG_MODES, default="concat",
                       help="how a metadata caption and its tags are combined")
    group.add_argument("--alpha_mask", action="store_true",
                       help="use the image's alpha channel as the loss mask")
    group.add_argument("--conditioning_data_dir", type=str, default=None,
                       help="ControlNet conditioning images (same file names as the --train_data_dir images)")
    group.add_argument("--prior_loss_weight", type=float, default=1.0,
                       help="loss weight of regularisation images")
    group.add_argument("--validation_split", type=float, default=0.0,
                       help="fraction of each dataset held out for validation (0: none)")
    group.add_argument("--validation_seed", type=int, default=None,
                       help="seed of the validation split shuffle; default: the training --seed")
    group.add_argument("--max_data_loader_n_workers", type=int, default=8,
                       help="data loader worker processes (at most the CPU count)")
    group.add_argument("--persistent_data_loader_workers", action="store_true",
                       help="keep data loader workers alive between epochs")
    group.add_argument("--cache_latents", action="store_true",
                       help="encode every image once at start-up and train on the cached latents (kept for "
                            "this run only; not with random_crop or color_aug)")
    group.add_argument("--cache_latents_to_disk", action="store_true",
                       help="like --cache_latents (implies it), but keep the latents as "
                            "'<stem>_<W>x<H>_sd(xl).npz' beside the images, reused by later runs and by kohya")
    group.add_argument("--vae_batch_size", type=positive_int, default=1,
                       help="images per VAE batch when caching latents")
    group.add_argument("--skip_cache_check", action="store_true",
                       help="trust existing latent cache files without checking them (faster start-up; a "
                            "changed image is then not noticed)")
    group.add_argument("--cache_text_encoder_outputs", action="store_true",
                       help="encode every caption once at start-up and train on the cached text-encoder outputs "
                            "(kept for this run only; captions must not change between draws)")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                       help="like --cache_text_encoder_outputs (implies it), but keep the outputs in "
                            "--text_encoder_cache_dir for later runs")
    group.add_argument("--text_encoder_cache_dir", type=str, default=None,
                       help="folder of the text-encoder output cache on disk; default: '.te_cache' inside the "
                            "first subset's image folder (or its metadata file's folder)")


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
    add_validator(parser, _check_one_attention_backend)


def add_saving_arguments(parser: argparse.ArgumentParser,
                         model_formats: Sequence[str] = SAVE_MODEL_FORMATS,
                         default_model_format: str | None = None) -> None:
    """What is saved, in which format, and how often; and resuming from a saved state.

    The formats are parameters because a LoRA script saves files (ckpt/pt/safetensors, default safetensors)
    while full fine-tunes also save diffusers folders (default: same format as the input model).
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
    group.add_argument("--overwrite", action="store_true",
                       help="replace files of an earlier run in --output_dir (checked at start-up; without it an "
                            "existing output is an error, except the run's own later saves when resuming it)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config_file` and `--output_config`; `build_parser` adds them to every parser."""
    group = parser.add_argument_group("config")
    group.add_argument("--config_file", type=str, default=None,
                       help="TOML file of arguments (keys are the flag names without '--'; '.toml' may be omitted). "
                            "Flags given on the command line win over the file.")
    group.add_argument("--output_config", type=str, nargs="?", const=OUTPUT_TO_CONFIG_FILE, default=None,
                       metavar="PATH",
                       help="write the effective non-default arguments as TOML to PATH (default: the "
                            "--config_file path) and exit; never overwrites an existing file")


def build_parser(description: str,
                 *group_adders: Callable[[argparse.ArgumentParser], None]) -> TrainingArgumentParser:
    """One parser for one script, composed of the shared groups plus the config-file flags.

    Script-specific flags can be added to the returned parser (ideally in a named argument group, so that
    `--output_config` files them under a table of that name).
    """
    parser = TrainingArgumentParser(description=description)
    for add in group_adders:
        add(parser)
    if "config_file" not in {action.dest for action in parser._actions}:
        add_config_arguments(parser)
    return parser


# --------------------------------------------------------------------------------------------------------
# Cross-flag rules
# --------------------------------------------------------------------------------------------------------


def _check_max_token_length(args: argparse.Namespace) -> str | None:
    value = getattr(args, "max_token_length", None)
    if value is None or (value > 0 and value % TOKEN_CHUNK == 0):
        return None
    return (f"--max_token_length must be a positive multiple of {TOKEN_CHUNK} (75, 150, 225, 300, ...), "
            f"got {value}")


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


def _check_one_attention_backend(args: argparse.Namespace) -> str | None:
    chosen = [f"--{name}" for name in ("xformers", "sdpa", "mem_eff_attn") if getattr(args, name, False)]
    if len(chosen) > 1:
        return f"--xformers/--sdpa/--mem_eff_attn: pick one (got {' and '.join(chosen)})"
    return None


# --------------------------------------------------------------------------------------------------------
# Parsing with a config file
# --------------------------------------------------------------------------------------------------------


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) with the `--config_file` values merged under it, then validate.

    Precedence is explicit CLI > file > argparse defaults; a flag typed on the command line wins even when
    it equals its default. With `--output_config` the merged non-default values are written as TOML and
    the process exits with status 0. Every problem ends in `parser.error` (exit status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # First pass: the command line alone, to validate it and learn --config_file / --output_config.
    cli = parser.parse_args(argv)
    config_file: str | None = getattr(cli, "config_file", None)
    output_config: str | None = getattr(cli, "output_config", None)

    output_path = None
    if output_config is not None:
        output_path = _output_path(parser, output_config, config_file)

    file_values: dict[str, Any] = {}
    config_path = None
    # `--output_config` without PATH writes to the --config_file path; kohya then treats that file as the
    # destination, not a source, so a missing file there is expected.
    if config_file is not None and output_config != OUTPUT_TO_CONFIG_FILE:
        config_path = _resolve_config_path(parser, config_file)
        file_values = _read_config_file(parser, config_path)

    # Second pass: argparse only fills defaults for attributes missing from the namespace, and every flag
    # on the command line overwrites its attribute, which gives exactly CLI > file > default.
    args = parser.parse_args(argv, namespace=argparse.Namespace(**file_values))

    for validator in getattr(parser, "validators", []):
        message = validator(args)
        if message:
            parser.error(_with_file_provenance(message, args, file_values, config_path))

    if output_path is not None:
        _write_output_config(parser, args, output_path)
        print(f"wrote the configuration to {output_path}")
        parser.exit(0)
    return args


def _resolve_config_path(parser: argparse.ArgumentParser, config_file: str) -> str:
    if os.path.isfile(config_file):
        return config_file
    if not config_file.endswith(".toml") and os.path.isfile(config_file + ".toml"):
        return config_file + ".toml"
    tried = "" if config_file.endswith(".toml") else f" (nor '{config_file}.toml')"
    parser.error(f"config file '{config_file}' not found{tried}: check the --config_file path")


def _output_path(parser: argparse.ArgumentParser, output_config: str, config_file: str | None) -> str:
    if output_config == OUTPUT_TO_CONFIG_FILE:
        if config_file is None:
            parser.error("--output_config needs a PATH or a --config_file to write to: "
                         "give --output_config PATH.toml")
        path = config_file if config_file.endswith(".toml") else config_file + ".toml"
    else:
        path = output_config
    if os.path.exists(path):
        parser.error(f"--output_config will not overwrite the existing file '{path}': "
                     "give a new path with --output_config PATH.toml or move the file away")
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        parser.error(f"--output_config cannot write '{path}': the folder '{directory}' does not exist")
    return path


def _read_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Load, flatten and validate a config file into {dest: value converted as argparse would}."""
    try:
        with open(path, encoding="utf-8") as f:
            document = toml.load(f)
    except toml.TomlDecodeError as e:
        parser.error(f"config file '{path}' is not valid TOML ({e}): fix the syntax")
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"config file '{path}' cannot be read ({e})")

    occurrences: dict[str, list[tuple[str, Any]]] = {}
    _flatten(document, "", occurrences)

    for key, places in occurrences.items():
        for (table_a, value_a), (table_b, value_b) in zip(places, places[1:]):
            if value_a != value_b:
                parser.error(f"config file '{path}': key '{key}' is set to {_toml_repr(value_a)} in "
                             f"{_table_name(table_a)} and to {_toml_repr(value_b)} in {_table_name(table_b)}; "
                             "keep only one")

    actions = _settable_actions(parser)
    machinery = sorted(k for k in occurrences if k in _CONFIG_DESTS)
    if machinery:
        parser.error(f"config file '{path}': {', '.join(machinery)} cannot be set inside a config file; "
                     "give it on the command line")
    unknown = [k for k in occurrences if k not in actions and k not in _CONFIG_DESTS]
    if unknown:
        candidates = [d for d in actions if d not in _CONFIG_DESTS]
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), candidates, n=1, cutoff=0.6)
            described.append(f"{key} (did you mean --{close[0]}?)" if close else key)
        parser.error(f"config file '{path}' has unknown key{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(described)}: keys are the flag names without the leading '--', "
                     "fix or remove them")

    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, places in occurrences.items():
        raw = places[0][1]
        try:
            values[key] = _convert(actions[key], raw)
        except _BadValue as e:
            problems.append(f"{key} = {_toml_repr(raw)} {e}")
    if problems:
        many = len(problems) > 1
        parser.error(f"config file '{path}' has {'invalid values' if many else 'an invalid value'}: "
                     f"{'; '.join(problems)}; fix {'them' if many else 'it'} in the file")
    return values


def _flatten(table: dict[str, Any], table_path: str, out: dict[str, list[tuple[str, Any]]]) -> None:
    """Collect every non-table value with the table it sits in; section names carry no meaning (kohya)."""
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, f"{table_path}.{key}" if table_path else key, out)
        else:
            out.setdefault(key, []).append((table_path, value))


def _table_name(table_path: str) -> str:
    return f"[{table_path}]" if table_path else "the top level"


def _settable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> the action that sets it, for every action a config file may set (not --help/--version)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest == argparse.SUPPRESS:
            continue
        actions.setdefault(action.dest, action)
    return actions


class _BadValue(ValueError):
    """A config-file value argparse would reject; the message completes '<key> = <value> ...'."""


def _convert(action: argparse.Action, raw: Any) -> Any:
    """Turn a TOML value into what argparse would store for the same value typed on the command line."""
    if action.nargs == 0:  # flags: store_true/false/const, count, BooleanOptionalAction
        if isinstance(action, argparse._CountAction):
            if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
                return raw
            raise _BadValue("is not a count: write a non-negative integer")
        if isinstance(action.const, bool) or isinstance(action, argparse.BooleanOptionalAction):
            if isinstance(raw, bool):
                return raw
            raise _BadValue("is not a boolean: write true or false, without quotes")
        if raw == action.const or raw == action.default:
            return raw
        raise _BadValue(f"must be {_toml_repr(action.const)} (set) or {_toml_repr(action.default)} (unset)")

    appends = isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
    if appends or action.nargs not in (None, "?"):  # the command line would give a list
        if isinstance(raw, list):
            items = raw
        elif appends or action.nargs in ("*", "+", 1):
            items = [raw]  # a lone value is a one-element list
        else:
            raise _BadValue(f"is not an array: write {action.nargs} values as [ ... ]")
        if action.nargs == "+" and not items:
            raise _BadValue("is an empty array: give at least one value")
        if isinstance(action.nargs, int) and not appends and len(items) != action.nargs:
            raise _BadValue(f"has {len(items)} values: give exactly {action.nargs}")
        return [_convert_scalar(action, item) for item in items]

    return _convert_scalar(action, raw)


def _convert_scalar(action: argparse.Action, raw: Any) -> Any:
    expected = _expected(action)
    if isinstance(raw, dict):
        raise _BadValue(f"is a table: expected {expected}")
    if isinstance(raw, list):
        raise _BadValue(f"is an array: expected a single value, {expected}")
    if isinstance(raw, bool):  # checked before int: bool is an int subclass
        raise _BadValue(f"is a boolean: expected {expected}")
    if not isinstance(raw, (str, int, float)):  # TOML dates and times
        raise _BadValue(f"is a {type(raw).__name__}: expected {expected}")
    if action.type is int and isinstance(raw, float):  # int("1.5") fails on the command line too
        raise _BadValue(f"is not {expected}")
    type_fn = action.type
    try:
        if type_fn is None or type_fn is str:
            value = raw if isinstance(raw, str) else str(raw)
        elif type_fn is int:
            value = raw if isinstance(raw, int) else int(raw)
        elif type_fn is float:
            value = float(raw)
        else:
            value = type_fn(raw if isinstance(raw, str) else str(raw))
    except argparse.ArgumentTypeError as e:
        raise _BadValue(f"is invalid: {e}") from None
    except (TypeError, ValueError):
        raise _BadValue(f"is not {expected}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(_toml_repr(c) for c in action.choices)
        raise _BadValue(f"is not one of the allowed values: {choices}")
    return value


def _expected(action: argparse.Action) -> str:
    type_fn = action.type
    if type_fn is None or type_fn is str:
        return "a string"
    if type_fn is int:
        return "an integer"
    if type_fn is float:
        return "a number"
    return f"a value accepted by {getattr(type_fn, '__name__', repr(type_fn))}"


def _toml_repr(value: Any) -> str:
    return json.dumps(value, default=str)


def _with_file_provenance(message: str, args: argparse.Namespace, file_values: dict[str, Any],
                          config_path: str | None) -> str:
    """Append where a flag named in a validator's message came from, when that was the config file."""
    if config_path is None:
        return message
    named = dict.fromkeys(re.findall(r"--(\w+)", message))
    from_file = [d for d in named if d in file_values and getattr(args, d, None) == file_values[d]]
    if not from_file:
        return message
    flags = ", ".join(f"{d} = {_toml_repr(file_values[d])}" for d in from_file)
    return f"{message} ({flags} comes from config file '{config_path}')"


# --------------------------------------------------------------------------------------------------------
# --output_config
# --------------------------------------------------------------------------------------------------------


def _is_secret(dest: str) -> bool:
    """Credentials never go into a written config (wandb_api_key, huggingface_token, ...).

    A plain "contains token" test would also drop max_token_length and keep_tokens, so only names that
    end in "token" count.
    """
    name = dest.lower()
    return (any(word in name for word in ("api_key", "apikey", "password", "secret"))
            or name == "token" or name.endswith("_token"))


def _effective_default(action: argparse.Action) -> Any:
    """The value argparse stores when the flag is absent (string defaults go through `type`)."""
    default = action.default
    if isinstance(default, str) and action.type not in (None, str) and callable(action.type):
        try:
            return action.type(default)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return default
    return default


def effective_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The non-default, non-secret values of `args`, as {table: {dest: value}} ("" = top level).

    Tables are the argument-group titles, purely for readability: reading the file back ignores them.
    """
    group_of: dict[str, str] = {}
    for group in parser._action_groups:
        title = re.sub(r"\W+", "_", (group.title or "").strip().lower()).strip("_")
        if title in ("options", "optional_arguments", "positional_arguments"):
            title = ""
        for action in group._group_actions:
            group_of.setdefault(action.dest, title)

    tables: dict[str, dict[str, Any]] = {}
    for dest, action in _settable_actions(parser).items():
        if dest in _CONFIG_DESTS or _is_secret(dest) or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None or value == _effective_default(action):
            continue
        tables.setdefault(group_of.get(dest, ""), {})[dest] = _to_toml_value(value)
    return tables


def _to_toml_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_toml_value(v) for v in value]
    return str(value)  # Path and other custom types: the text the command line would carry


def _write_output_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str) -> None:
    tables = effective_config(parser, args)
    document: dict[str, Any] = dict(tables.pop("", {}))
    document.update(tables)
    text = ("# Written by --output_config: the arguments that differ from the defaults.\n"
            "# Use it with --config_file; flags on the command line override it.\n\n" + toml.dumps(document))
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": never overwrite, even in a race
            f.write(text)
    except FileExistsError:
        parser.error(f"--output_config will not overwrite the existing file '{path}': give a new path")
    except OSError as e:
        parser.error(f"--output_config cannot write '{path}' ({e})")
