"""Building the one Accelerator of a training run, and preparing models for it (DDP or DeepSpeed).

Why this module exists: the way the Accelerator is built decides, often silently, what actually runs.
A few facts measured on CPU machines that shaped it (see also the tests, which launch 2 real processes):

* `Accelerator(cpu=True)` is what makes plain multi-process DDP work without CUDA (gloo backend), but the same
  flag silently *drops* DeepSpeed (accelerate only turns DeepSpeed on when `cpu` is False). So `cpu=True` is
  passed only when there is no CUDA *and* DeepSpeed is off.
* Without CUDA the process group must use gloo; accelerate's `InitProcessGroupKwargs` defaults to nccl. The
  handler is only passed for a launched multi-process run: in a single process accelerate would otherwise
  try to read the size of a process group that was never created.
* The DeepSpeed config is built from our flags alone (no hand-synced JSON). accelerate fills
  `train_micro_batch_size_per_gpu` from a prepared DataLoader; our loop does not hand its bucketed loader to
  `prepare`, so the value is set explicitly (and `train_batch_size` is left "auto": accelerate derives it as
  micro batch x accumulation x num_processes at prepare time, instead of reading WORLD_SIZE from the
  environment like kohya, which fails outside a launcher).
* Without `--seed`, every rank would draw its own seed and shuffle buckets differently: `broadcast_seed`
  draws on rank 0 and shares it.

Launching (CPU, measured):
    DDP:       accelerate launch --multi_gpu --num_processes 2 --num_machines 1 script.py ...
    DeepSpeed: the same launch, with `--deepspeed --zero_stage 2` given to the script (the launcher needs no
               DeepSpeed flags). One process: accelerate launch --use_deepspeed --zero_stage 2 --num_processes 1
               script.py --deepspeed --zero_stage 2 (`--multi_gpu` refuses one process, and a plain
               `python script.py --deepspeed` has no process group).
    FSDP2:     the same launch with `--fsdp` given to the script, or a launcher config with distributed_type: FSDP
               (library.training.fsdp_setup; complete weights at saves: library.training.sharded_state).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    DynamoBackend,
    InitProcessGroupKwargs,
    KwargsHandler,
    TorchDynamoPlugin,
    broadcast_object_list,
)
from torch import nn

from library.training.xformers_probe import xformers_unusable_reason
from library.training.fsdp_setup import (
    build_fsdp_plugin,
    enable_fsdp_without_cuda,
    fit_wrap_classes,
    keep_text_encoder_roots_gathered,
    keep_transformers_output_capture,
    resolve_fsdp_options,
)

DEEPSPEED_INSTALL = "DS_BUILD_OPS=0 pip install deepspeed"
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)
OFFLOAD_DEVICES: tuple[str, ...] = ("none", "cpu", "nvme")
LOG_TIME_FORMAT = "%Y%m%d%H%M%S"  # kohya's run-folder suffix
SEED_RANGE = 2**32  # numpy's seed range, which accelerate.utils.set_seed also feeds


# --------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceleratorOptions:
    """What the Accelerator is built from: precision, accumulation, logging, compile, attention, DDP, DeepSpeed.

    Field names are the flags' (library.cli.accelerate_args fills it), so error messages name the flag to fix.
    """

    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    train_batch_size: int = 1
    logging_dir: str | None = None
    log_with: str | None = None
    log_prefix: str | None = None
    torch_compile: bool = False
    dynamo_backend: str = "inductor"
    xformers: bool = False
    deepspeed: bool = False
    zero_stage: int = 2
    offload_optimizer_device: str | None = None
    offload_optimizer_nvme_path: str | None = None
    offload_param_device: str | None = None
    offload_param_nvme_path: str | None = None
    zero3_init_flag: bool = False
    zero3_save_16bit_model: bool = False
    fp16_master_weights_and_gradients: bool = False
    ddp_timeout: int | None = None
    ddp_gradient_as_bucket_view: bool = False
    ddp_static_graph: bool = False
    fsdp: bool = False  # --fsdp, or the launcher enabled FSDP (accelerate_args resolves both)
    fsdp_sharding_strategy: str | None = None  # None: the launcher's, else FULL_SHARD
    fsdp_offload_params: bool | None = None
    fsdp_transformer_layer_cls_to_wrap: str | None = None


def deepspeed_flag_error(options: AcceleratorOptions) -> str | None:
    """The first inconsistent DeepSpeed/DDP flag combination, or None; a flag that would do nothing is an error."""
    if not options.deepspeed:
        ds_only = [name for name in ("offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                                     "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                                     "fp16_master_weights_and_gradients") if getattr(options, name)]
        if ds_only:
            return f"--{ds_only[0]} only applies with --deepspeed"
        return None
    stage = options.zero_stage
    ddp_only = [name for name in ("ddp_gradient_as_bucket_view", "ddp_static_graph") if getattr(options, name)]
    if ddp_only:
        return f"--{ddp_only[0]} configures DDP, which --deepspeed replaces: remove it"
    for kind in ("optimizer", "param"):
        device = getattr(options, f"offload_{kind}_device")
        if device == "nvme" and not getattr(options, f"offload_{kind}_nvme_path"):
            return f"--offload_{kind}_device nvme needs --offload_{kind}_nvme_path"
    if _offloads(options.offload_optimizer_device) and stage == 0:
        return "--offload_optimizer_device needs --zero_stage 1, 2 or 3"
    if _offloads(options.offload_param_device) and stage != 3:
        return f"--offload_param_device needs --zero_stage 3 (got {stage})"
    if (options.zero3_init_flag or options.zero3_save_16bit_model) and stage != 3:
        flag = "--zero3_init_flag" if options.zero3_init_flag else "--zero3_save_16bit_model"
        return f"{flag} needs --zero_stage 3 (got {stage})"
    if options.zero3_init_flag:
        return ("--zero3_init_flag is not supported: transformers would then build the frozen text encoders "
                "partitioned and their forward fails; leave it out (the DeepSpeed engine partitions what trains, and "
                "every save gathers the complete weights)")
    if options.fp16_master_weights_and_gradients:
        if options.mixed_precision != "fp16":
            return "--fp16_master_weights_and_gradients needs --mixed_precision fp16"
        if options.offload_optimizer_device != "cpu" or stage == 0:
            return ("--fp16_master_weights_and_gradients needs --offload_optimizer_device cpu and --zero_stage 1-3 "
                    "(DeepSpeed supports it only with its CPU Adam)")
    return None


FSDP_ONLY_FLAGS = ("fsdp_sharding_strategy", "fsdp_offload_params", "fsdp_transformer_layer_cls_to_wrap")


def fsdp_flag_error(options: AcceleratorOptions) -> str | None:
    """The first FSDP flag that contradicts another, or None."""
    if not options.fsdp:
        given = [name for name in FSDP_ONLY_FLAGS if getattr(options, name) not in (None, False)]
        return f"--{given[0]} only applies with --fsdp" if given else None
    if options.deepspeed:
        return ("--fsdp and --deepspeed both shard the model: choose one (--deepspeed --zero_stage 3 or --fsdp; "
                "a launcher config with distributed_type: FSDP counts as --fsdp)")
    ddp_only = [name for name in ("ddp_gradient_as_bucket_view", "ddp_static_graph") if getattr(options, name)]
    if ddp_only:
        return f"--{ddp_only[0]} configures DDP, which --fsdp replaces: remove it"
    return None


def _offloads(device: str | None) -> bool:
    return device not in (None, "none")


# --------------------------------------------------------------------------------------------------------
# Building the Accelerator
# --------------------------------------------------------------------------------------------------------


def build_accelerator(options: AcceleratorOptions) -> Accelerator:
    """The ONE place the Accelerator is built, so every script gets the same precision, logging and backend.

    Reads --mixed_precision, --gradient_accumulation_steps, --logging_dir/--log_with/--log_prefix,
    --torch_compile/--dynamo_backend, --xformers, the DDP flags and the DeepSpeed flags. Errors that would
    otherwise surface deep inside the first training step (xformers without CUDA, a missing package, a
    launcher that enabled a different DeepSpeed setup) are raised here, before any model is loaded.
    """
    check_xformers(options)
    cuda = torch.cuda.is_available()
    problem = fsdp_flag_error(options)
    if problem is not None:
        raise ValueError(problem)
    deepspeed_plugin = build_deepspeed_plugin(options) if options.deepspeed else None
    fsdp_plugin = build_fsdp_plugin(resolve_fsdp_options(
        sharding_strategy=options.fsdp_sharding_strategy, offload_params=options.fsdp_offload_params,
        extra_wrap_classes=options.fsdp_transformer_layer_cls_to_wrap)) if options.fsdp else None
    if fsdp_plugin is not None and "LOCAL_RANK" not in os.environ:
        raise ValueError("--fsdp needs a distributed launcher: accelerate launch --multi_gpu --num_processes N "
                         "(or accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml)")
    if deepspeed_plugin is not None and "LOCAL_RANK" not in os.environ:
        # Without a launcher DeepSpeed falls back to MPI discovery and dies on a missing mpi4py.
        raise ValueError(f"--deepspeed needs a distributed launcher: accelerate launch --multi_gpu --num_processes N "
                         f"(N >= 2), or for one process accelerate launch --use_deepspeed --zero_stage "
                         f"{options.zero_stage} --num_processes 1")
    if deepspeed_plugin is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError("the launcher enabled DeepSpeed (accelerate config or --use_deepspeed) but the script got "
                         "no --deepspeed: pass --deepspeed --zero_stage N to the training script instead")
    log_with = resolve_log_with(options)
    project_dir = None
    if options.logging_dir is not None:
        project_dir = str(log_run_dir(options.logging_dir, options.log_prefix, time.localtime()))
    accelerator = Accelerator(
        mixed_precision=options.mixed_precision,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        cpu=not cuda and deepspeed_plugin is None,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=build_kwargs_handlers(options, cuda=cuda),
        dynamo_plugin=build_dynamo_plugin(options),
        deepspeed_plugin=deepspeed_plugin,
        fsdp_plugin=fsdp_plugin if cuda else None,
    )
    if fsdp_plugin is not None and not cuda:
        enable_fsdp_without_cuda(accelerator, fsdp_plugin)
    return accelerator


def check_xformers(options: AcceleratorOptions) -> None:
    """Fail at start-up when --xformers cannot work: it has CUDA kernels only, it is an optional package, and a
    wheel built for another torch imports but cannot run (`xformers_unusable_reason`)."""
    if not options.xformers:
        return
    if not torch.cuda.is_available():
        raise ValueError("--xformers needs a CUDA GPU (xformers has no CPU kernels): use --sdpa instead")
    reason = xformers_unusable_reason("cuda")
    if reason is not None:
        raise (ImportError if "pip install xformers" in reason else ValueError)(f"--xformers {reason}")


def resolve_log_with(options: AcceleratorOptions) -> list[str] | None:
    """The trackers --log_with names, tensorboard when only --logging_dir is given (kohya's rule).

    ``all`` is kohya's "TensorBoard and wandb", spelled out: accelerate's own "all" would also start any other
    tracker package that happens to be installed (mlflow, comet_ml, ...).
    """
    log_with = options.log_with
    if log_with is None:
        return ["tensorboard"] if options.logging_dir is not None else None
    if log_with in ("tensorboard", "all") and options.logging_dir is None:
        raise ValueError(f"--log_with {log_with} needs --logging_dir (where the TensorBoard events go)")
    if log_with in ("wandb", "all"):
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ImportError(f"--log_with {log_with} needs the wandb package: pip install wandb")
    return ["tensorboard", "wandb"] if log_with == "all" else [log_with]


def log_run_dir(logging_dir: str | os.PathLike, log_prefix: str | None, now: time.struct_time) -> Path:
    """`logging_dir/<log_prefix><YYYYmmddHHMMSS>`: one folder per run, so runs never mix their event files."""
    return Path(logging_dir) / f"{log_prefix or ''}{time.strftime(LOG_TIME_FORMAT, now)}"


def build_dynamo_plugin(options: AcceleratorOptions) -> TorchDynamoPlugin:
    """Compile only with --torch_compile; otherwise an explicit "no", so a launcher's env cannot compile silently."""
    if not options.torch_compile:
        return TorchDynamoPlugin(backend="no")
    backend = str(options.dynamo_backend)
    if backend.upper() not in DynamoBackend.__members__ or backend.upper() == "NO":
        choices = ", ".join(b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO)
        raise ValueError(f"--dynamo_backend {backend} is not a torch.compile backend accelerate knows ({choices})")
    return TorchDynamoPlugin(backend=backend)


def build_kwargs_handlers(options: AcceleratorOptions, cuda: bool) -> list[KwargsHandler]:
    """Process-group and DDP settings; the process-group handler only for a launched multi-process run."""
    handlers: list[KwargsHandler] = []
    if _launched_world_size() > 1:
        windows = sys.platform == "win32"
        timeout = timedelta(minutes=options.ddp_timeout) if options.ddp_timeout else None
        handlers.append(InitProcessGroupKwargs(
            backend="nccl" if cuda and not windows else "gloo",
            # torch >= 2.4 on Windows is built without libuv; the TCPStore must not ask for it.
            init_method="env://?use_libuv=False" if windows else None,
            timeout=timeout,
        ))
    as_bucket_view = options.ddp_gradient_as_bucket_view
    static_graph = options.ddp_static_graph
    if as_bucket_view or static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=as_bucket_view,
                                                      static_graph=static_graph))
    return handlers


