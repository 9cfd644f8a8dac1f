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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc

from common.kv.host_ops import HostOp, HostReply, Pinned, unanswered
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.kvstore.batch_wire import ops_to_proto, replies_from_proto
from services.scheduler.host_tier import HostTier

log = logging.getLogger("fastswitch.scheduler.kvstore")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
        timeout_s: float = 1.0,
    ) -> None:
        self._stub = kv_grpc.KVStoreStub(channel)
        self.identity = identity
        self.fingerprint = fingerprint
        self._timeout = timeout_s
        self._failing = False

    @property
    def arenas(self) -> tuple[str, ...]:
        return (self.identity.arena_name,)

    async def describe(self) -> StoreIdentity | None:
        """Who answers at the store's address now; None when nobody does."""
        try:
            reply = await self._stub.Describe(kv.DescribeRequest(),
                                              timeout=min(self._timeout, 1.0))
        except grpc.aio.AioRpcError:
            return None
        return StoreIdentity.of(reply)

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        request = kv.BatchRequest(model_fingerprint=self.fingerprint, ops=ops_to_proto(ops))
        try:
            response = await self._stub.Batch(request, timeout=self._timeout)
            replies, holders = replies_from_proto(response.replies, ops)
        except (asyncio.CancelledError, grpc.aio.UsageError) as e:
            task = asyncio.current_task()
            if isinstance(e, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # this call itself is being cancelled
            self._failed("its channel closed: the store left")  # the call, not us, was
            return unanswered(ops)
        except grpc.aio.AioRpcError as e:
            self._failed(f"{e.code().name}: {e.details()}")
            if e.code() in _UNREACHABLE:
                self._down("is unreachable")
            return unanswered(ops)
        except ValueError as e:
            self._failed(f"bad reply: {e}")
            return unanswered(ops)
        if StoreIdentity.of(response) != self.identity:
            self._down(f"answered from arena {response.arena_name}, not the mapped "
                       f"{self.identity.arena_name}")
            return unanswered(ops)
        self._failing = False
        return [replace(r, holder=holders[r.op_id]) if isinstance(r, Pinned) else r
                for r in replies]

    def _down(self, why: str) -> None:
        if self.on_down is not None:
            self.on_down(why)

    def _failed(self, why: str) -> None:
        if not self._failing:
            log.warning("kvstore Batch failed (%s); preemption falls back to recompute", why)
        self._failing = True
