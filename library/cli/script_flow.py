"""The start and the finish every training script shares; the scripts keep only what they train.

    session = open_session(args)                     # data checked, Accelerator, seed, model, dtypes
    freeze_and_place(session)                        # frozen parts on the device in their dtypes
    ... the script makes its trainable parts and param groups ...
    pipeline = build_data_pipeline(session)          # prompt encoder, caches, sampler, plan, loader
    optimizer, scheduler, description = build_optimizer(session, params, pipeline.plan)
    ... the script builds its Trainee ...
    return run_training(session, pipeline, trainee, optimizer=..., ..., callbacks=...)

The flag-reading steps live in library.cli.setup_from_args; the typed pieces they call in library.training.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.training import accelerate_utils, noise, optim, sharded_state, validation
from library.cli import config
from library.cli.accelerate_args import accelerator_options_from_args, add_accelerate_arguments
from library.cli.data_args import add_dataset_arguments, data_loader_workers, latent_cache_mode, text_cache_mode
from library.cli.fp8_args import add_fp8_arguments
from library.cli.hub_args import add_hub_arguments, hub_upload_callback
from library.cli.logging_args import add_logging_arguments, set_up_console_logging
from library.cli.metadata_args import add_metadata_arguments
from library.cli.model_args import add_model_arguments, apply_diffusers_xformers
from library.cli.noise_args import add_loss_arguments, add_noise_arguments, loss_options_from_args, noise_options_from_args
from library.cli.optim_args import add_optimizer_arguments, optimizer_settings_from_args
from library.cli.start_args import start_from_args
from library.cli.sampling_args import add_sampling_arguments, add_validation_arguments
from library.cli.training_args import (
    add_training_arguments,
    output_options_from_args,
    resume_from_args,
    save_settings_from_args,
)
from library.training.checkpoints import TrainState
from library.training.process_count import nodes_in_run
from library.training.run_settings import run_settings
from library.training.train_state_io import TrainingStateIO
from library.models.families import SDXL, ModelFamily
from library.models.loading import StableDiffusionModel, load_model
from library.data.dataset_preview import preview_lines
from library.data.shard_stream import shard_preview_lines
from library.training.output_checks import check_outputs, warn_if_disk_short
from library.cli.preflight import check_run_can_start
from library.cli.setup_from_args import (
    apply_attention_backend,
    build_training_data,
    model_dtypes,
    print_summary,
    sampling_callback,
    start_logging,
    user_errors,
)
from library.training.run_setup import Caches, TrainingData, fill_caches, move_module
from library.training.shard_setup import check_shard_resume
from library.models.text_encoding import PromptEncoder
from library.training.callbacks import NanGuard
from library.training.loop import Callback, Trainee, TrainingPlan, TrainingRun, make_plan, train


ArgumentAdder = Callable[[argparse.ArgumentParser], None]


def build_script_parser(description: str, default_learning_rate: float, saving: ArgumentAdder,
                        *script_groups: ArgumentAdder, frozen_base: bool = False) -> argparse.ArgumentParser:
    """Every script's flags: the shared groups around the script's own (``script_groups``). ``frozen_base``: the
    script trains a network on a frozen base model, so --fp8_base/--fp8_base_unet apply (else: refused)."""
    return config.build_parser(
        description,
        add_model_arguments,
        add_dataset_arguments,
        partial(add_training_arguments, default_learning_rate=default_learning_rate),
        partial(add_fp8_arguments, frozen_base=frozen_base),
        saving,
        *script_groups,
        add_optimizer_arguments,
        add_noise_arguments,
        add_loss_arguments,
        add_sampling_arguments,
        add_validation_arguments,
        add_accelerate_arguments,
        add_hub_arguments,
        add_logging_arguments,
        add_metadata_arguments,
    )


def run_main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace, argparse.ArgumentParser], int],
             argv: list[str] | None = None) -> int:
    """Parse (with --config_file), run ``body``, and turn errors in the user's files or flags into one line."""
    args = config.parse_args(parser, argv)
    try:
        set_up_console_logging(args)  # --console_log_level/_file, before the first log line
        return body(args, parser)
    except DatasetPreviewShown:
        return 0
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


