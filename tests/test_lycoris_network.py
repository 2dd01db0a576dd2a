"""LyCORIS networks (``--network_module lycoris.kohya`` / ``networks.lycoris_kohya``) on the tiny SD1.5 and SDXL.

Every algorithm trains a step, saves the file kohya + LyCORIS write (kohya's module names -- SDXL's LDM names --
and LyCORIS's tensor keys), and LyCORIS's own loader (``get_module``/``make_module`` on the module of that name,
what ``lycoris.kohya.create_network_from_weights`` does) rebuilds the same network from the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import lycoris.kohya
import train_network
from library.adapters.targets import text_encoder_prefixes, text_encoder_targets, unet_targets
from networks import lycoris_kohya as lycoris_network
from networks.lycoris_view import kohya_text_encoder_view, kohya_unet_view
from networks.plugin import import_network_module
from tests.helpers.user_paths import lora_args

# (algo, --network_args beyond algo, the tensor keys each module of the file has); rank 8 (BOFT/OFT: block size)
DORA = {"dora_wd": "True"}
ALGOS = [
    ("locon", {}, {"lora_down.weight", "lora_up.weight", "alpha"}),
    ("loha", {}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    ("lokr", {"factor": "4"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    ("ia3", {}, {"weight", "on_input"}),
    ("full", {}, {"diff", "diff_b"}),
    ("diag-oft", {}, {"oft_blocks", "alpha"}),
    ("boft", {}, {"oft_blocks", "alpha"}),
    ("locon", DORA, {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}),
    ("loha", DORA, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha", "dora_scale"}),
    ("lokr", {"factor": "4", **DORA}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha", "dora_scale"}),
]
SD1_ONLY_NAMES = {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
                  "lora_unet_time_embedding_linear_2"}


class TinyModel:
    def __init__(self, root: Path, family: str) -> None:
        self.family = family
        self.unet = UNet2DConditionModel.from_pretrained(root / "unet").requires_grad_(False)
        self.text_encoders = [CLIPTextModel.from_pretrained(root / "text_encoder").requires_grad_(False)]
        if family == "sdxl":
            self.text_encoders.append(CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2")
                                      .requires_grad_(False))
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(2, 4, 8, 8, generator=generator)
        self.text = torch.randn(2, 77, self.unet.config.cross_attention_dim, generator=generator)
        self.added = None
        if family == "sdxl":
            config = self.unet.config
            width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            self.added = {"text_embeds": torch.randn(2, width, generator=generator),
                          "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)}
        self.tokens = torch.randint(0, 100, (1, 77), generator=generator)

    def unet_out(self) -> torch.Tensor:
        return self.unet(self.latents, 500, self.text, added_cond_kwargs=self.added).sample

    def text_out(self) -> torch.Tensor:
        return self.text_encoders[0](self.tokens).last_hidden_state

    def kohya_modules(self) -> dict[str, torch.nn.Module]:
        """Module by the name kohya + LyCORIS give it (how LyCORIS's loader finds a file's modules)."""
        modules = {f"lora_unet_{path}".replace(".", "_"): m for path, m in kohya_unet_view(self.unet).named_modules()}
        for prefix, te in zip(text_encoder_prefixes(len(self.text_encoders)), self.text_encoders):
            modules |= {f"{prefix}_{path}".replace(".", "_"): m
                        for path, m in kohya_text_encoder_view(te).named_modules()}
        return modules

    def kohya_names(self) -> set[str]:
        """kohya's names of every layer in the UNet's transformer/resnet/sampler blocks and the CLIP attention
        and MLP layers (our LoRA/LoCon targets), plus what preset "full" names on kohya's SD1/SD2 UNet."""
        names = {t.lora_name for t in unet_targets(self.unet, True)}
        for prefix, te in zip(text_encoder_prefixes(len(self.text_encoders)), self.text_encoders):
            names |= {t.lora_name for t in text_encoder_targets(te, prefix)}
        return names | (SD1_ONLY_NAMES if self.family != "sdxl" else set())


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs) -> dict[str, TinyModel]:
    return {family: TinyModel(tiny_model_dirs[family], family) for family in ("sd15", "sd21", "sdxl")}


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.make_sample_dataset import make_sample_dataset

    return make_sample_dataset(tmp_path_factory.mktemp("data") / "shapes", count=4, size=64, seed=0).parent


