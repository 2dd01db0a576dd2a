"""kohya's logging flags as a user types them: wandb through accelerate's tracker (offline), the API key kept out
of every file and log, --log_tracker_config, and the --console_log_* flags.

wandb runs offline (WANDB_MODE=offline): its run folder holds a ``run-*.wandb`` file of protobuf records in
leveldb's log format, which ``wandb_records`` reads back, so the test sees what `wandb sync` would upload.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from PIL import Image
from tests.helpers.user_paths import assert_one_error_line, lora_args
from tests.test_user_paths_startup import hidden_packages_env

SECRET = "SECRETKEY123"
NO_MODEL = "/nonexistent/model.safetensors"


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of (crc32, length, type) chunks."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(records: list) -> list[dict[str, object]]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def files_containing(text: str, *folders: Path) -> list[Path]:
    needle = text.encode()
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_wandb_offline_run_has_name_losses_samples_and_never_the_key(tiny_model_dirs, shapes_data, tmp_path,
                                                                     run_script):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 1\na blue square --w 64 --h 64 --s 2 --d 2\n")
    tracker_config = tmp_path / "trackers.toml"
    tracker_config.write_text('[wandb]\ntags = ["tiny", "sd15"]\nnotes = "from the tracker config"\n')
    output, logs, wandb_env = tmp_path / "out", tmp_path / "logs", tmp_path / "wandb_env"
    console_log = tmp_path / "console.log"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_env), "WANDB_CONFIG_DIR": str(wandb_env / "config"),
           "WANDB_CACHE_DIR": str(wandb_env / "cache"), "WANDB_DATA_DIR": str(wandb_env / "data")}
    result = run_script("train_network.py", lora_args(
        tiny_model_dirs["sd15"], shapes_data, output, 2, "--log_with", "wandb", "--logging_dir", logs,
        "--wandb_run_name", "myrun", "--wandb_api_key", SECRET, "--log_tracker_name", "myproject", "--log_config",
        "--log_tracker_config", tracker_config, "--sample_prompts", prompts, "--sample_every_n_steps", "1",
        "--save_state", "--save_every_n_steps", "1", "--console_log_level", "WARNING",
        "--console_log_file", console_log), env=env)

    # kohya: the wandb run folder goes under --logging_dir (it wins over WANDB_DIR)
    run_files = list(logs.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, sorted(str(p) for p in logs.rglob("*"))
    records = wandb_records(run_files[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].display_name == "myrun" and runs[0].project == "myproject"
    assert list(runs[0].tags) == ["tiny", "sd15"] and runs[0].notes == "from the tracker config"

    rows = history_rows(records)
    losses = {row["_step"]: row["loss/current"] for row in rows if "loss/current" in row}
    assert sorted(losses) == [1, 2] and all(isinstance(v, float) and 0 < v < 10 for v in losses.values())
    lrs = [row["lr"] for row in rows if "lr" in row]
    assert lrs == [1e-3, 1e-3]
    # both samples at both steps, as images captioned with their prompt, stored in the run folder
    samples = sorted((row["_step"], key.split("/_type")[0], row[key.replace("_type", "caption")])
                     for row in rows for key in row if key.endswith("/_type") and row[key] == "image-file")
    assert samples == [(1, "samples/00", "a red circle"), (1, "samples/01", "a blue square"),
                       (2, "samples/00", "a red circle"), (2, "samples/01", "a blue square")]
    pngs = sorted(run_files[0].parent.glob("files/media/images/**/*.png"))
    assert len(pngs) == 4 and all(Image.open(p).size == (64, 64) for p in pngs)

    # --log_config: the flags are the run's config, without the key and without local paths (kohya)
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["network_dim"] == {"value": 4} or config["network_dim"] == 4, config.get("network_dim")
    assert "wandb_api_key" not in config and "output_dir" not in config and "pretrained_model_name_or_path" not in config

    assert (output / "lora.safetensors").is_file() and list(output.glob("*-state"))
    assert files_containing(SECRET, output, logs, wandb_env, console_log.parent) == []
    assert SECRET not in result.stdout and SECRET not in result.stderr
    # --console_log_level WARNING: the INFO line about the optimizer is in neither the file nor the console
    assert "optimizer: torch.optim" not in console_log.read_text() + result.stderr


def test_console_log_file_gets_the_run_log_lines_instead_of_the_console(tiny_model_dirs, shapes_data, tmp_path,
                                                                         run_script):
    log_file = tmp_path / "run.log"
    result = run_script("train_network.py", lora_args(
        tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1, "--console_log_file", log_file,
        "--reg_data_dir", tmp_path))
    lines = log_file.read_text().splitlines()
    # kohya's default level in the file is INFO: the optimizer line, and the warning about the unused folder
    assert "optimizer: torch.optim.adamw.AdamW, lr=0.001" in lines, lines
    assert any(line.startswith("--reg_data_dir is ignored") for line in lines), lines
    assert "optimizer: torch.optim" not in result.stderr and "--reg_data_dir is ignored" not in result.stderr


def test_console_log_level_info_shows_info_lines_on_the_console(tiny_model_dirs, shapes_data, tmp_path, run_script):
    result = run_script("train_network.py", lora_args(
        tiny_model_dirs["sd15"], shapes_data, tmp_path / "out", 1, "--console_log_level", "info"))
    assert "optimizer: torch.optim.adamw.AdamW, lr=0.001" in result.stderr.splitlines()


def test_tracker_config_that_is_not_tables_is_one_error_line(shapes_data, tmp_path, run_in_process):
    bad = tmp_path / "trackers.toml"
    bad.write_text('name = "myrun"\n')
    result = run_in_process("train_network.py", lora_args(Path(NO_MODEL), shapes_data, tmp_path / "out", 1,
                                                          "--log_tracker_config", bad), expect_rc=2)
    assert_one_error_line(result, f"--log_tracker_config {bad}", "[wandb]")


def test_log_with_all_without_wandb_is_one_error_line(shapes_data, tmp_path, run_script):
    env = hidden_packages_env(tmp_path / "site", "wandb")
    result = run_script("train_network.py", lora_args(Path(NO_MODEL), shapes_data, tmp_path / "out", 1,
                                                      "--log_with", "all", "--logging_dir", tmp_path / "logs"),
                        expect_rc=1, env=env)
    assert_one_error_line(result, "--log_with all needs the wandb package: pip install wandb")


def test_output_config_keeps_the_logging_flags_but_never_the_key(shapes_data, tmp_path, run_script):
    saved = tmp_path / "saved.toml"
    result = run_script("train_network.py", lora_args(Path(NO_MODEL), shapes_data, tmp_path / "out", 1,
                                                      "--log_with", "wandb", "--wandb_run_name", "myrun",
                                                      "--wandb_api_key", SECRET, "--log_config",
                                                      "--output_config", saved))
    import toml

    written = saved.read_text()
    flat = {k: v for table in toml.loads(written).values() if isinstance(table, dict) for k, v in table.items()}
    assert flat["wandb_run_name"] == "myrun" and flat["log_config"] is True and "wandb_api_key" not in flat
    assert SECRET not in written and SECRET not in result.stdout + result.stderr