class DatasetPreviewShown(Exception):
    """--debug_dataset printed its preview: the run ends there, successfully, before any model loads."""


@dataclass(frozen=True)
class Session:
    """What open_session returns: the flags, the Accelerator, the seed, the checked data, the model and dtypes."""

    args: argparse.Namespace
    accelerator: Any
    seed: int
    data: TrainingData
    model: StableDiffusionModel
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    save_dtype: torch.dtype | None
    attention: str


def open_session(args: argparse.Namespace, *, support: set[str] | None = None,
                 required_families: tuple[ModelFamily, ...] = ()) -> Session:
    """Everything before the trainable parts exist; data problems are raised before the model is loaded."""
    check_run_can_start(args)  # optional packages and backends the flags ask for, before any data or model
    resume_state = resume_from_args(args)  # recovers interrupted saves, --resume auto, checks the state: before any work
    check_outputs(output_options_from_args(args), resume_state)  # an unusable --output_dir or a taken name: before the data and model
    data = build_training_data(args, support)
    if getattr(args, "debug_dataset", False):
        seed = args.seed if args.seed is not None else 0
        print("\n".join(shard_preview_lines(data.shards.source, seed=seed) if data.shards is not None
                         else preview_lines(data.index, seed=seed)))
        raise DatasetPreviewShown()
    accelerator = accelerate_utils.build_accelerator(accelerator_options_from_args(args))
    seed = accelerate_utils.broadcast_seed(accelerator, resume_state.seed if resume_state else args.seed)
    torch.manual_seed(seed)
    with sharded_state.model_loading(accelerator):  # ZeRO-3: not partitioned by transformers at load
        model = load_model(args.pretrained_model_name_or_path, family=args.family, vae=args.vae,
                           prediction_type="v_prediction" if args.v_parameterization else None,
                           mmap=not getattr(args, "disable_mmap_load_safetensors", False))
    if required_families and model.family not in required_families:
        from library.models.loading import ModelLoadError

        names = " and ".join(family.name for family in required_families)
        other = "train_sdxl.py" if model.family is SDXL else "fine_tune.py"
        raise ModelLoadError(f"{args.pretrained_model_name_or_path} is an {model.family.name} model; this script trains "
                             f"{names} models only (for {model.family.name}: {other})")
    weight_dtype, vae_dtype, save_dtype = model_dtypes(args, model)
    attention = apply_diffusers_xformers(args, model, apply_attention_backend(args, model))
    return Session(args=args, accelerator=accelerator, seed=seed, data=data, model=model, weight_dtype=weight_dtype,
                   vae_dtype=vae_dtype, save_dtype=save_dtype, attention=attention)


def freeze_and_place(session: Session, trained: tuple[torch.nn.Module, ...] = ()) -> None:
    """Every module frozen and on the device; modules in ``trained`` keep fp32 weights unless --full_fp16/bf16."""
    args, model = session.args, session.model
    full_half = getattr(args, "full_fp16", False) or getattr(args, "full_bf16", False)
    for module, dtype in [(model.unet, session.weight_dtype), (model.vae, session.vae_dtype)] + \
            [(te, session.weight_dtype) for te in model.text_encoders]:
        module.requires_grad_(False)
        module.eval()
        if any(module is t for t in trained) and not full_half:
            dtype = torch.float32
        move_module(module, session.accelerator.device, dtype)
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for te in model.text_encoders:  # transformers 5 renamed it; keep working with both names
            enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
            enable()


@dataclass(frozen=True)
class DataPipeline:
    """What build_data_pipeline returns, in the order it was built."""

    prompt_encoder: PromptEncoder
    caches: Caches  # holds this run's temporary cache folders open
    sampler: Any
    plan: TrainingPlan
    loader: Any


