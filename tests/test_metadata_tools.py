"""The metadata tools: merge caption/tag files into metadata JSON, clean it, and fail clearly on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from library.data import metadata as md
from tools import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata

REPO = Path(__file__).resolve().parent.parent


def make_folder(root: Path, files: dict[str, str | bytes | None]) -> Path:
    """Create `root` with the given files; None makes an (empty) image file."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.write_bytes(b"")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
    return root


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def run_tool(module, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data", {
        "b.png": None, "b.caption": "  a cat on a mat \n",
        "a.JPG": None, "a.caption": "first line\r\nsecond line\r\n",
        "c.webp": None, "c.txt": "1girl, solo",  # tag file only, no caption
        "d.Jpeg": None, "d.caption": "\ufeffcafé ünïcode", "d.txt": "long_hair, smile",
        "notes.txt": "not an image", "sub/e.png": None, "sub/e.caption": "nested",
    })


# --------------------------------------------------------------------------------------------- merging


def test_merge_captions_writes_exact_json_with_stem_keys(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "meta_cap.json"
    code, stdout, stderr = run_tool(merge_captions_to_metadata, [data, out], capsys)
    assert code == 0
    # Sorted by file name; whole file stripped; CRLF read as LF; BOM dropped; non-ASCII written as is.
    assert read(out) == (
        "{\n"
        '  "a": {\n    "caption": "first line\\nsecond line"\n  },\n'
        '  "b": {\n    "caption": "a cat on a mat"\n  },\n'
        '  "d": {\n    "caption": "café ünïcode"\n  }\n'
        "}\n"
    )
    assert "found 4 images" in stdout
    assert stderr == "warning: 1 of 4 images have no .caption file and got no caption: c.webp\n"


def test_merge_captions_full_path_keys_are_absolute(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "meta.json"
    assert run_tool(merge_captions_to_metadata, ["data", out, "--full_path"], capsys)[0] == 0
    expected = {str(data / "a.JPG"): {"caption": "first line\nsecond line"},
                str(data / "b.png"): {"caption": "a cat on a mat"},
                str(data / "d.Jpeg"): {"caption": "café ünïcode"}}
    assert read(out) == json.dumps(expected, ensure_ascii=False, indent=2) + "\n"
    assert all(os.path.isabs(key) for key in json.loads(read(out)))


def test_merge_captions_updates_in_json_keeping_other_fields(data: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "meta_in.json"
    src.write_text(json.dumps({"z": {"caption": "keep me"},
                               "b": {"tags": "cat", "caption": "old", "image_size": [512, 768]}}), encoding="utf-8")
    out = tmp_path / "meta_out.json"
    code, stdout, _ = run_tool(merge_captions_to_metadata, [data, out, "--in_json", src], capsys)
    assert code == 0
    assert json.loads(read(out)) == {
        "z": {"caption": "keep me"},
        "b": {"tags": "cat", "caption": "a cat on a mat", "image_size": [512, 768]},
        "a": {"caption": "first line\nsecond line"},
        "d": {"caption": "café ünïcode"},
    }
    assert list(json.loads(read(out))) == ["z", "b", "a", "d"]  # source order kept, new keys appended
    assert f"updating metadata from {src}" in stdout
    assert "wrote caption for 3 of them (2 new entries)" in stdout


def test_merge_without_in_json_updates_existing_out_json(data: Path, tmp_path: Path, capsys) -> None:
    """kohya reads out_json when --in_json is omitted, so captions then tags into one file keeps both."""
    out = tmp_path / "meta.json"
    assert run_tool(merge_captions_to_metadata, [data, out], capsys)[0] == 0
    code, stdout, stderr = run_tool(merge_dd_tags_to_metadata, [data, out], capsys)
    assert code == 0
    assert json.loads(read(out)) == {
        "a": {"caption": "first line\nsecond line"},
        "b": {"caption": "a cat on a mat"},
        "d": {"caption": "café ünïcode", "tags": "long_hair, smile"},
        "c": {"tags": "1girl, solo"},
    }
    assert f"updating metadata from {out}" in stdout
    assert "2 of 4 images have no .txt file and got no tags: a.JPG, b.png" in stderr


def test_merge_dd_tags_default_extension_and_debug(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tags.json"
    code, stdout, _ = run_tool(merge_dd_tags_to_metadata, [data, out, "--debug"], capsys)
    assert code == 0
    assert read(out) == ('{\n  "c": {\n    "tags": "1girl, solo"\n  },\n'
                         '  "d": {\n    "tags": "long_hair, smile"\n  }\n}\n')
    assert "c 1girl, solo" in stdout.splitlines()


def test_caption_extension_spellings(data: Path, tmp_path: Path, capsys) -> None:
    """`txt` gets its dot; kohya's misspelt --caption_extention still works."""
    for flag in ("--caption_extension", "--caption_extention"):
        out = tmp_path / f"{flag}.json"
        assert run_tool(merge_captions_to_metadata, [data, out, flag, "txt"], capsys)[0] == 0
        assert json.loads(read(out)) == {"c": {"caption": "1girl, solo"}, "d": {"caption": "long_hair, smile"}}


def test_recursive_keys_are_unique_relative_paths(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "nested", {
        "x.png": None, "x.caption": "top",
        "a/x.png": None, "a/x.caption": "in a",
        "b/c/x.PNG": None, "b/c/x.caption": "in b/c",
    })
    out = tmp_path / "rec.json"
    assert run_tool(merge_captions_to_metadata, [root, out, "--recursive"], capsys)[0] == 0
    assert json.loads(read(out)) == {"a/x": {"caption": "in a"}, "b/c/x": {"caption": "in b/c"},
                                     "x": {"caption": "top"}}
    out_full = tmp_path / "rec_full.json"
    assert run_tool(merge_captions_to_metadata, [root, out_full, "--recursive", "--full_path"], capsys)[0] == 0
    assert list(json.loads(read(out_full))) == [str(root / "a/x.png"), str(root / "b/c/x.PNG"), str(root / "x.png")]


def test_two_images_with_one_key_are_an_error(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "dup", {"x.png": None, "x.jpg": None, "x.caption": "one"})
    out = tmp_path / "dup.json"
    code, _, stderr = run_tool(merge_captions_to_metadata, [root, out], capsys)
    assert code == 1 and not out.exists()
    assert stderr == (f"error: images {root / 'x.jpg'} and {root / 'x.png'} in {root} both map to the metadata "
                      f"key 'x'; rename one or pass --full_path.\n")
    assert run_tool(merge_captions_to_metadata, [root, out, "--full_path"], capsys)[0] == 0


def test_missing_caption_files_are_counted_and_listed(tmp_path: Path, capsys) -> None:
    files: dict[str, str | None] = {f"img{i:02d}.png": None for i in range(8)}
    files["img03.caption"] = "only one"
    root = make_folder(tmp_path / "sparse", files)
    code, _, stderr = run_tool(merge_captions_to_metadata, [root, tmp_path / "m.json"], capsys)
    assert code == 0
    assert stderr == ("warning: 7 of 8 images have no .caption file and got no caption: img00.png, img01.png, "
                      "img02.png, img04.png, img05.png, ... (7 in all)\n")
    assert json.loads(read(tmp_path / "m.json")) == {"img03": {"caption": "only one"}}


def test_empty_caption_is_kept_and_reported(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "e", {"a.png": None, "a.caption": " \n"})
    code, _, stderr = run_tool(merge_captions_to_metadata, [root, tmp_path / "m.json"], capsys)
    assert code == 0 and json.loads(read(tmp_path / "m.json")) == {"a": {"caption": ""}}
    assert "1 .caption files are empty: a" in stderr


# --------------------------------------------------------------------------------------------- in place


def test_in_place_update_is_atomic_and_keeps_mode(data: Path, tmp_path: Path, capsys) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text('{"b": {"tags": "cat"}}', encoding="utf-8")
    meta.chmod(0o640)
    assert run_tool(merge_captions_to_metadata, [data, meta, "--in_json", meta], capsys)[0] == 0
    assert json.loads(read(meta))["b"] == {"tags": "cat", "caption": "a cat on a mat"}
    assert meta.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "meta.json"]  # no temp file left


def test_crash_while_writing_leaves_the_old_file_intact(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    meta = tmp_path / "meta.json"
    original = '{"b": {"tags": "cat"}}'
    meta.write_text(original, encoding="utf-8")

    def crash(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(md.os, "replace", crash)
    code, _, stderr = run_tool(merge_captions_to_metadata, [data, meta, "--in_json", meta], capsys)
    assert code == 1
    assert stderr == f"error: cannot write {meta}: No space left on device.\n"
    assert read(meta) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "meta.json"]


def test_clean_in_place(tmp_path: Path, capsys) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "an anime woman", "tags": "white_shirt, shirt"}}), encoding="utf-8")
    assert run_tool(clean_captions_and_tags, [meta, meta], capsys)[0] == 0
    assert json.loads(read(meta)) == {"a": {"caption": "an girl", "tags": "white shirt"}}


