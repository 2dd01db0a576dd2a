"""A1111 attention syntax in captions (kohya's ``--weighted_captions``): text -> (piece, weight) -> per-token weights.

Syntax, as kohya's ``parse_prompt_attention`` (itself A1111's) reads it:

    (text)        weight x 1.1            [text]       weight / 1.1
    (text:1.3)    weight x 1.3            nesting multiplies: ((text)) = 1.1 * 1.1
    \\( \\) \\[ \\] \\\\  the literal character   an unclosed ( or [ applies to the end of the text
    a ) ] or (:1.3) with nothing open is plain text

A1111's ``BREAK`` keyword is plain text here, as in kohya. One deliberate difference: a weight that is not a
number (``(a:1.2.3)``, ``(a:.)``) makes kohya stop training with a ValueError; here that ``:1.2.3)`` is kept
as plain text, so a stray caption cannot end a run.

Pure Python: parsing needs no torch; ``token_weights`` needs only a tokenizer that is callable like
transformers' (``tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]``; ``verbose``
silences the "longer than 77" notice, as pieces are cut to ``max_tokens`` here).
"""

from __future__ import annotations

import re

from library.toml_values import is_number

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One alternative per lexeme, tried in this order: escapes, a lone backslash, openers, ":weight)", closers,
# a run of ordinary text, and a ":" that does not start a weight.
_LEXEME = re.compile(
    r"""
    \\[()\[\]\\]            # escaped bracket or backslash
    | \\                    # a lone backslash (dropped)
    | \( | \[
    | :([+-]?[.\d]+)\)      # ":1.3)" closes a round bracket with that weight
    | \) | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as (piece, weight) pairs, neighbours with equal weights merged; ``[("", 1.0)]`` for no text.

    >>> parse_prompt_attention("a (red:1.3) cat")
    [('a ', 1.0), ('red', 1.3), (' cat', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []  # index into pieces where each open bracket starts
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _LEXEME.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            pieces.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            round_open.append(len(pieces))
        elif lexeme == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open and is_number(weight):
            multiply_from(round_open.pop(), float(weight))
        elif lexeme == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif lexeme == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            pieces.append([lexeme, 1.0])
    for start in round_open:  # A1111 closes unbalanced brackets at the end of the text
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for piece, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def token_weights(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """Caption token ids (no BOS/EOS) and one weight per token, at most ``max_tokens`` of each.

    Every piece is tokenized on its own, as kohya does, so a word split by brackets (``(red)dish``) becomes
    the tokens of its parts, and every token of a multi-token word carries the word's weight.
    """
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        piece_ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"] if piece else []
        ids.extend(piece_ids)
        weights.extend([weight] * len(piece_ids))
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens], weights[:max_tokens]
