"""Full fine-tuning of a whole model (train_sdxl.py for SDXL, fine_tune.py for SD1.x/SD2.x): the UNet, and
optionally the text encoders, train themselves and each save writes the whole model."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from library.cli import script_flow
from library.cli.metadata_args import model_spec_from_args
from library.cli.optim_args import ema_settings_from_args, optimizer_settings_from_args, uses_fused_backward
from library.cli.training_args import with_use_safetensors
from library.data.datasets import Batch
from library.models.families import SDXL, ModelFamily
from library.models.loading import StableDiffusionModel, is_single_file, save_diffusers, save_single_file
from library.models.model_spec import ModelSpec, fill_in_hash
from library.models.sdxl_blocks import block_param_groups
from library.training import ema, fused_backward
from library.training.callbacks import EmaUpdate
from library.training.checkpoints import SINGLE_FILE_FORMATS
from library.training.loop import Callback


def freeze_unused_text_encoder_layers(text_encoder: nn.Module, family: ModelFamily, index: int,
                                      clip_skip: int | None) -> None:
    """Layers whose output the UNet never sees get no gradient, and DDP refuses parameters without one: SDXL
    conditions on text encoder 1's penultimate layer (its last layer and final LN are unused); SD1.x/SD2.x with
    CLIP skip k use ``hidden_states[-k]`` and the final LN, so their last k-1 layers are unused."""
    transformer = getattr(text_encoder, "text_model", text_encoder)
    if family is SDXL:
        if index == 0:
            transformer.encoder.layers[-1].requires_grad_(False)
            transformer.final_layer_norm.requires_grad_(False)
        return
    for layer in transformer.encoder.layers[len(transformer.encoder.layers) - (clip_skip or 1) + 1:]:
        layer.requires_grad_(False)


class FullModelTrainee:
    """The UNet and/or text encoders themselves train; saved as a whole model."""

    def __init__(self, model: StableDiffusionModel, trained: dict[str, nn.Module], *, gradient_checkpointing: bool,
                 save_format: str, save_dtype: torch.dtype | None,
                 averaged: ema.ExponentialMovingAverage | None = None, save_raw_too: bool = False,
                 model_spec: ModelSpec | None = None) -> None:
        self.model = model
        self.trained = trained
        self.gradient_checkpointing = gradient_checkpointing
        self.save_format = save_format
        self.save_dtype = save_dtype
        self.averaged = averaged
        self.save_raw_too = save_raw_too
        self.model_spec = model_spec
        self.forward_unet: nn.Module = model.unet
        self.trains_text_encoder = any(name.startswith("text_encoder") for name in trained)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.trained)

    def use_prepared(self, modules: dict[str, nn.Module]) -> None:
        """Trained text encoders go through their wrappers too: script_flow.through_prepared gives the loop a
        prompt encoder built on them."""
        self.forward_unet = modules.get("unet", self.model.unet)

    def set_train(self, training: bool) -> None:
        for module in self.trained.values():
            module.train(training)
        if "unet" not in self.trained:  # a frozen UNet only needs train mode for activation checkpointing
            self.model.unet.train(training and self.gradient_checkpointing)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        return self.forward_unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs).sample

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """Samples and validation use the EMA weights when EMA is on."""
        return self.averaged.swapped_into() if self.averaged is not None else contextlib.nullcontext()

    def saved_parameter_count(self) -> int:
        """Each save writes the whole model (twice with --save_raw_too), for the start-up disk-space estimate."""
        modules = [self.model.unet, self.model.vae, *self.model.text_encoders]
        copies = 2 if self.averaged is not None and self.save_raw_too else 1
        return copies * sum(p.numel() for module in modules for p in module.parameters())

    def save(self, path: Path, step: int, epoch: int) -> None:
        """EMA weights are the saved model when EMA is on; --save_raw_too adds the raw ones as '<name>-raw'."""
        if self.averaged is None:
            self._write(path, step, epoch)
            return
        if self.save_raw_too:
            self._write(path.with_name(f"{path.stem}-raw{path.suffix}"), step, epoch)
        with self.averaged.swapped_into():
            self._write(path, step, epoch)

    def _write(self, path: Path, step: int, epoch: int) -> None:
        if self.save_format in SINGLE_FILE_FORMATS:  # a folder carries no ModelSpec keys (kohya writes none)
            spec = self.model_spec.metadata_for(path) if self.model_spec is not None else {}
            save_single_file(self.model, path, dtype=self.save_dtype,
                             metadata={"ss_steps": str(step), "ss_epoch": str(epoch), **spec})
            fill_in_hash(path)
        else:
            save_diffusers(self.model, path, dtype=self.save_dtype,
                           safe_serialization=self.save_format == "diffusers_safetensors",
                           overwrite=True)  # start-up checked that replacing is allowed (--overwrite / --resume)


def default_save_format(args: argparse.Namespace) -> str:
    """The input's format, as kohya: a single file in, a single file out; a folder in, a folder out."""
    if args.save_model_as:
        return with_use_safetensors(args, args.save_model_as)
    return "safetensors" if is_single_file(args.pretrained_model_name_or_path) else "diffusers_safetensors"


