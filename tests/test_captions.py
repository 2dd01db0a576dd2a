"""Pin every caption rule of library/captions.py with fixed seeds and exact output strings."""

from __future__ import annotations

import random

import pytest

from library.data.captions import (
    CaptionOptions,
    build_prompt,
    expand_wildcards,
    is_caption_random,
    merge_caption_and_tags,
    process_caption,
    token_joiner,
    warmup_step_count,
)

TAGS10 = "a, b, c, d, e, f, g, h, i, j"


def run(text: str, rng: random.Random | None = None, epoch: int = 1, step: int = 0,
        max_train_steps: int = 100, **options: object) -> str:
    """process_caption with defaults for the arguments a test does not care about."""
    return process_caption(text, CaptionOptions(**options), rng or random.Random(0), epoch, step, max_train_steps)


# --- merging caption and tags -----------------------------------------------------------------------------

def test_concat_is_kohyas_caption_separator_tags() -> None:
    assert merge_caption_and_tags("a cat", "red, fluffy", ",", "concat", random.Random(0)) == "a cat,red, fluffy"


def test_tags_first() -> None:
    assert merge_caption_and_tags("a cat", "red, fluffy", ",", "tags_first", random.Random(0)) == "red, fluffy,a cat"


@pytest.mark.parametrize("mode", ["concat", "tags_first", "random"])
def test_only_one_present_gives_that_one(mode: str) -> None:
    rng = random.Random(0)
    assert merge_caption_and_tags("a cat", None, ",", mode, rng) == "a cat"
    assert merge_caption_and_tags("a cat", "  ", ",", mode, rng) == "a cat"
    assert merge_caption_and_tags(None, "red, fluffy", ",", mode, rng) == "red, fluffy"
    assert merge_caption_and_tags("", "red, fluffy", ",", mode, rng) == "red, fluffy"
    assert merge_caption_and_tags(None, None, ",", mode, rng) == ""


