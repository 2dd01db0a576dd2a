"""The ``shards`` subset key: from dataset configs to a checked :class:`ShardSource`, before any model loads.

    [[datasets.subsets]]
    shards = "/data/shards/shard-{000000..000123}.tar"        # or https://..., or "pipe:aws s3 cp s3://b/shard-{..}.tar -"
    shards_index = "/data/shards/index.json"                  # only when it is not beside the shards (pipe:)

Everything a run needs to plan its steps comes from index.json (sample count, per-shard bucket histograms), so
no shard is opened at start-up. A run whose bucket settings, caption settings or cache options do not fit what
the shards were written with is refused here in one line that says how to rebuild or what to change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from library.data.captions import is_caption_random
from library.data.dataset_config import DatasetConfig, DatasetConfigError, SubsetConfig
from library.data.shard_plan import ShardUnit
from library.data.shard_stream import ShardSource

logger = logging.getLogger(__name__)

REBUILD = "tools/make_webdataset.py"


def uses_shards(datasets: Sequence[DatasetConfig]) -> bool:
    return any(subset.shards is not None for dataset in datasets for subset in dataset.subsets)


@dataclass(frozen=True)
class ShardRun:
    """What the run streams: the source, and index facts for the start-up summary."""

    source: ShardSource
    samples: int
    reg_samples: int
    bucket_counts: dict[str, int]  # "WxH" -> samples, over all shard subsets
    latent_provenance: tuple[dict | None, ...]  # per subset: what its latents were made with (None: none)
    text_provenance: tuple[dict | None, ...]  # per subset: what its text-encoder outputs were made with


def _index_of(subset: SubsetConfig):
    from library.data.shard_format import ShardFormatError, read_index

    where = subset.shards_index or subset.shards or ""
    key = "shards_index" if subset.shards_index else "shards"
    try:
        return read_index(where)
    except ShardFormatError as error:
        raise DatasetConfigError(f"{subset.source}: {key} = {where!r}: {error}"
                                 + ("" if subset.shards_index else "; or set shards_index to its path")) from None


def _match_urls(subset: SubsetConfig, index) -> list[tuple[str, object]]:
    """(url, index entry) for every shard the pattern names; each must be listed in index.json."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(subset.shards)
    by_name = {entry.name: entry for entry in index.shards}
    matched = []
    for url in urls:
        names = [name for name in by_name if name in url]
        if not names:
            raise DatasetConfigError(f"{subset.source}: shards = {subset.shards!r} names {url!r}, which "
                                     f"{index.location} does not list; point shards at the files written with "
                                     f"that index (or rebuild them with {REBUILD})")
        matched.append((url, by_name[max(names, key=len)]))
    return matched


def _bucket_mismatches(dataset: DatasetConfig, index) -> list[str]:
    settings = index.bucket_settings
    pairs = [("resolution", tuple(settings.resolution), tuple(dataset.resolution)),
             ("enable_bucket", settings.enable_bucket, dataset.enable_bucket)]
    if dataset.enable_bucket and settings.enable_bucket:
        pairs += [("bucket_reso_steps", settings.bucket_reso_steps, dataset.bucket_reso_steps),
                  ("bucket_no_upscale", settings.bucket_no_upscale, dataset.bucket_no_upscale)]
        if not dataset.bucket_no_upscale:
            pairs += [("min_bucket_reso", settings.min_bucket_reso, dataset.min_bucket_reso),
                      ("max_bucket_reso", settings.max_bucket_reso, dataset.max_bucket_reso)]
    return [f"{name} {theirs!r} in the shards, {ours!r} here" for name, theirs, ours in pairs if theirs != ours]


def _flag(name: str, value: object) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"(without --{name})"
    if isinstance(value, tuple):
        return f"--{name} {','.join(map(str, value))}"
    return f"--{name} {value}"


