"""Load and save Stable Diffusion models: diffusers folders and single-file (LDM layout) checkpoints.

Everything here works offline: components are built from configs (the file's own, a folder's, or the
built-in standard configs of the family) and weights are converted by `library.models.ldm_layout`; what
differs between families (text encoders, pipelines) is read off the `library.models.families` object.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
import diffusers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.models import ldm_layout
from library.models.clip_tokenizer import PAD_WITH_EXCLAMATION, build_clip_tokenizer
from library.models.families import (
    FAMILIES,
    FamilyName,
    ModelFamily,
    detect_family,
    detect_family_of_keys,
    family_of_folder,
    resolve_family,
)
from library.models.model_files import SINGLE_FILE_SUFFIXES, ModelLoadError, is_single_file
from library.io import atomic_save_folder, atomic_save_safetensors, read_safetensors_metadata
from library.models.import_noise import without_import_noise

with without_import_noise():  # the first import of diffusers' models (they import bitsandbytes)
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

# Written into single files we save, so they convert back to the identical folder with no flags.
CONFIG_METADATA_KEY = "sdtrainer.diffusers_configs"
SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StableDiffusionModel:
    """The parts a trainer needs, as diffusers/transformers modules, plus what family they form."""

    family: ModelFamily
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    tokenizers: list[CLIPTokenizer]
    scheduler: EulerDiscreteScheduler
    source: str = ""

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def configs(self) -> dict[str, dict[str, Any]]:
        """Component configs in the form `build_model` takes (JSON-serialisable)."""
        # The key order is part of the single-file metadata we write: the first text encoder, then the
        # scheduler, then any further text encoders.
        encoders = {spec.component: _text_config_dict(te) for spec, te in zip(self.family.text_encoders, self.text_encoders)}
        first = self.family.text_encoders[0].component
        return {
            "unet": _plain_config(self.unet.config),
            "vae": _plain_config(self.vae.config),
            first: encoders.pop(first),
            "scheduler": _plain_config(self.scheduler.config),
            **encoders,
        }

    def to_pipeline(self, controlnet: torch.nn.Module | None = None) -> Any:
        """The family's diffusers pipeline over these very modules (its ControlNet pipeline with ``controlnet``)."""
        family = self.family
        components: dict[str, Any] = {"vae": self.vae, "unet": self.unet, "scheduler": self.scheduler}
        for spec, encoder, tokenizer in zip(family.text_encoders, self.text_encoders, self.tokenizers):
            components.update({spec.component: encoder, spec.tokenizer: tokenizer})
        if controlnet is not None:
            components["controlnet"] = controlnet
        with without_import_noise():  # the pipeline modules import transformers' image processors
            cls = getattr(diffusers, family.pipeline_class if controlnet is None else family.controlnet_pipeline_class)
        return cls(**components, **dict(family.pipeline_options))


def _plain_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}


def _text_config_dict(model: CLIPTextModel) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "projection_dim", "layer_norm_eps",
            "bos_token_id", "eos_token_id", "pad_token_id")
    return {k: getattr(model.config, k) for k in keys}


def tokenizers_for(family: ModelFamily) -> list[CLIPTokenizer]:
    """SD1 and SDXL's first tokenizer pad with EOS; SD2 and SDXL's second pad with "!" (id 0)."""
    return [build_clip_tokenizer(PAD_WITH_EXCLAMATION) if spec.pad_with_exclamation else build_clip_tokenizer()
            for spec in family.text_encoders]


def _text_encoder_class(spec: Any) -> type:
    return CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel


def build_model(family: ModelFamily | FamilyName, configs: dict[str, dict[str, Any]], seed: int | None = None,
                tokenizers: list[CLIPTokenizer] | None = None, empty_weights: bool = False) -> StableDiffusionModel:
    """Components with random weights from config dicts (`ModelFamily.tiny_configs`, `standard_configs`, ...).

    ``empty_weights`` builds the modules on the meta device, for callers that load every weight next.
    """
    fam = family if isinstance(family, ModelFamily) else FAMILIES[family]
    if seed is not None:
        torch.manual_seed(seed)
    with init_empty_weights() if empty_weights else contextlib.nullcontext():
        unet = UNet2DConditionModel(**_without_class_name(configs["unet"]))
        vae = AutoencoderKL(**_without_class_name(configs["vae"]))
        text_encoders: list[CLIPTextModel] = [_text_encoder_class(spec)(CLIPTextConfig(**configs[spec.component]))
                                              for spec in fam.text_encoders]
    scheduler = EulerDiscreteScheduler.from_config(_without_class_name(configs["scheduler"]))
    for module in (unet, vae, *text_encoders):
        module.eval()
    return StableDiffusionModel(fam, unet, vae, text_encoders, tokenizers or tokenizers_for(fam), scheduler)


