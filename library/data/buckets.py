"""Aspect-ratio buckets and the bucketed, rank-sharded batch sampler.

Training on one fixed square crops away most of a portrait or landscape image. Bucketing instead groups
images of similar aspect ratio into a few fixed (width, height) sizes, so every batch holds one size and
the model still sees (almost) the whole frame.

The flow for one image::

    bucket_set = make_bucket_set((1024, 1024), 256, 2048, 64, min_step=32)   # once
    a = bucket_set.select((w, h))            # BucketAssignment: bucket, resized_size, scale
    # datasets.py: resize to a.resized_size, then crop to a.bucket at crop_box(...)
    # SDXL: crop_top_left(...) gives the crop offset the UNet is conditioned on

and for the batches::

    sampler = BucketBatchSampler([a.bucket for a in per_sample], batch_size, seed, world_size, rank)
    loader = DataLoader(dataset, batch_sampler=sampler, ...)
    print(sampler.summary().format())

Where this differs from kohya-ss/sd-scripts:

* ``bucket_no_upscale``: kohya floors one side, derives the other and floors again, so near-square images
  just above the max area drop a whole step on both sides (kohya-ss/sd-scripts#731: 1050x1080 -> 960x960 at 1024²).
  We choose the bucket that keeps the most pixels (see :func:`select_bucket_no_upscale`).
* ``bucket_no_upscale`` resizes the image to *cover* its bucket (as the upscale mode does) instead of
  keeping the area-fitted size and cropping both sides, so less of the frame is cropped.
* The sampler is explicit: one order per (seed, epoch) computed identically on every rank, sharded by
  rank, padded so all ranks run the same number of steps, and resumable mid-epoch. kohya relies on the
  DataLoader shuffling pre-made batches and on every rank having drawn the same seed.
* SDXL crop conditioning uses the true crop offset, not kohya's letterbox formula (see
  :func:`crop_top_left`).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Sampler

from library.data.sharding import check_rank, rank_share

logger = logging.getLogger(__name__)

Size = tuple[int, int]
"""(width, height) in pixels. Every size in this module is width first, like PIL."""

DEFAULT_MIN_BUCKET_RESO = 256
DEFAULT_MAX_BUCKET_RESO = 1024


# --------------------------------------------------------------------------------------------------
# Bucket set
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketAssignment:
    """Where one image goes: resize it to ``resized_size`` (covers ``bucket``), then crop to ``bucket``."""

    image_size: Size
    bucket: Size
    resized_size: Size
    scale: float


@dataclass(frozen=True)
class BucketSet:
    """The buckets for one dataset, built by :func:`make_bucket_set`; ``select`` assigns an image.

    With ``no_upscale`` the buckets are made per image, so ``buckets`` is empty and only ``max_area``
    and ``steps`` matter.
    """

    resolution: Size
    steps: int
    min_reso: int
    max_reso: int
    no_upscale: bool
    buckets: tuple[Size, ...]
    warnings: tuple[str, ...] = ()

    @property
    def max_area(self) -> int:
        """The training area; buckets never hold more pixels than this."""
        return self.resolution[0] * self.resolution[1]

    def select(self, image_size: Size) -> BucketAssignment:
        """Assign ``image_size`` to a bucket with the rule this set was built for."""
        if self.no_upscale:
            return select_bucket_no_upscale(image_size, self.max_area, self.steps)
        return select_bucket(image_size, self.buckets)


def _floor_to(value: int, step: int) -> int:
    return value // step * step


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


def round_bucket_limits(min_reso: int, max_reso: int, steps: int) -> tuple[int, int, list[str]]:
    """Round min down and max up to multiples of ``steps`` (as kohya does), with a warning for each change.

    Rounding outward never removes a bucket the user asked for.
    """
    warnings: list[str] = []
    new_min, new_max = _floor_to(min_reso, steps), _ceil_to(max_reso, steps)
    if new_min != min_reso:
        warnings.append(
            f"min_bucket_reso {min_reso} is not a multiple of bucket_reso_steps {steps}; rounded down to {new_min}"
        )
    if new_max != max_reso:
        warnings.append(
            f"max_bucket_reso {max_reso} is not a multiple of bucket_reso_steps {steps}; rounded up to {new_max}"
        )
    return new_min, new_max, warnings


def make_bucket_resolutions(max_area: int, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """kohya's bucket list: the square bucket, plus (w, h) and (h, w) for every step width.

    For w = min_reso, min_reso + steps, ... <= max_reso the height is the largest multiple of ``steps``
    with w·h <= max_area, capped at max_reso; pairs with h < min_reso are skipped. Sorted, no duplicates.
    Same list as kohya's ``make_bucket_resolutions``, so latents cached by either tool share buckets.
    """
    side = _floor_to(math.isqrt(max_area), steps)
    buckets: set[Size] = {(side, side)}
    for width in range(min_reso, max_reso + 1, steps):
        height = min(max_reso, _floor_to(max_area // width, steps))
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def make_bucket_set(
    resolution: Size | int,
    min_bucket_reso: int | None = None,
    max_bucket_reso: int | None = None,
    bucket_reso_steps: int = 64,
    *,
    min_step: int = 64,
    no_upscale: bool = False,
) -> BucketSet:
    """Validate the bucket options and build the :class:`BucketSet`.

    ``min_step`` is the granularity the model family needs (64 for SD1/SD2, 32 for SDXL): the step must
    be a multiple of it, so the caller states the rule instead of this module knowing families.
    ``min_bucket_reso``/``max_bucket_reso`` default to kohya's 256/1024 and are ignored (with a warning
    when given) under ``no_upscale``, where buckets are made per image. Warnings are logged and also
    returned in ``BucketSet.warnings`` for the start-up printout.
    """
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    res_w, res_h = resolution
    if res_w <= 0 or res_h <= 0:
        raise ValueError(f"resolution must be positive, got {res_w}x{res_h}")
    if min_step <= 0:
        raise ValueError(f"min_step must be positive, got {min_step}")
    if bucket_reso_steps <= 0 or bucket_reso_steps % min_step != 0:
        raise ValueError(
            f"bucket_reso_steps must be a positive multiple of {min_step} for this model, got {bucket_reso_steps}"
        )
    if math.isqrt(res_w * res_h) < bucket_reso_steps:
        raise ValueError(
            f"resolution {res_w}x{res_h} is too small for bucket_reso_steps {bucket_reso_steps}: no bucket fits"
        )

    warnings: list[str] = []
    if no_upscale:
        if min_bucket_reso is not None or max_bucket_reso is not None:
            warnings.append("min_bucket_reso and max_bucket_reso are ignored with bucket_no_upscale")
        min_reso, max_reso, buckets = 0, 0, ()
    else:
        min_given = DEFAULT_MIN_BUCKET_RESO if min_bucket_reso is None else min_bucket_reso
        max_given = DEFAULT_MAX_BUCKET_RESO if max_bucket_reso is None else max_bucket_reso
        min_reso, max_reso, rounding = round_bucket_limits(min_given, max_given, bucket_reso_steps)
        warnings += rounding
        if min_reso <= 0:
            raise ValueError(
                f"min_bucket_reso {min_given} rounds down to {min_reso}; it must be at least "
                f"bucket_reso_steps ({bucket_reso_steps})"
            )
        if min_reso > min(resolution):
            raise ValueError(
                f"min_bucket_reso ({min_reso}) must be <= the smaller side of resolution {res_w}x{res_h}"
            )
        if max_reso < max(resolution):
            raise ValueError(
                f"max_bucket_reso ({max_reso}) must be >= the larger side of resolution {res_w}x{res_h}"
            )
        buckets = tuple(make_bucket_resolutions(res_w * res_h, min_reso, max_reso, bucket_reso_steps))

    for message in warnings:
        logger.warning(message)
    return BucketSet(
        resolution=(res_w, res_h),
        steps=bucket_reso_steps,
        min_reso=min_reso,
        max_reso=max_reso,
        no_upscale=no_upscale,
        buckets=buckets,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------------------------------
# Bucket selection
# --------------------------------------------------------------------------------------------------


def _check_image_size(image_size: Size) -> tuple[int, int]:
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return width, height


def cover_resize(image_size: Size, bucket: Size) -> tuple[Size, float]:
    """The smallest same-aspect resize that covers ``bucket``; returns (resized_size, scale).

    scale = max(bw/w, bh/h): one side matches the bucket exactly, the other is rounded half up (as
    kohya does) and never falls below the bucket, so the crop that follows is always possible.
    Integer arithmetic keeps exact-aspect images exact.
    """
    width, height = _check_image_size(image_size)
    bucket_w, bucket_h = bucket
    if bucket_w * height >= bucket_h * width:  # the image is not wider than the bucket: match widths
        resized = (bucket_w, max(bucket_h, (2 * height * bucket_w + width) // (2 * width)))
        return resized, bucket_w / width
    resized = (max(bucket_w, (2 * width * bucket_h + height) // (2 * height)), bucket_h)
    return resized, bucket_h / height


def select_bucket(image_size: Size, buckets: Sequence[Size]) -> BucketAssignment:
    """Upscale-allowed selection (kohya's rule): the exact bucket if there is one, else the nearest aspect.

    Aspect error is |bw/bh - w/h| as in kohya (ties go to the first bucket in sorted order), so images
    land in the same buckets as with kohya's tools. The image is then resized to cover the bucket.
    """
    width, height = _check_image_size(image_size)
    if not buckets:
        raise ValueError("no buckets to choose from")
    size = (width, height)
    if size in buckets:
        bucket = size
    else:
        aspect = width / height
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
    resized, scale = cover_resize(size, bucket)
    return BucketAssignment(image_size=size, bucket=bucket, resized_size=resized, scale=scale)


def fit_to_area(image_size: Size, max_area: int) -> Size:
    """The image size scaled down (same aspect, rounded half up) to ``max_area``; unchanged if already inside."""
    width, height = _check_image_size(image_size)
    if width * height <= max_area:
        return width, height
    fitted_w = int(math.sqrt(max_area * width / height) + 0.5)
    fitted_h = int(math.sqrt(max_area * height / width) + 0.5)
    return fitted_w, fitted_h


def select_bucket_no_upscale(image_size: Size, max_area: int, steps: int) -> BucketAssignment:
    """Per-image bucket that never upscales and keeps the most pixels (fixes kohya #731).

    1. An image above ``max_area`` is first scaled down (same aspect) to fit it: the *fitted* size.
    2. Candidates are buckets (bw, bh), multiples of ``steps``, no larger than the fitted size on either
       side and with bw·bh <= max_area. Any of them can be reached by a downscale-to-cover plus a crop.
    3. We take the candidate with the largest area, i.e. the one that keeps the most of the fitted
       image's pixels after resize-to-cover and crop; ties go to the smaller aspect error (in log ratio,
       so a transposed image gets the transposed bucket).
    4. The image is resized to cover that bucket and cropped, so only the thin aspect mismatch is cut.

    How kohya differs and why we don't copy it: kohya rounds one side of the fitted size down to the
    step, derives the other side from the aspect ratio, keeps that as the resized size and then floors
    both sides again to make the bucket. The second floor throws away up to a step on a side that had
    room, so 1050x1080 at 1024² becomes 960x960 (921,600 px) where 960x1024 (983,040 px) fits. kohya
    also crops the fitted image on both sides instead of resizing it to cover the bucket.

    Images that fit inside ``max_area`` get the same bucket as in kohya (both sides floored).
    Raises ValueError naming the size if a side is smaller than ``steps`` after fitting, since no
    bucket exists without upscaling; the caller adds the file name.
    """
    width, height = _check_image_size(image_size)
    fitted_w, fitted_h = fit_to_area((width, height), max_area)
    if fitted_w < steps or fitted_h < steps:
        fitted = ""
        if (fitted_w, fitted_h) != (width, height):
            fitted = f" (scaled to {fitted_w}x{fitted_h} to fit the area)"
        raise ValueError(
            f"image size {width}x{height}{fitted} is smaller than bucket_reso_steps {steps} on a side; "
            "no bucket can be made without upscaling"
        )
    log_aspect = math.log(width / height)
    best: tuple[int, float, Size] | None = None
    # For a given width the tallest allowed height always has the most area, so one candidate per width.
    for bucket_w in range(steps, _floor_to(fitted_w, steps) + 1, steps):
        bucket_h = min(_floor_to(fitted_h, steps), _floor_to(max_area // bucket_w, steps))
        if bucket_h < steps:
            continue
        area, aspect_error = bucket_w * bucket_h, abs(math.log(bucket_w / bucket_h) - log_aspect)
        if best is None or area > best[0] or (area == best[0] and aspect_error < best[1]):
            best = (area, aspect_error, (bucket_w, bucket_h))
    if best is None:  # only if max_area < steps², which make_bucket_set rejects
        raise ValueError(f"image size {width}x{height}: no {steps}-step bucket fits in area {max_area}")
    bucket = best[2]
    resized, scale = cover_resize((width, height), bucket)
    return BucketAssignment(image_size=(width, height), bucket=bucket, resized_size=resized, scale=scale)


# --------------------------------------------------------------------------------------------------
# Cropping and SDXL crop conditioning
# --------------------------------------------------------------------------------------------------


def crop_box(resized_size: Size, bucket: Size, random_crop: bool, rng: random.Random | None = None) -> Size:
    """(left, top) of the bucket-sized crop in the resized image: centered, or uniform with ``rng``.

    The RNG is passed in (never the global ``random``) so crops are reproducible per worker and seed.
    """
    excess_w, excess_h = resized_size[0] - bucket[0], resized_size[1] - bucket[1]
    if excess_w < 0 or excess_h < 0:
        raise ValueError(f"resized size {resized_size} does not cover bucket {bucket}")
    if not random_crop:
        return excess_w // 2, excess_h // 2
    if rng is None:
        raise ValueError("random_crop needs an rng (random.Random) so crops are reproducible")
    return rng.randint(0, excess_w), rng.randint(0, excess_h)


def crop_top_left(bucket: Size, resized_size: Size, crop_left_top: Size, flipped: bool) -> tuple[int, int]:
    """SDXL ``crops_coords_top_left`` as (top, left): the true crop offset in the resized image.

    SDXL's micro-conditioning was trained on the number of pixels cut from the top and the left of the
    resized image (the SDXL paper, §2.2), so that is what we report. When the crop is flipped
    horizontally afterwards, what was the right margin becomes the left, so left' = resized_w - bucket_w
    - left. kohya's ``get_crop_ltrb`` instead computes the letterbox offset of the image fitted *inside*
    the bucket, axis-swapped: a 1000x2000 image in a 1024² bucket gets (top 0, left 256) although
    ~512 px were cut from the top, and random crops are not tracked at all.
    """
    left, top = crop_left_top
    if flipped:
        left = resized_size[0] - bucket[0] - left
    if left < 0 or top < 0 or left + bucket[0] > resized_size[0] or top + bucket[1] > resized_size[1]:
        raise ValueError(f"crop at (left {left}, top {top}) of {bucket} does not fit in {resized_size}")
    return top, left


# --------------------------------------------------------------------------------------------------
# Batch sampler
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketStats:
    """Per-bucket batch counts for the start-up printout."""

    bucket: Hashable
    count: int
    full_batches: int
    short_batch_size: int  # 0 when the bucket divides evenly


@dataclass(frozen=True)
class SamplerSummary:
    """What one epoch looks like: per-bucket counts, padding for the ranks, and anything dropped."""

    buckets: tuple[BucketStats, ...]
    batch_size: int
    world_size: int
    total_batches: int  # distinct batches per epoch, all ranks together
    repeated_batches: int  # batches repeated from the start so every rank gets the same count
    batches_per_rank: int
    dropped_samples: int  # only with drop_last

    def format(self) -> str:
        """Human-readable lines for the log."""
        lines = []
        for stats in self.buckets:
            short = f", short last batch of {stats.short_batch_size}" if stats.short_batch_size else ""
            kept = " (dropped)" if stats.short_batch_size and self.dropped_samples else ""
            lines.append(
                f"bucket {stats.bucket}: {stats.count} samples, {stats.full_batches} full batches of "
                f"{self.batch_size}{short}{kept}"
            )
        lines.append(
            f"{self.total_batches} batches per epoch; {self.repeated_batches} repeated from the start so each "
            f"of {self.world_size} rank(s) runs {self.batches_per_rank} batches"
        )
        if self.dropped_samples:
            lines.append(f"drop_last: {self.dropped_samples} samples in short batches are skipped each epoch")
        return "\n".join(lines)


@dataclass
class _Progress:
    """Where this rank is: the epoch and how many of its batches were already yielded (or resumed past)."""

    epoch: int = 0
    batches_done: int = 0
    resume_from: int = 0


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices, one bucket per batch, sharded across ranks. Use as
    ``DataLoader(dataset, batch_sampler=sampler)``.

    * The global order of an epoch (samples within each bucket, then the order of batches) comes only
      from (seed, epoch) via a ``random.Random`` seeded with both, so every rank computes the same
      order without communication. The seed must be the same on all ranks (kohya's pitfall: an
      unseeded run draws a different seed per rank).
    * The last batch of a bucket may be short and is kept, unless ``drop_last``.
    * Rank r takes batches r, r + world_size, ... of the global order. If the batch count does not
      divide by world_size, the global list is padded by repeating batches from its start, so all
      ranks run the same number of steps (otherwise DDP would hang at the last all-reduce). The
      summary reports how many were repeated.
    * ``batches_per_step`` (gradient accumulation) pads each rank's share to a whole number of optimizer
      steps the same way, so every epoch ends on an optimizer step: no partial accumulation is carried
      into the next epoch, and an epoch-end checkpoint holds no pending gradients.
    * ``state_dict``/``load_state_dict`` resume exactly mid-epoch, also on another world size with the same
      world_size x batches_per_step (the position in the global order is kept). With DataLoader workers
      the sampler runs ahead of training (prefetch), so pass the number of batches the loop actually
      consumed to ``state_dict(batches_done=...)``.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        batches_per_step: int = 1,
    ) -> None:
        """``buckets[i]`` is the bucket key of sample index i (repeats already expanded by the caller)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        check_rank(rank, world_size)
        if batches_per_step <= 0:
            raise ValueError(f"batches_per_step must be positive, got {batches_per_step}")
        self.batches_per_step = batches_per_step
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.drop_last = drop_last
        # Bucket keys in order of first appearance: deterministic on every rank, and keys need not sort.
        self._members: dict[Hashable, list[int]] = {}
        for index, key in enumerate(buckets):
            self._members.setdefault(key, []).append(index)
        self._progress = _Progress()

    # ---- order ----

    def _batch_count(self) -> int:
        counts = (len(members) for members in self._members.values())
        if self.drop_last:
            return sum(n // self.batch_size for n in counts)
        return sum(-(-n // self.batch_size) for n in counts)

    def _padded_count(self) -> int:
        multiple = self.world_size * self.batches_per_step
        return -(-self._batch_count() // multiple) * multiple

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batch order of ``epoch`` (all ranks, padding included); the same on every rank."""
        rng = random.Random(f"bucket-batch-sampler:{self.seed}:{epoch}")
        batches: list[list[int]] = []
        for members in self._members.values():
            shuffled = list(members)
            rng.shuffle(shuffled)
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        padding = self._padded_count() - len(batches)
        if batches and padding:
            batches += [list(b) for b in itertools.islice(itertools.cycle(batches), padding)]
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of ``epoch_batches(epoch)``: every world_size-th batch from ``rank``."""
        return rank_share(self.epoch_batches(epoch), rank=self.rank, world_size=self.world_size)

    # ---- Sampler protocol ----

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self._padded_count() // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        progress = self._progress
        start, progress.resume_from = progress.resume_from, 0
        progress.batches_done = start
        for batch in self.rank_batches(progress.epoch)[start:]:
            progress.batches_done += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields. Re-selecting the resumed epoch keeps the
        resume point, so a loop that calls ``set_epoch(epoch)`` right after ``load_state_dict`` works."""
        if epoch != self._progress.epoch:
            self._progress = _Progress(epoch=epoch)

    # ---- resumption ----

    def state_dict(self, batches_done: int | None = None) -> dict[str, int]:
        """{"epoch", "batches_done" (this epoch, this rank), "seed"}. Pass ``batches_done`` when the
        DataLoader prefetches (num_workers > 0): the sampler's own count is then ahead of training."""
        done = self._progress.batches_done if batches_done is None else batches_done
        return {"epoch": self._progress.epoch, "batches_done": done, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``__iter__`` continue at the batch after the last one done in ``state``.

        ``global_batches_done`` (batches consumed over all ranks), when given, wins over ``batches_done``: it
        is the same position in the epoch's global order whatever the process count that saved it, as long as
        the batches of one optimizer step (``world_size x batches_per_step``) are as many as then. The saved
        seed wins over the one given at construction, since the order depends on it.
        """
        epoch, done, seed = int(state["epoch"]), int(state.get("batches_done", 0)), int(state["seed"])
        if "global_batches_done" in state:
            consumed = int(state["global_batches_done"])
            if consumed % self.world_size:
                raise ValueError(f"global_batches_done {consumed} cannot be shared evenly by {self.world_size} ranks")
            done = consumed // self.world_size
        if not 0 <= done <= len(self):
            raise ValueError(f"batches_done {done} is outside 0..{len(self)} for this sampler")
        if seed != self.seed:
            logger.warning("bucket sampler: resuming with the saved seed %d instead of %d", seed, self.seed)
            self.seed = seed
        self._progress = _Progress(epoch=epoch, batches_done=done, resume_from=done)

    # ---- reporting ----

    def summary(self) -> SamplerSummary:
        """Counts for the start-up printout (see :meth:`SamplerSummary.format`)."""
        stats = tuple(
            BucketStats(
                bucket=key,
                count=len(members),
                full_batches=len(members) // self.batch_size,
                short_batch_size=len(members) % self.batch_size,
            )
            for key, members in self._members.items()
        )
        dropped = sum(s.short_batch_size for s in stats) if self.drop_last else 0
        return SamplerSummary(
            buckets=stats,
            batch_size=self.batch_size,
            world_size=self.world_size,
            total_batches=self._batch_count(),
            repeated_batches=self._padded_count() - self._batch_count(),
            batches_per_rank=len(self),
            dropped_samples=dropped,
        )
