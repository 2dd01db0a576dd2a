"""Hugging Face Hub upload and resume (kohya's --huggingface_* flags), with no Hub reachable.

What is checked here: which files go to which path in the repository, in which order (each step save, the
final save, state folders with --save_state_to_huggingface), that --async_upload does not hold up the step and
still uploads everything (even saves pruned right after they were made), that a failing upload is one warning
and the run ends normally with its local files, that the token never shows up, and resuming from a downloaded
state. Not exercised: a real Hub (authentication, large-file transfer, repository creation on the server).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import train_network
from library.training.checkpoints import StateError
from library.training.hub_upload import HubOptions, HubUpload, download_hub_state, parse_hub_state
from library.training.loop import Callback
from tests.helpers.user_paths import assert_one_error_line, lora_args


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeHub:
    """HfApi's create_repo / upload_file / upload_folder, recording what each upload would send (read at upload
    time, as the real client does); ``delay`` makes each upload slow, ``fail`` makes it raise."""

    def __init__(self, *, delay: float = 0.0, fail: str | None = None) -> None:
        self.delay, self.fail = delay, fail
        self.repos: list[dict] = []
        self.uploads: list[dict] = []
        self.threads: set[str] = set()

    def create_repo(self, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})

    def _record(self, kind, local: Path, path_in_repo, repo_id, repo_type):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError(self.fail)
        content = ({p.relative_to(local).as_posix(): _digest(p) for p in local.rglob("*") if p.is_file()}
                   if kind == "folder" else _digest(local))
        self.uploads.append({"kind": kind, "path_in_repo": path_in_repo, "repo_id": repo_id, "repo_type": repo_type,
                             "content": content})

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, repo_type=None, **_):
        self._record("file", Path(path_or_fileobj), path_in_repo, repo_id, repo_type)

    def upload_folder(self, *, folder_path, path_in_repo, repo_id, repo_type=None, **_):
        self._record("folder", Path(folder_path), path_in_repo, repo_id, repo_type)


class SaveClock(Callback):
    """Two of these around the Hub callback time its on_save (callbacks run in the order given)."""

    def __init__(self, started: list[float] | None = None) -> None:
        self.started = started
        self.times: list[float] = []

    def on_save(self, run, state, model_path, state_folder) -> None:
        if self.started is None:
            self.times.append(time.perf_counter())
        else:
            self.times.append(time.perf_counter() - self.started[len(self.times)])


def test_async_uploads_every_save_and_state_in_order_without_holding_up_the_step(tiny_model_dirs, shapes_data,
                                                                              tmp_path, capsys):
    """5 steps, a save (with state) every 2, only the last step save kept: lora-step2 is pruned right after the
    step-4 save, while its upload (1.5 s each) is still queued; it is uploaded all the same, from a hard link."""
    output = tmp_path / "out"
    hub = FakeHub(delay=1.5)
    options = HubOptions(repo_id="me/shapes-lora", path_in_repo="runs/v1", repo_type="model", private=False,
                         save_state=True, async_upload=True)
    before = SaveClock()
    after = SaveClock(before.times)
    upload = HubUpload(options, api=hub)
    argv = lora_args(tiny_model_dirs["sd15"], shapes_data, output, 5, "--save_every_n_steps", "2", "--save_state",
                     "--save_last_n_steps", "1")
    assert train_network.main(argv, callbacks=[before, upload, after]) == 0

    assert hub.repos == [{"repo_id": "me/shapes-lora", "repo_type": "model", "private": False, "exist_ok": True}]
    assert [(u["kind"], u["path_in_repo"]) for u in hub.uploads] == [
        ("file", "runs/v1/lora-step00000002.safetensors"), ("folder", "runs/v1/lora-step00000002-state"),
        ("file", "runs/v1/lora-step00000004.safetensors"), ("folder", "runs/v1/lora-step00000004-state"),
        ("file", "runs/v1/lora.safetensors"), ("folder", "runs/v1/lora-state")]
    assert hub.threads == {"hub-upload"}  # one background worker, never the training thread
    assert max(after.times) < 0.75, after.times  # 6 uploads x 1.5 s ran behind the steps, not in them
    # the pruned step-2 save was uploaded whole; the kept ones are what is on disk
    assert not (output / "lora-step00000002.safetensors").exists()
    assert not (output / "lora-step00000002-state").exists()
    step2_state = hub.uploads[1]["content"]
    assert "train_state.json" in step2_state and "model_lora_unet.safetensors" in step2_state
    assert hub.uploads[4]["content"] == _digest(output / "lora.safetensors")
    assert hub.uploads[5]["content"] == {p.name: _digest(p) for p in (output / "lora-state").iterdir()}
    assert sorted(p.name for p in output.iterdir()) == [  # the staging links are gone
        "lora-state", "lora-step00000004-state", "lora-step00000004.safetensors", "lora.safetensors"]
    out = capsys.readouterr().out
    assert "uploaded " + str(output / "lora.safetensors") + " to the Hugging Face Hub: me/shapes-lora/runs/v1/lora.safetensors" in out
    assert out.index("waiting for the Hugging Face Hub uploads to finish") < out.index("saved ")


def test_sync_upload_that_fails_is_a_warning_and_the_run_ends_normally(tiny_model_dirs, shapes_data, tmp_path,
                                                                     capsys):
    output = tmp_path / "out"
    hub = FakeHub(fail="503 Service Unavailable")
    upload = HubUpload(HubOptions(repo_id="me/x", token="hf_s3cr3tToken"), api=hub)
    argv = lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2, "--save_every_n_steps", "1", "--save_state")
    assert train_network.main(argv, callbacks=[upload]) == 0
    assert (output / "lora.safetensors").is_file() and (output / "lora-state").is_dir()
    assert [p for p, _ in upload.failed] == [output / "lora-step00000001.safetensors", output / "lora.safetensors"]
    assert hub.repos[0]["private"] is True and hub.repos[0]["repo_type"] is None  # kohya: private, a model repo
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: upload of")]
    assert warnings == [
        f"warning: upload of {output / name} to the Hugging Face Hub (me/x/{name}) failed: RuntimeError: 503 Service "
        "Unavailable; the local copy stays, training continues"
        for name in ("lora-step00000001.safetensors", "lora.safetensors")]  # no state: not asked for


def test_only_the_main_process_uploads(tmp_path):
    hub = FakeHub()
    upload = HubUpload(HubOptions(repo_id="me/x", save_state=True), api=hub)
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    rank1 = type("Run", (), {"accelerator": type("Acc", (), {"is_main_process": False})()})()
    upload.on_save(rank1, None, model, None)
    upload.on_train_end(rank1, None)
    assert hub.uploads == [] and hub.repos == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused at once


def test_unreachable_hub_from_the_command_line(run_script, tiny_model_dirs, shapes_data, tmp_path):
    """As a user types it, with the Hub down: every upload is a warning naming the file, the LoRA and its state
    are saved locally, and the token appears nowhere (output, saved files, state)."""
    output = tmp_path / "out"
    token = "hf_NeverPrintMe123"
    result = run_script("train_network.py", lora_args(
        tiny_model_dirs["sd15"], shapes_data, output, 2, "--save_every_n_steps", "1", "--save_state",
        "--huggingface_repo_id", "me/shapes-lora", "--huggingface_token", token, "--huggingface_path_in_repo", "v1",
        "--save_state_to_huggingface", "--async_upload"),
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: upload of")]
    assert [line.split(" to the Hugging Face Hub (")[0] for line in warnings] == [
        f"warning: upload of {output / name}" for name in
        ("lora-step00000001.safetensors", "lora-step00000001-state", "lora.safetensors", "lora-state")]
    assert all("(me/shapes-lora/v1/" in line and "the local copy stays" in line for line in warnings)
    assert (output / "lora.safetensors").stat().st_size > 10_000 and (output / "lora-state" / "train_state.json").is_file()
    assert not [p for p in output.iterdir() if p.name.startswith(".hub-upload")]
    assert token not in result.stdout + result.stderr
    leaked = [p for p in output.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert leaked == []


def test_hub_state_spec_in_kohya_form():
    assert parse_hub_state("me/repo/runs/lora-state") == parse_hub_state("me/repo/runs/lora-state")
    spec = parse_hub_state("me/repo/runs/lora-state:v2:dataset")
    assert (spec.repo_id, spec.path_in_repo, spec.revision, spec.repo_type) == ("me/repo", "runs/lora-state", "v2",
                                                                                "dataset")
    spec = parse_hub_state("me/repo/lora-state:main")
    assert (spec.repo_id, spec.path_in_repo, spec.revision, spec.repo_type) == ("me/repo", "lora-state", "main", None)
    for bad in ("me/repo", "lora-state", "me/repo/s:a:b:c", "me/repo/s:main:bucket"):
        with pytest.raises(StateError, match="--resume"):
            parse_hub_state(bad)


def test_resume_from_a_downloaded_hub_state(tiny_model_dirs, shapes_data, tmp_path, capsys):
    """A 2-step run saves its step-1 state; a fake snapshot_download serves it as me/repo/runs/...; the run
    parsed from the user's --resume_from_huggingface command line resumes from the download at step 1."""
    model = tiny_model_dirs["sd15"]
    first = tmp_path / "first"
    assert train_network.main(lora_args(model, shapes_data, first, 2, "--save_every_n_steps", "1",
                                        "--save_state")) == 0
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        root = tmp_path / "hf-cache" / "snapshot"
        shutil.copytree(first / "lora-step00000001-state", root / "runs" / "lora-step00000001-state")
        return str(root)

    folder = download_hub_state(parse_hub_state("me/repo/runs/lora-step00000001-state:main"), token="hf_t",
                                download=fake_snapshot_download)
    assert calls == [{"repo_id": "me/repo", "repo_type": None, "revision": "main",
                      "allow_patterns": ["runs/lora-step00000001-state/*"], "token": "hf_t"}]
    capsys.readouterr()
    assert train_network.main(lora_args(model, shapes_data, tmp_path / "second", 2, "--resume", str(folder))) == 0
    assert f"resuming from {folder}: step 1, epoch 1" in capsys.readouterr().out
    with pytest.raises(StateError, match="holds no state folder"):
        download_hub_state(parse_hub_state("me/repo/runs/missing"), download=lambda **_: str(tmp_path / "hf-cache"))


def test_hub_resume_mistakes_are_one_error_line(run_script, run_in_process, tiny_model_dirs, shapes_data, tmp_path):
    base = lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 2)
    result = run_in_process("train_network.py", [*base, "--resume_from_huggingface"], expect_rc=None)  # real below
    assert_one_error_line(result, "--resume_from_huggingface needs --resume {repo_id}/{path_in_repo}")
    result = run_script("train_network.py", [*base, "--resume_from_huggingface", "--resume", "me/repo/runs/s",
                                             "--huggingface_token", "hf_NotShown"], expect_rc=None)  # offline
    line = assert_one_error_line(result, "--resume_from_huggingface: could not download me/repo/runs/s")
    assert "hf_NotShown" not in result.stdout + result.stderr, line
    # refused right after the download was tried, before the data is read or the model loads
    assert result.stdout.strip().splitlines()[-1] == "downloading the training state me/repo/runs/s from the Hugging Face Hub"
