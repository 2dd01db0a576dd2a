"""How one epoch of streamed shards is split over ranks and DataLoader workers, planned from index.json alone.

Every (rank, worker) pair reads its own shards (a "stream"): the shards are dealt to ranks and then to
workers once per run, by sample count, so the split is the same in every epoch and on every rank without
communication, and every sample is read by exactly one stream per epoch. A stream turns its samples into
single-bucket batches; it makes, per bucket, ceil(samples / batch_size) batches whatever order the samples
arrive in, so each stream's batch count is known from the per-shard bucket histograms without opening a shard.

A rank's DataLoader takes one batch from each worker in turn, skipping workers that are done (what torch's
DataLoader does with an IterableDataset), so the position of every batch in the rank's order is arithmetic
(:meth:`EpochLayout.position`). Ranks that would run fewer batches than the longest one are padded by
repeating batches from the start of a stream (as the folder sampler repeats batches from the start of its
order), so all ranks run the same number of steps, a whole number of optimizer steps per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BucketKey = tuple[int, int, int]
"""(dataset position, width, height): a batch never mixes datasets or sizes."""


@dataclass(frozen=True)
class ShardUnit:
    """One shard of one subset: where it is and what index.json says it holds."""

    url: str  # anything webdataset opens: a path, http(s)://, pipe:COMMAND
    name: str  # its name in index.json
    subset: int  # position of its subset in ShardSource.subsets
    dataset: int  # position of its dataset (batches never mix datasets)
    samples: int
    buckets: tuple[tuple[BucketKey, int], ...]  # bucket key -> sample count


def stream_bucket_counts(units: Sequence[ShardUnit]) -> dict[BucketKey, int]:
    """Samples per bucket key over ``units``."""
    counts: dict[BucketKey, int] = {}
    for unit in units:
        for key, count in unit.buckets:
            counts[key] = counts.get(key, 0) + count
    return counts


def batch_count(counts: dict[BucketKey, int], batch_size: int) -> int:
    """Batches a stream makes: one short batch at most per bucket."""
    return sum(-(-n // batch_size) for n in counts.values())


@dataclass(frozen=True)
class StreamPlan:
    """One (rank, worker) stream: its shards, its own batches and the padding batches it appends."""

    units: tuple[int, ...]  # positions in the unit list
    real_batches: int
    short_batches: int
    padding: int = 0
    padding_source: int = -1  # the stream whose first batches are repeated as padding (-1: none)

    @property
    def total(self) -> int:
        return self.real_batches + self.padding


def _deal(items: Sequence[int], weights: Sequence[int], bins: int) -> list[list[int]]:
    """Largest first to the lightest bin (ties: lowest bin); deterministic."""
    order = sorted(items, key=lambda i: (-weights[i], i))
    loads, dealt = [0] * bins, [[] for _ in range(bins)]
    for item in order:
        target = min(range(bins), key=lambda b: (loads[b], b))
        loads[target] += weights[item]
        dealt[target].append(item)
    return [sorted(d) for d in dealt]


@dataclass(frozen=True)
class EpochLayout:
    """The streams of all ranks (index ``rank * workers + worker``) and the batch count every rank runs."""

    world_size: int
    workers: int  # streams per rank: the DataLoader's workers (1 without workers)
    batch_size: int
    batches_per_step: int
    streams: tuple[StreamPlan, ...]
    batches_per_rank: int

    def stream_id(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def rank_counts(self, rank: int) -> list[int]:
        """Batches each worker of ``rank`` yields, padding included."""
        return [self.streams[self.stream_id(rank, w)].total for w in range(self.workers)]

    def position(self, rank: int, worker: int, k: int) -> int:
        """Where the ``k``-th batch of ``worker`` falls in ``rank``'s batch order (round-robin over the workers
        that still have batches)."""
        counts = self.rank_counts(rank)
        return sum(min(c, k) for c in counts) + sum(1 for w in range(worker) if counts[w] > k)

    def consumed(self, rank: int, batches_done: int) -> list[int]:
        """Per worker of ``rank``: how many of its batches are among the rank's first ``batches_done``."""
        counts = self.rank_counts(rank)
        result = []
        for worker, count in enumerate(counts):
            low, high = 0, count  # the number of k with position(k) < batches_done
            while low < high:
                middle = (low + high) // 2
                if self.position(rank, worker, middle) < batches_done:
                    low = middle + 1
                else:
                    high = middle
            result.append(low)
        return result

    def first_worker(self, rank: int, batches_done: int) -> int:
        """The worker whose batch comes next after ``batches_done``: a resumed DataLoader starts its round-robin
        at its worker 0, so DataLoader worker i runs stream ``(first_worker + i) % workers``."""
        counts, consumed = self.rank_counts(rank), self.consumed(rank, batches_done)
        pending = [(self.position(rank, w, consumed[w]), w) for w in range(self.workers) if consumed[w] < counts[w]]
        return min(pending)[1] if pending else 0

    @property
    def real_batches(self) -> int:
        return sum(s.real_batches for s in self.streams)

    @property
    def repeated_batches(self) -> int:
        return sum(s.padding for s in self.streams)

    @property
    def short_batches(self) -> int:
        return sum(s.short_batches for s in self.streams)


def plan_layout(units: Sequence[ShardUnit], *, world_size: int, workers: int, batch_size: int,
                batches_per_step: int = 1) -> EpochLayout:
    """Deal the shards to ranks, then to each rank's workers, and pad every rank to the same whole number of
    optimizer steps (at least one)."""
    if world_size < 1 or workers < 1 or batch_size < 1 or batches_per_step < 1:
        raise ValueError("world_size, workers, batch_size and batches_per_step must be >= 1")
    weights = [u.samples for u in units]
    plans: list[StreamPlan] = []
    for rank_units in _deal(range(len(units)), weights, world_size):
        for stream_units in _deal(rank_units, weights, workers):
            counts = stream_bucket_counts([units[i] for i in stream_units])
            plans.append(StreamPlan(units=tuple(stream_units), real_batches=batch_count(counts, batch_size),
                                    short_batches=sum(1 for n in counts.values() if n % batch_size)))
    rank_totals = [sum(p.real_batches for p in plans[r * workers:(r + 1) * workers]) for r in range(world_size)]
    target = -(-max(max(rank_totals), 1) // batches_per_step) * batches_per_step
    nonempty = [i for i, p in enumerate(plans) if p.real_batches]
    if not nonempty:
        raise ValueError("the shards hold no samples")
    for rank in range(world_size):
        ids = list(range(rank * workers, (rank + 1) * workers))
        padding = {i: 0 for i in ids}
        for _ in range(target - rank_totals[rank]):  # water-fill: the worker with the fewest batches gets one
            lightest = min(ids, key=lambda i: (plans[i].real_batches + padding[i], i))
            padding[lightest] += 1
        own = [i for i in ids if plans[i].real_batches]
        for i in ids:
            if padding[i]:
                source = i if plans[i].real_batches else (own[0] if own else nonempty[0])
                plans[i] = StreamPlan(plans[i].units, plans[i].real_batches, plans[i].short_batches,
                                      padding=padding[i], padding_source=source)
    return EpochLayout(world_size=world_size, workers=workers, batch_size=batch_size,
                       batches_per_step=batches_per_step, streams=tuple(plans), batches_per_rank=target)
