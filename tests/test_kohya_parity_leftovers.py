"""Smaller kohya parity points, as a user meets them: the data loader worker cap, and the kohya_ss GUI key
``learning_rate_te`` (train_db.py's flag) in a config file given to the scripts that do not read it."""

from __future__ import annotations

import os
import warnings

import pytest
import toml

import train_network
import train_sdxl
from library.training.loop import Callback
from tests.helpers.user_paths import lora_args
from tools.make_sample_dataset import make_sample_dataset

GUI_NOTE = "note: ignored kohya_ss GUI keys (sd-scripts ignores them too): "


class LoaderWorkers(Callback):
    def on_train_start(self, run, state) -> None:
        self.num_workers = run.dataloader.num_workers


def test_data_loader_workers_are_capped_at_the_cpu_count(tiny_model_dirs, tmp_path):
    data = make_sample_dataset(tmp_path / "shapes", count=2, size=64, seed=0).parent
    args = lora_args(tiny_model_dirs["sd15"], data, tmp_path / "out", 1)
    at = args.index("--max_data_loader_n_workers")
    args[at + 1] = "64"  # more than any test machine has
    workers = LoaderWorkers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_network.main(args, callbacks=[workers]) == 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert workers.num_workers == min(64, cpus)
    # torch's "This DataLoader will create 64 worker processes in total ..." warning is gone
    assert not [w for w in caught if "worker processes in total" in str(w.message)]


@pytest.mark.parametrize("script", [train_network, train_sdxl])
def test_learning_rate_te_from_a_gui_config_is_named_and_ignored(script, tmp_path, capsys):
    config = tmp_path / "gui.toml"  # what the GUI's DreamBooth tab writes for SD1.5 (train_db.py)
    config.write_text("learning_rate = 2e-6\nlearning_rate_te = 1e-6\nepoch = 2\n")
    written = tmp_path / "effective.toml"
    with pytest.raises(SystemExit) as exit_:
        script.main(["--config_file", str(config), "--output_config", str(written)])
    assert exit_.value.code == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith(GUI_NOTE)]
    assert notes == [GUI_NOTE + "epoch, learning_rate_te"]
    effective = toml.loads(written.read_text())
    flat = {k: v for table in effective.values() if isinstance(table, dict) for k, v in table.items()}
    flat.update({k: v for k, v in effective.items() if not isinstance(v, dict)})
    assert flat["learning_rate"] == 2e-6
    # nothing took the value: no text-encoder learning rate of either script was set from it
    assert not {"learning_rate_te", "learning_rate_te1", "learning_rate_te2", "text_encoder_lr"} & set(flat)
