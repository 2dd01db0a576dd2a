"""FSDP2 (torch.distributed.fsdp.fully_shard) through accelerate: options, the plugin, and the CPU switch.

Why this module exists: accelerate builds FSDP from two sources (our flags and the launcher's config) and picks
its version, wrapping and sharding from environment variables when a field is left empty. Here every field is
set explicitly from `FsdpOptions`, which merge the script flags with the launcher's settings and refuse a
contradiction, so what runs is what the user asked for. Facts measured on torch 2.13 / accelerate 1.15 (CPU):

* FSDP2 runs on CPU with gloo (gloo has reduce_scatter), but accelerate only turns FSDP on for accelerator
  devices (AcceleratorState sets DistributedType.FSDP only for MULTI_GPU/XPU/NPU/... types). On CPU the
  Accelerator is built as MULTI_CPU and then switched to FSDP (`enable_fsdp_without_cuda`); accelerate's FSDP2
  prepare, backward, clipping and step then work unchanged.
* FSDP1 does not run on CPU through accelerate ("Inconsistent compute device and `device_id` on rank 0: cpu vs
  cpu:0"), and FSDP2 is what accelerate recommends: only fsdp_version 2 is offered.
* accelerate's FSDP2 prepares ONE model: the trained modules go into one container whose forward never runs,
  so every trained module must be an FSDP unit of its own (else its loose parameters would belong to the
  container's unit and never be gathered). The wrap classes therefore always include the trained models'
  classes, and only classes present in the model are named (accelerate refuses a class it cannot find).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

FSDP_SHARDING_STRATEGIES: tuple[str, ...] = ("FULL_SHARD", "SHARD_GRAD_OP")
# Blocks that become their own FSDP unit (gathered one at a time in forward/backward).
FSDP_BLOCK_CLASSES: tuple[str, ...] = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")
# Trained models: each must be a unit (see the module docstring).
FSDP_MODEL_CLASSES: tuple[str, ...] = ("UNet2DConditionModel", "ControlNetModel", "CLIPTextModel",
                                       "CLIPTextModelWithProjection")
_ENV = "FSDP_"


@dataclass(frozen=True)
class FsdpOptions:
    """How FSDP2 shards: FULL_SHARD frees gathered weights after each block's forward (ZeRO-3-like),
    SHARD_GRAD_OP keeps them until backward (ZeRO-2-like, faster, more memory)."""

    sharding_strategy: str = "FULL_SHARD"
    offload_params: bool = False
    extra_wrap_classes: tuple[str, ...] = ()


def launcher_uses_fsdp() -> bool:
    """`accelerate launch --use_fsdp` or a config file with `distributed_type: FSDP`."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _launcher_bool(name: str) -> bool | None:
    value = os.environ.get(_ENV + name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes")


def resolve_fsdp_options(*, sharding_strategy: str | None, offload_params: bool | None,
                         extra_wrap_classes: str | None) -> FsdpOptions:
    """The script flags (None: not given) merged with the launcher's FSDP settings; a contradiction raises."""
    if not launcher_uses_fsdp():
        return FsdpOptions(sharding_strategy=sharding_strategy or "FULL_SHARD", offload_params=bool(offload_params),
                           extra_wrap_classes=_class_list(extra_wrap_classes))
    version = os.environ.get(_ENV + "VERSION", "1")
    if version.strip() != "2":
        raise ValueError(f"the launcher asks for FSDP version {version}; this trainer runs FSDP2: set fsdp_version: 2 "
                         "in the accelerate config (or accelerate launch --fsdp_version 2)")
    policy = os.environ.get(_ENV + "AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ValueError(f"the launcher's fsdp_auto_wrap_policy is {policy}; this trainer wraps by block class: set "
                         "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (extra classes in "
                         "fsdp_transformer_layer_cls_to_wrap)")
    reshard = _launcher_bool("RESHARD_AFTER_FORWARD")
    launcher_strategy = None if reshard is None else ("FULL_SHARD" if reshard else "SHARD_GRAD_OP")
    legacy = os.environ.get(_ENV + "SHARDING_STRATEGY")
    if launcher_strategy is None and legacy is not None and legacy.upper() in FSDP_SHARDING_STRATEGIES:
        launcher_strategy = legacy.upper()
    if sharding_strategy and launcher_strategy and sharding_strategy != launcher_strategy:
        raise ValueError(f"--fsdp_sharding_strategy {sharding_strategy} contradicts the launcher's "
                         f"fsdp_reshard_after_forward ({launcher_strategy}): give it in one place only")
    launcher_offload = _launcher_bool("OFFLOAD_PARAMS")
    if offload_params is not None and launcher_offload is not None and offload_params != launcher_offload:
        raise ValueError("--fsdp_offload_params contradicts the launcher's fsdp_offload_params: give it in one place "
                         "only")
    classes = _class_list(extra_wrap_classes) + _class_list(os.environ.get(_ENV + "TRANSFORMER_CLS_TO_WRAP"))
    return FsdpOptions(sharding_strategy=sharding_strategy or launcher_strategy or "FULL_SHARD",
                       offload_params=bool(offload_params if offload_params is not None else launcher_offload),
                       extra_wrap_classes=tuple(dict.fromkeys(classes)))


def _class_list(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in (text or "").split(",") if name.strip())


def build_fsdp_plugin(options: FsdpOptions) -> Any:
    """A FullyShardedDataParallelPlugin with every field set, so no FSDP_* environment variable leaks in."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    offload = None
    if options.offload_params:
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = CPUOffloadPolicy()
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=options.sharding_strategy == "FULL_SHARD",
        cpu_offload=offload if offload is not None else False,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(FSDP_BLOCK_CLASSES + FSDP_MODEL_CLASSES + options.extra_wrap_classes),
        state_dict_type="SHARDED_STATE_DICT",
        activation_checkpointing=False,  # --gradient_checkpointing does it inside the models
        cpu_ram_efficient_loading=False,
        ignored_modules=None,
    )


def enable_fsdp_without_cuda(accelerator: Any, plugin: Any) -> None:
    """Switch a MULTI_CPU (gloo) Accelerator to FSDP: accelerate turns FSDP on only for accelerator devices."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # Both shared states: every AcceleratorState() call copies PartialState's fields over its own.
    PartialState().distributed_type = DistributedType.FSDP
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)


