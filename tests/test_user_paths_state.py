"""--save_state / --resume as a user types them: no pickle is ever loaded, a state holds only what trains,
changed flags are applied or refused, interrupted saves recover, --resume auto, NaN stops name a usable state,
and broken state folders are one `error:` line."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.training.checkpoints import read_training_state
from library.training.train_state_io import StateError, check_deepspeed_pickles, recover_output_dir, state_before_divergence
from tests.helpers.user_paths import assert_one_error_line, lora_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lora_run(tiny_model_dirs, shapes_data, tmp_path_factory) -> Path:
    """A 2-step LoRA run on the tiny SD1.5 model with --save_state every step: lora-step00000001-state and the
    final lora-state. Read-only: tests that damage a state copy it."""
    output = tmp_path_factory.mktemp("lora_run") / "out"
    command = [sys.executable, str(ROOT / "train_network.py"),
               *lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2, "--save_state", "--save_every_n_steps", "1")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def copy_state(lora_run: Path, tmp_path: Path, name: str = "lora-step00000001-state") -> Path:
    target = tmp_path / "copies" / name
    shutil.copytree(lora_run / name, target)
    return target


# ---- E13: only what trains ------------------------------------------------------------------------------


def test_lora_state_holds_only_the_lora_and_its_optimizer(lora_run):
    state = lora_run / "lora-state"
    files = {p.name: p.stat().st_size for p in state.iterdir()}
    assert all(name.endswith((".json", ".safetensors")) for name in files), files  # nothing pickled
    assert {"model_lora_unet.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "rng_0.json", "rng_0.safetensors", "train_state.json"} <= set(files)
    lora = load_file(str(lora_run / "lora.safetensors"))
    model = load_file(str(state / "model_lora_unet.safetensors"))
    assert {k.removeprefix("network.") for k in model} == {k for k in lora if not k.endswith(".alpha")}
    # before: 11,497,091 bytes (the whole frozen UNet, 684 tensors, pickled optimizer/RNG); LoRA 483,064 bytes
    optimizer = files["optimizer.safetensors"] + files["optimizer.json"]
    overhead = sum(files.values()) - files["model_lora_unet.safetensors"] - optimizer
    assert files["model_lora_unet.safetensors"] <= (lora_run / "lora.safetensors").stat().st_size
    assert overhead < 32_000, files
    assert sum(files.values()) < 1_600_000, files


# ---- C8: no pickle is ever unpickled --------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this calls open(marker, "w"): the file appears if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_sdxl_ema_state_is_safetensors_and_a_planted_pickle_is_refused(tiny_model_dirs, shapes_data, tmp_path,
                                                                       run_script, run_in_process):
    args = ["--pretrained_model_name_or_path", str(tiny_model_dirs["sdxl"]), "--in_json", str(shapes_data / "meta.json"),
            "--train_data_dir", str(shapes_data / "images"), "--resolution", "64", "--learning_rate", "1e-3",
            "--seed", "5", "--max_data_loader_n_workers", "0", "--output_name", "model", "--use_ema",
            "--save_model_as", "safetensors"]
    first = tmp_path / "first"
    run_script("train_sdxl.py", args + ["--output_dir", first, "--max_train_steps", "1", "--save_state"])
    state = first / "model-state"
    names = sorted(p.name for p in state.iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    ema = load_file(str(state / "custom_0.safetensors"))
    assert ema and all(k.startswith("shadow/unet.") for k in ema)  # the EMA weights, as safetensors

    marker = tmp_path / "code_ran"
    (state / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_CreatesFile(marker)))
    result = run_script("train_sdxl.py", args + ["--output_dir", tmp_path / "second", "--max_train_steps", "2",
                                                 "--resume", state], expect_rc=1)
    line = assert_one_error_line(result)
    assert "custom_checkpoint_0.pkl" in line and "unpickl" in line
    assert not marker.exists()

    # a folder written by accelerate's save_state (older versions): its pickles are refused too
    old = tmp_path / "old-state"
    old.mkdir()
    (old / "train_state.json").write_text(json.dumps({"global_step": 1, "epoch": 1, "batches_done_in_epoch": 1,
                                                      "seed": 5}))
    torch.save({"step": 1}, old / "optimizer.bin")
    (old / "random_states_0.pkl").write_bytes(pickle.dumps(_CreatesFile(marker)))
    result = run_in_process("train_sdxl.py", args + ["--output_dir", tmp_path / "third", "--max_train_steps", "2",
                                                     "--resume", old], expect_rc=1)
    line = assert_one_error_line(result)
    assert "optimizer.bin" in line and "random_states_0.pkl" in line
    assert not marker.exists()


def test_deepspeed_checkpoint_pickles_go_through_the_weights_only_unpickler(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "ds-state"
    (folder / "deepspeed" / "engine").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19", "global_steps": 3},
               folder / "deepspeed" / "engine" / "mp_rank_00_model_states.pt")
    check_deepspeed_pickles(folder)  # tensors, containers and plain values pass
    with open(folder / "deepspeed" / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as handle:
        pickle.dump({"optimizer": _CreatesFile(marker)}, handle)
    with pytest.raises(StateError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        check_deepspeed_pickles(folder)
    assert not marker.exists()


# ---- D12: broken state folders are one error line -------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


_BROKEN_STATES = [
    (lambda s: (s / "train_state.json").write_text("{\"global_step\": 1, "), "train_state.json"),
    (lambda s: (s / "train_state.json").write_text(json.dumps({"epoch": 1})), "train_state.json"),
    (lambda s: _truncate(s / "optimizer.safetensors"), "optimizer.safetensors"),
    (lambda s: _truncate(s / "model_lora_unet.safetensors"), "model_lora_unet.safetensors"),
    (lambda s: (s / "rng_0.json").unlink(), "rng_0.json"),
]


@pytest.mark.parametrize("damage, named", _BROKEN_STATES,
                         ids=["bad-json", "missing-keys", "truncated-optimizer", "truncated-model", "missing-file"])
def test_broken_state_folder_is_one_error_line(lora_run, tiny_model_dirs, shapes_data, tmp_path, run_script,
                                               run_in_process, damage, named):
    state = copy_state(lora_run, tmp_path)
    damage(state)
    run = run_script if (damage, named) == _BROKEN_STATES[0] else run_in_process  # one real process is enough
    result = run("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 3,
                                               "--resume", state), expect_rc=1)
    line = assert_one_error_line(result)
    assert named in line and "resume from another state folder" in line
    assert "loading" not in result.stdout.lower() or "resum" not in result.stdout.lower()


# ---- E14: changed flags ---------------------------------------------------------------------------------


def test_resume_applies_a_new_learning_rate_and_records_it(lora_run, tiny_model_dirs, shapes_data, tmp_path,
                                                           run_script):
    """--learning_rate 1e-12 on resume: the old code kept training at 1e-3 (AdamW moves each weight ~lr per
    step); now the LoRA stays within ~1e-12 of the state's."""
    state = lora_run / "lora-step00000001-state"
    output = tmp_path / "out"
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, output, 3,
                                                      "--resume", state, "--learning_rate", "1e-12"))
    assert "resume: --learning_rate 0.001 -> --learning_rate 1e-12 (applied)" in result.stdout
    assert "resume: --max_train_steps 2 -> --max_train_steps 3 (applied)" in result.stdout
    saved = load_file(str(state / "model_lora_unet.safetensors"))
    final = load_file(str(output / "lora.safetensors"))
    for key, value in saved.items():
        assert (final[key.removeprefix("network.")] - value).abs().max() < 1e-9, key
    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert float(metadata["ss_learning_rate"]) == 1e-12 and metadata["ss_seed"] == "3"


