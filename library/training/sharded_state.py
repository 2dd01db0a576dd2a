"""Complete weights and training state when the trained models are sharded (DeepSpeed ZeRO-3 or FSDP2).

Under ZeRO-3 and FSDP each rank holds a slice of every trained parameter (ZeRO-3: an empty placeholder with the
slice in ``ds_tensor``; FSDP2: a DTensor). Anything that reads whole weights (saving a model file, a LoRA file)
must first gather them, and every rank must take part (the gathers are collectives). What this module offers:

* `model_loading` : accelerate's DeepSpeed plugin registers itself with transformers, which then builds every
  transformers model partitioned (zero.Init) whatever --zero3_init_flag says; a frozen text encoder outside the
  engine would be left as empty placeholders. Models are loaded outside that registration.
* `complete_weights` : on the main process the modules' parameters are, for the duration of the context, plain
  CPU tensors holding the complete gathered weights, so the unchanged save code writes complete files. Gathered
  one sub-module at a time (ZeRO-3) or by torch.distributed.checkpoint's full state dict (FSDP2, offloaded to
  rank 0's CPU), so no rank holds more than one layer of extra weights on its device.
* `sampling_in_lockstep` : sampling runs forward passes; under ZeRO-3/FSDP each layer's forward gathers its
  weights collectively, so every rank must run the same forwards: all ranks draw all prompts.
* `fsdp_local_state` / `load_fsdp_local_state` : a rank's own shards of the trained parameters and of the
  optimizer states as plain tensors (train_state_io writes them as safetensors + JSON, never pickle), and back.
  Exact resume needs the same process count (the shards are cut per rank).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn

ZERO3 = "zero3"
FSDP = "fsdp"


def sharding(accelerator: Any) -> str | None:
    """"zero3", "fsdp", or None when every rank holds the complete trained weights (DDP, ZeRO 0-2)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return ZERO3
    if kind == DistributedType.FSDP:
        return FSDP
    return None


def model_loading(accelerator: Any) -> contextlib.AbstractContextManager:
    """Load models unpartitioned under ZeRO-3 unless --zero3_init_flag (the engine partitions what it trains)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return contextlib.nullcontext()
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage != 3 or plugin.zero3_init_flag:
        return contextlib.nullcontext()
    return _transformers_without_zero3(plugin)


@contextlib.contextmanager
def _transformers_without_zero3(plugin: Any) -> Iterator[None]:
    """accelerate's own zero3_init_context_manager(enable=False) does nothing when the flag is already False,
    yet plugin.select() registered the config with transformers: unregister it while loading, then restore."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def sampling_in_lockstep(accelerator: Any) -> bool:
    """Whether every rank must run the same sampling forwards (and only the main process keeps the images)."""
    return accelerator.num_processes > 1 and sharding(accelerator) is not None


# --------------------------------------------------------------------------------------------------------
# Complete weights
# --------------------------------------------------------------------------------------------------------


def gather_full_weights(accelerator: Any, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """The complete parameters of ``module`` as CPU tensors on the main process (None on the others), or None
    everywhere when nothing is sharded. Collective under ZeRO-3 and FSDP: every rank must call it."""
    kind = sharding(accelerator)
    if kind == ZERO3:
        return _zero3_full_weights(module, accelerator.is_main_process)
    if kind == FSDP:
        return _fsdp_full_weights(module, accelerator.is_main_process)
    return None


def _zero3_full_weights(module: nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    import deepspeed

    full: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if main:
                for name, param in own:
                    full[f"{prefix}.{name}" if prefix else name] = param.detach().cpu().clone()
    return full if main else None


def _fsdp_full_weights(module: nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    names = {name for name, _ in module.named_parameters()}
    return {name: tensor for name, tensor in state.items() if name in names}


@contextlib.contextmanager
def complete_weights(accelerator: Any, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: on the main process, ``modules`` hold their complete weights (plain CPU parameters), so the
    save code needs no change; outside, the sharded parameters are back. No-op when nothing is sharded.
    Collective: every rank must enter it."""
    modules = list(modules)
    if sharding(accelerator) is None:
        yield
        return
    swapped: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in modules:
            full = gather_full_weights(accelerator, module)
            if full is not None:
                swapped += _swap_in(module, full)
        yield
    finally:
        for owner, name, original in reversed(swapped):
            owner._parameters[name] = original


def _swap_in(module: nn.Module, full: dict[str, torch.Tensor]) -> list[tuple[nn.Module, str, Any]]:
    swapped = []
    for prefix, sub in module.named_modules():
        for name, original in list(sub._parameters.items()):
            key = f"{prefix}.{name}" if prefix else name
            if original is None or key not in full:
                continue
            sub._parameters[name] = nn.Parameter(full[key], requires_grad=False)
            swapped.append((sub, name, original))
    return swapped


# --------------------------------------------------------------------------------------------------------
# FSDP training state: each rank's own shards
# --------------------------------------------------------------------------------------------------------


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.detach().cpu()


def _to_local_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _local(value)
    if isinstance(value, dict):
        return {k: _to_local_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_local_tree(v) for v in value)
    return value


def fsdp_local_state(root: nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """This rank's shards: the trained parameters (by name) and the optimizer state (tensors made local)."""
    tensors = {name: _local(p) for name, p in root.named_parameters() if p.requires_grad}
    return tensors, _to_local_tree(optimizer.state_dict())


def load_fsdp_local_state(root: nn.Module, optimizer: Any, tensors: dict[str, torch.Tensor],
                          optimizer_state: Any) -> None:
    """Put back what `fsdp_local_state` returned on this rank; a mismatch raises ValueError naming the tensor."""
    from torch.distributed.tensor import DTensor

    targets = {name: p for name, p in root.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(f"the shards hold other parameters than this run trains ({len(missing)} missing, e.g. "
                         f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    with torch.no_grad():
        for name, param in targets.items():
            local = param.to_local() if isinstance(param, DTensor) else param
            if tuple(local.shape) != tuple(tensors[name].shape):
                raise ValueError(f"{name} is {tuple(tensors[name].shape)} in this rank's shard, {tuple(local.shape)} "
                                 "here: resume with the same number of processes and FSDP settings")
            local.copy_(tensors[name])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in (optimizer_state.get("state") or {}).items():
        param = params[int(index)]
        state[index] = {key: _as_shard_of(value, param) for key, value in entry.items()}
    optimizer.load_state_dict({**optimizer_state, "state": state})


def _as_shard_of(value: Any, param: torch.Tensor) -> Any:
    """A saved local optimizer tensor of ``param``'s shape made a DTensor like ``param`` (scalars stay)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(value, torch.Tensor) or not isinstance(param, DTensor) or value.dim() == 0:
        return value
    local = param.to_local()
    if tuple(value.shape) != tuple(local.shape):
        return value
    return DTensor.from_local(value.to(local.device), device_mesh=param.device_mesh, placements=param.placements,
                              shape=param.shape, stride=param.stride(), run_check=False)