def test_random_mode_gives_caption_or_tags_and_nothing_else() -> None:
    rng = random.Random(0)
    draws = [merge_caption_and_tags("a cat", "red, fluffy", ",", "random", rng) for _ in range(8)]
    assert draws == ["red, fluffy", "red, fluffy", "a cat", "a cat", "red, fluffy", "a cat", "red, fluffy", "a cat"]
    assert set(draws) == {"a cat", "red, fluffy"}


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="caption_tag_mode"):
        merge_caption_and_tags("a", "b", ",", "sideways", random.Random(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="caption_tag_mode"):
        CaptionOptions(caption_tag_mode="sideways")  # type: ignore[arg-type]


def test_wildcard_merge_appends_tags_to_every_line_and_flattens_tags() -> None:
    merged = merge_caption_and_tags("a cat\n\na dog\n", "red\nfluffy", ",", "concat", random.Random(0),
                                    enable_wildcard=True)
    assert merged == "a cat,red,fluffy\na dog,red,fluffy"
    merged = merge_caption_and_tags("a cat\na dog", "red", ",", "tags_first", random.Random(0), enable_wildcard=True)
    assert merged == "red,a cat\nred,a dog"


def test_merge_without_wildcards_keeps_first_line_so_tags_survive() -> None:
    # kohya appended the tags after the last line, then trained on the first line only: tags were lost.
    merged = merge_caption_and_tags("a cat\na dog", "red", ",", "concat", random.Random(0))
    assert merged == "a cat,red"
    assert run(merged) == "a cat,red"


def test_build_prompt_merges_then_processes() -> None:
    options = CaptionOptions(caption_tag_mode="tags_first", caption_prefix="photo", caption_separator=";")
    assert build_prompt("a cat", "red; fluffy", options, random.Random(0), 1, 0, 10) == "photo red; fluffy;a cat"


# --- prefix / suffix ------------------------------------------------------------------------------------

def test_prefix_and_suffix_are_joined_with_a_space() -> None:
    assert run("a cat", caption_prefix="masterpiece,", caption_suffix=", best") == "masterpiece, a cat , best"
    assert run("a cat", caption_prefix="photo of") == "photo of a cat"
    assert run("", caption_prefix="photo") == "photo"  # no dangling space


def test_prefix_and_suffix_apply_to_the_chosen_line() -> None:
    # kohya prefixed the whole multi-line text: only line 1 got the prefix, the suffix only the last line.
    assert run("a cat\na dog", caption_prefix="P", caption_suffix="S") == "P a cat S"
    assert run("a cat\na dog", random.Random(0), caption_prefix="P", caption_suffix="S",
               enable_wildcard=True) == "P a dog S"


# --- whole-caption dropout ------------------------------------------------------------------------------

def test_dropout_rate_one_drops_and_zero_keeps() -> None:
    assert run("a cat", caption_dropout_rate=1.0, caption_prefix="P") == ""
    assert run("a cat", caption_dropout_rate=0.0) == "a cat"


def test_dropout_rate_half_is_seeded() -> None:
    rng = random.Random(0)
    draws = [run("a cat", rng, caption_dropout_rate=0.5) for _ in range(6)]
    assert draws == ["a cat", "a cat", "", "", "a cat", ""]


def test_dropout_every_n_epochs_counts_from_one() -> None:
    assert run("a cat", epoch=2, caption_dropout_every_n_epochs=2) == ""
    assert run("a cat", epoch=4, caption_dropout_every_n_epochs=2) == ""
    assert run("a cat", epoch=1, caption_dropout_every_n_epochs=2) == "a cat"
    assert run("a cat", epoch=3, caption_dropout_every_n_epochs=2) == "a cat"
    with pytest.raises(ValueError, match="epoch counts from 1"):
        run("a cat", epoch=0, caption_dropout_every_n_epochs=2)


def test_dropped_caption_skips_everything_else() -> None:
    assert run("a ||| b", caption_dropout_rate=1.0, keep_tokens_separator="|||", shuffle_caption=True) == ""


# --- lines and wildcards --------------------------------------------------------------------------------

def test_first_line_without_wildcards() -> None:
    assert run("a cat\na dog\na bird") == "a cat"
    assert run("\n  \n a cat \na dog") == "a cat"  # blank lines are not lines; lines are stripped
    assert run("{red|blue} cat") == "{red|blue} cat"  # braces are plain text without wildcards


def test_random_non_empty_line_with_wildcards() -> None:
    rng = random.Random(0)
    draws = [run("a cat\n\na dog\n  \na bird", rng, enable_wildcard=True) for _ in range(6)]
    assert draws == ["a dog", "a dog", "a cat", "a dog", "a bird", "a dog"]
    assert "" not in draws


def test_wildcard_choices_and_escapes() -> None:
    rng = random.Random(0)
    draws = [run("{red|blue|green} hat, {{literal}} {x|y}", rng, enable_wildcard=True) for _ in range(4)]
    assert draws == ["blue hat, {literal} y", "red hat, {literal} y",
                     "green hat, {literal} y", "blue hat, {literal} y"]
    assert expand_wildcards("{{a|b}}", random.Random(0)) == "{a|b}"
    assert expand_wildcards("{} {solo} }{", random.Random(0)) == "{} solo }{"
    assert expand_wildcards("{a | b}", random.Random(1)) == "a "  # choices are verbatim


def test_wildcards_in_prefix_are_expanded() -> None:
    assert run("cat", random.Random(0), caption_prefix="{photo|painting} of", enable_wildcard=True) == "painting of cat"


# --- tokens: keep_tokens, marker, shuffle, separators ---------------------------------------------------

def test_shuffle_keeps_first_keep_tokens_fixed() -> None:
    out = run("a, b, c, d, e, f", random.Random(0), shuffle_caption=True, keep_tokens=2)
    assert out == "a, b, e, c, d, f"
    for seed in range(20):
        out = run("a, b, c, d, e, f", random.Random(seed), shuffle_caption=True, keep_tokens=2)
        tokens = out.split(", ")
        assert tokens[:2] == ["a", "b"] and sorted(tokens[2:]) == ["c", "d", "e", "f"]


def test_keep_tokens_counts_non_empty_tokens() -> None:
    assert run("a, , b,c ,, d", random.Random(1), shuffle_caption=True, keep_tokens=2) == "a, b, d, c"


def test_no_shuffle_leaves_text_untouched() -> None:
    assert run("a,b ,  c", keep_tokens=1) == "a,b ,  c"


def test_marker_head_flex_tail_with_shuffle() -> None:
    text = "h1, h2 ||| a, b, c, d ||| t1, t2"
    assert run(text, random.Random(0), shuffle_caption=True, keep_tokens_separator="|||") == \
        "h1, h2, c, a, b, d, t1, t2"
    for seed in range(20):
        out = run(text, random.Random(seed), shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
        tokens = out.split(", ")
        assert tokens[:2] == ["h1", "h2"] and tokens[-2:] == ["t1", "t2"]
        assert sorted(tokens[2:-2]) == ["a", "b", "c", "d"] and "|||" not in out


def test_marker_never_leaks_without_shuffle() -> None:
    assert run("h1, h2 ||| a, b ||| t1", keep_tokens_separator="|||") == "h1, h2, a, b, t1"
    assert run("h1|||a, b", keep_tokens_separator="|||") == "h1, a, b"
    assert run("||| a, b", keep_tokens_separator="|||") == "a, b"
    # a third marker inside the tail acts as a separator instead of staying in the prompt
    assert run("h ||| a ||| t1 ||| t2", keep_tokens_separator="|||") == "h, a, t1, t2"
    # no marker in the text: nothing to remove, text untouched
    assert run("a,b", keep_tokens_separator="|||") == "a,b"


def test_custom_separator_survives_shuffle_kohya_1304() -> None:
    out = run("a; b; c; d; e; f", random.Random(0), shuffle_caption=True, caption_separator=";")
    assert out == "e; c; b; a; f; d"
    assert token_joiner(";") == "; " and token_joiner(" ") == " " and token_joiner(", ") == ", "
    assert run("a b c d", random.Random(0), shuffle_caption=True, caption_separator=" ") == "c a b d"


def test_secondary_separator_moves_as_one_unit_then_is_replaced() -> None:
    out = run("x, a;;;b;;;c, y, z", random.Random(1), shuffle_caption=True, secondary_separator=";;;")
    assert out == "z, x, y, a,b,c"
    for seed in range(20):
        out = run("x, a;;;b;;;c, y, z", random.Random(seed), shuffle_caption=True, secondary_separator=";;;")
        assert "a,b,c" in out and ";;;" not in out
    # replaced even when nothing is shuffled, and dropped as one unit
    assert run("x, a;;;b", secondary_separator=";;;") == "x, a,b"
    assert run("x, a;;;b", caption_tag_dropout_rate=1.0, keep_tokens=1, secondary_separator=";;;") == "x"


def test_tag_dropout_one_drops_all_flexible_keeps_fixed() -> None:
    assert run(TAGS10, caption_tag_dropout_rate=1.0, keep_tokens=2) == "a, b"
    assert run("h ||| a, b, c ||| t", caption_tag_dropout_rate=1.0, keep_tokens_separator="|||") == "h, t"


def test_tag_dropout_half_is_seeded() -> None:
    assert run(TAGS10, random.Random(0), caption_tag_dropout_rate=0.5, keep_tokens=1) == "a, b, c, f, h"


# --- token warm-up --------------------------------------------------------------------------------------

def test_token_warmup_steps() -> None:
    # 10 flexible tokens (b..k), min 1, warm-up over 10 steps: floor(step * (10 - 1) / 10) + 1 kept.
    text = "a, b, c, d, e, f, g, h, i, j, k"
    kw: dict[str, object] = {"token_warmup_step": 10, "keep_tokens": 1}
    assert run(text, step=0, **kw) == "a, b"
    assert run(text, step=5, **kw) == "a, b, c, d, e, f"
    assert run(text, step=9, **kw) == "a, b, c, d, e, f, g, h, i, j"
    assert run(text, step=10, **kw) == text
    assert run(text, step=50, **kw) == text
    assert run(text, step=0, token_warmup_step=10, token_warmup_min=3) == "a, b, c"


def test_token_warmup_ratio_form_is_a_fraction_of_max_train_steps() -> None:
    options = CaptionOptions(token_warmup_step=0.5, keep_tokens=1)
    assert warmup_step_count(options, 20) == 10
    text = "a, b, c, d, e, f, g, h, i, j, k"
    assert process_caption(text, options, random.Random(0), 1, 5, 20) == "a, b, c, d, e, f"
    assert process_caption(text, options, random.Random(0), 1, 10, 20) == text
    # nothing was mutated: the same options give the ratio form again for another run length
    assert options.token_warmup_step == 0.5 and warmup_step_count(options, 40) == 20
    assert process_caption(text, options, random.Random(0), 1, 10, 40) == "a, b, c, d, e, f"
    with pytest.raises(ValueError, match="max_train_steps"):
        process_caption(text, options, random.Random(0), 1, 0, 0)


def test_token_warmup_truncates_before_shuffling() -> None:
    out = run("a, b, c, d, e, f", random.Random(0), step=5, token_warmup_step=10, shuffle_caption=True)
    assert out == "a, c, b"  # floor(5 * (6 - 1) / 10) + 1 = 3 tokens
    assert sorted(out.split(", ")) == ["a", "b", "c"]


# --- determinism, validation, cacheability --------------------------------------------------------------

def test_same_seed_same_prompt() -> None:
    options = CaptionOptions(
        shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3, caption_dropout_rate=0.2,
        enable_wildcard=True, caption_tag_mode="random", secondary_separator=";;;",
    )

    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [build_prompt("{a|b} x\ny, z;;;w, q", TAGS10, options, rng, 1, 3, 100) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="caption_dropout_rate"):
        CaptionOptions(caption_dropout_rate=1.5)
    with pytest.raises(ValueError, match="caption_tag_dropout_rate"):
        CaptionOptions(caption_tag_dropout_rate=-0.1)
    with pytest.raises(ValueError, match="keep_tokens"):
        CaptionOptions(keep_tokens=-1)
    with pytest.raises(ValueError, match="caption_separator"):
        CaptionOptions(caption_separator="")
    with pytest.raises(ValueError, match="token_warmup_step"):
        CaptionOptions(token_warmup_step=-1)
    with pytest.raises(ValueError, match="keep_tokens_separator"):
        CaptionOptions(keep_tokens_separator=",")
    with pytest.raises(ValueError, match="step"):
        run("a", step=-1)


@pytest.mark.parametrize(
    "options",
    [
        {"shuffle_caption": True},
        {"token_warmup_step": 5},
        {"token_warmup_step": 0.1},
        {"caption_tag_dropout_rate": 0.1},
        {"caption_dropout_rate": 0.1},
        {"caption_dropout_every_n_epochs": 3},
        {"caption_tag_mode": "random"},
        {"enable_wildcard": True},
    ],
)
def test_is_caption_random_true(options: dict[str, object]) -> None:
    assert is_caption_random(CaptionOptions(**options))


def test_is_caption_random_false_for_deterministic_options() -> None:
    options = CaptionOptions(caption_prefix="p", caption_suffix="s", keep_tokens=2, keep_tokens_separator="|||",
                             secondary_separator=";;;", caption_separator=";", caption_tag_mode="tags_first")
    assert not is_caption_random(options)
    assert not is_caption_random(CaptionOptions())


def test_is_caption_random_with_wildcards_looks_at_the_text() -> None:
    options = CaptionOptions(enable_wildcard=True)
    assert not is_caption_random(options, "a cat, {solo}, {{braces|literal}}")
    assert is_caption_random(options, "a {red|blue} cat")
    assert is_caption_random(options, "a cat\n\na dog")
    assert not is_caption_random(options, "a cat\n\n")
    assert is_caption_random(CaptionOptions(enable_wildcard=True, caption_prefix="{a|b}"), "a cat")
    assert not is_caption_random(CaptionOptions(), "a {red|blue} cat\na dog")  # wildcards off: plain text