def test_resume_refuses_another_network_shape_or_base_model(lora_run, tiny_model_dirs, shapes_data, tmp_path,
                                                            run_script, run_in_process):
    state = lora_run / "lora-step00000001-state"
    args = lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "a", 3, "--resume", state, "--network_dim", "8")
    line = assert_one_error_line(run_script("train_network.py", args, expect_rc=1))
    assert "--network_dim 8" in line and "--network_dim 4" in line and "--resume_ignore_changes" in line

    args = lora_args(tiny_model_dirs["sdxl"], shapes_data, tmp_path / "b", 3, "--resume", state)
    line = assert_one_error_line(run_in_process("train_network.py", args, expect_rc=1))
    assert "--pretrained_model_name_or_path" in line and "the base model cannot change" in line

    # forced: the shapes still cannot fit, and that is one line naming the file and the flag
    args = lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "c", 3, "--resume", state, "--network_dim", "8",
                     "--resume_ignore_changes")
    result = run_in_process("train_network.py", args, expect_rc=1)
    line = assert_one_error_line(result)
    assert "model_lora_unet.safetensors" in line and "--network_dim" in line
    assert "changed with --resume_ignore_changes" in result.stdout

    # another family, forced past the settings check: refused once the model is known
    args = lora_args(tiny_model_dirs["sdxl"], shapes_data, tmp_path / "d", 3, "--resume", state,
                     "--resume_ignore_changes")
    line = assert_one_error_line(run_in_process("train_network.py", args, expect_rc=1))
    assert "sd1" in line and "sdxl" in line and "--pretrained_model_name_or_path" in line