# --------------------------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize("before, after", [
    # 1. underscores -> spaces, but the kaomoji ^_^ keeps its underscore
    ("long_hair, ^_^, o_o", "long hair, ^_^, o o"),
    # 2. DeepDanbooru rating: everything from the first ", rating" on is cut
    ("1girl, solo, rating:safe", "1girl, solo"),
    ("1girl, rating:safe, smile, rating:questionable", "1girl"),
    ("rating:safe, 1girl", "rating:safe, 1girl"),  # needs the preceding ", "
    # 3. several people: a group with 2+ tags loses all of them
    ("2girls, blue eyes, red eyes, smile", "2girls, smile"),
    ("2girls, blue eyes, smile", "2girls, blue eyes, smile"),  # one tag in the group: kept
    ("1girl, blue eyes, red eyes", "1girl, blue eyes, red eyes"),  # one person: nothing dropped
    ("multiple boys, long sleeves, sleeveless, hat", "multiple boys, hat"),
    ("2girls, ponytail, twintails, hair bun, bow", "2girls, bow"),
    ("2girls, bob cut, hime cut", "2girls"),
    ("2girls, long hair, short hair, smile", "2girls, smile"),
    #    ... then 2+ one-word "X hair" tags go, but a lone hair-length tag stays
    ("2girls, long hair, blonde hair, black hair", "2girls, long hair"),
    ("2girls, blonde hair, messy hair, red bow", "2girls, red bow"),
    ("2girls, long hair, blonde hair", "2girls, long hair, blonde hair"),
    # 4. a generic one-word tag goes when a longer tag ends with it
    ("shirt, white shirt, skirt", "white shirt, skirt"),
    ("hair ornament, star hair ornament", "star hair ornament"),
    ("shirt, off-shoulder shirt", "shirt, off-shoulder shirt"),  # '-' is not a word letter
    ("smile, open mouth, mouth", "smile, open mouth"),
    # 5. rejoined with ", "; empty tags are dropped (kohya keeps them)
    ("a, , b", "a, b"),
    ("", ""),
])
def test_clean_tags_rules(before: str, after: str) -> None:
    assert md.clean_tags(before) == after


