"""library/config.py: the shared parser groups and the validated --config_file / --output_config."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import pytest
import toml

from library.cli import config
from library.cli.data_args import add_dataset_arguments
from library.cli.model_args import add_model_arguments
from library.cli.training_args import DEFAULT_LEARNING_RATE, add_saving_arguments, add_training_arguments


def make_parser() -> config.TrainingArgumentParser:
    parser = config.build_parser(
        "test script",
        add_model_arguments,
        add_dataset_arguments,
        functools.partial(add_training_arguments, default_learning_rate=1e-4),
        add_saving_arguments,
    )
    extra = parser.add_argument_group("logging secrets")
    extra.add_argument("--wandb_api_key", type=str, default=None)
    extra.add_argument("--huggingface_token", type=str, default=None)
    parser.add_argument("--network_dim", type=int, default=None)  # a script-level flag, no group
    return parser


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    return config.parse_args(parser or make_parser(), argv)


def parse_error(argv: list[str], capsys: pytest.CaptureFixture[str],
                parser: argparse.ArgumentParser | None = None) -> str:
    """Run a parse that must fail; return the error line argparse printed."""
    with pytest.raises(SystemExit) as exc:
        parse(argv, parser)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    return err.split("error:", 1)[1].strip()


# ---------------------------------------------------------------- defaults and groups


def test_defaults_match_kohya() -> None:
    args = parse([])
    assert args.max_train_steps == 1600
    assert args.learning_rate == 1e-4  # the script-given default
    assert args.train_batch_size == 1 and args.max_data_loader_n_workers == 8
    assert (args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) == (256, 1024, 64)
    assert args.caption_extension == ".caption" and args.caption_separator == ","
    assert args.mixed_precision == "no" and args.max_grad_norm == 1.0
    assert args.optimizer_type == "AdamW" and args.lr_scheduler == "constant"
    assert args.dynamo_backend == "inductor"
    assert args.max_token_length is None and args.family is None
    assert args.config_file is None and args.output_config is None


def test_default_learning_rate_without_override() -> None:
    parser = config.build_parser("x", add_training_arguments)
    assert config.parse_args(parser, []).learning_rate == DEFAULT_LEARNING_RATE


def test_saving_formats_are_a_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    lora = config.build_parser("lora", functools.partial(
        add_saving_arguments, model_formats=("ckpt", "pt", "safetensors"),
        default_model_format="safetensors"))
    assert config.parse_args(lora, []).save_model_as == "safetensors"
    assert config.parse_args(lora, ["--save_model_as", "pt"]).save_model_as == "pt"
    with pytest.raises(SystemExit):
        config.parse_args(lora, ["--save_model_as", "diffusers"])
    assert "invalid choice" in capsys.readouterr().err


def test_parsers_do_not_share_validators() -> None:
    a = config.build_parser("a", add_training_arguments)
    b = config.build_parser("b", add_dataset_arguments)
    assert len(a.validators) == 2 and len(b.validators) == 1 and not set(a.validators) & set(b.validators)


# ---------------------------------------------------------------- precedence and flattening


def test_precedence_cli_over_file_over_default(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'learning_rate = 3e-4\nmax_train_steps = 500\noutput_name = "from_file"\n')
    args = parse(["--config_file", str(cfg), "--max_train_steps", "100"])
    assert args.max_train_steps == 100  # CLI
    assert args.learning_rate == 3e-4 and args.output_name == "from_file"  # file
    assert args.train_batch_size == 1  # default


def test_explicit_cli_value_equal_to_default_beats_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'max_train_steps = 500\nmixed_precision = "bf16"\n')
    args = parse(["--config_file", str(cfg), "--max_train_steps", "1600", "--mixed_precision", "no"])
    assert args.max_train_steps == 1600 and args.mixed_precision == "no"


def test_cli_flag_and_equals_syntax_beat_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'optimizer_args = ["weight_decay=0.1"]\nseed = 1\n')
    args = parse([f"--config_file={cfg}", "--optimizer_args", "a=1", "b=2", "--seed=7"])
    assert args.optimizer_args == ["a=1", "b=2"] and args.seed == 7


def test_nested_tables_are_flattened(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
seed = 42
[model]
pretrained_model_name_or_path = "/models/base.safetensors"
v2 = true
[training]
learning_rate = 1e-5
[training.optimizer]
optimizer_type = "Lion"
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
""")
    args = parse(["--config_file", str(cfg)])
    assert args.seed == 42
    assert args.pretrained_model_name_or_path == "/models/base.safetensors" and args.v2 is True
    assert args.learning_rate == 1e-5 and args.optimizer_type == "Lion"
    assert args.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.99"]


def test_path_without_toml_suffix(tmp_path: Path) -> None:
    write(tmp_path, "seed = 3\n", name="run.toml")
    assert parse(["--config_file", str(tmp_path / "run")]).seed == 3


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = parse_error(["--config_file", str(tmp_path / "nope")], capsys)
    assert "nope" in msg and "not found" in msg and "nope.toml" in msg