def module_names(keys) -> set[str]:
    return {key.split(".", 1)[0] for key in keys}


# every algorithm on both families; DoRA for LoKr on both, for LoCon on SD1.5 and LoHa on SDXL (test time)
CASES = [(family, *algo) for algo in ALGOS for family in ("sd15", "sdxl")
         if "dora_wd" not in algo[1] or (family, algo[0]) in {("sd15", "lokr"), ("sdxl", "lokr"), ("sd15", "locon"),
                                                              ("sdxl", "loha")}]


@pytest.mark.parametrize("family,algo,extra,tensor_keys", CASES,
                         ids=[f"{a}{'-dora' if 'dora_wd' in e else ''}-{f}" for f, a, e, _ in CASES])
def test_each_algorithm_trains_saves_and_loads_in_lycoris(tiny, family, algo, extra, tensor_keys, tmp_path):
    model = tiny[family]
    torch.manual_seed(0)
    with torch.no_grad():
        base_unet, base_text = model.unet_out(), model.text_out()
    network = import_network_module("lycoris.kohya").create_network(
        1.0, 8, 4, None, model.text_encoders, model.unet, algo=algo, **extra)
    network.apply_to(model.text_encoders, model.unet, True, True)
    try:
        params, descriptions = network.prepare_optimizer_params(1e-2, 1e-2, 1e-2)
        assert descriptions == (["textencoder", "unet"] if family == "sd15" else
                                ["textencoder 1", "textencoder 2", "unet"])
        optimizer = torch.optim.AdamW(params)
        (model.unet_out().square().mean() + model.text_out().square().mean()).backward()
        optimizer.step()
        with torch.no_grad():
            trained_unet, trained_text = model.unet_out(), model.text_out()
        file = tmp_path / "net.safetensors"
        network.save_weights(str(file), None, {"ss_network_module": "lycoris.kohya"})
    finally:
        network.restore()
    assert (trained_unet - base_unet).abs().max() > 1e-5  # the modules act on the real layers, and trained
    assert (trained_text - base_text).abs().max() > 1e-5

    weights = load_file(str(file))
    names = module_names(weights)
    assert names == model.kohya_names()  # preset "full": kohya's names (SDXL: LDM paths)
    if family == "sdxl":
        assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_0_in_layers_2",
                "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_1_0_out_layers_3",
                "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                "lora_unet_output_blocks_2_2_conv", "lora_te2_text_model_encoder_layers_0_mlp_fc2"} <= names
    keys = {key.split(".", 1)[1] for key in weights}
    if algo == "lokr":  # small layers get a full w2 (LyCORIS's rule for dims the factor cannot split)
        keys = (keys - {"lokr_w2"}) | {"lokr_w2_a", "lokr_w2_b"}
    if algo == "full":
        keys.add("diff_b")  # only layers with a bias have one
    assert keys == tensor_keys

    # LyCORIS's own loader, on the modules of kohya's names: get_module/make_module, the algorithm and tensors
    # of each module read from the file (what lycoris.kohya.create_network_from_weights does). LyCORIS 4.1.3
    # cannot make (IA)^3 modules that way (see networks.lycoris_kohya._ia3_modules): for (IA)^3, kohya's
    # --network_weights path, LyCORIS's load_weights into a network made with the same arguments.
    if algo == "ia3":
        fresh = lycoris_network.create_network(1.0, 8, 4, None, model.text_encoders, model.unet, algo=algo, **extra)
        fresh.apply_to(model.text_encoders, model.unet, True, True)
        try:
            assert lycoris.kohya.LycorisNetworkKohya.load_weights(fresh, str(file)) == {}  # no missing/unexpected
            assert_same_function(model, trained_unet, trained_text)
        finally:
            fresh.restore()
    else:
        modules = model.kohya_modules()
        loaded = []
        for name in sorted(names):
            lyco_type, params = lycoris.kohya.get_module(weights, name)
            loaded.append(lycoris.kohya.make_module(lyco_type, params, name, modules[name]))
            assert type(loaded[-1]) is type(getattr(network, name))
        assert_loads_the_file(loaded, weights, model, trained_unet, trained_text)

    # our create_network_from_weights (--dim_from_weights, the tools) builds the same network from the file
    again, _ = lycoris_network.create_network_from_weights(1.0, str(file), None, model.text_encoders, model.unet,
                                                          for_inference=True)
    assert module_names(again.state_dict()) == names
    assert_loads_the_file(again.loras, weights, model, trained_unet, trained_text)


