"""Sample images during training (library/sampling.py): prompt files, triggers, samplers, generation."""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.cli.config import parse_args
from library.cli.sampling_args import add_sampling_arguments
from library.training.sampling import (
    SAMPLER_NAMES,
    SamplePrompt,
    SamplePromptError,
    default_seed,
    generate_samples,
    load_sample_prompts,
    make_sampler,
    sample_file_name,
    should_sample,
)
from library.models.text_encoding import PromptEncoder
from library.models.tiny_models import build_tiny_model

# ---------------------------------------------------------------- prompt files


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_every_inline_option(tmp_path):
    (tmp_path / "ctrl.png").write_bytes(b"")
    path = write(tmp_path, "prompts.txt", (
        "# a comment\n"
        "\n"
        "a cat, (red:1.2) --n blurry, lowres --w 770 --h 30 --d 42 --l 5.5 --s 2000 --ss k_euler_a --cn ctrl.png\n"
        "   a dog   \n"
        "a--b --W 128 --S 0\n"
    ))
    cat, dog, ab = load_sample_prompts(path, default_size=100)
    assert cat == SamplePrompt(prompt="a cat, (red:1.2)", negative_prompt="blurry, lowres", width=768, height=64,
                               seed=42, cfg_scale=5.5, steps=1000, sampler="k_euler_a",
                               controlnet_image=str(tmp_path / "ctrl.png"), index=0)
    # defaults: the caller's size rounded down to a multiple of 8; kohya's 7.5 CFG and 30 steps
    assert dog == SamplePrompt(prompt="a dog", width=96, height=96, index=1)
    assert (dog.seed, dog.sampler, dog.negative_prompt, dog.cfg_scale, dog.steps) == (None, None, "", 7.5, 30)
    # "--" inside a word is text; option names are case-insensitive (kohya); steps clamp to >= 1
    assert (ab.prompt, ab.width, ab.height, ab.steps, ab.index) == ("a--b", 128, 96, 1, 2)


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "unknown option '--x'"),
    ("a cat --w wide", "'--w wide' is not a valid int"),
    ("a cat --l high", "'--l high' is not a valid float"),
    ("a cat --d", "'--d' needs a value"),
    ("a cat --ss fancy", "unknown sampler 'fancy'"),
    ("a cat --g 3.5", "DiT models"),
    ("a cat --d -4", "seed must be between 0"),
])
def test_txt_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "bad.txt", f"# header\nfine prompt\n{line}\n")
    with pytest.raises(SamplePromptError) as error:
        load_sample_prompts(path, 64)
    assert f"{path}, line 3" in str(error.value)
    assert message in str(error.value)


def test_toml_defaults_and_subsets(tmp_path):
    path = write(tmp_path, "prompts.toml", """
[prompt]
negative_prompt = "bad"
width = 128
sample_steps = 4
scale = 6
seed = 7

[[prompt.subset]]
prompt = "first"

[[prompt.subset]]
prompt = "second"
negative_prompt = ""
width = 203
height = 72
steps = 3
cfg_scale = 4.5
seed = 9
sample_sampler = "heun"
""")
    first, second = load_sample_prompts(path, default_size=64)
    assert first == SamplePrompt("first", "bad", width=128, height=64, seed=7, cfg_scale=6.0, steps=4, index=0)
    assert second == SamplePrompt("second", "", width=200, height=72, seed=9, cfg_scale=4.5, steps=3,
                                  sampler="heun", index=1)


@pytest.mark.parametrize("text, message", [
    ("[other]\nx = 1\n", "expected a [prompt] table with [[prompt.subset]] entries"),
    ("[prompt]\n[[prompt.subset]]\nprompt = 'a'\n[[prompt.subset]]\nprompt = 'b'\nguidance = 3\n",
     "[[prompt.subset]] #2: unknown key(s) guidance"),
    ("[prompt]\n[[prompt.subset]]\nprompt = 'a'\nwidth = 'big'\n", "[[prompt.subset]] #1: 'width' must be an integer"),
    ("[prompt]\nwidth = 64\n[[prompt.subset]]\nseed = 1\n", "[[prompt.subset]] #1: 'prompt' is missing"),
    ("[prompt\n", "is not valid TOML"),
])
def test_toml_errors(tmp_path, text, message):
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(SamplePromptError) as error:
        load_sample_prompts(path, 64)
    assert str(path) in str(error.value) and message in str(error.value)


