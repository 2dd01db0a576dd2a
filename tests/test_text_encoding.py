"""Long-prompt tokenisation and SD1 / SD2 / SDXL text encoding (library/text_encoding.py)."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch.testing import assert_close
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.models.clip_tokenizer import BOS_ID, EOS_ID, build_clip_tokenizer
from library.models.family_configs import tiny_configs
from library.models.text_encoding import (
    EncodedPrompts,
    PromptEncoder,
    chunk_count,
    encode_sd,
    encode_sdxl,
    encode_tokens,
    merge_chunks,
    tokenize_prompts,
)

PAD_BANG = 0  # id of "!", the pad of SD2 / SDXL-TE2


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_eos():
    """pad == eos (SD1, SDXL TE1)."""
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def tok_bang():
    """pad "!" (id 0) != eos (SD2, SDXL TE2)."""
    return build_clip_tokenizer(pad_token="!")


@pytest.fixture(scope="module")
def words(tok_eos):
    """300 distinct words that are one token each, with their ids, so expected ids can be written down."""
    vocab = tok_eos.get_vocab()
    candidates = sorted(t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].islower()
                        and 4 <= len(t) - 4 <= 7)
    picked = []
    for w in candidates[::37]:
        if tok_eos(w, add_special_tokens=False)["input_ids"] == [vocab[w + "</w>"]]:
            picked.append((w, vocab[w + "</w>"]))
        if len(picked) == 300:
            break
    assert len(picked) == 300
    return picked


def prompt_of(words, count: int, start: int = 0) -> tuple[str, list[int]]:
    chosen = words[start : start + count]
    return " ".join(w for w, _ in chosen), [i for _, i in chosen]


@pytest.fixture(scope="module")
def encoders():
    """Tiny random text encoders for the three families, built once."""
    torch.manual_seed(0)
    out = {
        "sd1": CLIPTextModel(CLIPTextConfig(**tiny_configs("sd1")["text_encoder"])),
        "sd2": CLIPTextModel(CLIPTextConfig(**tiny_configs("sd2")["text_encoder"])),
        "sdxl1": CLIPTextModel(CLIPTextConfig(**tiny_configs("sdxl")["text_encoder"])),
        "sdxl2": CLIPTextModelWithProjection(CLIPTextConfig(**tiny_configs("sdxl")["text_encoder_2"])),
    }
    for model in out.values():
        model.eval()
    return out


@pytest.fixture(scope="module")
def prompt_encoders(encoders, tok_eos, tok_bang):
    def make(family: str, max_token_length: int = 75, clip_skip: int | None = None) -> PromptEncoder:
        if family == "sd1":
            return PromptEncoder("sd1", [tok_eos], [encoders["sd1"]], max_token_length, clip_skip)
        if family == "sd2":
            return PromptEncoder("sd2", [tok_bang], [encoders["sd2"]], max_token_length, clip_skip)
        return PromptEncoder("sdxl", [tok_eos, tok_bang], [encoders["sdxl1"], encoders["sdxl2"]],
                             max_token_length, clip_skip)
    return make


def kohya_reference(tokenizer, prompt: str, n: int) -> list[list[int]]:
    """kohya's algorithm as the reference doc describes it: pad to n*75+2, slice, patch pad != eos chunks."""
    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=n * 75 + 2)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, n * 75 + 1, 75):
        chunk = [ids[0]] + ids[start : start + 75] + [ids[-1]]
        if pad != eos:
            if chunk[-2] not in (eos, pad):
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return chunks


# ---------------------------------------------------------------- tokenisation


@pytest.mark.parametrize("pad_kind", ["eos", "bang"])
def test_cat_prompt_ids(pad_kind, tok_eos, tok_bang):
    tok, pad = (tok_eos, EOS_ID) if pad_kind == "eos" else (tok_bang, PAD_BANG)
    ids = tokenize_prompts(tok, ["a photo of a cat"], 75)
    assert ids.shape == (1, 1, 77) and ids.dtype == torch.long
    assert ids[0, 0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] + [pad] * 70


