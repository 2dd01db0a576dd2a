"""Train a LoRA / LoCon network for SD 1.x, SD 2.x or SDXL (family detected from the model).

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \\
        --in_json meta.json --train_data_dir imgs --network_module networks.lora --network_dim 16 \\
        --network_alpha 8 --output_dir out --output_name my_lora --max_train_steps 1000

kohya's flag names, ``--config_file`` and ``--dataset_config`` work as in sd-scripts. The saved file is a
kohya-format LoRA that A1111, ComfyUI and diffusers load.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library import accelerate_utils, config, noise, optim, sampling, validation  # noqa: E402
from library.checkpoints import SaveSettings, load_training_state, read_training_state  # noqa: E402
from library.run_setup import (  # noqa: E402
    apply_attention_backend,
    attach_sampling,
    move_module,
    build_training_data,
    fill_caches,
    model_dtypes,
    print_summary,
    start_logging,
    user_errors,
)
from library.models import load_model  # noqa: E402
from library.text_encoding import EncodedPrompts, PromptEncoder  # noqa: E402
from library.training import TrainingRun, make_plan, train  # noqa: E402
from library.training_metadata import per_save_metadata, tag_frequency, training_metadata  # noqa: E402

SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--network_module", default="networks.lora", help="module providing create_network (kohya plug-in API)")
    group.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    group.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha; scale = alpha / dim")
    group.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down output")
    group.add_argument("--network_args", nargs="*", default=None, help="k=v options for the network, e.g. conv_dim=4")
    group.add_argument("--network_weights", default=None, help="LoRA file to continue training from")
    group.add_argument("--dim_from_weights", action="store_true", help="take dim/alpha from --network_weights")
    group.add_argument("--network_train_unet_only", action="store_true")
    group.add_argument("--network_train_text_encoder_only", action="store_true")
    group.add_argument("--unet_lr", type=float, default=None)
    group.add_argument("--text_encoder_lr", type=float, nargs="*", default=None, help="one value, or one per text encoder")
    group.add_argument("--scale_weight_norms", type=float, default=None, help="max-norm regularisation of LoRA weights")
    group.add_argument("--no_metadata", action="store_true", help="write only the metadata a loader needs")
    group.add_argument("--training_comment", default=None)
    group.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 (the SDXL VAE overflows in fp16)")
    group.add_argument("--log_tracker_name", default=None, help="project name of the TensorBoard/wandb run")


def build_parser() -> argparse.ArgumentParser:
    return config.build_parser(
        __doc__,
        config.add_model_arguments,
        config.add_dataset_arguments,
        partial(config.add_training_arguments, default_learning_rate=1e-4),
        partial(config.add_saving_arguments, model_formats=("safetensors", "ckpt", "pt"), default_model_format="safetensors"),
        add_network_arguments,
        optim.add_optimizer_arguments,
        noise.add_noise_arguments,
        noise.add_loss_arguments,
        sampling.add_sampling_arguments,
        validation.add_validation_arguments,
        accelerate_utils.add_accelerate_arguments,
    )


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--network_args {item!r}: expected key=value")
        result[key.strip()] = value.strip()
    return result


class LoraUNet(nn.Module):
    """The network and the frozen UNet as one module whose forward is the UNet's.

    The LoRA weights act inside the UNet, so DDP must see the UNet call as its forward: DDP only averages
    gradients across ranks for a module whose forward ran. The UNet's own weights are frozen, so DDP
    ignores them.
    """

    def __init__(self, network: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.unet = unet

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)


class LoraTrainee:
    """A LoRA network on a frozen UNet (and text encoders); only the network's weights train."""

    def __init__(self, network: nn.Module, unet: nn.Module, text_encoders: list[nn.Module], trains_text_encoder: bool,
                 gradient_checkpointing: bool, save_dtype: torch.dtype | None, metadata: dict[str, str],
                 minimal_metadata: bool) -> None:
        self.network = network
        self.unet = unet
        self.model: nn.Module = LoraUNet(network, unet)
        self.forward_model: nn.Module = self.model
        self.text_encoders = text_encoders
        self.trains_text_encoder = trains_text_encoder
        self.gradient_checkpointing = gradient_checkpointing
        self.save_dtype = save_dtype
        self.metadata = metadata
        self.minimal_metadata = minimal_metadata

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"lora_unet": self.model}

    def use_prepared(self, modules: dict[str, nn.Module]) -> None:
        self.forward_model = modules["lora_unet"]

    def set_train(self, training: bool) -> None:
        self.network.train(training)
        # diffusers/transformers only checkpoint activations in train mode; the frozen modules have no dropout.
        for module in [self.unet, *(self.text_encoders if self.trains_text_encoder else [])]:
            module.train(training and self.gradient_checkpointing)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: EncodedPrompts,
                added_cond_kwargs: dict[str, torch.Tensor] | None, batch: dict[str, Any]) -> torch.Tensor:
        hidden = text.hidden_states.to(noisy_latents.dtype)
        if added_cond_kwargs is not None:
            added_cond_kwargs = {k: v.to(noisy_latents.dtype) for k, v in added_cond_kwargs.items()}
        return self.forward_model(noisy_latents, timesteps, encoder_hidden_states=hidden,
                                  added_cond_kwargs=added_cond_kwargs).sample

    def save(self, path: Path, step: int, epoch: int) -> None:
        metadata = per_save_metadata(self.metadata, step, epoch, self.minimal_metadata)
        self.network.save_weights(str(path), self.save_dtype, None if path.suffix != ".safetensors" else metadata)


