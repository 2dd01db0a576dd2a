"""Train a LoRA / LoCon network for SD 1.x, SD 2.x or SDXL (family detected from the model).

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \\
        --in_json meta.json --train_data_dir imgs --network_module networks.lora --network_dim 16 \\
        --network_alpha 8 --output_dir out --output_name my_lora --max_train_steps 1000

kohya's flag names, ``--config_file`` and ``--dataset_config`` work as in sd-scripts. The saved file is a
kohya-format LoRA that A1111, ComfyUI and diffusers load.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence


import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from library.adapters.errors import NetworkArgumentError
from library.adapters.network_args import parse_network_args
from library.cli import config
from library.cli.accelerate_args import fsdp_refused
from library.cli.fp8_args import fp8_options_from_args
from library.cli.metadata_args import model_spec_from_args
from library.cli.training_args import add_saving_arguments, metadata_flags_from_args
from library.cli import script_flow
from library.cli.optim_args import add_fused_backward_arguments, optimizer_settings_from_args
from library.training import fused_backward
from library.data.datasets import Batch
from library.models.fp8_weights import float8_parameter_names, store_base_model_in_fp8
from library.models.model_spec import ModelSpec, fill_in_hash
from library.training.loop import Callback
from library.training.training_metadata import per_save_metadata, tag_frequency, training_metadata
from networks.lora import merge_into_model
from networks.lycoris_kohya import check_network_args as check_lycoris_args, is_lycoris_module
from networks.plugin import NetworkModule, NetworkOptions, build_network, import_network_module

def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--network_module", default="networks.lora", help="module providing create_network (kohya plug-in API)")
    group.add_argument("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    group.add_argument("--network_alpha", type=float, default=1.0, help="LoRA alpha; scale = alpha / dim")
    group.add_argument("--network_dropout", type=float, default=None, help="dropout on the LoRA down output")
    group.add_argument("--network_args", nargs="*", default=None, help="k=v options for the network, e.g. conv_dim=4")
    group.add_argument("--network_weights", default=None, help="LoRA file to continue training from")
    group.add_argument("--dim_from_weights", action="store_true", help="take dim/alpha from --network_weights")
    group.add_argument("--base_weights", type=str, nargs="*", default=None,
                       help="LoRA files merged into the base model before training (as networks/merge_lora.py "
                            "--sd_model bakes them: weight += multiplier * up @ down * alpha / rank); the trained "
                            "LoRA then learns on top of them. Read as networks.lora LoRA/LoCon files whatever "
                            "--network_module is")
    group.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None,
                       help="one multiplier per --base_weights file; a missing one is 1.0 (as in kohya; more values than "
                            "files is an error here, where kohya ignores the extra ones)")
    group.add_argument("--network_train_unet_only", action="store_true")
    group.add_argument("--network_train_text_encoder_only", action="store_true")
    group.add_argument("--unet_lr", type=config.learning_rate, default=None)
    group.add_argument("--text_encoder_lr", type=config.learning_rate, nargs="*", default=None, help="one value, or one per text encoder")
    group.add_argument("--scale_weight_norms", type=float, default=None, help="max-norm regularisation of LoRA weights")
    group.add_argument("--no_metadata", action="store_true", help="write only the metadata a loader needs")
    group.add_argument("--training_comment", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = script_flow.build_script_parser(
        __doc__, 1e-4,
        partial(add_saving_arguments, model_formats=("safetensors", "ckpt", "pt"), default_model_format="safetensors"),
        add_network_arguments, add_fused_backward_arguments, frozen_base=True)
    config.add_validator(parser, fsdp_refused("train_network.py"))
    return parser


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
        # DDP broadcasts every parameter when it wraps a module; --fp8_base's float8 weights cannot go through gloo
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, float8_parameter_names(self))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)


class LoraTrainee:
    """A LoRA network on a frozen UNet (and text encoders); only the network's weights train."""

    def __init__(self, network: nn.Module, unet: nn.Module, text_encoders: list[nn.Module], trains_text_encoder: bool,
                 gradient_checkpointing: bool, save_dtype: torch.dtype | None, metadata: dict[str, str],
                 minimal_metadata: bool, model_spec: ModelSpec | None = None) -> None:
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
        self.model_spec = model_spec
        # What sampling uses, whatever multiplier the last batch's dataset set (network_multiplier).
        self.own_multiplier = float(getattr(network, "multiplier", 1.0))

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"lora_unet": self.model}

    def saved_modules(self) -> dict[str, nn.Module]:
        """What a save writes: only the network's weights need gathering under ZeRO-3, not the frozen UNet's."""
        return {"network": self.network}

    def use_prepared(self, modules: dict[str, nn.Module]) -> None:
        self.forward_model = modules["lora_unet"]

    def set_train(self, training: bool) -> None:
        self.network.train(training)
        # diffusers/transformers only checkpoint activations in train mode; the frozen modules have no dropout.
        for module in [self.unet, *(self.text_encoders if self.trains_text_encoder else [])]:
            module.train(training and self.gradient_checkpointing)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None, batch: Batch) -> torch.Tensor:
        sample = self.forward_model(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                    added_cond_kwargs=added_cond_kwargs).sample
        if getattr(self.network, "multiplier", None) == 0 and torch.is_grad_enabled():
            sample = sample + zero_gradient_link(self.network)
        return sample

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """Sample images are made at the network's own multiplier, not at the last batch's dataset's (saving
        needs none: the multiplier is not part of the file)."""
        if not hasattr(self.network, "set_multiplier"):
            return contextlib.nullcontext()
        return multiplier_set_to(self.network, self.own_multiplier)

    def save(self, path: Path, step: int, epoch: int) -> None:
        """kohya's ss_* metadata (only the minimum with --no_metadata) and the ModelSpec keys (always, as kohya)."""
        metadata = per_save_metadata(self.metadata, step, epoch, self.minimal_metadata)
        if self.model_spec is not None:
            metadata.update(self.model_spec.metadata_for(path))
        path.parent.mkdir(parents=True, exist_ok=True)  # kohya-style networks write with save_file, no mkdir
        self.network.save_weights(str(path), self.save_dtype, None if path.suffix.lower() != ".safetensors" else metadata)
        fill_in_hash(path)


