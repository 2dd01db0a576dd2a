"""networks/{merge_lora,resize_lora,extract_lora_from_models,check_lora_weights}.py: kohya's LoRA tools.

Every check compares against an independent computation: hooked LoRA outputs, dense ``up @ down`` updates,
an SVD of the dense update done here, or numbers worked out by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from library.models.loading import StableDiffusionModel, load_model, save_single_file
from library.io import read_safetensors_metadata
from networks import check_lora_weights, extract_lora_from_models, merge_lora, resize_lora
from library.adapters.lora_files import LoRAFactors, group_modules, read_lora_file
from library.adapters.lora_extract import extract_lora_state_dict, low_rank_factors, signed_quantile
from networks.lora import LoRAModule, create_network, create_network_from_weights
from library.adapters.lora_resize import choose_rank, rank_by_sv_cumulative, rank_by_sv_fro, rank_by_sv_ratio, resize_lora_modules

# float32 UNet outputs of a merged model vs the same LoRAs hooked: W x + dW x and (W + dW) x round differently, and
# which CPU GEMM kernel runs depends on memory layout (so on what ran before in the process): up to ~6e-5 seen
# on outputs of magnitude ~2, against changes of more than 1e-2 that the merges make.
ATOL = 1e-4
SAI = "https://github.com/Stability-AI/generative-models"


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Before any other fixture of the module (autouse), so models are built and merged on one thread."""


# ---------------------------------------------------------------------------------------------- helpers


def make_network(model: StableDiffusionModel, dim: int, alpha: float, seed: int, **kwargs):
    """A network with seeded random up weights (a fresh one has up = 0 and changes nothing)."""
    network = create_network(1.0, dim, alpha, model.vae, model.text_encoders, model.unet, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.1)
    return network


def unet_inputs(model: StableDiffusionModel) -> dict:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=generator),
    }
    if model.family.size_conditioning:
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, model.text_encoders[1].config.projection_dim, generator=generator),
            "time_ids": torch.randn(1, 6, generator=generator),
        }
    return inputs


@torch.no_grad()
def outputs(model: StableDiffusionModel, inputs: dict) -> list[torch.Tensor]:
    """UNet output and each text encoder's last hidden state."""
    ids = (torch.arange(77) % 300 + 400).unsqueeze(0)
    return [model.unet(**inputs).sample] + [te(ids).last_hidden_state for te in model.text_encoders]


def assert_outputs_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=1e-4)


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Dense update of every module of a LoRA file."""
    modules, _ = group_modules(read_lora_file(path)[0])
    return {name: module.delta() for name, module in modules.items()}


def network_deltas(network) -> dict[str, torch.Tensor]:
    return {lora.lora_name: LoRAModule.delta_weight(lora.lora_down.weight.detach(), lora.lora_up.weight.detach(), lora.scale)
            for lora in network.loras}


def lora_file(state: dict[str, list], path: Path) -> Path:
    save_file({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("family, output", [("sd15", "merged.safetensors"), ("sdxl", "merged_folder")])
def test_merge_into_model_equals_the_hooked_loras(tmp_path: Path, tiny_model_dirs: dict, family: str, output: str) -> None:
    model = load_model(tiny_model_dirs[family])
    inputs = unet_inputs(model)
    base = outputs(model, inputs)
    first = make_network(model, 4, 2.0, seed=0, conv_dim="2", conv_alpha="1")
    second = make_network(model, 2, 1.0, seed=1)
    first.save_weights(tmp_path / "a.safetensors")
    second.save_weights(tmp_path / "b.pt")
    for network, ratio in ((first, 0.7), (second, -0.4)):
        network.set_multiplier(ratio)
        network.apply_to(model.text_encoders, model.unet)
    expected = outputs(model, inputs)

    out = tmp_path / output
    assert merge_lora.main(["--sd_model", str(tiny_model_dirs[family]), "--save_to", str(out), "--models",
                            str(tmp_path / "a.safetensors"), str(tmp_path / "b.pt"), "--ratios", "0.7", "-0.4"]) == 0
    merged = load_model(out)
    assert merged.family.name == model.family.name
    actual = outputs(merged, inputs)
    assert all((e - b).abs().max() > 0.01 for e, b in zip(expected, base))  # both parts really changed
    assert_outputs_close(actual, expected)
    if out.suffix == ".safetensors":
        assert_model_spec(out, arch="stable-diffusion-v1", impl=SAI, title="merged", resolution="64x64",
                          merged_from="sd15, a, b")


def data_sha256(path: Path) -> str:
    """ModelSpec's hash recomputed from the bytes: sha256 of everything after the header."""
    data = path.read_bytes()
    return "0x" + hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def assert_model_spec(path: Path, *, arch: str, impl: str, title: str, resolution: str, merged_from: str) -> None:
    """The ModelSpec keys the training scripts write (library.models.model_spec), as the tools write them."""
    meta = read_safetensors_metadata(path)
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (arch, impl)
    assert (meta["modelspec.title"], meta["modelspec.resolution"]) == (title, resolution)
    assert (meta["modelspec.prediction_type"], meta["modelspec.merged_from"]) == ("epsilon", merged_from)
    assert meta["modelspec.hash_sha256"] == data_sha256(path)
    assert meta["modelspec.implementation_version"].startswith("sd-trainer/") and meta["modelspec.date"][:2] == "20"