def _without_class_name(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------
# diffusers folders


def save_diffusers(model: StableDiffusionModel, output_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                   safe_serialization: bool = True, overwrite: bool = False) -> None:
    """Write a folder that `DiffusionPipeline.from_pretrained` loads, via a temp folder renamed into place;
    an existing folder is an error unless ``overwrite`` (then it is swapped out atomically)."""
    if dtype is not None and dtype != model.unet.dtype:
        model = _copy_in_dtype(model, dtype)  # never cast the caller's modules down and back

    def write(tmp: Path) -> None:
        model.to_pipeline().save_pretrained(tmp, safe_serialization=safe_serialization)
        for index in range(len(model.text_encoders)):
            standardise_text_encoder_files(tmp / ("text_encoder" if index == 0 else f"text_encoder_{index + 1}"))
        for index, tokenizer in enumerate(model.tokenizers):
            _write_slow_tokenizer_files(tokenizer, tmp / ("tokenizer" if index == 0 else f"tokenizer_{index + 1}"))

    atomic_save_folder(output_dir, write, overwrite)


def standardise_text_encoder_files(folder: Path) -> None:
    """Rewrite a saved text encoder's weights under the standard ``text_model.*`` names.

    transformers 5 saves CLIPTextModel without the ``text_model.`` level; transformers 4.x (what kohya and
    many tools pin) then finds every key missing and silently keeps a random text encoder. Both major
    versions load the prefixed names.
    """
    from safetensors.torch import load_file

    for file in sorted(folder.glob("model*.safetensors")):
        tensors = load_file(str(file))
        if any(k != _canonical_te_key(k) for k in tensors):
            atomic_save_safetensors({_canonical_te_key(k): v for k, v in tensors.items()}, file,
                                    read_safetensors_metadata(file) or {"format": "pt"})
    for file in sorted(folder.glob("pytorch_model*.bin")):
        tensors = torch.load(str(file), map_location="cpu", weights_only=True)
        torch.save({_canonical_te_key(k): v for k, v in tensors.items()}, str(file))
    for index_file in folder.glob("*.index.json"):
        index = json.loads(index_file.read_text())
        index["weight_map"] = {_canonical_te_key(k): v for k, v in index.get("weight_map", {}).items()}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_in_dtype(model: StableDiffusionModel, dtype: torch.dtype) -> StableDiffusionModel:
    import copy

    return StableDiffusionModel(
        model.family, copy.deepcopy(model.unet).to(dtype), copy.deepcopy(model.vae).to(dtype),
        [copy.deepcopy(te).to(dtype) for te in model.text_encoders], model.tokenizers, model.scheduler, model.source,
    )


def _write_slow_tokenizer_files(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """vocab.json + merges.txt beside tokenizer.json, so older transformers releases load the folder too."""
    from library.models.clip_tokenizer import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    if len(tokenizer) != len(vocab):
        return  # a tokenizer with added tokens: tokenizer.json alone describes it
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def load_diffusers(folder: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> StableDiffusionModel:
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder: model_index.json is missing")
    family = family_of_folder(folder)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs)
    text_encoders = [_load_text_encoder(_text_encoder_class(spec), folder, spec.component, kwargs)
                     for spec in family.text_encoders]
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=spec.tokenizer, local_files_only=True)
                  for spec in family.text_encoders]
    scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    for module in (unet, vae, *text_encoders):
        module.eval()
    return StableDiffusionModel(family, unet, vae, text_encoders, tokenizers, scheduler, source=str(folder))