def zero_gradient_link(network: nn.Module) -> torch.Tensor:
    """0 x the sum of the network's trainable weights, added to the prediction at multiplier 0.

    At multiplier 0 the modules skip their forward, so the loss would not depend on the network: backward
    would fail, and DDP would wait for gradients that never come. This keeps every weight in the graph with a
    zero gradient, which is what kohya's modules (multiplying their output by 0) give.
    """
    trainable = [p.sum() for p in network.parameters() if p.requires_grad]
    return torch.stack(trainable).sum() * 0.0 if trainable else torch.zeros(())


@contextlib.contextmanager
def multiplier_set_to(network: Any, multiplier: float) -> Iterator[None]:
    """The network at ``multiplier`` inside the block, back at its previous multiplier after it."""
    before = float(getattr(network, "multiplier", multiplier))
    network.set_multiplier(multiplier)
    try:
        yield
    finally:
        network.set_multiplier(before)


class DatasetNetworkMultiplier(Callback):
    """kohya's dataset key network_multiplier: each batch trains (and validates) the network at its dataset's
    multiplier, set before the batch's text is encoded so text-encoder modules follow it too. A batch never
    mixes datasets (the bucket key starts with the dataset), so one multiplier per batch is exact."""

    def __init__(self, network: Any) -> None:
        self.network = network

    def before_batch(self, run: Any, batch: Batch) -> None:
        self.network.set_multiplier(batch.network_multiplier())


