"""Caption a folder of images with a transformers image-to-text model (BLIP, GIT, or any compatible one).

``run_captioner(options)`` is ``tools/make_captions.py`` / ``tools/make_captions_by_git.py`` without their
command lines. The model is ``AutoProcessor`` + ``AutoModelForImageTextToText`` (falling back to
``AutoModelForCausalLM``, where GIT-style models also register) from a hub id or a local folder; kohya's
BLIP used its own copy of Salesforce's code and a ``.pth`` file, we use the same weights as published for
transformers. Generation: nucleus sampling (``top_p``) by default for BLIP as in kohya, beam search with
``beam_search``, greedy for GIT as in kohya; ``max_length``/``min_length`` count tokens as transformers does
(the prompt's included). BLIP continues the prompt "a picture of " (kohya's BLIP did; without it BLIP-large
tends to start captions with the non-word "arafed"), which is cut from the caption.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from library.data.caption_files import (KEEP, LabellingError, LabelSummary, caption_path, find_images,
                                        images_to_label, write_caption)
from library.data.image_batches import image_batches

# GIT (trained on TextCaps) reads text into images that has none: "a girl with the words "hello" on it".
# --remove_words cuts such phrases, the purpose kohya's make_captions_by_git.py gave the flag.
_TEXT_PHRASES = [
    re.compile(r"\s*\b(?:has|with|and) the (?:words?|letters?|name) (?:\"[^\"]*\"|\w+)"
               r"(?: (?:is )?(?:on|in) (?:the |her |their |him )?\w+)?"),
    re.compile(r"\s*(?:with a sign )?\bthat says ?(?:\"[^\"]*\"|'[^']*'|\w+)(?: on it)?"),
    re.compile(r"\s*\bwith the number \d+ on (?:it|\w+ \w+)"),
    re.compile(r"\s*\b(?:the )?word \w+ on it"),
]
_FILLER_WORDS = frozenset("a an the of and with in on at to is are its it".split())


@dataclass(frozen=True)
class GenerationOptions:
    """kohya's generation flags; ``extra`` is passed to ``generate`` unchanged (and wins)."""

    max_length: int
    min_length: int = 0
    beam_search: bool = False
    num_beams: int = 1
    sample: bool = False  # nucleus sampling with top_p (ignored with beam_search)
    top_p: float = 0.9
    extra: dict[str, Any] = field(default_factory=dict)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_length": self.max_length, "min_length": self.min_length}
        if self.beam_search:
            kwargs.update(do_sample=False, num_beams=self.num_beams)
        elif self.sample:
            kwargs.update(do_sample=True, top_p=self.top_p, num_beams=1)
        else:
            kwargs.update(do_sample=False, num_beams=1)
        return {**kwargs, **self.extra}


@dataclass(frozen=True)
class CaptionerOptions:
    train_data_dir: Path
    model_id: str
    generation: GenerationOptions
    batch_size: int = 1
    num_workers: int = 0
    caption_extension: str = ".caption"
    recursive: bool = False
    mode: str = KEEP
    seed: int | None = 42
    prompt: str | None = None  # text the caption continues (kohya's BLIP: "a picture of "), cut from the result
    remove_words: bool = False
    debug: bool = False


def remove_text_phrases(caption: str) -> str:
    """``--remove_words``: cut phrases that claim to read text in the image; whitespace tidied."""
    for pattern in _TEXT_PHRASES:
        caption = pattern.sub("", caption)
    return " ".join(caption.split())


def load_captioner(model_id: str, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """(processor, model in eval mode on ``device``); an unloadable id or folder is one LabellingError."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_id)
        except ValueError:  # not registered as image-text-to-text: a causal LM with an image encoder
            model = AutoModelForCausalLM.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LabellingError(f"--model_id {model_id}: cannot load an image-to-text model ({first}); pass a hub id "
                             "or a local folder saved with save_pretrained (offline, download it first with "
                             f"`hf download {model_id}`)") from error
    return processor, model.to(device).eval()


def text_positions(model: torch.nn.Module) -> int | None:
    """How many text tokens the model can place (longer generations fail inside its embedding)."""
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    positions = getattr(text_config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def without_prompt(caption: str, prompt: str | None) -> str:
    """The generated text after the prompt (kohya cut BLIP's "a picture of " the same way)."""
    caption = caption.strip()
    head = " ".join((prompt or "").split()).lower()
    if head and caption.lower().startswith(head):
        caption = caption[len(head):].strip()
    return caption


def _pixel_values(processor: Any, rgb) -> torch.Tensor:
    return processor(images=rgb, return_tensors="pt")["pixel_values"][0]


def caption_words(caption: str) -> list[str]:
    """Words counted for the summary (without filler words)."""
    return [word for word in re.findall(r"[\w'-]+", caption.lower()) if word not in _FILLER_WORDS]


def run_captioner(options: CaptionerOptions, *, device: torch.device | None = None,
                  echo: Callable[[str], None] = print) -> LabelSummary:
    """Caption every image of ``options.train_data_dir`` that has no caption file (all with OVERWRITE)."""
    images = find_images(options.train_data_dir, recursive=options.recursive)
    todo, kept = images_to_label(images, extension=options.caption_extension, mode=options.mode)
    echo(f"found {len(images)} images in {options.train_data_dir}" +
         (f"; {len(kept)} already have a {options.caption_extension} file and are kept" if kept else ""))
    summary = LabelSummary(kept=kept)
    if not todo:
        return summary
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor, model = load_captioner(options.model_id, device)
    echo(f"captioner {options.model_id} ({type(model).__name__}) on {device}")
    kwargs = options.generation.generate_kwargs()
    positions = text_positions(model)
    if positions and kwargs.get("max_length", 0) > positions:
        raise LabellingError(f"--max_length {kwargs['max_length']} is above the {positions} text positions of "
                             f"{options.model_id}: lower it")
    if options.seed is not None:  # sampling is reproducible run to run, as kohya's --seed promised
        torch.manual_seed(options.seed)
        np.random.seed(options.seed)
        random.seed(options.seed)
    progress = tqdm(total=len(todo), desc="captioning", unit="img", smoothing=0.0)
    for batch in image_batches(todo, partial(_pixel_values, processor), batch_size=options.batch_size,
                               num_workers=options.num_workers):
        for failure in batch.failures:
            tqdm.write(f"warning: {failure}")
        summary.failed.extend(batch.failures)
        if batch.paths:
            pixel_values = torch.stack(batch.prepared).to(device=device, dtype=model.dtype)
            inputs = {}
            if options.prompt:
                text = processor(text=[options.prompt] * len(batch.paths), return_tensors="pt")
                inputs = {key: text[key].to(device) for key in ("input_ids", "attention_mask")}
            with torch.no_grad():
                generated = model.generate(pixel_values=pixel_values, **inputs, **kwargs)
            captions = [without_prompt(text, options.prompt)
                        for text in processor.batch_decode(generated, skip_special_tokens=True)]
            for path, caption in zip(batch.paths, captions):
                if options.remove_words:
                    caption = remove_text_phrases(caption)
                write_caption(caption_path(path, options.caption_extension), caption)
                summary.add(caption_words(caption))
                if options.debug:
                    tqdm.write(f"{path}: {caption}")
        progress.update(len(batch.paths) + len(batch.failures))
    progress.close()
    return summary