def create_network(args: argparse.Namespace, model: Any, module: Any) -> nn.Module:
    kwargs = parse_network_args(args.network_args)
    if args.network_weights and args.dim_from_weights:
        network, _ = module.create_network_from_weights(1.0, args.network_weights, model.vae, model.text_encoders, model.unet, **kwargs)
        return network
    network = module.create_network(1.0, args.network_dim or 4, args.network_alpha, model.vae, model.text_encoders,
                                    model.unet, neuron_dropout=args.network_dropout, **kwargs)
    return network


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = config.parse_args(parser, argv)
    try:
        return train_network(args, parser)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def train_network(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.output_dir:
        parser.error("--output_dir is required")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        parser.error("--network_train_unet_only and --network_train_text_encoder_only are exclusive")
    resume_state = read_training_state(Path(args.resume)) if args.resume else None  # fail before any work
    data = build_training_data(args)  # dataset problems are reported here, before the model is loaded

    accelerator = accelerate_utils.build_accelerator(args)
    seed = accelerate_utils.broadcast_seed(accelerator, resume_state.seed if resume_state else args.seed)
    torch.manual_seed(seed)
    model = load_model(args.pretrained_model_name_or_path, family=args.family, vae=args.vae,
                       prediction_type="v_prediction" if args.v_parameterization else None)
    weight_dtype, vae_dtype, save_dtype = model_dtypes(args, model)
    attention = apply_attention_backend(args, model)
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    if train_text_encoder and (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk):
        parser.error("--cache_text_encoder_outputs needs --network_train_unet_only: a trained text encoder changes its outputs")

    network_module = importlib.import_module(args.network_module)
    network = create_network(args, model, network_module)
    network.apply_to(model.text_encoders, model.unet, train_text_encoder, train_unet)
    if args.network_weights and not args.dim_from_weights:
        info = network.load_weights(args.network_weights)
        accelerator.print(f"loaded network weights from {args.network_weights}: {info}")

    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)
        module.eval()
    for module, dtype in [(model.unet, weight_dtype), (model.vae, vae_dtype)] + [(te, weight_dtype) for te in model.text_encoders]:
        move_module(module, accelerator.device, dtype)
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for te in model.text_encoders:
            te.gradient_checkpointing_enable()
    if args.full_fp16 or args.full_bf16:
        network.to(weight_dtype)
    network.to(accelerator.device)
    network.requires_grad_(True)

    prompt_encoder = PromptEncoder(model.family.name, model.tokenizers, model.text_encoders,
                                   max_token_length=args.max_token_length or 75, clip_skip=args.clip_skip)
    caches = fill_caches(args, accelerator, data, model, prompt_encoder, vae_dtype)
    sampler = data.make_sampler(args, accelerator, seed)
    plan = make_plan(data.num_images, data.num_reg_images, data.samples_per_epoch, data.batch_size, len(sampler),
                     args.gradient_accumulation_steps, accelerator.num_processes, args.max_train_steps,
                     args.max_train_epochs, data.short_batches, data.repeated_batches)
    loader = data.make_loader(args, sampler, seed, plan.max_train_steps, caches)

    text_encoder_lr = args.text_encoder_lr if args.text_encoder_lr else None
    if text_encoder_lr is not None and len(text_encoder_lr) == 1:
        text_encoder_lr = text_encoder_lr[0]
    params, _ = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr, args.learning_rate)
    optimizer, lr_scheduler, optimizer_description = optim.build_optimizer_and_scheduler(
        optim.optimizer_settings_from_args(args), params, plan.max_train_steps, accelerator.num_processes)
    base_metadata = training_metadata(
        args, family=model.family.name, session_id=None, started_at=time.time(), num_train_images=data.num_images,
        num_reg_images=data.num_reg_images, batches_per_epoch=plan.batches_per_epoch_per_process,
        num_epochs=plan.num_epochs, max_train_steps=plan.max_train_steps, optimizer_description=optimizer_description,
        network_args=parse_network_args(args.network_args), dataset_summary=data.summary_for_metadata(),
        tag_freq=tag_frequency(data.caption_sources()), bucket_info=data.bucket_info(), resolution=data.resolution)
    trainee = LoraTrainee(network, model.unet, model.text_encoders, train_text_encoder, args.gradient_checkpointing,
                          save_dtype, base_metadata, args.no_metadata)
    prepared = accelerate_utils.prepare_for_deepspeed(accelerator, trainee.trainable_modules(), optimizer, lr_scheduler)
    trainee.use_prepared(prepared.models)
    start = None
    if args.resume:
        start = load_training_state(accelerator, Path(args.resume))
        accelerator.print(f"resuming from {args.resume}: step {start.global_step}, epoch {start.epoch}")

    scheduler_config = dict(model.scheduler.config)
    noise_options = noise.noise_options_from_args(args)
    run = TrainingRun(
        accelerator=accelerator, trainee=trainee, vae=model.vae, latent_scaling_factor=model.vae.config.scaling_factor,
        prompt_encoder=prompt_encoder, is_sdxl=model.family.is_sdxl, dataloader=loader, batch_sampler=sampler,
        prepared=prepared, plan=plan, seed=seed,
        prediction_type=model.prediction_type,
        alphas_cumprod=noise.noise_schedule(scheduler_config, noise_options.zero_terminal_snr).to(accelerator.device),
        noise_options=noise_options, loss_options=noise.loss_options_from_args(args),
        save=SaveSettings.from_args(args, "." + args.save_model_as if args.save_model_as else ".safetensors"),
        max_grad_norm=args.max_grad_norm, prior_loss_weight=data.prior_loss_weight, vae_dtype=vae_dtype,
        weight_dtype=weight_dtype, start=start,
    )
    attach_sampling(run, args, model, prompt_encoder, accelerator, weight_dtype, data.resolution)
    validation.attach_validation(run, args, data.validation_index, seed)
    if args.scale_weight_norms:
        run.extra_logs = lambda: _max_norm_logs(network, args.scale_weight_norms, accelerator.device)
    print_summary(accelerator, args, model, data, plan, optimizer_description, run.save)
    accelerator.print(f"attention: {attention}")
    start_logging(accelerator, args, "network_train" if args.log_tracker_name is None else args.log_tracker_name)
    try:
        final = train(run)
    finally:
        accelerator.end_training()
    accelerator.print(f"saved {run.save.model_path(run.save.output_name)} after {final.global_step} steps")
    return 0


def _max_norm_logs(network: Any, max_norm: float, device: torch.device) -> dict[str, float]:
    keys_scaled, mean_norm, maximum_norm = network.apply_max_norm_regularization(max_norm, device)
    return {"max_norm/keys_scaled": float(keys_scaled), "max_norm/average_key_norm": float(mean_norm),
            "max_norm/max_key_norm": float(maximum_norm)}


if __name__ == "__main__":
    sys.exit(main())
