"""FastSwitch's dynamic block-group allocator.

Blocks stay small (16 tokens), but each owner's table is made of a few long contiguous
runs, so a swap is a few large copies. Sizing policy (`GroupSizing`):

1. An owner first grows into the slack of its own last group, then in place into the free
   extent that starts right after it.
2. Otherwise it starts a new group of `clamp(n + expected, min_blocks, cap)` blocks (at
   least `n`) in the best-fitting free extent: the owner uses `n` of them and keeps the
   rest as *slack*, so that its next blocks land right after. The cap is `max_blocks`, or
   `1/free_share` of the unreserved free blocks if that is smaller, so slack shrinks as
   memory fills instead of being carved up and reclaimed in small pieces. `min_blocks`
   is 2: at saturation (about 97% of blocks used) every 4-block floor of slack becomes a
   hole that later admissions split across; 2 keeps admitted tables in ~4 runs, not ~8.
3. Slack is reserved, not used: it counts as free, and when free extents run short the
   allocator reclaims other owners' slack (largest first) before failing.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

from common.kv.allocator import BlockAllocator
from common.kv.extent import Extent, runs
from common.kv.free_extents import FreeExtents


@dataclass(frozen=True, slots=True)
class GroupSizing:
    min_blocks: int = 2
    max_blocks: int = 256
    free_share: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min_blocks <= self.max_blocks or self.free_share < 1:
            raise ValueError(f"need 1 <= min_blocks <= max_blocks and free_share >= 1: {self}")

    def group_len(self, n: int, expected: int, free: int) -> int:
        """Blocks for a new group: `n` now, `expected` more later, `free` unreserved blocks."""
        cap = min(self.max_blocks, max(self.min_blocks, free // self.free_share))
        return max(n, min(max(n + expected, self.min_blocks), cap))


class BlockGroupAllocator(BlockAllocator):
    def __init__(self, num_blocks: int, sizing: GroupSizing | None = None) -> None:
        super().__init__(num_blocks)
        self.sizing = sizing or GroupSizing()
        self._free = FreeExtents()
        self._free.add(Extent(0, num_blocks))
        self._slack: dict[Hashable, Extent] = {}  # reserved run right after the owner's table
        self._slack_total = 0

    @property
    def num_free(self) -> int:
        return self._free.total + self._slack_total

    @property
    def num_slack(self) -> int:
        return self._slack_total

    def _take(self, owner: Hashable, n: int, expected: int) -> list[int]:
        taken = self._from_slack(owner, n)
        table = self._tables.get(owner)
        if len(taken) < n and table:
            taken += self._grow_in_place(table[-1] if not taken else taken[-1], n - len(taken))
        if len(taken) < n:
            self._drop_slack(owner)
        while len(taken) < n:
            taken += self._new_group(owner, n - len(taken), expected)
        return taken

    def _from_slack(self, owner: Hashable, n: int) -> list[int]:
        slack = self._slack.pop(owner, None)
        if slack is None:
            return []
        k = min(n, slack.length)
        self._slack_total -= k
        if k < slack.length:
            self._slack[owner] = Extent(slack.start + k, slack.length - k)
        return list(range(slack.start, slack.start + k))

    def _grow_in_place(self, last: int, n: int) -> list[int]:
        after = self._free.starting_at(last + 1)
        if after is None:
            return []
        k = min(n, after.length)
        self._free.take(Extent(after.start, k))
        return list(range(after.start, after.start + k))

    def _new_group(self, owner: Hashable, n: int, expected: int) -> list[int]:
        want = self.sizing.group_len(n, expected, self._free.total)
        if self._free.total < n:
            self._reclaim_slack(n - self._free.total)
        extent = self._free.best_fit(want) or self._free.largest()
        assert extent is not None, "num_free promised room"
        group = Extent(extent.start, min(want, extent.length))
        self._free.take(group)
        k = min(n, group.length)
        if k < group.length:
            self._slack[owner] = Extent(group.start + k, group.length - k)
            self._slack_total += group.length - k
        return list(range(group.start, group.start + k))

    def _reclaim_slack(self, n: int) -> None:
        for owner, _ in sorted(self._slack.items(), key=lambda kv: -kv[1].length):
            if n <= 0:
                break
            n -= self._drop_slack(owner)

    def _drop_slack(self, owner: Hashable) -> int:
        slack = self._slack.pop(owner, None)
        if slack is None:
            return 0
        self._slack_total -= slack.length
        self._free.add(slack)
        return slack.length

    def _forget(self, owner: Hashable) -> None:
        self._drop_slack(owner)

    def _give_back(self, blocks: list[int]) -> None:
        for extent in runs(sorted(blocks)):
            self._free.add(extent)

    def _free_runs(self) -> Iterator[Extent]:
        free = sorted([*self._free, *self._slack.values()])
        return runs(b for e in free for b in e.blocks())
