"""Device KV memory: the allocator, the swap manager that drains blocks under copies, and
the device prefix cache, as one object, so that no caller threads a callback through.

Contract:

- Every device block is free, owned (by a request or a cache entry), or draining under a
  copy (`swaps.SwapManager`'s contract). `release` frees an owner's blocks; those a copy
  still reads drain until it ends.
- `allocate` evicts cached entries, oldest first, as far as it needs to; nothing else
  evicts on its own.
- A cached entry is room: `room` counts it, since `allocate` can free it.
- `reset` (the device was lost) replaces the allocator and the swap manager and empties
  the cache; the swaps that were in flight are handed back, unreported.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

from common.kv.allocator import OutOfBlocks
from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.device_cache import Cached, DeviceCache
from services.scheduler.core.swaps import Swap, SwapManager


class DeviceMemory:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.cache = DeviceCache(config.block_size)
        self._fresh()

    def reset(self) -> list[Swap]:
        dropped = self.swaps.reset()
        self._fresh()
        self.cache.clear()
        return dropped

    def _fresh(self) -> None:
        on = self.config.on
        self.allocator = self.config.make_allocator()
        self.swaps = SwapManager(
            self.allocator, merge_copies=on.block_groups, async_swaps=on.async_swaps
        )

    # ---- ownership --------------------------------------------------------------------

    def table(self, owner: Hashable) -> tuple[int, ...]:
        return self.allocator.table(owner)

    def blocks_of(self, owner: Hashable) -> int:
        return self.allocator.num_blocks_of(owner)

    def release(self, owner: Hashable) -> None:
        self.allocator.release(owner, draining=self.swaps.claim(self.allocator.table(owner)))

    def allocate(self, owner: Hashable, n: int, *, expected: int) -> list[int]:
        """`n` more blocks for `owner`, evicting cached entries as needed; raises
        `OutOfBlocks` (nothing changed but the eviction) when they do not fit."""
        if n > self.allocator.num_free:
            self.evict(n - self.allocator.num_free)
        return self.allocator.allocate(owner, n, expected=expected)

    def grow(self, owner: Hashable, blocks: int, longest: int) -> bool:
        """`owner` holds at least `blocks` blocks (of `longest` at most, which sizes its
        block group); False, nothing changed but eviction, when they do not fit."""
        have = self.allocator.num_blocks_of(owner)
        if blocks <= have:
            return True
        try:
            self.allocate(owner, blocks - have, expected=max(0, longest - blocks))
        except OutOfBlocks:
            return False
        return True

    def room(self, residents: Iterable[Hashable]) -> int:
        """Blocks the given owners could have between them: theirs, the free, the cached,
        and the draining (they return as soon as their copies end)."""
        return (
            self.allocator.num_free
            + self.allocator.num_draining
            + self.cached_blocks
            + sum(self.allocator.num_blocks_of(r) for r in residents)
        )

    # ---- the prefix cache -------------------------------------------------------------

    @property
    def cached_blocks(self) -> int:
        return sum(self.allocator.num_blocks_of(e) for e in self.cache)

    def cache_put(
        self, owner: Hashable, key: str, hashes: Sequence[bytes], num_tokens: int
    ) -> None:
        """Caches `owner`'s blocks for its first `num_tokens` tokens (frees the rest),
        replacing the key's older entry."""
        self.cache_drop(key)
        blocks = self.config.blocks_for(num_tokens)
        entry = Cached(key, owner, tuple(hashes[:blocks]), num_tokens)
        self._hand_over(owner, entry, blocks)
        if self.allocator.num_blocks_of(entry):
            self.cache.add(entry)

    def cache_take(self, key: str, chain: Sequence[bytes], num_tokens: int, owner: Hashable) -> int:
        """Hands `owner` the key's matching prefix; the tokens it got (0: nothing, entry
        kept)."""
        usable = self.cache.usable(key, chain, num_tokens)
        if usable:
            entry = self.cache.pop(key)
            assert entry is not None
            self._hand_over(entry, owner, self.config.blocks_for(usable))
        return usable

    def cache_drop(self, key: str) -> None:
        entry = self.cache.pop(key)
        if entry is not None:
            self.release(entry)

    def evict(self, n: int) -> int:
        """Frees whole cached entries, oldest first, until `n` blocks are freed; the number
        freed (those a copy still reads drain)."""
        freed = 0
        while freed < n and (entry := self.cache.pop_oldest()) is not None:
            freed += self.allocator.num_blocks_of(entry)
            self.release(entry)
        return freed

    def _hand_over(self, src: Hashable, dst: Hashable, keep: int) -> None:
        rest = self.swaps.claim(self.allocator.table(src)[keep:])
        self.allocator.transfer(src, dst, keep, draining=rest)
