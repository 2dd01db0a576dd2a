"""library/accelerate_utils: building the Accelerator, seeds, and DDP / DeepSpeed ZeRO-2 runs with 2 real processes.

The two launch tests start `accelerate launch --multi_gpu --num_processes 2` on CPU and check that both ranks
end with the weights of one process trained on both ranks' batches (i.e. gradients were averaged).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, DynamoBackend, InitProcessGroupKwargs
from torch import nn

from library.training.accelerate_utils import (
    DEEPSPEED_INSTALL,
    TrainableModules,
    broadcast_seed,
    build_accelerator,
    build_deepspeed_plugin,
    build_dynamo_plugin,
    build_kwargs_handlers,
    check_xformers,
    deepspeed_flag_error,
    gather_state_dict,
    log_run_dir,
    prepare_for_deepspeed,
    unwrap,
)
from library.cli.accelerate_args import accelerator_options_from_args, add_accelerate_arguments
from library.cli.config import build_parser, parse_args
from library.cli.data_args import add_dataset_arguments
from library.cli.training_args import add_training_arguments

REPO = Path(__file__).resolve().parents[1]
PROBE_PATH = REPO / "tests" / "helpers" / "ddp_probe.py"
LAUNCH_TIMEOUT_S = 180  # the first DeepSpeed run compiles a small comm op with gcc


def _load_probe():
    spec = importlib.util.spec_from_file_location("ddp_probe", PROBE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load_probe()


def make_args(*argv: str):
    """The AcceleratorOptions the flags give (parsed and validated as a script would)."""
    parser = build_parser("test", add_dataset_arguments, add_training_arguments, add_accelerate_arguments)
    return accelerator_options_from_args(parse_args(parser, list(argv)))


# --------------------------------------------------------------------------------------------------------
# Building the Accelerator in-process
# --------------------------------------------------------------------------------------------------------


def test_plain_cpu_accelerator_logs_to_tensorboard_in_a_timestamped_run_dir(tmp_path):
    before = time.time()
    accelerator = build_accelerator(make_args("--logging_dir", str(tmp_path), "--log_prefix", "run-",
                                              "--gradient_accumulation_steps", "3"))
    after = time.time()
    assert accelerator.distributed_type == DistributedType.NO
    assert accelerator.num_processes == 1
    assert accelerator.device == torch.device("cpu")
    assert accelerator.mixed_precision == "no"
    assert accelerator.gradient_accumulation_steps == 3
    assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    assert [str(t.value) for t in accelerator.log_with] == ["tensorboard"]
    run_dir = Path(accelerator.project_dir)
    assert run_dir.parent == tmp_path
    match = re.fullmatch(r"run-(\d{14})", run_dir.name)
    assert match is not None, run_dir.name
    stamp = time.mktime(time.strptime(match.group(1), "%Y%m%d%H%M%S"))
    assert int(before) - 1 <= stamp <= after


def test_no_logging_dir_means_no_tracker():
    accelerator = build_accelerator(make_args())
    assert accelerator.log_with == []
    assert accelerator.project_dir is None


def test_log_run_dir_is_prefix_plus_timestamp():
    now = time.strptime("2024-03-05 07:08:09", "%Y-%m-%d %H:%M:%S")
    assert log_run_dir("logs", "sdxl_", now) == Path("logs/sdxl_20240305070809")
    assert log_run_dir("logs", None, now) == Path("logs/20240305070809")


def test_tensorboard_without_logging_dir_is_an_error():
    with pytest.raises(ValueError, match="--log_with tensorboard needs --logging_dir"):
        build_accelerator(make_args("--log_with", "tensorboard"))


def test_dynamo_backend_only_with_torch_compile():
    assert build_dynamo_plugin(make_args("--dynamo_backend", "eager")).backend == DynamoBackend.NO
    assert build_dynamo_plugin(make_args("--torch_compile", "--dynamo_backend", "eager")).backend == DynamoBackend.EAGER
    assert build_dynamo_plugin(make_args("--torch_compile")).backend == DynamoBackend.INDUCTOR
    with pytest.raises(ValueError, match="--dynamo_backend inductr is not"):
        build_dynamo_plugin(make_args("--torch_compile", "--dynamo_backend", "inductr"))


def test_xformers_without_cuda_is_a_startup_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--xformers needs a CUDA GPU .*use --sdpa"):
        check_xformers(make_args("--xformers"))
    check_xformers(make_args("--sdpa"))  # nothing to check without --xformers


def test_xformers_without_the_package_names_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    with pytest.raises(ImportError, match="--xformers needs the xformers package: pip install xformers"):
        check_xformers(make_args("--xformers"))


def test_deepspeed_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ImportError) as error:
        build_deepspeed_plugin(make_args("--deepspeed"))
    assert str(error.value) == "--deepspeed needs deepspeed: DS_BUILD_OPS=0 pip install deepspeed"
    assert DEEPSPEED_INSTALL == "DS_BUILD_OPS=0 pip install deepspeed"


def _require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail(f"deepspeed is not installed; install it with: {DEEPSPEED_INSTALL}")


def test_deepspeed_plugin_config_comes_from_the_flags():
    _require_deepspeed()
    plugin = build_deepspeed_plugin(make_args(
        "--deepspeed", "--zero_stage", "2", "--train_batch_size", "3", "--gradient_accumulation_steps", "4",
        "--max_grad_norm", "0.5", "--offload_optimizer_device", "cpu"))
    config = plugin.deepspeed_config
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["train_batch_size"] == "auto"  # accelerate fills micro x accumulation x num_processes
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "nvme_path": None}
    assert config["zero_optimization"]["offload_param"] == {"device": "none", "nvme_path": None}
    assert plugin.zero3_init_flag is False

    no_clip = build_deepspeed_plugin(make_args("--deepspeed", "--max_grad_norm", "0"))
    assert "gradient_clipping" not in no_clip.deepspeed_config

    stage3 = build_deepspeed_plugin(make_args(
        "--deepspeed", "--zero_stage", "3", "--zero3_save_16bit_model",
        "--offload_param_device", "nvme", "--offload_param_nvme_path", "/nvme"))
    zero = stage3.deepspeed_config["zero_optimization"]
    assert (zero["stage"], zero["offload_param"], zero["stage3_gather_16bit_weights_on_model_save"]) == (
        3, {"device": "nvme", "nvme_path": "/nvme"}, True)
    assert stage3.zero3_init_flag is False

    fp16_master = build_deepspeed_plugin(make_args(
        "--deepspeed", "--mixed_precision", "fp16", "--offload_optimizer_device", "cpu",
        "--fp16_master_weights_and_gradients"))
    assert fp16_master.deepspeed_config["fp16"]["fp16_master_weights_and_grads"] is True


@pytest.mark.parametrize("argv, message", [
    (["--zero3_init_flag"], "--zero3_init_flag only applies with --deepspeed"),
    (["--deepspeed", "--zero_stage", "3", "--zero3_init_flag"], "--zero3_init_flag is not supported: transformers"),
    (["--deepspeed", "--ddp_static_graph"], "--ddp_static_graph configures DDP, which --deepspeed replaces"),
    (["--deepspeed", "--offload_param_device", "cpu"], "--offload_param_device needs --zero_stage 3 (got 2)"),
    (["--deepspeed", "--offload_optimizer_device", "nvme"],
     "--offload_optimizer_device nvme needs --offload_optimizer_nvme_path"),
    (["--deepspeed", "--fp16_master_weights_and_gradients", "--offload_optimizer_device", "cpu"],
     "--fp16_master_weights_and_gradients needs --mixed_precision fp16"),
])
def test_inconsistent_deepspeed_flags_fail_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_args(*argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_consistent_deepspeed_flags_pass():
    assert deepspeed_flag_error(make_args("--deepspeed", "--zero_stage", "3", "--offload_param_device", "cpu",
                                          "--offload_optimizer_device", "cpu", "--zero3_save_16bit_model")) is None
    assert deepspeed_flag_error(make_args("--ddp_static_graph", "--ddp_timeout", "5")) is None


def test_launcher_deepspeed_without_the_flag_is_an_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="launcher enabled DeepSpeed .* no --deepspeed"):
        build_accelerator(make_args())


def test_deepspeed_without_a_launcher_is_an_error():
    _require_deepspeed()
    with pytest.raises(ValueError, match="--deepspeed needs a distributed launcher: accelerate launch --multi_gpu"):
        build_accelerator(make_args("--deepspeed"))


def test_launcher_zero_stage_must_match_the_flag(monkeypatch):
    _require_deepspeed()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="launcher says ZeRO stage 3 but --zero_stage is 2"):
        build_deepspeed_plugin(make_args("--deepspeed"))


def test_kwargs_handlers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert build_kwargs_handlers(make_args(), cuda=False) == []

    monkeypatch.setenv("WORLD_SIZE", "2")
    (group,) = build_kwargs_handlers(make_args("--ddp_timeout", "90"), cuda=False)
    assert isinstance(group, InitProcessGroupKwargs)
    assert (group.backend, group.timeout) == ("gloo", timedelta(minutes=90))
    if sys.platform != "win32":
        (cuda_group,) = build_kwargs_handlers(make_args(), cuda=True)
        assert (cuda_group.backend, cuda_group.timeout) == ("nccl", timedelta(seconds=600))

    _, ddp = build_kwargs_handlers(make_args("--ddp_static_graph"), cuda=False)
    assert isinstance(ddp, DistributedDataParallelKwargs)
    assert (ddp.static_graph, ddp.gradient_as_bucket_view) == (True, False)


def test_broadcast_seed_single_process():
    accelerator = build_accelerator(make_args())
    assert broadcast_seed(accelerator, 1234) == 1234
    assert broadcast_seed(accelerator, 0) == 0
    drawn = [broadcast_seed(accelerator, None) for _ in range(3)]
    assert all(isinstance(seed, int) and 0 <= seed < 2**32 for seed in drawn)
    assert len(set(drawn)) == 3  # fresh draws (a collision has probability ~1e-9)


def test_prepare_without_deepspeed_trains_like_plain_torch():
    """Single process: one step through PreparedTraining equals one hand-run AdamW step."""
    accelerator = build_accelerator(make_args())
    model = probe.build_model()
    prepared = prepare_for_deepspeed(accelerator, {"linear": model}, probe.make_optimizer(model.parameters()))
    assert prepared.uses_deepspeed is False and prepared.lr_scheduler is None
    x, y = probe.rank_batch(0, 0)
    with prepared.autocast():
        loss = nn.functional.mse_loss(prepared.models["linear"](x), y)
    prepared.backward(loss)
    prepared.clip_grad_norm(1.0)
    prepared.optimizer.step()
    prepared.optimizer.zero_grad()

    reference = probe.build_model()
    optimizer = probe.make_optimizer(reference.parameters())
    nn.functional.mse_loss(reference(x), y).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer.step()
    assert torch.allclose(model.weight, reference.weight, atol=1e-7)
    assert not torch.allclose(model.weight, probe.build_model().weight)  # it did move
    state = gather_state_dict(accelerator, prepared.models["linear"])
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], model.weight.detach())


def test_unwrap_removes_torch_compile():
    accelerator = build_accelerator(make_args())
    model = nn.Linear(2, 2)
    assert unwrap(accelerator, torch.compile(model)) is model  # compiling is lazy: nothing is compiled here
    assert unwrap(accelerator, model) is model


def test_trainable_modules_share_the_originals():
    unet, network = nn.Linear(2, 2), nn.Linear(2, 3)
    wrapper = TrainableModules({"unet": unet, "network": network})
    assert wrapper.models["unet"] is unet and wrapper.models["network"] is network
    assert sum(p.numel() for p in wrapper.parameters()) == 6 + 9
    with pytest.raises(RuntimeError, match="call the wrapped modules directly"):
        wrapper(torch.zeros(1, 2))


# --------------------------------------------------------------------------------------------------------
# Two real processes
# --------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    """Another test run on the machine may hold accelerate's default port 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_probe(out_dir: Path, *probe_flags: str) -> list[dict]:
    """`accelerate launch --multi_gpu --num_processes 2` the probe; return the per-rank JSON results."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(PROBE_PATH), str(out_dir), *probe_flags]
    env = {name: value for name, value in os.environ.items() if not name.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, f"launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def assert_gradients_were_averaged(ranks: list[dict]) -> None:
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert ranks[0]["seed"] == ranks[1]["seed"] and 0 <= ranks[0]["seed"] < 2**32
    assert ranks[0]["weight"] == ranks[1]["weight"] and ranks[0]["bias"] == ranks[1]["bias"]
    both = probe.train_reference([0, 1], max_grad_norm=1.0)
    rank0_only = probe.train_reference([0], max_grad_norm=1.0)
    trained = torch.tensor(ranks[0]["weight"] + ranks[0]["bias"])
    assert torch.allclose(trained, torch.tensor(both["weight"] + both["bias"]), atol=1e-6)
    assert not torch.allclose(trained, torch.tensor(rank0_only["weight"] + rank0_only["bias"]), atol=1e-3)


def test_ddp_two_cpu_processes_average_gradients(tmp_path):
    ranks = launch_probe(tmp_path)
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.MULTI_CPU"] * 2
    assert [r["deepspeed"] for r in ranks] == [False, False]
    assert_gradients_were_averaged(ranks)


def test_deepspeed_zero2_two_cpu_processes(tmp_path):
    _require_deepspeed()
    ranks = launch_probe(tmp_path, "--deepspeed", "--zero_stage", "2")
    assert [r["distributed_type"] for r in ranks] == ["DistributedType.DEEPSPEED"] * 2
    assert [(r["deepspeed"], r["zero_stage"]) for r in ranks] == [(True, 2), (True, 2)]
    assert_gradients_were_averaged(ranks)


def _fake_xformers(monkeypatch, attention) -> None:
    """An importable `xformers` whose ops.memory_efficient_attention is ``attention``."""
    import types

    package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    package.__version__, ops.memory_efficient_attention, package.ops = "0.0.35", attention, ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_an_xformers_built_for_another_torch_is_refused_at_start_up(monkeypatch):
    """Seen on an H200: xformers 0.0.35 (built for torch 2.10) imports under torch 2.11, then every attention call
    raises. The probe's one tiny call turns that into one line naming the version and the fix."""
    from library.training import accelerate_utils
    from library.training.xformers_probe import xformers_unusable_reason

    def broken(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n"
                                  "     query : shape=(1, 8, 1, 64) (torch.float16)")

    _fake_xformers(monkeypatch, broken)
    reason = xformers_unusable_reason("cpu")
    assert reason == (f"cannot work here: the installed xformers 0.0.35 cannot run attention with torch {torch.__version__} (No operator "
                      "found for `memory_efficient_attention_forward` with inputs:): install the xformers build made "
                      "for this torch and CUDA, or use --sdpa")
    _fake_xformers(monkeypatch, lambda q, k, v: q.clone())
    assert xformers_unusable_reason("cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate_utils, "xformers_unusable_reason", lambda device: reason)
    with pytest.raises(ValueError, match=r"^--xformers cannot work here: the installed xformers 0.0.35 cannot run attention"):
        check_xformers(make_args("--xformers"))
