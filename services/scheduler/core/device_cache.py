"""The device prefix cache's index: KV left on the device by a finished turn, or by a
request preempted by recompute, kept while room allows so that the next turn (or the
request's restart) takes it back without a copy or a prefill.

Contract:

- An entry is one host key's KV: the chain hashes of the tokens its blocks hold, and how
  many tokens. A key has one entry; a newer one replaces it. The entry is its blocks'
  owner in the allocator; `device_memory.DeviceMemory` moves the blocks, this only
  indexes them.
- A taker gets the longest prefix whose hashes match its own chain, by ownership. Blocks
  are never shared, so nothing is reference counted: unlike vLLM's prefix cache, a prefix
  is reused within its conversation, not across conversations (the workloads here share
  none across conversations).
- Entries leave least recently cached first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

from common.kv.block_hash import matching_blocks, tokens_in_blocks


@dataclass(frozen=True, slots=True, eq=False)
class Cached:
    key: str
    origin: Hashable  # the request whose KV this is
    hashes: tuple[bytes, ...]  # one per block, as `TokenChain` makes them
    num_tokens: int


class DeviceCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._entries: OrderedDict[str, Cached] = OrderedDict()

    def add(self, entry: Cached) -> None:
        """Indexes `entry` as its key's newest; the key's older entry must be gone."""
        assert entry.key not in self._entries
        self._entries[entry.key] = entry

    def usable(self, key: str, chain: Sequence[bytes], num_tokens: int) -> int:
        """Tokens of the key's entry a taker with `chain` could have (at most
        `num_tokens - 1`: one is left to run; 0 below a whole block)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0
        matched = matching_blocks(entry.hashes, chain)
        usable = min(tokens_in_blocks(matched, entry.num_tokens, self.block_size), num_tokens - 1)
        return usable if usable >= self.block_size else 0

    def pop(self, key: str) -> Cached | None:
        return self._entries.pop(key, None)

    def pop_oldest(self) -> Cached | None:
        return self._entries.popitem(last=False)[1] if self._entries else None

    def entry(self, key: str, *, origin: Hashable) -> Cached | None:
        """The key's entry, if it still holds `origin`'s KV."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry.origin is origin else None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Cached]:
        return iter(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
