"""TOML in and out, and the checks every value read from a config file gets.

One TOML library for the whole project: `toml` (pinned in requirements.txt), because `--output_config` also
writes TOML, which the standard library's `tomllib` cannot. Three kinds of file go through it: `--config_file`
(library.cli.config checks each value against its flag's argparse action), `--dataset_config` (library.data
checks each key against its kind) and `--sample_prompts` files.

The checks below are shared by both config readers so that one wrong value reads the same in either file:
every message completes a "<key> = <value> ..." line, e.g. ``batch_size = "4" is a string: expected an integer``.
"""

from __future__ import annotations

import json
from typing import IO, Any, NoReturn

import toml

TomlDecodeError = toml.TomlDecodeError


def loads(text: str) -> dict[str, Any]:
    """The document in ``text``; raises `TomlDecodeError` for bad syntax."""
    return toml.loads(text)


def load(file: IO[str]) -> dict[str, Any]:
    """The document in an open text file; raises `TomlDecodeError` for bad syntax."""
    return toml.load(file)


def dumps(document: dict[str, Any]) -> str:
    """``document`` as TOML text (top-level keys first, then one table per nested dict)."""
    return toml.dumps(document)


class BadValue(ValueError):
    """A config-file value of the wrong shape or type; the message completes '<key> = <value> ...'."""


def value_repr(value: Any) -> str:
    """A value as the user wrote it in the file, for messages (strings quoted, arrays in brackets)."""
    return json.dumps(value, default=str)


def describe(value: Any) -> str:
    """What kind of TOML/JSON value ``value`` is, in words: "a boolean", "an array", "a datetime", ..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def reject(raw: Any, expected: str) -> NoReturn:
    """Raise BadValue: "is <what raw is>: expected <expected>"."""
    raise BadValue(f"is {describe(raw)}: expected {expected}")


def check_scalar(raw: Any, expected: str) -> str | int | float:
    """``raw`` when it is one string, integer or decimal number; a table, array, boolean or date is rejected."""
    if isinstance(raw, list):
        reject(raw, f"a single value, {expected}")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        reject(raw, expected)
    return raw


def is_number(text: str) -> bool:
    """Whether ``text`` reads as a float (``"1.3"``, ``"-2"``, ``"1e-3"``): prompt weights, block-weight presets."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_kind(kind: str, raw: Any) -> Any:
    """``raw`` checked against a key's kind: "bool", "int", "float" (an integer is accepted) or "str"."""
    if kind == "bool":
        return raw if isinstance(raw, bool) else reject(raw, "true or false")
    if kind == "int":
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else reject(raw, "an integer")
    if kind == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        return reject(raw, "a number")
    if kind == "str":
        return raw if isinstance(raw, str) else reject(raw, "a string")
    raise ValueError(f"unknown value kind {kind!r}")
