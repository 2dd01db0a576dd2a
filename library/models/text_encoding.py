"""Prompt -> text-encoder conditioning for SD1, SD2 and SDXL, with A1111-style long prompts.

CLIP sees 77 positions (BOS, 75 tokens, EOS). To condition on longer prompts, kohya's ``--max_token_length``
(75, 150, 225; here any positive multiple of 75) splits the caption into ``n = max_token_length // 75``
chunks of 77, encodes every chunk separately and concatenates the states back into ``n * 75 + 2`` positions:

    chunk k   = BOS, caption tokens [75k, 75k + 75), EOS, then PAD up to 77
    merged    = BOS state of chunk 0, positions 1..75 of every chunk in order, last position of the last chunk

This is exactly what kohya feeds the UNet (so LoRAs trained here and there see the same conditioning), but
built directly instead of "tokenize to n*75+2, slice, then patch the slices": kohya's patch-ups look for
pad ids, and SD2 / SDXL-TE2 pad with id 0, which is also the id of a real "!" token in the caption.

With ``--weighted_captions`` (``PromptEncoder(weighted=True)``) the captions' A1111 emphasis ``(word:1.3)`` is
parsed (library/models/prompt_weights.py) and each token's merged hidden state is multiplied by its weight,
as kohya v0.10's ``encode_tokens_with_weights`` does: no mean rescaling (kohya's pre-0.9 training path and
A1111 rescale; kohya's strategies, which its training uses now, do not), SDXL's pooled vector unweighted.

Every chunk of every prompt goes through the encoder in one batched call. Nothing here holds state; the
functions run under ``torch.no_grad`` or with grad (text-encoder training) on the encoders' device/dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from library.models.clip_tokenizer import EOS_ID
from library.models.families import FamilyName, ModelFamily, resolve_family
from library.models.prompt_weights import token_weights

CHUNK_TOKENS = 75  # caption tokens per 77-position CLIP window
CHUNK_LENGTH = CHUNK_TOKENS + 2


@dataclass
class EncodedPrompts:
    """What the UNet is conditioned on: ``hidden_states`` (B, n*75+2, D); ``pooled`` (B, P) for SDXL, else None."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None


def chunk_count(max_token_length: int) -> int:
    """Number of 77-token chunks for ``max_token_length``; rejects values that are not a positive multiple of 75."""
    if isinstance(max_token_length, bool) or not isinstance(max_token_length, int) or max_token_length <= 0 \
            or max_token_length % CHUNK_TOKENS != 0:
        raise ValueError(
            f"max_token_length must be a positive multiple of {CHUNK_TOKENS} (75, 150, 225, ...), "
            f"got {max_token_length!r}"
        )
    return max_token_length // CHUNK_TOKENS


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids of shape (B, n, 77): per chunk BOS, up to 75 caption tokens, EOS, then the tokenizer's PAD.

    Captions longer than ``n * 75`` tokens are truncated. This equals kohya's "pad to n*75+2 and split" with
    its pad != eos fix-ups (a full chunk ends in EOS, an empty chunk is BOS EOS PAD..., the chunk in which
    the caption ends keeps its EOS followed by PAD); with pad == eos (SD1, SDXL TE1) it is the same thing.
    """
    n = chunk_count(max_token_length)
    if isinstance(prompts, str):
        raise TypeError("tokenize_prompts takes a list of prompts, not a single string")
    if not prompts:
        return torch.empty((0, n, CHUNK_LENGTH), dtype=torch.long)
    content = tokenizer(
        list(prompts), add_special_tokens=False, truncation=True, max_length=n * CHUNK_TOKENS
    )["input_ids"]
    return _lay_out_chunks(tokenizer, content, n)


def tokenize_weighted_prompts(tokenizer, prompts: Sequence[str], max_token_length: int = 75
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``--weighted_captions``: ids as ``tokenize_prompts`` lays them out, of the captions with their A1111
    emphasis syntax parsed away, and float32 weights of the same shape (B, n, 77): each caption token's weight
    at its position in its chunk (a weighted word past token 75 lands in chunk 1), 1.0 at BOS, EOS and PAD."""
    n = chunk_count(max_token_length)
    if isinstance(prompts, str):
        raise TypeError("tokenize_weighted_prompts takes a list of prompts, not a single string")
    parsed = [token_weights(tokenizer, prompt, n * CHUNK_TOKENS) for prompt in prompts]
    ids = _lay_out_chunks(tokenizer, [tokens for tokens, _ in parsed], n)
    weights = torch.ones(ids.shape, dtype=torch.float32)
    for b, (_, token_weight) in enumerate(parsed):
        for k in range(n):
            part = token_weight[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS]
            weights[b, k, 1 : 1 + len(part)] = torch.tensor(part, dtype=torch.float32)
    return ids, weights