def test_json_dicts_and_strings(tmp_path):
    path = write(tmp_path, "prompts.json",
                 '["a cat --w 128 --d 3 --n ugly", {"prompt": "b", "scale": 3, "sample_steps": 5, "height": 80}]')
    cat, b = load_sample_prompts(path, default_size=64)
    assert cat == SamplePrompt("a cat", "ugly", width=128, height=64, seed=3, index=0)
    assert b == SamplePrompt("b", width=64, height=80, cfg_scale=3.0, steps=5, index=1)


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"}', "expected a list of prompts"),
    ('["a", 5]', "entry #2: expected a string or an object, got int"),
    ('[{"prompt": "a", "seed": 1.5}]', "entry #1: 'seed' must be an integer"),
    ('["ok", "a --q 1"]', "entry #2: unknown option '--q'"),
    ('[{"prompt": "a",}]', "is not valid JSON"),
])
def test_json_errors(tmp_path, text, message):
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(SamplePromptError) as error:
        load_sample_prompts(path, 64)
    assert str(path) in str(error.value) and message in str(error.value)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(SamplePromptError, match="unknown format '.yaml'"):
        load_sample_prompts(write(tmp_path, "p.yaml", "a"), 64)
    with pytest.raises(SamplePromptError, match="does not exist"):
        load_sample_prompts(tmp_path / "missing.txt", 64)


# ---------------------------------------------------------------- triggers


@pytest.mark.parametrize("step, epoch, n_steps, n_epochs, at_first, epoch_end, expected", [
    (0, 0, None, None, True, False, True),      # --sample_at_first: before step 1
    (0, 0, 5, 1, False, False, False),          # ... and only then
    (5, None, None, None, True, False, False),
    (5, None, 5, None, False, False, True),     # after optimizer step 5
    (6, None, 5, None, False, False, False),
    (10, 2, 5, None, False, True, False),       # step mode never samples at an epoch end
    (10, None, 5, 2, False, False, False),      # epochs win over steps
    (10, 2, 5, 2, False, True, True),
    (7, 3, None, 2, False, True, False),
    (7, 4, None, 2, False, True, True),
    (7, 4, None, None, False, True, False),     # nothing configured
])
def test_should_sample_truth_table(step, epoch, n_steps, n_epochs, at_first, epoch_end, expected):
    assert should_sample(step, epoch, n_steps, n_epochs, at_first, epoch_end) is expected


def test_should_sample_first_call_of_a_resumed_run():
    assert should_sample(500, 3, 100, None, True, False, before_training=True) is True
    assert should_sample(500, 3, 100, None, False, False, before_training=True) is False
    assert should_sample(500, None, 100, None, True, False) is True  # a normal step-500 call: step rule


# ---------------------------------------------------------------- samplers

EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler", "k_lms": "LMSDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}


@pytest.fixture(scope="module")
def sd21_scheduler_config():
    return build_tiny_model("sd21").scheduler.config


def test_sampler_names_are_kohyas():
    assert sorted(SAMPLER_NAMES) == sorted(EXPECTED_CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_make_sampler_class_keeps_the_model_schedule(name, sd21_scheduler_config):
    sampler = make_sampler(name, sd21_scheduler_config)
    assert type(sampler).__name__ == EXPECTED_CLASSES[name]
    assert sampler.config.prediction_type == "v_prediction"  # SD 2.1 768-v
    assert (sampler.config.beta_start, sampler.config.beta_end, sampler.config.beta_schedule) == \
        (0.00085, 0.012, "scaled_linear")
    assert sampler.config.num_train_timesteps == 1000


def test_make_sampler_settings():
    config = build_tiny_model("sd15").scheduler.config
    assert make_sampler("ddim", config).config.clip_sample is False  # SD latents are not in [-1, 1]
    assert make_sampler("pndm", config).config.skip_prk_steps is True
    assert make_sampler("dpmsolver", config).config.algorithm_type == "dpmsolver"
    assert make_sampler("dpmsolver++", config).config.algorithm_type == "dpmsolver++"
    assert make_sampler("ddim", config).config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match=r"unknown sampler 'plms': expected one of ddim, pndm, .*k_dpm_2_a"):
        make_sampler("plms", config)


