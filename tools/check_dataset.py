"""Check a dataset exactly as training would read it, without loading a model.

    python tools/check_dataset.py --dataset_config data.toml [--family sdxl]
    python tools/check_dataset.py --train_data_dir img --reg_data_dir reg --resolution 1024 --enable_bucket

Prints image/repeat/reg counts, the per-bucket histogram (with upscaled images) and the images no bucket
can take, caption/tag coverage, the start-up warnings (files that are not read as images, images upscaled
more than 4x, captions longer than --max_token_length) and every problem (missing, corrupt or
mis-captioned files, images whose data does not decode), and exits with status 1 when there is a problem.
The checks are the training start-up's own: ``library.data.dataset_index.build_dataset_index``. The core,
:func:`check_datasets`, returns a :class:`CheckReport`.

Caches: with --cache_latents_to_disk it also counts the images whose npz is valid / missing / stale (as
training judges them: same bucket and crop, image unchanged) and lists the stale ones with the reason;
with any --cache_* flag it reports the dataset options that caching would refuse (random_crop, color_aug,
caption shuffling, ...). The npz names depend on the family: without --family/--v2 the SDXL names
(``_sdxl.npz``) are checked.

Bucket steps: SDXL needs bucket_reso_steps to be a multiple of 32, SD1/SD2 of 64. Without a model the
tool uses ``--family`` (or ``--v2``) to pick the rule and otherwise assumes 32, the more permissive one.
``--config_file`` accepts model, dataset and config keys only (a full training config has keys this tool
does not know; pass the dataset flags or ``--dataset_config`` instead).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from library.data.buckets import Size
from library.cli.config import build_parser, parse_args
from library.cli.data_args import add_dataset_arguments, dataset_flags_from_args, latent_cache_mode, text_cache_mode
from library.cli.model_args import add_model_arguments
from library.cache.dataset_caching import LatentCacheLocation, latent_cache_status
from library.data.cacheable import check_cacheable
from library.data.dataset_config import DatasetConfig, DatasetConfigError
from library.data.dataset_config_loading import load_dataset_configs
from library.data.dataset_index import build_dataset_index
from library.data.records import DatasetIndex, ImageRecord, Problem, format_problems
from library.models.families import FAMILY_WHEN_UNKNOWN, FINEST_BUCKET_STEP, SD2, ModelFamily, resolve_family


@dataclass(frozen=True)
class BucketRow:
    """One bucket of one dataset: how many images land there, with repeats, and how many are upscaled."""

    dataset: int
    bucket: Size
    images: int
    samples: int
    upscaled: int


@dataclass(frozen=True)
class CaptionCoverage:
    """Where the images' text comes from. ``neither`` = no own caption and no tags; of those,
    ``class_tokens`` train on the subset's class tokens (the rest are problems)."""

    images: int
    caption: int
    tags: int
    both: int
    neither: int
    class_tokens: int


@dataclass(frozen=True)
class LatentCacheReport:
    """State of the on-disk latent cache, one entry per image (not per repeat)."""

    valid: int
    missing: int
    stale: tuple[tuple[Path, str], ...]  # (npz file, why it would be rebuilt)

    def format(self) -> str:
        lines = [f"latent cache: {self.valid} valid, {self.missing} missing, {len(self.stale)} stale "
                 "(missing and stale ones are encoded at the start of training)"]
        lines += [f"  stale: {path}: {reason}" for path, reason in self.stale]
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckReport:
    """Everything the tool prints, as values (tests assert on these)."""

    train_images: int
    train_samples: int  # repeats included
    reg_images: int
    reg_samples: int  # after balancing
    unused_reg_images: tuple[Path, ...]
    buckets: tuple[BucketRow, ...]
    dropped: tuple[Path, ...]  # images no bucket can take
    coverage: CaptionCoverage
    problems: tuple[Problem, ...]
    latent_cache: LatentCacheReport | None = None  # with --cache_latents_to_disk
    cache_problems: tuple[str, ...] = ()  # options the requested caches refuse
    notices: tuple[str, ...] = ()  # warnings that do not stop training (skipped files, upscales, long captions)

    @property
    def ok(self) -> bool:
        """True when training would start."""
        return not self.problems and not self.cache_problems

    def format(self) -> str:
        """The human-readable report."""
        lines = [
            f"training images: {self.train_images} ({self.train_samples} samples with repeats)",
            f"regularisation images: {self.reg_images} ({self.reg_samples} samples after balancing), "
            f"{len(self.unused_reg_images)} unused",
            "buckets (dataset: WxH  images  samples  upscaled):",
        ]
        lines += [f"  {row.dataset}: {row.bucket[0]}x{row.bucket[1]}  {row.images}  {row.samples}  {row.upscaled}"
                  for row in self.buckets]
        if self.dropped:
            lines.append(f"dropped (no bucket fits): {len(self.dropped)}")
            lines += [f"  {path}" for path in self.dropped]
        c = self.coverage
        lines.append(f"captions: {c.images} images; caption {c.caption}, tags {c.tags}, both {c.both}, "
                     f"neither {c.neither} (of which {c.class_tokens} use class tokens)")
        if self.unused_reg_images:
            lines.append("unused regularisation images:")
            lines += [f"  {path}" for path in self.unused_reg_images]
        if self.latent_cache is not None:
            lines.append(self.latent_cache.format())
        lines += [f"warning: {notice}" for notice in self.notices]
        if self.cache_problems:
            lines.append(f"{len(self.cache_problems)} caching problem(s):")
            lines += [f"  - {problem}" for problem in self.cache_problems]
        if self.problems:
            lines.append(format_problems(self.problems))
        elif not self.cache_problems:
            lines.append("no problems found")
        return "\n".join(lines)