@pytest.mark.parametrize("pad_kind", ["eos", "bang"])
@pytest.mark.parametrize("max_token_length", [75, 150, 225])
@pytest.mark.parametrize("length", [0, 5, 75, 76, 150, 200])
def test_chunk_ids_exact(pad_kind, max_token_length, length, tok_eos, tok_bang, words):
    tok, pad = (tok_eos, EOS_ID) if pad_kind == "eos" else (tok_bang, PAD_BANG)
    n = max_token_length // 75
    prompt, content = prompt_of(words, length)
    ids = tokenize_prompts(tok, [prompt], max_token_length)
    assert ids.shape == (1, n, 77)
    kept = content[: n * 75]  # truncation past n*75
    for k in range(n):
        chunk = ids[0, k].tolist()
        part = kept[75 * k : 75 * (k + 1)]
        assert chunk[0] == BOS_ID
        if len(part) == 75:  # full chunk: ends in EOS (the pad != eos fix-up 1)
            assert chunk == [BOS_ID] + part + [EOS_ID]
        elif part:  # the caption ends here: its EOS, then PAD
            assert chunk == [BOS_ID] + part + [EOS_ID] + [pad] * (75 - len(part))
        else:  # empty chunk: BOS EOS PAD... (fix-up 2), also when the caption ended exactly on the boundary
            assert chunk == [BOS_ID, EOS_ID] + [pad] * 75
        assert chunk[-1] == (EOS_ID if len(part) == 75 else pad)


def test_chunk_layout_examples(tok_bang, words):
    """A few chunks spelled out for pad != eos, where the fix-ups matter."""
    p76, c76 = prompt_of(words, 76)
    ids = tokenize_prompts(tok_bang, [p76], 150)[0]
    assert ids[0].tolist() == [BOS_ID] + c76[:75] + [EOS_ID]
    assert ids[1].tolist() == [BOS_ID, c76[75], EOS_ID] + [0] * 74
    p75, c75 = prompt_of(words, 75)
    ids = tokenize_prompts(tok_bang, [p75], 225)[0]
    assert ids[0].tolist() == [BOS_ID] + c75 + [EOS_ID]
    assert ids[1].tolist() == ids[2].tolist() == [BOS_ID, EOS_ID] + [0] * 75
    # 200 tokens with max 150: truncated, both chunks full.
    p200, c200 = prompt_of(words, 200)
    ids = tokenize_prompts(tok_bang, [p200], 150)[0]
    assert ids.tolist() == [[BOS_ID] + c200[:75] + [EOS_ID], [BOS_ID] + c200[75:150] + [EOS_ID]]


@pytest.mark.parametrize("pad_kind", ["eos", "bang"])
def test_matches_kohya_algorithm(pad_kind, tok_eos, tok_bang, words):
    tok = tok_eos if pad_kind == "eos" else tok_bang
    for n in (1, 2, 3, 4):
        for length in (0, 1, 74, 75, 76, 149, 150, 151, 200, 225, 226, 300):
            prompt, _ = prompt_of(words, length)
            ours = tokenize_prompts(tok, [prompt], 75 * n)[0].tolist()
            assert ours == kohya_reference(tok, prompt, n), (n, length)


def test_bang_in_caption_keeps_eos(tok_bang, words):
    """With pad "!" a literal "!" in the caption is id 0 == PAD: kohya's fix-ups misfire there, ours do not."""
    prompt, content = prompt_of(words, 74)
    prompt += " !"
    ids = tokenize_prompts(tok_bang, [prompt], 150)[0]
    assert ids[0].tolist() == [BOS_ID] + content + [0, EOS_ID]  # the "!" then EOS
    assert ids[1].tolist() == [BOS_ID, EOS_ID] + [0] * 75
    assert kohya_reference(tok_bang, prompt, 2)[0][-2:] == [0, 0]  # kohya: chunk 0 has no EOS at all


def test_batch_rows_are_independent(tok_bang, words):
    prompts = [prompt_of(words, length, start)[0] for length, start in ((3, 0), (160, 10), (80, 50))]
    batch = tokenize_prompts(tok_bang, prompts, 225)
    assert batch.shape == (3, 3, 77)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batch[row], tokenize_prompts(tok_bang, [prompt], 225)[0])


@pytest.mark.parametrize("bad", [0, -75, 74, 76, 100, 75.0, "150", True, None])
def test_invalid_max_token_length(bad, tok_eos, encoders):
    with pytest.raises(ValueError, match="positive multiple of 75"):
        chunk_count(bad)
    with pytest.raises(ValueError, match="positive multiple of 75"):
        tokenize_prompts(tok_eos, ["a cat"], bad)
    with pytest.raises(ValueError, match="positive multiple of 75"):
        PromptEncoder("sd1", [tok_eos], [encoders["sd1"]], bad)


