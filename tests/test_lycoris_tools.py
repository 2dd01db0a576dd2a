"""The network tools on files LyCORIS itself writes (lycoris-lora's kohya plug-in on the tiny SD 1.5 model,
whose kohya names are diffusers' paths): merge_lora.py bakes LoHa, LoKr, (IA)³ and DoRA into a checkpoint with
the weights LyCORIS's own merge gives (atol 1e-6), check_lora_weights.py reports their kinds and norms,
resize_lora.py and the LoRA-into-LoRA merge refuse them with one line.

The references are LyCORIS's: ``lycoris.utils.merge`` on a copy of the base model, reading the saved file; for
(IA)³, which that utility cannot build in lycoris-lora 4.1.3 (``make_module_from_state_dict`` takes no
``on_input``), the merge of the network's own modules; for LoHa with alpha != rank, whose LyCORIS merge applies
``alpha / rank`` twice, the output of LyCORIS's network loaded from the file and applied to the base model.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.io import read_safetensors_metadata
from library.models.loading import load_model, save_single_file
from networks import check_lora_weights, extract_lora_from_models, merge_lora, resize_lora
from networks.lora import merge_into_model
from tests.helpers.user_paths import assert_one_error_line

RATIO = 0.7
# Every Linear/conv of the transformer and ResNet blocks and the CLIP attention/MLP (3x3 convs included); the
# "full" preset would also name time_embedding twice on a diffusers UNet.
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# name -> (algo, dim, alpha, network args)
FILES = {
    "loha": ("loha", 4, 4.0, {}),
    "lokr": ("lokr", 4, 4.0, {"factor": "4"}),
    "ia3": ("ia3", 4, 4.0, {}),
    "dora": ("locon", 4, 2.0, {"dora_wd": "True"}),
    "loha_alpha": ("loha", 4, 1.0, {}),
}
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Before any other fixture of the module (autouse), so models are built and merged on one thread."""


def state(model) -> dict[str, torch.Tensor]:
    """A copy of the UNet and text-encoder weights."""
    out = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    out.update({f"te.{k}": v.clone() for k, v in model.text_encoders[0].state_dict().items()})
    return out


def write_lycoris_file(base: Path, root: Path, name: str) -> tuple[Path, dict[str, torch.Tensor] | None]:
    """A LyCORIS network made by lycoris.kohya on the base model, random weights, saved by LyCORIS. For (IA)³
    also the reference: the base weights after its modules' own merge_to(RATIO)."""
    import lycoris.kohya

    algo, dim, alpha, args = FILES[name]
    (root / "preset.toml").write_text(PRESET)
    model = load_model(base)
    network = lycoris.kohya.create_network(1.0, dim, alpha, None, model.text_encoders[0], model.unet, algo=algo,
                                           preset=str(root / "preset.toml"), **args)
    network.apply_to(model.text_encoders[0], model.unet, True, True)
    generator = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for key, param in network.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(param * (1 + 0.1 * noise) if key.endswith("dora_scale") else noise * 0.1)
    path = root / f"{name}.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    reference = None
    if algo == "ia3":
        for module in network.loras:
            module.merge_to(RATIO)
        reference = state(model)
    return path, reference


@pytest.fixture(scope="module")
def lyco(tiny_model_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lycoris_files")
    base = root / "base.safetensors"
    save_single_file(load_model(tiny_model_dirs["sd15"]), base)
    files, references = {"base": base}, {}
    for name in FILES:
        files[name], reference = write_lycoris_file(base, root, name)
        if reference is not None:
            references[name] = reference
    return {"files": files, "references": references, "root": root}


def lycoris_merge_reference(lyco: dict, name: str) -> dict[str, torch.Tensor]:
    """LyCORIS's own merge utility, reading the file, on a copy of the base model."""
    if name in lyco["references"]:
        return lyco["references"][name]
    from lycoris.utils import merge
    from safetensors.torch import load_file

    model = load_model(lyco["files"]["base"])
    merge([model.text_encoders[0]], model.unet, load_file(lyco["files"][name]), RATIO)
    lyco["references"][name] = state(model)
    return lyco["references"][name]


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        base: dict[str, torch.Tensor], changed_at_least: int = 289) -> None:
    assert actual.keys() == expected.keys()
    changed = [k for k in actual if not torch.equal(expected[k], base[k])]
    assert len(changed) >= changed_at_least  # every targeted layer of UNet and text encoder really changed
    for key in actual:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


def data_sha256(path: Path) -> str:
    data = path.read_bytes()
    return "0x" + hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


