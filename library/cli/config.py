"""Command-line arguments shared by the training scripts, and the `--config_file` TOML merged under them.

Each script builds one parser from the `add_*_arguments` groups below (kohya's flag names, types and
defaults, because our users bring their command lines and TOML files with them) and calls `parse_args`.

`--config_file x.toml` behaves like kohya's: tables are flattened, keys are argparse dest names, and the
precedence is explicit CLI > file > defaults. Unlike kohya we validate every file value exactly as argparse
would validate the same text on the command line (type, choices, booleans, lists), reject unknown keys with a
suggestion, and reject a key given two different values in two tables, so a typo fails at start-up instead of
silently training with a default. Keys only the kohya_ss GUI writes (sd-scripts drops them) are the exception:
they are named once in a note and ignored, so GUI configs run unchanged.

Cross-flag rules ("pick one attention backend") are validators registered on the parser by the group that
owns the flags; `parse_args` runs them after the merge, so they see the values from the file too.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from library import toml_values
from library.toml_values import BadValue, check_scalar, value_repr

from library.io import is_secret

# A validator looks at the merged namespace and returns an error message (naming the flags involved as
# `--flag`) or None when the values are fine.
Validator = Callable[[argparse.Namespace], str | None]


# `--output_config` given without a PATH: write to the --config_file path (kohya's behaviour).
OUTPUT_TO_CONFIG_FILE = ""
# Keys that only steer the config machinery itself; they are neither read from nor written to a file.
_CONFIG_DESTS = frozenset({"config_file", "output_config"})

# Keys the kohya_ss GUI (bmaltais/kohya_ss, kohya_gui/*_gui.py `config_toml_data`, v24-v26) writes into the TOML
# it passes with --config_file, and that sd-scripts' SD/SDXL training scripts never read (kohya builds its
# namespace straight from the file, so they are silently dropped there). Accepted and named once at start-up so
# that GUI configs run unchanged; a key that is one of our flags is read as that flag instead.
KOHYA_SS_GUI_ONLY_KEYS = frozenset({
    "epoch",  # the GUI's epoch count, from which it computes max_train_steps; max_train_epochs is the flag
    "noise_offset_type",  # "Original"/"Multires": the chosen noise_offset or multires_noise_* keys are written too
    "use_wandb",  # kohya_ss v24.0; the flag is log_with = "wandb"
    "lowvram",  # kohya_ss v25 wrote it for a flag sd-scripts no longer has
    "train_inpainting",  # kohya_ss v26 checkbox; no sd-scripts training script reads it
    "stop_text_encoder_training",  # train_db.py's flag; the LoRA and SDXL scripts do not read it
    "no_token_padding",  # train_db.py's flag, written by the DreamBooth tab for SDXL too
    # train_db.py's / fine_tune.py's text-encoder learning rate for SD1.x/SD2.x full fine-tuning, which the GUI's
    # DreamBooth and fine-tune tabs write for SD1.5 only. Our fine_tune.py reads it as its flag; kohya's
    # train_network.py and sdxl_train.py do not read it (their flags: text_encoder_lr, learning_rate_te1/2).
    "learning_rate_te",
})

# Keys the GUI once wrote that sd-scripts silently dropped although the user asked for something: refused
# with where the setting really goes (LoRA+ was a no-op through the GUI for a year, kohya_ss #3520).
_MISPLACED_KEYS = {
    "loraplus_lr_ratio": 'a network_args entry: network_args = ["loraplus_lr_ratio=16"]',
    "loraplus_unet_lr_ratio": 'a network_args entry: network_args = ["loraplus_unet_lr_ratio=16"]',
    "loraplus_text_encoder_lr_ratio": 'a network_args entry: network_args = ["loraplus_text_encoder_lr_ratio=4"]',
    "lora_network_weights": "--network_weights",
}


class TrainingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that also carries the cross-flag validators its argument groups registered.

    Keeping the validators on the parser (not in a module-level registry) lets two scripts, or two tests,
    build different parsers in one process without seeing each other's rules.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validators: list[Validator] = []

    def error(self, message: str) -> Any:
        """One line naming the flag, not argparse's full usage: these parsers have hundreds of flags, and the
        usage dump buried the one line that mattered."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_validator(parser: argparse.ArgumentParser, validator: Validator) -> None:
    """Register a cross-flag rule that `parse_args` checks after merging the config file and the CLI.

    Works on a plain ArgumentParser too (the list is attached on first use), so a group function can be
    reused on any parser.
    """
    validators = getattr(parser, "validators", None)
    if validators is None:
        validators = []
        parser.validators = validators  # type: ignore[attr-defined]
    validators.append(validator)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size), with the same message on the CLI and in a file."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a step, a pixel tolerance)."""
    return _int_at_least(text, 0)


