"""--weighted_captions: A1111 emphasis parsing (library/models/prompt_weights.py), per-token weights laid out in
77-token chunks, and the weighted text-encoder states (library/models/text_encoding.py), checked against
weights and states computed by hand; then one training run from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from library.cache.text_encoder_files import text_encoder_cache_identity
from library.models.clip_tokenizer import BOS_ID, EOS_ID
from library.models.loading import load_model
from library.models.prompt_weights import parse_prompt_attention, token_weights
from library.models.text_encoding import PromptEncoder, merge_chunk_weights, tokenize_weighted_prompts
from tests.helpers.user_paths import lora_args

DOWN = 1 / 1.1


def approx_pieces(pieces):
    return [(text, pytest.approx(weight, rel=1e-12)) for text, weight in pieces]


# ---------------------------------------------------------------- parsing, hand-computed


@pytest.mark.parametrize("text, expected", [
    ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("[b]", [("b", DOWN)]),
    ("((c))", [("c", 1.1 * 1.1)]),
    ("(d:0.5) [e]", [("d", 0.5), (" ", 1.0), ("e", DOWN)]),
    ("((x:2)) y", [("x", 2 * 1.1), (" y", 1.0)]),  # nesting multiplies, inner weight first
    ("[(z:1.5)]", [("z", 1.5 * DOWN)]),
    ("(neg:-1)", [("neg", -1.0)]),
    ("plain text, no syntax", [("plain text, no syntax", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parser_weights(text, expected):
    assert parse_prompt_attention(text) == approx_pieces(expected)


@pytest.mark.parametrize("text, expected", [
    (r"\(literal\)", [("(literal)", 1.0)]),
    (r"\[also\] \\ kept", [("[also] \\ kept", 1.0)]),
    (r"(a \(b\))", [("a (b)", 1.1)]),  # escapes inside brackets are weighted text
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped, as in kohya
])
def test_parser_escapes(text, expected):
    assert parse_prompt_attention(text) == approx_pieces(expected)


@pytest.mark.parametrize("text, expected", [
    ("(open", [("open", 1.1)]),  # A1111 closes an unclosed bracket at the end of the text
    ("a (open [half", [("a ", 1.0), ("open ", 1.1), ("half", 1.1 * DOWN)]),
    ("stray) and] :1.3) here", [("stray) and] :1.3) here", 1.0)]),  # closers with nothing open are text
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),  # equal neighbours merge
    ("x BREAK y", [("x BREAK y", 1.0)]),  # kohya has no BREAK
    ("(a:1.2.3) b", [("a:1.2.3) b", 1.1)]),  # kohya crashes on a non-number weight; here it is text
])
def test_parser_unbalanced_and_oddities(text, expected):
    assert parse_prompt_attention(text) == approx_pieces(expected)


def test_parser_matches_kohyas_own_example():
    """kohya's (and A1111's) docstring example, with its float values."""
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]


# ---------------------------------------------------------------- tokens and their weights


@pytest.fixture(scope="module")
def sd15(tiny_model_dirs):
    return load_model(tiny_model_dirs["sd15"])


@pytest.fixture(scope="module")
def sdxl(tiny_model_dirs):
    return load_model(tiny_model_dirs["sdxl"])


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_every_token_of_a_multi_token_word_gets_its_weight(sd15):
    tok = sd15.tokenizers[0]
    word = "supercalifragilistic"
    assert len(ids_of(tok, word)) > 1
    ids, weights = token_weights(tok, f"a [{word}] (cat:1.3)", max_tokens=75)
    expected_ids = ids_of(tok, "a") + ids_of(tok, word) + ids_of(tok, "cat")
    assert ids == expected_ids
    assert weights == [1.0] + [pytest.approx(DOWN)] * len(ids_of(tok, word)) + [1.3]


def filler_words(tok, count):
    """``count`` words of one token each, so positions can be written down."""
    words = [w for w in ("house", "tree", "river", "cloud", "stone", "bird", "field", "road") if len(ids_of(tok, w)) == 1]
    return [words[i % len(words)] for i in range(count)]


def test_weights_follow_tokens_into_the_second_chunk(sd15, sdxl):
    """150 tokens: the weighted word is caption token 80, i.e. chunk 1, position 1 + 5; merged position 81."""
    for tok in [*sd15.tokenizers, *sdxl.tokenizers]:  # pad == eos and pad "!" != eos
        words = filler_words(tok, 140)
        caption = " ".join(words[:80]) + " (dog:1.5) " + " ".join(words[80:])
        ids, weights = tokenize_weighted_prompts(tok, [caption, "(cat)"], 150)
        assert ids.shape == weights.shape == (2, 2, 77)
        expected = torch.ones(2, 2, 77)
        expected[0, 1, 6] = 1.5
        expected[1, 0, 1] = 1.1
        assert torch.equal(weights, expected)
        plain = ids_of(tok, " ".join(words[:80] + ["dog"] + words[80:]))
        assert ids[0, 0].tolist() == [BOS_ID] + plain[:75] + [EOS_ID]
        assert ids[0, 1, :68].tolist() == [BOS_ID] + plain[75:141] + [EOS_ID]
        assert ids[0, 1, 6].item() == ids_of(tok, "dog")[0]
        merged = merge_chunk_weights(weights)
        assert merged.shape == (2, 152)
        assert merged[0, 81].item() == 1.5 and int((merged != 1).sum()) == 2 and merged[1, 1].item() == pytest.approx(1.1)


def test_truncation_keeps_ids_and_weights_together(sd15):
    tok = sd15.tokenizers[0]
    caption = " ".join(filler_words(tok, 74)) + " (two words:2)"
    ids, weights = tokenize_weighted_prompts(tok, [caption], 75)
    assert ids[0, 0, 75].item() == ids_of(tok, "two")[0] and ids[0, 0, 76].item() == EOS_ID
    assert weights[0, 0, 75].item() == 2.0 and weights[0, 0, 76].item() == 1.0


# ---------------------------------------------------------------- weighted states, by hand


def encoder_pair(model, max_token_length):
    plain = PromptEncoder(model.family.name, model.tokenizers, model.text_encoders, max_token_length=max_token_length)
    weighted = PromptEncoder(model.family.name, model.tokenizers, model.text_encoders,
                             max_token_length=max_token_length, weighted=True)
    return plain, weighted


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_weighted_states_are_unweighted_states_times_the_weight(which, sd15, sdxl):
    """kohya v0.10's encode_tokens_with_weights: each token's state times its weight, no mean rescaling;
    SDXL's pooled vector is not weighted. The weighted word sits in chunk 1 of a 150-token prompt."""
    model = sd15 if which == "sd15" else sdxl
    plain, weighted = encoder_pair(model, 150)
    tok = model.tokenizers[0]
    words = filler_words(tok, 100)
    caption = " ".join(words[:80]) + " (dog:1.5) [red] " + " ".join(words[80:])
    same_text = " ".join(words[:80] + ["dog", "red"] + words[80:])
    with torch.no_grad():
        reference = plain.encode([same_text, "a cat"])
        got = weighted.encode([caption, "a (cat)"])
    by_hand = reference.hidden_states.clone()
    by_hand[0, 81] *= 1.5  # caption token 80 -> merged position 81
    by_hand[0, 82] *= 1 / 1.1
    by_hand[1, 2] *= 1.1  # "a (cat)": token 1 -> position 2
    assert_close(got.hidden_states, by_hand, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got.hidden_states, reference.hidden_states)
    if which == "sdxl":
        assert_close(got.pooled, reference.pooled, rtol=0, atol=0)
    else:
        assert got.pooled is None


