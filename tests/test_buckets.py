"""Tests for library/buckets.py: bucket list, selection, no-upscale (#731), crops, and the batch sampler."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from library.data.buckets import (
    BucketAssignment,
    BucketBatchSampler,
    cover_resize,
    crop_box,
    crop_top_left,
    fit_to_area,
    make_bucket_set,
    round_bucket_limits,
    select_bucket,
    select_bucket_no_upscale,
)

AREA_1024 = 1024 * 1024


# ---- bucket set ----


def test_bucket_list_512_matches_kohya() -> None:
    bucket_set = make_bucket_set(512, 256, 1024, 64)
    assert bucket_set.buckets == (
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    )  # fmt: skip
    for known in [(512, 512), (384, 640), (640, 384), (256, 1024), (1024, 256)]:
        assert known in bucket_set.buckets
    for w, h in bucket_set.buckets:
        assert w * h <= 512 * 512
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert (h, w) in bucket_set.buckets
    assert list(bucket_set.buckets) == sorted(set(bucket_set.buckets))
    assert bucket_set.warnings == ()


def test_min_max_rounding_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert round_bucket_limits(300, 1000, 64)[:2] == (256, 1024)
    with caplog.at_level(logging.WARNING, logger="library.data.buckets"):
        bucket_set = make_bucket_set((512, 512), 300, 1000, 64)
    assert (bucket_set.min_reso, bucket_set.max_reso) == (256, 1024)
    assert len(bucket_set.warnings) == 2
    assert "rounded down to 256" in bucket_set.warnings[0] and "rounded up to 1024" in bucket_set.warnings[1]
    assert len(caplog.records) == 2
    assert bucket_set.buckets == make_bucket_set(512, 256, 1024, 64).buckets


def test_sdxl_step_32_and_step_validation() -> None:
    xl = make_bucket_set((1024, 1024), 256, 2048, 32, min_step=32)
    assert (1024, 1024) in xl.buckets and (992, 1056) in xl.buckets
    assert all(w % 32 == 0 and h % 32 == 0 and w * h <= AREA_1024 for w, h in xl.buckets)
    with pytest.raises(ValueError, match="multiple of 64"):
        make_bucket_set(512, 256, 1024, 32, min_step=64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(resolution=512, min_bucket_reso=640, max_bucket_reso=1024), "min_bucket_reso"),
        (dict(resolution=(512, 768), min_bucket_reso=256, max_bucket_reso=640), "max_bucket_reso"),
        (dict(resolution=512, min_bucket_reso=32, max_bucket_reso=1024), "at least"),
        (dict(resolution=(0, 512)), "positive"),
    ],
)
def test_bad_bucket_options_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_bucket_set(**kwargs)


def test_no_upscale_ignores_min_max_with_warning() -> None:
    bucket_set = make_bucket_set(1024, 64, 4096, 64, no_upscale=True)
    assert bucket_set.buckets == () and bucket_set.no_upscale
    assert "ignored" in bucket_set.warnings[0]
    assert make_bucket_set(1024, no_upscale=True).warnings == ()
    assert bucket_set.select((1050, 1080)).bucket == (960, 1024)


# ---- selection with upscale ----


def test_exact_bucket_is_used() -> None:
    buckets = make_bucket_set(512, 256, 1024, 64).buckets
    assert select_bucket((384, 640), buckets) == BucketAssignment((384, 640), (384, 640), (384, 640), 1.0)


def test_nearest_aspect_and_cover_resize() -> None:
    buckets = make_bucket_set(512, 256, 1024, 64).buckets
    # 1000x600 (ar 1.667) is nearest 640x384 (1.667): scale to width 640.
    assert select_bucket((1000, 600), buckets) == BucketAssignment((1000, 600), (640, 384), (640, 384), 0.64)
    # 300x500 (0.6) -> 384x640 (0.6), upscaled.
    assert select_bucket((300, 500), buckets) == BucketAssignment((300, 500), (384, 640), (384, 640), 1.28)
    # 600x600 is not a bucket; square 512 is nearest; downscaled.
    assert select_bucket((600, 600), buckets).bucket == (512, 512)
    # 700x500 (1.4) -> 576x448 (1.286): image wider than bucket, so heights match, width covers.
    a = select_bucket((700, 500), buckets)
    assert (a.bucket, a.resized_size) == ((576, 448), (627, 448))
    assert a.scale == pytest.approx(448 / 500)
    assert a.resized_size[0] >= a.bucket[0] and a.resized_size[1] >= a.bucket[1]


def test_cover_resize_rounds_half_up_and_never_undershoots() -> None:
    assert cover_resize((1000, 2000), (1024, 1024)) == ((1024, 2048), 1.024)
    assert cover_resize((3, 2), (64, 64)) == ((96, 64), 32.0)
    resized, scale = cover_resize((1001, 999), (512, 512))
    assert resized == (513, 512) and scale == pytest.approx(512 / 999)


# ---- bucket_no_upscale ----


def test_issue_731_near_square_keeps_more_pixels() -> None:
    a = select_bucket_no_upscale((1050, 1080), AREA_1024, 64)
    assert a.bucket == (960, 1024)  # kohya gives 960x960
    assert a.resized_size == (996, 1024)
    assert a.scale == pytest.approx(1024 / 1080)
    kohya_bucket = (960, 960)
    assert a.bucket[0] * a.bucket[1] == 983_040 > kohya_bucket[0] * kohya_bucket[1] == 921_600
    assert a.bucket[0] * a.bucket[1] <= AREA_1024
    assert a.scale < 1.0  # never upscaled
    # With SDXL's 32 step the loss shrinks further.
    assert select_bucket_no_upscale((1050, 1080), AREA_1024, 32).bucket == (992, 1024)


def _brute_force_best(size: tuple[int, int], max_area: int, steps: int) -> tuple[int, int]:
    """Search every candidate the docstring describes; the implementation must agree."""
    fw, fh = fit_to_area(size, max_area)
    log_ar = math.log(size[0] / size[1])
    candidates = [
        (bw, bh)
        for bw in range(steps, fw + 1, steps)
        for bh in range(steps, fh + 1, steps)
        if bw * bh <= max_area
    ]
    return max(candidates, key=lambda b: (b[0] * b[1], -abs(math.log(b[0] / b[1]) - log_ar)))


def test_no_upscale_matches_exhaustive_search() -> None:
    rng = random.Random(0)
    sizes = [(1050, 1080), (4000, 3000), (2048, 2048), (1000, 600), (64, 64), (3000, 200), (1100, 1000)]
    sizes += [(rng.randint(64, 3000), rng.randint(64, 3000)) for _ in range(60)]
    for size in sizes:
        a = select_bucket_no_upscale(size, AREA_1024, 64)
        assert a.bucket == _brute_force_best(size, AREA_1024, 64), size
        assert a.scale <= 1.0
        assert a.resized_size[0] >= a.bucket[0] and a.resized_size[1] >= a.bucket[1]
        assert a.resized_size[0] <= size[0] and a.resized_size[1] <= size[1]


def test_no_upscale_small_image_keeps_floored_size() -> None:
    assert select_bucket_no_upscale((1000, 600), AREA_1024, 64) == BucketAssignment(
        (1000, 600), (960, 576), (960, 576), 0.96
    )
    a = select_bucket_no_upscale((700, 520), AREA_1024, 64)
    assert (a.bucket, a.resized_size) == ((640, 512), (689, 512))
    assert select_bucket_no_upscale((512, 512), AREA_1024, 64).resized_size == (512, 512)


def test_no_upscale_big_image_fits_area() -> None:
    a = select_bucket_no_upscale((4000, 3000), AREA_1024, 64)
    assert (a.bucket, a.resized_size, a.scale) == ((1152, 832), (1152, 864), 0.288)
    assert fit_to_area((2048, 2048), AREA_1024) == (1024, 1024)
    assert select_bucket_no_upscale((2048, 2048), AREA_1024, 64).bucket == (1024, 1024)


def test_no_upscale_too_small_raises_naming_size() -> None:
    with pytest.raises(ValueError, match=r"image size 50x400 .*bucket_reso_steps 64"):
        select_bucket_no_upscale((50, 400), AREA_1024, 64)
    with pytest.raises(ValueError, match=r"100000x70 \(scaled to"):
        select_bucket_no_upscale((100000, 70), AREA_1024, 64)


# ---- crops ----


def test_center_and_random_crop_box() -> None:
    assert crop_box((996, 1024), (960, 1024), random_crop=False) == (18, 0)
    assert crop_box((1024, 2048), (1024, 1024), random_crop=False) == (0, 512)
    first = crop_box((1100, 1300), (1024, 1024), True, random.Random(1234))
    again = crop_box((1100, 1300), (1024, 1024), True, random.Random(1234))
    assert first == again
    rng = random.Random(7)
    boxes = {crop_box((1100, 1300), (1024, 1024), True, rng) for _ in range(200)}
    assert all(0 <= left <= 76 and 0 <= top <= 276 for left, top in boxes)
    assert len(boxes) > 100
    with pytest.raises(ValueError, match="rng"):
        crop_box((1100, 1300), (1024, 1024), True, None)
    with pytest.raises(ValueError, match="cover"):
        crop_box((1000, 1024), (1024, 1024), False)


def test_sdxl_crop_top_left_is_true_offset() -> None:
    # Reference example: 1000x2000 in a 1024² bucket. kohya's letterbox formula says (top 0, left 256).
    a = select_bucket((1000, 2000), [(1024, 1024)])
    assert a.resized_size == (1024, 2048)
    box = crop_box(a.resized_size, a.bucket, random_crop=False)
    assert crop_top_left(a.bucket, a.resized_size, box, flipped=False) == (512, 0)
    assert crop_top_left(a.bucket, a.resized_size, box, flipped=True) == (512, 0)
    # Landscape, random crop off-centre: the flip mirrors the left offset.
    assert crop_top_left((1024, 1024), (2048, 1024), (100, 0), flipped=False) == (0, 100)
    assert crop_top_left((1024, 1024), (2048, 1024), (100, 0), flipped=True) == (0, 924)
    with pytest.raises(ValueError):
        crop_top_left((1024, 1024), (2048, 1024), (1500, 0), flipped=False)


# ---- sampler ----

# 3 buckets: 10 of A, 7 of B, 4 of C, interleaved as a dataset would list them.
KEYS = ["A"] * 10 + ["B"] * 7 + ["C"] * 4
random.Random(3).shuffle(KEYS)


def _sampler(**kwargs) -> BucketBatchSampler:
    args = dict(buckets=KEYS, batch_size=4, seed=42, world_size=1, rank=0) | kwargs
    return BucketBatchSampler(**args)


def test_summary_counts() -> None:
    summary = _sampler(world_size=2).summary()
    by_key = {s.bucket: (s.count, s.full_batches, s.short_batch_size) for s in summary.buckets}
    assert by_key == {"A": (10, 2, 2), "B": (7, 1, 3), "C": (4, 1, 0)}
    # 3 + 2 + 1 = 6 batches -> even over 2 ranks, nothing repeated
    assert (summary.total_batches, summary.repeated_batches, summary.batches_per_rank) == (6, 0, 3)
    summary3 = _sampler(world_size=4).summary()
    assert (summary3.total_batches, summary3.repeated_batches, summary3.batches_per_rank) == (6, 2, 2)
    text = summary3.format()
    assert "short last batch of 2" in text and "2 repeated" in text
    dropped = _sampler(drop_last=True).summary()
    assert (dropped.total_batches, dropped.dropped_samples) == (4, 5)


def test_batches_single_bucket_and_every_index_once_world_size_2() -> None:
    for world_size in (2, 4):
        samplers = [_sampler(world_size=world_size, rank=r) for r in range(world_size)]
        summary = samplers[0].summary()
        for epoch in (0, 1):
            seen: Counter[int] = Counter()
            for sampler in samplers:
                sampler.set_epoch(epoch)
                batches = list(sampler)
                assert len(batches) == len(sampler) == summary.batches_per_rank
                for batch in batches:
                    assert len({KEYS[i] for i in batch}) == 1
                    assert 1 <= len(batch) <= 4
                    seen.update(batch)
            global_order = samplers[0].epoch_batches(epoch)
            distinct, repeated = global_order[: summary.total_batches], global_order[summary.total_batches :]
            assert len(repeated) == summary.repeated_batches
            assert repeated == global_order[: len(repeated)]  # padding repeats from the start
            once = Counter(i for b in distinct for i in b)
            assert once == Counter(range(len(KEYS)))  # short batches kept, nothing dropped
            assert seen == once + Counter(i for b in repeated for i in b)


def test_ranks_agree_without_communication() -> None:
    rank0, rank1 = _sampler(world_size=2, rank=0), _sampler(world_size=2, rank=1)
    for epoch in (0, 3):
        assert rank0.epoch_batches(epoch) == rank1.epoch_batches(epoch)
        assert rank0.rank_batches(epoch) == rank0.epoch_batches(epoch)[0::2]
        assert rank1.rank_batches(epoch) == rank1.epoch_batches(epoch)[1::2]
    assert _sampler(seed=1).epoch_batches(0) != _sampler(seed=2).epoch_batches(0)


def test_epochs_reshuffle() -> None:
    sampler = _sampler()
    epoch0 = list(sampler)
    assert list(sampler) == epoch0  # same epoch, same order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    assert sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))  # batch contents change too
    assert _sampler().epoch_batches(1) == epoch1


def test_exact_resume() -> None:
    full = _sampler(world_size=2, rank=1)
    full.set_epoch(2)
    uninterrupted = list(full)

    first = _sampler(world_size=2, rank=1)
    first.set_epoch(2)
    iterator = iter(first)
    head = [next(iterator) for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_done": 2, "seed": 42}

    resumed = _sampler(world_size=2, rank=1, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop re-selecting the epoch keeps the resume point
    assert head + list(resumed) == uninterrupted
    assert list(resumed) == uninterrupted  # the resume point is used once
    resumed.set_epoch(3)
    assert list(resumed) == full.rank_batches(3)


def test_exact_resume_after_three_batches() -> None:
    sampler = _sampler(batch_size=2)  # 5 + 4 + 2 = 11 batches
    uninterrupted = list(sampler)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(3)]
    state = sampler.state_dict()
    new = _sampler(batch_size=2)
    new.load_state_dict(state)
    assert head + list(new) == uninterrupted
    assert len(uninterrupted) == 11
    assert sampler.state_dict(batches_done=1)["batches_done"] == 1  # prefetching loaders pass the truth
    with pytest.raises(ValueError, match="batches_done"):
        new.load_state_dict({"epoch": 0, "batches_done": 12, "seed": 42})


def test_works_as_dataloader_batch_sampler() -> None:
    dataset = list(range(len(KEYS)))
    sampler = _sampler()
    loader = DataLoader(dataset, batch_sampler=sampler)
    got = [batch.tolist() for batch in loader]
    assert got == sampler.rank_batches(0)
    assert len(loader) == len(sampler) == 6


def test_sampler_argument_checks() -> None:
    with pytest.raises(ValueError):
        _sampler(batch_size=0)
    with pytest.raises(ValueError):
        _sampler(world_size=2, rank=2)
    assert len(BucketBatchSampler([], 4, seed=0, world_size=2, rank=0)) == 0
    # fewer batches than ranks: padding cycles so every rank still gets one
    tiny = [BucketBatchSampler(["x", "x"], 4, seed=0, world_size=3, rank=r) for r in range(3)]
    for sampler in tiny:
        (batch,) = list(sampler)
        assert sorted(batch) == [0, 1]
    assert tiny[0].summary().repeated_batches == 2


def test_accumulation_pads_each_rank_to_whole_optimizer_steps() -> None:
    """5 single-sample batches, 2 ranks x 2 accumulation steps: 8 batches, each rank 4 = 2 optimizer steps."""
    sampler = BucketBatchSampler(["a"] * 5, batch_size=1, seed=0, world_size=2, rank=0, batches_per_step=2)
    assert len(sampler) == 4
    assert len(sampler.epoch_batches(1)) == 8
    assert sampler.summary().repeated_batches == 3
    assert sorted(i for b in sampler.epoch_batches(1)[:5] for i in b) == [0, 1, 2, 3, 4]
