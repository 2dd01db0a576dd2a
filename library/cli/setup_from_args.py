"""The set-up steps of `script_flow` that read the flags: each turns the argparse namespace into typed calls.

Below library/cli nothing sees the namespace; these are the places where flag names meet the library.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch

from library.cli.data_args import dataset_flags_from_args
from library.cli.logging_args import tracker_options_from_args
from library.cli.training_args import attention_flag_in_use
from library.data.dataset_config_loading import load_dataset_configs
from library.data.dataset_index import load_dataset_index, split_for_validation
from library.data.datasets import build_bucket_sampler_inputs
from library.data.shard_config import uses_shards
from library.models.families import FINEST_BUCKET_STEP, ModelFamily, detect_family, resolve_family
from library.models.loading import StableDiffusionModel
from library.training import sampling, sharded_state
from library.training.callbacks import PeriodicSampling
from library.training.trackers import log_sample_images, start_trackers
from library.training.run_setup import TrainingData


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's files or flags: reported as one line, not a traceback."""
    from library.cache.latent_files import LatentEncodingError
    from library.data.cacheable import NotCacheableError
    from library.data.dataset_config import DatasetConfigError
    from library.models.loading import ModelLoadError
    from library.training.output_checks import OutputError
    from library.cli.preflight import StartupCheckError
    from library.data.records import DatasetProblems
    from library.training.sampling import SamplePromptError
    from library.training.loop import TrainingStopped
    from library.training.checkpoints import StateError
    from library.training.optim import OptimizerArgumentsError

    return (OutputError, DatasetConfigError, DatasetProblems, NotCacheableError, ModelLoadError, SamplePromptError,
            LatentEncodingError, TrainingStopped, FileNotFoundError, StartupCheckError, StateError,
            OptimizerArgumentsError,
            *_network_errors(), *_data_errors())


def _data_errors() -> tuple[type[BaseException], ...]:
    """A data file that breaks after the start-up check, or a cache folder that cannot be written."""
    from library.cache.latent_files import CacheFileError
    from library.data.images import ImageReadError

    return ImageReadError, CacheFileError


def _network_errors() -> tuple[type[BaseException], ...]:
    """A LoRA file or network setting the user gave that cannot work (networks.lora's errors)."""
    from library.adapters.errors import LoRAWeightsError, NetworkArgumentError

    return LoRAWeightsError, NetworkArgumentError


def peek_family(args: argparse.Namespace) -> ModelFamily | None:
    """The model family without loading weights (folder config or safetensors header), to check data first."""
    if getattr(args, "family", None):
        return resolve_family(args.family)
    return detect_family(str(args.pretrained_model_name_or_path or ""))


def build_training_data(args: argparse.Namespace, support: set[str] | None = None) -> TrainingData:
    """Dataset configs and checked records; every data problem is raised here, before a model is loaded."""
    family = peek_family(args)
    min_step = FINEST_BUCKET_STEP if family is None else family.bucket_step
    datasets = load_dataset_configs(dataset_flags_from_args(args), support)
    if getattr(args, "masked_loss", False) and not any(s.alpha_mask for d in datasets for s in d.subsets):
        from library.data.dataset_config import DatasetConfigError

        raise DatasetConfigError("--masked_loss weights the loss by each image's alpha channel, but no subset loads "
                                 "it: add --alpha_mask (or alpha_mask = true in the dataset config)")
    if uses_shards(datasets):  # streamed: planned from index.json, no shard is opened before training
        from library.cli.data_args import text_cache_mode
        from library.data.records import DatasetIndex
        from library.data.shard_config import load_shard_run

        shards = load_shard_run(datasets, family=None if family is None else family.name,
                                text_outputs_wanted=text_cache_mode(args) is not None)
        return TrainingData(datasets, DatasetIndex(datasets=tuple(datasets), records=()), family, shards=shards)
    index, validation = split_for_validation(load_dataset_index(datasets, min_step=min_step,
                                                                max_token_length=args.max_token_length or 75))
    return TrainingData(datasets, index, family, build_bucket_sampler_inputs(index), validation)


