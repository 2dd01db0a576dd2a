"""Sample images during training from a prompt file (kohya's `--sample_prompts` family of flags).

Prompt files come in kohya's three shapes:

    .txt   one prompt per line; `#` lines and blank lines are skipped; options after " --":
           --n negative  --w width  --h height  --d seed  --l CFG scale  --s steps  --ss sampler  --cn image
    .toml  [prompt] holds defaults, every [[prompt.subset]] one prompt (keys as in `_DICT_KEYS`)
    .json  a list of such dicts, or of strings written like a .txt line

Sampling goes through diffusers' own pipelines built from the modules being trained (`model.to_pipeline()`),
so a UNet carrying LoRA modules is sampled as it is, with nothing copied or reloaded. The prompts are
encoded by OUR `PromptEncoder` (A1111 long prompts, clip skip) and handed to the pipeline as embeddings,
so the samples see exactly the conditioning training sees. Models are put in eval mode for sampling and
given back in the train/eval state (per submodule) and on the device they had; the global RNG is left as
it was, so turning sampling on does not change the training run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from library import toml_values
from library.io import atomic_write_file

if TYPE_CHECKING:  # pragma: no cover - types only
    from PIL import Image

    from library.models.loading import StableDiffusionModel
    from library.models.text_encoding import PromptEncoder

logger = logging.getLogger(__name__)

DEFAULT_CFG_SCALE = 7.5
DEFAULT_STEPS = 30
MIN_STEPS, MAX_STEPS = 1, 1000
MIN_SIZE = 64
SIZE_MULTIPLE = 8
DEFAULT_SAMPLER = "ddim"

# kohya's sampler names -> (diffusers scheduler class, config overrides). The overrides are the values
# Stable Diffusion's own scheduler configs use: SD latents are not bounded to [-1, 1], so DDIM must not
# clip its x0 estimate, and PNDM runs in PLMS mode (its Runge-Kutta warm-up needs many more steps).
_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"lower_order_final": True}),
}
SAMPLER_ALIASES: dict[str, str] = {
    "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a",
}
SAMPLER_NAMES: tuple[str, ...] = (*_SAMPLERS, *SAMPLER_ALIASES)

# Inline options kohya accepts only for its DiT models (FLUX, SD3, Lumina): named in the error message.
_DIT_OPTIONS = frozenset({"g", "ctr", "rcfg", "fs"})
_INLINE_OPTION = re.compile(r"^(?P<name>[A-Za-z_]+)(?:\s+(?P<value>.*))?$", re.DOTALL)
# Keys of a .toml subset / .json dict -> SamplePrompt field (kohya's names first, our field names as aliases).
_DICT_KEYS: dict[str, str] = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
    "sample_steps": "steps", "steps": "steps", "scale": "cfg_scale", "cfg_scale": "cfg_scale", "seed": "seed",
    "sample_sampler": "sampler", "controlnet_image": "controlnet_image",
}


class SamplePromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line or entry."""


@dataclass(frozen=True)
class SamplePrompt:
    """One sample to draw. Sizes and steps are normalised here, so every file format gets the same rules."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    cfg_scale: float = DEFAULT_CFG_SCALE
    steps: int = DEFAULT_STEPS
    sampler: str | None = None  # None: the run's --sample_sampler
    controlnet_image: str | None = None
    index: int = 0  # position in the prompt file: the `_00_` of the file name, stable across ranks

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", _round_size(self.width))
        object.__setattr__(self, "height", _round_size(self.height))
        object.__setattr__(self, "steps", max(MIN_STEPS, min(MAX_STEPS, int(self.steps))))
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        if self.sampler is not None:
            _canonical_sampler(self.sampler)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63 - 1, got {self.seed}")


def _round_size(size: int) -> int:
    """Down to a multiple of 8 (the VAE's factor), at least 64, as kohya does."""
    return max(MIN_SIZE, int(size) // SIZE_MULTIPLE * SIZE_MULTIPLE)


def _canonical_sampler(name: str) -> str:
    key = name.lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLER_NAMES)}")
    return key


