"""The vLLM-style baseline: one block at a time from a FIFO free list.

Freed blocks go to the tail (vLLM v1's free block queue), so after some churn a request's
table is scattered and every block is its own copy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator

from common.kv.allocator import BlockAllocator
from common.kv.extent import Extent, runs


class SingleBlockAllocator(BlockAllocator):
    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self._free_queue: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free_queue)

    def _take(self, owner: Hashable, n: int, expected: int) -> list[int]:
        return [self._free_queue.popleft() for _ in range(n)]

    def _forget(self, owner: Hashable) -> None:
        """Single blocks keep no per-owner placement state."""

    def _give_back(self, blocks: list[int]) -> None:
        self._free_queue.extend(reversed(blocks))

    def _free_runs(self) -> Iterator[Extent]:
        return runs(sorted(self._free_queue))