def test_chunk_count_beyond_225():
    assert [chunk_count(m) for m in (75, 150, 225, 300, 750)] == [1, 2, 3, 4, 10]


# ---------------------------------------------------------------- merge


def test_merge_chunks_layout():
    b, n = 2, 3
    # state value = 1000*b + 100*k + position, so every output position says where it came from
    states = torch.tensor([[[1000.0 * i + 100 * k + p] for p in range(77)] for i in range(b) for k in range(n)])
    merged = merge_chunks(states, n)
    assert merged.shape == (b, n * 75 + 2, 1)
    for i in range(b):
        expected = [1000 * i + 0] + [1000 * i + 100 * k + p for k in range(n) for p in range(1, 76)]
        expected.append(1000 * i + 100 * (n - 1) + 76)
        assert merged[i, :, 0].tolist() == expected


# ---------------------------------------------------------------- encoding


def test_transformers_hidden_states_convention(encoders):
    """hidden_states = (embeddings, layer 1, ..., layer L), the last one BEFORE the final layer norm."""
    te = encoders["sd1"]
    ids = torch.tensor([[BOS_ID, 320, 2368, EOS_ID] + [EOS_ID] * 73])
    out = te(ids, output_hidden_states=True)
    assert len(out.hidden_states) == te.config.num_hidden_layers + 1
    assert not hasattr(te, "text_model")  # transformers 5: CLIPTextModel IS the text transformer
    assert_close(te.final_layer_norm(out.hidden_states[-1]), out.last_hidden_state)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shapes_and_long_chunks_match_direct_calls(family, prompt_encoders, encoders, words):
    """Each merged position is the state of the chunk it comes from, encoded on its own."""
    enc = prompt_encoders(family, 225)
    prompt, _ = prompt_of(words, 160)
    result = enc.encode([prompt])
    width = {"sd1": 32, "sd2": 64, "sdxl": 32 + 48}[family]
    assert result.hidden_states.shape == (1, 227, width)
    assert (result.pooled is None) == (family != "sdxl")
    tokens = enc.tokenize([prompt])

    def chunk_state(k: int) -> torch.Tensor:
        if family == "sdxl":
            a = encoders["sdxl1"](tokens[0][0, k : k + 1], output_hidden_states=True).hidden_states[-2]
            b = encoders["sdxl2"](tokens[1][0, k : k + 1], output_hidden_states=True).hidden_states[-2]
            return torch.cat([a, b], dim=-1)[0]
        return encoders[family](tokens[0][0, k : k + 1]).last_hidden_state[0]

    with torch.no_grad():
        chunks = [chunk_state(k) for k in range(3)]
        expected = torch.cat([chunks[0][:1]] + [c[1:76] for c in chunks] + [chunks[2][76:]])
        assert_close(result.hidden_states[0].detach(), expected)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_batch_matches_single_prompts(family, prompt_encoders, words):
    enc = prompt_encoders(family, 150)
    prompts = [prompt_of(words, 4)[0], prompt_of(words, 120, 30)[0], ""]
    with torch.no_grad():
        batch = enc.encode(prompts)
        for row, prompt in enumerate(prompts):
            single = enc.encode([prompt])
            assert_close(batch.hidden_states[row : row + 1], single.hidden_states)
            if family == "sdxl":
                assert_close(batch.pooled[row : row + 1], single.pooled)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_75_token_prompt_with_150(family, prompt_encoders, words):
    """A 75-token prompt: with max 150, chunk 0 has the very ids of the max-75 encoding (BOS, 75 tokens, EOS),
    so merged positions 0..75 (BOS + the 75 tokens) are equal for pad == eos and pad != eos alike. Position 76
    is NOT: with 75 it is chunk 0's EOS, with 150 it is the first position after BOS of chunk 1 (the EOS of
    the empty chunk "BOS EOS PAD...", a different context), and 77..151 are chunk 1's."""
    prompt, _ = prompt_of(words, 75)
    with torch.no_grad():
        short = prompt_encoders(family, 75).encode([prompt])
        long = prompt_encoders(family, 150).encode([prompt])
    assert short.hidden_states.shape[1] == 77 and long.hidden_states.shape[1] == 152
    assert_close(long.hidden_states[:, :76], short.hidden_states[:, :76])
    assert not torch.allclose(long.hidden_states[:, 76], short.hidden_states[:, 76])
    if family == "sdxl":  # pooled reads chunk 0 only
        assert_close(long.pooled, short.pooled)


