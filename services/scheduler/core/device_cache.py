"""The device prefix cache: KV left on the device by a finished turn, or by a request
preempted by recompute, kept while room allows so that the next turn (or the request's
restart) takes it back without a copy or a prefill.

Contract:

- An entry is one host key's KV: its device blocks (owned by the entry in the allocator),
  the chain hashes of the tokens they hold, and how many tokens. A key has one entry; a
  newer one replaces it.
- `take` hands the longest prefix whose hashes match the taker's chain to the taker, by
  ownership, and frees the rest. Blocks are never shared, so nothing is reference counted:
  unlike vLLM's prefix cache, a prefix is reused within its conversation, not across
  conversations (the workloads here share none across conversations).
- `evict` frees whole entries, least recently cached first. Blocks that an in-flight copy
  still reads leave as draining (the caller's `claim`), so eviction never frees a block
  under a copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass

from common.kv.allocator import BlockAllocator
from common.kv.block_hash import matching_blocks, tokens_in_blocks


@dataclass(frozen=True, slots=True, eq=False)
class Cached:
    key: str
    origin: Hashable  # the request whose KV this is
    hashes: tuple[bytes, ...]  # one per block, as `TokenChain` makes them
    num_tokens: int


class DeviceCache:
    def __init__(self, allocator: Callable[[], BlockAllocator], block_size: int) -> None:
        self._allocator = allocator
        self.block_size = block_size
        self._entries: OrderedDict[str, Cached] = OrderedDict()

    @property
    def num_blocks(self) -> int:
        """Device blocks the cache holds: room, since `evict` can free them."""
        alloc = self._allocator()
        return sum(alloc.num_blocks_of(e) for e in self._entries.values())

    def put(
        self,
        owner: Hashable,
        key: str,
        hashes: Sequence[bytes],
        num_tokens: int,
        claim: Callable[[Collection[int]], Collection[int]],
    ) -> None:
        """Takes over `owner`'s blocks for the first `num_tokens` tokens (frees the rest),
        replacing the key's older entry."""
        self.drop(key, claim)
        entry = Cached(key, owner, tuple(hashes[: self._blocks(num_tokens)]), num_tokens)
        self._hand_over(owner, entry, self._blocks(num_tokens), claim)
        if self._allocator().num_blocks_of(entry):
            self._entries[key] = entry

    def peek(self, key: str, chain: Sequence[bytes], num_tokens: int) -> int:
        """Tokens `take` would hand over (at most `num_tokens - 1`: one is left to run)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0
        usable = min(self._matched(entry, chain), num_tokens - 1)
        return usable if usable >= self.block_size else 0

    def take(
        self,
        key: str,
        chain: Sequence[bytes],
        num_tokens: int,
        owner: Hashable,
        claim: Callable[[Collection[int]], Collection[int]],
    ) -> int:
        """Hands `owner` the matching prefix; the tokens it got (0: nothing, entry kept)."""
        usable = self.peek(key, chain, num_tokens)
        if usable:
            self._hand_over(self._entries.pop(key), owner, self._blocks(usable), claim)
        return usable

    def evict(self, n: int, claim: Callable[[Collection[int]], Collection[int]]) -> int:
        """Frees whole entries, oldest first, until `n` blocks are freed; the number freed.
        `claim(blocks)` names those still read by a copy: they are released draining."""
        freed = 0
        while freed < n and self._entries:
            freed += self._free(self._entries.popitem(last=False)[1], claim)
        return freed

    def drop(self, key: str, claim: Callable[[Collection[int]], Collection[int]]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free(entry, claim)

    def entry(self, key: str, *, origin: Hashable) -> Cached | None:
        """The key's entry, if it still holds `origin`'s KV: the allocator owner of its
        blocks, for a copy that reads them."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry.origin is origin else None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def clear(self) -> None:
        """The device was lost: every entry goes (its allocator goes with it)."""
        self._entries.clear()

    def _hand_over(
        self,
        src: Hashable,
        dst: Hashable,
        keep: int,
        claim: Callable[[Collection[int]], Collection[int]],
    ) -> None:
        alloc = self._allocator()
        alloc.transfer(src, dst, keep, draining=claim(alloc.table(src)[keep:]))

    def _free(self, entry: Cached, claim: Callable[[Collection[int]], Collection[int]]) -> int:
        alloc = self._allocator()
        table = alloc.table(entry)
        alloc.release(entry, draining=claim(table))
        return len(table)

    def _matched(self, entry: Cached, chain: Sequence[bytes]) -> int:
        n = matching_blocks(entry.hashes, chain)
        return tokens_in_blocks(n, entry.num_tokens, self.block_size)

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
