"""Which part of a list of work one process takes: every ``world_size``-th item from ``rank``.

The same rule shards the bucket sampler's batches and the cache-filling jobs, so every rank computes
its share from the same list without communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def check_rank(rank: int, world_size: int) -> None:
    """Raise ValueError unless ``0 <= rank < world_size``."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


def rank_share(items: Sequence[T], *, rank: int, world_size: int) -> list[T]:
    """Items ``rank``, ``rank + world_size``, ... of ``items``."""
    check_rank(rank, world_size)
    return list(items[rank::world_size])