def _launched_world_size() -> int:
    """Processes the launcher (torchrun / accelerate launch) started; 1 for a plain `python script.py`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_deepspeed_plugin(options: AcceleratorOptions) -> DeepSpeedPlugin:
    """A DeepSpeedPlugin from our flags alone; every field is set so no ACCELERATE_DEEPSPEED_* env leaks in."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise ImportError(f"--deepspeed needs deepspeed: {DEEPSPEED_INSTALL}") from error
    problem = deepspeed_flag_error(options)
    if problem is not None:
        raise ValueError(problem)
    _check_launcher_agrees(options)
    plugin = DeepSpeedPlugin(
        hf_ds_config=None,
        zero_stage=options.zero_stage,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        # 0 disables clipping (kohya). It must be 0.0, not None: None makes accelerate write "auto", which it
        # later fills with 1.0, silently clipping a run that asked for none.
        gradient_clipping=float(options.max_grad_norm or 0.0),
        offload_optimizer_device=options.offload_optimizer_device or "none",
        offload_optimizer_nvme_path=options.offload_optimizer_nvme_path or "none",
        offload_param_device=options.offload_param_device or "none",
        offload_param_nvme_path=options.offload_param_nvme_path or "none",
        zero3_init_flag=options.zero3_init_flag,
        zero3_save_16bit_model=options.zero3_save_16bit_model,
    )
    # accelerate can only infer the micro batch from a prepared DataLoader; ours is not prepared.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = options.train_batch_size
    if options.fp16_master_weights_and_gradients:
        # Pre-seeding the fp16 section keeps accelerate's set_mixed_precision from replacing it.
        plugin.deepspeed_config["fp16"] = {"enabled": True, "auto_cast": True, "fp16_master_weights_and_grads": True}
    return plugin