# ---------------------------------------------------------------------------------------------- merge


def test_merge_lora_bakes_a_lycoris_loha_into_a_checkpoint_as_lycoris_merges_it(lyco: dict, tiny_model_dirs: dict,
                                                                                tmp_path: Path, run_script) -> None:
    from diffusers import StableDiffusionPipeline

    files = lyco["files"]
    out = tmp_path / "merged.safetensors"
    result = run_script("networks/merge_lora.py", ["--sd_model", files["base"], "--save_to", out, "--models",
                                                   files["loha"], "--ratios", RATIO])
    assert f"merged LoHa (289 modules) at ratio {RATIO}" in result.stdout
    base = state(load_model(files["base"]))
    assert_same_weights(state(load_model(out)), lycoris_merge_reference(lyco, "loha"), base)

    theirs = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model_dirs["sd15"]), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    torch.testing.assert_close(dict(theirs.unet.state_dict()), {k[5:]: v for k, v in lycoris_merge_reference(
        lyco, "loha").items() if k.startswith("unet.")}, atol=1e-6, rtol=0)

    meta = read_safetensors_metadata(out)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (meta["modelspec.title"], meta["modelspec.merged_from"]) == ("merged", "base, loha")
    assert (meta["modelspec.resolution"], meta["modelspec.prediction_type"]) == ("64x64", "epsilon")
    assert meta["modelspec.hash_sha256"] == data_sha256(out) and meta["modelspec.date"].startswith("20")


@pytest.mark.parametrize("name", ["lokr", "ia3", "dora"])
def test_merge_gives_lycoris_merge_result(lyco: dict, name: str) -> None:
    model = load_model(lyco["files"]["base"])
    base = state(model)
    merge_into_model(model, [str(lyco["files"][name])], [RATIO])
    assert_same_weights(state(model), lycoris_merge_reference(lyco, name), base)


def test_sdxl_lokr_trained_here_merges_as_lycoris_merges_its_modules(tiny_model_dirs: dict, tmp_path: Path) -> None:
    """SDXL files name the UNet by LDM paths and the encoders lora_te1/lora_te2 (networks.lycoris_kohya writes them)."""
    from networks.lycoris_kohya import create_network

    def weights(model) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v.clone() for i, part in enumerate((model.unet, *model.text_encoders))
                for k, v in part.state_dict().items()}

    trained = load_model(tiny_model_dirs["sdxl"])
    network = create_network(1.0, 4, 4.0, None, trained.text_encoders, trained.unet, algo="lokr", factor="4",
                             preset="attn-mlp")
    network.apply_to(trained.text_encoders, trained.unet, True, True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    file = tmp_path / "sdxl_lokr.safetensors"
    network.save_weights(str(file), torch.float32, {})
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1" in load_file(file)
    for module in network.loras:  # LyCORIS's own merge of its modules
        module.merge_to(RATIO)

    merged = load_model(tiny_model_dirs["sdxl"])
    base = weights(merged)
    merge_into_model(merged, [str(file)], [RATIO])
    assert_same_weights(weights(merged), weights(trained), base, changed_at_least=200)


def test_loha_with_alpha_other_than_rank_merges_what_lycoris_applies(lyco: dict) -> None:
    """lycoris-lora 4.1.3's merge scales LoHa/LoKr by (alpha/rank)^2; its forward pass, A1111 and ComfyUI by
    alpha/rank: the merged model must give what the network gave while it was trained and sampled."""
    import lycoris.kohya

    file = lyco["files"]["loha_alpha"]
    applied = load_model(lyco["files"]["base"])
    network, _ = lycoris.kohya.create_network_from_weights(RATIO, str(file), None, applied.text_encoders[0],
                                                           applied.unet)
    network.apply_to(applied.text_encoders[0], applied.unet, True, True)
    merged = load_model(lyco["files"]["base"])
    merge_into_model(merged, [str(file)], [RATIO])

    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, merged.unet.config.cross_attention_dim, generator=generator)
    ids = (torch.arange(77) % 300 + 400).unsqueeze(0)
    with torch.no_grad():
        outputs = [(m.unet(sample, torch.tensor([500]), hidden).sample, m.text_encoders[0](ids).last_hidden_state)
                   for m in (applied, merged, load_model(lyco["files"]["base"]))]
    (unet_applied, te_applied), (unet_merged, te_merged), (unet_base, te_base) = outputs
    assert (unet_applied - unet_base).abs().max() > 1e-3 and (te_applied - te_base).abs().max() > 1e-3
    torch.testing.assert_close(unet_merged, unet_applied, atol=2e-4, rtol=0)
    torch.testing.assert_close(te_merged, te_applied, atol=2e-5, rtol=0)


