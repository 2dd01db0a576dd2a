"""The README's first command runs the demo: it must train a LoRA that a real client loads, and show what it
learned (before/after images, loss curve, concept scores). That the scores rise is tests/test_learning.py's
job; this runs the demo's every step briefly."""

from __future__ import annotations

from pathlib import Path

import json

from PIL import Image
from safetensors import safe_open

from tools import demo


def test_demo_trains_a_lora_that_diffusers_loads(tmp_path: Path, capsys) -> None:
    assert demo.main(["--output_dir", str(tmp_path / "demo"), "--steps", "4", "--seeds", "2",
                      "--sample_steps", "3"]) == 0
    out = tmp_path / "demo"
    with safe_open(out / "tiny_sdxl.safetensors", "pt") as handle:
        assert "conditioner.embedders.1.model.text_projection" in handle.keys()
    lora = out / "lora" / "star_lora.safetensors"
    with safe_open(lora, "pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert "sks star" in handle.metadata()["ss_tag_frequency"]
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert (out / "lora" / "star_lora-step00000002.safetensors").is_file()
    samples = sorted((out / "lora" / "sample").glob("*.png"))
    assert len(samples) == 2  # 2 prompts at step 4
    with Image.open(out / "before_after.png") as sheet:
        assert sheet.size == (100 + 2 * (128 + 4) + 4, 4 * (128 + 4) + 4)  # 2 seeds x (star, circle) before and after
    with Image.open(out / "loss.png") as curve:
        assert curve.size == (480, 240)
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1] and report["steps"] == 4
    assert 0.0 <= report["concept_score_before"] <= 1.0 and 0.0 <= report["concept_score_after"] <= 1.0
    printed = capsys.readouterr().out
    assert f"LoRA: {lora}" in printed
    assert (f"over 2 seeds: before {report['concept_score_before']:.3f}, "
            f"after {report['concept_score_after']:.3f}") in printed
    assert "optimizer steps: 4 per epoch, 4 in total over 1 epoch(s)" in printed


def test_demo_never_writes_into_a_used_folder(tmp_path: Path) -> None:
    used = tmp_path / "demo"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    assert demo.fresh_dir(used) == tmp_path / "demo-2"
    assert (used / "mine.txt").read_text() == "keep"
