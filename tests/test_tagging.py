"""tools/tag_images_by_wd14_tagger.py on tiny ONNX taggers whose scores are a known function of mean colour.

Tag scores (tests/helpers/tiny_tagger.py): a channel-driven tag scores sigmoid(8 * (mean - 0.5)), so 0.982 for a
full channel, 0.018 for an empty one, 0.5 for a half one (the white padding of a 2:1 image), 0.690 / 0.310 for
the brown image's R = 0.6 / G = 0.4. Every expected list below follows from those numbers by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import pytest
from PIL import Image

from tests.helpers.tiny_tagger import build_tagger
from tests.helpers.user_paths import assert_one_error_line
from tools import tag_images_by_wd14_tagger as tagger_tool

CSV_REPO, MAPPING_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2", "owner/cl_tagger/v1"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both layouts where kohya's tool puts them: MODEL_DIR/<repo_id with / as _>/[subfolder]."""
    root = tmp_path_factory.mktemp("tagger_models")
    build_tagger(root / "SmilingWolf_wd-v1-4-convnext-tagger-v2")
    build_tagger(root / "owner_cl_tagger" / "v1", layout="mapping")
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(folder / "green.png")
    Image.new("RGB", (896, 448), (0, 0, 255)).save(folder / "blue_wide.png")  # padded white: R = G = 0.5
    Image.new("RGB", (64, 64), (153, 102, 0)).save(folder / "brown.png")  # R 0.6, G 0.4
    alpha = Image.new("RGBA", (448, 448), (255, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (0, 0, 224, 448))  # transparent black half: the loader puts it on white
    alpha.save(folder / "alpha.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(folder / "sub" / "deep.png")
    (folder / "notes.txt.bak").write_text("not an image")
    return folder


def tag(images: Path, models: Path, capsys, *flags: object) -> tuple[int, str, str]:
    code = tagger_tool.main([str(images), "--model_dir", str(models), *map(str, flags)])
    out, err = capsys.readouterr()
    return code, out, err


def tags_json(images: Path, models: Path, capsys, *flags: object) -> dict[str, str]:
    """Run with --output_path (no tag files written) and return {image name: tag text}."""
    out = images.parent / "tags.json"
    code, _, err = tag(images, models, capsys, "--output_path", out, *flags)
    assert code == 0, err
    return {Path(key).relative_to(images).as_posix(): entry["tags"]
            for key, entry in json.loads(out.read_text(encoding="utf-8")).items()}


RED = "1girl, red_theme, ^_^, solo, long_hair, some_girl"
GREEN = "1girl, green_theme, ^_^, solo, hatsune_miku_(vocaloid), some_girl"
HALF = ("1girl, red_theme, green_theme, blue_theme, ^_^, solo, long_hair, hatsune_miku_(vocaloid), kiwi_(fruit), "
        "some_girl")


def test_tagger_as_typed_writes_tag_files_summary_and_frequencies(images: Path, models: Path, run_script) -> None:
    (images / "green.txt").write_text("hand written\n", encoding="utf-8")  # never overwritten by default
    result = run_script("tools/tag_images_by_wd14_tagger.py", [
        images, "--model_dir", models, "--onnx", "--batch_size", 2, "--max_data_loader_n_workers", 1,
        "--frequency_tags"])
    files = {path.name: path.read_text(encoding="utf-8") for path in sorted(images.rglob("*.txt"))}
    assert files == {"alpha.txt": HALF + "\n", "blue_wide.txt": HALF + "\n", "brown.txt": RED + "\n",
                     "green.txt": "hand written\n", "red.txt": RED + "\n"}
    assert result.stdout.split("Tag frequencies:\n")[1].splitlines()[:10] == [
        "1girl: 4", "^_^: 4", "long_hair: 4", "red_theme: 4", "solo: 4", "some_girl: 4", "blue_theme: 2",
        "green_theme: 2", "hatsune_miku_(vocaloid): 2", "kiwi_(fruit): 2"]
    assert "tagged 4 images\ntags per image: mean 8.0, min 6, max 10\n" \
           "most frequent tags: 1girl (4), ^_^ (4), long_hair (4), red_theme (4), solo (4), some_girl (4)" \
           in result.stdout
    assert "kept 1 existing caption files (--overwrite or --append_tags to replace them)" in result.stdout


def test_thresholds_per_category(images: Path, models: Path, capsys) -> None:
    assert tags_json(images, models, capsys, "--thresh", "0.55") == {
        "alpha.png": "1girl, red_theme, ^_^, long_hair, some_girl",  # transparent half on white: G = B = 0.5
        "blue_wide.png": "1girl, blue_theme, ^_^, kiwi_(fruit), some_girl",
        "brown.png": "1girl, red_theme, ^_^, long_hair, some_girl",
        "green.png": "1girl, green_theme, ^_^, hatsune_miku_(vocaloid), some_girl",
        "red.png": "1girl, red_theme, ^_^, long_hair, some_girl"}
    got = tags_json(images, models, capsys, "--general_threshold", "0.65", "--character_threshold", "0.75")
    assert got["brown.png"] == got["red.png"] == "1girl, red_theme, long_hair"
    assert got["green.png"] == "1girl, green_theme, hatsune_miku_(vocaloid)"
    assert got["blue_wide.png"] == "1girl, blue_theme, kiwi_(fruit)"
    got = tags_json(images, models, capsys, "--general_threshold", "0.7", "--character_threshold", "1.5")
    assert got["brown.png"] == "1girl"  # red_theme scores 0.690
    assert got["red.png"] == "1girl, red_theme, long_hair"  # above 1: no character tags at all


def test_names_order_and_placement_options(images: Path, models: Path, capsys) -> None:
    got = tags_json(images, models, capsys, "--remove_underscore", "--character_tags_first", "--use_rating_tags",
                    "--undesired_tags", "solo", "--always_first_tags", "1girl,long hair",
                    "--tag_replacement", r"red theme,crimson\,red;nothing,here")
    # rating: red -> "general" (0.5 beats 0.1 and 0.018), green -> "questionable" (G 0.982); "^_^" keeps its "_"
    assert got["red.png"] == "1girl, long hair, general, some girl, crimson,red, ^_^"
    assert got["green.png"] == "1girl, questionable, hatsune miku (vocaloid), some girl, green theme, ^_^"
    got = tags_json(images, models, capsys, "--character_tag_expand", "--use_rating_tags_as_last_tag",
                    "--caption_separator", "; ", "--undesired_tags", "solo;^_^")
    assert got["green.png"] == "1girl; green_theme; hatsune_miku; vocaloid; some_girl; questionable"
    assert got["blue_wide.png"] == ("1girl; red_theme; green_theme; blue_theme; long_hair; hatsune_miku; vocaloid; "
                                    "kiwi; fruit; some_girl; sensitive")


def test_tag_mapping_layout_sorts_by_score_with_quality_and_other_categories(images: Path, models: Path,
                                                                            capsys) -> None:
    got = tags_json(images, models, capsys, "--repo_id", MAPPING_REPO)
    assert got["red.png"] == "red_theme, 1girl, vocaloid, ^_^, highres, solo"  # copyright/meta join in
    got = tags_json(images, models, capsys, "--repo_id", MAPPING_REPO, "--use_rating_tags", "--use_quality_tags",
                    "--meta_threshold", "0.5", "--copyright_threshold", "0.9")
    assert got["red.png"] == "general, best_quality, red_theme, 1girl, ^_^, solo"
    got = tags_json(images, models, capsys, "--repo_id", MAPPING_REPO, "--character_tags_first",
                    "--use_rating_tags_as_last_tag", "--use_quality_tags_as_last_tag")
    assert got["green.png"] == ("hatsune_miku_(vocaloid), green_theme, 1girl, vocaloid, ^_^, highres, solo, "
                                "normal_quality, questionable")


def test_append_overwrite_recursive_extension_and_jsonl(images: Path, models: Path, capsys) -> None:
    (images / "red.tags").write_text("red_theme, custom tag\n", encoding="utf-8")
    (images / "green.tags").write_text("keep me\n", encoding="utf-8")
    code, out, _ = tag(images, models, capsys, "--append_tags", "--caption_extention", ".tags", "--recursive")
    assert code == 0
    assert (images / "red.tags").read_text() == "red_theme, custom tag, 1girl, ^_^, solo, long_hair, some_girl\n"
    assert (images / "green.tags").read_text() == "keep me, " + GREEN + "\n"
    assert (images / "sub" / "deep.tags").read_text() == GREEN + "\n"
    assert "tagged 6 images" in out
    code, out, _ = tag(images, models, capsys, "--overwrite", "--caption_extension", ".tags")
    assert (images / "green.tags").read_text() == GREEN + "\n" and "tagged 5 images" in out
    Image.new("RGB", (1600, 1200), (255, 0, 0)).save(images / "sub" / "big.jpg", quality=95)  # decoded at 1/2
    jsonl = images.parent / "tags.jsonl"
    assert tag(images, models, capsys, "--output_path", jsonl, "--recursive")[0] == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(Path(row["image_path"]).relative_to(images).as_posix(), row["image_size"]) for row in rows] == [
        ("alpha.png", [448, 448]), ("blue_wide.png", [896, 448]), ("brown.png", [64, 64]), ("green.png", [64, 64]),
        ("red.png", [64, 64]), ("sub/big.jpg", [1600, 1200]), ("sub/deep.png", [64, 64])]
    assert rows[4]["caption"] == rows[5]["caption"] == RED
    assert not (images / "red.txt").exists()  # --output_path writes no tag files


def test_model_download_goes_where_kohya_puts_it(images: Path, models: Path, tmp_path: Path, capsys,
                                                 monkeypatch) -> None:
    """Online, missing files come from the hub into MODEL_DIR/<owner_name>/[subfolder]/ (kohya's place)."""
    calls = []

    def fake_download(*, repo_id, filename, subfolder, local_dir, force_download):
        calls.append((repo_id, filename, subfolder, Path(local_dir).relative_to(tmp_path).as_posix()))
        source = models / repo_id.replace("/", "_") / (subfolder or "") / filename
        target = Path(local_dir) / (subfolder or "") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    fresh = tmp_path / "fresh_models"
    for repo, expected in ((CSV_REPO, "1girl, red_theme"), (MAPPING_REPO, "red_theme, 1girl")):
        out = tmp_path / "out.json"
        code, stdout, err = tag(images, fresh, capsys, "--repo_id", repo, "--output_path", out)
        assert code == 0, err
        assert json.loads(out.read_text())[str(images / "red.png")]["tags"].startswith(expected)
    assert calls == [(CSV_REPO, "model.onnx", None, "fresh_models/SmilingWolf_wd-v1-4-convnext-tagger-v2"),
                     (CSV_REPO, "selected_tags.csv", None, "fresh_models/SmilingWolf_wd-v1-4-convnext-tagger-v2"),
                     ("owner/cl_tagger", "model_optimized.onnx", "v1", "fresh_models/owner_cl_tagger"),
                     ("owner/cl_tagger", "tag_mapping.json", "v1", "fresh_models/owner_cl_tagger")]
    assert tag(images, fresh, capsys, "--output_path", tmp_path / "again.json")[0] == 0 and len(calls) == 4


def test_bad_input_is_one_error_line(images: Path, models: Path, tmp_path: Path, capsys, monkeypatch,
                                    run_script) -> None:
    missing = tmp_path / "empty" / CSV_REPO.replace("/", "_")
    result = run_script("tools/tag_images_by_wd14_tagger.py", [images, "--model_dir", tmp_path / "empty"],
                        expect_rc=1)  # run_script sets HF_HUB_OFFLINE=1
    assert assert_one_error_line(result) == (
        f"error: the tagger model {CSV_REPO} is not in {missing} and HF_HUB_OFFLINE=1 stops the download: "
        f"download model.onnx and selected_tags.csv from https://huggingface.co/{CSV_REPO}/tree/main into "
        f"{missing}/ (or pass --model_dir / --repo_id of a model you have)")
    code, _, err = tag(images, models, capsys, "--tag_replacement", "a,b,c")
    assert code == 1 and err.startswith("error: --tag_replacement: 'a,b,c' is not `source,target`")
    code, _, err = tag(tmp_path / "missing", models, capsys)
    assert code == 1 and err.startswith(f"error: train_data_dir: image folder {tmp_path / 'missing'} does not exist")
    code, _, err = tag(images, models, capsys, "--use_rating_tags", "--use_rating_tags_as_last_tag")
    assert code == 1 and "--use_rating_tags and --use_rating_tags_as_last_tag both given" in err
    folder = CSV_REPO.replace("/", "_")
    shutil.copytree(models / folder, tmp_path / "mixed" / folder)
    labels = tmp_path / "mixed" / folder / "selected_tags.csv"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))  # one tag short
    code, _, err = tag(images, tmp_path / "mixed", capsys)
    assert code == 1 and err == (f"error: {labels} lists 13 tags but {labels.parent / 'model.onnx'} gives 14 scores: "
                                 "they are not from the same model; download both again with --force_download\n")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    code, _, err = tag(images, models, capsys)
    assert code == 1 and err == ("error: the WD14 tagger needs the onnxruntime package: pip install "
                                 "onnxruntime==1.32.0 (onnxruntime-gpu on a CUDA machine)\n")
    assert not list(images.glob("*.txt"))