def test_lycoris_files_are_refused_where_a_tool_handles_lora_only(lyco: dict, tmp_path: Path, run_script,
                                                                 capsys: pytest.CaptureFixture) -> None:
    files = lyco["files"]
    result = run_script("networks/resize_lora.py", ["--model", files["loha"], "--save_to", tmp_path / "r.safetensors",
                                                    "--new_rank", "2"], expect_rc=1)
    assert_one_error_line(result, "LoHa (289 modules)", "resize_lora.py resizes kohya LoRA/LoCon files only")
    for name, kind in (("lokr", "LoKr"), ("ia3", "(IA)³"), ("dora", "DoRA")):
        assert resize_lora.main(["--model", str(files[name]), "--save_to", str(tmp_path / "r.safetensors")]) == 1
        error = capsys.readouterr().err
        assert error.count("error:") == 1 and f"{kind} (289 modules)" in error
    assert merge_lora.main(["--save_to", str(tmp_path / "m.safetensors"), "--models", str(files["lokr"])]) == 1
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "merge LyCORIS and DoRA files into a model with --sd_model" in error
    assert not list(tmp_path.glob("*.safetensors"))
    # extract writes LoRA/LoCon only: a LyCORIS option is not a flag of it
    with pytest.raises(SystemExit) as exit_info:
        extract_lora_from_models.main(["--model_org", "a", "--model_tuned", "b", "--save_to", "c.safetensors",
                                       "--algo", "lokr"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith("error: unrecognized arguments: --algo lokr")


def test_without_lycoris_installed_one_line_names_the_package(lyco: dict, tmp_path: Path, monkeypatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    for name in [n for n in sys.modules if n == "lycoris" or n.startswith("lycoris.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lycoris", None)  # import lycoris now raises ImportError
    files = lyco["files"]
    argv = ["--sd_model", str(files["base"]), "--save_to", str(tmp_path / "m.safetensors"), "--models"]
    assert merge_lora.main(argv + [str(files["lokr"])]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {files['lokr']} is a LyCORIS file (LoKr (289 modules)): reading it needs the lycoris-lora package: "
        "pip install lycoris-lora==4.1.3")
    assert merge_lora.main(argv + [str(files["dora"])]) == 0  # DoRA is ours: no LyCORIS needed
    assert check_lora_weights.main([str(files["loha"])]) == 1
    assert "needs the lycoris-lora package" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- check


def test_check_reports_kind_rank_and_update_norm_of_lycoris_modules(lyco: dict, run_script,
                                                                    capsys: pytest.CaptureFixture) -> None:
    files = lyco["files"]
    result = run_script("networks/check_lora_weights.py", [files["dora"]])
    assert "number of DoRA/LyCORIS modules: 289 (dora: 289; te: 12, unet: 277)" in result.stdout
    line = next(l for l in result.stdout.splitlines() if l.startswith(Q + " "))
    dora = load_file(files["dora"])
    delta = dora[f"{Q}.lora_up.weight"] @ dora[f"{Q}.lora_down.weight"] * 2.0 / 4
    assert line.split()[1:] == ["dora", "4", "2", f"{float(delta.norm()):.3e}"]
    assert "warning" not in result.stderr and "Traceback" not in result.stderr

    assert check_lora_weights.main([str(files["lokr"])]) == 0
    out = capsys.readouterr().out
    assert "number of DoRA/LyCORIS modules: 289 (lokr: 289; te: 12, unet: 277)" in out
    _, kind, rank, alpha, norm = next(l for l in out.splitlines() if l.startswith(Q + " ")).split()
    assert (kind, rank, alpha) == ("lokr", "-", "4")  # 32 x 32 at factor 4: both Kronecker factors are full
    ff = next(l for l in out.splitlines() if l.startswith(Q.replace("attn1_to_q", "ff_net_0_proj ")))
    assert ff.split()[1:4] == ["lokr", "4", "4"]  # 256 x 32: the larger factor is rank 4
    merged, base = lycoris_merge_reference(lyco, "lokr"), state(load_model(files["base"]))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert float(norm) == pytest.approx(float((merged[key] - base[key]).norm()) / RATIO, rel=1e-3)

    assert check_lora_weights.main([str(files["ia3"])]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith(Q + " "))
    ia3 = load_file(files["ia3"])[f"{Q}.weight"]
    assert line.split()[1:] == ["ia3", "-", "-", f"{float(ia3.norm()):.3e}*"]
