"""The start and the finish every training script shares; the scripts keep only what they train.

    session = open_session(args)                     # data checked, Accelerator, seed, model, dtypes
    freeze_and_place(session)                        # frozen parts on the device in their dtypes
    ... the script makes its trainable parts and param groups ...
    pipeline = build_data_pipeline(session)          # prompt encoder, caches, sampler, plan, loader
    optimizer, scheduler, description = build_optimizer(session, params, pipeline.plan)
    ... the script builds its Trainee ...
    return run_training(session, pipeline, trainee, optimizer, scheduler, description, extension, name)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from library.training import accelerate_utils, noise, optim, sampling, validation
from library.cli import config
from library.training.checkpoints import SaveSettings, TrainState
from library.training.train_state_io import TrainingStateIO, prepare_resume, run_settings
from library.models.loading import StableDiffusionModel, load_model
from library.training.output_checks import check_outputs, warn_if_disk_short
from library.cli.preflight import check_run_can_start
from library.training.run_setup import (
    TrainingData,
    apply_attention_backend,
    attach_sampling,
    build_training_data,
    fill_caches,
    model_dtypes,
    move_module,
    print_summary,
    start_logging,
    user_errors,
)
from library.models.text_encoding import PromptEncoder
from library.training.loop import Trainee, TrainingPlan, TrainingRun, make_plan, train


ArgumentAdder = Callable[[argparse.ArgumentParser], None]


def build_script_parser(description: str, default_learning_rate: float, saving: ArgumentAdder,
                        *script_groups: ArgumentAdder) -> argparse.ArgumentParser:
    """Every script's flags: the shared groups around the script's own (``script_groups``)."""
    return config.build_parser(
        description,
        config.add_model_arguments,
        config.add_dataset_arguments,
        partial(config.add_training_arguments, default_learning_rate=default_learning_rate),
        saving,
        *script_groups,
        optim.add_optimizer_arguments,
        noise.add_noise_arguments,
        noise.add_loss_arguments,
        sampling.add_sampling_arguments,
        validation.add_validation_arguments,
        accelerate_utils.add_accelerate_arguments,
    )


def run_main(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace, argparse.ArgumentParser], int],
             argv: list[str] | None = None) -> int:
    """Parse (with --config_file), run ``body``, and turn errors in the user's files or flags into one line."""
    args = config.parse_args(parser, argv)
    try:
        return body(args, parser)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


@dataclass
class Session:
    args: argparse.Namespace
    accelerator: Any
    seed: int
    data: TrainingData
    model: StableDiffusionModel
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    save_dtype: torch.dtype | None
    attention: str


def open_session(args: argparse.Namespace, support: set[str] | None = None,
                 required_family: str | None = None) -> Session:
    """Everything before the trainable parts exist; data problems are raised before the model is loaded."""
    check_run_can_start(args)  # optional packages and backends the flags ask for, before any data or model
    resume_state = prepare_resume(args)  # recovers interrupted saves, --resume auto, checks the state: before any work
    check_outputs(args, resume_state)  # an unusable --output_dir or a taken name: before the data and model
    data = build_training_data(args, support)
    accelerator = accelerate_utils.build_accelerator(args)
    seed = accelerate_utils.broadcast_seed(accelerator, resume_state.seed if resume_state else args.seed)
    torch.manual_seed(seed)
    model = load_model(args.pretrained_model_name_or_path, family=args.family, vae=args.vae,
                       prediction_type="v_prediction" if args.v_parameterization else None)
    if required_family is not None and model.family.name != required_family:
        from library.models.loading import ModelLoadError

        raise ModelLoadError(f"{args.pretrained_model_name_or_path} is an {model.family.name} model; this script trains "
                             f"{required_family} models only")
    weight_dtype, vae_dtype, save_dtype = model_dtypes(args, model)
    attention = apply_attention_backend(args, model)
    return Session(args, accelerator, seed, data, model, weight_dtype, vae_dtype, save_dtype, attention)


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


@dataclass
class DataPipeline:
    prompt_encoder: PromptEncoder
    sampler: Any
    plan: TrainingPlan
    loader: Any


