"""A state saved by N processes resumes on M: the global batch is kept by adjusting the accumulation, the data
order and the noise continue exactly, the LR schedule is rescaled; what cannot keep the global batch is one
`error:` line.

One run serves as the reference of both directions: one process with accumulation 2 for 4 steps, saving its
state at every step. Two processes resume its step-1 state (1 -> 2) and save at every step; one process with
accumulation 2 resumes that run's step-2 state (2 -> 1). Both end with the reference's LoRA. A linear schedule
makes a scheduler state that was not rescaled (accelerate steps it once per process) change the result.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import train_network
from tests.helpers.user_paths import assert_one_error_line, lora_args

SCHEDULE = ("--lr_scheduler", "linear")


def lora(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_lora(found, expected) -> None:
    assert found.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=1e-5, msg=key)


def test_state_resumes_on_another_process_count(tiny_model_dirs, shapes_data, tmp_path, launch_two_cpu_processes,
                                                capsys):
    model = tiny_model_dirs["sd15"]
    reference = tmp_path / "reference"  # 1 process x accumulation 2, 4 steps (6 images: 3 steps per epoch)
    assert train_network.main(lora_args(model, shapes_data, reference, 4, "--gradient_accumulation_steps", "2",
                                         *SCHEDULE, "--save_state", "--save_every_n_steps", "1")) == 0
    assert "processes: 1 node(s) x 1 per node = 1" in capsys.readouterr().out
    expected = lora(reference / "lora.safetensors")

    # 1 -> 2: the reference's flags, launched on two processes; the accumulation becomes 1
    two = tmp_path / "two"
    result = launch_two_cpu_processes("train_network.py", lora_args(
        model, shapes_data, two, 4, "--gradient_accumulation_steps", "2", *SCHEDULE, "--save_state",
        "--save_every_n_steps", "1", "--resume", reference / "lora-step00000001-state"))
    assert ("resume: the state was saved by 1 process(es); on 2 the gradient accumulation becomes 1 to keep the "
            "global batch (1 per device x 1 accumulation x 2 process(es) = 2)") in result.stdout
    # 6 images over 2 ranks: 3 batches each, so 3 optimizer steps per epoch with a global batch of 2
    assert "global batch: 1 per device x 1 accumulation x 2 process(es) = 2" in result.stdout
    assert "optimizer steps: 3 per epoch" in result.stdout
    assert_same_lora(lora(two / "lora.safetensors"), expected)
    saved = two / "lora-step00000002-state"
    record = json.loads((saved / "train_state.json").read_text())
    # two ranks, one batch each after the resume: 2 of the epoch's 6 batches per rank
    assert (record["num_processes"], record["batches_done_in_epoch"]) == (2, 2)
    assert record["settings"]["gradient_accumulation_steps"] == 1
    assert (saved / "rng_0.json").is_file() and (saved / "rng_1.json").is_file()

    # 2 -> 1 with accumulation 2 (the value that keeps the global batch), steps 3 and 4
    one = tmp_path / "one"
    assert train_network.main(lora_args(model, shapes_data, one, 4, "--gradient_accumulation_steps", "2", *SCHEDULE,
                                        "--resume", saved)) == 0
    printed = capsys.readouterr().out
    assert "the gradient accumulation becomes 2" in printed and "resuming from" in printed
    assert_same_lora(lora(one / "lora.safetensors"), expected)

    # refused before any model loads: 2 batches per step cannot be shared by 3 processes, and accumulation 3 on
    # one process would change the global batch
    refused = tmp_path / "refused"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORLD_SIZE", "3")
        assert train_network.main(lora_args(model, shapes_data, refused, 4, *SCHEDULE, "--resume", saved)) == 1
    assert_one_error_line(completed(capsys), "1 per device x 1 accumulation x 2 process(es) = 2",
                          "1 x 2 = 2 batches, which 3 process(es) cannot share evenly",
                          "resume on 1 or 2 process(es)")
    assert train_network.main(lora_args(model, shapes_data, refused, 4, "--gradient_accumulation_steps", "3",
                                        *SCHEDULE, "--resume", saved)) == 1
    assert_one_error_line(completed(capsys), "this run's would be 1 per device x 3 accumulation x 1 process(es) = 3",
                          "use --gradient_accumulation_steps 2")


def completed(capsys) -> subprocess.CompletedProcess:
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([], 1, captured.out, captured.err)


def test_accumulation_and_position_follow_the_global_batch(tmp_path):
    from library.training.checkpoints import StateError, TrainState
    from library.training.process_count import accumulation_for_processes, position_for_processes

    saved = {"train_batch_size": 4, "gradient_accumulation_steps": 1}
    # 8 GPUs x batch 4 x accumulation 1 = 32: on 2 GPUs accumulation 4, whether the flag says 1 (adjusted) or 4
    for requested in (1, 4):
        assert accumulation_for_processes(tmp_path, saved_settings=saved, current_settings={
            "train_batch_size": 4, "gradient_accumulation_steps": requested}, saved_processes=8, num_processes=2) == 4
    with pytest.raises(StateError, match=r"8 batches, which 3 process\(es\) cannot share evenly .*resume on 1, 2, 4 "
                                         r"or 8 process\(es\)"):
        accumulation_for_processes(tmp_path, saved_settings=saved, current_settings=saved, saved_processes=8,
                                   num_processes=3)
    # 3 of 8 batches per rank on 8 GPUs = 24 of the epoch's global order = 12 per rank on 2 GPUs
    state = position_for_processes(tmp_path, TrainState(3, 1, 3, 7, 8), 2, saved,
                                   {**saved, "gradient_accumulation_steps": 4})
    assert (state.global_step, state.batches_done_in_epoch, state.num_processes) == (3, 12, 2)
    assert state.extra == {"saved_num_processes": 8}


def test_scheduler_state_is_rescaled_or_left_to_winding():
    from torch.optim.lr_scheduler import LambdaLR, StepLR

    from library.training.process_count import load_scheduler_state

    def scheduler(processes, kind=LambdaLR):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        total = 10 * processes  # built in scheduler steps, as optim.scheduler_steps does
        if kind is StepLR:
            return StepLR(optimizer, step_size=2 * processes, gamma=0.5)
        return LambdaLR(optimizer, lambda step: 1 - step / total)

    two = scheduler(2)
    for _ in range(3 * 2):  # 3 optimizer steps on 2 processes
        two.optimizer.step()
        two.step()
    one = scheduler(1)
    assert load_scheduler_state(one, two.state_dict(), saved_processes=2, num_processes=1)
    assert one.last_epoch == 3 and one.get_last_lr() == [0.7] and one.optimizer.param_groups[0]["lr"] == 0.7
    assert not load_scheduler_state(scheduler(1, StepLR), scheduler(2, StepLR).state_dict(), saved_processes=2,
                                    num_processes=1)  # its step_size counts steps of its own: wound instead
