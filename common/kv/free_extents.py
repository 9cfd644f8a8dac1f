"""Free space as maximal extents, indexed by address (for merging) and by size (for fitting)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from common.kv.extent import Extent


class FreeExtents:
    def __init__(self) -> None:
        self._starts: list[int] = []  # sorted extent starts
        self._length_at: dict[int, int] = {}
        self._by_size: list[tuple[int, int]] = []  # sorted (length, start)
        self.total = 0

    def __iter__(self) -> Iterator[Extent]:
        return (Extent(s, self._length_at[s]) for s in self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, extent: Extent) -> Extent:
        """Returns the free extent `extent` ended up in, after merging with both neighbours."""
        start, end = extent.start, extent.end
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] < end:
            raise ValueError(f"{extent} overlaps free extent at {self._starts[i]}")
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._length_at[prev] > start:
                raise ValueError(f"{extent} overlaps free extent at {prev}")
            if prev + self._length_at[prev] == start:
                start = prev
                self._remove(prev)
        if end in self._length_at:
            nxt_len = self._length_at[end]
            self._remove(end)
            end += nxt_len
        self._insert(start, end - start)
        return Extent(start, end - start)

    def take(self, extent: Extent) -> None:
        """Marks `extent` used; it must lie inside one free extent."""
        container = self.containing(extent.start)
        if container is None or container.end < extent.end:
            raise ValueError(f"{extent} is not free")
        self._remove(container.start)
        if container.start < extent.start:
            self._insert(container.start, extent.start - container.start)
        if extent.end < container.end:
            self._insert(extent.end, container.end - extent.end)

    def containing(self, block: int) -> Extent | None:
        i = bisect.bisect_right(self._starts, block) - 1
        if i < 0:
            return None
        start = self._starts[i]
        length = self._length_at[start]
        return Extent(start, length) if block < start + length else None

    def starting_at(self, block: int) -> Extent | None:
        length = self._length_at.get(block)
        return None if length is None else Extent(block, length)

    def best_fit(self, n: int) -> Extent | None:
        """The smallest extent of at least `n` blocks (lowest address on ties), else None."""
        i = bisect.bisect_left(self._by_size, (n, -1))
        if i == len(self._by_size):
            return None
        length, start = self._by_size[i]
        return Extent(start, length)

    def largest(self) -> Extent | None:
        if not self._by_size:
            return None
        length, start = self._by_size[-1]
        return Extent(start, length)

    def _insert(self, start: int, length: int) -> None:
        bisect.insort(self._starts, start)
        bisect.insort(self._by_size, (length, start))
        self._length_at[start] = length
        self.total += length

    def _remove(self, start: int) -> None:
        length = self._length_at.pop(start)
        del self._starts[bisect.bisect_left(self._starts, start)]
        del self._by_size[bisect.bisect_left(self._by_size, (length, start))]
        self.total -= length

    def allocate(self, n: int) -> list[Extent]:
        """Takes `n` blocks in as few extents as possible: best fit, else largest first."""
        if n > self.total:
            raise ValueError(f"{n} blocks requested, {self.total} free")
        taken: list[Extent] = []
        while n > 0:
            extent = self.best_fit(n) or self.largest()
            assert extent is not None
            piece = Extent(extent.start, min(n, extent.length))
            self.take(piece)
            taken.append(piece)
            n -= piece.length
        return taken