def test_sdxl_pooled_ignores_text_after_token_75(prompt_encoders, words):
    enc = prompt_encoders("sdxl", 150)
    base, _ = prompt_of(words, 80)
    more = base + " " + prompt_of(words, 30, 200)[0]
    with torch.no_grad():
        a, b = enc.encode([base]), enc.encode([more])
    assert_close(a.pooled, b.pooled)
    assert_close(a.hidden_states[:, :76], b.hidden_states[:, :76])
    assert not torch.allclose(a.hidden_states[:, 76:], b.hidden_states[:, 76:])  # the extra text is encoded


def test_sdxl_pooled_at_first_eos_not_argmax_id(encoders):
    """An added token with id > EOS (textual inversion) must not move the pooled position off the first EOS."""
    te1, te2 = copy.deepcopy(encoders["sdxl1"]), copy.deepcopy(encoders["sdxl2"])
    added = te2.config.vocab_size  # 49408: one past EOS
    for te in (te1, te2):
        te.resize_token_embeddings(added + 1)
    ids = torch.tensor([[[BOS_ID, 320, added, 2368, EOS_ID] + [0] * 72]])
    with torch.no_grad():
        last = te2(ids[0]).last_hidden_state
        assert_close(encode_sdxl(te1, te2, ids, ids).pooled, te2.text_projection(last[:, 4]))
        assert not torch.allclose(last[:, 4], last[:, 2])
        # no EOS in the chunk at all: BOS is used
        no_eos = ids.clone()
        no_eos[..., 4] = 320
        last = te2(no_eos[0]).last_hidden_state
        assert_close(encode_sdxl(te1, te2, no_eos, no_eos).pooled, te2.text_projection(last[:, 0]))


def test_one_encoder_call_for_all_chunks(prompt_encoders, encoders, words):
    prompts = [prompt_of(words, 10)[0], prompt_of(words, 200, 20)[0]]
    calls = []
    handles = [encoders[name].register_forward_hook(lambda m, args, kwargs_out, name=name: calls.append(
        (name, tuple(args[0].shape)))) for name in ("sd1", "sdxl1", "sdxl2")]
    try:
        with torch.no_grad():
            prompt_encoders("sd1", 225, clip_skip=2).encode(prompts)
            assert calls == [("sd1", (6, 77))]
            calls.clear()
            prompt_encoders("sdxl", 225).encode(prompts)
            assert calls == [("sdxl1", (6, 77)), ("sdxl2", (6, 77))]
    finally:
        for h in handles:
            h.remove()


def test_clip_skip(prompt_encoders, encoders, words):
    prompt, _ = prompt_of(words, 20)
    te = encoders["sd1"]
    with torch.no_grad():
        ids = prompt_encoders("sd1").tokenize([prompt])[0][:, 0]
        out = te(ids, output_hidden_states=True)
        skip1 = prompt_encoders("sd1", clip_skip=1).encode([prompt]).hidden_states
        skip2 = prompt_encoders("sd1", clip_skip=2).encode([prompt]).hidden_states
    assert_close(skip1, out.last_hidden_state)
    assert_close(skip2, te.final_layer_norm(out.hidden_states[-2]))
    with pytest.raises(ValueError, match="clip_skip"):
        prompt_encoders("sd1", clip_skip=3).encode([prompt])  # the tiny encoder has 2 layers
    with pytest.raises(ValueError, match="clip_skip"):
        prompt_encoders("sdxl", clip_skip=1).encode([prompt])