def train_whole_model(args: argparse.Namespace, parser: argparse.ArgumentParser, *, families: Sequence[ModelFamily],
                      text_encoder_lrs: Sequence[float | None], block_lrs: list[float] | None = None,
                      project_name: str, callbacks: Sequence[Callback] = ()) -> int:
    """The body of both full fine-tuning scripts. ``text_encoder_lrs``: one learning rate per text encoder of
    the family (None: --learning_rate; 0 freezes it), used with --train_text_encoder; ``block_lrs``: SDXL's
    per-block UNet rates (--block_lr)."""
    if not args.output_dir:
        parser.error("--output_dir is required")
    caching_text = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
    if args.train_text_encoder and caching_text:
        parser.error("--cache_text_encoder_outputs cannot be used with --train_text_encoder: "
                     "a trained text encoder changes its outputs, so the cache would be stale after one step")
    if args.train_text_encoder and args.deepspeed and args.zero_stage == 3:
        # measured (DeepSpeed 0.19): CLIP's embeddings read position_embedding.weight.shape outside that module's
        # forward, where ZeRO-3 holds an empty placeholder; marking them ZeRO-3 leaves fails in backward instead
        parser.error("--train_text_encoder cannot be used with --deepspeed --zero_stage 3 (DeepSpeed cannot shard "
                     "CLIP's embeddings): use --zero_stage 2, or --fsdp")

    session = script_flow.open_session(args, support={"dreambooth", "finetuning"}, required_families=tuple(families))
    model = session.model
    trained: dict[str, nn.Module] = {}
    if args.learning_rate != 0 or block_lrs is not None:
        trained["unet"] = model.unet
    te_names = ["text_encoder1", "text_encoder2"] if len(model.text_encoders) == 2 else ["text_encoder"]
    te_lrs: dict[str, float] = {}
    if args.train_text_encoder:
        for index, name in enumerate(te_names):
            lr = text_encoder_lrs[index]
            te_lrs[name] = args.learning_rate if lr is None else lr
            if te_lrs[name] != 0:
                trained[name] = model.text_encoders[index]
    if not trained:
        parser.error("nothing to train: --learning_rate is 0 and no text encoder is trained")
    script_flow.freeze_and_place(session, tuple(trained.values()))

    params: list[dict[str, Any]] = []
    if "unet" in trained:
        model.unet.requires_grad_(True)
        if block_lrs is not None:
            params += block_param_groups(model.unet, block_lrs)
        else:
            params.append({"params": list(model.unet.parameters()), "lr": args.learning_rate, "name": "unet"})
    for index, name in enumerate(te_names):
        if name in trained:
            trained[name].requires_grad_(True)
            freeze_unused_text_encoder_layers(trained[name], model.family, index, args.clip_skip)
            params.append({"params": [p for p in trained[name].parameters() if p.requires_grad], "lr": te_lrs[name],
                           "name": name})

    pipeline = script_flow.build_data_pipeline(session)
    if uses_fused_backward(args):  # each parameter steps inside backward: the full set of gradients never exists
        optimizer, lr_scheduler, description = fused_backward.build_fused_optimizer_and_scheduler(
            optimizer_settings_from_args(args), params, pipeline.plan.max_train_steps, args.max_grad_norm)
    else:
        optimizer, lr_scheduler, description = script_flow.build_optimizer(session, params, pipeline.plan)
    save_format = default_save_format(args)
    averaged = None
    settings = ema_settings_from_args(args)
    if settings is not None:
        named = {f"{name}.{key}": p for name, module in trained.items() for key, p in module.named_parameters()}
        averaged = ema.ExponentialMovingAverage(named, settings)
    trainee = FullModelTrainee(model, trained, gradient_checkpointing=args.gradient_checkpointing,
                               save_format=save_format, save_dtype=session.save_dtype, averaged=averaged,
                               save_raw_too=args.save_raw_too,
                               model_spec=model_spec_from_args(args, family=model.family, kind="checkpoint",
                                                               resolution=session.data.resolution,
                                                               prediction_type=model.prediction_type))
    extension = SINGLE_FILE_FORMATS.get(save_format, "")
    return script_flow.run_training(session, pipeline, trainee, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                    optimizer_description=description, save_extension=extension,
                                    project_name=project_name,
                                    register_for_checkpointing=(averaged,) if averaged else (),
                                    clip_in_loop=not uses_fused_backward(args),
                                    callbacks=[*([EmaUpdate(averaged)] if averaged else []), *callbacks])