def build_data_pipeline(session: Session, conditioning_filter: Any = None) -> DataPipeline:
    args, model, data = session.args, session.model, session.data
    prompt_encoder = PromptEncoder(model.family.name, model.tokenizers, model.text_encoders,
                                   max_token_length=args.max_token_length or 75, clip_skip=args.clip_skip)
    caches = fill_caches(args, session.accelerator, data, model, prompt_encoder, session.vae_dtype)
    sampler = data.make_sampler(args, session.accelerator, session.seed)
    plan = make_plan(data.num_images, data.num_reg_images, data.samples_per_epoch, data.batch_size, len(sampler),
                     args.gradient_accumulation_steps, session.accelerator.num_processes, args.max_train_steps,
                     args.max_train_epochs, data.short_batches, data.repeated_batches)
    loader = data.make_loader(args, sampler, session.seed, plan.max_train_steps, caches, conditioning_filter)
    return DataPipeline(prompt_encoder, sampler, plan, loader)


def build_optimizer(session: Session, params: list[dict[str, Any]], plan: TrainingPlan) -> tuple[Any, Any, str]:
    return optim.build_optimizer_and_scheduler(optim.optimizer_settings_from_args(session.args), params,
                                               plan.max_train_steps, session.accelerator.num_processes)


def run_training(session: Session, pipeline: DataPipeline, trainee: Trainee, optimizer: Any, lr_scheduler: Any,
                 optimizer_description: str, save_extension: str, project_name: str,
                 extra_logs: Callable[[], dict[str, float]] | None = None,
                 register_for_checkpointing: tuple[Any, ...] = (), clip_in_loop: bool = True,
                 sampling_controlnet: Any = None,
                 sample_metrics: Callable[[list[Any]], dict[str, float]] | None = None) -> int:
    """Prepare, resume, print the summary, train, and say where the result is.

    ``clip_in_loop=False`` when the optimizer clips by itself (the fused backward pass clips each tensor).
    """
    args, accelerator, model = session.args, session.accelerator, session.model
    prepared = accelerate_utils.prepare_for_deepspeed(accelerator, trainee.trainable_modules(), optimizer, lr_scheduler)
    trainee.use_prepared(prepared.models)
    state_io = TrainingStateIO(accelerator, prepared.models, prepared.optimizer, prepared.lr_scheduler,
                               custom=tuple(register_for_checkpointing),  # e.g. EMA weights: saved with the state
                               settings=run_settings(args, model.family.name), engine=prepared.engine)
    start: TrainState | None = None
    if args.resume:
        start = state_io.load(Path(args.resume), family=model.family.name)
        accelerator.print(f"resuming from {args.resume}: step {start.global_step}, epoch {start.epoch}")
    noise_options = noise.noise_options_from_args(args)
    run = TrainingRun(
        accelerator=accelerator, trainee=trainee, vae=model.vae, latent_scaling_factor=model.vae.config.scaling_factor,
        prompt_encoder=pipeline.prompt_encoder, is_sdxl=model.family.is_sdxl, dataloader=pipeline.loader,
        batch_sampler=pipeline.sampler, prepared=prepared, plan=pipeline.plan, seed=session.seed,
        prediction_type=model.prediction_type,
        alphas_cumprod=noise.noise_schedule(dict(model.scheduler.config), noise_options.zero_terminal_snr).to(accelerator.device),
        noise_options=noise_options, loss_options=noise.loss_options_from_args(args),
        save=SaveSettings.from_args(args, save_extension), max_grad_norm=args.max_grad_norm if clip_in_loop else 0.0,
        prior_loss_weight=session.data.prior_loss_weight, vae_dtype=session.vae_dtype, weight_dtype=session.weight_dtype,
        start=start, extra_logs=extra_logs, state_io=state_io,
        resumed_from=Path(args.resume) if args.resume else None,
    )
    attach_sampling(run, args, model, pipeline.prompt_encoder, accelerator, session.weight_dtype, session.data.resolution,
                    controlnet=sampling_controlnet, measure=sample_metrics)
    validation.attach_validation(run, args, session.data.validation_index, session.seed)
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
