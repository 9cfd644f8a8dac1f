"""The block allocator interface: per-owner block tables, draining blocks, and metrics.

An owner is whatever holds KV memory (a request on the device, a reservation on the host).
Blocks released by a swap-out whose copy still reads them are *draining*: they belong to
nobody, and they are not handed out again until `release_draining`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass

from common.kv.extent import Extent, runs


class OutOfBlocks(Exception):
    """Raised by `allocate` when too few blocks are free; nothing was allocated."""


@dataclass(frozen=True, slots=True)
class AllocatorMetrics:
    total: int
    free: int
    used: int
    draining: int
    num_extents: int  # maximal free extents: 1 means free space is one contiguous run
    mean_group_len: float  # mean length of the contiguous runs in the owners' block tables
    fragmentation: float  # 1 - largest free extent / free blocks (0 when free space is one run)


class BlockAllocator(ABC):
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._tables: dict[Hashable, list[int]] = {}
        self._draining: set[int] = set()
        self._num_used = 0

    @property
    @abstractmethod
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out now."""

    @abstractmethod
    def _take(self, owner: Hashable, n: int, expected: int) -> list[int]:
        """Picks `n` free blocks for `owner`; only called when `n <= num_free`."""

    @abstractmethod
    def _give_back(self, blocks: list[int]) -> None:
        """Returns blocks to the free pool."""

    @abstractmethod
    def _free_runs(self) -> Iterator[Extent]:
        """The maximal free extents, for metrics."""

    @abstractmethod
    def _forget(self, owner: Hashable) -> None:
        """Drops any per-owner placement state when `owner` releases its blocks."""

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_draining(self) -> int:
        return len(self._draining)

    def table(self, owner: Hashable) -> tuple[int, ...]:
        return tuple(self._tables.get(owner, ()))

    def num_blocks_of(self, owner: Hashable) -> int:
        return len(self._tables.get(owner, ()))

    def allocate(self, owner: Hashable, n: int, *, expected: int = 0) -> list[int]:
        """Appends `n` blocks to `owner`'s table. `expected` hints at how many more will follow."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocks(f"{n} blocks requested, {self.num_free} free")
        if n == 0:
            return []
        new = self._take(owner, n, max(expected, 0))
        self._tables.setdefault(owner, []).extend(new)
        self._num_used += n
        return new

    def release(self, owner: Hashable, *, draining: Collection[int] = ()) -> list[int]:
        """Takes all of `owner`'s blocks away. Those in `draining` wait for `release_draining`."""
        table = self._tables.get(owner, [])
        drain = set(draining)
        if not drain.issubset(table):
            raise ValueError(f"draining blocks {sorted(drain - set(table))} not owned by {owner!r}")
        self._tables.pop(owner, None)
        self._forget(owner)
        self._num_used -= len(table)
        self._draining |= drain
        self._give_back([b for b in table if b not in drain])
        return table

    def transfer(
        self, src: Hashable, dst: Hashable, keep: int, *, draining: Collection[int] = ()
    ) -> None:
        """Hands the first `keep` blocks of `src`'s table to `dst`, which owns none, and
        frees the rest (those in `draining` wait for `release_draining`): KV that changes
        owner without a copy (a device prefix cache)."""
        if self._tables.get(dst):
            raise ValueError(f"{dst!r} already owns blocks")
        table = self._tables.get(src, [])
        kept, rest = table[: max(keep, 0)], table[max(keep, 0) :]
        drain = set(draining)
        if not drain.issubset(rest):
            raise ValueError(f"draining blocks {sorted(drain - set(rest))} are not freed")
        self._tables.pop(src, None)
        self._forget(src)
        if kept:
            self._tables[dst] = kept
        self._num_used -= len(rest)
        self._draining |= drain
        self._give_back([b for b in rest if b not in drain])

    def release_draining(self, blocks: Iterable[int]) -> None:
        """The copy reading `blocks` finished: they may be handed out again."""
        done = set(blocks)
        if not done.issubset(self._draining):
            raise ValueError(f"blocks {sorted(done - self._draining)} are not draining")
        self._draining -= done
        self._give_back(sorted(done))

    def metrics(self) -> AllocatorMetrics:
        free_runs = list(self._free_runs())
        free = sum(r.length for r in free_runs)
        groups = [g.length for t in self._tables.values() for g in runs(t)]
        return AllocatorMetrics(
            total=self.num_blocks,
            free=self.num_free,
            used=self._num_used,
            draining=len(self._draining),
            num_extents=len(free_runs),
            mean_group_len=sum(groups) / len(groups) if groups else 0.0,
            fragmentation=1 - max(r.length for r in free_runs) / free if free else 0.0,
        )
