"""The ModelSpec (``modelspec.*``) metadata kohya writes into every saved ``.safetensors`` model, LoRA and
ControlNet, which A1111's and ComfyUI's model browsers show (title, author, trigger phrase, thumbnail...).

Keys and values follow kohya's library/sai_model_spec.py (ModelSpec 1.0.1): the architecture is the
family's name for its base release plus ``/lora`` or ``/controlnet``; the implementation names the code
whose key layout the file uses (Stability AI's for the LDM/SGM layout, ``diffusers`` for diffusers names).

kohya leaves ``modelspec.hash_sha256`` out (a TODO there); we write it as ModelSpec defines it: the sha256 of
the file's tensor data (everything after the header), ``0x``-prefixed. A file is written with a placeholder
of the same length that `fill_in_hash` replaces in place once the data is on disk, so no second copy of the
tensors is ever held in memory.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from library.io import read_safetensors_header
from library.models.families import ModelFamily

SPEC_VERSION = "1.0.1"  # kohya v0.10.1's modelspec.sai_model_spec
IMPLEMENTATION_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_DIFFUSERS = "diffusers"
HASH_KEY = "modelspec.hash_sha256"
HASH_PLACEHOLDER = "0x" + "0" * 64  # as long as a real hash, so replacing it moves no byte of the file
PROJECT_NAME = "sd-trainer"

ModelKind = Literal["checkpoint", "lora", "controlnet"]
_KIND_SUFFIX: dict[str, str] = {"checkpoint": "", "lora": "/lora", "controlnet": "/controlnet"}
_HASH_IN_HEADER = re.compile(rb'"modelspec\.hash_sha256"\s*:\s*"(' + HASH_PLACEHOLDER.encode() + rb')"')


@dataclass(frozen=True)
class ModelSpecOptions:
    """The ``--metadata_*`` values (None: not given). ``title`` None means the output name; ``thumbnail`` is a
    data URL (the CLI reads a thumbnail file into one)."""

    title: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | None = None
    merged_from: str | None = None
    preprocessor: str | None = None
    trigger_phrase: str | None = None
    usage_hint: str | None = None
    thumbnail: str | None = None
    is_negative_embedding: str | None = None


def architecture(family: ModelFamily, kind: ModelKind, v_prediction: bool) -> str:
    """modelspec.architecture: the family's name for its base release (families.py), then ``/lora`` or
    ``/controlnet`` for those kinds."""
    return family.modelspec_base_architecture(v_prediction) + _KIND_SUFFIX[kind]


def implementation(family: ModelFamily, kind: ModelKind) -> str:
    """modelspec.implementation: whose key names the file uses. Single-file checkpoints are in the LDM/SGM
    layout; SDXL LoRA names follow it and SD1/SD2 LoRA names follow diffusers (kohya writes the same); an
    SD1/SD2 ControlNet file is in the original layout, an SDXL one in diffusers names (kohya's own SDXL
    ControlNet is SGM-keyed, so kohya writes Stability AI's there)."""
    in_ldm_layout = {"checkpoint": True, "lora": family.lora_names_from_ldm,
                     "controlnet": family.controlnet_file_in_ldm_layout}[kind]
    return IMPLEMENTATION_STABILITY_AI if in_ldm_layout else IMPLEMENTATION_DIFFUSERS


@functools.cache
def implementation_version() -> str:
    """modelspec.implementation_version, as kohya writes its own ("sd-scripts/<commit>"): this trainer and
    its git commit, or its package version outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if result.returncode == 0 and result.stdout.strip():
            return f"{PROJECT_NAME}/{result.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"{PROJECT_NAME}/{version(PROJECT_NAME)}"
    except Exception:  # noqa: BLE001 - not installed as a package: the name alone still says who wrote the file
        return f"{PROJECT_NAME}/unknown"


@dataclass(frozen=True)
class ModelSpec:
    """What a run's saved files say about themselves; `metadata_for` adds the date of each save."""

    family: ModelFamily
    kind: ModelKind
    title: str
    resolution: tuple[int, int]  # (width, height) trained at
    v_prediction: bool
    options: ModelSpecOptions = ModelSpecOptions()
    timestep_range: tuple[int, int] | None = None  # only when --min_timestep/--max_timestep narrowed it
    clip_skip: int | None = None

    def metadata(self, *, now: float | None = None) -> dict[str, str]:
        """The ``modelspec.*`` keys of the values there are; the date (local time, to the second) is ``now``."""
        o = self.options
        values: dict[str, str | None] = {
            "modelspec.sai_model_spec": SPEC_VERSION,
            "modelspec.architecture": architecture(self.family, self.kind, self.v_prediction),
            "modelspec.implementation": implementation(self.family, self.kind),
            "modelspec.title": o.title or self.title,
            "modelspec.resolution": f"{self.resolution[0]}x{self.resolution[1]}",
            "modelspec.description": o.description,
            "modelspec.author": o.author,
            "modelspec.date": datetime.datetime.fromtimestamp(int(time.time() if now is None else now)).isoformat(),
            HASH_KEY: HASH_PLACEHOLDER,
            "modelspec.license": o.license,
            "modelspec.tags": o.tags,
            "modelspec.prediction_type": "v" if self.v_prediction else "epsilon",
            "modelspec.timestep_range": (f"{self.timestep_range[0]},{self.timestep_range[1]}"
                                         if self.timestep_range is not None else None),
            "modelspec.encoder_layer": str(self.clip_skip) if self.clip_skip is not None else None,
            "modelspec.merged_from": o.merged_from,
            "modelspec.preprocessor": o.preprocessor,
            "modelspec.trigger_phrase": o.trigger_phrase,
            "modelspec.usage_hint": o.usage_hint,
            "modelspec.thumbnail": o.thumbnail,
            "modelspec.is_negative_embedding": o.is_negative_embedding,
            "modelspec.implementation_version": implementation_version(),
        }
        return {key: value for key, value in values.items() if value is not None}

    def metadata_for(self, path: str | os.PathLike, *, now: float | None = None) -> dict[str, str]:
        """`metadata` for a file saved at ``path``; nothing for other formats (kohya writes ModelSpec into
        ``.safetensors`` only: a ``.ckpt``/``.pt`` or a diffusers folder has no header to hold it)."""
        return self.metadata(now=now) if Path(path).suffix.lower() == ".safetensors" else {}


def tensor_data_sha256(path: str | os.PathLike) -> str:
    """ModelSpec's hash: the sha256 of the tensor data of a safetensors file (all bytes after the header),
    ``0x``-prefixed. Metadata edits do not change it; for a LoRA it equals kohya's ``sshs_model_hash``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        read_safetensors_header(handle)
        for chunk in iter(lambda: handle.read(16 << 20), b""):
            digest.update(chunk)
    return "0x" + digest.hexdigest()


def fill_in_hash(path: str | os.PathLike) -> str | None:
    """Replace the hash placeholder in the header of the safetensors file at ``path`` by its real hash, in
    place (same length: no byte moves). Returns the hash, or None when the file carries no placeholder (a
    folder, a ``.ckpt``, a network module that wrote its own metadata)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    with open(path, "rb") as handle:
        header_len, header = read_safetensors_header(handle)
        handle.seek(8)
        header_bytes = handle.read(header_len)
    if (header.get("__metadata__") or {}).get(HASH_KEY) != HASH_PLACEHOLDER:
        return None
    matches = list(_HASH_IN_HEADER.finditer(header_bytes))
    if len(matches) != 1:
        return None
    value = tensor_data_sha256(path)
    with open(path, "r+b") as handle:
        handle.seek(8 + matches[0].start(1))
        handle.write(value.encode("ascii"))
        handle.flush()
        os.fsync(handle.fileno())
    return value