def dataset_multiplier_callbacks(network: Any, datasets: Sequence[Any]) -> list[Callback]:
    """[DatasetNetworkMultiplier] when a dataset sets a network_multiplier other than 1.0, else []."""
    if all(dataset.network_multiplier == 1.0 for dataset in datasets):
        return []
    if not hasattr(network, "set_multiplier"):
        raise NetworkArgumentError("network_multiplier in --dataset_config needs a network with set_multiplier "
                                   "(kohya's plug-in API); this --network_module has none: remove network_multiplier")
    return [DatasetNetworkMultiplier(network)]


def network_options_from_args(args: argparse.Namespace) -> NetworkOptions:
    return NetworkOptions(network_dim=args.network_dim, network_alpha=args.network_alpha,
                          network_dropout=args.network_dropout, network_args=parse_network_args(args.network_args),
                          network_weights=args.network_weights, dim_from_weights=args.dim_from_weights,
                          clip_skip=args.clip_skip)


def create_network(args: argparse.Namespace, model: Any, module: NetworkModule) -> nn.Module:
    """The network ``module`` (a ``--network_module``) builds for ``model``, through kohya's plug-in API."""
    return build_network(module, options=network_options_from_args(args), vae=model.vae,
                         text_encoders=model.text_encoders, unet=model.unet)


def check_network_flags(args: argparse.Namespace) -> None:
    """Flag values no network can use, refused before the model is loaded."""
    if is_lycoris_module(args.network_module):  # the package, algo= and preset=, before the model loads
        check_lycoris_args(args.network_module, parse_network_args(args.network_args))
    if args.network_dim is not None and args.network_dim < 1:
        raise NetworkArgumentError(f"--network_dim must be at least 1 (got {args.network_dim}): it is the LoRA rank, "
                                   "e.g. --network_dim 16")
    missing = [path for path in args.base_weights or () if not Path(path).is_file()]
    if missing:
        raise NetworkArgumentError(f"--base_weights: {missing[0]} is not a file: give the path of a LoRA to merge "
                                   "into the base model")
    if len(args.base_weights_multiplier or ()) > len(args.base_weights or ()):
        raise NetworkArgumentError(f"--base_weights_multiplier has {len(args.base_weights_multiplier)} value(s) for "
                                   f"{len(args.base_weights or ())} --base_weights file(s): give one per file")


def base_weight_ratios(args: argparse.Namespace) -> list[float]:
    """One multiplier per --base_weights file: --base_weights_multiplier's, 1.0 where it has none (kohya's rule)."""
    given = list(args.base_weights_multiplier or ())
    return [given[i] if i < len(given) else 1.0 for i in range(len(args.base_weights or ()))]


def main(argv: list[str] | None = None, *, callbacks: Sequence[Callback] = ()) -> int:
    """``callbacks`` hook into the loop (tests, benchmarks): see library.training.loop.Callback."""
    return script_flow.run_main(build_parser(), partial(train_network, callbacks=callbacks), argv)