def _load_text_encoder(cls: type, folder: Path, subfolder: str, kwargs: dict[str, Any]) -> CLIPTextModel:
    """Either key form (``text_model.*`` or transformers 5's bare names); a weight left random is an error,
    where transformers itself only warns."""
    model, info = cls.from_pretrained(folder, subfolder=subfolder, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    if missing:
        raise ModelLoadError(f"{folder / subfolder} is missing {len(missing)} text-encoder weights (first: {missing[0]}); "
                             "the folder is incomplete or its weights do not match config.json")
    return model


# --------------------------------------------------------------------------------------------------
# single files


def read_checkpoint(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a `.safetensors` file or a pickled checkpoint (weights_only=True);
    ``mmap=False`` reads a .safetensors file whole into memory instead of memory-mapping it."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load, load_file

        try:
            tensors = load_file(str(path)) if mmap else load(path.read_bytes())
            return tensors, read_safetensors_metadata(path)
        except Exception as error:  # noqa: BLE001 - the message names the file, that is what the user needs
            raise ModelLoadError(f"{path} could not be read as a safetensors file ({error})") from error
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"{path} could not be read as a checkpoint ({error.__class__.__name__}: {error})") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    metadata = {k: v for k, v in data.items() if isinstance(v, str)}
    if isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, metadata


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def load_single_file(path: str | os.PathLike, family: str | None = None, model_config: str | None = None,
                     prediction_type: str | None = None, mmap: bool = True) -> StableDiffusionModel:
    """Build a model from an A1111/ComfyUI-style checkpoint.

    Configs come from, in order: ``model_config`` (a diffusers folder), the configs our own writer stored
    in the file's metadata, or the built-in standard config of the detected family.
    """
    path = Path(path)
    state_dict, metadata = read_checkpoint(path, mmap=mmap)
    fam = detect_family_of_keys(state_dict)
    if fam is None:
        raise ModelLoadError(
            f"{path} is not a Stable Diffusion 1.x, 2.x or SDXL checkpoint in the original (LDM) layout: "
            "none of model.diffusion_model.*, cond_stage_model.* or conditioner.embedders.* keys were found"
        )
    if family is not None and resolve_family(family) is not fam:
        raise ModelLoadError(f"{path} holds an {fam.name} model, but --family {family} was given; drop the flag or pick the right file")
    configs = _configs_for_single_file(metadata, fam, model_config)
    if prediction_type is not None:
        configs["scheduler"] = {**configs["scheduler"], "prediction_type": prediction_type}
    model = build_model(fam, configs, empty_weights=True)  # no time spent on random init of weights we replace
    diffusers_sd = ldm_layout.ldm_to_diffusers(state_dict, fam.text_encoders, configs)
    _load_component_weights(model, diffusers_sd, path)
    model.source = str(path)
    return model


def _configs_for_single_file(metadata: dict[str, str], family: ModelFamily, model_config: str | None) -> dict[str, dict[str, Any]]:
    if model_config is not None:
        return load_diffusers_configs(model_config)
    stored = metadata.get(CONFIG_METADATA_KEY)
    if stored:
        return json.loads(stored)
    return family.standard_configs()


def load_diffusers_configs(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    folder = Path(folder)
    names = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "text_encoder_2": "text_encoder_2/config.json", "scheduler": "scheduler/scheduler_config.json"}
    configs: dict[str, dict[str, Any]] = {}
    for key, rel in names.items():
        file = folder / rel
        if file.is_file():
            configs[key] = json.loads(file.read_text())
        elif key != "text_encoder_2":
            raise ModelLoadError(f"--model_config {folder} is not a diffusers model folder: {rel} is missing")
    text_keys = set(CLIPTextConfig().to_dict()) | {"projection_dim"}
    for key in ("text_encoder", "text_encoder_2"):
        if key in configs:
            configs[key] = {k: v for k, v in configs[key].items() if k in text_keys and not k.startswith("_")
                            and k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
    return configs


def _load_component_weights(model: StableDiffusionModel, diffusers_sd: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    for name, module in _component_modules(model).items():
        weights = diffusers_sd.get(name, {})
        if name.startswith("text_encoder"):
            weights = _module_te_keys(weights, module)
        expected = module.state_dict()
        missing = sorted(k for k in expected if k not in weights and not _optional_key(name, k))
        if missing:
            raise ModelLoadError(
                f"{path} is missing {len(missing)} {name} weights (first: {missing[0]}); the file is truncated "
                "or its architecture differs from the config: pass --model_config with a matching diffusers folder"
            )
        wrong = [k for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
        if wrong:
            k = wrong[0]
            raise ModelLoadError(
                f"{path}: {name} weight {k} has shape {tuple(weights[k].shape)} but the config expects "
                f"{tuple(expected[k].shape)}; pass --model_config with the diffusers folder this file was made from"
            )
        module.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False, assign=True)


def _optional_key(component: str, key: str) -> bool:
    # position_ids is a buffer some transformers versions keep and others do not.
    return component.startswith("text_encoder") and key.endswith("position_ids")


def save_single_file(model: StableDiffusionModel, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> None:
    """One LDM-layout `.safetensors` (or `.ckpt`) file, as A1111 and ComfyUI load it, written atomically."""
    path = Path(path)
    state_dict = ldm_layout.diffusers_to_ldm(_component_state_dicts(model), model.family.text_encoders, model.configs())
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    meta = {CONFIG_METADATA_KEY: json.dumps(model.configs()), "modelspec.architecture": model.family.modelspec_architecture}
    meta.update(metadata or {})
    if path.suffix.lower() == ".safetensors":
        atomic_save_safetensors(state_dict, path, meta)
    else:
        from library.io import atomic_torch_save

        atomic_torch_save({"state_dict": state_dict, **meta}, path)


def _component_modules(model: StableDiffusionModel) -> dict[str, torch.nn.Module]:
    modules: dict[str, torch.nn.Module] = {"unet": model.unet, "vae": model.vae}
    modules.update({spec.component: te for spec, te in zip(model.family.text_encoders, model.text_encoders)})
    return modules


def _component_state_dicts(model: StableDiffusionModel) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts with text encoders in canonical ``text_model.*`` names (transformers 5's CLIPTextModel drops them)."""
    out = {}
    for name, module in _component_modules(model).items():
        state_dict = module.state_dict()
        if name.startswith("text_encoder"):
            state_dict = {_canonical_te_key(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
        out[name] = state_dict
    return out


def _canonical_te_key(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def _module_te_keys(weights: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical ``text_model.*`` names -> the names this module's state dict uses."""
    if any(k.startswith("text_model.") for k in module.state_dict()):
        return {_canonical_te_key(k): v for k, v in weights.items()}
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in weights.items()}


# --------------------------------------------------------------------------------------------------
# entry points the scripts use


def load_model(path: str | os.PathLike, family: str | None = None, vae: str | None = None,
               model_config: str | None = None, prediction_type: str | None = None,
               mmap: bool = True) -> StableDiffusionModel:
    """Load a diffusers folder or a single file; ``vae`` replaces the VAE (a file or a folder).
    ``mmap=False`` reads a single .safetensors file whole instead of memory-mapping it (faster on WSL)."""
    p = Path(path)
    if not p.exists():
        hint = ""
        if not p.is_absolute() and str(path).count("/") == 1 and not is_single_file(path):
            hint = " (model hub names cannot be downloaded here: download the model and pass its local path)"
        raise ModelLoadError(f"{path} does not exist: pass a diffusers model folder or a .safetensors/.ckpt file{hint}")
    detected = detect_family(p)  # a damaged file fails here, with the same message as at start-up
    if family is not None and detected is not None and resolve_family(family) is not detected:
        raise ModelLoadError(f"{p} holds an {detected.name} model, but --family {family} was given; drop the flag or "
                             "pick the right model")
    if p.is_dir():
        model = load_diffusers(p)
        if family is not None and resolve_family(family) is not model.family:
            raise ModelLoadError(f"{p} holds an {model.family.name} model, but --family {family} was given")
        if prediction_type is not None and prediction_type != model.prediction_type:
            model.scheduler = EulerDiscreteScheduler.from_config(model.scheduler.config, prediction_type=prediction_type)
    elif is_single_file(p):
        model = load_single_file(p, family, model_config, prediction_type, mmap=mmap)
    else:
        raise ModelLoadError(f"{p} is neither a diffusers folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint")
    if vae is not None:
        model.vae = load_vae(vae, model.vae.config)
    return model


def load_vae(path: str | os.PathLike, config: Any) -> AutoencoderKL:
    """A VAE from a diffusers folder (with or without a vae/ subfolder) or a VAE-only / full single file."""
    p = Path(path)
    if p.is_dir():
        sub = "vae" if (p / "vae" / "config.json").is_file() else None
        if sub is None and not (p / "config.json").is_file():
            raise ModelLoadError(f"--vae {p} is not a diffusers VAE folder: config.json is missing")
        return AutoencoderKL.from_pretrained(p, subfolder=sub, local_files_only=True).eval()
    if not p.is_file():
        raise ModelLoadError(f"--vae {p} does not exist")
    state_dict = read_state_dict(p)
    vae = AutoencoderKL(**_without_class_name(_plain_config(config)))
    weights = ldm_layout.vae_ldm_to_diffusers(ldm_layout.strip_vae_prefix(state_dict), len(vae.config.block_out_channels))
    missing = sorted(set(vae.state_dict()) - set(weights))
    if missing:
        raise ModelLoadError(f"--vae {p} is not a VAE checkpoint: {len(missing)} weights missing (first: {missing[0]})")
    vae.load_state_dict(weights)
    return vae.eval()
