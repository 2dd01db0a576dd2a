"""The real CLIP BPE tokenizer, built offline from the vocabulary file that ships in open_clip's wheel.

No model hub is reachable on CI or on most users' CI machines, so the tokenizer cannot be downloaded.
open-clip-torch carries OpenAI's ``bpe_simple_vocab_16e6.txt.gz``; from it we rebuild exactly the
``vocab.json``/``merges.txt`` pair that ``openai/clip-vit-large-patch14`` uses (49408 tokens).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
# Stable Diffusion 2 and SDXL's second tokenizer pad with "!" (id 0), as open_clip pads with zeros.
PAD_WITH_EXCLAMATION = "!"
_NUM_MERGES = 49152 - 256 - 2


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The CLIP vocabulary comes from the open-clip-torch package, which is not installed. "
            "Install it without its dependencies: pip install --no-deps open-clip-torch==3.3.0"
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall open-clip-torch (pip install --no-deps open-clip-torch==3.3.0)")
    return path


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE is defined over."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49408-token vocabulary and the BPE merge list, in OpenAI CLIP's order."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer; ``pad_token="!"`` gives the SD2 / SDXL-second-encoder variant (pad != eos)."""
    vocab, merges = clip_vocab_and_merges()
    # transformers 5 takes the vocabulary as a dict and merges as pairs; the old *_file arguments are ignored.
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