def test_sampling_arguments():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parse_args(parser, ["--sample_prompts", "p.txt", "--sample_every_n_steps", "50", "--sample_at_first",
                               "--sample_sampler", "k_euler_a"])
    assert (args.sample_prompts, args.sample_every_n_steps, args.sample_every_n_epochs, args.sample_at_first,
            args.sample_sampler) == ("p.txt", 50, None, True, "k_euler_a")
    assert parse_args(parser, []).sample_sampler == "ddim"
    with pytest.raises(SystemExit):
        parse_args(parser, ["--sample_sampler", "plms"])
    with pytest.raises(SystemExit):
        parse_args(parser, ["--sample_every_n_epochs", "-1"])
    # kohya: 0 means off (kohya_ss GUI configs write it), so no prompt file is needed
    assert parse_args(parser, ["--sample_every_n_epochs", "0", "--sample_every_n_steps", "0"]).sample_every_n_epochs == 0
    with pytest.raises(SystemExit):  # a trigger without a prompt file would silently do nothing
        parse_args(parser, ["--sample_every_n_epochs", "1"])


# ---------------------------------------------------------------- generation

STAMP = r"\d{14}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from threads; on a shared, busy CPU the thread barriers cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd15():
    model = build_tiny_model("sd15", seed=0)
    return model, PromptEncoder("sd1", model.tokenizers, model.text_encoders, max_token_length=150)


@pytest.fixture(scope="module")
def sdxl():
    model = build_tiny_model("sdxl", seed=0)
    return model, PromptEncoder("sdxl", model.tokenizers, model.text_encoders, max_token_length=75)


def run(setup, prompts, tmp_path, step=0, epoch=None, output_name="run", **kwargs):
    model, encoder = setup
    return generate_samples(model, encoder, prompts, tmp_path, output_name, step, epoch, "euler_a", "cpu",
                            torch.float32, **kwargs)


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.int16)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_generate_writes_kohya_named_pngs_at_the_requested_sizes(family, request, tmp_path):
    setup = request.getfixturevalue(family)
    prompts = [SamplePrompt("a red cube", width=64, height=72, steps=2, seed=42, index=0),
               SamplePrompt("a blue ball", "ugly", width=80, height=64, steps=2, sampler="ddim", index=1)]
    samples = run(setup, prompts, tmp_path, step=7)
    names = [s.path.name for s in samples]
    assert re.fullmatch(rf"run_000007_00_{STAMP}_42\.png", names[0]), names
    assert re.fullmatch(rf"run_000007_01_{STAMP}\.png", names[1]), names  # no --d: no seed suffix (kohya)
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == sorted(names)  # no temp files left
    for sample, (width, height) in zip(samples, [(64, 72), (80, 64)]):
        with Image.open(sample.path) as image:
            assert image.size == (width, height) and image.mode == "RGB"
            assert np.array_equal(np.asarray(image), np.asarray(sample.image))
            parameters = image.text["parameters"]
        assert f"Seed: {sample.seed}" in parameters and f"Size: {width}x{height}" in parameters
    assert samples[0].seed == 42 and samples[1].seed == default_seed(7, 1)
    assert "Negative prompt: ugly" in Image.open(samples[1].path).text["parameters"]


def test_epoch_names_and_no_output_name(sd15, tmp_path):
    prompt = SamplePrompt("x", width=64, height=64, steps=1, index=3)
    [sample] = run(sd15, [prompt], tmp_path, step=120, epoch=2, output_name=None)
    assert re.fullmatch(rf"e000002_03_{STAMP}\.png", sample.path.name)
    assert sample_file_name("lora", 123, None, 4, 9).startswith("lora_000123_04_")


