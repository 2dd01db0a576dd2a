"""WD14 tagger throughput: images/s through tools/tag_images_by_wd14_tagger.py's whole path.

    python bench/tagger.py                          # tiny model (scores from the mean colour), CPU, batch 8
    python bench/tagger.py --model full --count 256 --batch_size 32 --workers 8    # for a GPU machine

``tiny``: the tests' model (tests/helpers/tiny_tagger.py): what is measured is decoding, padding, resizing
to 448 px and writing tag files, i.e. the tool's own cost. ``full``: a model shaped like WD14's ConvNeXt
(448² NHWC BGR input, four stages of 3x3 convolutions at 112/56/28/14 px with 128..1024 channels, ~50 GMAC
per image, 9083 sigmoid outputs, random weights, selected_tags.csv to match), so the model's cost is
realistic; run it where onnxruntime-gpu and a GPU are present (the CUDA provider is picked automatically).
Images: ``--count`` synthetic 768x1024 JPEGs (quality 90). One untimed warm-up run, then ``--repeats`` timed
runs (--overwrite); prints images/s of each and the provider used. Needs onnx and onnxruntime. Not run by CI.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from library.data.caption_files import OVERWRITE
from library.data.tagging import TaggerOptions, run_tagger
from library.data.wd14_model import OnnxTagger, tagger_files
from library.data.wd14_tags import THRESHOLD_CATEGORIES, TagOptions

REPO_ID = "bench/wd14-shaped"
FULL_TAGS = 9083
FULL_STAGES = ((128, 3), (256, 3), (512, 9), (1024, 3))  # (channels, 3x3 conv layers) at 112, 56, 28, 14 px


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:1024, 0:768].astype(np.float32)
    base = np.stack([x / 768, y / 1024, (x + y) / 1792], axis=-1) * 200.0
    for i in range(count):
        pixels = np.clip(base + rng.normal(0.0, 20.0, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=90)


def build_full_model(folder: Path) -> None:
    """A WD14-shaped ONNX model with random weights (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["image"], ["x0"], perm=[0, 3, 1, 2])]
    weights, current, channels_in = [], "x0", 3
    for stage, (channels, depth) in enumerate(FULL_STAGES):
        kernel, stride = (4, 4) if stage == 0 else (2, 2)  # stem / downsampling, as ConvNeXt
        for layer in range(depth + 1):
            name = f"s{stage}l{layer}"
            shape = (channels, channels_in, *((kernel, kernel) if layer == 0 else (3, 3)))
            scale = np.sqrt(2.0 / np.prod(shape[1:]))
            weights.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
            attrs = dict(strides=[stride, stride]) if layer == 0 else dict(pads=[1, 1, 1, 1])
            nodes.append(helper.make_node("Conv", [current, name], [name + "c"], **attrs))
            nodes.append(helper.make_node("Relu", [name + "c"], [name + "r"]))
            current, channels_in = name + "r", channels
    head = (rng.standard_normal((channels_in, FULL_TAGS)) * 0.01).astype(np.float32)
    weights.append(numpy_helper.from_array(head, "head"))
    nodes += [helper.make_node("GlobalAveragePool", [current], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("MatMul", ["flat", "head"], ["logits"]),
              helper.make_node("Sigmoid", ["logits"], ["probabilities"])]
    graph = helper.make_graph(nodes, "wd14_shaped",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 448, 448, 3])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", FULL_TAGS])],
                              initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i in range(FULL_TAGS):
            writer.writerow([i, f"tag_{i}", 9 if i < 4 else 4 if i >= FULL_TAGS - 2000 else 0, 0])


def tiny_tagger_module():
    """tests/helpers/tiny_tagger.py, loaded by its path: `python bench/tagger.py` cannot import the tests package."""
    path = Path(__file__).resolve().parent.parent / "tests" / "helpers" / "tiny_tagger.py"
    spec = importlib.util.spec_from_file_location("tiny_tagger", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        model_folder = tagger_files(root / "models", REPO_ID).folder
        if args.model == "tiny":
            tiny_tagger_module().build_tagger(model_folder)
        else:
            build_full_model(model_folder)
        (root / "images").mkdir()
        make_jpegs(root / "images", args.count)
        thresholds = {category: 0.35 for category in THRESHOLD_CATEGORIES}
        options = TaggerOptions(train_data_dir=root / "images", repo_id=REPO_ID, model_dir=root / "models",
                                tags=TagOptions(thresholds=thresholds), batch_size=args.batch_size,
                                num_workers=args.workers, mode=OVERWRITE)
        provider = OnnxTagger(tagger_files(root / "models", REPO_ID)).providers[0]
        run_tagger(options, echo=lambda line: None)  # warm-up: page cache, session start, workers
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run_tagger(options, echo=lambda line: None)
            rates.append(args.count / (time.perf_counter() - start))
        print(f"model {args.model}, {provider}, batch {args.batch_size}, workers {args.workers}, "
              f"{args.count} images 768x1024 JPEG: " + ", ".join(f"{rate:.1f}" for rate in rates) + " images/s")


if __name__ == "__main__":
    main()
