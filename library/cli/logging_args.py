"""kohya's tracker and console-logging flags (wandb run name and key, --log_config, --log_tracker_config,
--console_log_*), and the typed tracker options and console set-up they turn into.

--logging_dir, --log_with, --log_prefix and --log_tracker_name stay with the training flags (training_args).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from library import toml_values
from library.cli.config import add_validator
from library.io import is_secret
from library.training.trackers import TrackerOptions

CONSOLE_LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# flags kohya leaves out of the tracker config: local paths say who ran it, and a wandb run can be public
PATH_FLAGS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir", "conditioning_data_dir",
              "reg_data_dir", "output_dir", "logging_dir")
_HANDLER_NAME = "console_log"  # the handler set_up_console_logging installs (replaced, never stacked)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--wandb_run_name", type=str, default=None, help="name of this run in wandb")
    group.add_argument("--wandb_api_key", type=str, default=None,
                       help="log in to wandb with this key before training; never written to any file or log, "
                            "but on the command line other users of the machine see it in `ps` while the run "
                            "lasts: prefer the WANDB_API_KEY environment variable or `wandb login`")
    group.add_argument("--log_config", action="store_true",
                       help="send the run's flags to the trackers as their config (credentials and local paths "
                            "left out, as kohya)")
    group.add_argument("--log_tracker_config", type=str, default=None,
                       help="TOML file of init arguments per tracker, e.g. [wandb] entity = \"me\" tags = [\"sdxl\"]; "
                            "--wandb_run_name fills wandb's name unless the file sets one")
    group.add_argument("--console_log_level", type=str.upper, choices=CONSOLE_LOG_LEVELS, default=None,
                       help="level of the log lines shown; default INFO into --console_log_file, otherwise WARNING "
                            "(kohya: INFO; here the summary printed before step 1 already says what they would)")
    group.add_argument("--console_log_file", type=str, default=None,
                       help="write the log lines to this file instead of the console (overwritten)")
    group.add_argument("--console_log_simple", action="store_true",
                       help="accepted for kohya configs: log lines here are always plain text (kohya: no rich)")
    add_validator(parser, _check_tracker_config)
    add_validator(parser, _check_console_log_file)


def _check_console_log_file(args: argparse.Namespace) -> str | None:
    path = getattr(args, "console_log_file", None)
    if path and not Path(path).resolve().parent.is_dir():
        return f"--console_log_file {path}: its folder does not exist: create it or pick another file"
    return None


def _check_tracker_config(args: argparse.Namespace) -> str | None:
    path = getattr(args, "log_tracker_config", None)
    if not path:  # unset, or the empty string a GUI config writes for an unset file
        return None
    try:
        read_tracker_config(path)
    except (OSError, ValueError) as error:
        return f"--log_tracker_config {path}: {error}"
    return None


def read_tracker_config(path: str) -> dict[str, dict[str, Any]]:
    """The file's tables, one per tracker name (kohya: ``init_kwargs = toml.load(args.log_tracker_config)``)."""
    with open(path, encoding="utf-8") as handle:
        document = toml_values.load(handle)
    for name, value in document.items():
        if not isinstance(value, dict):
            raise ValueError(f"{name} = {toml_values.value_repr(value)} is not a table: write the init arguments "
                             f"under a table named after the tracker, e.g. [wandb]")
    return document


def tracker_options_from_args(args: argparse.Namespace, default_project_name: str) -> TrackerOptions:
    """Project name, config (only with --log_config), per-tracker init arguments, and the wandb key to log in."""
    init_kwargs = read_tracker_config(args.log_tracker_config) if getattr(args, "log_tracker_config", None) else {}
    if getattr(args, "wandb_run_name", None):
        init_kwargs.setdefault("wandb", {}).setdefault("name", args.wandb_run_name)
    return TrackerOptions(project_name=getattr(args, "log_tracker_name", None) or default_project_name,
                          config=logged_config(args) if getattr(args, "log_config", False) else None,
                          init_kwargs=init_kwargs, logging_dir=getattr(args, "logging_dir", None),
                          wandb_api_key=getattr(args, "wandb_api_key", None),
                          secrets=tuple(v for k, v in vars(args).items() if is_secret(k) and isinstance(v, str)))


def logged_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as tracker config values (bool/int/float/str/None), without credentials and local paths."""
    return {key: value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in vars(args).items() if not is_secret(key) and key not in PATH_FLAGS}


def set_up_console_logging(args: argparse.Namespace) -> None:
    """kohya's setup_logging for --console_log_level/_file: one plain handler on the root logger.

    Without either flag Python's default stays (WARNING and above on stderr). Calling it again (main() run
    twice in one process) replaces the handler it installed instead of adding a second one.
    """
    level, log_file = getattr(args, "console_log_level", None), getattr(args, "console_log_file", None) or None
    if level is None and log_file is None:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(log_file, mode="w", encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level or "INFO"))
