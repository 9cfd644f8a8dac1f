"""A contiguous run of blocks: the unit that block groups, free space and copies are made of."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)
class Extent:
    start: int
    length: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.length <= 0:
            raise ValueError(f"bad extent start={self.start} length={self.length}")

    @property
    def end(self) -> int:
        return self.start + self.length

    def blocks(self) -> range:
        return range(self.start, self.end)


def runs(blocks: Iterable[int]) -> Iterator[Extent]:
    """Maximal runs of consecutive ids, in the order given (a block table, not a set)."""
    start = prev = None
    for block in blocks:
        if prev is not None and block == prev + 1:
            prev = block
            continue
        if start is not None:
            yield Extent(start, prev - start + 1)
        start = prev = block
    if start is not None:
        yield Extent(start, prev - start + 1)


def flatten(extents: Iterable[Extent]) -> list[int]:
    return [block for extent in extents for block in extent.blocks()]
