"""The WD14 tagger model: where its files live, fetching them, the image preprocessing, ONNX inference.

Files are where kohya puts them, ``MODEL_DIR/<repo_id with "/" as "_">/`` (so folders kohya downloaded are
reused): ``model.onnx`` + ``selected_tags.csv`` for SmilingWolf's repositories; for a repo id with a sub-folder
(``owner/name/subdir``, kohya's "another structure") ``subdir/model_optimized.onnx`` + ``subdir/tag_mapping.json``.
Whatever ONNX file and label file the folder holds is used, so a hand-placed model works too.

Preprocessing is WD14's: transparency on white, padded with white to a square (centred), resized to 448 px
(pixel-area average when shrinking, Lanczos when enlarging, as kohya chooses), BGR float 0..255, NHWC. A large
JPEG is decoded reduced to no less than that (:func:`tagger_decode_size`), half the decoding cost. The
``tag_mapping.json`` layout's models take NCHW in [-1, 1] and return logits (sigmoid applied here), as in kohya.
onnxruntime is an optional extra, imported only when a model is opened; the CUDA provider is used when present.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from library.data.caption_files import LabellingError
from library.data.wd14_tags import TagVocabulary, read_selected_tags_csv, read_tag_mapping_json

IMAGE_SIZE = 448
DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
DEFAULT_MODEL_DIR = "wd14_tagger_model"
ONNXRUNTIME_REQUIREMENT = "onnxruntime==1.32.0"
CSV_LABELS, JSON_LABELS = "selected_tags.csv", "tag_mapping.json"
ONNX_NAMES = ("model.onnx", "model_optimized.onnx")


@dataclass(frozen=True)
class TaggerFiles:
    """The model's folder and the two files inside it the tagger needs."""

    repo_id: str  # "owner/name" on the hub
    subfolder: str | None  # kohya's "owner/name/subdir" form
    folder: Path
    onnx: Path
    labels: Path

    @property
    def mapping_layout(self) -> bool:
        return self.labels.name == JSON_LABELS


def tagger_files(model_dir: Path, repo_id: str) -> TaggerFiles:
    """Where the model of ``repo_id`` lives under ``model_dir``; existing files win over the default names."""
    parts = repo_id.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise LabellingError(f"--repo_id {repo_id!r}: expected owner/name (or owner/name/subfolder), "
                             f"e.g. {DEFAULT_REPO_ID}")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    folder = Path(model_dir) / repo.replace("/", "_")
    if subfolder:
        folder = folder / subfolder
    onnx = next((folder / name for name in ONNX_NAMES if (folder / name).is_file()),
                folder / ("model_optimized.onnx" if subfolder else "model.onnx"))
    labels = next((folder / name for name in (CSV_LABELS, JSON_LABELS) if (folder / name).is_file()),
                  folder / (JSON_LABELS if subfolder else CSV_LABELS))
    return TaggerFiles(repo_id=repo, subfolder=subfolder, folder=folder, onnx=onnx, labels=labels)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def ensure_tagger_files(files: TaggerFiles, *, force_download: bool) -> list[str]:
    """Download what is missing (everything with ``force_download``) from the hub; returns the names fetched.

    Offline (``HF_HUB_OFFLINE=1``) or when the hub cannot be reached, a missing file is one
    :class:`LabellingError` naming what to download and where to put it.
    """
    wanted = [path for path in (files.onnx, files.labels) if force_download or not path.is_file()]
    if not wanted:
        return []
    url = f"https://huggingface.co/{files.repo_id}/tree/main" + (f"/{files.subfolder}" if files.subfolder else "")
    manual = (f"download {' and '.join(path.name for path in wanted)} from {url} into {files.folder}/ "
              "(or pass --model_dir / --repo_id of a model you have)")
    if _offline():
        raise LabellingError(f"the tagger model {files.repo_id} is not in {files.folder} and HF_HUB_OFFLINE=1 "
                             f"stops the download: {manual}")
    from huggingface_hub import hf_hub_download

    local_dir = files.folder.parents[files.subfolder.count("/")] if files.subfolder else files.folder
    fetched = []
    for path in wanted:
        try:
            hf_hub_download(repo_id=files.repo_id, filename=path.name, subfolder=files.subfolder,
                            local_dir=local_dir, force_download=force_download)
        except Exception as error:  # network, 404, auth: all leave the user with the same manual fix
            raise LabellingError(f"cannot download {path.name} of {files.repo_id} ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}): {manual}") from error
        fetched.append(path.name)
    return fetched


def read_vocabulary(files: TaggerFiles) -> TagVocabulary:
    return read_tag_mapping_json(files.labels) if files.mapping_layout else read_selected_tags_csv(files.labels)


def tagger_decode_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size the image shrinks to when its long side becomes 448 px: all the tagger needs of it."""
    scale = IMAGE_SIZE / max(size)
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))) if scale < 1 else size


def prepare_tagger_image(rgb: Image.Image) -> np.ndarray:
    """WD14's input for one RGB image: white-padded square, 448 px, BGR float32 0..255, (448, 448, 3)."""
    width, height = rgb.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - width) // 2, (side - height) // 2))
    resample = Image.Resampling.BOX if side >= IMAGE_SIZE else Image.Resampling.LANCZOS
    resized = square.resize((IMAGE_SIZE, IMAGE_SIZE), resample)
    return np.asarray(resized, dtype=np.float32)[:, :, ::-1].copy()


def import_onnxruntime():
    """onnxruntime, or one error line naming the pip command."""
    try:
        import onnxruntime
    except ImportError as error:
        raise LabellingError(f"the WD14 tagger needs the onnxruntime package: pip install {ONNXRUNTIME_REQUIREMENT} "
                             "(onnxruntime-gpu on a CUDA machine)") from error
    return onnxruntime


class OnnxTagger:
    """One ONNX session; :meth:`scores` maps a batch of prepared images to per-tag probabilities."""

    def __init__(self, files: TaggerFiles) -> None:
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        self.providers = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available][:1]
        self.providers.append("CPUExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(files.onnx), providers=self.providers)
        except Exception as error:
            raise LabellingError(f"{files.onnx}: not a usable ONNX model ({str(error).splitlines()[0]}); download "
                                 "it again with --force_download") from error
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = list(model_input.shape)
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.channels_first = len(shape) == 4 and shape[1] == 3
        width = self.session.get_outputs()[0].shape[-1]
        self.output_count = width if isinstance(width, int) and width > 0 else None
        self.logits = files.mapping_layout  # kohya: the tag_mapping.json models end before their sigmoid

    def scores(self, images: np.ndarray) -> np.ndarray:
        """(N, 448, 448, 3) BGR 0..255 -> (N, tags) probabilities; pads to a fixed model batch and back."""
        count = len(images)
        batch = images.transpose(0, 3, 1, 2) / 127.5 - 1.0 if self.channels_first else images
        step = self.fixed_batch or max(count, 1)
        padded = -(-count // step) * step
        if padded > count:
            batch = np.concatenate([batch, np.zeros((padded - count, *batch.shape[1:]), batch.dtype)], axis=0)
        outputs = [self.session.run(None, {self.input_name: batch[i:i + step].astype(np.float32)})[0]
                   for i in range(0, padded, step)]
        probabilities = np.concatenate(outputs, axis=0)[:count]
        if self.logits:
            probabilities = 1.0 / (1.0 + np.exp(-probabilities))
        return probabilities