def test_invalid_toml_syntax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "seed = = 3\n")
    msg = parse_error(["--config_file", str(cfg)], capsys)
    assert str(cfg) in msg and "not valid TOML" in msg


# ---------------------------------------------------------------- value conversion and validation


def test_strings_and_numbers_convert_like_the_command_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, """
max_train_steps = "5"
max_grad_norm = 2
resolution = 512
lr_warmup_steps = 0.1
optimizer_args = "weight_decay=0.1"
enable_bucket = true
""")
    args = parse(["--config_file", str(cfg)])
    assert args.max_train_steps == 5 and isinstance(args.max_train_steps, int)
    assert args.max_grad_norm == 2.0 and isinstance(args.max_grad_norm, float)
    assert args.resolution == "512" and args.lr_warmup_steps == "0.1"
    assert args.optimizer_args == ["weight_decay=0.1"]  # scalar -> one-element list for nargs="*"
    assert args.enable_bucket is True


@pytest.mark.parametrize("line, key, hint", [
    ('max_train_steps = "abc"', "max_train_steps", "integer"),
    ("train_batch_size = 1.5", "train_batch_size", "integer"),
    ('learning_rate = "fast"', "learning_rate", "number"),
    ("learning_rate = true", "learning_rate", "boolean"),
    ('enable_bucket = "yes"', "enable_bucket", "true or false"),
    ("enable_bucket = 2", "enable_bucket", "true or false"),  # 0 and 1 are booleans (kohya_ss GUI files)
    ('mixed_precision = "fp8"', "mixed_precision", '"no", "fp16", "bf16"'),
    ('family = "sd3"', "family", '"sd15", "sd21", "sdxl"'),
    ("output_dir = [\"a\", \"b\"]", "output_dir", "single value"),
    ("optimizer_args = [true, false]", "optimizer_args", "boolean"),
])
def test_type_errors_name_file_key_and_value(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             line: str, key: str, hint: str) -> None:
    cfg = write(tmp_path, f"[section]\n{line}\n")
    msg = parse_error(["--config_file", str(cfg)], capsys)
    assert str(cfg) in msg and f"{key} = " in msg and hint in msg


def test_all_invalid_values_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, 'seed = "x"\nclip_skip = "y"\n')
    msg = parse_error(["--config_file", str(cfg)], capsys)
    assert 'seed = "x"' in msg and 'clip_skip = "y"' in msg and "invalid values" in msg


def test_custom_type_and_argument_type_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def ratio(text: str) -> float:
        value = float(text)
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]")
        return value

    def parser() -> config.TrainingArgumentParser:
        p = config.build_parser("x")
        p.add_argument("--ratio", type=ratio, default=None)
        p.add_argument("--no_half_vae_off", dest="half_vae", action="store_false")
        p.add_argument("--verbose", action="count", default=0)
        return p

    ok = write(tmp_path, "ratio = 0.25\nhalf_vae = false\nverbose = 2\n", name="ok.toml")
    args = config.parse_args(parser(), ["--config_file", str(ok)])
    assert args.ratio == 0.25 and args.half_vae is False and args.verbose == 2
    bad = write(tmp_path, "ratio = 3\n", name="bad.toml")
    msg = parse_error(["--config_file", str(bad)], capsys, parser())
    assert "ratio = 3" in msg and "outside [0, 1]" in msg and str(bad) in msg


def test_unknown_keys_listed_with_suggestions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "learning_rat = 1e-4\n[x]\ntrain_batch_sise = 2\nqqq_zzz = 1\n")
    msg = parse_error(["--config_file", str(cfg)], capsys)
    assert str(cfg) in msg
    assert "learning_rat (did you mean --learning_rate?)" in msg
    assert "train_batch_sise (did you mean --train_batch_size?)" in msg
    assert "qqq_zzz" in msg and "qqq_zzz (" not in msg


def test_config_machinery_keys_rejected_in_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, 'config_file = "other.toml"\n')
    msg = parse_error(["--config_file", str(cfg)], capsys)
    assert "config_file cannot be set inside a config file" in msg


def test_duplicate_key_in_two_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "[training]\nseed = 1\n[other.deep]\nseed = 2\n")
    msg = parse_error(["--config_file", str(cfg)], capsys)
    assert "'seed'" in msg and "[training]" in msg and "[other.deep]" in msg and str(cfg) in msg


def test_same_value_in_two_tables_is_fine(tmp_path: Path) -> None:
    cfg = write(tmp_path, "seed = 1\n[training]\nseed = 1\n")
    assert parse(["--config_file", str(cfg)]).seed == 1


# ---------------------------------------------------------------- cross-flag validators


@pytest.mark.parametrize("value", ["75", "150", "225", "300", "750"])
def test_max_token_length_multiples_of_75(value: str) -> None:
    assert parse(["--max_token_length", value]).max_token_length == int(value)


@pytest.mark.parametrize("value", ["100", "0", "-75", "76"])
def test_max_token_length_rejected(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    msg = parse_error(["--max_token_length", value], capsys)
    assert "--max_token_length must be a positive multiple of 75" in msg and value in msg


def test_validator_error_names_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "max_token_length = 100\n")
    msg = parse_error(["--config_file", str(cfg)], capsys)
    assert "multiple of 75" in msg and "max_token_length = 100" in msg and str(cfg) in msg
    # The same file with a valid CLI override passes: the CLI value is what gets validated.
    assert parse(["--config_file", str(cfg), "--max_token_length", "225"]).max_token_length == 225