def _check_launcher_agrees(options: AcceleratorOptions) -> None:
    """Our flags are the single source of the DeepSpeed config: refuse a launcher config that says otherwise."""
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file != "none":
        raise ValueError(f"--deepspeed builds the DeepSpeed config from the flags; the launcher's "
                         f"deepspeed_config_file {config_file} would be ignored: remove it from the accelerate config")
    launcher_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if launcher_stage is not None and int(launcher_stage) != options.zero_stage:
        raise ValueError(f"the launcher says ZeRO stage {launcher_stage} but --zero_stage is {options.zero_stage}: "
                         "give the stage to the training script only")


# --------------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------------


def broadcast_seed(accelerator: Accelerator, seed: int | None) -> int:
    """The seed every rank must use: `seed`, or one drawn on rank 0 and sent to all ranks.

    kohya draws a seed per rank when --seed is missing, so ranks shuffle buckets differently and the
    per-rank shards of an epoch overlap. Collective: every rank must call it.
    """
    if seed is not None:
        return int(seed)
    drawn = [random.SystemRandom().randrange(SEED_RANGE) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn, from_process=0)
    return int(drawn[0])


# --------------------------------------------------------------------------------------------------------
# Preparing models
# --------------------------------------------------------------------------------------------------------


class TrainableModules(nn.Module):
    """All trainable modules under one root, because accelerate's DeepSpeed integration takes ONE model.

    The modules are shared, not copied: the loop keeps calling the originals (unet(...), network(...)), and
    ZeRO's gradient hooks live on their parameters, so the engine sees every gradient.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(modules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("TrainableModules is only a container for DeepSpeed: call the wrapped modules directly")


@dataclass
class PreparedTraining:
    """What the loop trains with, the same shape with or without DeepSpeed.

    models:       name -> the module to call in the loop (the DDP wrapper without DeepSpeed; the original,
                  engine-managed module with DeepSpeed).
    optimizer:    the prepared optimizer. Under DeepSpeed its step()/zero_grad() are no-ops: backward() steps.
    lr_scheduler: the prepared scheduler, or None.
    engine:       the DeepSpeed engine around all models, or None without DeepSpeed.
    fsdp_root:    under FSDP, the container the trained modules were sharded in (each an FSDP unit), else None.
    """

    accelerator: Accelerator
    models: dict[str, nn.Module]
    optimizer: Any
    lr_scheduler: Any
    engine: nn.Module | None
    fsdp_root: nn.Module | None = None

    @property
    def uses_deepspeed(self) -> bool:
        return self.engine is not None

    def backward(self, loss: torch.Tensor) -> None:
        """accelerator.backward: plain backward (DDP averages), or engine backward + step at a sync boundary."""
        self.accelerator.backward(loss)

    def clip_grad_norm(self, max_norm: float) -> None:
        """Clip before optimizer.step(); under DeepSpeed the engine clips (gradient_clipping in its config)."""
        if self.uses_deepspeed or not max_norm or not self.accelerator.sync_gradients:
            return
        params = [p for module in self.models.values() for p in module.parameters() if p.requires_grad]
        self.accelerator.clip_grad_norm_(params, max_norm)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass of the wrapped modules.

        Without DeepSpeed accelerate already wraps each prepared module's forward in autocast. Under DeepSpeed
        the engine's own input casting is bypassed (we call the modules, not the engine) while it has cast the
        weights to fp16/bf16, so the forward needs an explicit autocast.
        """
        precision = self.accelerator.mixed_precision
        if (not self.uses_deepspeed and self.fsdp_root is None) or precision not in ("fp16", "bf16"):
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.accelerator.device.type, dtype=dtype)


