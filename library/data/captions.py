"""Turn a sample's caption text and tags into the prompt string it is trained on.

Everything here is a pure function of its arguments: no file I/O, no global state, and no module-level
`random` -- the caller passes a `random.Random`, so a fixed seed reproduces a prompt exactly and DataLoader
workers can each own a generator. The dataset calls `build_prompt` (or `merge_caption_and_tags` followed
by `process_caption`) every time a sample is drawn, because several steps are random per draw.

Order of `process_caption` (kohya's, except where marked FIX):
  1. whole-caption dropout (rate, or every N-th epoch) -> ""
  2. pick the line: a random non-empty line with wildcards, else the first non-empty line
  3. caption_prefix / caption_suffix, joined with a space        (FIX: after step 2, see below)
  4. wildcards `{a|b|c}` -> one choice; `{{` / `}}` -> literal braces
  5. only when shuffling, token warm-up or tag dropout is on (or a keep_tokens_separator marker is present):
     split into fixed head / flexible / fixed tail tokens, warm up, shuffle, drop tags, rejoin
  6. secondary_separator -> caption_separator

Whitespace policy (one rule, applied everywhere):
  * caption lines and tag lines are stripped; blank lines do not count as lines;
  * prefix, line and suffix are joined with one space, skipping the empty ones (no dangling space);
  * when text is split into tokens (step 5) each token is stripped and empty tokens are dropped, in both
    the keep_tokens and the keep_tokens_separator path; tokens are rejoined with `token_joiner(sep)`;
  * text that is not tokenised is left exactly as written (wildcard choices included, spaces and all).
CLIP's tokenizer splits punctuation from words and ignores whitespace, so "a,b" and "a, b" encode the same;
these rules only make the logged/cached prompt strings tidy and predictable.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

CaptionTagMode = Literal["concat", "tags_first", "random"]
CAPTION_TAG_MODES: tuple[CaptionTagMode, ...] = ("concat", "tags_first", "random")

# `{{` and `}}` are escapes; `{...}` with no brace inside is a wildcard group. Alternation order matters:
# escapes are tried first at each position, so `{{a|b}}` is the literal text `{a|b}` (as in kohya).
_WILDCARD_RE = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings (the kohya subset keys of the same names).

    `keep_tokens_separator` / `secondary_separator` / prefix / suffix: None or "" means off.
    `token_warmup_step` >= 1 is a step count; 0 < value < 1 is a fraction of max_train_steps; 0 is off.
    `caption_dropout_every_n_epochs` = N drops every caption in epochs N, 2N, ... (epochs count from 1).
    """

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    caption_separator: str = ","
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    caption_tag_mode: CaptionTagMode = "concat"

    def __post_init__(self) -> None:
        # Fail at config time with the key's name, not deep inside a DataLoader worker.
        if not isinstance(self.caption_separator, str) or not self.caption_separator:
            raise ValueError(f"caption_separator must be a non-empty string, got {self.caption_separator!r}")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        for name in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.token_warmup_step < 0:
            raise ValueError(f"token_warmup_step must be >= 0, got {self.token_warmup_step!r}")
        if self.caption_tag_mode not in CAPTION_TAG_MODES:
            raise ValueError(
                f"caption_tag_mode must be one of {', '.join(CAPTION_TAG_MODES)}, got {self.caption_tag_mode!r}"
            )
        if self.keep_tokens_separator and self.keep_tokens_separator == self.caption_separator:
            raise ValueError("keep_tokens_separator must differ from caption_separator")


def token_joiner(caption_separator: str) -> str:
    """The string tokens are rejoined with: the separator plus one space (FIX for kohya #1304).

    kohya hard-coded ", ", losing a custom separator. A separator that already ends in whitespace
    (" ", "\\n", ", ") is used as is, so it does not grow a second space.
    """
    return caption_separator if caption_separator[-1].isspace() else caption_separator + " "


def _nonempty_lines(text: str | None) -> list[str]:
    """Stripped, non-blank lines: blank lines are never a caption alternative."""
    if not text:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _split_tokens(text: str, separator: str) -> list[str]:
    """Stripped, non-empty tokens: `a, , b` has two tags, not three."""
    return [token.strip() for token in text.split(separator) if token.strip()]


