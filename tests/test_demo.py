"""The README's first command runs the demo: it must finish and produce real outputs."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from safetensors import safe_open

from tools import demo


def test_demo_builds_converts_encodes_and_samples(tmp_path: Path, capsys) -> None:
    assert demo.main(["--output_dir", str(tmp_path / "demo")]) == 0
    out = tmp_path / "demo"
    assert (out / "tiny_sdxl" / "model_index.json").is_file()
    with safe_open(out / "tiny_sdxl.safetensors", "pt") as handle:
        assert "conditioner.embedders.1.model.text_projection" in handle.keys()
    with Image.open(out / "sample.png") as image:
        assert image.size == (64, 64)
    printed = capsys.readouterr().out
    assert "reloaded UNet identical: True" in printed
    assert "3 chunks of 77 -> hidden states (1, 227, 80)" in printed


def test_demo_never_writes_into_a_used_folder(tmp_path: Path) -> None:
    used = tmp_path / "demo"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    assert demo.fresh_dir(used) == tmp_path / "demo-2"
    assert (used / "mine.txt").read_text() == "keep"
