"""One KV store over its gRPC API, for the scheduler's event loop: the host tier of a store
whose arena the executor maps, which `HostRouter` sends each plan's batch through.

`execute` is one Batch call with a short deadline. The ops travel as hash chains, never
token ids. A store that fails (any status, or replies that do not answer the ops) degrades
preemption to recompute instead of failing requests: the batch is answered `unanswered`
(no room, nothing pinned). One that cannot be reached at all (unavailable, or past the
deadline), or that answers from another arena than the one it was opened for (it
restarted: its block ids mean other memory), also calls `on_down`; one whose channel was
closed (it left) answers `unanswered` too. A failing store is logged once, until it
answers.

Leases. The client has an id of its own (`client_id`), and every call a request id. The
store leases each reservation and pin to the client that made it; the client keeps the
ones it holds (made, not yet committed, aborted or unpinned) and `renew` extends them all
in one call, which the scheduler makes every `--kvstore-renew` seconds. A call that failed
is abandoned by its request id with the next call that gets through: whatever it made on
the store is undone there, and if it had not arrived yet it is refused when it does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc

from common.kv.host_ops import (
    NO_PIN,
    Abort,
    Commit,
    HostOp,
    HostReply,
    Pinned,
    Reserved,
    Unpin,
    unanswered,
)
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.kvstore.batch_wire import replies_from_proto, request_to_proto
from services.kvstore.store import StoreRequest
from services.scheduler.host_tier import HostTier

log = logging.getLogger("fastswitch.scheduler.kvstore")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
MAX_ABANDONED = 1 << 12  # older abandoned requests' leases have lapsed anyway


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """What makes a store's host block ids mean the same memory: its arena."""

    instance_id: str
    arena_name: str

    @classmethod
    def of(cls, described: kv.DescribeResponse | kv.BatchResponse) -> StoreIdentity:
        return cls(described.instance_id, described.arena_name)


class RemoteHostKV(HostTier):
    """The store `identity` names, over `channel`."""

    def __init__(
        self, channel: grpc.aio.Channel, identity: StoreIdentity, *, fingerprint: str,
        timeout_s: float = 1.0, client_id: str = "",
    ) -> None:
        """`client_id`: this client's id at the store (default: a random one)."""
        self._stub = kv_grpc.KVStoreStub(channel)
        self.identity = identity
        self.fingerprint = fingerprint
        self.client_id = client_id or uuid.uuid4().hex
        self._timeout = timeout_s
        self._failing = False
        self._request_ids = itertools.count(1)
        self._reservations: set[int] = set()  # held: made, not yet committed or aborted
        self._pins: set[int] = set()  # held: made, not yet unpinned
        self._abandoned: deque[int] = deque(maxlen=MAX_ABANDONED)  # to tell the store

    @property
    def arenas(self) -> tuple[str, ...]:
        return (self.identity.arena_name,)

    @property
    def failing(self) -> bool:
        """Its last call failed: that batch was answered `unanswered`."""
        return self._failing

    @property
    def held(self) -> tuple[int, int]:
        """Reservations and pins this client holds on the store, as far as it knows."""
        return len(self._reservations), len(self._pins)

    async def describe(self) -> StoreIdentity | None:
        """Who answers at the store's address now; None when nobody does."""
        try:
            reply = await self._stub.Describe(kv.DescribeRequest(),
                                              timeout=min(self._timeout, 1.0))
        except grpc.aio.AioRpcError:
            return None
        return StoreIdentity.of(reply)

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        for op in ops:
            match op:
                case Commit() | Abort():
                    self._reservations.discard(op.reservation_id)
                case Unpin():
                    self._pins.discard(op.pin_id)
        request_id, response = await self._call(ops)
        if response is None:
            return unanswered(ops)
        try:
            replies, holders = replies_from_proto(response.replies, ops)
        except ValueError as e:
            self._abandoned.append(request_id)
            self._failed(f"bad reply: {e}")
            return unanswered(ops)
        for reply in replies:
            match reply:
                case Reserved(_, res) if res is not None:
                    self._reservations.add(res.reservation_id)
                case Pinned(_, _, pin) if pin.pin_id != NO_PIN:
                    self._pins.add(pin.pin_id)
        if StoreIdentity.of(response) != self.identity:
            self._down(f"answered from arena {response.arena_name}, not the mapped "
                       f"{self.identity.arena_name}")
            return unanswered(ops)
        self._failing = False
        return [replace(r, holder=holders[r.op_id]) if isinstance(r, Pinned) else r
                for r in replies]

    async def renew(self) -> None:
        """Extends the leases of every reservation and pin this client holds (forgetting
        those the store no longer holds), and tells the store of abandoned requests."""
        if not (self._reservations or self._pins or self._abandoned):
            return
        _, response = await self._call((), renew=True)
        if response is not None:
            self._reservations.difference_update(response.lapsed_reservations)
            self._pins.difference_update(response.lapsed_pins)

    async def _call(self, ops: Sequence[HostOp], *,
                    renew: bool = False) -> tuple[int, kv.BatchResponse | None]:
        """One Batch: its request id, and its response, None if it failed (it is then
        abandoned with the next call that gets through)."""
        abandon = tuple(self._abandoned)
        request = StoreRequest(
            self.client_id, next(self._request_ids), ops,
            renew_reservations=tuple(self._reservations) if renew else (),
            renew_pins=tuple(self._pins) if renew else (), abandon=abandon)
        try:
            response = await self._stub.Batch(request_to_proto(self.fingerprint, request),
                                              timeout=self._timeout)
        except (asyncio.CancelledError, grpc.aio.UsageError) as e:
            self._abandoned.append(request.request_id)
            task = asyncio.current_task()
            if isinstance(e, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # this call itself is being cancelled
            self._failed("its channel closed: the store left")  # the call, not us, was
            return request.request_id, None
        except grpc.aio.AioRpcError as e:
            self._abandoned.append(request.request_id)
            self._failed(f"{e.code().name}: {e.details()}")
            if e.code() in _UNREACHABLE:
                self._down("is unreachable")
            return request.request_id, None
        if abandon:  # told; any abandoned since stay
            told = set(abandon)
            self._abandoned = deque((r for r in self._abandoned if r not in told),
                                    maxlen=MAX_ABANDONED)
        return request.request_id, response

    def _down(self, why: str) -> None:
        if self.on_down is not None:
            self.on_down(why)

    def _failed(self, why: str) -> None:
        if not self._failing:
            log.warning("kvstore Batch failed (%s); preemption falls back to recompute", why)
        self._failing = True