FLOAT32_MAX = 3.4028234663852886e38


def learning_rate(text: str) -> float:
    """argparse type: a finite learning rate >= 0 that fits in float32.

    Optimizers keep the rate next to fp32 weights: 1e39 becomes inf there and every weight NaN at step 1, and a
    negative rate climbs the loss; both are refused before any work instead.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value != value or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 freezes), got {text}")
    if value > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text} overflows float32 (max 3.4e38); learning rates are usually "
                                         "1e-7 to 1e-3")
    return value


# --------------------------------------------------------------------------------------------------------
# Argument groups
# --------------------------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config_file` and `--output_config`; `build_parser` adds them to every parser."""
    group = parser.add_argument_group("config")
    group.add_argument("--config_file", type=str, default=None,
                       help="TOML file of arguments (keys are the flag names without '--'; '.toml' may be omitted). "
                            "Flags given on the command line win over the file.")
    group.add_argument("--output_config", type=str, nargs="?", const=OUTPUT_TO_CONFIG_FILE, default=None,
                       metavar="PATH",
                       help="write the effective non-default arguments as TOML to PATH (default: the "
                            "--config_file path) and exit; never overwrites an existing file")


def build_parser(description: str,
                 *group_adders: Callable[[argparse.ArgumentParser], None]) -> TrainingArgumentParser:
    """One parser for one script, composed of the shared groups plus the config-file flags.

    Script-specific flags can be added to the returned parser (ideally in a named argument group, so that
    `--output_config` files them under a table of that name).
    """
    parser = TrainingArgumentParser(description=description)
    for add in group_adders:
        add(parser)
    if "config_file" not in {action.dest for action in parser._actions}:
        add_config_arguments(parser)
    return parser


