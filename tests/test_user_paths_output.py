"""Output folders and files as a user meets them: problems reported at start-up in one line, before the model
loads, instead of at the first save after all the training; resuming into the run's own folder; full disks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from library.cli import config
from library.training.checkpoints import SaveSettings, read_training_state
from tests.helpers.user_paths import assert_one_error_line, lora_args


def sdxl_args(model: Path, data: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--in_json", data / "meta.json",
            "--train_data_dir", data / "images", "--resolution", "64", "--learning_rate", "1e-3", "--seed", "5",
            "--max_data_loader_n_workers", "0", "--output_dir", output, "--output_name", "model",
            "--max_train_steps", str(steps), *extra]


def controlnet_args(model: Path, data: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data / "images",
            "--caption_extension", ".caption", "--conditioning_filter", "canny", "--resolution", "64",
            "--learning_rate", "1e-3", "--seed", "2", "--max_data_loader_n_workers", "0", "--output_dir", output,
            "--output_name", "cn", "--max_train_steps", str(steps), *extra]


@pytest.fixture(scope="module")
def sdxl_single_file(tiny_model_dirs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from library.models.loading import load_model, save_single_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_single_file(load_model(tiny_model_dirs["sdxl"]), path)
    return path


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def modification_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def temp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if "tmp" in p.name or p.name.endswith(".old")]


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[bool]:
    """A real small (or read-only) filesystem: a tmpfs mount, which needs root; yields whether it mounted."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


# --------------------------------------------------------------------------------------------------
# B3: in-memory caches in an output folder that does not exist yet


@pytest.mark.parametrize("script", ["train_network.py", "train_sdxl.py"])
def test_in_memory_caches_create_a_missing_output_dir(run_script, tiny_model_dirs, shapes_data, tmp_path, script):
    output = tmp_path / "runs" / "out"  # two levels that do not exist yet
    caches = ["--cache_latents", "--cache_text_encoder_outputs"]
    if script == "train_network.py":
        args = lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2, *caches, "--network_train_unet_only")
        saved = output / "lora.safetensors"
    else:
        args = sdxl_args(tiny_model_dirs["sdxl"], shapes_data, output, 2, *caches, "--save_model_as", "safetensors")
        saved = output / "model.safetensors"
    run_script(script, args)
    assert saved.is_file()
    assert not [p for p in output.iterdir() if p.name.startswith(("latents-", "text-"))]  # temp caches removed


# --------------------------------------------------------------------------------------------------
# D9: output problems at start-up