def merge_caption_and_tags(
    caption: str | None,
    tags: str | None,
    separator: str,
    mode: CaptionTagMode,
    rng: random.Random,
    *,
    enable_wildcard: bool = False,
) -> str:
    """Combine a metadata caption and its tag list into the text `process_caption` works on.

    Call it per draw: in `random` mode the result changes between draws.
      concat     (kohya) caption + separator + tags, e.g. "a cat" + "," + "red, fluffy" -> "a cat,red, fluffy"
      tags_first (NEW)   tags + separator + caption
      random     (NEW)   the caption or the tags, 50/50 (one `rng.random()` draw, only when both exist)
    A missing (None or blank) caption or tags gives the other one unchanged; both missing gives "".
    Tags are always one line: their line breaks become the separator (kohya does this with wildcards).
    With wildcards every non-empty caption line is an alternative and each gets the tags (kohya); without,
    only the first non-empty caption line is kept (FIX: kohya appended the tags after the last line and
    then trained on the first, so multi-line metadata captions silently lost their tags).
    """
    if mode not in CAPTION_TAG_MODES:
        raise ValueError(f"caption_tag_mode must be one of {', '.join(CAPTION_TAG_MODES)}, got {mode!r}")
    lines = _nonempty_lines(caption)
    if not enable_wildcard:
        lines = lines[:1]
    tag_text = separator.join(_nonempty_lines(tags))
    if not lines:
        return tag_text
    if not tag_text:
        return "\n".join(lines)
    if mode == "random":
        return "\n".join(lines) if rng.random() < 0.5 else tag_text
    if mode == "tags_first":
        return "\n".join(f"{tag_text}{separator}{line}" for line in lines)
    return "\n".join(f"{line}{separator}{tag_text}" for line in lines)


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each `{a|b|c}` with one of its choices; `{{` and `}}` become literal `{` and `}`.

    Choices are kept verbatim (`{a | b}` gives "a " or " b"); `{}` and unmatched braces stay literal.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        return rng.choice(match.group(1).split("|"))

    return _WILDCARD_RE.sub(replace, text)


def _has_wildcard_choice(text: str) -> bool:
    """True when some wildcard group offers two or more choices (so expansion is random)."""
    return any(m.group(1) is not None and "|" in m.group(1) for m in _WILDCARD_RE.finditer(text))


def warmup_step_count(options: CaptionOptions, max_train_steps: int) -> float:
    """The token warm-up length in steps; a value < 1 is a fraction of max_train_steps.

    kohya overwrote the subset's setting in place on first use; this computes it afresh every time.
    """
    steps = options.token_warmup_step
    if 0 < steps < 1:
        if max_train_steps < 1:
            raise ValueError(
                f"token_warmup_step={steps} is a fraction of max_train_steps, but max_train_steps={max_train_steps}"
            )
        return math.floor(steps * max_train_steps)
    return steps


def _warmup_token_count(n_flex: int, options: CaptionOptions, step: int, warmup_steps: float) -> int:
    """How many flexible tokens (from the front, before shuffling) token warm-up keeps at `step` (kohya's formula)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return n_flex
    minimum = options.token_warmup_min
    # floor(step * (n - min) / warmup) + min, multiplying first so there is a single rounding.
    count = math.floor(step * (n_flex - minimum) / warmup_steps) + minimum
    return max(0, min(n_flex, count))


def _split_fixed_flex(text: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Split into (fixed head, flexible, fixed tail) tokens.

    With a keep_tokens_separator marker in the text: before the first marker is the head, after a second
    marker is the tail (keep_tokens is then ignored, as in kohya). Further markers inside the tail act as
    caption separators (FIX: kohya left them in the prompt). Otherwise the first keep_tokens tokens are
    the head and there is no tail.
    """
    sep = options.caption_separator
    marker = options.keep_tokens_separator
    if marker and marker in text:
        head, rest = text.split(marker, 1)
        flex, tail = rest.split(marker, 1) if marker in rest else (rest, "")
        tail = tail.replace(marker, sep)
        return _split_tokens(head, sep), _split_tokens(flex, sep), _split_tokens(tail, sep)
    tokens = _split_tokens(text, sep)
    return tokens[: options.keep_tokens], tokens[options.keep_tokens :], []