def _lay_out_chunks(tokenizer, content: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """Caption token ids (at most n*75 each) -> (B, n, 77): per chunk BOS, its tokens, EOS, then PAD."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.full((len(content), n, CHUNK_LENGTH), pad, dtype=torch.long)
    ids[:, :, 0] = bos
    for b, tokens in enumerate(content):
        for k in range(n):
            part = tokens[k * CHUNK_TOKENS : (k + 1) * CHUNK_TOKENS]
            ids[b, k, 1 : 1 + len(part)] = torch.tensor(part, dtype=torch.long)
            ids[b, k, 1 + len(part)] = eos
    return ids


def merge_chunks(chunk_states: torch.Tensor, n: int) -> torch.Tensor:
    """(B*n, 77, D) per-chunk states -> (B, n*75+2, D): chunk 0's BOS, positions 1..75 of each chunk, last of last.

    Same layout as kohya's merge (the empty-chunk EOS states stay in place, as there). Out of place, so
    autograd flows through it.
    """
    rows, length, dim = chunk_states.shape
    if length != CHUNK_LENGTH or rows % n != 0:
        raise ValueError(f"expected (B*{n}, {CHUNK_LENGTH}, D) chunk states, got {tuple(chunk_states.shape)}")
    states = chunk_states.reshape(rows // n, n, CHUNK_LENGTH, dim)
    middle = states[:, :, 1 : 1 + CHUNK_TOKENS].reshape(rows // n, n * CHUNK_TOKENS, dim)
    return torch.cat([states[:, 0, :1], middle, states[:, -1, -1:]], dim=1)


def merge_chunk_weights(weights: torch.Tensor) -> torch.Tensor:
    """(B, n, 77) per-chunk token weights -> (B, n*75+2), aligned with ``merge_chunks``' positions (1.0 at the
    BOS and last positions, which never carry a caption token)."""
    ones = weights.new_ones((weights.shape[0], 1))
    return torch.cat([ones, weights[:, :, 1 : 1 + CHUNK_TOKENS].reshape(weights.shape[0], -1), ones], dim=1)


def _weighted(states: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Merged states (B, n*75+2, D) times each position's weight; ``states`` itself when unweighted."""
    if weights is None:
        return states
    merged = merge_chunk_weights(weights).to(device=states.device, dtype=states.dtype)
    if merged.shape != states.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match states {tuple(states.shape)}")
    return states * merged.unsqueeze(-1)