def fit_wrap_classes(plugin: Any, model: nn.Module) -> list[str]:
    """Keep only the wrap classes present in ``model`` (accelerate refuses a class it cannot find); returned."""
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in plugin.transformer_cls_names_to_wrap
               if name not in present and name not in FSDP_BLOCK_CLASSES + FSDP_MODEL_CLASSES]
    if missing:
        raise ValueError(f"--fsdp_transformer_layer_cls_to_wrap: no module of class {missing[0]} in the trained "
                         f"models (classes there include {', '.join(sorted(present)[:8])})")
    kept = [name for name in plugin.transformer_cls_names_to_wrap if name in present]
    plugin.transformer_cls_names_to_wrap = kept
    return kept


def keep_transformers_output_capture(model: nn.Module) -> int:
    """fully_shard swaps each wrapped module's class for an ``FSDP<Name>`` subclass; transformers 5 looks up which
    outputs a model can record (hidden_states) by the exact class, so a sharded CLIP would return no
    hidden_states. The subclasses get their base class's entry; returns how many were added."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:  # transformers 4 records hidden states without this registry
        return 0
    added = 0
    for module in model.modules():
        cls = type(module)
        if dict.get(registry, str(cls)) is not None:
            continue
        base = next((b for b in cls.__mro__[1:] if dict.get(registry, str(b)) is not None), None)
        if base is not None:
            dict.__setitem__(registry, str(cls), dict.get(registry, str(base)))
            added += 1
    return added


TEXT_ENCODER_CLASSES: tuple[str, ...] = ("CLIPTextModel", "CLIPTextModelWithProjection")


def keep_text_encoder_roots_gathered(model: nn.Module) -> int:
    """Our prompt encoding applies a text encoder's text_projection / final_layer_norm after its forward
    (kohya's pooling, clip skip); those weights belong to the encoder's own FSDP unit, which would be resharded
    when its forward returns. Those units keep their weights until backward (their blocks still reshard)."""
    from torch.distributed.fsdp import FSDPModule

    kept = 0
    for module in model.modules():
        if isinstance(module, FSDPModule) and any(c.__name__ in TEXT_ENCODER_CLASSES for c in type(module).__mro__):
            module.set_reshard_after_forward(False, recurse=False)
            kept += 1
    return kept