# ---- E15 / E16: interrupted saves and --resume auto ------------------------------------------------------


def test_startup_finishes_a_save_killed_between_the_renames_and_resume_auto_continues(lora_run, tiny_model_dirs,
                                                                                     shapes_data, tmp_path, run_script):
    output = tmp_path / "out"
    output.mkdir()
    shutil.copytree(lora_run / "lora-step00000001-state", output / "lora-step00000001-state")
    # killed after renaming the old step-2 state aside and before renaming the new one in
    shutil.copytree(lora_run / "lora-step00000001-state", output / f".lora-step00000002-state.{4242}.old")
    shutil.copytree(lora_run / "lora-state", output / "lora-step00000002-state.tmp-saving")
    (output / ".lora-step00000002.safetensors.4242.tmp").write_bytes(b"half a file")
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, output, 3,
                                                      "--resume", "auto"))
    recovered = [line for line in result.stdout.splitlines() if line.startswith("recovered interrupted saves")]
    assert len(recovered) == 1, result.stdout
    assert "finished the interrupted save of lora-step00000002-state" in recovered[0]
    assert ".lora-step00000002.safetensors.4242.tmp" in recovered[0]
    assert f"--resume auto: continuing from {output / 'lora-step00000002-state'}" in result.stdout
    assert "resuming from" in result.stdout and "step 2" in result.stdout
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".") or "tmp" in p.name) == []
    assert read_training_state(output / "lora-step00000002-state").global_step == 2


