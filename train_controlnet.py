"""Train a ControlNet for SD 1.x, SD 2.x or SDXL (family detected from the model).

    accelerate launch train_controlnet.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir imgs --conditioning_data_dir canny --output_dir out --output_name my_cn ...

Conditioning images come from ``--conditioning_data_dir`` (same basename as each image, any extension), from
the original ControlNet ``prompt.json`` (``--in_json prompt.json``), or are computed on the fly from each
cropped image with ``--conditioning_filter canny``. The base UNet stays frozen unless
``--train_unet_decoder``. With sample prompts that name a control image (``--cn``), a control-fidelity score
(edge F1 for canny) is logged at every sampling point.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence


import torch
from PIL import Image
from torch import nn

from library.data import conditioning
from library.cli import config
from library.cli.data_args import add_conditioning_arguments, filter_from_args
from library.cli.metadata_args import model_spec_from_args
from library.cli.optim_args import add_fused_backward_arguments, optimizer_settings_from_args
from library.cli.training_args import add_saving_arguments
from library.cli import script_flow
from library.training import fused_backward
from library.models.controlnet_models import create_controlnet, load_controlnet, save_controlnet
from library.training.checkpoints import SINGLE_FILE_FORMATS
from library.models.loading import StableDiffusionModel, save_single_file
from library.models.model_spec import ModelSpec, fill_in_hash
from library.data.datasets import Batch
from library.data.pixels import normalize_pixels
from library.training.loop import Callback

def add_controlnet_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("controlnet")
    group.add_argument("--controlnet_model_name_or_path", default=None,
                       help="continue from this ControlNet (diffusers folder or single file); default: a new one "
                            "copied from the UNet's encoder")
    group.add_argument("--control_net_lr", type=config.learning_rate, default=None,
                       help="learning rate of the ControlNet's own layers (parameters named controlnet_*: the "
                            "conditioning embedding and the zero convolutions), as in kohya's "
                            "sdxl_train_control_net.py; the encoder copied from the UNet trains at --learning_rate. "
                            "Default: --learning_rate for all (kohya's SDXL script defaults to 1e-4)")
    group.add_argument("--train_unet_decoder", action="store_true",
                       help="also train the UNet's decoder half (the original work's sd_locked=False)")
    group.add_argument("--unet_decoder_lr", type=config.learning_rate, default=None, help="learning rate of the UNet decoder half")
    group.add_argument("--only_mid_control", action="store_true", help="add only the middle-block residual")
    group.add_argument("--conditioning_scale", type=float, default=1.0, help="residual scale in training and sampling")
    group.add_argument("--fidelity_filter", choices=sorted(conditioning.FILTERS), default=None,
                       help="filter that re-extracts the condition from samples for the fidelity score "
                            "(default: --conditioning_filter)")


def build_parser() -> argparse.ArgumentParser:
    return script_flow.build_script_parser(
        __doc__, 1e-5, partial(add_saving_arguments, model_formats=("safetensors", "ckpt", "pt", "diffusers"),
                               default_model_format="safetensors"),
        add_controlnet_arguments, add_conditioning_arguments, add_fused_backward_arguments)


def controlnet_param_groups(controlnet: nn.Module, *, learning_rate: float,
                            control_net_lr: float | None) -> list[dict[str, Any]]:
    """One group at --learning_rate, or with --control_net_lr kohya's split: the ControlNet's own layers
    (``controlnet_*``) at that rate, the encoder copied from the UNet at --learning_rate."""
    if control_net_lr is None:
        return [{"params": list(controlnet.parameters()), "name": "controlnet", "lr": learning_rate}]
    own = [p for name, p in controlnet.named_parameters() if name.startswith("controlnet_")]
    encoder = [p for name, p in controlnet.named_parameters() if not name.startswith("controlnet_")]
    return [{"params": own, "name": "controlnet", "lr": control_net_lr},
            {"params": encoder, "name": "controlnet_encoder", "lr": learning_rate}]


def unet_decoder_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The decoder half the original work unlocks with sd_locked=False: up blocks and the output layers."""
    modules = [unet.up_blocks, unet.conv_norm_out, unet.conv_out]
    return [p for module in modules for p in module.parameters()]