@pytest.mark.parametrize("argv, expected", [
    (["--full_fp16", "--full_bf16", "--mixed_precision", "fp16"], "exclusive"),
    (["--full_fp16", "--mixed_precision", "bf16"], "--full_fp16 needs --mixed_precision fp16"),
    (["--full_bf16"], "--full_bf16 needs --mixed_precision bf16"),
])
def test_cross_flag_rules(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert expected in parse_error(argv, capsys)


def test_cross_flag_rules_see_file_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "[speed]\nfull_bf16 = true\n")
    msg = parse_error(["--config_file", str(cfg), "--mixed_precision", "fp16"], capsys)
    assert "--full_bf16 needs --mixed_precision bf16" in msg and "full_bf16 = true" in msg and str(cfg) in msg
    assert parse(["--full_bf16", "--mixed_precision", "bf16", "--sdpa"]).full_bf16 is True


def test_custom_validator_registered_by_a_group(capsys: pytest.CaptureFixture[str]) -> None:
    def add_network(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--network_alpha", type=float, default=1.0)
        config.add_validator(parser, lambda a: "--network_alpha must be > 0" if a.network_alpha <= 0 else None)

    parser = config.build_parser("x", add_network)
    assert config.parse_args(parser, ["--network_alpha", "4"]).network_alpha == 4.0
    assert "--network_alpha must be > 0" in parse_error(["--network_alpha", "0"], capsys, parser)


def test_add_validator_on_plain_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    config.add_config_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        config.parse_args(parser, ["--max_token_length", "100"])
    assert exc.value.code == 2
    assert "multiple of 75" in capsys.readouterr().err


# ---------------------------------------------------------------- --output_config


def output_config_roundtrip_args(tmp_path: Path) -> tuple[Path, list[str]]:
    base = write(tmp_path, """
[model]
pretrained_model_name_or_path = 'C:\\models\\base "v1".safetensors'
max_token_length = 225
[training]
learning_rate = 3e-4
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
wandb_api_key = "sk-secret"
""", name="base.toml")
    cli = ["--config_file", str(base), "--resolution", "512,768", "--enable_bucket", "--keep_tokens", "1",
           "--mixed_precision", "bf16", "--full_bf16", "--seed", "7", "--network_dim", "16",
           "--huggingface_token", "hf_secret", "--lr_warmup_steps", "0.1"]
    return base, cli


def test_output_config_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, cli = output_config_roundtrip_args(tmp_path)
    out = tmp_path / "out.toml"
    with pytest.raises(SystemExit) as exc:
        parse([*cli, "--output_config", str(out)])
    assert exc.value.code == 0
    assert str(out) in capsys.readouterr().out

    written = out.read_text(encoding="utf-8")
    assert "sk-secret" not in written and "hf_secret" not in written
    document = toml.loads(written)
    keys = {k for table in document.values() if isinstance(table, dict) for k in table} | set(document)
    assert not keys & {"config_file", "output_config", "wandb_api_key", "huggingface_token"}
    assert document["network_dim"] == 16  # ungrouped flags stay at the top level
    assert document["training"]["learning_rate"] == 3e-4
    assert document["model"]["max_token_length"] == 225  # "token" in a name is not a secret
    assert "max_train_steps" not in document["training"]  # defaults are not written

    expected = vars(parse([a for a in cli if a not in ("--huggingface_token", "hf_secret")]))
    expected.update(wandb_api_key=None, config_file=str(out))
    assert vars(parse(["--config_file", str(out)])) == expected


def test_output_config_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write(tmp_path, "# precious\n", name="existing.toml")
    msg = parse_error(["--seed", "1", "--output_config", str(out)], capsys)
    assert "will not overwrite" in msg and str(out) in msg
    assert out.read_text(encoding="utf-8") == "# precious\n"


def test_output_config_defaults_to_config_file_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "new_run"  # kohya appends .toml
    with pytest.raises(SystemExit) as exc:
        parse(["--config_file", str(target), "--output_config", "--seed", "5", "--v2"])
    assert exc.value.code == 0
    assert toml.loads((tmp_path / "new_run.toml").read_text(encoding="utf-8")) == {
        "model": {"v2": True}, "training": {"seed": 5}}
    capsys.readouterr()
    # Running the same command again would overwrite the file it just wrote: refused.
    msg = parse_error(["--config_file", str(target), "--output_config", "--seed", "6"], capsys)
    assert "will not overwrite" in msg and "new_run.toml" in msg


def test_output_config_needs_a_destination(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--output_config needs a PATH" in parse_error(["--output_config"], capsys)


def test_output_config_runs_validators_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.toml"
    assert "exclusive" in parse_error(["--full_fp16", "--full_bf16", "--mixed_precision", "fp16",
                                       "--output_config", str(out)], capsys)
    assert not out.exists()
