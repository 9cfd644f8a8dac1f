"""Swap plans: which byte ranges to copy between a device block table and host blocks.

With the block-major layout a run of consecutive blocks is one contiguous byte range across
all layers, so a run on both sides is one copy. The vLLM-style baseline copies block by
block (`merge=False`), which is what its per-block swap does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from common.kv.extent import Extent, flatten


class Direction(StrEnum):
    OUT = "out"  # device -> host
    IN = "in"  # host -> device


@dataclass(frozen=True, slots=True)
class Copy:
    src: Extent
    dst: Extent

    def __post_init__(self) -> None:
        if self.src.length != self.dst.length:
            raise ValueError(f"copy lengths differ: {self.src} -> {self.dst}")

    @property
    def num_blocks(self) -> int:
        return self.src.length


@dataclass(frozen=True, slots=True)
class SwapOrder:
    """One request's copies in one direction: what the scheduler plans, the executor runs
    as one copy-engine swap, and completion is reported for (by `swap_id`)."""

    swap_id: int
    request_id: str
    direction: Direction
    copies: tuple[Copy, ...]

    @property
    def num_blocks(self) -> int:
        return sum(c.num_blocks for c in self.copies)

    @property
    def device_blocks(self) -> set[int]:
        """The device blocks its copies read (a swap-out) or write (a swap-in)."""
        out = self.direction is Direction.OUT
        return set(flatten(c.src if out else c.dst for c in self.copies))


def plan_copies(src: Sequence[int], dst: Sequence[int], *, merge: bool = True) -> list[Copy]:
    """Pairs `src[i] -> dst[i]`; with `merge`, runs consecutive on both sides become one copy."""
    if len(src) != len(dst):
        raise ValueError(f"swap plan needs equal lengths, got {len(src)} and {len(dst)}")
    copies: list[Copy] = []
    run_src = run_dst = run_len = 0
    for s, d in zip(src, dst, strict=True):
        if merge and run_len and s == run_src + run_len and d == run_dst + run_len:
            run_len += 1
            continue
        if run_len:
            copies.append(Copy(Extent(run_src, run_len), Extent(run_dst, run_len)))
        run_src, run_dst, run_len = s, d, 1
    if run_len:
        copies.append(Copy(Extent(run_src, run_len), Extent(run_dst, run_len)))
    return copies