# --------------------------------------------------------------------------------------------------------
# Parsing with a config file
# --------------------------------------------------------------------------------------------------------


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) with the `--config_file` values merged under it, then validate.

    Precedence is explicit CLI > file > argparse defaults; a flag typed on the command line wins even when
    it equals its default. With `--output_config` the merged non-default values are written as TOML and
    the process exits with status 0. Every problem ends in `parser.error` (exit status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # First pass: the command line alone, to validate it and learn --config_file / --output_config.
    cli = parser.parse_args(argv)
    config_file: str | None = getattr(cli, "config_file", None)
    output_config: str | None = getattr(cli, "output_config", None)

    output_path = None
    if output_config is not None:
        output_path = _output_path(parser, output_config, config_file)

    file_values: dict[str, Any] = {}
    config_path = None
    # `--output_config` without PATH writes to the --config_file path; kohya then treats that file as the
    # destination, not a source, so a missing file there is expected.
    if config_file is not None and output_config != OUTPUT_TO_CONFIG_FILE:
        config_path = _resolve_config_path(parser, config_file)
        file_values = _read_config_file(parser, config_path)

    # Second pass: argparse only fills defaults for attributes missing from the namespace, and every flag
    # on the command line overwrites its attribute, which gives exactly CLI > file > default.
    args = parser.parse_args(argv, namespace=argparse.Namespace(**file_values))

    for validator in getattr(parser, "validators", []):
        message = validator(args)
        if message:
            parser.error(_with_file_provenance(message, args, file_values, config_path))

    if output_path is not None:
        _write_output_config(parser, args, output_path)
        print(f"wrote the configuration to {output_path}")
        parser.exit(0)
    return args


def _resolve_config_path(parser: argparse.ArgumentParser, config_file: str) -> str:
    if os.path.isfile(config_file):
        return config_file
    if not config_file.endswith(".toml") and os.path.isfile(config_file + ".toml"):
        return config_file + ".toml"
    tried = "" if config_file.endswith(".toml") else f" (nor '{config_file}.toml')"
    parser.error(f"config file '{config_file}' not found{tried}: check the --config_file path")


def _output_path(parser: argparse.ArgumentParser, output_config: str, config_file: str | None) -> str:
    if output_config == OUTPUT_TO_CONFIG_FILE:
        if config_file is None:
            parser.error("--output_config needs a PATH or a --config_file to write to: "
                         "give --output_config PATH.toml")
        path = config_file if config_file.endswith(".toml") else config_file + ".toml"
    else:
        path = output_config
    if os.path.exists(path):
        parser.error(f"--output_config will not overwrite the existing file '{path}': "
                     "give a new path with --output_config PATH.toml or move the file away")
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        parser.error(f"--output_config cannot write '{path}': the folder '{directory}' does not exist")
    return path


def _read_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Load, flatten and validate a config file into {dest: value converted as argparse would}."""
    try:
        with open(path, encoding="utf-8") as f:
            document = toml_values.load(f)
    except toml_values.TomlDecodeError as e:
        parser.error(f"config file '{path}' is not valid TOML ({e}): fix the syntax")
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"config file '{path}' cannot be read ({e})")

    occurrences: dict[str, list[tuple[str, Any]]] = {}
    _flatten(document, "", occurrences)

    for key, places in occurrences.items():
        for (table_a, value_a), (table_b, value_b) in zip(places, places[1:]):
            if value_a != value_b:
                parser.error(f"config file '{path}': key '{key}' is set to {value_repr(value_a)} in "
                             f"{_table_name(table_a)} and to {value_repr(value_b)} in {_table_name(table_b)}; "
                             "keep only one")

    actions = _settable_actions(parser)
    machinery = sorted(k for k in occurrences if k in _CONFIG_DESTS)
    if machinery:
        parser.error(f"config file '{path}': {', '.join(machinery)} cannot be set inside a config file; "
                     "give it on the command line")
    gui_only = sorted(k for k in occurrences if k not in actions and k in KOHYA_SS_GUI_ONLY_KEYS)
    unknown = [k for k in occurrences if k not in actions and k not in _CONFIG_DESTS and k not in gui_only]
    if unknown:
        candidates = [d for d in actions if d not in _CONFIG_DESTS]
        described = []
        for key in unknown:
            if key in _MISPLACED_KEYS:
                described.append(f"{key} (sd-scripts ignores it; it belongs in {_MISPLACED_KEYS[key]})")
                continue
            close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"),
                                              [*candidates, *KOHYA_SS_GUI_ONLY_KEYS], n=1, cutoff=0.6)
            if close and close[0] in KOHYA_SS_GUI_ONLY_KEYS:
                described.append(f"{key} (did you mean {close[0]}, a kohya_ss GUI key that is ignored?)")
            else:
                described.append(f"{key} (did you mean --{close[0]}?)" if close else key)
        parser.error(f"config file '{path}' has unknown key{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(described)}: keys are the flag names without the leading '--', "
                     "fix or remove them")

    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, places in occurrences.items():
        if key in gui_only:
            continue
        raw = places[0][1]
        if _means_unset(actions[key], raw):
            continue
        try:
            values[key] = _convert(actions[key], raw)
        except BadValue as e:
            problems.append(f"{key} = {value_repr(raw)} {e}")
    if problems:
        many = len(problems) > 1
        parser.error(f"config file '{path}' has {'invalid values' if many else 'an invalid value'}: "
                     f"{'; '.join(problems)}; fix {'them' if many else 'it'} in the file")
    if gui_only:
        print(f"note: ignored kohya_ss GUI keys (sd-scripts ignores them too): {', '.join(gui_only)}")
    return values


def _means_unset(action: argparse.Action, raw: Any) -> bool:
    """An empty string for a single-valued option whose default is None: the value a GUI leaves in an unset path
    field, which kohya treats as unset (its `if args.vae:` checks), so the default applies here too."""
    return raw == "" and action.default is None and action.nargs in (None, "?")


def _flatten(table: dict[str, Any], table_path: str, out: dict[str, list[tuple[str, Any]]]) -> None:
    """Collect every non-table value with the table it sits in; section names carry no meaning (kohya)."""
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, f"{table_path}.{key}" if table_path else key, out)
        else:
            out.setdefault(key, []).append((table_path, value))


def _table_name(table_path: str) -> str:
    return f"[{table_path}]" if table_path else "the top level"


def _settable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> the action that sets it, for every action a config file may set (not --help/--version)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest == argparse.SUPPRESS:
            continue
        actions.setdefault(action.dest, action)
    return actions


def _convert(action: argparse.Action, raw: Any) -> Any:
    """Turn a TOML value into what argparse would store for the same value typed on the command line."""
    if action.nargs == 0:  # flags: store_true/false/const, count, BooleanOptionalAction
        if isinstance(action, argparse._CountAction):
            if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
                return raw
            raise BadValue("is not a count: write a non-negative integer")
        if isinstance(action.const, bool) or isinstance(action, argparse.BooleanOptionalAction):
            if isinstance(raw, bool):
                return raw
            if type(raw) is int and raw in (0, 1):  # the kohya_ss GUI writes int(checkbox) for some flags
                return bool(raw)
            raise BadValue("is not a boolean: write true or false (or 1 or 0), without quotes")
        if raw == action.const or raw == action.default:
            return raw
        raise BadValue(f"must be {value_repr(action.const)} (set) or {value_repr(action.default)} (unset)")

    appends = isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
    if appends or action.nargs not in (None, "?"):  # the command line would give a list
        if isinstance(raw, list):
            items = raw
        elif appends or action.nargs in ("*", "+", 1):
            items = [raw]  # a lone value is a one-element list
        else:
            raise BadValue(f"is not an array: write {action.nargs} values as [ ... ]")
        if action.nargs == "+" and not items:
            raise BadValue("is an empty array: give at least one value")
        if isinstance(action.nargs, int) and not appends and len(items) != action.nargs:
            raise BadValue(f"has {len(items)} values: give exactly {action.nargs}")
        return [_convert_scalar(action, item) for item in items]

    return _convert_scalar(action, raw)


def _convert_scalar(action: argparse.Action, raw: Any) -> Any:
    expected = _expected(action)
    check_scalar(raw, expected)  # not a table, array, boolean or TOML date
    if action.type is int and isinstance(raw, float):  # int("1.5") fails on the command line too
        raise BadValue(f"is not {expected}")
    type_fn = action.type
    try:
        if type_fn is None or type_fn is str:
            value = raw if isinstance(raw, str) else str(raw)
        elif type_fn is int:
            value = raw if isinstance(raw, int) else int(raw)
        elif type_fn is float:
            value = float(raw)
        else:
            value = type_fn(raw if isinstance(raw, str) else str(raw))
    except argparse.ArgumentTypeError as e:
        raise BadValue(f"is invalid: {e}") from None
    except (TypeError, ValueError):
        raise BadValue(f"is not {expected}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(value_repr(c) for c in action.choices)
        raise BadValue(f"is not one of the allowed values: {choices}")
    return value


def _expected(action: argparse.Action) -> str:
    type_fn = action.type
    if type_fn is None or type_fn is str:
        return "a string"
    if type_fn is int:
        return "an integer"
    if type_fn is float:
        return "a number"
    return f"a value accepted by {getattr(type_fn, '__name__', repr(type_fn))}"


def _with_file_provenance(message: str, args: argparse.Namespace, file_values: dict[str, Any],
                          config_path: str | None) -> str:
    """Append where a flag named in a validator's message came from, when that was the config file."""
    if config_path is None:
        return message
    named = dict.fromkeys(re.findall(r"--(\w+)", message))
    from_file = [d for d in named if d in file_values and getattr(args, d, None) == file_values[d]]
    if not from_file:
        return message
    flags = ", ".join(f"{d} = {value_repr(file_values[d])}" for d in from_file)
    return f"{message} ({flags} comes from config file '{config_path}')"


# --------------------------------------------------------------------------------------------------------
# --output_config
# --------------------------------------------------------------------------------------------------------


def _effective_default(action: argparse.Action) -> Any:
    """The value argparse stores when the flag is absent (string defaults go through `type`)."""
    default = action.default
    if isinstance(default, str) and action.type not in (None, str) and callable(action.type):
        try:
            return action.type(default)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            return default
    return default


def effective_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The non-default, non-secret values of `args`, as {table: {dest: value}} ("" = top level).

    Tables are the argument-group titles, purely for readability: reading the file back ignores them.
    """
    group_of: dict[str, str] = {}
    for group in parser._action_groups:
        title = re.sub(r"\W+", "_", (group.title or "").strip().lower()).strip("_")
        if title in ("options", "optional_arguments", "positional_arguments"):
            title = ""
        for action in group._group_actions:
            group_of.setdefault(action.dest, title)

    tables: dict[str, dict[str, Any]] = {}
    for dest, action in _settable_actions(parser).items():
        if dest in _CONFIG_DESTS or is_secret(dest) or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None or value == _effective_default(action):
            continue
        tables.setdefault(group_of.get(dest, ""), {})[dest] = _to_toml_value(value)
    return tables


def _to_toml_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_toml_value(v) for v in value]
    return str(value)  # Path and other custom types: the text the command line would carry


def _write_output_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str) -> None:
    tables = effective_config(parser, args)
    document: dict[str, Any] = dict(tables.pop("", {}))
    document.update(tables)
    text = ("# Written by --output_config: the arguments that differ from the defaults.\n"
            "# Use it with --config_file; flags on the command line override it.\n\n" + toml_values.dumps(document))
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": never overwrite, even in a race
            f.write(text)
    except FileExistsError:
        parser.error(f"--output_config will not overwrite the existing file '{path}': give a new path")
    except OSError as e:
        parser.error(f"--output_config cannot write '{path}' ({e})")