def test_same_seed_same_image_and_prompts_differ(sd15, tmp_path):
    cat = SamplePrompt("a cat", width=64, height=64, steps=2, seed=5)
    dog = SamplePrompt("a dog", width=64, height=64, steps=2, seed=5, index=1)
    plain = SamplePrompt("a cat", width=64, height=64, steps=2, index=2)  # no --d: seed from (step, index)
    first, other, unseeded = run(sd15, [cat, dog, plain], tmp_path, step=10)
    again, unseeded_again = run(sd15, [cat, plain], tmp_path, step=10)
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).max() > 0
    assert unseeded.seed == unseeded_again.seed == default_seed(10, 2) != default_seed(20, 2)
    assert np.array_equal(pixels(unseeded), pixels(unseeded_again))
    assert np.abs(pixels(unseeded) - pixels(first)).max() > 0


def test_long_prompt_reaches_the_unet(sd15, tmp_path):
    """Words past token 75 change the image with max_token_length 150, and are cut with 75."""
    model, encoder150 = sd15
    base = " ".join(["cat"] * 80)
    prompts = [SamplePrompt(f"{base} red", width=64, height=64, steps=1, seed=1),
               SamplePrompt(f"{base} blue", width=64, height=64, steps=1, seed=1, index=1)]
    red, blue = run(sd15, prompts, tmp_path)
    assert np.abs(pixels(red) - pixels(blue)).max() > 0
    encoder75 = PromptEncoder("sd1", model.tokenizers, model.text_encoders, max_token_length=75)
    red75, blue75 = run((model, encoder75), prompts, tmp_path)
    assert np.array_equal(pixels(red75), pixels(blue75))


def test_modes_devices_and_global_rng_restored(sd15, tmp_path):
    model, _ = sd15
    model.unet.train()
    model.unet.down_blocks[0].eval()  # a frozen part inside a training module keeps its own flag
    model.text_encoders[0].train()
    before = {name: [m.training for m in module.modules()] for name, module in
              [("unet", model.unet), ("vae", model.vae), ("te", model.text_encoders[0])]}
    seen = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    rng = torch.get_rng_state()
    try:
        run(sd15, [SamplePrompt("x", width=64, height=64, steps=2, sampler="euler_a")], tmp_path)
    finally:
        hook.remove()
        after = {name: [m.training for m in module.modules()] for name, module in
                 [("unet", model.unet), ("vae", model.vae), ("te", model.text_encoders[0])]}
        model.unet.eval()
        model.text_encoders[0].eval()
    assert seen and not any(seen)  # sampled in eval mode (2 steps x CFG batch = 2 UNet calls)
    assert len(seen) == 2
    assert after == before and before["unet"][0] is True and before["unet"].count(False) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.unet.parameters())


def test_prompts_split_across_processes(sd15, tmp_path):
    class SecondOfTwoRanks:
        """What accelerate's PartialState.split_between_processes yields on rank 1 of 2."""

        @contextlib.contextmanager
        def split_between_processes(self, items):
            yield items[len(items) // 2:]

    prompts = [SamplePrompt(f"p{i}", width=64, height=64, steps=1, index=i) for i in range(3)]
    samples = run(sd15, prompts, tmp_path, step=3, distributed_state=SecondOfTwoRanks())
    assert [s.prompt.prompt for s in samples] == ["p1", "p2"]
    assert [s.path.name[:13] for s in samples] == ["run_000003_01", "run_000003_02"]


def test_controlnet_sampling(sd15, tmp_path):
    from diffusers import ControlNetModel

    model, _ = sd15
    controlnet = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=(16, 32, 64, 128))
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "canny.png")
    prompt_file = write(tmp_path, "p.txt", "a cat --w 64 --h 72 --d 1 --s 1 --cn canny.png\n")
    [prompt] = load_sample_prompts(prompt_file, 64)
    plain, = run(sd15, [prompt], tmp_path)
    zero, = run(sd15, [prompt], tmp_path, controlnet=controlnet)
    assert zero.image.size == (64, 72)
    assert np.array_equal(pixels(zero), pixels(plain))  # a fresh ControlNet's zero convolutions add nothing
    with torch.no_grad():
        for conv in controlnet.controlnet_down_blocks:
            conv.weight.normal_(0, 0.5)
    steered, = run(sd15, [prompt], tmp_path, controlnet=controlnet)
    assert np.abs(pixels(steered) - pixels(plain)).max() > 0
    assert controlnet.training is True  # from_unet gives a module in train mode; sampling gives it back so