def assert_same_function(model: TinyModel, unet_out: torch.Tensor, text_out: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model.unet_out(), unet_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.text_out(), text_out, rtol=1e-5, atol=1e-6)


def assert_loads_the_file(modules, weights, model: TinyModel, unet_out: torch.Tensor, text_out: torch.Tensor) -> None:
    """Applied, ``modules`` hold exactly the file's tensors (LyCORIS's "full" keeps a weight, not a diff, until
    applied) and compute what the trained network computed."""
    for module in modules:
        module.apply_to()
    try:
        for module in modules:
            name = module.lora_name
            own = {f"{name}.{k}": v for k, v in module.state_dict().items()}
            file_keys = {k for k in weights if k.split(".", 1)[0] == name}
            assert set(own) == file_keys  # no missing, no unexpected key
            full_lokr = {f"{name}.lokr_w1", f"{name}.lokr_w2"} <= file_keys  # LyCORIS ignores alpha there (scale 1)
            for key in file_keys - ({f"{name}.alpha"} if full_lokr else set()):
                torch.testing.assert_close(own[key].float(), weights[key].float(), rtol=0, atol=1e-7)
        assert_same_function(model, unet_out, text_out)
    finally:
        for module in modules:
            module.restore()


def test_sd21_gets_kohyas_names_on_its_real_layers(tiny):
    model = tiny["sd21"]
    network = lycoris_network.create_network(1.0, 4, 1, None, model.text_encoders, model.unet, algo="lokr",
                                             factor="4", dora_wd="True")
    assert module_names(network.state_dict()) == model.kohya_names()
    proj_in = network.lora_unet_down_blocks_0_attentions_0_proj_in  # a Linear on SD2 (use_linear_projection)
    assert proj_in.org_module[0] is model.unet.down_blocks[0].attentions[0].proj_in
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale" in network.state_dict()


def test_presets_are_lycoris_presets_on_kohyas_unet_and_do_not_leak(tiny):
    model = tiny["sdxl"]
    before = dict(vars(lycoris.kohya.LycorisNetworkKohya))
    attn = lycoris_network.create_network(1.0, 4, 1, None, model.text_encoders, model.unet, algo="lokr",
                                          factor="8", preset="attn-mlp")
    full = lycoris_network.create_network(1.0, 4, 1, None, model.text_encoders, model.unet, algo="lokr")
    attn_names, full_names = module_names(attn.state_dict()), module_names(full.state_dict())
    # attn-mlp: the Transformer2DModel layers and the CLIP attention/MLP; no resnet/sampler convs
    assert attn_names == {t.lora_name for t in unet_targets(model.unet, False)} | {
        n for n in full_names if n.startswith("lora_te")}
    assert full_names == model.kohya_names()
    assert dict(vars(lycoris.kohya.LycorisNetworkKohya)) == before  # the preset stayed with its network