def test_merge_loras_same_rank_sums_factors_as_kohya(tmp_path: Path) -> None:
    """Hand numbers. A: rank 1, alpha 1; B: rank 1, alpha 4, ratio -0.5 -> factor scale sqrt(4/1) * -0.5 = -1
    (|-1| on up). down = [1, 2] - [0, 1] = [1, 1]; up = [1, 0] + [0, 2] = [1, 2]; alpha stays A's 1.
    Module y is only in B: down 3 * -0.5 = -1.5, up 1 * 0.5 = 0.5."""
    a = lora_file({"lora_unet_x.lora_down.weight": [[1.0, 2.0]], "lora_unet_x.lora_up.weight": [[1.0], [0.0]],
                   "lora_unet_x.alpha": 1.0}, tmp_path / "a.safetensors")
    b = lora_file({"lora_unet_x.lora_down.weight": [[0.0, 1.0]], "lora_unet_x.lora_up.weight": [[0.0], [2.0]],
                   "lora_unet_x.alpha": 4.0, "lora_unet_y.lora_down.weight": [[3.0]],
                   "lora_unet_y.lora_up.weight": [[1.0]], "lora_unet_y.alpha": 1.0}, tmp_path / "b.safetensors")
    out = tmp_path / "ab.safetensors"
    assert merge_lora.main(["--save_to", str(out), "--models", str(a), str(b), "--ratios", "1", "-0.5"]) == 0
    merged = load_file(out)
    assert merged["lora_unet_x.lora_down.weight"].tolist() == [[1.0, 1.0]]
    assert merged["lora_unet_x.lora_up.weight"].tolist() == [[1.0], [2.0]]
    assert float(merged["lora_unet_x.alpha"]) == 1.0
    assert merged["lora_unet_y.lora_down.weight"].tolist() == [[-1.5]]
    assert merged["lora_unet_y.lora_up.weight"].tolist() == [[0.5]]
    assert deltas(out)["lora_unet_x"].tolist() == [[1.0, 1.0], [2.0, 2.0]]
    meta = read_safetensors_metadata(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("1", "1.0", "networks.lora")
    assert meta["modelspec.merged_from"] == "a, b" and len(meta["sshs_model_hash"]) == 64
    assert meta["modelspec.title"] == "ab" and meta["modelspec.hash_sha256"] == data_sha256(out)
    assert "modelspec.architecture" not in meta  # the inputs name no family

    c = lora_file({"lora_unet_x.lora_down.weight": [[1.0, 2.0], [0.0, 1.0]],
                   "lora_unet_x.lora_up.weight": [[1.0, 0.0], [0.0, 1.0]]}, tmp_path / "c.safetensors")  # rank 2
    assert merge_lora.main(["--save_to", str(tmp_path / "ac.safetensors"), "--models", str(a), str(c)]) == 1
    assert not (tmp_path / "ac.safetensors").exists()


def test_merge_loras_concat_is_the_exact_weighted_sum(tmp_path: Path, tiny_model_dirs: dict) -> None:
    model = load_model(tiny_model_dirs["sd15"])
    inputs = unet_inputs(model)
    first = make_network(model, 4, 2.0, seed=2)
    second = make_network(model, 2, 8.0, seed=3, conv_dim="2", conv_alpha="0.5")
    first.save_weights(tmp_path / "a.safetensors", metadata={"ss_base_model_version": "sd_v1", "ss_v2": "False"})
    second.save_weights(tmp_path / "b.safetensors")
    out = tmp_path / "concat.safetensors"
    assert merge_lora.main(["--save_to", str(out), "--concat", "--models", str(tmp_path / "a.safetensors"),
                            str(tmp_path / "b.safetensors"), "--ratios", "0.6", "-1.5"]) == 0

    merged, d1, d2 = deltas(out), network_deltas(first), network_deltas(second)
    assert merged.keys() == d1.keys() | d2.keys()
    for name, delta in merged.items():
        expected = 0.6 * d1.get(name, 0) - 1.5 * d2.get(name, 0)
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    weights = load_file(out)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert weights[f"{q}.lora_down.weight"].shape[0] == 6 and float(weights[f"{q}.alpha"]) == 2.0
    meta = read_safetensors_metadata(out)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_base_model_version"] == "sd_v1"
    assert_model_spec(out, arch="stable-diffusion-v1/lora", impl="diffusers", title="concat", resolution="512x512",
                      merged_from="a, b")

    for network, ratio in ((first, 0.6), (second, -1.5)):
        network.set_multiplier(ratio)
        network.apply_to(model.text_encoders, model.unet)
    expected_out = outputs(model, inputs)
    first.restore(), second.restore()
    loaded, _ = create_network_from_weights(1.0, out, None, model.text_encoders, model.unet, for_inference=True)
    loaded.apply_to(model.text_encoders, model.unet)
    assert_outputs_close(outputs(model, inputs), expected_out)


def test_tools_refuse_to_overwrite_and_reject_foreign_loras(tmp_path: Path, tiny_model_dirs: dict,
                                                            capsys: pytest.CaptureFixture) -> None:
    lora = lora_file({"lora_unet_x.lora_down.weight": [[1.0, 2.0]], "lora_unet_x.lora_up.weight": [[1.0], [0.0]]},
                     tmp_path / "a.safetensors")
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    for main, argv in (
        (merge_lora.main, ["--save_to", str(existing), "--models", str(lora)]),
        (merge_lora.main, ["--sd_model", str(tiny_model_dirs["sd15"]), "--save_to", str(existing), "--models", str(lora)]),
        (resize_lora.main, ["--model", str(lora), "--save_to", str(existing), "--new_rank", "1"]),
        (extract_lora_from_models.main, ["--model_org", str(tiny_model_dirs["sd15"]), "--model_tuned",
                                         str(tiny_model_dirs["sd15"]), "--save_to", str(existing)]),
    ):
        assert main(argv) == 1
        assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"

    sd15 = load_model(tiny_model_dirs["sd15"])
    make_network(sd15, 2, 1.0, seed=0).save_weights(tmp_path / "sd15.safetensors")
    out = tmp_path / "sdxl_merged.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_model_dirs["sdxl"]), "--save_to", str(out), "--models",
                            str(tmp_path / "sd15.safetensors")]) == 1
    assert "match no LoRA module" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------- resize


