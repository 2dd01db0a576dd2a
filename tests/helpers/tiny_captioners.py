"""Tiny randomly initialised BLIP and GIT captioners saved with save_pretrained (a few hundred KB each)."""

from __future__ import annotations

from pathlib import Path

WORDS = ("a girl cat dog red blue green on the with sitting standing picture of photo tree sky hat "
         "small big white black holding flower").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    return BertTokenizer(vocab={word: index for index, word in enumerate(SPECIALS + WORDS)}, do_lower_case=True)


_TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
_VISION = dict(_TINY, image_size=32, patch_size=16)


def build_tiny_blip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _tokenizer(folder)
    vocab_size = len(SPECIALS) + len(WORDS)
    text = dict(_TINY, vocab_size=vocab_size, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=_VISION))
    model.save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def build_tiny_git(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = _tokenizer(folder)
    config = GitConfig(vision_config=_VISION, vocab_size=len(SPECIALS) + len(WORDS), max_position_embeddings=128,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       pad_token_id=tokenizer.pad_token_id, **_TINY)
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
