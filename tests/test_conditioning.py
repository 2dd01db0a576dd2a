"""ControlNet conditioning: filters, option parsing, the edge-F1 control-fidelity metric, and the two tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.cli import config
from library.cli.data_args import add_conditioning_arguments, filter_from_args
from library.data.conditioning import (
    FILTERS,
    BlurFilter,
    CannyFilter,
    ConditioningFilter,
    apply_conditioning_dropout,
    control_fidelity,
    edge_f1,
    edges_of,
    make_filter,
)
from library.data.images import load_rgb
from tools import canny as canny_tool
from tools import make_controlnet_dataset as dataset_tool

REPO = Path(__file__).resolve().parent.parent


def square_image(size: int = 32, lo: int = 8, hi: int = 24) -> Image.Image:
    """A white square (rows and columns lo..hi-1) on black."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[lo:hi, lo:hi] = 255
    return Image.fromarray(array)


def line(shape: tuple[int, int], row: int, cols: range) -> np.ndarray:
    edges = np.zeros(shape, dtype=bool)
    edges[row, list(cols)] = True
    return edges


def pixels(path_or_image: Path | Image.Image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------------------------------
# edge_f1
# --------------------------------------------------------------------------------------------------


def test_edge_f1_identical_disjoint_and_empty() -> None:
    reference = line((32, 32), 10, range(5, 25))
    assert edge_f1(reference, reference.copy()) == 1.0
    assert edge_f1(reference, line((32, 32), 25, range(5, 25))) == 0.0  # 15 rows apart
    empty = np.zeros((32, 32), dtype=bool)
    assert edge_f1(empty, empty) == 1.0
    assert edge_f1(empty, reference) == 0.0
    assert edge_f1(reference, empty) == 0.0


def test_edge_f1_shifted_line() -> None:
    reference = line((32, 32), 10, range(5, 25))
    assert edge_f1(line((32, 32), 11, range(5, 25)), reference, tolerance_px=1) == 1.0
    assert edge_f1(line((32, 32), 9, range(6, 26)), reference, tolerance_px=1) == 1.0  # diagonal shift: Chebyshev 1
    assert edge_f1(line((32, 32), 11, range(5, 25)), reference, tolerance_px=0) == 0.0
    assert edge_f1(line((32, 32), 13, range(5, 25)), reference, tolerance_px=1) == 0.0
    assert edge_f1(line((32, 32), 13, range(5, 25)), reference, tolerance_px=3) == 1.0


def test_edge_f1_partial_overlap_hand_computed() -> None:
    reference = line((32, 32), 10, range(0, 10))  # 10 px
    predicted = line((32, 32), 10, range(0, 20))  # 20 px, the first 10 on the reference
    # P = 10/20, R = 10/10, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert edge_f1(predicted, reference, tolerance_px=0) == pytest.approx(2 / 3, abs=1e-12)
    # Tolerance 1 also accepts predicted column 10: P = 11/20, R = 1, F1 = 1.1 / 1.55
    assert edge_f1(predicted, reference, tolerance_px=1) == pytest.approx(1.1 / 1.55, abs=1e-12)
    # Two overlapping halves: P = R = 10/20 -> 0.5; with tolerance 1, 11/20 each -> 0.55
    a, b = line((32, 32), 4, range(0, 20)), line((32, 32), 4, range(10, 30))
    assert edge_f1(a, b, tolerance_px=0) == pytest.approx(0.5, abs=1e-12)
    assert edge_f1(a, b, tolerance_px=1) == pytest.approx(0.55, abs=1e-12)


def test_edge_f1_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one shape"):
        edge_f1(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="tolerance_px"):
        edge_f1(np.zeros((4, 4), bool), np.zeros((4, 4), bool), tolerance_px=-1)


# --------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------


def test_canny_edges_lie_on_the_square_border() -> None:
    result = CannyFilter()(square_image())
    assert isinstance(result, Image.Image) and result.mode == "RGB" and result.size == (32, 32)
    array = np.asarray(result)
    assert set(np.unique(array)) == {0, 255}
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()
    edges = array[..., 0] > 0
    border = np.zeros((32, 32), dtype=bool)
    border[8:24, 8:24] = True
    border[9:23, 9:23] = False  # the square's outermost ring of pixels
    # every edge pixel within 1 px of the border (precision 1) and every border pixel within 1 px of an edge
    # (recall 1): both together are F1 == 1.0 at tolerance 1
    assert edges.sum() >= 56
    assert edge_f1(edges, border, tolerance_px=1) == 1.0
    assert not edges[:6].any() and not edges[26:].any() and not edges[11:21, 11:21].any()


def test_canny_thresholds_matter_and_are_checked() -> None:
    faint = Image.fromarray(np.full((32, 32, 3), 0, np.uint8))
    faint.paste((20, 20, 20), (8, 8, 24, 24))  # Sobel response 4 * 20 = 80 (L1 up to 160): below low=100
    assert not edges_of(CannyFilter()(faint)).any()
    assert edges_of(CannyFilter(low=10, high=20)(faint)).any()
    with pytest.raises(ValueError, match="low <= high"):
        CannyFilter(low=200, high=100)


def test_blur_filter() -> None:
    flat = Image.new("RGB", (16, 16), (100, 150, 200))
    assert (pixels(BlurFilter(3.0)(flat)) == pixels(flat)).all()  # a blur keeps a flat image flat
    assert (pixels(BlurFilter(0.0)(square_image())) == pixels(square_image())).all()
    blurred = pixels(BlurFilter(2.0)(square_image()))
    assert blurred.shape == (32, 32, 3)
    assert blurred[16, 16, 0] == 255 and blurred[0, 0, 0] == 0  # far from the step: unchanged
    assert 0 < blurred[16, 7, 0] < 128 < blurred[16, 8, 0] < 255  # at the step: smoothed, still ordered
    with pytest.raises(ValueError, match="radius"):
        BlurFilter(-1.0)


def test_filters_registry_and_protocol() -> None:
    assert dict(FILTERS) == {"canny": CannyFilter, "blur": BlurFilter}
    with pytest.raises(TypeError):
        FILTERS["x"] = CannyFilter  # type: ignore[index]
    assert isinstance(CannyFilter(), ConditioningFilter) and isinstance(BlurFilter(), ConditioningFilter)
    assert CannyFilter.is_edge_map and not BlurFilter.is_edge_map


# --------------------------------------------------------------------------------------------------
# make_filter
# --------------------------------------------------------------------------------------------------


def test_make_filter_parses_typed_options() -> None:
    assert make_filter("canny", []) == CannyFilter(100, 200)
    assert make_filter("canny", ["low=50", "high=150"]) == CannyFilter(50, 150)
    assert make_filter("canny", [" high = 250"]) == CannyFilter(100, 250)
    blur = make_filter("blur", ["radius=3"])
    assert blur == BlurFilter(3.0) and isinstance(blur.radius, float)
    assert CannyFilter.from_options({"low": 10, "high": 20}) == CannyFilter(10, 20)  # typed values (TOML)


@pytest.mark.parametrize(("name", "args", "message"), [
    ("canny", ["lo=1"], r"unknown option\(s\) lo; accepted: low \(int, default 100\), high \(int, default 200\)"),
    ("canny", ["low=abc"], r"bad value for low: 'abc' is not an integer; accepted: low \(int"),
    ("canny", ["low=1.5"], r"bad value for low: '1.5' is not an integer"),
    ("canny", ["low"], r"option 'low' is not KEY=VALUE; accepted: low \(int"),
    ("canny", ["low=1", "low=2"], r"option low is given twice"),
    ("canny", ["low=300"], r"need 0 <= low <= high, got low=300 high=200"),
    ("blur", ["radius=x"], r"bad value for radius: 'x' is not a number; accepted: radius \(float, default 4.0\)"),
    ("sobel", [], r"unknown conditioning filter 'sobel'; choose one of blur, canny"),
])
def test_make_filter_errors(name: str, args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_filter(name, args)


def test_from_options_rejects_wrongly_typed_values() -> None:
    with pytest.raises(ValueError, match="True is not an integer"):
        CannyFilter.from_options({"low": True})
    with pytest.raises(ValueError, match="1.5 is not an integer"):
        CannyFilter.from_options({"low": 1.5})


def test_arguments_parse_and_validate(capsys: pytest.CaptureFixture[str]) -> None:
    parser = config.build_parser("test", add_conditioning_arguments)
    args = config.parse_args(parser, [])
    assert (args.conditioning_filter, args.conditioning_filter_args) == (None, None)
    assert (args.conditioning_dropout_rate, args.control_fidelity_tolerance) == (0.0, 1)
    assert filter_from_args(args) is None
    args = config.parse_args(parser, ["--conditioning_filter", "canny", "--conditioning_filter_args", "low=50",
                                      "high=150", "--conditioning_dropout_rate", "0.1",
                                      "--control_fidelity_tolerance", "2"])
    assert filter_from_args(args) == CannyFilter(50, 150)
    assert (args.conditioning_dropout_rate, args.control_fidelity_tolerance) == (0.1, 2)
    for argv, message in [
        (["--conditioning_filter", "canny", "--conditioning_filter_args", "lo=1"], "unknown option(s) lo"),
        (["--conditioning_filter_args", "low=1"], "options given without --conditioning_filter"),
        (["--conditioning_dropout_rate", "1.5"], "must be in [0, 1]"),
        (["--control_fidelity_tolerance", "-1"], "must be >= 0"),
        (["--conditioning_filter", "sobel"], "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            config.parse_args(parser, argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert "conditioning_data_dir" not in {a.dest for a in parser._actions}


# --------------------------------------------------------------------------------------------------
# control_fidelity and dropout
# --------------------------------------------------------------------------------------------------


def test_control_fidelity_of_an_image_with_itself() -> None:
    image = square_image(64, 16, 48)
    canny = CannyFilter()
    assert control_fidelity(canny, image, canny(image)) == 1.0
    assert control_fidelity(canny, Image.new("RGB", (64, 64)), canny(image)) == 0.0  # nothing generated
    shifted = square_image(64, 52, 60)  # a smaller square elsewhere: no edge within 1 px of the first
    assert control_fidelity(canny, shifted, canny(image)) == 0.0


def test_control_fidelity_resizes_the_condition() -> None:
    image = square_image(64, 16, 48)
    condition = CannyFilter()(image).resize((128, 128), Image.Resampling.NEAREST)  # each pixel -> a 2x2 block
    assert control_fidelity(CannyFilter(), image, condition) == 1.0


def test_control_fidelity_other_filters_use_mean_absolute_error() -> None:
    blur = BlurFilter(2.0)
    gray = Image.new("RGB", (16, 16), (100, 100, 100))
    assert control_fidelity(blur, gray, blur(gray)) == 1.0
    assert control_fidelity(blur, gray, Image.new("RGB", (16, 16))) == pytest.approx(1 - 100 / 255, abs=1e-12)
    assert control_fidelity(blur, gray, Image.new("RGB", (8, 8), (50, 50, 50))) == pytest.approx(1 - 50 / 255,
                                                                                                abs=1e-12)


def test_conditioning_dropout() -> None:
    conditioning = torch.ones(8, 3, 4, 4)
    assert apply_conditioning_dropout(conditioning, 0.0) is conditioning
    assert (apply_conditioning_dropout(conditioning, 1.0) == 0).all()
    dropped = apply_conditioning_dropout(conditioning, 0.5, torch.Generator().manual_seed(3))
    expected_keep = ~(torch.rand(8, generator=torch.Generator().manual_seed(3)) < 0.5)
    assert torch.equal(dropped.flatten(1).amax(1) == 1, expected_keep)
    assert (dropped.flatten(1).amin(1) == dropped.flatten(1).amax(1)).all()  # whole samples, never parts
    assert 0 < int(expected_keep.sum()) < 8
    black = apply_conditioning_dropout(conditioning, 1.0, fill=-1.0)
    assert (black == -1).all() and (conditioning == 1).all()  # the input is not modified
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_conditioning_dropout(conditioning, 1.5)


# --------------------------------------------------------------------------------------------------
# tools/canny.py
# --------------------------------------------------------------------------------------------------


def make_images(folder: Path) -> dict[str, Image.Image]:
    folder.mkdir(parents=True, exist_ok=True)
    images = {"a.png": square_image(32, 8, 24), "b.JPG": square_image(40, 4, 30), "c.webp": square_image(24, 6, 12)}
    for name, image in images.items():
        image.save(folder / name, quality=95) if name.lower().endswith("jpg") else image.save(folder / name)
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    (folder / "sub").mkdir()
    square_image().save(folder / "sub" / "d.png")  # not read: the tool is not recursive
    return images


def test_canny_tool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, out = tmp_path / "in", tmp_path / "out" / "maps"
    make_images(source)
    assert canny_tool.main([str(source), str(out), "--workers", "2", "--low", "50", "--high", "150"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    for name in ("a.png", "b.JPG", "c.webp"):
        written = out / (Path(name).stem + ".png")
        with Image.open(written) as opened:
            assert opened.format == "PNG" and opened.mode == "RGB"
        assert (pixels(written) == pixels(CannyFilter(50, 150)(load_rgb(source / name)))).all()
    assert "wrote 3 edge map(s)" in capsys.readouterr().out

    Image.new("RGB", (5, 5), (1, 2, 3)).save(out / "a.png")  # a file the user made: kept without --overwrite
    assert canny_tool.main([str(source), str(out), "--workers", "2"]) == 0
    assert "wrote 0 edge map(s)" in (text := capsys.readouterr().out) and "skipped 3 existing" in text
    assert pixels(out / "a.png").shape == (5, 5, 3)
    assert canny_tool.main([str(source), str(out), "--overwrite", "--workers", "2"]) == 0
    assert "wrote 3 edge map(s)" in capsys.readouterr().out
    assert (pixels(out / "a.png") == pixels(CannyFilter()(square_image(32, 8, 24)))).all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_canny_tool_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert canny_tool.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    source = tmp_path / "in"
    make_images(source)
    square_image().save(source / "a.jpg")
    assert canny_tool.main([str(source), str(tmp_path / "out")]) == 2
    assert "a.jpg, a.png" in capsys.readouterr().err
    (source / "a.jpg").unlink()
    assert canny_tool.main([str(source), str(source)]) == 2
    (source / "broken.png").write_bytes(b"not a png")
    assert canny_tool.main([str(source), str(tmp_path / "out")]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]


def test_canny_tool_runs_as_a_script(tmp_path: Path) -> None:
    square_image().save(tmp_path / "x.png")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "canny.py"), str(tmp_path), str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / "x.png").is_file()


# --------------------------------------------------------------------------------------------------
# tools/make_controlnet_dataset.py
# --------------------------------------------------------------------------------------------------


def make_captioned(folder: Path) -> None:
    folder.mkdir()
    square_image(32, 8, 24).save(folder / "b.png")
    (folder / "b.caption").write_text("a white square\n", encoding="utf-8")
    square_image(40, 4, 30).save(folder / "a.jpg", quality=95)
    (folder / "a.caption").write_bytes('\ufeffun carré "blanc"'.encode("utf-8"))
    square_image(24).save(folder / "c.png")  # no caption
    square_image(24).save(folder / "d.png")
    (folder / "d.caption").write_text("  \n", encoding="utf-8")  # empty caption


def test_make_controlnet_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, out = tmp_path / "images", tmp_path / "cn"
    make_captioned(images)
    assert dataset_tool.main([str(images), str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 image(s) without a .caption caption: c.png, d.png" in captured.err
    lines = (out / "prompt.json").read_text(encoding="utf-8").splitlines()
    assert lines == [
        '{"source": "source/0.png", "target": "target/0.png", "prompt": "un carré \\"blanc\\""}',
        '{"source": "source/1.png", "target": "target/1.png", "prompt": "a white square"}',
    ]
    assert [json.loads(x)["prompt"] for x in lines] == ['un carré "blanc"', "a white square"]
    assert sorted(p.name for p in (out / "source").iterdir()) == ["0.png", "1.png"]
    assert sorted(p.name for p in (out / "target").iterdir()) == ["0.png", "1.png"]
    for index, name in enumerate(("a.jpg", "b.png")):
        image = load_rgb(images / name)
        assert (pixels(out / "target" / f"{index}.png") == pixels(image)).all()
        assert (pixels(out / "source" / f"{index}.png") == pixels(CannyFilter()(image))).all()
        with Image.open(out / "target" / f"{index}.png") as opened:
            assert opened.format == "PNG"

    assert dataset_tool.main([str(images), str(out)]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err


def test_make_controlnet_dataset_copy_and_blur(tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "cn"
    make_captioned(images)
    out.mkdir()  # an empty folder is fine
    assert dataset_tool.main([str(images), str(out), "--copy", "--filter", "blur", "--filter_args", "radius=2"]) == 0
    assert (out / "target" / "0.jpg").read_bytes() == (images / "a.jpg").read_bytes()
    assert (out / "target" / "1.png").read_bytes() == (images / "b.png").read_bytes()
    assert json.loads((out / "prompt.json").read_text(encoding="utf-8").splitlines()[0])["target"] == "target/0.jpg"
    assert (pixels(out / "source" / "0.png") == pixels(BlurFilter(2.0)(load_rgb(images / "a.jpg")))).all()


def test_make_controlnet_dataset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    make_captioned(images)
    assert dataset_tool.main([str(images), str(tmp_path / "o1"), "--filter_args", "lo=1"]) == 2
    assert "accepted: low (int, default 100)" in capsys.readouterr().err
    assert dataset_tool.main([str(images), str(tmp_path / "o2"), "--caption_extension", ".txt"]) == 1
    assert "no image" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert dataset_tool.main([str(tmp_path / "missing"), str(tmp_path / "o3")]) == 2
    (images / "a0.png").write_bytes(b"not a png")  # sorts between a.jpg and b.png
    (images / "a0.caption").write_text("broken", encoding="utf-8")
    assert dataset_tool.main([str(images), str(tmp_path / "o4")]) == 1
    assert "a0.png" in capsys.readouterr().err
    prompts = [json.loads(x) for x in (tmp_path / "o4" / "prompt.json").read_text(encoding="utf-8").splitlines()]
    assert [(p["source"], p["prompt"]) for p in prompts] == [("source/0.png", 'un carré "blanc"'),
                                                              ("source/1.png", "a white square")]
