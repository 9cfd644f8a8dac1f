"""One KV store over its gRPC API, for the scheduler's event loop: the `StoreClient` that
`HostRouter` sends each plan's batch through.

`execute` is one Batch call with a short deadline. The ops travel as hash chains, never
token ids. A store that fails (any status, or replies that do not answer the ops) degrades
preemption to recompute instead of failing requests: the batch is answered `unanswered`
(no room, nothing pinned). One that cannot be reached at all (unavailable, or past the
deadline) also calls `on_unreachable`; one whose channel was closed (it left) answers
`unanswered` too. A failing store is logged once, until it answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc

from common.kv.host_ops import HostOp, unanswered
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.kvstore.batch_wire import ops_to_proto, replies_from_proto
from services.scheduler.host_router import StoreAnswer, StoreIdentity

log = logging.getLogger("fastswitch.scheduler.kvstore")
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class RemoteHostKV:
    def __init__(
        self, channel: grpc.aio.Channel, *, fingerprint: str, timeout_s: float = 1.0
    ) -> None:
        self._stub = kv_grpc.KVStoreStub(channel)
        self.fingerprint = fingerprint
        self._timeout = timeout_s
        self._failing = False
        self.on_unreachable: Callable[[], None] | None = None

    async def identity(self) -> StoreIdentity | None:
        try:
            reply = await self._stub.Describe(kv.DescribeRequest(),
                                              timeout=min(self._timeout, 1.0))
        except grpc.aio.AioRpcError:
            return None
        return StoreIdentity(reply.instance_id, reply.arena_name)

    async def execute(self, ops: Sequence[HostOp]) -> StoreAnswer:
        request = kv.BatchRequest(model_fingerprint=self.fingerprint, ops=ops_to_proto(ops))
        try:
            response = await self._stub.Batch(request, timeout=self._timeout)
            replies, holders = replies_from_proto(response.replies, ops)
        except (asyncio.CancelledError, grpc.aio.UsageError) as e:
            task = asyncio.current_task()
            if isinstance(e, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # this call itself is being cancelled
            self._failed("its channel closed: the store left")  # the call, not us, was
            return StoreAnswer(unanswered(ops), {}, None)
        except grpc.aio.AioRpcError as e:
            self._failed(f"{e.code().name}: {e.details()}")
            if e.code() in _UNREACHABLE and self.on_unreachable is not None:
                self.on_unreachable()
            return StoreAnswer(unanswered(ops), {}, None)
        except ValueError as e:
            self._failed(f"bad reply: {e}")
            return StoreAnswer(unanswered(ops), {}, None)
        self._failing = False
        return StoreAnswer(replies, holders,
                           StoreIdentity(response.instance_id, response.arena_name))

    def _failed(self, why: str) -> None:
        if not self._failing:
            log.warning("kvstore Batch failed (%s); preemption falls back to recompute", why)
        self._failing = True