def test_rank_rules_hand_numbers() -> None:
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert rank_by_sv_ratio(s, 3.0) == 2  # keep S > 8/3
    assert rank_by_sv_ratio(s, 10.0) == 4
    assert rank_by_sv_fro(s, 0.9) == 2  # energy 64/85 = 0.75 < 0.81 <= 80/85 = 0.94
    assert rank_by_sv_fro(s, 0.99) == 3  # 80/85 = 0.941 < 0.9801 <= 84/85 = 0.988
    assert rank_by_sv_cumulative(s, 0.75) == 2  # 8/15 = 0.53, 12/15 = 0.8
    assert choose_rank(s, 3, "sv_ratio", 10.0) == 3  # capped at --new_rank
    assert choose_rank(s, 3, None, None) == 3
    assert choose_rank(torch.zeros(4), 3, None, None) == 1  # kohya: an all-zero module keeps rank 1


def _low_rank_network(model: StableDiffusionModel, true_rank: int):
    """dim 8 (alpha 4), LoCon dim 8 (alpha 2), whose updates truly have rank ``true_rank``."""
    network = create_network(1.0, 8, 4.0, None, model.text_encoders, model.unet, conv_dim="8", conv_alpha="2")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for lora in network.loras:
            up = lora.lora_up.weight
            low = torch.randn(up.shape[0], true_rank, generator=generator) @ torch.randn(true_rank, 8, generator=generator)
            up.copy_(low.reshape(up.shape) * 0.3)
    return network


