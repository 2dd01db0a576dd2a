"""library/data/dataset_config*.py: the kohya dataset schema, the fallback chain, CLI synthesis and the error report."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import toml

from library.cli import config
from library.cli.data_args import add_dataset_arguments, dataset_flags_from_args
from library.cli.model_args import add_model_arguments
from library.cli.training_args import add_training_arguments
from library.data.dataset_config import DatasetConfig, DatasetConfigError, parse_resolution
from library.data.dataset_config_loading import DatasetFlags, load_dataset_configs

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "dataset_config_example.toml"


def make_args(*argv: str) -> DatasetFlags:
    """The dataset flags as the real parser gives them, so CLI defaults are the ones the scripts see."""
    parser = config.build_parser("test", add_model_arguments, add_dataset_arguments,
                                 add_training_arguments)
    return dataset_flags_from_args(config.parse_args(parser, list(argv)))


def folder(root: Path, *names: str) -> Path:
    """Create folders under root; return the last."""
    path = root
    for name in names:
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
    return path


def write(tmp_path: Path, text: str, name: str = "ds.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, *argv: str, support: set[str] | None = None) -> list[DatasetConfig]:
    return load_dataset_configs(make_args("--dataset_config", str(path), *argv), support)


def load_error(path: Path, *argv: str, support: set[str] | None = None) -> str:
    with pytest.raises(DatasetConfigError) as exc:
        load(path, *argv, support=support)
    return str(exc.value)


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the current directory with image folders a/, b/, c/, cond/ and meta.json, meta2.json."""
    monkeypatch.chdir(tmp_path)
    folder(tmp_path, "a", "b", "c", "cond")
    (tmp_path / "meta.json").write_text("{}", encoding="utf-8")
    (tmp_path / "meta2.json").write_text("{}", encoding="utf-8")
    return tmp_path


# ---------------------------------------------------------------- fallback chain


CHAIN_TOML = """
{general}
[[datasets]]
keep_tokens = 3
batch_size = 3
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 4
  [[datasets.subsets]]
  image_dir = "b"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
"""


def test_fallback_chain_subset_dataset_general_cli_default(dirs: Path) -> None:
    general = "[general]\nkeep_tokens = 2\nbatch_size = 2\n"
    cfg = write(dirs, CHAIN_TOML.format(general=general))
    first, second = load(cfg, "--keep_tokens", "1", "--train_batch_size", "5")
    assert [s.captions.keep_tokens for s in first.subsets] == [4, 3]  # subset, then dataset
    assert second.subsets[0].captions.keep_tokens == 2  # [general]
    assert (first.batch_size, second.batch_size) == (3, 2)

    cfg = write(dirs, CHAIN_TOML.format(general=""))
    _, second = load(cfg, "--keep_tokens", "1", "--train_batch_size", "5")
    assert second.subsets[0].captions.keep_tokens == 1 and second.batch_size == 5  # CLI
    _, second = load(cfg)
    assert second.subsets[0].captions.keep_tokens == 0 and second.batch_size == 1  # defaults


