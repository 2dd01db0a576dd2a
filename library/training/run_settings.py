"""The run's settings: recorded in every training state, compared with the new run's on ``--resume``.

A state can only continue the run it came from: a different base model, network shape, dataset or optimizer
would silently train something else, so those are refused (unless ``--resume_ignore_changes``); schedule
settings may change and the scheduler is then rebuilt at the resume step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from library.io import is_secret
from library.training.checkpoints import StateError

# flag -> what it is; a state cannot continue with another value (unless --resume_ignore_changes)
FIXED_SETTINGS: dict[str, str] = {
    "pretrained_model_name_or_path": "the base model", "family": "the model family", "v2": "the model family",
    "v_parameterization": "the prediction type", "vae": "the VAE",
    "network_module": "the network type", "network_dim": "the network's shape", "network_alpha": "the network's scale",
    "network_args": "the network's shape", "network_train_unet_only": "what trains",
    "network_train_text_encoder_only": "what trains", "train_text_encoder": "what trains",
    "controlnet_model_name_or_path": "the ControlNet", "train_unet_decoder": "what trains",
    "optimizer_type": "the optimizer (its state)", "optimizer_args": "the optimizer (its state)",
    "train_data_dir": "the dataset", "in_json": "the dataset", "dataset_config": "the dataset",
    "reg_data_dir": "the dataset", "conditioning_data_dir": "the dataset", "validation_split": "the dataset split",
    "train_batch_size": "the data position", "gradient_accumulation_steps": "the data position",
    "seed": "the data order",
}
# flags that decide the learning-rate schedule: when one changes the scheduler is rebuilt to the resume step
SCHEDULE_SETTINGS = ("learning_rate", "unet_lr", "text_encoder_lr", "learning_rate_te1", "learning_rate_te2",
                     "block_lr", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps", "lr_scheduler_num_cycles",
                     "lr_scheduler_power", "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio", "lr_scheduler_type",
                     "lr_scheduler_args", "max_train_steps", "max_train_epochs")
# not settings of the run, or where it is written
MODEL_FAMILY = "model_family"
_NOT_COMPARED = {MODEL_FAMILY, "resume", "resume_ignore_changes", "output_dir", "output_name", "config_file",
                 "output_config",
                 "logging_dir", "log_prefix", "log_tracker_name", "overwrite",
                 "wandb_run_name", "log_config", "log_tracker_config", "console_log_level",
                 "console_log_file", "console_log_simple",
                 "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                 "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface", "async_upload"}
_PATH_SETTINGS = {"pretrained_model_name_or_path", "vae", "controlnet_model_name_or_path", "train_data_dir",
                  "in_json", "dataset_config", "reg_data_dir", "conditioning_data_dir"}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def run_settings(flags: Mapping[str, Any], family: str | None = None) -> dict[str, Any]:
    """The flags ({dest: value}) as JSON values, credentials left out (``library.io.is_secret``); paths absolute,
    so a resume from another working folder compares equal."""
    settings = {}
    for key, value in sorted(flags.items()):
        if key in _NOT_COMPARED or is_secret(key):
            continue
        if key in _PATH_SETTINGS and isinstance(value, str) and value and Path(value).exists():
            value = str(Path(value).resolve())
        settings[key] = _plain(value)
    if family is not None:
        settings[MODEL_FAMILY] = family  # known once the model is loaded; checked then
    return settings


def _flag(key: str, value: Any) -> str:
    if value is None or value is False:
        return f"no --{key}"
    if value is True:
        return f"--{key}"
    shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"--{key} {shown}"


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose value differs (a key missing on one side counts only when the other has a value)."""
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if k not in _NOT_COMPARED and saved.get(k) != current.get(k)
            and (k in saved or current.get(k) not in (None, False))]


def compare_settings(folder: Path, saved: dict[str, Any], current: dict[str, Any], ignore_changes: bool,
                     printer: Any = print) -> list[str]:
    """Print what changed since the state was saved; refuse what a state cannot follow. Returns the changed keys."""
    changed = changed_settings(saved, current)
    if "seed" in changed and current.get("seed") is None:
        changed.remove("seed")  # no --seed: the state's seed is used
    refused = [k for k in changed if k in FIXED_SETTINGS]
    if refused and not ignore_changes:
        reasons = "; ".join(f"{_flag(k, current.get(k))} but the state was saved with {_flag(k, saved.get(k))} "
                            f"({FIXED_SETTINGS[k]} cannot change)" for k in refused)
        raise StateError(f"--resume {folder}: {reasons}: use the state's values, or add --resume_ignore_changes to "
                         "resume anyway")
    for key in changed:
        kept = key in FIXED_SETTINGS
        printer(f"resume: {_flag(key, saved.get(key))} -> {_flag(key, current.get(key))} "
                f"({'changed with --resume_ignore_changes' if kept else 'applied'})")
    return changed