# --------------------------------------------------------------------------------------------------
# prompt files


def load_sample_prompts(path: str | os.PathLike, default_size: int) -> list[SamplePrompt]:
    """Read a .txt, .toml or .json prompt file; sizes not given default to ``default_size``.

    kohya defaults to 512 px even for SDXL; the caller passes the training resolution instead, so samples
    come out at the size the model is being taught.
    """
    path = Path(path)
    if not path.is_file():
        raise SamplePromptError(f"sample prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = _load_txt(path, default_size)
    elif suffix == ".toml":
        prompts = _load_toml(path, default_size)
    elif suffix == ".json":
        prompts = _load_json(path, default_size)
    else:
        raise SamplePromptError(f"sample prompt file {path}: unknown format {suffix!r}; use .txt, .toml or .json")
    return [_with_index(p, i) for i, p in enumerate(prompts)]


def _with_index(prompt: SamplePrompt, index: int) -> SamplePrompt:
    return replace(prompt, index=index)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise SamplePromptError(f"sample prompt file {path} is not UTF-8 text ({error})") from error


def _load_txt(path: Path, default_size: int) -> list[SamplePrompt]:
    prompts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        prompts.append(parse_prompt_line(stripped, default_size, f"{path}, line {number}", path.parent))
    return prompts


def parse_prompt_line(line: str, default_size: int, where: str = "prompt",
                      base_dir: Path | None = None) -> SamplePrompt:
    """One kohya prompt line: ``text --n negative --w 768 --d 42 ...``; ``where`` prefixes error messages."""
    parts = re.split(r"(?:^|\s+)--", line.strip())
    values: dict[str, Any] = {"prompt": parts[0].strip(), "width": default_size, "height": default_size}
    for part in parts[1:]:
        match = _INLINE_OPTION.match(part.strip())
        if match is None:
            raise SamplePromptError(f"{where}: cannot read the option '--{part.strip()}'")
        name, value = match.group("name").lower(), (match.group("value") or "").strip()  # kohya: case-insensitive
        values.update(_inline_option(name, value, where, base_dir))
    try:
        return SamplePrompt(**values)
    except ValueError as error:
        raise SamplePromptError(f"{where}: {error}") from error


def _inline_option(name: str, value: str, where: str, base_dir: Path | None) -> dict[str, Any]:
    if name == "n":
        return {"negative_prompt": value}
    if name in _DIT_OPTIONS:
        raise SamplePromptError(f"{where}: '--{name}' is an option of kohya's DiT models (FLUX, SD3, Lumina); "
                                "Stable Diffusion sampling has no use for it")
    converters = {"w": ("width", int), "h": ("height", int), "d": ("seed", int), "l": ("cfg_scale", float),
                  "s": ("steps", int), "ss": ("sampler", str), "cn": ("controlnet_image", str)}
    if name not in converters:
        raise SamplePromptError(f"{where}: unknown option '--{name}'; expected one of "
                                "--n, --w, --h, --d, --l, --s, --ss, --cn")
    key, convert = converters[name]
    if not value:
        raise SamplePromptError(f"{where}: '--{name}' needs a value")
    try:
        converted = convert(value)
    except ValueError:
        raise SamplePromptError(f"{where}: '--{name} {value}' is not a valid {convert.__name__}") from None
    if key == "controlnet_image":
        converted = _resolve_image_path(converted, base_dir)
    return {key: converted}


def _resolve_image_path(value: str, base_dir: Path | None) -> str:
    """A relative control image path is looked up beside the prompt file first, then as given."""
    candidate = Path(value)
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).is_file():
        return str(base_dir / candidate)
    return value