class ControlNetTrainee:
    """A ControlNet whose residuals steer a frozen (or decoder-trained) UNet."""

    trains_text_encoder = False

    def __init__(self, model: StableDiffusionModel, controlnet: nn.Module, train_unet_decoder: bool,
                 only_mid_control: bool, conditioning_scale: float, dropout_rate: float, save_format: str,
                 save_dtype: torch.dtype | None, model_spec: ModelSpec | None = None) -> None:
        self.model = model
        self.controlnet = controlnet
        self.train_unet_decoder = train_unet_decoder
        self.only_mid_control = only_mid_control
        self.conditioning_scale = conditioning_scale
        self.dropout_rate = dropout_rate
        self.save_format = save_format
        self.save_dtype = save_dtype
        self.model_spec = model_spec
        self.forward_controlnet: nn.Module = controlnet
        self.forward_unet: nn.Module = model.unet

    def trainable_modules(self) -> dict[str, nn.Module]:
        modules = {"controlnet": self.controlnet}
        if self.train_unet_decoder:
            modules["unet"] = self.model.unet
        return modules

    def use_prepared(self, modules: dict[str, nn.Module]) -> None:
        self.forward_controlnet = modules["controlnet"]
        self.forward_unet = modules.get("unet", self.model.unet)

    def set_train(self, training: bool) -> None:
        self.controlnet.train(training)
        self.model.unet.train(training and self.train_unet_decoder)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        dtype = noisy_latents.dtype  # the weight dtype: the residuals join the UNet in it
        # diffusers' ControlNets take the condition in [0, 1]; the dataset gives uint8, normalised here on the
        # device to [-1, 1] and then to [0, 1] (the values the float batches gave). Dropout makes it black.
        if batch.conditioning_pixel_values is None:
            raise ValueError("ControlNet training needs a conditioning image for every sample")
        condition = (normalize_pixels(batch.conditioning_pixel_values.to(noisy_latents.device)) + 1) / 2
        if self.dropout_rate and self.controlnet.training:
            condition = conditioning.apply_conditioning_dropout(condition, self.dropout_rate, fill=0.0)
        down, mid = self.forward_controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                            controlnet_cond=condition.to(dtype), conditioning_scale=self.conditioning_scale,
                                            added_cond_kwargs=added_cond_kwargs, return_dict=False)
        if self.only_mid_control:
            down = [torch.zeros_like(d) for d in down]
        return self.forward_unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs,
                                 down_block_additional_residuals=[d.to(dtype) for d in down],
                                 mid_block_additional_residual=mid.to(dtype)).sample

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def save(self, path: Path, step: int, epoch: int) -> None:
        """The ControlNet (a folder for --save_model_as diffusers, else one file); with --train_unet_decoder the
        whole model too, as ``<name>-model.safetensors``, since the ControlNet only works with that UNet.
        Single .safetensors files carry the ModelSpec keys (kohya writes them for SDXL ControlNets only)."""
        spec = self.model_spec.metadata_for(path) if self.model_spec is not None else {}
        save_controlnet(self.controlnet, path, self.model.family.name, dtype=self.save_dtype,
                        metadata={"ss_steps": str(step), "ss_epoch": str(epoch), **spec},
                        overwrite=True)  # start-up checked that replacing is allowed (--overwrite / --resume)
        fill_in_hash(path)
        if self.train_unet_decoder:
            model_path = path.with_name(f"{path.stem}-model.safetensors")
            model_spec = replace(self.model_spec, kind="checkpoint") if self.model_spec is not None else None
            save_single_file(self.model, model_path, dtype=self.save_dtype,
                             metadata=model_spec.metadata_for(model_path) if model_spec is not None else None)
            fill_in_hash(model_path)


def fidelity_metrics(fidelity_filter: Any, tolerance: int):
    """Re-extract the condition from each sample drawn with a control image and score it against that image."""

    def measure(samples: list[Any]) -> dict[str, float]:
        scores = {}
        for sample in samples:
            if sample.prompt.controlnet_image is None:
                continue
            with Image.open(sample.prompt.controlnet_image) as condition:
                score = conditioning.control_fidelity(fidelity_filter, sample.image, condition.convert("RGB"), tolerance)
            scores[f"control_fidelity/{sample.prompt.index:02d}"] = score
        if scores:
            scores["control_fidelity/mean"] = sum(scores.values()) / len(scores)
        return scores

    return measure


