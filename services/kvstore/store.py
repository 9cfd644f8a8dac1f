"""The KV store's state machine: reuse index, host arena, leases and stats.

It opens no socket itself and reads no clock but the one it is given (`clock`); its only
I/O is through its index backend. With the in-memory backend a call touches nothing outside
the process; with Redis (`RedisBackend`) a call sends its index writes in one round trip
before it returns, or, when the service defers them to a `GroupCommit`, leaves them for the
service to land before it answers.

Contract (the service maps each error to a gRPC status):

- `execute` is the one data-path call: a client's request (`StoreRequest`) of host ops,
  lease renewals and abandoned earlier requests. It is validated whole before anything
  changes, so a rejected request leaves the index and the arena as they were. Bad input
  raises `InvalidRequest`, `FingerprintMismatch` or `ValueError`; naming another client's
  reservation or pin raises `NotOwner`; a request its client abandoned raises
  `AbandonedRequest`; a request id seen in the last lease period is answered from its first
  answer, not done again.
- Reservations and pins are leases owned by the client that made them: each lapses
  `lease_seconds` after it was made, last renewed or (a reservation) last written, and
  `expire_leases` then aborts or unpins it, so that its blocks return. A committed
  reservation is no lease any more and never lapses.
- Abandoning a request aborts the reservations and unpins the pins it made that are still
  held, and refuses the request if it arrives later.
- Bytes reach the arena only through `begin_write`, and only into a pending reservation's
  new blocks (its owner's), which no reader can see until its commit.
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
from common.kv.block_hash import HASH_BYTES, matching_blocks, tokens_in_blocks
from common.kv.extent import Extent, flatten
from common.kv.host_ops import (
    Abort,
    Commit,
    HostOp,
    HostReply,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
)
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
from services.kvstore.leases import LeaseTable, RecentRequests


@dataclass(frozen=True, slots=True)
class Description:
    instance_id: str
    arena_name: str
    num_blocks: int
    block_bytes: int
    block_size: int
    model_fingerprint: str
    index_backend: str
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One client request: `abandon` first, then the renewals, then `ops` in order."""

    client: str
    request_id: int
    ops: Sequence[HostOp] = ()
    renew_reservations: Sequence[int] = ()
    renew_pins: Sequence[int] = ()
    abandon: Sequence[int] = ()  # the client's earlier request ids


@dataclass(frozen=True, slots=True)
class BatchResult:
    replies: list[HostReply]  # as `host_ops.apply` answers
    holders: dict[int, str]  # a Pin's op id -> the instance holding most of its prefix
    lapsed_reservations: tuple[int, ...] = ()  # renewed, but no longer held
    lapsed_pins: tuple[int, ...] = ()


