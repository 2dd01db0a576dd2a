"""train_sdxl.py end to end on the tiny SDXL model: what trains, what stays frozen, files diffusers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

import train_sdxl
from library.models.ldm_layout import unet_table
from library.models.loading import load_model, save_single_file
from library.models.sdxl_blocks import block_index
from tools.make_sample_dataset import make_sample_dataset
from tests.helpers.fine_tune_args import changed, fine_tune_args as args_for



@pytest.fixture(scope="module")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "shapes", count=4, size=96, seed=1).parent


@pytest.fixture(scope="module")
def sdxl_single_file(tiny_model_dirs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_single_file(load_model(tiny_model_dirs["sdxl"]), path)
    return path


def test_unet_only_saves_a_single_file_that_diffusers_loads(tiny_model_dirs, sdxl_single_file, sample_data, tmp_path):
    output = tmp_path / "out"
    assert train_sdxl.main(args_for(sdxl_single_file, sample_data, output, 2)) == 0
    saved = output / "model.safetensors"  # the input was a single file, so the output is one too
    theirs = StableDiffusionXLPipeline.from_single_file(saved, config=str(tiny_model_dirs["sdxl"]), local_files_only=True)
    ours = load_model(saved)
    base = load_model(tiny_model_dirs["sdxl"])
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(theirs, name).state_dict(), (getattr(ours, name) if name in ("unet", "vae") else
                                                   ours.text_encoders[0 if name == "text_encoder" else 1]).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert changed(ours.unet.state_dict(), base.unet.state_dict())
    for trained_te, base_te in zip(ours.text_encoders, base.text_encoders):
        assert not changed(trained_te.state_dict(), base_te.state_dict())


def test_text_encoders_with_their_own_learning_rates(tiny_model_dirs, sample_data, tmp_path):
    output = tmp_path / "out"
    assert train_sdxl.main(args_for(tiny_model_dirs["sdxl"], sample_data, output, 2, "--train_text_encoder",
                                    "--learning_rate_te1", "1e-3", "--learning_rate_te2", "0")) == 0
    folder = output / "model"  # a folder in, a folder out
    trained = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    base = load_model(tiny_model_dirs["sdxl"])
    te1 = changed(trained.text_encoder.state_dict(), base.text_encoders[0].state_dict())
    assert te1 and not any(k.startswith(("encoder.layers.2.", "final_layer_norm")) for k in te1)  # unused by SDXL
    assert not changed(trained.text_encoder_2.state_dict(), base.text_encoders[1].state_dict())  # lr 0: frozen
    assert changed(trained.unet.state_dict(), base.unet.state_dict())


def test_block_lr_zero_freezes_that_block(tiny_model_dirs, sample_data, tmp_path):
    lrs = ["1e-3"] * 23
    lrs[0] = lrs[22] = lrs[4] = "0"  # time/label embedding, out, input_blocks.3 (the first downsampler)
    output = tmp_path / "out"
    assert train_sdxl.main(args_for(tiny_model_dirs["sdxl"], sample_data, output, 2, "--block_lr", ",".join(lrs),
                                    "--save_model_as", "diffusers")) == 0
    trained = UNet2DConditionModel.from_pretrained(output / "model", subfolder="unet", local_files_only=True)
    base = load_model(tiny_model_dirs["sdxl"]).unet
    table = unet_table(dict(base.config))
    moved = changed(trained.state_dict(), base.state_dict())
    blocks_moved = {block_index(table.diffusers_key_to_ldm(k)) for k in moved}
    assert not blocks_moved & {0, 4, 22}
    assert {1, 5, 10, 13, 21} <= blocks_moved


def test_resume_gives_the_same_model(tiny_model_dirs, sample_data, tmp_path):
    model = tiny_model_dirs["sdxl"]
    extra = ("--save_model_as", "safetensors", "--train_text_encoder", "--save_every_n_steps", "2")
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "straight", 4, *extra)) == 0
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "first", 4, *extra, "--save_state")) == 0
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "second", 4, *extra,
                                    "--resume", str(tmp_path / "first" / "model-step00000002-state"))) == 0
    straight, resumed = load_model(tmp_path / "straight" / "model.safetensors"), load_model(tmp_path / "second" / "model.safetensors")
    for a, b in [(straight.unet, resumed.unet), *zip(straight.text_encoders, resumed.text_encoders)]:
        sa, sb = a.state_dict(), b.state_dict()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=1e-7)


def test_refusals(tiny_model_dirs, sample_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_sdxl.main(args_for(tiny_model_dirs["sdxl"], sample_data, tmp_path / "a", 1, "--train_text_encoder",
                                 "--cache_text_encoder_outputs"))
    assert "cannot be used with --train_text_encoder" in capsys.readouterr().err
    assert train_sdxl.main(args_for(tiny_model_dirs["sd15"], sample_data, tmp_path / "b", 1)) == 1
    assert "this script trains sdxl models only" in capsys.readouterr().err



def test_deepspeed_zero2_two_processes_saves_a_loadable_model(tiny_model_dirs, sample_data, tmp_path,
                                                              launch_two_cpu_processes):
    output = tmp_path / "out"
    launch_two_cpu_processes("train_sdxl.py", args_for(tiny_model_dirs["sdxl"], sample_data, output, 2, "--deepspeed",
                                                       "--zero_stage", "2", "--train_text_encoder",
                                                       "--save_model_as", "safetensors"))
    saved = load_model(output / "model.safetensors")
    base = load_model(tiny_model_dirs["sdxl"])
    assert changed(saved.unet.state_dict(), base.unet.state_dict())
    assert all(torch.isfinite(v).all() for v in saved.unet.state_dict().values())


def test_ema_saves_the_closed_form_average_and_samples_with_it(tiny_model_dirs, sample_data, tmp_path):
    """decay 0.5, no warm-up, 3 steps: ema = d^3 w0 + (1-d)(d^2 w1 + d w2 + w3), with w_i the raw weights after
    step i (saved with --save_raw_too); sampling at step 3 must see the EMA weights."""
    from library.training.callbacks import PeriodicSampling
    from library.training.loop import Callback

    class Trainee(Callback):
        def on_train_start(self, run, state):
            self.unet = run.trainee.model.unet

    seen, trainee = [], Trainee()
    # sampled at the same points as --sample_prompts, with the same (evaluation) weights
    recorder = PeriodicSampling(lambda step, epoch: seen.append(trainee.unet.conv_in.weight.detach().clone()),
                                every_n_steps=3, every_n_epochs=None, at_first=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle --w 64 --h 64 --s 1\n")
    output = tmp_path / "out"
    assert train_sdxl.main(args_for(tiny_model_dirs["sdxl"], sample_data, output, 3, "--use_ema", "--ema_decay", "0.5",
                                    "--no_ema_warmup", "--save_raw_too", "--save_every_n_steps", "1",
                                    "--save_model_as", "safetensors", "--sample_prompts", str(prompts),
                                    "--sample_every_n_steps", "3"), callbacks=[trainee, recorder]) == 0
    assert len(list(output.glob("sample/*.png"))) == 1  # --sample_prompts sampled at step 3 too
    w = [load_model(tiny_model_dirs["sdxl"]).unet.state_dict()]
    w += [load_model(output / f"model-step0000000{i}-raw.safetensors").unet.state_dict() for i in (1, 2)]
    w += [load_model(output / "model-raw.safetensors").unet.state_dict()]
    saved = load_model(output / "model.safetensors").unet.state_dict()
    d = 0.5
    for key in saved:
        expected = d**3 * w[0][key] + (1 - d) * (d**2 * w[1][key] + d * w[2][key] + w[3][key])
        torch.testing.assert_close(saved[key], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(saved["conv_in.weight"], w[3]["conv_in.weight"])  # EMA differs from the raw weights
    assert len(seen) == 1 and torch.equal(seen[0], saved["conv_in.weight"])


def test_ema_state_resumes_exactly(tiny_model_dirs, sample_data, tmp_path):
    extra = ("--use_ema", "--ema_decay", "0.9", "--save_model_as", "safetensors", "--save_every_n_steps", "2")
    model = tiny_model_dirs["sdxl"]
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "straight", 4, *extra)) == 0
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "first", 4, *extra, "--save_state")) == 0
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "second", 4, *extra,
                                    "--resume", str(tmp_path / "first" / "model-step00000002-state"))) == 0
    a = load_model(tmp_path / "straight" / "model.safetensors").unet.state_dict()
    b = load_model(tmp_path / "second" / "model.safetensors").unet.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["AdamW", "Adafactor"])
def test_fused_backward_pass_gives_the_plain_step_weights(tiny_model_dirs, sample_data, tmp_path, optimizer):
    extra = ("--optimizer_type", optimizer, "--save_model_as", "safetensors", "--max_grad_norm", "0")
    model = tiny_model_dirs["sdxl"]
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "plain", 2, *extra)) == 0
    assert train_sdxl.main(args_for(model, sample_data, tmp_path / "fused", 2, *extra, "--fused_backward_pass")) == 0
    plain = load_model(tmp_path / "plain" / "model.safetensors").unet.state_dict()
    fused = load_model(tmp_path / "fused" / "model.safetensors").unet.state_dict()
    assert changed(plain, load_model(model).unet.state_dict())
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-7)
