"""Which dataset options a cache would silently freeze: checked before anything is cached or read back.

A cached latent holds one crop and one colour, a cached text-encoder output one prompt; options that make
either change between draws cannot be cached. The latent and text caches (``library.cache``) and
``TrainingDataset`` all refuse such a dataset with the same :class:`NotCacheableError`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from library.data.captions import CaptionOptions, is_caption_random, merge_caption_and_tags
from library.data.records import DatasetIndex


def without_dropout(options: CaptionOptions) -> CaptionOptions:
    """Dropout only ever yields "" (always cached), so it does not make a caption uncacheable."""
    return replace(options, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)


def _random_caption_options(options: CaptionOptions) -> list[str]:
    """The set options that make every prompt of a subset change between draws (wildcards aside)."""
    named = []
    if options.shuffle_caption:
        named.append("shuffle_caption")
    if options.token_warmup_step > 0:
        named.append("token_warmup_step")
    if options.caption_tag_dropout_rate > 0:
        named.append("caption_tag_dropout_rate")
    if options.caption_tag_mode == "random":
        named.append('caption_tag_mode = "random"')
    return named


def check_cacheable(index: DatasetIndex, cache_latents: bool, cache_text: bool,
                    latent_conflicts: Sequence[str] = ()) -> list[str]:
    """Why the requested caches cannot be used for this dataset (empty when they can), one line per
    subset and reason, naming where the option is set and how to fix it.

    Latents: random_crop and color_aug would be frozen into the cache; ``latent_conflicts`` (images that need
    two buckets in one cache file, from the cache's ``conflicts(index)``) are reported with them. Text: any subset whose prompt can differ between draws
    (``captions.is_caption_random``, caption dropout excepted).
    """
    problems: list[str] = []
    subsets = list(dict.fromkeys(subset for dataset in index.datasets for subset in dataset.subsets))
    if cache_latents:
        for subset in subsets:
            for option, why in (("random_crop", "the crop"), ("color_aug", "the colour change")):
                if getattr(subset, option):
                    problems.append(
                        f"{subset.source}: {option} = true cannot be used with latent caching (--cache_latents / "
                        f"--cache_latents_to_disk): {why} would be frozen into the cached latent; fix: set "
                        f"{option} = false for this subset, or train without latent caching")
        problems += latent_conflicts
    if cache_text:
        flagged: set[int] = set()
        for subset in subsets:
            named = _random_caption_options(subset.captions)
            if named:
                flagged.add(id(subset))
                problems.append(
                    f"{subset.source}: {', '.join(named)} make{'s' if len(named) == 1 else ''} the caption change "
                    "between draws, so text-encoder outputs cannot be cached (--cache_text_encoder_outputs); fix: "
                    f"turn {'it' if len(named) == 1 else 'them'} off for this subset, or train without "
                    "text-encoder output caching")
        for record in index.records:
            subset = record.subset
            if id(subset) in flagged:
                continue
            options = without_dropout(subset.captions)
            text = merge_caption_and_tags(record.caption, record.tags, options.caption_separator,
                                          options.caption_tag_mode, random.Random(0),
                                          enable_wildcard=options.enable_wildcard)
            if is_caption_random(options, text):
                flagged.add(id(subset))
                problems.append(
                    f"{subset.source}: enable_wildcard = true and the caption of {record.image_path} has several "
                    "lines or a {a|b} choice, so it changes between draws and text-encoder outputs cannot be "
                    "cached (--cache_text_encoder_outputs); fix: turn enable_wildcard off for this subset, or "
                    "train without text-encoder output caching")
    return problems


class NotCacheableError(ValueError):
    """The dataset uses options that a requested cache would silently freeze; lists every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("cannot cache this dataset:\n" + "\n".join(f"  - {p}" for p in self.problems))


def raise_if_not_cacheable(index: DatasetIndex, cache_latents: bool, cache_text: bool,
                           latent_conflicts: Sequence[str] = ()) -> None:
    """:func:`check_cacheable`, raising :class:`NotCacheableError` with all problems if there are any."""
    problems = check_cacheable(index, cache_latents, cache_text, latent_conflicts)
    if problems:
        raise NotCacheableError(problems)
