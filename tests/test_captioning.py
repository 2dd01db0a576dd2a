"""tools/make_captions.py (BLIP) and tools/make_captions_by_git.py (GIT) on tiny random models saved locally.

The models are random, so captions are word salad from a 23-word vocabulary; what is pinned is what the tools
control: which files are written (per image, extension, recursion, kept unless --overwrite), that batching
does not change beam-search captions, and that kohya's generation flags reach generate() (max_length bounds
the tokens, beam search is deterministic, sampling follows --seed, --generate_kwargs passes through).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from library.data.captioning import remove_text_phrases
from tests.helpers.tiny_captioners import WORDS, build_tiny_blip, build_tiny_git
from tools import make_captions, make_captions_by_git

# Without the special tokens (and with EOS held off by min_length) a caption is exactly max_length - 1 words.
ONLY_WORDS = ["--generate_kwargs", json.dumps({"bad_words_ids": [[0], [1], [2], [4]]})]


@pytest.fixture(scope="module")
def captioners(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": build_tiny_blip(root / "blip"), "git": build_tiny_git(root / "git")}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name, colour in (("a.png", (255, 0, 0)), ("b.jpg", (0, 128, 255)), ("c.webp", (20, 200, 20)),
                         ("sub/d.png", (90, 90, 90))):
        Image.new("RGB", (48, 40), colour).save(folder / name)
    Image.new("LA", (40, 48), (30, 0)).save(folder / "e.png")  # grey + alpha: the loader puts it on white
    return folder


def caption(tool, images: Path, model: Path, capsys, *flags: object) -> tuple[int, str, str]:
    code = tool.main([str(images), "--model_id", str(model), *map(str, flags)])
    out, err = capsys.readouterr()
    return code, out, err


def read_all(images: Path, extension: str) -> dict[str, str]:
    return {path.relative_to(images).as_posix(): path.read_text(encoding="utf-8")
            for path in sorted(images.rglob(f"*{extension}"))}


# BLIP continues kohya's prompt "a picture of " ([CLS] + 3 tokens of max_length, cut from the caption); GIT has none.
@pytest.mark.parametrize("tool,name,words,no_prompt", [(make_captions, "blip", 2, ["--prompt", ""]),
                                                       (make_captions_by_git, "git", 5, [])])
def test_files_batching_and_generation_options(tool, name: str, words: int, no_prompt: list[str], images: Path,
                                               captioners: dict[str, Path], capsys) -> None:
    beams = ["--beam_search", "--num_beams", "3", "--min_length", "6", "--max_length", "6", *ONLY_WORDS]
    code, out, _ = caption(tool, images, captioners[name], capsys, "--recursive", "--caption_extension", ".cap",
                           "--batch_size", "3", *beams)
    assert code == 0
    batched = read_all(images, ".cap")
    assert list(batched) == ["a.cap", "b.cap", "c.cap", "e.cap", "sub/d.cap"]
    for text in batched.values():  # one line; max_length 6 = BOS + 5 tokens (prompt included), all words
        assert text.endswith("\n") and text.count("\n") == 1
        assert len(text.split()) == words and set(text.split()) <= set(WORDS)
        assert not text.startswith("a picture of")
    assert "captioned 5 images\nwords per image:" in out
    code, out, _ = caption(tool, images, captioners[name], capsys, "--recursive", "--caption_extention", ".cap",
                           "--batch_size", "1", "--overwrite", *beams)
    assert read_all(images, ".cap") == batched  # beam search: deterministic, and batching changes nothing

    code, out, _ = caption(tool, images, captioners[name], capsys, "--max_length", "3", "--min_length", "0",
                           *no_prompt)
    captions = read_all(images, ".caption")
    assert list(captions) == ["a.caption", "b.caption", "c.caption", "e.caption"]  # not recursive
    assert all(len(text.split()) <= 2 for text in captions.values())
    assert "kept" not in out


def test_sampling_follows_the_seed_and_existing_captions_are_kept(images: Path, captioners: dict[str, Path],
                                                                  capsys) -> None:
    model = captioners["blip"]
    long = ["--min_length", "12", "--max_length", "12", *ONLY_WORDS]
    (images / "a.caption").write_text("my own caption\n", encoding="utf-8")
    code, out, _ = caption(make_captions, images, model, capsys, "--seed", "1", *long)  # BLIP samples by default
    first = read_all(images, ".caption")
    assert first["a.caption"] == "my own caption\n" and len(first) == 4
    assert "kept 1 existing caption files (--overwrite to replace them)" in out
    caption(make_captions, images, model, capsys, "--seed", "1", "--overwrite", *long)
    again = read_all(images, ".caption")
    assert again["a.caption"] != "my own caption\n"
    caption(make_captions, images, model, capsys, "--seed", "1", "--overwrite", *long)
    assert read_all(images, ".caption") == again  # one seed at the start, as in kohya: same images, same captions
    caption(make_captions, images, model, capsys, "--seed", "2", "--overwrite", *long)
    assert read_all(images, ".caption") != again  # 11 sampled words out of 23: another seed, other captions
    caption(make_captions_by_git, images, captioners["git"], capsys, "--overwrite", "--top_p", "0.9", "--seed", "1",
            *long)
    sampled_git = read_all(images, ".caption")
    caption(make_captions_by_git, images, captioners["git"], capsys, "--overwrite", "--top_p", "0.9", "--seed", "2",
            *long)
    assert read_all(images, ".caption") != sampled_git  # --top_p turns GIT's greedy decoding into sampling


def test_blip_as_typed(images: Path, captioners: dict[str, Path], run_script) -> None:
    result = run_script("tools/make_captions.py", [images, "--model_id", captioners["blip"], "--batch_size", 2,
                                                   "--max_data_loader_n_workers", 1, "--debug", *ONLY_WORDS])
    captions = read_all(images, ".caption")
    assert list(captions) == ["a.caption", "b.caption", "c.caption", "e.caption"]
    # kohya's defaults: min_length 5 = [CLS] "a picture of" + 1 word at least; sampled, so only bounds are known
    assert all(1 <= len(text.split()) <= 71 and set(text.split()) <= set(WORDS) for text in captions.values())
    for image in ("a.png", "b.jpg", "c.webp", "e.png"):  # --debug prints each caption
        assert f"{images / image}: {captions[image.split('.')[0] + '.caption'].strip()}\n" in result.stdout
    assert "captioned 4 images\nwords per image: mean" in result.stdout


def test_remove_words_cuts_imagined_text() -> None:
    assert remove_text_phrases('a girl holding a sign that says "hello world" on it') == "a girl holding a sign"
    assert remove_text_phrases("a poster with the words happy birthday") == "a poster birthday"
    assert remove_text_phrases("a shirt with the number 23 on it and a hat") == "a shirt and a hat"
    assert remove_text_phrases("a book with the word love on it") == "a book"
    assert remove_text_phrases("a cat sitting on a mat") == "a cat sitting on a mat"


def test_bad_input_is_one_error_line(images: Path, captioners: dict[str, Path], tmp_path: Path, capsys) -> None:
    code, _, err = caption(make_captions_by_git, images, tmp_path / "no_model", capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: --model_id {tmp_path / 'no_model'}: "
                                                                 "cannot load an image-to-text model (")
    code = make_captions.main([str(images), "--caption_weights", "model_large_caption.pth"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --caption_weights model_large_caption.pth: kohya's BLIP .pth "
                                        "checkpoints are not read; pass --model_id "
                                        "Salesforce/blip-image-captioning-large")
    code, _, err = caption(make_captions, images, captioners["blip"], capsys, "--max_length", "200")
    assert code == 1 and err.splitlines()[-1] == (f"error: --max_length 200 is above the 128 text positions of "
                                                  f"{captioners['blip']}: lower it")
    code, _, err = caption(make_captions, images, tmp_path, capsys, "--min_length", "80")
    assert code == 1 and err == "error: --min_length 80 is above --max_length 75: lower it\n"
    code, _, err = caption(make_captions, images, tmp_path, capsys, "--generate_kwargs", "[1]")
    assert code == 1 and "--generate_kwargs: expected a JSON object" in err
    assert not list(images.glob("*.caption"))
