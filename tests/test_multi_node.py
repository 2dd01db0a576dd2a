"""Two "nodes" on one machine: the ready configs in configs/accelerate/ launch them as a user on two machines
would (one `accelerate launch` per node, --machine_rank from the node's file), one process each on gloo, and
they train and save as one run. Every config file there parses with accelerate's own loader."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from tests.helpers.user_paths import lora_args

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {  # file: (distributed type, processes over all machines, machines, machine rank)
    "single_gpu.yaml": (DistributedType.NO, 1, 1, 0),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, 0),
    "zero2_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, 0),
    "zero3_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1, 0),
    "fsdp_8gpu.yaml": (DistributedType.FSDP, 8, 1, 0),
    "multinode_2x8_node0.yaml": (DistributedType.MULTI_GPU, 16, 2, 0),
    "multinode_2x8_node1.yaml": (DistributedType.MULTI_GPU, 16, 2, 1),
}


def test_every_accelerate_config_parses_with_accelerates_loader():
    found = {path.name: load_config_from_file(str(path)) for path in sorted(CONFIGS.glob("*.yaml"))}
    assert set(EXPECTED) <= set(found), sorted(found)
    for name, config in found.items():
        if name in EXPECTED:
            expected = EXPECTED[name]
            assert (config.distributed_type, config.num_processes, config.num_machines, config.machine_rank) == \
                expected, name
    node0, node1 = found["multinode_2x8_node0.yaml"], found["multinode_2x8_node1.yaml"]
    assert node0.main_process_ip == node1.main_process_ip and node0.main_process_port == node1.main_process_port


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_train_and_save_as_one_run(tiny_model_dirs, shapes_data, tmp_path):
    output, reports, port = tmp_path / "out", tmp_path / "reports", str(_free_port())
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = []
    for rank in (0, 1):
        # the node's ready config; two processes in all (one per "node"), node 0's address on this machine
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", str(CONFIGS / f"multinode_2x8_node{rank}.yaml"), "--num_processes", "2",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   str(ROOT / "tests" / "helpers" / "rank_report.py"), str(reports),
                   *lora_args(tiny_model_dirs["sd15"], shapes_data, output, 2, "--save_state")]
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [(node.communicate(timeout=420), node.returncode) for node in nodes]
    for (out, err), code in results:
        assert code == 0, out[-3000:] + err[-3000:]
    printed = results[0][0][0]
    assert "processes: 2 node(s) x 1 per node = 2" in printed
    assert "global batch: 1 per device x 1 accumulation x 2 process(es) = 2" in printed

    ranks = [json.loads((reports / f"rank_{i}.json").read_text()) for i in (0, 1)]
    assert [(r["rank"], r["num_processes"], r["node_rank"], r["local_world_size"]) for r in ranks] == \
        [(0, 2, 0, 1), (1, 2, 1, 1)]
    assert [r["step"] for r in ranks] == [2, 2]
    # one data order split over the nodes: two batches each, no image twice
    images = [name for r in ranks for batch in r["images"] for name in batch]
    assert [len(r["images"]) for r in ranks] == [2, 2] and len(set(images)) == 4
    # the weights stayed in step (gradients averaged over both nodes) and moved from their start
    assert ranks[0]["weights"] == ranks[1]["weights"]
    saved = load_file(str(output / "lora.safetensors"))
    assert any(key.endswith("lora_up.weight") and saved[key].abs().sum() > 0 for key in saved)
    state = output / "lora-state"
    record = json.loads((state / "train_state.json").read_text())
    assert (record["num_processes"], record["global_step"]) == (2, 2)
    assert (state / "rng_0.json").is_file() and (state / "rng_1.json").is_file()  # each node wrote its part


def test_slurm_script_starts_one_accelerate_launch_per_node(tmp_path):
    """configs/slurm/train_multinode.sbatch under stand-ins for srun (one copy per node), scontrol and accelerate:
    each node's launch gets its SLURM_NODEID as --machine_rank and the allocation's first host as the main one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "scontrol": 'printf "gpu-a\\ngpu-b\\n"',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
                'for node in 0 1; do SLURM_NODEID=$node "$@" || exit 1; done',
        "accelerate": f'printf "%s|" "$@" >> {tmp_path / "launches.txt"}; echo >> {tmp_path / "launches.txt"}',
    }
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2"}
    result = subprocess.run(["bash", str(ROOT / "configs" / "slurm" / "train_multinode.sbatch"), "train_sdxl.py",
                             "--output_dir", "/shared/my out"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    launches = [line.split("|")[:-1] for line in (tmp_path / "launches.txt").read_text().splitlines()]
    common = ["launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", "{}", "--num_processes", "16",
              "--main_process_ip", "gpu-a", "--main_process_port", "29500", "--rdzv_backend", "static",
              "--same_network", "--dynamo_backend", "no", "train_sdxl.py", "--output_dir", "/shared/my out"]
    assert launches == [[a.format(rank) for a in common] for rank in (0, 1)]  # the arguments arrive unsplit
