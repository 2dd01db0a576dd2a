"""The set-up every training script shares: data -> sampler -> loader, caches, dtypes, start-up summary.

Kept out of the scripts so train_network.py, train_sdxl.py and train_controlnet.py read as their own story
(what is trained) and out of the loop, which only sees ready objects.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from library.cache import dataset_caching
from library.training import sampling
from library.data.buckets import BucketBatchSampler
from library.data.dataset_config import DatasetConfig, load_dataset_configs
from library.data.datasets import KeyedBatchSampler, TrainingDataset, build_bucket_sampler_inputs, collate_samples
from library.models.loading import StableDiffusionModel, detect_model_family
from library.data.records import DatasetIndex, load_dataset_index, split_for_validation

SDXL_BUCKET_STEP, SD_BUCKET_STEP = 32, 64


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's files or flags: reported as one line, not a traceback."""
    from library.cache.storage import LatentEncodingError
    from library.cache.dataset_caching import NotCacheableError
    from library.data.dataset_config import DatasetConfigError
    from library.models.loading import ModelLoadError
    from library.training.output_checks import OutputError
    from library.cli.preflight import StartupCheckError
    from library.data.records import DatasetProblems
    from library.training.sampling import SamplePromptError
    from library.training.loop import TrainingStopped
    from library.training.checkpoints import StateError

    return (OutputError, DatasetConfigError, DatasetProblems, NotCacheableError, ModelLoadError, SamplePromptError,
            LatentEncodingError, TrainingStopped, FileNotFoundError, StartupCheckError, StateError,
            *_network_errors(), *_data_errors())


def _data_errors() -> tuple[type[BaseException], ...]:
    """A data file that breaks after the start-up check, or a cache folder that cannot be written."""
    from library.cache.storage import CacheFileError
    from library.data.images import ImageReadError

    return ImageReadError, CacheFileError


def _network_errors() -> tuple[type[BaseException], ...]:
    """A LoRA file or network setting the user gave that cannot work (networks.lora's errors)."""
    from networks.lora import LoRAWeightsError, NetworkArgumentError

    return LoRAWeightsError, NetworkArgumentError


def peek_family(args: argparse.Namespace) -> str | None:
    """The model family without loading weights (folder config or safetensors header), to check data first."""
    if getattr(args, "family", None):
        from library.models.families import resolve_family

        return resolve_family(args.family).name
    return detect_model_family(str(args.pretrained_model_name_or_path or ""))


