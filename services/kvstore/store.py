"""The KV store's state machine: reuse index, host arena, leases and stats.

It opens no socket itself; its only I/O is through its index backend. With the in-memory
backend a call touches nothing outside the process; with Redis (`RedisBackend`) a call
sends its index writes in one round trip before it returns, or, when the service defers
them to a `GroupCommit`, leaves them for the service to land before it answers.

Contract (the service maps each error to a gRPC status):

- Every call is validated before anything changes, so a rejected call leaves the index and
  the arena as they were; `execute` validates a whole batch before its first op. Bad input
  raises `InvalidRequest`, `FingerprintMismatch`, `UnknownReservation` (also on a second
  commit), `UnknownPin` or `ValueError`.
- The `*_chain` calls take the chain the caller hashed (`common.kv.host_ops`); the token
  calls hash the tokens and delegate to them.
- `reserve` raises `HostCapacityExhausted` when even eviction cannot make room; `commit`
  raises `StaleReservation` when the conversation's prefix changed under the reservation.
- Reservations and pins are leases: a client that dies leaves them to `expire_leases`,
  which aborts or unpins them so that their blocks return. Writing renews a reservation.
- Bytes reach the arena only through `begin_write`, and only into a pending reservation's
  new blocks, which no reader can see until `commit`.
- With a Redis index a call raises `IndexUnavailable` when the shared index is behind; the
  local state stays consistent and Redis is rewritten when it answers again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from common.kv import host_ops
from common.kv.block_hash import HASH_BYTES, block_hashes, matching_blocks, tokens_in_blocks
from common.kv.extent import Extent, flatten, runs
from common.kv.host_ops import Abort, Commit, HostOp, HostReply, Pin, Pinned, Release, Reserve
from common.kv.reuse_index import (
    Hit,
    PinHandle,
    Reservation,
    ReuseIndex,
    UnknownPin,
    UnknownReservation,
)
from common.shm.arena import HostArena
from services.kvstore.backend import IndexBackend
from services.kvstore.bulk import CHUNK_BYTES, checksum, chunk_spans
from services.kvstore.errors import IndexUnavailable, InvalidRequest


@dataclass(frozen=True, slots=True)
class Description:
    instance_id: str
    arena_name: str
    num_blocks: int
    block_bytes: int
    block_size: int
    model_fingerprint: str
    index_backend: str


@dataclass(frozen=True, slots=True)
class LookupResult:
    valid_tokens: int
    extents: list[Extent]
    instance_id: str  # whose arena the extents are in


@dataclass(frozen=True, slots=True)
class PinResult:
    pin_id: int
    valid_tokens: int
    extents: list[Extent]


@dataclass(frozen=True, slots=True)
class BatchResult:
    replies: list[HostReply]  # as `host_ops.apply` answers
    holders: dict[int, str]  # a Pin's op id -> the instance holding most of its prefix


@dataclass(slots=True)
class StoreStats:
    """`hit_tokens`/`miss_tokens` count Lookup and Reserve tokens found valid or not;
    `bytes_saved_by_reuse` counts the valid blocks a Reserve spared from being copied."""

    capacity_blocks: int = 0
    used_blocks: int = 0
    pinned_blocks: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    evicted_blocks: int = 0
    bytes_saved_by_reuse: int = 0
    pending_reservations: int = 0


class KVStore:
    def __init__(
        self,
        *,
        instance_id: str,
        fingerprint: str,
        block_size: int,
        arena: HostArena,
        backend: IndexBackend,
        lease_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instance_id = instance_id
        self.arena = arena
        self.backend = backend
        self.lease_seconds = lease_seconds
        self.index = ReuseIndex(
            fingerprint=fingerprint,
            block_size=block_size,
            num_blocks=arena.num_blocks,
            storage=backend.storage,
        )
        self._clock = clock
        self._bytes = np.frombuffer(arena.view(), dtype=np.uint8)  # the arena's bytes, shared
        self._reservations: dict[int, Reservation] = {}
        self._reservation_deadlines: dict[int, float] = {}
        self._pin_deadlines: dict[int, float] = {}
        self._hit_tokens = 0
        self._miss_tokens = 0
        self._bytes_saved = 0

    @property
    def block_size(self) -> int:
        return self.index.block_size

    @property
    def fingerprint(self) -> str:
        return self.index.fingerprint

    def describe(self) -> Description:
        return Description(
            instance_id=self.instance_id,
            arena_name=self.arena.name,
            num_blocks=self.arena.num_blocks,
            block_bytes=self.arena.block_bytes,
            block_size=self.block_size,
            model_fingerprint=self.fingerprint,
            index_backend=self.backend.name,
        )

    def lookup(self, fingerprint: str, conv: str, tokens: Sequence[int]) -> LookupResult:
        chain = self._validated_chain(fingerprint, conv, tokens)
        with self._synced():
            hit = self.index.lookup(conv, tokens, chain)
            best = self._best_holder(
                conv, chain, len(tokens),
                LookupResult(hit.num_tokens, list(runs(hit.blocks)), self.instance_id))
        self._count(best.valid_tokens, len(tokens))
        return best

    def reserve(self, fingerprint: str, conv: str, tokens: Sequence[int]) -> Reservation:
        chain = self._validated_chain(fingerprint, conv, tokens)
        return self.reserve_chain(conv, chain, len(tokens))

    def reserve_chain(self, conv: str, chain: Sequence[bytes], num_tokens: int) -> Reservation:
        """`reserve` by the tokens' chain; the caller checked the fingerprint."""
        self._check_chain(conv, chain, num_tokens)
        with self._synced():
            res = self.index.reserve_chain(conv, chain, num_tokens)
        self._reservations[res.reservation_id] = res
        self._reservation_deadlines[res.reservation_id] = self._clock() + self.lease_seconds
        self._count(res.valid_tokens, num_tokens)
        self._bytes_saved += len(res.valid_blocks) * self.arena.block_bytes
        return res

    def commit(self, reservation_id: int) -> None:
        with self._synced():
            self._forget_reservation(reservation_id)
            self.index.commit(reservation_id)

    def abort(self, reservation_id: int) -> None:
        with self._synced():
            self._forget_reservation(reservation_id)
            self.index.abort(reservation_id)

    def pin(self, fingerprint: str, conv: str, tokens: Sequence[int]) -> PinResult:
        chain = self._validated_chain(fingerprint, conv, tokens)
        hit, handle = self.pin_chain(conv, chain, len(tokens))
        return PinResult(handle.pin_id, hit.num_tokens, list(runs(hit.blocks)))

    def pin_chain(
        self, conv: str, chain: Sequence[bytes], num_tokens: int
    ) -> tuple[Hit, PinHandle]:
        """`pin` by the tokens' chain; the caller checked the fingerprint."""
        self._check_chain(conv, chain, num_tokens)
        with self._synced():
            hit, handle = self.index.pin_chain(conv, chain, num_tokens)
        self._pin_deadlines[handle.pin_id] = self._clock() + self.lease_seconds
        return hit, handle

    def execute(self, fingerprint: str, ops: Sequence[HostOp]) -> BatchResult:
        """One scheduler batch: validated whole first, so that a bad op changes nothing,
        then carried out in order by `host_ops.apply`. Each Pin also names its holder, as
        `lookup` does. A Redis outage mid-batch raises `IndexUnavailable`; what the batch
        had done by then is undone by lease expiry."""
        self.index.check_fingerprint(fingerprint)
        self._check_ops(ops)
        replies = host_ops.apply(self, ops)
        pins = {op.op_id: op for op in ops if isinstance(op, Pin)}
        holders: dict[int, str] = {}
        for reply in replies:
            if isinstance(reply, Pinned):
                op = pins[reply.op_id]
                here = LookupResult(reply.hit.num_tokens, [], self.instance_id)
                try:
                    best = self._best_holder(op.conv, op.chain, op.num_tokens, here)
                except IndexUnavailable:
                    best = here  # the pin stands; peers are only a hint
                holders[reply.op_id] = best.instance_id
        return BatchResult(replies, holders)

    def unpin(self, pin_id: int) -> None:
        if self._pin_deadlines.pop(pin_id, None) is None:
            raise UnknownPin(f"no pin {pin_id} (never made, unpinned, or its lease expired)")
        self.index.unpin(pin_id)

    def release(self, conv: str) -> None:
        if not conv:
            raise InvalidRequest("empty conversation id")
        with self._synced():
            self.index.release(conv)

    def expire_leases(self) -> int:
        """Aborts reservations and drops pins whose lease ran out; returns how many."""
        now = self._clock()
        expired = [r for r, t in self._reservation_deadlines.items() if t <= now]
        dropped = [p for p, t in self._pin_deadlines.items() if t <= now]
        for reservation_id in expired:
            self._forget_reservation(reservation_id)
            self.index.abort(reservation_id)
        for pin_id in dropped:
            del self._pin_deadlines[pin_id]
            self.index.unpin(pin_id)
        return len(expired) + len(dropped)

    def stats(self) -> StoreStats:
        s = self.index.stats()
        return StoreStats(
            capacity_blocks=s.capacity,
            used_blocks=s.used,
            pinned_blocks=s.pinned,
            hit_tokens=self._hit_tokens,
            miss_tokens=self._miss_tokens,
            evicted_blocks=s.evicted_blocks,
            bytes_saved_by_reuse=self._bytes_saved,
            pending_reservations=len(self._reservations),
        )

    def read_blocks(self, extents: Sequence[Extent]) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) chunks of the concatenated extents; validated before the first."""
        self._check_in_arena(extents)
        total = sum(e.length for e in extents) * self.arena.block_bytes

        def chunks() -> Iterator[tuple[int, bytes]]:
            for offset, length in chunk_spans(total):
                parts = [
                    self._bytes[at : at + n].tobytes()
                    for at, n, _ in self._spans(extents, offset, length)
                ]
                yield offset, b"".join(parts)

        return chunks()

    def begin_write(self, reservation_id: int, extents: Sequence[Extent]) -> BlockWrite:
        """A write into `extents`, which must be new blocks of a pending reservation."""
        res = self._pending(reservation_id)
        blocks = flatten(extents)
        if not blocks:
            raise InvalidRequest("WriteBlocks needs target extents")
        if len(set(blocks)) != len(blocks) or not set(blocks) <= set(res.new_blocks):
            raise InvalidRequest(
                f"extents {[(e.start, e.length) for e in extents]} are not distinct new "
                f"blocks of reservation {reservation_id}"
            )
        return BlockWrite(self, reservation_id, list(extents))

    def close(self) -> None:
        """Withdraws the chains and removes the arena: no segment outlives a clean stop."""
        del self._bytes
        try:
            self.backend.close()
        finally:
            self.arena.unlink()
            self.arena.close()

    def _write(self, reservation_id: int, extents: Sequence[Extent], offset: int,
               data: bytes) -> None:
        self._pending(reservation_id)  # still pending: not committed, aborted or expired
        self._reservation_deadlines[reservation_id] = self._clock() + self.lease_seconds
        view = memoryview(data)
        for at, n, src in self._spans(extents, offset, len(data)):
            self._bytes[at : at + n] = view[src : src + n]

    def _spans(
        self, extents: Sequence[Extent], offset: int, length: int
    ) -> Iterator[tuple[int, int, int]]:
        """(arena byte offset, length, offset in the piece) of bytes [offset, offset+length)
        of the extents laid end to end."""
        bb = self.arena.block_bytes
        end = offset + length
        base = 0
        for extent in extents:
            size = extent.length * bb
            lo, hi = max(offset, base), min(end, base + size)
            if lo < hi:
                yield extent.start * bb + lo - base, hi - lo, lo - offset
            base += size

    def _validated_chain(
        self, fingerprint: str, conv: str, tokens: Sequence[int]
    ) -> list[bytes]:
        self.index.check_fingerprint(fingerprint)
        chain = block_hashes(tokens, self.block_size, self.fingerprint)
        self._check_chain(conv, chain, len(tokens))
        return chain

    def _check_chain(self, conv: str, chain: Sequence[bytes], num_tokens: int) -> None:
        if not conv:
            raise InvalidRequest("empty conversation id")
        if num_tokens <= 0:
            raise InvalidRequest("empty token list")
        if len(chain) != -(-num_tokens // self.block_size):
            raise InvalidRequest(
                f"conversation {conv!r}: {len(chain)} hashes for {num_tokens} tokens in "
                f"blocks of {self.block_size}")
        if any(len(h) != HASH_BYTES for h in chain):
            raise InvalidRequest(f"conversation {conv!r}: block hashes are {HASH_BYTES} bytes")

    def _check_ops(self, ops: Sequence[HostOp]) -> None:
        answered: set[int] = set()
        for op in ops:
            match op:
                case Reserve() | Pin():
                    self._check_chain(op.conv, op.chain, op.num_tokens)
                    if op.op_id in answered:
                        raise InvalidRequest(f"op id {op.op_id} repeats in the batch")
                    answered.add(op.op_id)
                case Commit() | Abort():
                    if op.reservation_id <= 0:
                        raise InvalidRequest("reservation ids start at 1")
                case Release():
                    if not op.conv:
                        raise InvalidRequest("empty conversation id")

    def _best_holder(
        self, conv: str, chain: Sequence[bytes], num_tokens: int, best: LookupResult
    ) -> LookupResult:
        """`best`, or a peer's longer valid prefix of the chain (Redis index only)."""
        if best.valid_tokens < num_tokens:
            for peer, record in self.backend.peer_records(conv):
                n = matching_blocks(record.hashes, chain)
                valid = tokens_in_blocks(n, num_tokens, self.block_size)
                if valid > best.valid_tokens:
                    best = LookupResult(valid, list(runs(record.blocks[:n])), peer)
        return best

    def _check_in_arena(self, extents: Sequence[Extent]) -> None:
        if not extents:
            raise InvalidRequest("no extents given")
        for e in extents:
            if e.end > self.arena.num_blocks:
                raise InvalidRequest(
                    f"extent ({e.start}, {e.length}) exceeds the arena's "
                    f"{self.arena.num_blocks} blocks"
                )

    def _pending(self, reservation_id: int) -> Reservation:
        res = self._reservations.get(reservation_id)
        if res is None:
            raise UnknownReservation(f"no pending reservation {reservation_id}")
        return res

    def _forget_reservation(self, reservation_id: int) -> None:
        self._pending(reservation_id)
        del self._reservations[reservation_id]
        del self._reservation_deadlines[reservation_id]

    def _count(self, valid: int, total: int) -> None:
        self._hit_tokens += valid
        self._miss_tokens += total - valid

    @contextmanager
    def _synced(self) -> Iterator[None]:
        self.backend.sync()
        yield
        self.backend.sync()


class BlockWrite:
    """One WriteBlocks stream: chunks in order, each checksummed, exactly filling the
    target extents."""

    def __init__(self, store: KVStore, reservation_id: int, extents: list[Extent]) -> None:
        self._store = store
        self.reservation_id = reservation_id
        self.extents = extents
        self.total = sum(e.length for e in extents) * store.arena.block_bytes
        self.written = 0

    def write(self, offset: int, data: bytes, crc: int) -> None:
        if offset != self.written:
            raise InvalidRequest(f"chunk at offset {offset}, expected {self.written}")
        if len(data) > CHUNK_BYTES:
            raise InvalidRequest(f"chunk of {len(data)} bytes exceeds {CHUNK_BYTES}")
        if offset + len(data) > self.total:
            raise InvalidRequest(f"data runs past the {self.total} bytes of the extents")
        if checksum(data) != crc:
            raise InvalidRequest(f"checksum mismatch in the chunk at offset {offset}")
        self._store._write(self.reservation_id, self.extents, offset, data)
        self.written += len(data)

    def finish(self) -> int:
        if self.written != self.total:
            raise InvalidRequest(f"wrote {self.written} of the extents' {self.total} bytes")
        return self.written