@dataclass(slots=True)
class StoreStats:
    """`hit_tokens`/`miss_tokens` count Reserve and Pin tokens found valid or not;
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
        lease_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_recent_requests: int = 1 << 16,
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
        self._reservation_leases = LeaseTable("reservation")
        self._pin_leases = LeaseTable("pin")
        self._requests: RecentRequests[BatchResult] = RecentRequests(max_recent_requests)
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
            lease_seconds=self.lease_seconds,
        )

    def execute(self, fingerprint: str, request: StoreRequest) -> BatchResult:
        """One client request (see the module's contract). Each Pin also names the
        instance holding the longest valid prefix (this one, or a peer through a shared
        Redis index). A Redis outage mid-request raises `IndexUnavailable`; what the
        request had done by then is undone by lease expiry, or by its abandonment."""
        now = self._clock()
        if not request.client:
            raise InvalidRequest("a request needs a client id")
        if request.request_id <= 0:
            raise InvalidRequest("request ids start at 1")
        first = self._requests.answer(request.client, request.request_id, now)
        if first is not None:
            return first
        self.index.check_fingerprint(fingerprint)
        self._check_request(request)
        until = now + self.lease_seconds
        self._abandon(request.client, request.abandon, until)
        lapsed_reservations = tuple(r for r in request.renew_reservations
                                    if not self._reservation_leases.extend(r, until))
        lapsed_pins = tuple(p for p in request.renew_pins
                            if not self._pin_leases.extend(p, until))
        replies = host_ops.apply(_ClientIndex(self, request.client), request.ops)
        pins = {op.op_id: op for op in request.ops if isinstance(op, Pin)}
        holders: dict[int, str] = {}
        for reply in replies:
            if isinstance(reply, Pinned):
                op = pins[reply.op_id]
                try:
                    holders[reply.op_id] = self._best_holder(
                        op.conv, op.chain, op.num_tokens, reply.hit.num_tokens)
                except IndexUnavailable:
                    holders[reply.op_id] = self.instance_id  # the pin stands; peers are a hint
        result = BatchResult(replies, holders, lapsed_reservations, lapsed_pins)
        self._requests.record(request.client, request.request_id, result, until)
        return result

    def expire_leases(self) -> int:
        """Aborts reservations and drops pins whose lease ran out; returns how many."""
        now = self._clock()
        expired = self._reservation_leases.lapsed(now)
        dropped = self._pin_leases.lapsed(now)
        for reservation_id in expired:
            self._abort(reservation_id)
        for pin_id in dropped:
            self._unpin(pin_id)
        self._requests.forget_lapsed(now)
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

    def begin_write(self, client: str, reservation_id: int,
                    extents: Sequence[Extent]) -> BlockWrite:
        """A write into `extents`, which must be new blocks of `client`'s pending
        reservation."""
        self._reservation_leases.check_owner(reservation_id, client)
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
        self._reservation_leases.extend(reservation_id, self._clock() + self.lease_seconds)
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

    def _check_request(self, request: StoreRequest) -> None:
        client = request.client
        answered: set[int] = set()
        for op in request.ops:
            match op:
                case Reserve() | Pin():
                    self._check_chain(op.conv, op.chain, op.num_tokens)
                    if op.op_id in answered:
                        raise InvalidRequest(f"op id {op.op_id} repeats in the batch")
                    answered.add(op.op_id)
                case Commit() | Abort():
                    if op.reservation_id <= 0:
                        raise InvalidRequest("reservation ids start at 1")
                    self._reservation_leases.check_owner(op.reservation_id, client)
                case Unpin():
                    self._pin_leases.check_owner(op.pin_id, client)
                case Release():
                    if not op.conv:
                        raise InvalidRequest("empty conversation id")
        for reservation_id in request.renew_reservations:
            self._reservation_leases.check_owner(reservation_id, client)
        for pin_id in request.renew_pins:
            self._pin_leases.check_owner(pin_id, client)
        if any(r <= 0 for r in request.abandon):
            raise InvalidRequest("request ids start at 1")

    def _abandon(self, client: str, request_ids: Sequence[int], until: float) -> None:
        """Ends what the client's abandoned requests made that is still held."""
        for result in self._requests.abandon(client, request_ids, until):
            for reply in result.replies:
                match reply:
                    case Reserved(_, res) if res is not None:
                        if res.reservation_id in self._reservation_leases:
                            self._abort(res.reservation_id)
                    case Pinned(_, _, pin) if pin.pin_id in self._pin_leases:
                        self._unpin(pin.pin_id)

    # The ops, for `host_ops.apply` through a `_ClientIndex`: validated, and owned.

    def _reserve_chain(self, client: str, conv: str, chain: Sequence[bytes],
                       num_tokens: int) -> Reservation:
        with self._synced():
            res = self.index.reserve_chain(conv, chain, num_tokens)
            self._reservations[res.reservation_id] = res
            self._reservation_leases.grant(res.reservation_id, client,
                                           self._clock() + self.lease_seconds)
            self._count(res.valid_tokens, num_tokens)
            self._bytes_saved += len(res.valid_blocks) * self.arena.block_bytes
        return res

    def _pin_chain(self, client: str, conv: str, chain: Sequence[bytes],
                   num_tokens: int) -> tuple[Hit, PinHandle]:
        with self._synced():
            hit, handle = self.index.pin_chain(conv, chain, num_tokens)
            self._pin_leases.grant(handle.pin_id, client, self._clock() + self.lease_seconds)
            self._count(hit.num_tokens, num_tokens)
        return hit, handle

    def _commit(self, reservation_id: int) -> None:
        with self._synced():
            self._forget_reservation(reservation_id)
            self.index.commit(reservation_id)

    def _abort(self, reservation_id: int) -> None:
        with self._synced():
            self._forget_reservation(reservation_id)
            self.index.abort(reservation_id)

    def _unpin(self, pin_id: int) -> None:
        if not self._pin_leases.end(pin_id):
            raise UnknownPin(f"no pin {pin_id} (never made, unpinned, or its lease expired)")
        self.index.unpin(pin_id)

    def _release(self, conv: str) -> None:
        with self._synced():
            self.index.release(conv)

    def _best_holder(
        self, conv: str, chain: Sequence[bytes], num_tokens: int, valid_here: int
    ) -> str:
        """This instance, or the peer holding a longer valid prefix (Redis index only)."""
        best, holder = valid_here, self.instance_id
        if best < num_tokens:
            for peer, record in self.backend.peer_records(conv):
                valid = tokens_in_blocks(
                    matching_blocks(record.hashes, chain), num_tokens, self.block_size)
                if valid > best:
                    best, holder = valid, peer
        return holder

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
        self._reservation_leases.end(reservation_id)

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



class _ClientIndex:
    """The store as `host_ops.apply`'s index, for one client's validated request: what
    its ops make is leased to the client."""

    def __init__(self, store: KVStore, client: str) -> None:
        self._store = store
        self._client = client

    def reserve_chain(self, conv: str, chain: Sequence[bytes], num_tokens: int) -> Reservation:
        return self._store._reserve_chain(self._client, conv, chain, num_tokens)

    def pin_chain(
        self, conv: str, chain: Sequence[bytes], num_tokens: int
    ) -> tuple[Hit, PinHandle]:
        return self._store._pin_chain(self._client, conv, chain, num_tokens)

    def commit(self, reservation_id: int) -> None:
        self._store._commit(reservation_id)

    def abort(self, reservation_id: int) -> None:
        self._store._abort(reservation_id)

    def unpin(self, pin_id: int) -> None:
        self._store._unpin(pin_id)

    def release(self, conv: str) -> None:
        self._store._release(conv)