def _load_toml(path: Path, default_size: int) -> list[SamplePrompt]:
    try:
        data = toml_values.loads(_read_text(path))
    except toml_values.TomlDecodeError as error:
        raise SamplePromptError(f"sample prompt file {path} is not valid TOML: {error}") from error
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise SamplePromptError(f"sample prompt file {path}: expected a [prompt] table with [[prompt.subset]] entries")
    defaults = {k: v for k, v in table.items() if k != "subset"}
    prompts = []
    for number, subset in enumerate(table["subset"]):
        where = f"{path}, [[prompt.subset]] #{number + 1}"
        if not isinstance(subset, dict):
            raise SamplePromptError(f"{where}: expected a table")
        # kohya builds dict(**defaults, **subset), which fails when a subset repeats a default; we override.
        prompts.append(_prompt_from_dict({**defaults, **subset}, default_size, where, path.parent))
    return prompts


def _load_json(path: Path, default_size: int) -> list[SamplePrompt]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise SamplePromptError(f"sample prompt file {path} is not valid JSON: {error}") from error
    if not isinstance(data, list):
        raise SamplePromptError(f"sample prompt file {path}: expected a list of prompts (strings or objects)")
    prompts = []
    for number, entry in enumerate(data):
        where = f"{path}, entry #{number + 1}"
        if isinstance(entry, str):
            prompts.append(parse_prompt_line(entry, default_size, where, path.parent))
        elif isinstance(entry, dict):
            prompts.append(_prompt_from_dict(entry, default_size, where, path.parent))
        else:
            raise SamplePromptError(f"{where}: expected a string or an object, got {type(entry).__name__}")
    return prompts


def _prompt_from_dict(entry: dict[str, Any], default_size: int, where: str, base_dir: Path) -> SamplePrompt:
    unknown = sorted(set(entry) - set(_DICT_KEYS))
    if unknown:
        raise SamplePromptError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(_DICT_KEYS)}")
    values: dict[str, Any] = {"width": default_size, "height": default_size}
    for key, value in entry.items():
        values[_DICT_KEYS[key]] = _checked_value(key, value, where)
    if "prompt" not in values:
        raise SamplePromptError(f"{where}: 'prompt' is missing")
    if values.get("controlnet_image") is not None:
        values["controlnet_image"] = _resolve_image_path(values["controlnet_image"], base_dir)
    try:
        return SamplePrompt(**values)
    except ValueError as error:
        raise SamplePromptError(f"{where}: {error}") from error