def prepare_for_deepspeed(accelerator: Accelerator, trainable: dict[str, nn.Module], optimizer: Any,
                          lr_scheduler: Any = None) -> PreparedTraining:
    """Prepare the trainable modules, optimizer and scheduler for DDP or DeepSpeed in one call.

    Under DeepSpeed the modules go into one `TrainableModules` and are prepared TOGETHER with the optimizer:
    ZeRO replaces the optimizer with one that partitions its states and gradients over the ranks, which
    needs the model and optimizer in the same deepspeed.initialize (kohya PR #1139/#1200; preparing them
    separately fails with "zero stage 2 requires an optimizer"). Without DeepSpeed each module is prepared
    on its own (DDP per module) together with the optimizer and scheduler.
    """
    if not trainable:
        raise ValueError("prepare_for_deepspeed needs at least one trainable module")
    names = list(trainable)
    extras = [optimizer] + ([lr_scheduler] if lr_scheduler is not None else [])
    fsdp_root = None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        engine, *prepared = accelerator.prepare(TrainableModules(dict(trainable)), *extras)
        models = dict(trainable)
    elif accelerator.distributed_type == DistributedType.FSDP:
        # accelerate's FSDP2 shards ONE model: the container, with each trained module an FSDP unit of its own
        # (fully_shard works in place, so the loop keeps calling the original modules).
        container = TrainableModules(dict(trainable))
        fit_wrap_classes(accelerator.state.fsdp_plugin, container)
        fsdp_root, *prepared = accelerator.prepare(container, *extras)
        keep_transformers_output_capture(fsdp_root)
        keep_text_encoder_roots_gathered(fsdp_root)
        engine, models = None, dict(trainable)
    else:
        results = accelerator.prepare(*trainable.values(), *extras)
        engine, models, prepared = None, dict(zip(names, results[:len(names)])), list(results[len(names):])
    return PreparedTraining(accelerator=accelerator, models=models, optimizer=prepared[0],
                            lr_scheduler=prepared[1] if lr_scheduler is not None else None, engine=engine,
                            fsdp_root=fsdp_root)


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------


def unwrap(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """The plain module behind DDP, torch.compile (`_orig_mod`) and the DeepSpeed engine, for saving."""
    return accelerator.unwrap_model(module, keep_torch_compile=False)


def gather_state_dict(accelerator: Accelerator, module: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of `module` (CPU tensors) on every rank, whatever ZeRO did to its parameters.

    Without DeepSpeed, and under ZeRO stage 0-2, every rank holds the full weights (stages 1/2 partition
    only optimizer states and gradients), so the unwrapped module's state dict is complete. Under ZeRO
    stage 3 each rank holds a slice of every parameter; the slices are gathered with
    deepspeed.zero.GatheredParameters, which works for one sub-module of the engine as well as the whole
    (accelerator.get_state_dict only takes the engine, and refuses unless --zero3_save_16bit_model).
    Collective under stage 3: every rank must call it.
    """
    plain = unwrap(accelerator, module)
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None or plugin.zero_stage != 3:
        return {key: value.detach().cpu().clone() for key, value in plain.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(plain.parameters()), modifier_rank=None):
        return {key: value.detach().cpu().clone() for key, value in plain.state_dict().items()}

