"""Host-side KV reuse: which token prefix of each conversation the host holds valid KV for.

Contract (two-phase put, as in vLLM's offloading manager):

Every call that takes `tokens` also takes their precomputed `chain` (`block_hashes(tokens)`,
e.g. from a `TokenChain`), which saves rehashing a long history on every call.

- `lookup(conv, tokens)` returns only committed blocks: the longest prefix of `tokens` whose
  chained block hashes match the conversation's committed chain.
- `reserve(conv, tokens)` returns that valid prefix (pinned) plus fresh host blocks for the
  rest. The caller copies KV into the fresh blocks, then `commit`s, which makes them
  visible and replaces whatever the conversation held past the prefix; or it `abort`s, which
  drops them. A reservation is never visible to `lookup`.
- Blocks being read (`pin`) or reserved are never evicted or reused; blocks dropped while
  pinned are freed at the last unpin.
- Under capacity pressure `reserve` evicts committed, unpinned blocks from the tails of the
  least recently used conversations, or raises `HostCapacityExhausted` changing nothing.

Chains are kept by an `IndexStorage` (in memory here; Redis in the KV store), so the logic
is shared and the storage can outlive this process. Pins and reservations are local.

Reservation and pin ids are random, nonzero and below 2**ID_BITS: unguessable by another
caller of a store, and small enough that the scheduler's HostRouter, which puts a store's
slot above them (`slot << ID_BITS | local`), stays within uint64 for 2**(64 - ID_BITS) stores.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from common.kv.block_hash import block_hashes, matching_blocks, tokens_in_blocks
from common.kv.extent import Extent, flatten, runs
from common.kv.free_extents import FreeExtents

Chain = Sequence[bytes] | None
ID_BITS = 48


class FingerprintMismatch(ValueError):
    """The caller's model differs from the one this index holds KV for."""


class HostCapacityExhausted(Exception):
    """A reservation needs more host blocks than are free or evictable."""


class UnknownReservation(KeyError):
    """Not a pending reservation: never made, or already committed or aborted."""


class UnknownPin(KeyError):
    """Not a held pin: never made, or already unpinned."""


class StaleReservation(Exception):
    """The conversation's prefix changed under a reservation; it was aborted."""


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """A conversation's committed chain: `blocks[i]` holds the KV hashed as `hashes[i]`."""

    hashes: tuple[bytes, ...]
    blocks: tuple[int, ...]
    num_tokens: int


class IndexStorage(Protocol):
    def get(self, conv: str) -> ChainRecord | None: ...

    def put(self, conv: str, record: ChainRecord) -> None:
        """Replaces the record atomically and marks `conv` most recently used."""

    def replace(self, conv: str, record: ChainRecord) -> None:
        """Replaces the record atomically, keeping `conv`'s place in the LRU order."""

    def delete(self, conv: str) -> None: ...

    def touch(self, conv: str) -> None: ...

    def lru(self) -> list[str]:
        """Conversations, least recently used first."""

    def items(self) -> Iterable[tuple[str, ChainRecord]]: ...


class MemoryIndexStorage:
    def __init__(self) -> None:
        self._records: OrderedDict[str, ChainRecord] = OrderedDict()

    def get(self, conv: str) -> ChainRecord | None:
        return self._records.get(conv)

    def put(self, conv: str, record: ChainRecord) -> None:
        self._records[conv] = record
        self._records.move_to_end(conv)

    def replace(self, conv: str, record: ChainRecord) -> None:
        self._records[conv] = record

    def delete(self, conv: str) -> None:
        self._records.pop(conv, None)

    def touch(self, conv: str) -> None:
        if conv in self._records:
            self._records.move_to_end(conv)

    def lru(self) -> list[str]:
        return list(self._records)

    def items(self) -> Iterable[tuple[str, ChainRecord]]:
        return list(self._records.items())


@dataclass(frozen=True, slots=True)
class Hit:
    num_tokens: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: int
    conversation: str
    num_tokens: int
    valid_tokens: int  # leading tokens the host already holds: not to be copied
    valid_blocks: tuple[int, ...]
    new_blocks: tuple[int, ...]  # where blocks len(valid_blocks): go

    @property
    def new_extents(self) -> list[Extent]:
        return list(runs(self.new_blocks))


