"""A tiny WD14-shaped ONNX tagger whose scores are a known function of the image's mean colour.

Every tag's score is ``sigmoid(slope * (mean_channel - 0.5))`` for one channel (R, G or B, in 0..1, measured on
the 448 px white-padded square the tagger sees) or a constant ``sigmoid(logit)``: so a test can say which tags a
solid-colour image must get under any threshold. Two layouts, as the real models come:

* ``wd14``: input ``(N, 448, 448, 3)`` BGR 0..255, output probabilities; ``selected_tags.csv`` beside it;
* ``mapping``: input ``(N, 3, 448, 448)`` BGR in [-1, 1], output logits; ``tag_mapping.json`` beside it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

SLOPE = 8.0
CHANNEL = {"R": 2, "G": 1, "B": 0}  # index in the BGR input

# name, category (WD14 csv number), driver: a channel letter or a constant score
WD14_TAGS = [
    ("general", 9, 0.5), ("sensitive", 9, "B"), ("questionable", 9, "G"), ("explicit", 9, 0.1),
    ("1girl", 0, 0.9), ("red_theme", 0, "R"), ("green_theme", 0, "G"), ("blue_theme", 0, "B"),
    ("^_^", 0, 0.6), ("solo", 0, 0.4), ("long_hair", 0, "R"),
    ("hatsune_miku_(vocaloid)", 4, "G"), ("kiwi_(fruit)", 4, "B"), ("some_girl", 4, 0.7),
]
_JSON_CATEGORY = {9: "Rating", 0: "General", 4: "Character"}
# The mapping layout adds categories the csv has not; output 3 has no tag (a hole in the mapping).
MAPPING_TAGS = [
    ("general", "Rating", 0.5), ("sensitive", "Rating", "B"), ("questionable", "Rating", "G"), None,
    ("1girl", "General", 0.9), ("red_theme", "General", "R"), ("green_theme", "General", "G"),
    ("blue_theme", "General", "B"), ("^_^", "General", 0.6), ("solo", "General", 0.4),
    ("hatsune_miku_(vocaloid)", "Character", "G"), ("kiwi_(fruit)", "Character", "B"),
    ("vocaloid", "Copyright", 0.8), ("highres", "Meta", 0.45), ("best_quality", "Quality", "R"),
    ("normal_quality", "Quality", 0.5),
]


def score(driver: float | str, mean_rgb: tuple[float, float, float]) -> float:
    """The score the model gives a tag for an image of this mean colour (0..1 per channel, RGB order)."""
    if isinstance(driver, str):
        value = mean_rgb["RGB".index(driver)]
        return 1.0 / (1.0 + math.exp(-SLOPE * (value - 0.5)))
    return float(driver)


def _weights(drivers: list[float | str]) -> tuple[np.ndarray, np.ndarray]:
    """Linear map from (mean B, mean G, mean R) in 0..1 to logits."""
    weight = np.zeros((3, len(drivers)), np.float32)
    bias = np.zeros(len(drivers), np.float32)
    for column, driver in enumerate(drivers):
        if isinstance(driver, str):
            weight[CHANNEL[driver], column] = SLOPE
            bias[column] = -SLOPE / 2
        else:
            bias[column] = math.log(driver / (1.0 - driver))
    return weight, bias


def build_tagger(folder: Path, layout: str = "wd14", batch: int | str = "N") -> Path:
    """Write ``model.onnx`` (or ``model_optimized.onnx``) and its label file into ``folder``; returns ``folder``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    mapping = layout == "mapping"
    rows = MAPPING_TAGS if mapping else WD14_TAGS
    drivers = [row[2] if row else 0.01 for row in rows]
    weight, bias = _weights(drivers)
    if mapping:
        shape, axes = [batch, 3, 448, 448], [2, 3]
        nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=axes, keepdims=0),
                 helper.make_node("Add", ["mean", "one"], ["shifted"]),
                 helper.make_node("Mul", ["shifted", "half"], ["unit"]),  # [-1, 1] -> 0..1
                 helper.make_node("MatMul", ["unit", "weight"], ["product"]),
                 helper.make_node("Add", ["product", "bias"], ["logits"])]
        output = "logits"
        constants = {"one": np.float32(1.0), "half": np.float32(0.5)}
    else:
        shape, axes = [batch, 448, 448, 3], [1, 2]
        nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=axes, keepdims=0),
                 helper.make_node("Mul", ["mean", "scale"], ["unit"]),  # 0..255 -> 0..1
                 helper.make_node("MatMul", ["unit", "weight"], ["product"]),
                 helper.make_node("Add", ["product", "bias"], ["logits"]),
                 helper.make_node("Sigmoid", ["logits"], ["probabilities"])]
        output = "probabilities"
        constants = {"scale": np.float32(1.0 / 255.0)}
    initializers = [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")]
    initializers += [numpy_helper.from_array(np.array(value, np.float32), name) for name, value in constants.items()]
    graph = helper.make_graph(
        nodes, "tiny_tagger", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, len(rows)])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / ("model_optimized.onnx" if mapping else "model.onnx"))
    if mapping:
        entries = {str(i): {"tag": row[0], "category": row[1]} for i, row in enumerate(rows) if row}
        (folder / "tag_mapping.json").write_text(json.dumps(entries), encoding="utf-8")
    else:
        with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["tag_id", "name", "category", "count"])
            for i, (name, category, _) in enumerate(rows):
                writer.writerow([1000 + i, name, category, 100 - i])
    return folder