def _coverage(records: Sequence[ImageRecord]) -> CaptionCoverage:
    own_caption = [r.caption_source in ("metadata", "caption_file") and bool(r.caption) for r in records]
    tags = [bool(r.tags) for r in records]
    return CaptionCoverage(
        images=len(records),
        caption=sum(own_caption),
        tags=sum(tags),
        both=sum(c and t for c, t in zip(own_caption, tags)),
        neither=sum(not c and not t for c, t in zip(own_caption, tags)),
        class_tokens=sum(r.caption_source == "class_tokens" for r in records),
    )


def _bucket_rows(index: DatasetIndex) -> tuple[BucketRow, ...]:
    rows: dict[tuple[int, Size], list[ImageRecord]] = {}
    for record in index.records:
        if record.bucket is not None:
            rows.setdefault((record.dataset_index, record.bucket.bucket), []).append(record)
    return tuple(
        BucketRow(dataset=key[0], bucket=key[1], images=len(members),
                  samples=sum(r.num_repeats for r in members),
                  upscaled=sum(r.bucket is not None and r.bucket.scale > 1.0 for r in members))
        for key, members in sorted(rows.items())
    )


def report_from_index(index: DatasetIndex) -> CheckReport:
    """Summarise a built index (records bucketed, problems collected)."""
    train = [r for r in index.records if not r.is_reg]
    reg = [r for r in index.records if r.is_reg]
    return CheckReport(
        train_images=len(train),
        train_samples=sum(r.num_repeats for r in train),
        reg_images=len(reg),
        reg_samples=sum(r.num_repeats for r in reg),
        unused_reg_images=index.unused_reg_images,
        buckets=_bucket_rows(index),
        dropped=tuple(r.image_path for r in index.dropped),
        coverage=_coverage(list(index.records) + list(index.dropped)),
        problems=index.problems,
        notices=index.notices,
    )


def latent_cache_report(index: DatasetIndex, location: LatentCacheLocation) -> LatentCacheReport:
    """Count the images' npz files by state (``latent_files.check_latent_cache``, as training would)."""
    states = [(path, status) for _, path, status in latent_cache_status(index, location)]
    return LatentCacheReport(
        valid=sum(status.state == "valid" for _, status in states),
        missing=sum(status.state == "missing" for _, status in states),
        stale=tuple((path, status.reason) for path, status in states if status.state == "stale"),
    )


def check_datasets(datasets: Sequence[DatasetConfig], min_step: int = 32, verify_images: bool = True, *,
                   disk_latents: LatentCacheLocation | None = None, cache_latents: bool = False,
                   cache_text: bool = False, max_token_length: int | None = None) -> CheckReport:
    """The tool's core: build the index exactly as training does and summarise it.

    ``disk_latents``: also report the state of the npz files there (implies ``cache_latents``);
    ``cache_latents`` / ``cache_text``: report the options those caches refuse.
    """
    index = build_dataset_index(datasets, min_step=min_step, verify_images=verify_images,
                                max_token_length=max_token_length)
    report = report_from_index(index)
    cache_latents = cache_latents or disk_latents is not None
    conflicts = disk_latents.conflicts(index) if disk_latents is not None else []
    cache_problems = tuple(check_cacheable(index, cache_latents, cache_text, conflicts))
    latent_report = None
    if disk_latents is not None and not cache_problems:
        latent_report = latent_cache_report(index, disk_latents)
    return replace(report, latent_cache=latent_report, cache_problems=cache_problems)


def family_for(args: argparse.Namespace) -> ModelFamily | None:
    """The family ``--family`` (or ``--v2``) names; None when neither is given (no model is loaded)."""
    if getattr(args, "family", None):
        return resolve_family(args.family)
    return SD2 if getattr(args, "v2", False) else None


def min_step_for(args: argparse.Namespace) -> int:
    """Bucket granularity of the model family: 32 for SDXL (or unknown), 64 for SD1/SD2."""
    family = family_for(args)
    return FINEST_BUCKET_STEP if family is None else family.bucket_step


def build_check_parser() -> argparse.ArgumentParser:
    """The training scripts' model and dataset flags (and --config_file), plus --skip_verify."""
    parser = build_parser("Check a dataset as training would read it (no model is loaded).",
                          add_model_arguments, add_dataset_arguments)
    group = parser.add_argument_group("check")
    group.add_argument("--skip_verify", action="store_true",
                       help="do not decode every image (faster; corrupt files are then not found)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, check, print the report; 0 when training would start, 1 otherwise."""
    parser = build_check_parser()
    args = parse_args(parser, argv)
    try:
        datasets = load_dataset_configs(dataset_flags_from_args(args))
    except DatasetConfigError as error:
        print(f"dataset config error: {error}", file=sys.stderr)
        return 2
    min_step = min_step_for(args)
    latent_mode = latent_cache_mode(args)
    npz_family = family_for(args) or FAMILY_WHEN_UNKNOWN  # the npz suffix: SDXL's unless --family or --v2
    disk_latents = LatentCacheLocation(npz_family) if latent_mode == "disk" else None
    report = check_datasets(datasets, min_step=min_step, verify_images=not args.skip_verify,
                            disk_latents=disk_latents, cache_latents=latent_mode is not None,
                            cache_text=text_cache_mode(args) is not None,
                            max_token_length=args.max_token_length or 75)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