@dataclass(frozen=True, slots=True)
class PinHandle:
    pin_id: int
    blocks: tuple[int, ...]


@dataclass(slots=True)
class IndexStats:
    capacity: int = 0
    used: int = 0
    pinned: int = 0
    evicted_blocks: int = 0


@dataclass(frozen=True, slots=True)
class _Pending:
    reservation: Reservation
    hashes: tuple[bytes, ...]


class ReuseIndex:
    def __init__(
        self,
        *,
        fingerprint: str,
        block_size: int,
        num_blocks: int,
        storage: IndexStorage | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.storage: IndexStorage = storage if storage is not None else MemoryIndexStorage()
        self._free = FreeExtents()
        self._free.add(Extent(0, num_blocks))
        for _, record in self.storage.items():  # a restarted index keeps what storage holds
            for extent in runs(sorted(record.blocks)):
                self._free.take(extent)
        self._pins: dict[int, int] = {}
        self._pin_handles: dict[int, tuple[int, ...]] = {}
        self._dead: set[int] = set()  # dropped while pinned
        self._pending: dict[int, _Pending] = {}
        self._stats = IndexStats(capacity=num_blocks)

    def _new_id(self) -> int:
        while True:
            candidate = secrets.randbits(ID_BITS)
            if candidate and candidate not in self._pending and candidate not in self._pin_handles:
                return candidate

    def check_fingerprint(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise FingerprintMismatch(
                f"index holds KV for model {self.fingerprint!r}, caller runs {fingerprint!r}"
            )

    def stats(self) -> IndexStats:
        s = self._stats
        s.used = self.num_blocks - self._free.total
        s.pinned = len(self._pins)
        return IndexStats(**{f: getattr(s, f) for f in IndexStats.__slots__})

    def lookup(self, conv: str, tokens: Sequence[int], chain: Chain = None) -> Hit:
        return self._match(conv, self._chain(tokens, chain), len(tokens))

    def reserve(self, conv: str, tokens: Sequence[int], chain: Chain = None) -> Reservation:
        return self.reserve_chain(conv, self._chain(tokens, chain), len(tokens))

    def reserve_chain(self, conv: str, chain: Sequence[bytes], num_tokens: int) -> Reservation:
        """`reserve` by the tokens' chain alone (see `common.kv.host_ops`)."""
        if not num_tokens:
            raise ValueError("cannot reserve an empty token list")
        hit = self._match(conv, chain, num_tokens)
        num_new = len(chain) - len(hit.blocks)
        self._make_room(num_new, keep=conv)
        self._pin_blocks(hit.blocks)
        reservation = Reservation(
            reservation_id=self._new_id(),
            conversation=conv,
            num_tokens=num_tokens,
            valid_tokens=hit.num_tokens,
            valid_blocks=hit.blocks,
            new_blocks=tuple(flatten(self._free.allocate(num_new))),
        )
        self._pending[reservation.reservation_id] = _Pending(reservation, tuple(chain))
        return reservation

    def commit(self, reservation_id: int) -> None:
        pending = self._pop_pending(reservation_id)
        res = pending.reservation
        base = len(res.valid_blocks)
        record = self.storage.get(res.conversation)
        held = record.blocks[:base] if record else ()
        if held != res.valid_blocks or (record and record.hashes[:base] != pending.hashes[:base]):
            self._drop_reservation(res)
            raise StaleReservation(f"conversation {res.conversation!r} changed under reservation")
        if record:
            self._drop_blocks(record.blocks[base:])
        self.storage.put(
            res.conversation,
            ChainRecord(pending.hashes, res.valid_blocks + res.new_blocks, res.num_tokens),
        )
        self._unpin_blocks(res.valid_blocks)

    def abort(self, reservation_id: int) -> None:
        self._drop_reservation(self._pop_pending(reservation_id).reservation)

    def pin(
        self, conv: str, tokens: Sequence[int], chain: Chain = None
    ) -> tuple[Hit, PinHandle]:
        """The valid prefix of `tokens`, pinned until `unpin`: what a swap-in may read."""
        return self.pin_chain(conv, self._chain(tokens, chain), len(tokens))

    def pin_chain(
        self, conv: str, chain: Sequence[bytes], num_tokens: int
    ) -> tuple[Hit, PinHandle]:
        """`pin` by the tokens' chain alone (see `common.kv.host_ops`)."""
        hit = self._match(conv, chain, num_tokens)
        handle = PinHandle(self._new_id(), hit.blocks)
        self._pin_blocks(hit.blocks)
        self._pin_handles[handle.pin_id] = hit.blocks
        return hit, handle

    def unpin(self, pin_id: int) -> None:
        blocks = self._pin_handles.pop(pin_id, None)
        if blocks is None:
            raise UnknownPin(f"unknown pin {pin_id}")
        self._unpin_blocks(blocks)

    def release(self, conv: str) -> None:
        """Forgets the conversation; its blocks are freed (at the last unpin if pinned)."""
        record = self.storage.get(conv)
        if record is not None:
            self.storage.delete(conv)
            self._drop_blocks(record.blocks)

    def _chain(self, tokens: Sequence[int], chain: Chain) -> Sequence[bytes]:
        if chain is None:
            return block_hashes(tokens, self.block_size, self.fingerprint)
        return chain

    def _match(self, conv: str, chain: Sequence[bytes], num_tokens: int) -> Hit:
        if len(chain) != -(-num_tokens // self.block_size):
            raise ValueError(f"chain has {len(chain)} hashes for {num_tokens} tokens")
        record = self.storage.get(conv)
        if record is None:
            return Hit(0, ())
        self.storage.touch(conv)
        n = matching_blocks(record.hashes, chain)
        return Hit(tokens_in_blocks(n, num_tokens, self.block_size), record.blocks[:n])

    def _make_room(self, n: int, *, keep: str) -> None:
        short = n - self._free.total
        if short <= 0:
            return
        victims = [c for c in self.storage.lru() if c != keep]
        records = {c: self.storage.get(c) for c in victims}
        evictable = sum(self._evictable_tail(r) for r in records.values() if r)
        if evictable < short:
            raise HostCapacityExhausted(
                f"need {n} host blocks: {self._free.total} free, {evictable} evictable "
                f"(the rest are pinned or in flight)"
            )
        for conv in victims:
            record = records[conv]
            if short <= 0:
                break
            if record is None:
                continue
            k = min(short, self._evictable_tail(record))
            if k == 0:
                continue
            kept = len(record.blocks) - k
            self._drop_blocks(record.blocks[kept:])
            self._stats.evicted_blocks += k
            short -= k
            if kept == 0:
                self.storage.delete(conv)
            else:
                num_tokens = min(record.num_tokens, kept * self.block_size)
                trimmed = ChainRecord(record.hashes[:kept], record.blocks[:kept], num_tokens)
                self.storage.replace(conv, trimmed)

    def _evictable_tail(self, record: ChainRecord) -> int:
        n = 0
        for block in reversed(record.blocks):
            if block in self._pins:
                break
            n += 1
        return n

    def _pop_pending(self, reservation_id: int) -> _Pending:
        pending = self._pending.pop(reservation_id, None)
        if pending is None:
            raise UnknownReservation(f"no pending reservation {reservation_id}")
        return pending

    def _drop_reservation(self, res: Reservation) -> None:
        self._drop_blocks(res.new_blocks)
        self._unpin_blocks(res.valid_blocks)

    def _pin_blocks(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            self._pins[b] = self._pins.get(b, 0) + 1

    def _unpin_blocks(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            count = self._pins[b] - 1
            if count:
                self._pins[b] = count
                continue
            del self._pins[b]
            if b in self._dead:
                self._dead.discard(b)
                self._free.add(Extent(b, 1))

    def _drop_blocks(self, blocks: Sequence[int]) -> None:
        unpinned = [b for b in blocks if b not in self._pins]
        self._dead.update(b for b in blocks if b in self._pins)
        for extent in runs(sorted(unpinned)):
            self._free.add(extent)