def test_output_dir_that_is_a_file_is_one_error_line_before_the_model_loads(run_script, run_in_process,
                                                                             tiny_model_dirs, shapes_data, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for run, output, expected in [(run_script, a_file, "is a file, not a folder"),
                                  (run_in_process, a_file / "out", f"{a_file} is a file")]:
        result = run("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2), expect_rc=1)
        line = assert_one_error_line(result)
        assert f"--output_dir {output}" in line and expected in line
        assert "model:" not in result.stdout  # stopped before the model loaded and the summary printed
    assert a_file.read_text() == "not a folder"


def read_only_hook(folder: Path, read_only: Path) -> Path:
    """Without a mount, as root (who writes through mode bits), a read-only filesystem is simulated at the
    syscall wrappers: a sitecustomize makes creating anything under ``read_only`` fail with EROFS."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import errno, os\n"
        f"_ROOT = {str(read_only)!r}\n"
        "_open, _mkdir = os.open, os.mkdir\n"
        "def _inside(path):\n"
        "    path = os.path.abspath(os.fsdecode(path))\n"
        "    return path == _ROOT or path.startswith(_ROOT + os.sep)\n"
        "def _refuse(path):\n"
        "    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)\n"
        "def open_(path, flags, *args, **kwargs):\n"
        "    if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and _inside(path):\n"
        "        _refuse(path)\n"
        "    return _open(path, flags, *args, **kwargs)\n"
        "def mkdir_(path, *args, **kwargs):\n"
        "    if _inside(path):\n"
        "        _refuse(path)\n"
        "    return _mkdir(path, *args, **kwargs)\n"
        "os.open, os.mkdir = open_, mkdir_\n")
    return folder


def test_read_only_output_dir_is_one_error_line(run_script, run_in_process, tiny_model_dirs, shapes_data, tmp_path):
    read_only = tmp_path / "ro"
    with tmpfs(read_only, "ro,size=1M") as mounted:
        env = {}
        if not mounted:  # root ignores permission bits: simulate the read-only filesystem instead
            if os.geteuid() == 0:
                hook = read_only_hook(tmp_path / "hook", read_only)
                env = {"PYTHONPATH": f"{hook}{os.pathsep}{Path(__file__).parent.parent}"}
            else:
                read_only.chmod(0o555)
        # the second case in-process, unless the read-only filesystem is the hook that only a new process loads
        second = run_script if env else run_in_process
        for run, output, expected in [(run_script, read_only, "is not writable"),
                                      (second, read_only / "out", f"cannot be created in {read_only}")]:
            result = run("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2),
                         expect_rc=1, env=env)
            line = assert_one_error_line(result)
            assert f"--output_dir {output}" in line and expected in line and "writable" in line


def test_an_existing_lora_is_kept_unless_overwrite(run_script, run_in_process, tiny_model_dirs, shapes_data, tmp_path):
    output = tmp_path / "out"
    args = lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2)
    run_in_process("train_network.py", args)  # the earlier run; --overwrite below is the real process
    before = fingerprint(output)
    result = run_in_process("train_network.py", [*args, "--learning_rate", "1e-2"], expect_rc=1)
    line = assert_one_error_line(result)
    assert f"{output / 'lora.safetensors'} already exists" in line and "--overwrite" in line
    assert "model:" not in result.stdout
    assert fingerprint(output) == before  # kohya silently replaced it
    run_script("train_network.py", [*args, "--learning_rate", "1e-2", "--overwrite"])
    assert fingerprint(output)["lora.safetensors"] != before["lora.safetensors"]
    assert not temp_leftovers(output)


def test_an_existing_sdxl_folder_stops_at_start_up_and_is_replaced_with_overwrite(run_script, run_in_process,
                                                                                   tiny_model_dirs, shapes_data,
                                                                                   tmp_path):
    from library.models.loading import load_model

    output = tmp_path / "out"
    args = sdxl_args(tiny_model_dirs["sdxl"], shapes_data, output, 1)  # a folder in, a diffusers folder out
    run_in_process("train_sdxl.py", args)  # the earlier run; --overwrite below is the real process
    before = fingerprint(output)
    line = assert_one_error_line(run_in_process("train_sdxl.py", args, expect_rc=1))  # was FileExistsError after training
    assert f"{output / 'model'} already exists" in line and "--overwrite" in line
    assert fingerprint(output) == before
    run_script("train_sdxl.py", [*args, "--learning_rate", "1e-2", "--overwrite"])
    after = fingerprint(output)
    assert after.keys() == before.keys() and after != before
    assert not temp_leftovers(output)
    load_model(output / "model")


def test_output_name_must_be_a_plain_file_name(run_script, run_in_process, tiny_model_dirs, shapes_data, tmp_path):
    for run, name in [(run_script, "../escaped"), (run_in_process, "sub/lora"), (run_in_process, "..")]:
        args = lora_args(tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 2, "--output_name", name)
        line = assert_one_error_line(run("train_network.py", args, expect_rc=1))
        assert f"--output_name {name!r} must be a plain file name" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.safetensors").exists()


def test_start_up_check_names_every_save_of_the_run(tmp_path):
    """Step saves follow --max_train_steps; epoch saves, whose count needs the data, are matched by name."""
    import train_network
    from library.training.output_checks import OutputError, check_outputs, count_model_saves
    from library.cli.training_args import output_options_from_args

    output = tmp_path / "out"
    output.mkdir()
    (output / "other.safetensors").write_bytes(b"")  # another run's file is no conflict
    (output / "lora-step00000004.safetensors").write_bytes(b"")  # never written by a 4-step run
    parser = train_network.build_parser()

    def problem(*flags: str) -> str:
        args = config.parse_args(parser, ["--output_dir", str(output), "--output_name", "lora", *flags])
        with pytest.raises(OutputError) as raised:
            check_outputs(output_options_from_args(args))
        return str(raised.value)

    args = config.parse_args(parser, ["--output_dir", str(output), "--output_name", "lora", "--max_train_steps", "4",
                                      "--save_every_n_steps", "2"])
    check_outputs(output_options_from_args(args))
    (output / "lora-step00000002.safetensors").write_bytes(b"")
    assert "lora-step00000002.safetensors already exists" in problem("--max_train_steps", "4", "--save_every_n_steps", "2")
    (output / "lora-000003-state").mkdir()
    assert "lora-000003-state already exists" in problem("--max_train_steps", "4", "--save_every_n_epochs", "1",
                                                         "--save_state")
    assert count_model_saves(SaveSettings(output, "lora", ".safetensors", every_n_steps=2, last_n_steps=2), 10, 1) == 3


# --------------------------------------------------------------------------------------------------
# D9: a disk that fills during a save


def enospc_hook(folder: Path) -> Path:
    """Without a mount, a full disk is simulated: a sitecustomize makes every safetensors write fail with ENOSPC."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import safetensors, safetensors.torch\n"
        "def save_file(*args, **kwargs):\n"
        "    raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
        "message: \"No space left on device\" })')\n"
        "safetensors.torch.save_file = save_file\n")
    return folder


@pytest.mark.parametrize("script", ["train_network.py", "train_sdxl.py"])
def test_a_full_disk_warns_at_start_and_fails_a_save_in_one_line(run_script, run_in_process, tiny_model_dirs,
                                                                 shapes_data, tmp_path, script):
    disk = tmp_path / "disk"
    with tmpfs(disk, "size=256M") as mounted:
        output = disk / "out"
        if script == "train_network.py":
            args = lora_args(tiny_model_dirs["sd15"], shapes_data, output, 4, "--save_every_n_steps", "2", "--save_state")
            first = output / "lora-step00000002-state"
        else:  # a diffusers folder: kohya left an empty *.tmp-saving folder behind
            args = sdxl_args(tiny_model_dirs["sdxl"], shapes_data, output, 4, "--save_every_n_steps", "2", "--save_state")
            first = output / "model-step00000002-state"
        run_in_process(script, args)  # the earlier saves the full disk must leave intact
        before = fingerprint(output)
        env = {}
        if mounted:  # leave 64 KiB: the probe fits, no model does
            free = shutil.disk_usage(disk).free
            with open(disk / "filler", "wb") as handle:
                for _ in range((free - 64 * 1024) // 2**20):
                    handle.write(bytes(2**20))
                handle.write(bytes((free - 64 * 1024) % 2**20))
        else:
            env = {"PYTHONPATH": f"{enospc_hook(tmp_path / 'hook')}{os.pathsep}{Path(__file__).parent.parent}"}
        result = run_script(script, [*args, "--resume", first], expect_rc=1, env=env)
        line = assert_one_error_line(result)
        assert "could not save" in line and "No space left on device" in line and "earlier saves are intact" in line
        assert read_training_state(Path(line.split("--resume ")[1])).global_step >= 2  # a state that resumes
        if mounted:
            assert "warning:" in result.stdout and "a save may fail with a full disk" in result.stdout
        assert fingerprint(output) == before  # every earlier file intact
        assert not temp_leftovers(output)
        assert read_training_state(first).global_step == 2


# --------------------------------------------------------------------------------------------------
# D10: resuming into the run's own folder


@pytest.mark.parametrize("case", ["sdxl_single_file", "sdxl_diffusers", "network", "controlnet"])
def test_resume_into_the_runs_own_output_dir(run_script, run_in_process, tiny_model_dirs, sdxl_single_file,
                                             shapes_data, tmp_path, case):
    output = tmp_path / "out"
    saving = ("--save_every_n_steps", "2", "--save_state")
    script, args, name = {
        "sdxl_single_file": ("train_sdxl.py", sdxl_args(sdxl_single_file, shapes_data, output, 4, *saving), "model"),
        "sdxl_diffusers": ("train_sdxl.py", sdxl_args(tiny_model_dirs["sdxl"], shapes_data, output, 4, *saving), "model"),
        "network": ("train_network.py", lora_args(tiny_model_dirs["sd15"], shapes_data, output, 4, *saving), "lora"),
        "controlnet": ("train_controlnet.py", controlnet_args(tiny_model_dirs["sd15"], shapes_data, output, 4, *saving),
                       "cn"),
    }[case]
    run_in_process(script, args)  # the crashed run, only the folder it leaves behind matters
    before = fingerprint(output)
    written = modification_times(output)
    step2 = output / f"{name}-step00000002-state"
    run_script(script, [*args, "--resume", step2])  # after a crash: the same command plus --resume
    assert fingerprint(output).keys() == before.keys()
    rewritten = {k for k, t in modification_times(output).items() if t != written[k]}
    assert rewritten == {k for k in before if not k.startswith(f"{name}-step00000002")}  # final output and state
    assert read_training_state(output / f"{name}-state").global_step == 4
    assert not temp_leftovers(output)


# --------------------------------------------------------------------------------------------------
# D12: errors while saving are one line


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   FileExistsError(errno.EEXIST, "File exists")])
def test_errors_while_saving_are_one_line(tiny_model_dirs, shapes_data, tmp_path, monkeypatch, capsys, error):
    import safetensors.torch
    import train_network

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)  # library.io imports it when it saves
    output = tmp_path / "out"
    assert train_network.main(list(map(str, lora_args(tiny_model_dirs["sd15"], shapes_data, output, 1)))) == 1
    err = capsys.readouterr().err
    line = [entry for entry in err.splitlines() if entry.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert f"could not save {output / 'lora.safetensors'}" in line[0]
    fix = "--overwrite" if isinstance(error, FileExistsError) else "writable"
    assert fix in line[0]
    assert not temp_leftovers(output)