def test_cli_names_map_to_config_keys(dirs: Path) -> None:
    cfg = write(dirs, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    (dataset,) = load(cfg, "--resolution", "512,768", "--dataset_repeats", "7", "--caption_prefix", "photo of",
                      "--enable_bucket", "--caption_tag_mode", "tags_first", "--seed", "9", "--alpha_mask",
                      "--prior_loss_weight", "0.5")
    subset = dataset.subsets[0]
    assert dataset.resolution == (512, 768) and dataset.enable_bucket is True
    assert subset.num_repeats == 7 and subset.alpha_mask is True
    assert subset.captions.caption_prefix == "photo of" and subset.captions.caption_tag_mode == "tags_first"
    assert dataset.validation_seed == 9  # falls back to --seed, as in kohya
    assert dataset.prior_loss_weight == 0.5
    (dataset,) = load(cfg)
    assert dataset.resolution == (512, 512) and dataset.subsets[0].num_repeats == 1
    assert dataset.subsets[0].captions.keep_tokens_separator == ""  # the argparse default, i.e. off


def test_values_are_typed_and_paths_kept_relative(dirs: Path) -> None:
    cfg = write(dirs, """
[general]
caption_dropout_rate = 0      # an int where a float is expected is fine
token_warmup_step = 10
[[datasets]]
resolution = [640, 384]
  [[datasets.subsets]]
  image_dir = "a"
  class_tokens = "sks"
""")
    (dataset,) = load(cfg)
    subset = dataset.subsets[0]
    assert dataset.resolution == (640, 384)
    assert subset.image_dir == Path("a") and subset.image_dir.is_dir()
    assert isinstance(subset.captions.caption_dropout_rate, float)
    assert subset.captions.token_warmup_step == 10.0 and subset.class_tokens == "sks"
    assert subset.source == f"{cfg} [[datasets]] #1 [[datasets.subsets]] #1"
    assert dataset.source == f"{cfg} [[datasets]] #1"


def test_json_config(dirs: Path) -> None:
    cfg = write(dirs, json.dumps({"general": {"shuffle_caption": True, "validation_seed": None},
                                  "datasets": [{"subsets": [{"metadata_file": "meta.json", "image_dir": "a"}]}]}),
                name="ds.json")
    (dataset,) = load(cfg)
    assert dataset.kind == "finetuning" and dataset.subsets[0].captions.shuffle_caption is True
    assert dataset.subsets[0].metadata_file == Path("meta.json")


# ---------------------------------------------------------------- kinds


def test_kinds_detected_per_dataset(dirs: Path) -> None:
    cfg = write(dirs, """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "meta.json"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  conditioning_data_dir = "cond"
""")
    assert [d.kind for d in load(cfg)] == ["dreambooth", "finetuning", "controlnet"]


def test_mixed_kinds_in_one_dataset(dirs: Path) -> None:
    cfg = write(dirs, """
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  metadata_file = "meta.json"
""")
    msg = load_error(cfg)
    assert f"{cfg} [[datasets]] #1" in msg and "mixes DreamBooth subsets (#1) and fine-tuning subsets (#2)" in msg


def test_support_restricts_kinds(dirs: Path) -> None:
    cfg = write(dirs, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nconditioning_data_dir = "cond"\n')
    msg = load_error(cfg, support={"dreambooth", "finetuning"})
    assert f"{cfg} [[datasets]] #1" in msg and "ControlNet dataset" in msg
    assert "supports only DreamBooth and fine-tuning datasets" in msg
    # A fine-tuning-only script names the key it needs.
    cfg = write(dirs, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    assert "metadata_file" in load_error(cfg, support={"finetuning"})
    assert load(cfg, support={"dreambooth"})[0].kind == "dreambooth"


# ---------------------------------------------------------------- errors


def test_unknown_key_did_you_mean(dirs: Path) -> None:
    cfg = write(dirs, """
[general]
shufle_caption = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  num_repeat = 3
  zzz_qqq = 1
""")
    msg = load_error(cfg)
    assert f"{cfg} [general]: unknown key 'shufle_caption' (did you mean 'shuffle_caption'?)" in msg
    assert f"{cfg} [[datasets]] #1 [[datasets.subsets]] #1: unknown key 'num_repeat' (did you mean " \
           "'num_repeats'?)" in msg
    assert "unknown key 'zzz_qqq'" in msg and "zzz_qqq' (did" not in msg


@pytest.mark.parametrize("table, line, expected", [
    ("general", "batch_size = \"4\"", 'batch_size = "4" is a string: expected an integer'),
    ("general", "shuffle_caption = 1", "shuffle_caption = 1 is an integer: expected true or false"),
    ("general", "caption_dropout_rate = \"0.1\"", "expected a number"),
    ("general", "caption_prefix = 3", "caption_prefix = 3 is an integer: expected a string"),
    ("general", "num_repeats = 1.5", "num_repeats = 1.5 is a decimal number: expected an integer"),
    ("general", "resolution = [512, 512, 512]", "has 3 values"),
    ("general", "resolution = 500", "resolution = 500 must be a positive multiple of 8"),
    ("general", "resolution = [512, -8]", "positive multiples of 8"),
    ("general", "resolution = \"512\"", "expected an integer or [width, height]"),
])
def test_wrong_types(dirs: Path, table: str, line: str, expected: str) -> None:
    cfg = write(dirs, f'[{table}]\n{line}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    msg = load_error(cfg)
    assert f"{cfg} [general]: " in msg and expected in msg


def test_keys_at_the_wrong_level(dirs: Path) -> None:
    cfg = write(dirs, """
[general]
image_dir = "a"
prior_loss_weight = 2.0
cache_info = true
[[datasets]]
is_reg = true
  [[datasets.subsets]]
  image_dir = "a"
  batch_size = 2
""")
    msg = load_error(cfg)
    assert f"{cfg} [general]: image_dir is only allowed in [[datasets.subsets]]" in msg
    assert f"{cfg} [general]: prior_loss_weight is a command-line argument" in msg
    assert f"{cfg} [general]: cache_info is a kohya key that is not supported yet" in msg
    assert f"{cfg} [[datasets]] #1: is_reg is only allowed in [[datasets.subsets]]" in msg
    assert (f"{cfg} [[datasets]] #1 [[datasets.subsets]] #1: batch_size is only allowed in [general] or "
            "[[datasets]]") in msg


def test_kind_specific_keys(dirs: Path) -> None:
    cfg = write(dirs, """
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "meta.json"
  class_tokens = "sks"
  caption_extension = ".txt"
""")
    msg = load_error(cfg)
    sub = f"{cfg} [[datasets]] #1 [[datasets.subsets]] #1"
    assert f"{sub}: class_tokens is not used by fine-tuning datasets" in msg
    assert f"{sub}: caption_extension is not used by fine-tuning datasets" in msg


def test_missing_required_and_missing_paths(dirs: Path) -> None:
    cfg = write(dirs, """
[[datasets]]
  [[datasets.subsets]]
  class_tokens = "sks"
  [[datasets.subsets]]
  image_dir = "nope"
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "missing.json"
  image_dir = "also_missing"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  conditioning_data_dir = "no_cond"
""")
    msg = load_error(cfg)
    assert f"{cfg} [[datasets]] #1 [[datasets.subsets]] #1: image_dir is missing" in msg
    assert f"{cfg} [[datasets]] #1 [[datasets.subsets]] #2: image_dir 'nope' does not exist" in msg
    assert f"{cfg} [[datasets]] #2 [[datasets.subsets]] #1: metadata_file 'missing.json' does not exist" in msg
    assert f"{cfg} [[datasets]] #2 [[datasets.subsets]] #1: image_dir 'also_missing' does not exist" in msg
    assert f"{cfg} [[datasets]] #3 [[datasets.subsets]] #1: conditioning_data_dir 'no_cond' does not exist" in msg
    assert "5 problems" in msg


def test_caption_option_errors_name_the_table_where_the_value_is(dirs: Path) -> None:
    cfg = write(dirs, """
[general]
caption_dropout_rate = 1.5
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  caption_tag_mode = "sideways"
""")
    msg = load_error(cfg)
    assert f"{cfg} [general]: caption_dropout_rate must be in [0, 1], got 1.5" in msg
    assert msg.count("caption_dropout_rate must be") == 1  # reported once, not once per subset
    assert f"{cfg} [[datasets]] #1 [[datasets.subsets]] #2: caption_tag_mode must be one of" in msg


def test_separator_clash_names_both_places(dirs: Path) -> None:
    cfg = write(dirs, '[general]\ncaption_separator = ";"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n'
                      'keep_tokens_separator = ";"\n')
    msg = load_error(cfg)
    assert (f"{cfg} [[datasets]] #1 [[datasets.subsets]] #1: keep_tokens_separator must differ from "
            f"caption_separator (caption_separator from {cfg} [general])") in msg
    # A keep_tokens_separator equal to the *default* separator but not to the one in use is fine.
    cfg = write(dirs, '[general]\ncaption_separator = ";"\nkeep_tokens_separator = ","\n[[datasets]]\n'
                      '[[datasets.subsets]]\nimage_dir = "a"\n')
    assert load(cfg)[0].subsets[0].captions.keep_tokens_separator == ","


def test_cli_value_errors_name_the_argument(dirs: Path) -> None:
    cfg = write(dirs, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    msg = load_error(cfg, "--caption_tag_dropout_rate", "2", "--resolution", "510", "--dataset_repeats", "0")
    assert "argument --caption_tag_dropout_rate: caption_tag_dropout_rate must be in [0, 1]" in msg
    assert 'argument --resolution "510" must be a positive multiple of 8' in msg
    assert "argument --dataset_repeats: num_repeats = 0 must be >= 1" in msg


def test_value_ranges(dirs: Path) -> None:
    cfg = write(dirs, """
[[datasets]]
batch_size = 0
min_bucket_reso = 2048
validation_split = 1.5
  [[datasets.subsets]]
  image_dir = "a"
  conditioning_data_dir = "cond"
  random_crop = true
""")
    msg = load_error(cfg)
    ds = f"{cfg} [[datasets]] #1"
    assert f"{ds}: batch_size = 0 must be >= 1" in msg
    assert f"{ds}: min_bucket_reso = 2048 (from {ds}) is larger than max_bucket_reso = 1024 (from argument --max_bucket_reso)" in msg
    assert f"{ds}: validation_split = 1.5 must be in [0, 1]" in msg
    assert f"{ds} [[datasets.subsets]] #1: random_crop = true is not supported by ControlNet" in msg


def test_all_problems_reported_in_one_error(dirs: Path) -> None:
    cfg = write(dirs, """
[general]
batch_sise = 2
[[datasets]]
resolution = 100
  [[datasets.subsets]]
  image_dir = "missing"
  keep_tokens = "one"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  caption_dropout_rate = 2
  [[datasets.subsets]]
  metadata_file = "meta.json"
""")
    with pytest.raises(DatasetConfigError) as exc:
        load(cfg)
    msg = str(exc.value)
    assert msg.startswith(f"dataset config '{cfg}': 6 problems")
    # The subsets of a dataset with mixed kinds are still checked, so the next run does not find more.
    for fragment in ("batch_sise", "resolution = 100", "image_dir 'missing'", 'keep_tokens = "one"', "mixes",
                     "#2 [[datasets.subsets]] #1: caption_dropout_rate must be in [0, 1]"):
        assert fragment in msg
    assert len(re.findall(r"^  - ", msg, flags=re.M)) == 6


@pytest.mark.parametrize("text, expected", [
    ('[general]\nshuffle_caption = true\n', "no [[datasets]]"),
    ('[[datasets]]\nbatch_size = 1\n', "no [[datasets.subsets]]"),
    ('[datasets]\nbatch_size = 1\n', "write [[datasets]], not [datasets]"),
    ('[[datasets]]\n[datasets.subsets]\nimage_dir = "a"\n', "write [[datasets.subsets]]"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[extra]\nx = 1\n', "unknown top-level key 'extra'"),
])
def test_structure_errors(dirs: Path, text: str, expected: str) -> None:
    cfg = write(dirs, text)
    msg = load_error(cfg)
    assert str(cfg) in msg and expected in msg


def test_file_errors(dirs: Path) -> None:
    assert "not found" in load_error(dirs / "nope.toml")
    assert ".toml or .json" in load_error(write(dirs, "x", name="ds.yaml"))
    msg = load_error(write(dirs, "[[datasets]\n"))
    assert "not valid TOML" in msg and "ds.toml" in msg


# ---------------------------------------------------------------- duplicates and ignored flags


def test_duplicate_subset_ignored_within_a_dataset_but_not_across(dirs: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = write(dirs, """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "./a"
  num_repeats = 5
[[datasets]]
resolution = 1024
  [[datasets.subsets]]
  image_dir = "a"
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "meta.json"
  image_dir = "a"
  [[datasets.subsets]]
  metadata_file = "meta2.json"
  image_dir = "a"
  [[datasets.subsets]]
  metadata_file = "meta.json"
""")
    with caplog.at_level(logging.WARNING, logger="library.data.dataset_config"):
        first, second, third = load(cfg)
    assert [s.num_repeats for s in first.subsets] == [2]
    assert len(second.subsets) == 1 and second.resolution == (1024, 1024)
    assert [s.metadata_file for s in third.subsets] == [Path("meta.json"), Path("meta2.json")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "[[datasets]] #1 [[datasets.subsets]] #2: ignoring this subset" in warnings[0]
    assert "[[datasets]] #3 [[datasets.subsets]] #3" in warnings[1] and "metadata_file" in warnings[1]


def test_cli_folders_ignored_with_a_config_file(dirs: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = write(dirs, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    with caplog.at_level(logging.WARNING, logger="library.data.dataset_config"):
        (dataset,) = load(cfg, "--train_data_dir", "b", "--in_json", "meta.json")
    assert dataset.subsets[0].image_dir == Path("a")
    assert "--train_data_dir, --in_json are ignored because --dataset_config is given" in caplog.text


# ---------------------------------------------------------------- without a config file


def test_dreambooth_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train = folder(tmp_path, "train")
    folder(train, "10_sks dog", "3_red_car", "notes", "0_zero")
    (train / "readme.md").write_text("x", encoding="utf-8")
    reg = folder(tmp_path, "reg")
    folder(reg, "1_dog")
    args = make_args("--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "768",
                     "--shuffle_caption")
    with caplog.at_level(logging.WARNING, logger="library.data.dataset_config"):
        (dataset,) = load_dataset_configs(args)
    assert dataset.kind == "dreambooth" and dataset.resolution == (768, 768)
    got = [(s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]  # type: ignore[union-attr]
    assert got == [("10_sks dog", 10, "sks dog", False), ("3_red_car", 3, "red_car", False), ("1_dog", 1, "dog", True)]
    assert all(s.captions.shuffle_caption for s in dataset.subsets)
    assert "skipping folder" in caplog.text and "notes" in caplog.text and "0_zero" in caplog.text
    assert dataset.subsets[0].source == "argument --train_data_dir subfolder '10_sks dog'"


def test_dreambooth_folder_without_valid_subfolders(tmp_path: Path) -> None:
    train = folder(tmp_path, "train")
    folder(train, "dog")
    (train / "img.png").write_bytes(b"")
    with pytest.raises(DatasetConfigError) as exc:
        load_dataset_configs(make_args("--train_data_dir", str(train)))
    msg = str(exc.value)
    assert str(train) in msg and "'<repeats>_<class tokens>'" in msg and "10_sks dog" in msg
    assert "1 image(s) directly in it" in msg
    with pytest.raises(DatasetConfigError, match="does not exist"):
        load_dataset_configs(make_args("--train_data_dir", str(tmp_path / "nope")))


def test_in_json_finetuning(dirs: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = make_args("--in_json", "meta.json", "--train_data_dir", "a", "--dataset_repeats", "3",
                     "--reg_data_dir", "b")
    with caplog.at_level(logging.WARNING, logger="library.data.dataset_config"):
        (dataset,) = load_dataset_configs(args)
    (subset,) = dataset.subsets
    assert dataset.kind == "finetuning" and subset.metadata_file == Path("meta.json")
    assert subset.image_dir == Path("a") and subset.num_repeats == 3
    assert "--reg_data_dir is ignored" in caplog.text


def test_controlnet_from_cli(dirs: Path) -> None:
    (dataset,) = load_dataset_configs(make_args("--train_data_dir", "a", "--conditioning_data_dir", "cond"))
    (subset,) = dataset.subsets
    assert dataset.kind == "controlnet" and subset.image_dir == Path("a")
    assert subset.conditioning_data_dir == Path("cond")
    msg = str(pytest.raises(DatasetConfigError, load_dataset_configs,
                            make_args("--train_data_dir", "a", "--conditioning_data_dir", "cond"),
                            {"dreambooth", "finetuning"}).value)
    assert "ControlNet dataset" in msg and "supports only DreamBooth and fine-tuning" in msg
    msg = str(pytest.raises(DatasetConfigError, load_dataset_configs,
                            make_args("--conditioning_data_dir", "cond")).value)
    assert "--conditioning_data_dir needs --train_data_dir" in msg


def test_no_data_flags(dirs: Path) -> None:
    with pytest.raises(DatasetConfigError) as exc:
        load_dataset_configs(make_args(), {"dreambooth", "finetuning"})
    msg = str(exc.value)
    assert "--dataset_config" in msg and "--train_data_dir" in msg and "--in_json" in msg
    assert "--conditioning_data_dir" not in msg  # not offered to a script that cannot use it
    with pytest.raises(DatasetConfigError, match="supports only ControlNet"):
        load_dataset_configs(make_args("--train_data_dir", "a"), {"controlnet"})


def test_parse_resolution() -> None:
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution(" 1024 , 768 ") == (1024, 768)
    assert parse_resolution([640, 384]) == (640, 384)
    for bad in ("512x512", "0", "513", [512], True):
        with pytest.raises(ValueError):
            parse_resolution(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- full examples


def test_two_datasets_at_different_resolutions(dirs: Path) -> None:
    cfg = write(dirs, """
[general]
enable_bucket = true
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 1024
batch_size = 2
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 10
  class_tokens = "sks dog"
  [[datasets.subsets]]
  image_dir = "b"
  is_reg = true
  class_tokens = "dog"

[[datasets]]
resolution = [768, 512]
batch_size = 4
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 3
""")
    hi, lo = load(cfg, support={"dreambooth", "finetuning"})
    assert (hi.resolution, hi.batch_size, lo.resolution, lo.batch_size) == ((1024, 1024), 2, (768, 512), 4)
    assert [s.is_reg for s in hi.subsets] == [False, True] and lo.subsets[0].num_repeats == 3
    assert all(s.caption_extension == ".txt" and s.captions.keep_tokens == 1 for s in (*hi.subsets, *lo.subsets))
    assert hi.enable_bucket and lo.enable_bucket


def test_example_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    document = toml.loads(EXAMPLE.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    for dataset in document["datasets"]:
        for subset in dataset["subsets"]:
            for key in ("image_dir", "conditioning_data_dir"):
                if key in subset:
                    (tmp_path / subset[key]).mkdir(parents=True, exist_ok=True)
            if "metadata_file" in subset:
                meta = tmp_path / subset["metadata_file"]
                meta.parent.mkdir(parents=True, exist_ok=True)
                meta.write_text("{}", encoding="utf-8")
    datasets = load(EXAMPLE, support={"dreambooth", "finetuning"})
    assert [d.kind for d in datasets] == ["dreambooth", "finetuning"]
    assert datasets[0].resolution != datasets[1].resolution
    assert datasets[0].subsets[1].is_reg and not datasets[0].subsets[1].captions.shuffle_caption
    assert datasets[1].validation_split == 0.05