def apply_attention_backend(args: argparse.Namespace, model: StableDiffusionModel) -> str:
    """--xformers / --mem_eff_attn / --sdpa on the UNet (and VAE), through diffusers' own attention processors.

    --mem_eff_attn maps to diffusers' sliced attention, the maintained equivalent of kohya's chunked
    attention (less memory, slower). Without a flag the UNet keeps diffusers' default, which is SDPA. With several
    flags the first in kohya's order wins (mem_eff_attn, xformers, sdpa); the VAE gets xformers only when the
    UNet does (kohya gives it xformers whenever --xformers is set).
    """
    chosen = attention_flag_in_use(args)
    if chosen == "mem_eff_attn":
        model.unet.set_attention_slice("auto")
        return "sliced (mem_eff_attn)"
    if chosen == "xformers":
        model.unet.enable_xformers_memory_efficient_attention()
        model.vae.enable_xformers_memory_efficient_attention()
        return "xformers"
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def model_dtypes(args: argparse.Namespace, model: StableDiffusionModel) -> tuple[torch.dtype, torch.dtype, torch.dtype | None]:
    """(weights of frozen modules, VAE, saved files): fp32 VAE with --no_half_vae, as kohya."""
    weight = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    vae = torch.float32 if getattr(args, "no_half_vae", False) else weight
    save = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.save_precision or "")
    return weight, vae, save


def print_summary(accelerator: Any, args: argparse.Namespace, model: StableDiffusionModel, data: TrainingData,
                  plan: Any, optimizer_description: str, save: Any) -> None:
    """One screen before step 1: what is trained on what, and the step arithmetic."""
    lines = [
        f"model: {args.pretrained_model_name_or_path} ({model.family.name}, {model.prediction_type})",
        f"data: {len(data.datasets)} dataset(s), resolution {data.resolution[0]}x{data.resolution[1]}, "
        f"batch {data.batch_size}",
        "buckets (WxH: samples): " + ", ".join(f"{k}: {v}" for k, v in sorted(data.bucket_info()["buckets"].items())),
        plan.format(),
        f"optimizer: {optimizer_description}; lr scheduler {args.lr_scheduler}",
        f"mixed precision: {args.mixed_precision}; gradient checkpointing: {bool(args.gradient_checkpointing)}",
        f"output: {save.model_path(save.output_name)}",
        *(f"warning: {notice}" for notice in data.index.notices),
    ]
    accelerator.print("\n".join(lines))


def sampling_callback(args: argparse.Namespace, model: StableDiffusionModel, prompt_encoder: Any, accelerator: Any,
                      dtype: torch.dtype, resolution: tuple[int, int], controlnet: Any = None,
                      measure: Callable[[list[Any]], dict[str, float]] | None = None) -> PeriodicSampling | None:
    """Samples from --sample_prompts at kohya's points (--sample_every_n_steps/epochs, --sample_at_first).

    ``measure`` turns the step's samples into scalars (e.g. ControlNet fidelity), logged and printed.
    """
    if not args.sample_prompts:
        return None
    prompts = sampling.load_sample_prompts(args.sample_prompts, default_size=max(resolution))
    output_dir = Path(args.output_dir)

    def sample(step: int, epoch: int | None) -> None:
        # ZeRO-3 / FSDP gather each layer's weights collectively as it runs: all ranks draw all prompts
        lockstep = sharded_state.sampling_in_lockstep(accelerator)
        split = accelerator.num_processes > 1 and not lockstep
        results = sampling.generate_samples(model, prompt_encoder, prompts, output_dir, args.output_name, step, epoch,
                                            args.sample_sampler, accelerator.device, dtype, controlnet=controlnet,
                                            distributed_state=accelerator.state if split else None,
                                            keep_images=accelerator.is_main_process or not lockstep)
        if measure is not None:
            scalars = measure(results)
            if scalars:
                accelerator.log(scalars, step=step)
                accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
        # the trackers are looked up now: they open after this callback is built
        log_sample_images(accelerator, results, step)

    return PeriodicSampling(sample, every_n_steps=args.sample_every_n_steps, every_n_epochs=args.sample_every_n_epochs,
                            at_first=bool(args.sample_at_first))


def start_logging(accelerator: Any, args: argparse.Namespace, project_name: str) -> None:
    """Open the trackers build_accelerator configured (TensorBoard under --logging_dir, wandb), named and
    configured by the logging flags (the run's flags as config only with --log_config, as kohya)."""
    start_trackers(accelerator, tracker_options_from_args(args, project_name))