def _is_dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Whole-caption dropout: by rate (one rng draw, only when the rate is > 0), or every N-th epoch."""
    by_rate = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every_n = options.caption_dropout_every_n_epochs
    return by_rate or (every_n > 0 and epoch % every_n == 0)


def process_caption(
    text: str,
    options: CaptionOptions,
    rng: random.Random,
    epoch: int,
    step: int,
    max_train_steps: int,
) -> str:
    """The prompt for one draw of a sample whose (merged) caption text is `text`.

    `epoch` counts from 1 (it decides every-N-epoch dropout); `step` is the global optimizer step from 0
    and `max_train_steps` the planned total (both for token warm-up). See the module docstring for the order.
    """
    every_n = options.caption_dropout_every_n_epochs
    if every_n > 0 and epoch < 1:
        # epoch 0 % N == 0 would silently drop every caption.
        raise ValueError(f"epoch counts from 1 (caption_dropout_every_n_epochs={every_n}), got epoch={epoch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")

    if _is_dropped(options, rng, epoch):
        return ""

    # FIX: the line is picked before prefix/suffix are added. kohya added them to the whole multi-line text
    # first, so only the first line got the prefix and the suffix was lost unless the last line was picked.
    lines = _nonempty_lines(text)
    if not lines:
        line = ""
    elif options.enable_wildcard and len(lines) > 1:
        line = rng.choice(lines)
    else:
        line = lines[0]
    line = " ".join(part for part in (options.caption_prefix, line, options.caption_suffix) if part)

    if options.enable_wildcard:
        line = expand_wildcards(line, rng)

    sep = options.caption_separator
    marker = options.keep_tokens_separator
    warmup_on = options.token_warmup_step > 0
    tokenise = options.shuffle_caption or warmup_on or options.caption_tag_dropout_rate > 0
    # FIX: a marker is removed even when nothing is shuffled/warmed/dropped (kohya left "|||" in the prompt).
    if tokenise or (marker and marker in line):
        head, flex, tail = _split_fixed_flex(line, options)
        if warmup_on:
            keep = _warmup_token_count(len(flex), options, step, warmup_step_count(options, max_train_steps))
            flex = flex[:keep]
        if options.shuffle_caption:
            rng.shuffle(flex)
        if options.caption_tag_dropout_rate > 0:
            flex = [token for token in flex if rng.random() >= options.caption_tag_dropout_rate]
        line = token_joiner(sep).join(head + flex + tail)

    if options.secondary_separator:
        line = line.replace(options.secondary_separator, sep)
    return line


def build_prompt(
    caption: str | None,
    tags: str | None,
    options: CaptionOptions,
    rng: random.Random,
    epoch: int,
    step: int,
    max_train_steps: int,
) -> str:
    """Merge caption and tags per `options`, then process: the one call a dataset makes per draw."""
    text = merge_caption_and_tags(
        caption, tags, options.caption_separator, options.caption_tag_mode, rng,
        enable_wildcard=options.enable_wildcard,
    )
    return process_caption(text, options, rng, epoch, step, max_train_steps)


def is_caption_random(options: CaptionOptions, text: str | None = None) -> bool:
    """Whether the prompt can differ between draws (so text-encoder outputs must not be cached).

    Random: shuffle, token warm-up (depends on the step), tag dropout, caption dropout (rate or every N
    epochs), caption_tag_mode "random", and wildcards. Given the merged caption `text`, wildcards count
    only if they matter for it: several non-empty lines, or a `{a|b}` group (in the text, prefix or suffix).
    Without `text`, enable_wildcard alone answers True. kohya's check missed wildcards and dropout-by-epoch.
    """
    if (
        options.shuffle_caption
        or options.token_warmup_step > 0
        or options.caption_tag_dropout_rate > 0
        or options.caption_dropout_rate > 0
        or options.caption_dropout_every_n_epochs > 0
        or options.caption_tag_mode == "random"
    ):
        return True
    if not options.enable_wildcard:
        return False
    if text is None:
        return True
    if len(_nonempty_lines(text)) > 1:
        return True
    full = " ".join(part for part in (options.caption_prefix, text, options.caption_suffix) if part)
    return _has_wildcard_choice(full)
