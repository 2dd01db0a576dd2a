"""The README's first command runs the demo: it must train a LoRA that a real client loads."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from safetensors import safe_open

from tools import demo


def test_demo_trains_a_lora_that_diffusers_loads(tmp_path: Path, capsys) -> None:
    assert demo.main(["--output_dir", str(tmp_path / "demo"), "--steps", "4"]) == 0
    out = tmp_path / "demo"
    with safe_open(out / "tiny_sdxl.safetensors", "pt") as handle:
        assert "conditioner.embedders.1.model.text_projection" in handle.keys()
    lora = out / "lora" / "shapes_lora.safetensors"
    with safe_open(lora, "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert (out / "lora" / "shapes_lora-step00000002.safetensors").is_file()
    samples = sorted((out / "lora" / "sample").glob("*.png"))
    assert len(samples) == 6  # 3 prompts at steps 2 and 4
    with Image.open(out / "diffusers_with_lora.png") as image:
        assert image.size == (64, 64)
    printed = capsys.readouterr().out
    assert f"LoRA: {lora}" in printed
    assert "optimizer steps: 12 per epoch, 4 in total over 1 epoch(s)" in printed


def test_demo_never_writes_into_a_used_folder(tmp_path: Path) -> None:
    used = tmp_path / "demo"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    assert demo.fresh_dir(used) == tmp_path / "demo-2"
    assert (used / "mine.txt").read_text() == "keep"