@dataclass
class TrainingData:
    datasets: list[DatasetConfig]
    index: DatasetIndex
    is_sdxl: bool
    sampler_inputs: Any = None
    validation_index: DatasetIndex | None = None  # held-out images (validation_split), None without a split
    short_batches: int = 0
    repeated_batches: int = 0
    temp_dirs: list[Any] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(1 for r in self.index.records if not r.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(1 for r in self.index.records if r.is_reg)

    @property
    def samples_per_epoch(self) -> int:
        return sum(r.num_repeats for r in self.index.records)

    @property
    def batch_size(self) -> int:
        return self.sampler_inputs.batch_size

    @property
    def resolution(self) -> tuple[int, int]:
        return self.datasets[0].resolution

    @property
    def prior_loss_weight(self) -> float:
        return self.datasets[0].prior_loss_weight

    def make_sampler(self, args: argparse.Namespace, accelerator: Any, seed: int) -> KeyedBatchSampler:
        buckets = BucketBatchSampler(self.sampler_inputs.bucket_keys, self.sampler_inputs.batch_size, seed,
                                     world_size=accelerator.num_processes, rank=accelerator.process_index,
                                     batches_per_step=args.gradient_accumulation_steps)
        summary = buckets.summary()
        self.short_batches = sum(1 for b in summary.buckets if b.short_batch_size)
        self.repeated_batches = summary.repeated_batches
        return KeyedBatchSampler(buckets, batches_per_step=args.gradient_accumulation_steps)

    def make_loader(self, args: argparse.Namespace, sampler: KeyedBatchSampler, seed: int, max_train_steps: int,
                    caches: "Caches", conditioning_filter: Any = None) -> DataLoader:
        dataset = TrainingDataset(self.index, seed, max_train_steps, latent_cache=caches.latents, text_cache=caches.text,
                                  conditioning_filter=conditioning_filter)
        workers = max(0, int(args.max_data_loader_n_workers or 0))
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=workers,
                          persistent_workers=bool(args.persistent_data_loader_workers and workers))

    def summary_for_metadata(self) -> list[dict[str, Any]]:
        out = []
        for dataset in self.datasets:
            out.append({"batch_size": dataset.batch_size, "resolution": list(dataset.resolution),
                        "enable_bucket": dataset.enable_bucket, "kind": dataset.kind,
                        "subsets": [{"image_dir": str(s.image_dir.name) if s.image_dir else None,
                                     "num_repeats": s.num_repeats, "is_reg": s.is_reg,
                                     "class_tokens": s.class_tokens} for s in dataset.subsets]})
        return out

    def caption_sources(self) -> list[tuple[str, str | None, str | None]]:
        return [(str(r.image_path.parent.name), r.caption, r.tags) for r in self.index.records]

    def bucket_info(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for record in self.index.records:
            bucket = record.bucket.bucket if record.bucket else None
            key = f"{bucket[0]}x{bucket[1]}" if bucket else "none"
            counts[key] = counts.get(key, 0) + record.num_repeats
        return {"buckets": counts}


def build_training_data(args: argparse.Namespace, support: set[str] | None = None) -> TrainingData:
    """Dataset configs and checked records; every data problem is raised here, before a model is loaded."""
    family = peek_family(args)
    min_step = SDXL_BUCKET_STEP if family in (None, "sdxl") else SD_BUCKET_STEP
    datasets = load_dataset_configs(args, support)
    if getattr(args, "masked_loss", False) and not any(s.alpha_mask for d in datasets for s in d.subsets):
        from library.data.dataset_config import DatasetConfigError

        raise DatasetConfigError("--masked_loss weights the loss by each image's alpha channel, but no subset loads "
                                 "it: add --alpha_mask (or alpha_mask = true in the dataset config)")
    index, validation = split_for_validation(load_dataset_index(datasets, min_step=min_step,
                                                                max_token_length=args.max_token_length or 75))
    return TrainingData(datasets, index, family == "sdxl", build_bucket_sampler_inputs(index), validation)


@dataclass
class Caches:
    latents: dataset_caching.LatentCacheLocation | None = None
    text: Any = None


def fill_caches(args: argparse.Namespace, accelerator: Any, data: TrainingData, model: StableDiffusionModel,
                prompt_encoder: Any, vae_dtype: torch.dtype) -> Caches:
    """Each rank encodes its share; then every rank reads all of it (workers read from disk)."""
    caches = Caches()
    is_sdxl = model.family.is_sdxl
    latent_mode = dataset_caching.latent_cache_mode(args)
    if "run" in (latent_mode, dataset_caching.text_cache_mode(args)):  # this run's temp caches live in --output_dir
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if latent_mode is not None:
        directory = None
        if latent_mode == "run":
            temp = tempfile.TemporaryDirectory(prefix="latents-", dir=args.output_dir)
            data.temp_dirs.append(temp)
            directory = Path(temp.name)
        caches.latents = dataset_caching.LatentCacheLocation(is_sdxl, directory)
        with torch.no_grad():
            dataset_caching.fill_latent_caches(
                data.index, model.vae, caches.latents, batch_size=args.vae_batch_size, rank=accelerator.process_index,
                world_size=accelerator.num_processes, skip_cache_check=args.skip_cache_check, seed=args.seed,
                progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
    text_mode = dataset_caching.text_cache_mode(args)
    if text_mode is not None:
        if text_mode == "run":
            temp = tempfile.TemporaryDirectory(prefix="text-", dir=args.output_dir)
            data.temp_dirs.append(temp)
            cache_dir = Path(temp.name)
        else:
            cache_dir = Path(args.text_encoder_cache_dir) if args.text_encoder_cache_dir else \
                dataset_caching.default_text_cache_dir(data.datasets)
        with torch.no_grad():
            caches.text = dataset_caching.fill_text_cache(data.index, prompt_encoder, cache_dir,
                                                          rank=accelerator.process_index,
                                                          world_size=accelerator.num_processes,
                                                          progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        caches.text.refresh()
    return caches


def apply_attention_backend(args: argparse.Namespace, model: StableDiffusionModel) -> str:
    """--xformers / --mem_eff_attn / --sdpa on the UNet (and VAE), through diffusers' own attention processors.

    --mem_eff_attn maps to diffusers' sliced attention, the maintained equivalent of kohya's chunked
    attention (less memory, slower). Without a flag the UNet keeps diffusers' default, which is SDPA.
    """
    if getattr(args, "xformers", False):
        model.unet.enable_xformers_memory_efficient_attention()
        model.vae.enable_xformers_memory_efficient_attention()
        return "xformers"
    if getattr(args, "mem_eff_attn", False):
        model.unet.set_attention_slice("auto")
        return "sliced (mem_eff_attn)"
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def move_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Cast only when the dtype changes: diffusers warns on every `.to(dtype=...)` call, even a no-op one."""
    current = next(module.parameters()).dtype
    module.to(device) if current == dtype else module.to(device, dtype=dtype)


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


def attach_sampling(run: Any, args: argparse.Namespace, model: StableDiffusionModel, prompt_encoder: Any,
                    accelerator: Any, dtype: torch.dtype, resolution: tuple[int, int], controlnet: Any = None,
                    measure: Callable[[list[Any]], dict[str, float]] | None = None) -> None:
    """Sample images at kohya's points (--sample_every_n_steps/epochs, --sample_at_first) from --sample_prompts.

    ``measure`` turns the step's samples into scalars (e.g. ControlNet fidelity), logged and printed.
    """
    if not args.sample_prompts:
        return
    prompts = sampling.load_sample_prompts(args.sample_prompts, default_size=max(resolution))
    output_dir = Path(args.output_dir)
    writer = _tensorboard_writer(accelerator)

    def sample(step: int, epoch: int | None) -> None:
        results = sampling.generate_samples(model, prompt_encoder, prompts, output_dir, args.output_name, step, epoch,
                                            args.sample_sampler, accelerator.device, dtype, controlnet=controlnet,
                                            distributed_state=accelerator.state if accelerator.num_processes > 1 else None)
        if measure is not None:
            scalars = measure(results)
            if scalars:
                accelerator.log(scalars, step=step)
                accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
        if writer is not None:
            for index, result in enumerate(results):
                writer.add_image(f"samples/{index:02d}", _image_array(result), global_step=step, dataformats="HWC")

    def should(step: int, epoch: int, is_epoch_end: bool) -> bool:
        return sampling.should_sample(step, epoch, args.sample_every_n_steps, args.sample_every_n_epochs, False,
                                      is_epoch_end)

    run.sample, run.should_sample, run.sample_at_first = sample, should, bool(args.sample_at_first)


def _tensorboard_writer(accelerator: Any) -> Any:
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            return tracker.writer
    return None


def _image_array(result: Any) -> Any:
    import numpy as np

    image = getattr(result, "image", result)
    return np.asarray(image)


def start_logging(accelerator: Any, args: argparse.Namespace, project_name: str) -> None:
    """Open the trackers build_accelerator configured (TensorBoard under --logging_dir), with the run's flags."""
    if not accelerator.log_with:
        return
    flags = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
             if "api_key" not in k and "token" != k}
    accelerator.init_trackers(project_name, config=flags)