def test_grad_flows_and_no_grad(prompt_encoders, encoders, words):
    prompt, _ = prompt_of(words, 100)
    try:
        result = prompt_encoders("sdxl", 150).encode([prompt])
        (result.hidden_states.square().mean() + result.pooled.square().mean()).backward()
        for name in ("sdxl1", "sdxl2"):
            grad = encoders[name].get_input_embeddings().weight.grad
            assert grad is not None and grad.abs().sum() > 0
        assert encoders["sdxl2"].text_projection.weight.grad.abs().sum() > 0
        skipped = prompt_encoders("sd1", 150, clip_skip=2).encode([prompt])
        skipped.hidden_states.sum().backward()
        assert encoders["sd1"].final_layer_norm.weight.grad.abs().sum() > 0
        with torch.no_grad():
            assert not prompt_encoders("sdxl", 150).encode([prompt]).hidden_states.requires_grad
    finally:
        for model in encoders.values():
            model.zero_grad(set_to_none=True)


def test_follows_encoder_dtype(encoders, tok_eos, tok_bang, words):
    prompt, _ = prompt_of(words, 90)
    te1, te2 = (copy.deepcopy(encoders[n]).to(torch.bfloat16) for n in ("sdxl1", "sdxl2"))
    with torch.no_grad():
        low = PromptEncoder("sdxl", [tok_eos, tok_bang], [te1, te2], 150).encode([prompt])
        full = PromptEncoder("sdxl", [tok_eos, tok_bang], [encoders["sdxl1"], encoders["sdxl2"]], 150).encode([prompt])
    assert low.hidden_states.dtype == low.pooled.dtype == torch.bfloat16
    assert_close(low.hidden_states.float(), full.hidden_states, atol=0.1, rtol=0.05)


def test_encode_tokens_rejects_wrong_counts(encoders, tok_eos):
    ids = tokenize_prompts(tok_eos, ["a cat"])
    with pytest.raises(ValueError, match="sdxl has two"):
        encode_tokens("sdxl", [encoders["sdxl1"]], [ids])
    with pytest.raises(ValueError, match="expected token ids of shape"):
        encode_sd(encoders["sd1"], ids[:, 0])
    assert isinstance(encode_tokens("sd1", [encoders["sd1"]], [ids]), EncodedPrompts)


# ---------------------------------------------------------------- against diffusers' pipelines


def _sd_pipeline(family: str, text_encoder, tokenizer):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    cfg = tiny_configs(family)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**cfg["unet"]), scheduler=EulerDiscreteScheduler.from_config(cfg["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse on the moon, highly detailed, 8k!"]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_matches_diffusers_sd_pipeline(family, prompt_encoders, encoders, tok_eos, tok_bang):
    pipe = _sd_pipeline(family, encoders[family], tok_eos if family == "sd1" else tok_bang)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        ours = prompt_encoders(family, 75).encode(PROMPTS)
    assert ours.hidden_states.shape == theirs.shape == (3, 77, encoders[family].config.hidden_size)
    assert_close(ours.hidden_states, theirs)


def test_clip_skip_2_matches_diffusers_clip_skip_1(prompt_encoders, encoders, tok_eos):
    """diffusers' clip_skip counts layers skipped (hidden_states[-(clip_skip + 1)] + final LN), kohya/A1111's
    counts from 1 (= last layer): our clip_skip=2 is diffusers' clip_skip=1.

    diffusers 0.42.1 reads `text_encoder.text_model.final_layer_norm`, which transformers 5's CLIPTextModel no
    longer has (AttributeError); where that happens, give the pipeline's encoder copy that attribute."""
    te = copy.deepcopy(encoders["sd1"])
    pipe = _sd_pipeline("sd1", te, tok_eos)
    with torch.no_grad():
        try:
            theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=1)
        except AttributeError:
            object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
            theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=1)
        ours = prompt_encoders("sd1", 75, clip_skip=2).encode(PROMPTS)
    assert_close(ours.hidden_states, theirs)


def test_matches_diffusers_sdxl_pipeline(prompt_encoders, encoders, tok_eos, tok_bang):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    cfg = tiny_configs("sdxl")
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**cfg["vae"]), text_encoder=encoders["sdxl1"], text_encoder_2=encoders["sdxl2"],
        tokenizer=tok_eos, tokenizer_2=tok_bang, unet=UNet2DConditionModel(**cfg["unet"]),
        scheduler=EulerDiscreteScheduler.from_config(cfg["scheduler"]),
    )
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        ours = prompt_encoders("sdxl", 75).encode(PROMPTS)
    assert ours.hidden_states.shape == embeds.shape == (3, 77, 80)
    assert ours.pooled.shape == pooled.shape == (3, 32)
    assert_close(ours.hidden_states, embeds)
    assert_close(ours.pooled, pooled)