@pytest.mark.parametrize("before, after", [
    ("an anime woman sitting", "an girl sitting"),
    ("a young lady and a person", "a girl and a girl"),
    ("cartoon women and people", "girls and girls"),
    ("a cartoon image of a girl girl girl", "an image of a girl"),
    ("a cartoon anime drawing", "a drawing"),
    ("anime anime anime girl", "girl"),
    ("personal female", "girlal girl"),  # plain substring replacement, exactly as kohya
    ("a dog on a sofa", "a dog on a sofa"),
])
def test_clean_caption_rules(before: str, after: str) -> None:
    assert md.clean_caption(before) == after


def test_clean_tool_exact_output_and_reports(tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps({
        "a": {"caption": "a cartoon image of a woman", "tags": "1girl, shirt, white_shirt, rating:safe",
              "image_size": [512, 512]},
        "b": {"caption": "a dog"},
        "c": {"tags": "cat, rating:safe, rating:general"},
    }), encoding="utf-8")
    out = tmp_path / "out.json"
    code, stdout, stderr = run_tool(clean_captions_and_tags, [src, out, "--debug"], capsys)
    assert code == 0
    assert read(out) == (
        "{\n"
        '  "a": {\n    "caption": "an image of a girl",\n    "tags": "1girl, white shirt",\n'
        '    "image_size": [\n      512,\n      512\n    ]\n  },\n'
        '  "b": {\n    "caption": "a dog"\n  },\n'
        '  "c": {\n    "tags": "cat"\n  }\n'
        "}\n"
    )
    assert "FROM: 1girl, shirt, white_shirt, rating:safe\nTO:   1girl, white shirt" in stdout
    assert "3 values changed" in stdout
    assert "1 entries have no tags: b" in stderr
    assert "1 entries have no caption: c" in stderr
    assert "1 entries have several ratings" in stderr


