"""Dataset preparation from raw images to a trained LoRA, with the tools in the order a kohya user runs them:
tag (WD14) + caption (BLIP) -> merge both into meta.json -> clean -> check_dataset -> 2 LoRA steps."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from safetensors import safe_open

import train_network
from tests.helpers.tiny_captioners import WORDS, build_tiny_blip
from tests.helpers.tiny_tagger import build_tagger
from tests.helpers.user_paths import lora_args
from tools import (check_dataset, clean_captions_and_tags, make_captions, merge_captions_to_metadata,
                   merge_dd_tags_to_metadata, tag_images_by_wd14_tagger)


def test_raw_images_to_tags_captions_metadata_and_two_lora_steps(tmp_path: Path, tiny_model_dirs, capsys) -> None:
    data, images = tmp_path / "data", tmp_path / "data" / "images"
    images.mkdir(parents=True)
    colours = {"r1": (255, 0, 0), "r2": (250, 10, 0), "g1": (0, 255, 0), "b1": (0, 0, 255)}
    for name, colour in colours.items():
        Image.new("RGB", (96, 64), colour).save(images / f"{name}.png")
    models = build_tagger(tmp_path / "tagger" / "SmilingWolf_wd-v1-4-convnext-tagger-v2").parent
    blip = build_tiny_blip(tmp_path / "blip")
    meta = data / "meta.json"

    assert tag_images_by_wd14_tagger.main([str(images), "--model_dir", str(models), "--batch_size", "4",
                                           "--general_threshold", "0.75", "--character_threshold", "0.95"]) == 0
    assert make_captions.main([str(images), "--model_id", str(blip), "--batch_size", "4", "--beam_search",
                               "--max_length", "8", "--min_length", "8",  # 4 words after "a picture of"
                               "--generate_kwargs", '{"bad_words_ids": [[0], [1], [2], [4]]}']) == 0
    assert merge_captions_to_metadata.main([str(images), str(meta)]) == 0
    assert merge_dd_tags_to_metadata.main([str(images), str(meta)]) == 0
    assert clean_captions_and_tags.main([str(meta), str(meta)]) == 0
    capsys.readouterr()

    entries = json.loads(meta.read_text(encoding="utf-8"))
    assert sorted(entries) == ["b1", "g1", "r1", "r2"]
    # 96x64 on white: the missing third is white, so an empty channel reads 1/3 (score 0.209) and a full one 1 (0.982)
    assert {key: entry["tags"] for key, entry in entries.items()} == {
        "r1": "1girl, red theme, long hair", "r2": "1girl, red theme, long hair",  # cleaned: _ -> space
        "g1": "1girl, green theme, hatsune miku (vocaloid)", "b1": "1girl, blue theme, kiwi (fruit)"}
    assert all(len(entry["caption"].split()) == 4 and set(entry["caption"].split()) <= set(WORDS)
               for entry in entries.values())

    assert check_dataset.main(["--train_data_dir", str(images), "--in_json", str(meta), "--resolution", "64",
                               "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
                               "--family", "sd15"]) == 0
    report = capsys.readouterr().out
    assert "4 images" in report, report

    output = tmp_path / "out"
    assert train_network.main(lora_args(tiny_model_dirs["sd15"], data, output, 2, "--network_module",
                                        "networks.lora")) == 0
    with safe_open(str(output / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_steps"] == "2"
    frequencies = next(iter(json.loads(metadata["ss_tag_frequency"]).values()))
    assert frequencies["1girl"] == 4 and frequencies["red theme"] == 2 and frequencies["kiwi (fruit)"] == 1