def train_network(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                  callbacks: Sequence[Callback] = ()) -> int:
    if not args.output_dir:
        parser.error("--output_dir is required")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        parser.error("--network_train_unet_only and --network_train_text_encoder_only are exclusive")
    train_unet = not args.network_train_text_encoder_only
    train_text_encoder = not args.network_train_unet_only
    if train_text_encoder and (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk):
        parser.error("--cache_text_encoder_outputs needs --network_train_unet_only: a trained text encoder changes its outputs")
    check_network_flags(args)
    session = script_flow.open_session(args)
    model, accelerator = session.model, session.accelerator
    if args.base_weights:  # baked into the frozen model before the trained network wraps it (kohya's order)
        merge_into_model(model, list(args.base_weights), base_weight_ratios(args))

    network = create_network(args, model, import_network_module(args.network_module))
    network.apply_to(model.text_encoders, model.unet, train_text_encoder, train_unet)
    if args.network_weights and not args.dim_from_weights:
        info = network.load_weights(args.network_weights)
        accelerator.print(f"loaded network weights from {args.network_weights}: {info}")
    script_flow.freeze_and_place(session)
    network.to(accelerator.device, dtype=session.weight_dtype if (args.full_fp16 or args.full_bf16) else None)
    network.requires_grad_(True)

    pipeline = script_flow.build_data_pipeline(session)
    # after the --base_weights merge and the caches (filled from the full-precision model, as kohya's are)
    fp8_note = store_base_model_in_fp8(unet=model.unet, text_encoders=model.text_encoders,
                                       options=fp8_options_from_args(args))
    if fp8_note:
        accelerator.print(fp8_note)
    plan, data = pipeline.plan, session.data
    text_encoder_lr = args.text_encoder_lr if args.text_encoder_lr else None
    if text_encoder_lr is not None and len(text_encoder_lr) == 1:
        text_encoder_lr = text_encoder_lr[0]
    params, _ = network.prepare_optimizer_params(text_encoder_lr, args.unet_lr, args.learning_rate)
    if args.fused_backward_pass:  # each LoRA weight steps inside backward, its gradient freed at once
        optimizer, lr_scheduler, optimizer_description = fused_backward.build_fused_optimizer_and_scheduler(
            optimizer_settings_from_args(args), params, plan.max_train_steps, args.max_grad_norm)
    else:
        optimizer, lr_scheduler, optimizer_description = script_flow.build_optimizer(session, params, plan)
    base_metadata = training_metadata(
        metadata_flags_from_args(args), family=model.family, session_id=None, started_at=time.time(), num_train_images=data.num_images,
        num_reg_images=data.num_reg_images, batches_per_epoch=plan.batches_per_epoch_per_process,
        num_epochs=plan.num_epochs, max_train_steps=plan.max_train_steps, optimizer_description=optimizer_description,
        network_args=parse_network_args(args.network_args), dataset_summary=data.summary_for_metadata(),
        tag_freq=tag_frequency(data.caption_sources()), bucket_info=data.bucket_info(), resolution=data.resolution)
    model_spec = model_spec_from_args(args, family=model.family, kind="lora", resolution=data.resolution,
                                      prediction_type=model.prediction_type)
    trainee = LoraTrainee(network, model.unet, model.text_encoders, train_text_encoder, args.gradient_checkpointing,
                          session.save_dtype, base_metadata, args.no_metadata, model_spec)
    own = [MaxNormRegularisation(network, args.scale_weight_norms, accelerator.device)] if args.scale_weight_norms else []
    multiplying = dataset_multiplier_callbacks(network, data.datasets)
    if multiplying:
        accelerator.print("network multiplier per dataset: " + "; ".join(
            f"{dataset.source}: {dataset.network_multiplier:g}" for dataset in data.datasets))
    own += multiplying
    extension = "." + (args.save_model_as or "safetensors")
    return script_flow.run_training(session, pipeline, trainee, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                    optimizer_description=optimizer_description, save_extension=extension,
                                    project_name="network_train", clip_in_loop=not args.fused_backward_pass,
                                    callbacks=[*own, *callbacks])


class MaxNormRegularisation(Callback):
    """--scale_weight_norms: after every optimizer step, scale LoRA weights whose norm exceeds the limit."""

    def __init__(self, network: Any, max_norm: float, device: torch.device) -> None:
        self.network, self.max_norm, self.device = network, max_norm, device

    def after_optimizer_step(self, run: Any, state: Any) -> dict[str, float]:
        keys_scaled, mean_norm, maximum_norm = self.network.apply_max_norm_regularization(self.max_norm, self.device)
        return {"max_norm/keys_scaled": float(keys_scaled), "max_norm/average_key_norm": float(mean_norm),
                "max_norm/max_key_norm": float(maximum_norm)}


if __name__ == "__main__":
    sys.exit(main())