def test_clean_accepts_kohyas_old_three_argument_form(tmp_path: Path, capsys) -> None:
    src, out = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text('{"a": {"tags": "cat_ears"}}', encoding="utf-8")
    code, _, stderr = run_tool(clean_captions_and_tags, [tmp_path / "train", src, out], capsys)
    assert code == 0 and json.loads(read(out)) == {"a": {"tags": "cat ears"}}
    assert "is ignored" in stderr


# --------------------------------------------------------------------------------------------- bad input


def one_error(err: str, *needles: str) -> None:
    """One line, starting with error:, naming the file."""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_or_wrong_image_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.json"
    code, _, err = run_tool(merge_captions_to_metadata, [tmp_path / "nope", out], capsys)
    assert code == 1 and not out.exists()
    one_error(err, f"image folder {tmp_path / 'nope'} does not exist")
    (tmp_path / "file.png").write_bytes(b"")
    code, _, err = run_tool(merge_dd_tags_to_metadata, [tmp_path / "file.png", out], capsys)
    assert code == 1
    one_error(err, "file.png is not a folder")


def test_missing_in_json(data: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.json"
    code, _, err = run_tool(merge_captions_to_metadata, [data, tmp_path / "o.json", "--in_json", missing], capsys)
    assert code == 1 and not (tmp_path / "o.json").exists()
    one_error(err, f"--in_json file {missing} does not exist")
    code, _, err = run_tool(clean_captions_and_tags, [missing, tmp_path / "o.json"], capsys)
    assert code == 1
    one_error(err, f"metadata file {missing} does not exist")


@pytest.mark.parametrize("text, message", [
    ('{\n  "a": {"caption": "x"},\n  "b": {"caption": "y"\n}',
     "is not valid JSON: Expecting ',' delimiter at line 4 column 2"),
    ('{\n  "a": {"caption": "x"},\n  "a": {"caption": "y"}\n}', "has the key 'a' twice (second one at line 3)"),
    ('["a", "b"]', "must hold a JSON object keyed by image, not a list"),
    ('{"a": "a caption"}', "the entry 'a' must be a JSON object, not a str"),
])
def test_bad_metadata_json(data: Path, tmp_path: Path, capsys, text: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(text, encoding="utf-8")
    for module, argv in ((merge_captions_to_metadata, [data, bad]),  # implicit in_json = existing out_json
                         (merge_dd_tags_to_metadata, [data, tmp_path / "o.json", "--in_json", bad]),
                         (clean_captions_and_tags, [bad, tmp_path / "o.json"])):
        code, _, err = run_tool(module, argv, capsys)
        assert code == 1
        one_error(err, str(bad), message)
        assert read(bad) == text and not (tmp_path / "o.json").exists()


def test_non_utf8_files(data: Path, tmp_path: Path, capsys) -> None:
    (data / "b.caption").write_bytes("un café".encode("latin-1"))
    code, _, err = run_tool(merge_captions_to_metadata, [data, tmp_path / "o.json"], capsys)
    assert code == 1 and not (tmp_path / "o.json").exists()
    one_error(err, f"{data / 'b.caption'} is not UTF-8 text (bad byte at offset 6)")
    bad = tmp_path / "latin.json"
    bad.write_bytes('{"a": {"caption": "café"}}'.encode("latin-1"))
    code, _, err = run_tool(clean_captions_and_tags, [bad, tmp_path / "o.json"], capsys)
    assert code == 1
    one_error(err, f"metadata file {bad} is not UTF-8")


def test_non_string_tags_and_missing_output_folder(data: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.json"
    src.write_text('{"a": {"tags": ["cat", "dog"]}}', encoding="utf-8")
    code, _, err = run_tool(clean_captions_and_tags, [src, tmp_path / "o.json"], capsys)
    assert code == 1
    one_error(err, f"metadata file {src}: 'tags' of the entry 'a' must be a string, not a list")
    out = tmp_path / "no_such_dir" / "o.json"
    code, _, err = run_tool(merge_captions_to_metadata, [data, out], capsys)
    assert code == 1
    one_error(err, f"cannot write {out}: the folder {out.parent} does not exist")


def test_tools_run_as_scripts(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "script.json"
    script = REPO / "tools" / "merge_captions_to_metadata.py"
    result = subprocess.run([sys.executable, str(script), str(data), str(out)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(read(out))["b"] == {"caption": "a cat on a mat"}
    result = subprocess.run([sys.executable, str(REPO / "tools" / "clean_captions_and_tags.py"),
                             str(tmp_path / "none.json"), str(out)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 1 and "none.json does not exist" in result.stderr