def build_data_pipeline(session: Session, conditioning_filter: Any = None) -> DataPipeline:
    """Prompt encoder -> caches -> sampler -> plan -> loader, each from what the one before returned."""
    args, model, data, accelerator = session.args, session.model, session.data, session.accelerator
    prompt_encoder = PromptEncoder(model.family.name, model.tokenizers, model.text_encoders,
                                   max_token_length=args.max_token_length or 75, clip_skip=args.clip_skip,
                                   weighted=args.weighted_captions)
    caches = fill_caches(data=data, model=model, prompt_encoder=prompt_encoder, accelerator=accelerator,
                         latent_mode=latent_cache_mode(args), text_mode=text_cache_mode(args),
                         output_dir=Path(args.output_dir), vae_batch_size=args.vae_batch_size,
                         skip_cache_check=args.skip_cache_check, seed=args.seed,
                         text_encoder_cache_dir=args.text_encoder_cache_dir)
    sampler, counts = data.make_sampler(seed=session.seed, rank=accelerator.process_index,
                                        world_size=accelerator.num_processes,
                                        batches_per_step=args.gradient_accumulation_steps,
                                        num_workers=data_loader_workers(args))
    plan = make_plan(num_images=data.num_images, num_reg_images=data.num_reg_images,
                     samples_per_epoch=data.samples_per_epoch, batch_size=data.batch_size,
                     batches_per_epoch_per_process=counts.batches_per_epoch,
                     gradient_accumulation_steps=args.gradient_accumulation_steps,
                     num_processes=accelerator.num_processes, max_train_steps=args.max_train_steps,
                     max_train_epochs=args.max_train_epochs, short_batches=counts.short_batches,
                     repeated_batches=counts.repeated_batches, num_nodes=nodes_in_run(accelerator.num_processes))
    loader = data.make_loader(sampler, seed=session.seed, max_train_steps=plan.max_train_steps, caches=caches,
                              conditioning_filter=conditioning_filter,
                              num_workers=data_loader_workers(args),
                              persistent_workers=bool(args.persistent_data_loader_workers))
    return DataPipeline(prompt_encoder=prompt_encoder, caches=caches, sampler=sampler, plan=plan, loader=loader)


def through_prepared(encoder: PromptEncoder, trainable: dict[str, torch.nn.Module],
                     prepared: dict[str, torch.nn.Module]) -> PromptEncoder:
    """The prompt encoder the loop (and sampling) use: trained text encoders called through their prepared
    (DDP) wrappers, so their gradients are averaged across ranks. A new object; ``encoder`` is unchanged."""
    wrapped = {id(module): prepared[name] for name, module in trainable.items()}
    text_encoders = [wrapped.get(id(te), te) for te in encoder.text_encoders]
    if all(a is b for a, b in zip(text_encoders, encoder.text_encoders)):
        return encoder
    return dataclasses.replace(encoder, text_encoders=text_encoders)


def build_optimizer(session: Session, params: list[dict[str, Any]], plan: TrainingPlan) -> tuple[Any, Any, str]:
    return optim.build_optimizer_and_scheduler(optimizer_settings_from_args(session.args), params,
                                               plan.max_train_steps, session.accelerator.num_processes)