def test_weighted_encoder_without_syntax_is_the_plain_encoder(sd15):
    plain, weighted = encoder_pair(sd15, 75)
    with torch.no_grad():
        assert torch.equal(weighted.encode(["a red circle, on grey"]).hidden_states,
                           plain.encode(["a red circle, on grey"]).hidden_states)


def test_text_cache_keeps_weighted_and_plain_encodings_apart(sd15):
    plain, weighted = encoder_pair(sd15, 75)
    assert text_encoder_cache_identity(plain, "m") != text_encoder_cache_identity(weighted, "m")
    assert "weighted" not in text_encoder_cache_identity(plain, "m")  # existing caches stay valid


# ---------------------------------------------------------------- the command line


def dataset_with(shapes_data: Path, target: Path, emphasis: str) -> Path:
    """A copy whose metadata captions put the shape word in ``emphasis`` ("{}" is the word)."""
    shutil.copytree(shapes_data, target)
    meta_path = target / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for entry in meta.values():
        shape = entry["caption"].split()[2]
        entry["caption"] = entry["caption"].replace(f" {shape} ", " " + emphasis.format(shape) + " ")
        entry.pop("tags", None)
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return target


def test_weighted_captions_train_a_different_lora(run_script, tiny_model_dirs, shapes_data, tmp_path):
    """Plain captions without the flag, and "(circle:1.3)" with it: the same token ids (the syntax is parsed
    away), so the LoRAs differ only through the weight; runs are bit-reproducible on one thread."""
    model = tiny_model_dirs["sd15"]
    runs = {"plain": ("{}", []), "weighted": ("({}:1.3)", ["--weighted_captions"])}
    loras = {}
    for name, (emphasis, flags) in runs.items():
        data = dataset_with(shapes_data, tmp_path / f"data_{name}", emphasis)
        run_script("train_network.py", lora_args(model, data, tmp_path / name, 1, *flags))
        loras[name] = load_file(tmp_path / name / "lora.safetensors")
    assert "(circle:1.3)" in (tmp_path / "data_weighted" / "meta.json").read_text(encoding="utf-8")
    assert loras["plain"].keys() == loras["weighted"].keys()
    changed = [k for k in loras["plain"] if not torch.equal(loras["plain"][k], loras["weighted"][k])]
    assert any(".lora_up." in k for k in changed), changed