def train_controlnet(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                     callbacks: Sequence[Callback] = ()) -> int:
    if not args.output_dir:
        parser.error("--output_dir is required")
    conditioning_filter = filter_from_args(args)
    if conditioning_filter is None and not (args.conditioning_data_dir or args.in_json or args.dataset_config):
        parser.error("give the conditioning images: --conditioning_data_dir DIR, --in_json prompt.json, "
                     "a dataset config with conditioning_data_dir, or --conditioning_filter canny")
    session = script_flow.open_session(args)
    model = session.model
    missing = [r.image_path for r in session.data.index.records if r.conditioning_path is None]
    if conditioning_filter is None and missing:
        from library.data.dataset_config import DatasetConfigError

        raise DatasetConfigError(f"{len(missing)} image(s) have no conditioning image (first: {missing[0]}); use "
                                 "--conditioning_data_dir, a prompt.json, or --conditioning_filter")
    if args.controlnet_model_name_or_path:
        controlnet = load_controlnet(args.controlnet_model_name_or_path, unet_config_for_fallback=dict(model.unet.config))
    else:
        controlnet = create_controlnet(model.unet)
    script_flow.freeze_and_place(session, (model.unet,) if args.train_unet_decoder else ())
    controlnet.to(session.accelerator.device,
                  dtype=session.weight_dtype if (args.full_fp16 or args.full_bf16) else torch.float32)
    controlnet.requires_grad_(True)
    if args.gradient_checkpointing:  # the trained module holds most of the activations worth recomputing
        controlnet.enable_gradient_checkpointing()
    params = controlnet_param_groups(controlnet, learning_rate=args.learning_rate, control_net_lr=args.control_net_lr)
    if args.train_unet_decoder:
        decoder = unet_decoder_parameters(model.unet)
        for parameter in decoder:
            parameter.requires_grad_(True)
        params.append({"params": decoder, "name": "unet_decoder",
                       "lr": args.unet_decoder_lr if args.unet_decoder_lr is not None else args.learning_rate})

    pipeline = script_flow.build_data_pipeline(session, conditioning_filter)
    if args.fused_backward_pass:  # each parameter steps inside backward: the full set of gradients never exists
        optimizer, lr_scheduler, description = fused_backward.build_fused_optimizer_and_scheduler(
            optimizer_settings_from_args(args), params, pipeline.plan.max_train_steps, args.max_grad_norm)
    else:
        optimizer, lr_scheduler, description = script_flow.build_optimizer(session, params, pipeline.plan)
    save_format = args.save_model_as or "safetensors"
    model_spec = model_spec_from_args(args, family=model.family, kind="controlnet", resolution=session.data.resolution,
                                      prediction_type=model.prediction_type)
    trainee = ControlNetTrainee(model, controlnet, args.train_unet_decoder, args.only_mid_control,
                                args.conditioning_scale, args.conditioning_dropout_rate, save_format, session.save_dtype,
                                model_spec)
    fidelity_filter = conditioning.make_filter(args.fidelity_filter, []) if args.fidelity_filter else conditioning_filter
    metrics = fidelity_metrics(fidelity_filter, args.control_fidelity_tolerance) if fidelity_filter else None
    return script_flow.run_training(session, pipeline, trainee, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                    optimizer_description=description,
                                    save_extension=SINGLE_FILE_FORMATS.get(save_format, ""),
                                    project_name="controlnet_train", sampling_controlnet=controlnet,
                                    sample_metrics=metrics, clip_in_loop=not args.fused_backward_pass,
                                    callbacks=callbacks)


def main(argv: list[str] | None = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """``callbacks`` hook into the loop (tests, benchmarks): see library.training.loop.Callback."""
    return script_flow.run_main(build_parser(), partial(train_controlnet, callbacks=callbacks), argv)


if __name__ == "__main__":
    sys.exit(main())