def _checked_value(key: str, value: Any, where: str) -> Any:
    field_name = _DICT_KEYS[key]
    if field_name in ("prompt", "negative_prompt", "sampler", "controlnet_image"):
        ok = isinstance(value, str)
        expected = "a string"
    elif field_name == "cfg_scale":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    else:  # width, height, steps, seed
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    if not ok:
        raise SamplePromptError(f"{where}: '{key}' must be {expected}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# samplers and triggers


def make_sampler(name: str, scheduler_config: Any) -> Any:
    """A fresh diffusers scheduler for kohya sampler ``name`` on the model's noise schedule.

    Built ``from_config`` of the model's scheduler config, so the betas, the timestep spacing and above all
    ``prediction_type`` (v-prediction for SD 2.x 768-v) stay the model's.
    """
    import diffusers

    class_name, overrides = _SAMPLERS[_canonical_sampler(name)]
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return getattr(diffusers, class_name).from_config({**config, **overrides})


def check_sampler(name: str) -> None:
    """Build sampler ``name`` once with its defaults, so a missing optional dependency (LMS needs scipy) fails
    at start-up instead of at the first sample, hours in."""
    import diffusers

    class_name, overrides = _SAMPLERS[_canonical_sampler(name)]
    try:
        getattr(diffusers, class_name)(**overrides)
    except ImportError as error:
        raise ImportError(f"sampler {name} ({class_name}) cannot be built: {' '.join(str(error).split())}") from None


def should_sample(step: int, epoch: int | None, every_n_steps: int | None, every_n_epochs: int | None,
                  at_first: bool, is_epoch_end: bool, before_training: bool | None = None) -> bool:
    """Whether to sample now, with kohya's rules.

    Called once before training (``before_training``; by default: ``step == 0``), after every optimizer
    step ``step`` (``is_epoch_end=False``) and after every epoch (``is_epoch_end=True``, ``epoch`` = epochs
    completed, from 1). ``every_n_epochs`` wins: when it is set, ``every_n_steps`` is ignored.
    """
    if before_training is None:
        before_training = step == 0 and not is_epoch_end
    if before_training:
        return at_first
    if every_n_epochs:
        return is_epoch_end and epoch is not None and epoch % every_n_epochs == 0
    if every_n_steps:
        return not is_epoch_end and step > 0 and step % every_n_steps == 0
    return False


def default_seed(step: int, index: int) -> int:
    """The seed of a prompt without ``--d``: the same at the same (step, prompt), on every rank and rerun."""
    return zlib.crc32(f"{step}:{index}".encode())


# --------------------------------------------------------------------------------------------------
# generation


@dataclass
class SampleImage:
    """One saved sample: where it went, the image (for TensorBoard / wandb) and what produced it."""

    path: Path
    image: "Image.Image"
    prompt: SamplePrompt
    seed: int


def sample_file_name(output_name: str | None, step: int, epoch: int | None, index: int, seed: int | None,
                     now: datetime | None = None) -> str:
    """kohya's name: ``{output_name_}{e000001 | 000123}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}].png``."""
    prefix = f"{output_name}_" if output_name else ""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{index:02d}_{stamp}{seed_suffix}.png"


def generate_samples(model: "StableDiffusionModel", prompt_encoder: "PromptEncoder", prompts: Sequence[SamplePrompt],
                     output_dir: str | os.PathLike, output_name: str | None, step: int, epoch: int | None,
                     default_sampler: str, device: torch.device | str, dtype: torch.dtype,
                     controlnet: nn.Module | None = None, distributed_state: Any = None,
                     keep_images: bool = True) -> list[SampleImage]:
    """Draw every prompt (this rank's share of them) and save PNGs under ``output_dir/sample``.

    ``dtype`` is the compute dtype (fp16/bf16 run under autocast). ``distributed_state`` (an
    ``accelerate.PartialState``) splits the prompts across processes; each rank returns its own images.
    ``keep_images=False``: draw (a sharded model needs every rank's forwards) but write and return nothing.
    """
    device = torch.device(device)
    default_sampler = _canonical_sampler(default_sampler)
    if distributed_state is not None:
        with distributed_state.split_between_processes(list(prompts)) as local:
            prompts = list(local)
    if not prompts:
        return []
    sample_dir = Path(output_dir) / "sample"
    if keep_images:
        sample_dir.mkdir(parents=True, exist_ok=True)
    denoisers = [m for m in (model.unet, model.vae, controlnet) if m is not None]
    with _sampling_mode([*denoisers, *model.text_encoders]), _on_device(denoisers, device), \
            _global_rng_kept(device), torch.no_grad():
        pipeline = model.to_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        controlled = _controlnet_pipeline(model, controlnet) if controlnet is not None else None
        results = []
        for prompt in prompts:
            seed = prompt.seed if prompt.seed is not None else default_seed(step, prompt.index)
            image = _draw(model, pipeline, controlled, prompt_encoder, prompt, seed, default_sampler, device, dtype)
            if not keep_images:
                continue
            name = sample_file_name(output_name, step, epoch, prompt.index, prompt.seed)
            path = _save_png(image, sample_dir / name, _png_parameters(prompt, seed, default_sampler))
            results.append(SampleImage(path, image, prompt, seed))
    return results


def _draw(model: "StableDiffusionModel", pipeline: Any, controlled: Any, prompt_encoder: "PromptEncoder",
          prompt: SamplePrompt, seed: int, default_sampler: str, device: torch.device,
          dtype: torch.dtype) -> "Image.Image":
    """One image. A prompt without --cn is drawn without the ControlNet even while one is trained."""
    kwargs = _prompt_embeddings(prompt_encoder, prompt, device)
    if controlled is not None and prompt.controlnet_image is not None:
        pipeline = controlled
        kwargs["image"] = _load_control_image(prompt)
    elif prompt.controlnet_image is not None:
        logger.warning("sample prompt %d has --cn %s but no ControlNet is trained; the image is ignored",
                       prompt.index, prompt.controlnet_image)
    pipeline.scheduler = make_sampler(prompt.sampler or default_sampler, model.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(seed)  # same noise on every device type
    autocast = dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        output = pipeline(**kwargs, width=prompt.width, height=prompt.height, num_inference_steps=prompt.steps,
                          guidance_scale=prompt.cfg_scale, generator=generator, output_type="pil")
    return output.images[0]


def _prompt_embeddings(prompt_encoder: "PromptEncoder", prompt: SamplePrompt, device: torch.device) -> dict[str, Any]:
    """Positive and negative conditioning from our encoder, in one batch (so they share a chunk count)."""
    encoded = prompt_encoder.encode([prompt.prompt, prompt.negative_prompt])
    hidden = encoded.hidden_states.to(device)
    assert hidden.shape[0] == 2, "one positive and one negative prompt were encoded"
    kwargs: dict[str, Any] = {"prompt_embeds": hidden[:1], "negative_prompt_embeds": hidden[1:]}
    if encoded.pooled is not None:
        pooled = encoded.pooled.to(device)
        kwargs.update(pooled_prompt_embeds=pooled[:1], negative_pooled_prompt_embeds=pooled[1:])
    return kwargs


def _controlnet_pipeline(model: "StableDiffusionModel", controlnet: nn.Module) -> Any:
    """The ControlNet pipeline over the model's own modules (built directly: `from_pipe` would cast them)."""
    pipeline = model.to_pipeline(controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load_control_image(prompt: SamplePrompt) -> "Image.Image":
    from PIL import Image

    path = Path(prompt.controlnet_image or "")
    if not path.is_file():
        raise FileNotFoundError(f"sample prompt {prompt.index}: ControlNet image {path} does not exist")
    with Image.open(path) as image:
        return image.convert("RGB").resize((prompt.width, prompt.height), Image.Resampling.LANCZOS)


def _png_parameters(prompt: SamplePrompt, seed: int, default_sampler: str) -> str:
    """A1111-style "parameters" text, so a sample can be reproduced from the file alone."""
    text = prompt.prompt
    if prompt.negative_prompt:
        text += f"\nNegative prompt: {prompt.negative_prompt}"
    return (f"{text}\nSteps: {prompt.steps}, Sampler: {prompt.sampler or default_sampler}, "
            f"CFG scale: {prompt.cfg_scale}, Seed: {seed}, Size: {prompt.width}x{prompt.height}")


def _save_png(image: "Image.Image", path: Path, parameters: str) -> Path:
    """Write to a temp file and rename, so a crash never leaves a half-written sample."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    atomic_write_file(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))
    return path


@contextlib.contextmanager
def _sampling_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode for sampling; afterwards every submodule gets back its own train/eval flag."""
    saved = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for sub, training in saved:
            sub.training = training


@contextlib.contextmanager
def _on_device(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Moves modules that live elsewhere (a VAE parked on the CPU after latent caching) and back."""
    moved = []
    for module in modules:
        current = next(module.parameters()).device
        if current != device and not (current.type == device.type and device.index is None):
            moved.append((module, current))
            module.to(device)
    try:
        yield
    finally:
        for module, original in moved:
            module.to(original)


@contextlib.contextmanager
def _global_rng_kept(device: torch.device) -> Iterator[None]:
    """Sampling draws from its own generators; this keeps any stray global draw out of the training RNG."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