def test_resize_of_a_rank_two_lora_stored_at_rank_eight_is_exact(tmp_path: Path, tiny_model_dirs: dict) -> None:
    model = load_model(tiny_model_dirs["sd15"])
    network = _low_rank_network(model, true_rank=2)
    source = tmp_path / "r8.safetensors"
    network.save_weights(source, metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_training_comment": "hi",
                                           "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "2"})})
    out = tmp_path / "r2.safetensors"
    assert resize_lora.main(["--model", str(source), "--save_to", str(out), "--new_rank", "2"]) == 0

    old, new = network_deltas(network), deltas(out)
    assert new.keys() == old.keys()
    for name, delta in new.items():
        torch.testing.assert_close(delta, old[name], atol=1e-6, rtol=1e-4)
    weights = load_file(out)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {weights[k].shape[0] for k in weights if k.endswith("lora_down.weight")} == {2}
    assert float(weights[f"{q}.alpha"]) == 1.0  # 4/8 * 2: alpha/rank unchanged
    assert float(weights[f"{conv}.alpha"]) == 0.5 and weights[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3)
    meta = read_safetensors_metadata(out)
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 2; hi"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "1.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5"}
    assert meta["sshs_model_hash"] != read_safetensors_metadata(source)["sshs_model_hash"]


def test_lossy_resize_keeps_the_best_approximation_and_reports_its_retention(
        tmp_path: Path, tiny_model_dirs: dict, capsys: pytest.CaptureFixture) -> None:
    model = load_model(tiny_model_dirs["sd15"])
    network = make_network(model, 8, 4.0, seed=7)
    modules = {l.lora_name: LoRAFactors(l.lora_name, l.lora_down.weight.detach(), l.lora_up.weight.detach(), float(l.alpha))
               for l in network.loras}
    resized, infos = resize_lora_modules(modules, 3)
    for info in infos:
        old = modules[info.name].delta()
        new = resized[info.name].delta()
        u, s, vh = torch.linalg.svd(old.reshape(old.shape[0], -1).double(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young: the best rank-3 approximation
        torch.testing.assert_close(new.reshape(best.shape).double(), best, atol=1e-5, rtol=1e-4)
        assert info.fro_retained == pytest.approx(float(new.norm() / old.norm()), rel=1e-5)
        assert info.fro_retained == pytest.approx(float(s[:3].norm() / s.norm()), rel=1e-5)
        assert info.sum_retained == pytest.approx(float(s[:3].sum() / s.sum()), rel=1e-5)
        assert 0.3 < info.fro_retained < 1.0 and (info.new_rank, info.new_alpha) == (3, 1.5)

    source = tmp_path / "r8.safetensors"
    network.save_weights(source)
    assert resize_lora.main(["--model", str(source), "--save_to", str(tmp_path / "r3.safetensors"), "--new_rank", "3",
                             "--verbose"]) == 0
    printed = capsys.readouterr().out
    first = infos[0]
    assert f"{first.name:75} | sum(S) retained: {first.sum_retained:.1%}, fro retained: {first.fro_retained:.1%}" in printed
    mean = sum(i.fro_retained for i in infos) / len(infos)
    assert f"Average Frobenius norm retention: {mean:.2%}" in printed


def test_dynamic_resize_picks_the_smallest_rank_reaching_the_fraction(tmp_path: Path, tiny_model_dirs: dict) -> None:
    model = load_model(tiny_model_dirs["sd15"])
    network = make_network(model, 8, 8.0, seed=9)
    source = tmp_path / "r8.safetensors"
    network.save_weights(source)
    out = tmp_path / "dyn.safetensors"
    assert resize_lora.main(["--model", str(source), "--save_to", str(out), "--new_rank", "6",
                             "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"]) == 0
    weights, old = load_file(out), network_deltas(network)
    ranks = set()
    for name, delta in old.items():
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
        retained = (s.pow(2).cumsum(0) / s.pow(2).sum()).sqrt()
        expected = min(6, int((retained < 0.9).sum()) + 1)
        rank = weights[f"{name}.lora_down.weight"].shape[0]
        assert rank == expected
        assert float(weights[f"{name}.alpha"]) == pytest.approx(rank)  # alpha/rank stays 8/8 = 1
        ranks.add(rank)
    assert len(ranks) > 1
    meta = read_safetensors_metadata(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.9 from 8; ")


# ---------------------------------------------------------------------------------------------- extract


def test_quantile_and_clamp_follow_torch_quantile() -> None:
    assert float(signed_quantile(torch.tensor([4.0, 0.0, 3.0, 1.0, 2.0]), 0.9)) == pytest.approx(3.6)
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.5, 0.99, 1.0):
        assert float(signed_quantile(values, q)) == pytest.approx(float(torch.quantile(values, q)))
    diff = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    down, up = low_rank_factors(diff, 5, clamp_quantile=1.0)
    torch.testing.assert_close(up @ down, diff, atol=1e-5, rtol=1e-5)  # full rank, no clamp: exact
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.8)
    down_c, up_c = low_rank_factors(diff, 5, clamp_quantile=0.8)
    torch.testing.assert_close(up_c, up.clamp(-high, high))
    torch.testing.assert_close(down_c, down.clamp(-high, high))


def _find(modules: dict[str, nn.Module], suffix: str) -> nn.Module:
    return next(module for name, module in modules.items() if name.endswith(suffix))


def test_extract_recovers_a_known_low_rank_difference(tmp_path: Path, tiny_model_dirs: dict) -> None:
    org_dir = tiny_model_dirs["sd15"]
    tuned = load_model(org_dir)
    generator = torch.Generator().manual_seed(11)
    unet_modules, te_modules = dict(tuned.unet.named_modules()), dict(tuned.text_encoders[0].named_modules())
    changed = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            unet_modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"],
        "lora_unet_up_blocks_1_attentions_0_proj_in": unet_modules["up_blocks.1.attentions.0.proj_in"],  # 1x1 conv
        "lora_unet_down_blocks_0_resnets_0_conv1": unet_modules["down_blocks.0.resnets.0.conv1"],  # 3x3 conv
        "lora_te_text_model_encoder_layers_1_mlp_fc1": _find(te_modules, "layers.1.mlp.fc1"),
    }
    known = {}
    with torch.no_grad():
        for name, module in changed.items():
            weight = module.weight
            rank = 2 if weight.dim() == 2 else 3
            low = (torch.randn(weight.shape[0], rank, generator=generator)
                   @ torch.randn(rank, weight[0].numel(), generator=generator))
            known[name] = (low * 0.05).reshape(weight.shape)
            weight.add_(known[name])
    tuned_file = tmp_path / "tuned.safetensors"
    save_single_file(tuned, tuned_file)
    out = tmp_path / "extracted.safetensors"
    assert extract_lora_from_models.main(["--model_org", str(org_dir), "--model_tuned", str(tuned_file), "--save_to", str(out),
                                          "--dim", "4", "--conv_dim", "4", "--clamp_quantile", "1"]) == 0

    extracted = deltas(out)
    for name, delta in extracted.items():
        torch.testing.assert_close(delta, known.get(name, torch.zeros_like(delta)), atol=1e-5, rtol=1e-4)
    assert known.keys() <= extracted.keys() and any(n.startswith("lora_te_") for n in extracted)
    meta = read_safetensors_metadata(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == ("4", "4.0", "sd_v1")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert_model_spec(out, arch="stable-diffusion-v1/lora", impl="diffusers", title="extracted", resolution="64x64",
                      merged_from="sd15, tuned")

    inputs = unet_inputs(tuned)
    expected = outputs(tuned, inputs)
    base = load_model(org_dir)
    network, _ = create_network_from_weights(1.0, out, None, base.text_encoders, base.unet, for_inference=True)
    network.apply_to(base.text_encoders, base.unet)
    assert_outputs_close(outputs(base, inputs), expected)
    pipe = load_model(org_dir).to_pipeline()
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(pipe.unet(**inputs).sample, expected[0], atol=ATOL, rtol=1e-4)

    # text encoder changes below --min_diff are left out (kohya's "Text encoder is same")
    unchanged_te = extract_lora_state_dict(load_model(org_dir), tuned, 4, None, 1.0, min_diff=1.0)
    assert unchanged_te and not any(k.startswith("lora_te") for k in unchanged_te)


# ---------------------------------------------------------------------------------------------- check


def test_check_counts_parts_ranks_and_warns_about_untrained_modules(tmp_path: Path, tiny_model_dirs: dict,
                                                                    capsys: pytest.CaptureFixture) -> None:
    model = load_model(tiny_model_dirs["sdxl"])
    network = make_network(model, 4, 2.0, seed=0, conv_dim="2", conv_alpha="1")
    dead = [network.unet_loras[0].lora_name, network.text_encoder_loras[-1].lora_name]
    with torch.no_grad():
        for lora in network.loras:
            if lora.lora_name in dead:
                lora.lora_up.weight.zero_()
    weights = {k: v.contiguous() for k, v in network.state_dict().items()}
    weights["lora_unet_extra.dora_scale"] = torch.ones(3)
    file = tmp_path / "lora.safetensors"
    save_file(weights, str(file))

    assert check_lora_weights.main([str(file), "-s"]) == 0
    captured = capsys.readouterr()
    te1 = sum(l.lora_name.startswith("lora_te1_") for l in network.text_encoder_loras)
    te2 = len(network.text_encoder_loras) - te1
    parts = f"te1: {te1}, te2: {te2}, unet: {len(network.unet_loras)}"
    assert f"number of LoRA modules: {len(network.loras)} ({parts})" in captured.out
    assert "rank(s): 2, 4; alpha(s): 1, 2" in captured.out
    assert "lora_unet_extra.dora_scale" in captured.out and "(3,)" in captured.out
    warned = [line.split(":")[1].strip() for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warned == sorted(dead)
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    line = next(l for l in captured.out.splitlines() if l.startswith(q + " "))
    down, up = getattr(network, q).lora_down.weight.detach(), getattr(network, q).lora_up.weight.detach()
    assert line.split()[1:] == ["4", "2", f"{float(down.abs().mean()):.3e}", f"{float(up.abs().mean()):.3e}"]
    assert check_lora_weights.main([str(tmp_path / "missing.safetensors")]) == 1