def _check_subset(dataset: DatasetConfig, subset: SubsetConfig, index, *, family: str | None,
                  text_outputs_wanted: bool) -> None:
    where = subset.source
    for key in ("image_dir", "metadata_file", "conditioning_data_dir"):
        if getattr(subset, key) is not None:
            raise DatasetConfigError(f"{where}: {key} and shards cannot be combined: a subset streams shards or "
                                     "reads a folder; put them in separate subsets")
    if subset.num_repeats != 1:
        raise DatasetConfigError(f"{where}: num_repeats = {subset.num_repeats} is not supported with shards yet: "
                                 "every sample is streamed once per epoch; remove it (train more epochs instead)")
    mismatches = _bucket_mismatches(dataset, index)
    if mismatches:
        settings = index.bucket_settings
        ours = [("resolution", dataset.resolution), ("enable_bucket", dataset.enable_bucket)]
        if dataset.enable_bucket:
            ours += [("min_bucket_reso", dataset.min_bucket_reso), ("max_bucket_reso", dataset.max_bucket_reso),
                     ("bucket_reso_steps", dataset.bucket_reso_steps), ("bucket_no_upscale", dataset.bucket_no_upscale)]
        flags = " ".join(_flag(name, value) for name, value in ours if value is not False)
        raise DatasetConfigError(
            f"{where}: the shards were bucketed with other settings ({'; '.join(mismatches)}): rebuild them with "
            f"{REBUILD} {flags}, or set this dataset's settings to the shards' (resolution = "
            f"{list(settings.resolution)}, enable_bucket = {str(settings.enable_bucket).lower()}, ...)")
    if index.latents is not None:
        frozen = [name for name in ("random_crop", "color_aug") if getattr(subset, name)]
        if frozen:
            raise DatasetConfigError(f"{where}: {' and '.join(frozen)} cannot be used with shards that carry "
                                     f"latents (they hold one centre crop and colour): set {frozen[0]} = false, or "
                                     f"rebuild the shards with {REBUILD} without cached latents")
        expected: dict[str, object] = {"resize_interpolation": subset.resize_interpolation}
        for name in ("flip_aug", "alpha_mask"):  # needed only when this run asks for them
            if getattr(subset, name):
                expected[name] = True
        if family is not None:
            expected["family"] = family
        from library.data.shard_format import provenance_mismatches

        differences = provenance_mismatches(index.latents, expected)
        if differences:
            raise DatasetConfigError(f"{where}: the latents in the shards were made differently from this run "
                                     f"({'; '.join(differences)}): rebuild the shards with {REBUILD} and this run's "
                                     "settings, or change these settings to the shards'")
    if text_outputs_wanted:
        if index.text_encoder_outputs is None:
            raise DatasetConfigError(f"{where}: --cache_text_encoder_outputs needs text-encoder outputs in the "
                                     f"shards, and these carry none: rebuild them with {REBUILD} and its "
                                     "text-encoder option, or train without --cache_text_encoder_outputs")
        if is_caption_random(subset.captions):
            raise DatasetConfigError(f"{where}: the caption settings make each prompt change between draws, so the "
                                     "text-encoder outputs in the shards cannot be used (--cache_text_encoder_outputs)"
                                     ": turn shuffle_caption / dropout / warm-up / wildcards off for this subset, or "
                                     "train without --cache_text_encoder_outputs")


def load_shard_run(datasets: Sequence[DatasetConfig], *, family: str | None = None,
                   text_outputs_wanted: bool = False) -> ShardRun:
    """Read every shard subset's index.json and check it against this run; DatasetConfigError (one line) if not.

    ``family``: the model family's name when known before loading (latents are compared with it);
    ``text_outputs_wanted``: the run caches text-encoder outputs, so it takes them from the shards.
    """
    from library.data.shard_format import parse_bucket_name

    try:
        import webdataset  # noqa: F401  (an optional package: only shard datasets need it)
    except ImportError:
        raise DatasetConfigError("shards need the webdataset package: pip install webdataset==1.0.2") from None
    folder = [s.source for d in datasets for s in d.subsets if s.shards is None]
    if folder:
        raise DatasetConfigError(f"{folder[0]}: a run streams shards or reads folders, not both: write this subset's "
                                 f"images into shards too ({REBUILD}), or train without the shard subsets")
    for dataset in datasets:
        if dataset.validation_split > 0:
            raise DatasetConfigError(f"{dataset.source}: validation_split is not supported with shards yet: remove "
                                     "it (write a held-out set as separate shards)")
    units: list[ShardUnit] = []
    subsets: list[SubsetConfig] = []
    bucket_counts: dict[str, int] = {}
    latents: list[bool] = []
    provenance: list[dict | None] = []
    text_provenance: list[dict | None] = []
    samples = reg_samples = 0
    for position, dataset in enumerate(datasets):
        for subset in dataset.subsets:
            index = _index_of(subset)
            _check_subset(dataset, subset, index, family=family, text_outputs_wanted=text_outputs_wanted)
            latents.append(index.latents is not None)
            provenance.append(index.latents)
            text_provenance.append(index.text_encoder_outputs)
            for url, entry in _match_urls(subset, index):
                buckets = tuple(((position, *parse_bucket_name(name)), count)
                                for name, count in sorted(entry.buckets.items()) if count)
                units.append(ShardUnit(url=url, name=entry.name, subset=len(subsets), dataset=position,
                                       samples=entry.samples, buckets=buckets))
                for name, count in entry.buckets.items():
                    bucket_counts[name] = bucket_counts.get(name, 0) + count
                samples += entry.samples
                reg_samples += entry.samples if subset.is_reg else 0
            subsets.append(subset)
    if len(set(latents)) > 1:
        raise DatasetConfigError("some shard subsets carry latents and some do not: rebuild them alike with "
                                 f"{REBUILD} (all with or all without cached latents)")
    if samples == 0:
        raise DatasetConfigError(f"{subsets[0].source}: the shards hold no samples")
    source = ShardSource(units=tuple(units), subsets=tuple(subsets),
                         network_multipliers=tuple(d.network_multiplier for d in datasets),
                         use_latents=latents[0], use_text=text_outputs_wanted)
    return ShardRun(source=source, samples=samples, reg_samples=reg_samples, bucket_counts=bucket_counts,
                    latent_provenance=tuple(provenance), text_provenance=tuple(text_provenance))