def test_recovery_of_every_kill_window(lora_run, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    complete = lambda name: shutil.copytree(lora_run / "lora-state", output / name)  # noqa: E731
    complete("a-state")
    (output / "a-state.tmp-saving").mkdir()  # killed while writing the temp: incomplete, removed
    (output / "a-state.tmp-saving" / "optimizer.json").write_text("{")
    complete("b-state")
    complete(".b-state.77.old")  # killed after the new one was renamed in: the old one goes
    complete("c-state.old")  # aside copy whose replacement never arrived: put back
    done = recover_output_dir(output)
    assert sorted(p.name for p in output.iterdir()) == ["a-state", "b-state", "c-state"]
    assert len(done) == 3
    assert read_training_state(output / "c-state").global_step == 2


def _complete_states(output: Path) -> dict[int, Path]:
    return {read_training_state(f).global_step: f for f in output.glob("lora-step*-state")
            if (f / "train_state.json").is_file()}


def _kill_during_a_save(command: list[str], output: Path, marker: str, min_states: int, log: Path) -> str | None:
    """Start ``command``; once ``min_states`` complete states exist, SIGKILL it the moment a name ending in
    ``marker`` appears in ``output`` (a save in progress). Returns the name seen, or None if none appeared."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        seen, deadline = None, time.monotonic() + 240
        try:
            while seen is None and process.poll() is None and time.monotonic() < deadline:
                names = [p.name for p in output.iterdir()] if output.is_dir() else []
                ready = sum(1 for n in names if n.endswith("-state") and (output / n / "train_state.json").is_file())
                seen = next((n for n in names if n.endswith(marker)), None) if ready >= min_states else None
                if seen is None:  # spin only once a kill may come: a 2-core runner shares this loop's CPU
                    time.sleep(0.0002 if ready >= min_states else 0.01)
        finally:
            process.kill()
            process.wait()
    return seen


def test_kill_9_during_saves_never_loses_the_state(tiny_model_dirs, shapes_data, tmp_path, run_in_process):
    """A real SIGKILL while a new state folder is written, then while an existing one is swapped for its
    replacement (resuming from an older state into the same folder): each next start recovers, and --resume
    auto finishes from the newest complete state."""
    output, model = tmp_path / "out", tiny_model_dirs["sd15"]
    saving = ("--save_state", "--save_every_n_steps", "1")
    train = [sys.executable, str(ROOT / "train_network.py")]
    first = _kill_during_a_save([*train, *lora_args(model, shapes_data, output, 1000, *saving)], output,
                                ".tmp-saving", 3, tmp_path / "first.log")
    assert first is not None, (tmp_path / "first.log").read_text()[-3000:]
    oldest = _complete_states(output)[min(_complete_states(output))]
    second = _kill_during_a_save([*train, *lora_args(model, shapes_data, output, 1000, *saving, "--resume", oldest)],
                                 output, ".old", 1, tmp_path / "second.log")
    second_log = (tmp_path / "second.log").read_text()
    assert second is not None, second_log[-3000:]
    recovered = [line for line in second_log.splitlines() if line.startswith("recovered interrupted saves")]
    assert len(recovered) == 1 and first.removesuffix(".tmp-saving") in recovered[0], second_log[-3000:]
    complete = _complete_states(output)
    newest = max(complete)
    # both killed runs were real processes; the recovering start that finishes runs in-process
    result = run_in_process("train_network.py", lora_args(model, shapes_data, output, newest + 1, *saving,
                                                          "--resume", "auto"))
    assert "recovered interrupted saves" in result.stdout, result.stdout[-2000:]
    assert f"--resume auto: continuing from {complete[newest]}" in result.stdout, result.stdout[-2000:]
    assert read_training_state(output / "lora-state").global_step == newest + 1
    leftovers = [p.name for p in output.iterdir() if p.name.endswith((".tmp-saving", ".old", ".tmp"))]
    assert leftovers == [], leftovers


def test_resume_auto_without_a_state_starts_fresh(tiny_model_dirs, shapes_data, tmp_path, run_script):
    output = tmp_path / "out"
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, output, 1,
                                                      "--resume", "auto"))
    lines = [line for line in result.stdout.splitlines() if "--resume auto" in line]
    assert lines == [f"--resume auto: no complete state folder in {output}; starting a new run"]
    assert (output / "lora.safetensors").is_file()


# ---- E17: a NaN stop names a state that resumes ----------------------------------------------------------


def test_nan_stop_names_the_state_from_before_the_divergence_and_it_resumes(lora_run, tiny_model_dirs, shapes_data,
                                                                            tmp_path, run_script, run_in_process):
    model, start = tiny_model_dirs["sd15"], lora_run / "lora-step00000001-state"
    diverged = tmp_path / "diverged"
    result = run_script("train_network.py", lora_args(model, shapes_data, diverged, 6, "--resume", start,
                                                      "--learning_rate", "1e10", "--save_state",
                                                      "--save_every_n_steps", "1"), expect_rc=1)
    line = assert_one_error_line(result)
    assert "NaN/inf" in line and f"resume from {start}," in line
    assert list(diverged.glob("lora-step*-state"))  # states after the blow-up exist, and are not the advice
    resumed = tmp_path / "resumed"  # the advised state resumes (in-process: resuming runs as typed above)
    run_in_process("train_network.py", lora_args(model, shapes_data, resumed, 3, "--resume", start,
                                                 "--learning_rate", "1e-4"))
    assert all(torch.isfinite(v).all() for v in load_file(str(resumed / "lora.safetensors")).values())


def test_nan_stop_without_saved_states_says_so(tiny_model_dirs, shapes_data, tmp_path, run_script):
    result = run_script("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 6,
                                                      "--learning_rate", "1e10"), expect_rc=1)
    line = assert_one_error_line(result)
    assert "no state was saved before the loss diverged" in line and "--save_state --save_every_n_steps" in line


def test_state_before_divergence_skips_states_saved_after_the_loss_exploded(tmp_path):
    states = []
    for step in (2, 4, 6):
        (tmp_path / f"s{step}").mkdir()
        (tmp_path / f"s{step}" / "train_state.json").write_text("{}")
        states.append((step, tmp_path / f"s{step}"))
    history = [{"step": s, "loss/current": v} for s, v in [(1, 0.2), (2, 0.5), (3, 0.1), (4, 0.3), (5, 0.2),
                                                          (6, 80.0), (7, 1e12)]]
    # the loss on the weights after step 5 exploded: states 2 and 4 are good, 6 is not
    assert state_before_divergence(states, history, 7) == tmp_path / "s4"
    assert state_before_divergence(states, history[:1], 1) is None


# ---- multi-process ---------------------------------------------------------------------------------------


# Resuming a 2-process run: tests/test_process_count_resume.py (a 2-process launch resumes a state and must equal
# the uninterrupted run; states saved by 1 and by 2 processes, each resumed on the other count).