def run_training(session: Session, pipeline: DataPipeline, trainee: Trainee, *, optimizer: Any, lr_scheduler: Any,
                 optimizer_description: str, save_extension: str, project_name: str,
                 register_for_checkpointing: tuple[Any, ...] = (), clip_in_loop: bool = True,
                 sampling_controlnet: Any = None,
                 sample_metrics: Callable[[list[Any]], dict[str, float]] | None = None,
                 callbacks: Sequence[Callback] = ()) -> int:
    """Prepare, resume, print the summary, train, and say where the result is.

    ``clip_in_loop=False`` when the optimizer clips by itself (the fused backward pass clips each tensor).
    ``callbacks``: the script's own (EMA, max-norm) and those a caller of ``main`` gave (tests, the bench);
    at each hook they run before the standard ones (validation, sampling, the NaN guard).
    """
    args, accelerator, model = session.args, session.accelerator, session.model
    trainable = trainee.trainable_modules()
    prepared = accelerate_utils.prepare_for_deepspeed(accelerator, trainable, optimizer, lr_scheduler)
    trainee.use_prepared(prepared.models)
    prompt_encoder = through_prepared(pipeline.prompt_encoder, trainable, prepared.models)
    state_io = TrainingStateIO(accelerator, prepared.models, prepared.optimizer, prepared.lr_scheduler,
                               custom=tuple(register_for_checkpointing),  # e.g. EMA weights: saved with the state
                               settings=run_settings(vars(args), model.family.name), engine=prepared.engine,
                               fsdp_root=prepared.fsdp_root)
    start: TrainState | None = None
    if args.resume:
        start = state_io.load(Path(args.resume), family=model.family.name)
        check_shard_resume(session.data.shards, start, worker_streams=max(1, data_loader_workers(args)))
        accelerator.print(f"resuming from {args.resume}: step {start.global_step}, epoch {start.epoch}")
    start = start_from_args(args, pipeline.plan, session.seed, accelerator, resumed=start)
    noise_options = noise_options_from_args(args)
    alphas_cumprod = noise.noise_schedule(dict(model.scheduler.config), noise_options.zero_terminal_snr)
    loss_options, save = loss_options_from_args(args), save_settings_from_args(args, save_extension,
                                                                           num_epochs=pipeline.plan.num_epochs)
    sampling = sampling_callback(args, model, prompt_encoder, accelerator, session.weight_dtype, session.data.resolution,
                                 controlnet=sampling_controlnet, measure=sample_metrics)
    validating = validation.validation_callback(
        session.data.validation_index, seed=session.seed, accelerator=accelerator,
        every_n_steps=args.validate_every_n_steps, every_n_epochs=args.validate_every_n_epochs,
        max_batches=args.max_validation_steps)
    uploading = hub_upload_callback(args)  # --huggingface_repo_id: each save goes to the Hub too
    standard = [c for c in (validating, sampling) if c is not None] + [NanGuard(Path(args.resume) if args.resume else None)]
    standard += [uploading] if uploading is not None else []
    run = TrainingRun(
        accelerator=accelerator, trainee=trainee, vae=model.vae, latent_scaling_factor=model.vae.config.scaling_factor,
        prompt_encoder=prompt_encoder, family=model.family, dataloader=pipeline.loader,
        batch_sampler=pipeline.sampler, prepared=prepared, plan=pipeline.plan, seed=session.seed,
        prediction_type=model.prediction_type,
        alphas_cumprod=alphas_cumprod.to(accelerator.device), noise_options=noise_options, loss_options=loss_options,
        save=save, max_grad_norm=args.max_grad_norm if clip_in_loop else 0.0,
        prior_loss_weight=session.data.prior_loss_weight, vae_dtype=session.vae_dtype, weight_dtype=session.weight_dtype,
        start=start, state_io=state_io, callbacks=[*callbacks, *standard],
    )
    print_summary(accelerator, args, model, session.data, pipeline.plan, optimizer_description, run.save)
    warn_if_disk_short(accelerator, run.save, pipeline.plan.max_train_steps, pipeline.plan.num_epochs, trainee,
                       session.save_dtype)
    accelerator.print(f"attention: {session.attention}")
    start_logging(accelerator, args, args.log_tracker_name or project_name)
    try:
        final = train(run)
    finally:
        accelerator.end_training()
    accelerator.print(f"saved {run.save.model_path(run.save.output_name)} after {final.global_step} steps")
    return 0
