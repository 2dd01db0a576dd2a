"""kohya's dataset key ``network_multiplier``: each dataset's batches train the LoRA at that multiplier.

Run as a user types it (a ``--dataset_config`` with two datasets); the test watches the run through loop
callbacks only: the multiplier the network has when each batch starts, and whether that step moved the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_network
from library.data.dataset_config import DatasetConfigError
from library.data.dataset_config_loading import DatasetFlags, load_dataset_configs
from library.training.callbacks import PeriodicSampling
from library.training.loop import Callback
from tools.make_sample_dataset import make_sample_dataset


def _two_datasets(root: Path) -> Path:
    """Two fine-tuning datasets of two images each: #1 at network_multiplier 0, #2 at 0.5."""
    tables = []
    for name, multiplier in (("off", 0), ("half", 0.5)):
        meta = make_sample_dataset(root / name, count=2, size=64, seed=1)
        tables.append(f'[[datasets]]\nnetwork_multiplier = {multiplier}\n[[datasets.subsets]]\n'
                      f'image_dir = "{meta.parent / "images"}"\nmetadata_file = "{meta}"\n')
    config = root / "datasets.toml"
    config.write_text("[general]\nresolution = 64\nbatch_size = 1\n" + "\n".join(tables))
    return config


class StepWatcher(Callback):
    """Per step: the network multiplier when its batch starts, and whether the step changed the LoRA weights."""

    def __init__(self) -> None:
        self.multipliers: list[tuple[float, float]] = []  # (network's multiplier, the batch's dataset value)
        self.changed: list[bool] = []

    def on_train_start(self, run, state) -> None:
        self.network = run.trainee.network
        self.before = self._weights()

    def before_batch(self, run, batch) -> None:
        self.multipliers.append((self.network.multiplier, float(batch.network_multipliers[0])))

    def after_optimizer_step(self, run, state) -> dict[str, float]:
        after = self._weights()
        self.changed.append(not all(torch.equal(a, b) for a, b in zip(self.before, after)))
        self.before = after
        return {}

    def _weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.network.parameters()]


def test_a_dataset_at_multiplier_zero_does_not_train(tiny_model_dirs, tmp_path, capsys):
    config = _two_datasets(tmp_path)
    output = tmp_path / "out"
    watcher = StepWatcher()
    at_sampling: list[float] = []
    sampling = PeriodicSampling(lambda step, epoch: at_sampling.append(watcher.network.multiplier),
                                every_n_steps=2, every_n_epochs=None, at_first=False)
    # plain SGD (no momentum, no weight decay): a step moves the weights exactly when their gradient is non-zero
    assert train_network.main([
        "--pretrained_model_name_or_path", str(tiny_model_dirs["sd15"]), "--dataset_config", str(config),
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
        "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.5", "--seed", "3",
        "--max_data_loader_n_workers", "0", "--max_train_epochs", "1",
        "--output_dir", str(output), "--output_name", "lora"], callbacks=[watcher, sampling]) == 0
    assert "network multiplier per dataset: " in capsys.readouterr().out

    assert sorted(dataset for _, dataset in watcher.multipliers) == [0.0, 0.0, 0.5, 0.5]
    assert all(network == dataset for network, dataset in watcher.multipliers)  # set before the batch's forward
    assert watcher.changed == [dataset != 0.0 for _, dataset in watcher.multipliers], watcher
    assert at_sampling == [1.0, 1.0]  # sampling sees the network at its own multiplier, not the last batch's

    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        datasets = json.loads(handle.metadata()["ss_datasets"])
    assert [d["network_multiplier"] for d in datasets] == [0.0, 0.5]


def test_network_multiplier_in_the_dataset_config(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'[general]\nnetwork_multiplier = -1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
                      f'[[datasets]]\nnetwork_multiplier = 0.25\n[[datasets.subsets]]\nimage_dir = "{images}"\n')
    datasets = load_dataset_configs(DatasetFlags(dataset_config=str(config)))
    assert [d.network_multiplier for d in datasets] == [-1.0, 0.25]  # [general] is the default of each dataset

    config.write_text(f'[[datasets]]\nnetwork_multiplier = nan\n[[datasets.subsets]]\nimage_dir = "{images}"\n'
                      f'network_multiplier = 2.0\n')
    with pytest.raises(DatasetConfigError) as error:
        load_dataset_configs(DatasetFlags(dataset_config=str(config)))
    assert "network_multiplier = nan must be a finite number" in str(error.value)
    assert "network_multiplier is only allowed in [general] or [[datasets]]" in str(error.value)


def test_debug_dataset_shows_each_dataset_multiplier(tiny_model_dirs, tmp_path, capsys):
    config = _two_datasets(tmp_path)
    assert train_network.main(["--pretrained_model_name_or_path", str(tiny_model_dirs["sd15"]),
                               "--dataset_config", str(config), "--output_dir", str(tmp_path / "out"),
                               "--debug_dataset"]) == 0
    samples = [line for line in capsys.readouterr().out.splitlines() if "shape_00" in line]
    assert [line.split("/images/")[0].rsplit("/", 1)[-1] for line in samples] == ["off", "off", "half", "half"]
    assert ["network multiplier 0;" in line for line in samples] == [True, True, False, False]
    assert ["network multiplier 0.5;" in line for line in samples] == [False, False, True, True]