def _unwrap(module: nn.Module) -> nn.Module:
    """The bare model under DDP / accelerate wrappers, to reach its submodules."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    # transformers 5 dropped the `.text_model` level from CLIPTextModel (it is the transformer itself);
    # CLIPTextModelWithProjection and transformers 4 still have it.
    model = _unwrap(text_encoder)
    model = getattr(model, "text_model", model)
    return model.final_layer_norm


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _flat(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    if tokens.ndim != 3 or tokens.shape[-1] != CHUNK_LENGTH:
        raise ValueError(f"expected token ids of shape (B, n, {CHUNK_LENGTH}), got {tuple(tokens.shape)}")
    return tokens.reshape(-1, CHUNK_LENGTH), tokens.shape[1]


def encode_sd(text_encoder: nn.Module, tokens: torch.Tensor, clip_skip: int | None = None, *,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """SD1 / SD2 hidden states (B, n*75+2, D): the last layer, or ``hidden_states[-clip_skip]``, final LN applied.

    SD2: diffusers' SD2 text encoder stores only 23 of OpenCLIP-H's 24 layers, so its last hidden state
    (with final LN) already IS the original model's penultimate layer, which is what SD2 was trained on
    (diffusers' StableDiffusionPipeline uses it the same way). ``clip_skip`` counts from there as for SD1.
    ``clip_skip`` None or 1 is the last layer; k >= 2 is kohya's / A1111's "CLIP skip k".
    ``weights`` (B, n, 77), from ``tokenize_weighted_prompts``, scale each token's state.
    """
    ids, n = _flat(tokens)
    ids = ids.to(_device(text_encoder))
    if clip_skip is None or clip_skip == 1:
        states = text_encoder(ids).last_hidden_state
    else:
        layers = text_encoder(ids, output_hidden_states=True).hidden_states  # embeddings + one per layer
        if not 2 <= clip_skip < len(layers):
            raise ValueError(
                f"clip_skip must be between 1 and {len(layers) - 1} for this text encoder, got {clip_skip}"
            )
        states = _final_layer_norm(text_encoder)(layers[-clip_skip])
    return _weighted(merge_chunks(states, n), weights)


def encode_sdxl(
    text_encoder_1: nn.Module,
    text_encoder_2: nn.Module,
    tokens_1: torch.Tensor,
    tokens_2: torch.Tensor,
    eos_token_id: int = EOS_ID,
    *,
    weights: Sequence[torch.Tensor] | None = None,
) -> EncodedPrompts:
    """SDXL: penultimate layers of both encoders (no final LN) concatenated, plus TE2's pooled vector.

    Pooled = TE2's final-LN'd last hidden state at the first EOS of the FIRST chunk (BOS if that chunk has
    no EOS), through ``text_projection``. Text past token 75 therefore never reaches the pooled vector (as
    in kohya). HF's own pooling is not used: with an old config (eos_token_id == 2) it takes the argmax of
    the ids, which picks a textual-inversion token whose id exceeds EOS.
    ``weights``: one (B, n, 77) tensor per encoder, scaling its own tokens' states (not the pooled vector).
    """
    ids_1, n = _flat(tokens_1)
    ids_2, n_2 = _flat(tokens_2)
    if n != n_2 or tokens_1.shape[0] != tokens_2.shape[0]:
        raise ValueError(f"token shapes differ: {tuple(tokens_1.shape)} vs {tuple(tokens_2.shape)}")
    out_1 = text_encoder_1(ids_1.to(_device(text_encoder_1)), output_hidden_states=True)
    out_2 = text_encoder_2(ids_2.to(_device(text_encoder_2)), output_hidden_states=True)
    weights_1, weights_2 = weights if weights is not None else (None, None)
    hidden_1 = _weighted(merge_chunks(out_1.hidden_states[-2], n), weights_1)
    hidden_2 = _weighted(merge_chunks(out_2.hidden_states[-2], n), weights_2)
    hidden = torch.cat([hidden_1, hidden_2.to(hidden_1.device)], dim=-1)

    first_chunks = ids_2[::n].to(out_2.last_hidden_state.device)  # chunk 0 of every prompt
    is_eos = first_chunks == eos_token_id
    position = is_eos.int().argmax(dim=1)  # the first EOS; 0 (BOS) when a chunk has none
    last = out_2.last_hidden_state[::n]
    pooled_state = last[torch.arange(last.shape[0], device=last.device), position]
    projection = _unwrap(text_encoder_2).text_projection
    pooled = projection(pooled_state.to(projection.weight.dtype)).to(last.dtype)
    return EncodedPrompts(hidden_states=hidden, pooled=pooled.to(hidden.device))


def encode_tokens(
    family: FamilyName | ModelFamily,
    text_encoders: Sequence[nn.Module],
    tokens: Sequence[torch.Tensor],
    clip_skip: int | None = None,
    eos_token_id: int = EOS_ID,
    *,
    weights: Sequence[torch.Tensor] | None = None,
) -> EncodedPrompts:
    """Encode per-tokenizer ids of shape (B, n, 77) for ``family`` (one tensor per text encoder): one encoder
    read at ``clip_skip``, or (a family whose UNet also takes the pooled text) SDXL's pair. ``weights``: None,
    or one (B, n, 77) tensor of token weights per tokenizer (``tokenize_weighted_prompts``)."""
    fam = resolve_family(family)
    if len(text_encoders) != len(fam.text_encoders) or len(tokens) != len(fam.text_encoders) \
            or (weights is not None and len(weights) != len(fam.text_encoders)):
        raise ValueError(f"{fam.name} has {_ENCODER_COUNTS[len(fam.text_encoders)]}")
    if not fam.size_conditioning:
        return EncodedPrompts(hidden_states=encode_sd(text_encoders[0], tokens[0], clip_skip,
                                                      weights=None if weights is None else weights[0]))
    if clip_skip not in (None, 2):
        raise ValueError(
            "SDXL always uses the penultimate layer of both text encoders; clip_skip must be unset (or 2)"
        )
    return encode_sdxl(text_encoders[0], text_encoders[1], tokens[0], tokens[1], eos_token_id, weights=weights)


_ENCODER_COUNTS = {1: "one text encoder and one tokenizer", 2: "two text encoders and two tokenizers"}


@dataclass
class PromptEncoder:
    """The tokenizers and text encoders of one model, with its long-prompt and clip-skip settings.

    ``weighted``: kohya's ``--weighted_captions``; ``encode`` parses A1111 emphasis and weights the tokens.
    """

    family: FamilyName
    tokenizers: Sequence
    text_encoders: Sequence[nn.Module]
    max_token_length: int = 75
    clip_skip: int | None = None
    weighted: bool = False

    def __post_init__(self) -> None:
        chunk_count(self.max_token_length)
        expected = len(resolve_family(self.family).text_encoders)
        if len(self.tokenizers) != expected or len(self.text_encoders) != expected:
            raise ValueError(f"{self.family} needs {expected} tokenizer(s) and {expected} text encoder(s)")

    def tokenize(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One (B, n, 77) id tensor per tokenizer (what a text-embedding cache would key on)."""
        return [tokenize_prompts(t, prompts, self.max_token_length) for t in self.tokenizers]

    def tokenize_with_weights(self, prompts: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per tokenizer: the ids of the prompts with emphasis parsed away, and their (B, n, 77) token weights."""
        pairs = [tokenize_weighted_prompts(t, prompts, self.max_token_length) for t in self.tokenizers]
        return [ids for ids, _ in pairs], [weights for _, weights in pairs]

    def encode_tokens(self, tokens: Sequence[torch.Tensor], *,
                      weights: Sequence[torch.Tensor] | None = None) -> EncodedPrompts:
        eos = self.tokenizers[-1].eos_token_id
        return encode_tokens(self.family, self.text_encoders, tokens, self.clip_skip, eos, weights=weights)

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        if not self.weighted:
            return self.encode_tokens(self.tokenize(prompts))
        tokens, weights = self.tokenize_with_weights(prompts)
        return self.encode_tokens(tokens, weights=weights)