def test_custom_preset_file_maps_kohya_classes_to_algorithms(tiny, tmp_path):
    """A preset TOML file with LyCORIS's module_algo_map on kohya's class names: LoHa for CrossAttention
    (diffusers calls it Attention), LoKr elsewhere."""
    model = tiny["sd15"]
    preset = tmp_path / "preset.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel"]\ntext_encoder_target_module = []\n'
                      'enable_conv = false\n[module_algo_map.CrossAttention]\nalgo = "loha"\n', encoding="utf-8")
    network = lycoris_network.create_network(1.0, 4, 1, None, model.text_encoders, model.unet, algo="lokr",
                                             preset=str(preset))
    kinds = {lora.lora_name: type(lora).__name__ for lora in network.unet_loras}
    assert not network.text_encoder_loras
    assert kinds["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == "LohaModule"
    assert kinds["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"] == "LokrModule"
    assert kinds["lora_unet_down_blocks_0_attentions_0_proj_in"] == "LokrModule"


def lycoris_run(model: Path, data: Path, output: Path, module: str, *network_args: str) -> list[str]:
    return lora_args(model, data, output, 2, "--network_module", module, "--network_args", *network_args)


def test_sdxl_trains_with_networks_lycoris_and_writes_kohya_metadata(tiny_model_dirs, tiny, sample_data, tmp_path):
    output = tmp_path / "out"
    args = lycoris_run(tiny_model_dirs["sdxl"], sample_data, output, "networks.lycoris_kohya", "algo=loha", "dora_wd=True",
                       "preset=attn-mlp")
    assert train_network.main(args) == 0
    weights = load_file(str(output / "lora.safetensors"))
    expected = {t.lora_name for t in unet_targets(tiny["sdxl"].unet, False)}
    assert {n for n in module_names(weights) if n.startswith("lora_unet")} == expected
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.dora_scale" in weights
    # text encoder 1 is read at its penultimate layer: that layer's modules are in the file, untrained
    last = "lora_te1_text_model_encoder_layers_2_self_attn_q_proj.hada_w2_a"
    assert last in weights
    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lycoris_kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "loha", "dora_wd": "True", "preset": "attn-mlp"}
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert len(metadata["sshs_model_hash"]) == 64


def test_sd15_lokr_from_the_command_line_as_kohya_users_type_it(run_script, tiny_model_dirs, shapes_data, tmp_path):
    output = tmp_path / "new_out"
    run_script("train_network.py", lycoris_run(tiny_model_dirs["sd15"], shapes_data, output, "lycoris.kohya",
                                               "algo=lokr", "factor=8", "preset=attn-mlp"))
    weights = load_file(str(output / "lora.safetensors"))
    names = module_names(weights)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_time_embedding_linear_1" in names  # attn-mlp targets kohya's TimestepEmbedding class
    assert not any("resnets" in n for n in names)
    assert all(k.split(".", 1)[1] in {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"} for k in weights)
    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "factor": "8", "preset": "attn-mlp"}


@pytest.mark.parametrize("network_args,needles", [
    (["algo=lokrr"], ["algo=lokrr", "lokr", "loha"]),
    (["algo=lokr", "preset=no_such_preset.toml"], ["preset=no_such_preset.toml", "attn-mlp"]),
])
def test_bad_network_args_get_one_error_line_before_the_model_loads(tiny_model_dirs, sample_data, tmp_path, capsys,
                                                                  network_args, needles):
    args = lycoris_run(tiny_model_dirs["sd15"], sample_data, tmp_path / "out", "lycoris.kohya", *network_args)
    assert train_network.main(args) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(needle in lines[0] for needle in needles), lines
    assert not (tmp_path / "out").exists()


def test_without_lycoris_lora_one_error_line_names_the_package(tiny_model_dirs, sample_data, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "lycoris", None)  # as if lycoris-lora were not installed
    monkeypatch.setitem(sys.modules, "lycoris.kohya", None)
    args = lycoris_run(tiny_model_dirs["sd15"], sample_data, tmp_path / "out", "lycoris.kohya", "algo=lokr")
    assert train_network.main(args) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lycoris-lora" in lines[0] and "pip install lycoris-lora==4.1.3" in lines[0], lines
    assert not (tmp_path / "out").exists()
