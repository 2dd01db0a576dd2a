"""train_network.py with one more callback: each rank writes what it trained and ended with.

    accelerate launch ... tests/helpers/rank_report.py REPORT_DIR <train_network.py flags>

REPORT_DIR/rank_<i>.json: the rank, the process count, the node layout torchrun set, the images of every batch
this rank trained, and its trainable weights (name -> sum and sum of squares), so a test can tell that the ranks
formed one group, split the data, and stayed in step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import train_network
from library.training.loop import Callback


class RankReport(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder, self.images = folder, []

    def before_batch(self, run, batch) -> None:
        self.images.append([Path(p).name for p in batch.image_paths])

    def on_train_end(self, run, state) -> None:
        weights = {}
        for name, module in run.trainee.trainable_modules().items():
            for key, tensor in module.state_dict().items():
                weights[f"{name}.{key}"] = [float(tensor.float().sum()), float(tensor.float().square().sum())]
        accelerator = run.accelerator
        report = {"rank": accelerator.process_index, "num_processes": accelerator.num_processes,
                  "node_rank": int(os.environ.get("GROUP_RANK", -1)),
                  "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", -1)),
                  "step": state.global_step, "images": self.images, "weights": weights}
        (self.folder / f"rank_{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    report_dir = Path(sys.argv[1])
    report_dir.mkdir(parents=True, exist_ok=True)
    sys.exit(train_network.main(sys.argv[2:], callbacks=[RankReport(report_dir)]))
