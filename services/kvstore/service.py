"""The KV store's gRPC face: a grpc.aio servicer over `KVStore`, health and reflection.

Errors become status codes, never response fields. Store calls run inline on the event
loop (they are microseconds), one at a time. With the Redis backend each call's index
writes are then landed by a `GroupCommit` round (redis.asyncio) before the call answers,
so concurrent calls share round trips and none blocks the event loop. (A lookup that asks
the registry for peers still reads Redis inline; closing runs on a thread.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from common.auth import token_interceptors
from common.grpc_serving import add_health_and_reflection, mark_serving, new_server
from common.kv.host_ops import Reserve
from common.kv.reuse_index import (
    FingerprintMismatch,
    HostCapacityExhausted,
    StaleReservation,
    UnknownPin,
    UnknownReservation,
)
from common.tls import ServerTls, listen
from protos import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.backend import RedisBackend
from services.kvstore.batch_wire import replies_to_proto, request_from_proto
from services.kvstore.bulk import checksum, from_proto
from services.kvstore.errors import IndexUnavailable, InvalidRequest
from services.kvstore.group_commit import GroupCommit
from services.kvstore.leases import AbandonedRequest, NotOwner
from services.kvstore.metrics import StoreMetrics
from services.kvstore.store import BlockWrite, KVStore

T = TypeVar("T")
log = logging.getLogger("fastswitch.kvstore")
HEARTBEAT_S = 2.0
LEASE_BEATS = 3  # a registry entry outlives this many missed heartbeats
SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name

# First match wins: subclasses before their bases.
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode, str], ...] = (
    (IndexUnavailable, grpc.StatusCode.UNAVAILABLE, ""),
    (
        HostCapacityExhausted,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "KV store has no host blocks to spare, recompute instead: ",
    ),
    (StaleReservation, grpc.StatusCode.ABORTED, ""),
    (AbandonedRequest, grpc.StatusCode.ABORTED, ""),
    (NotOwner, grpc.StatusCode.PERMISSION_DENIED, ""),
    (UnknownReservation, grpc.StatusCode.INVALID_ARGUMENT, ""),
    (UnknownPin, grpc.StatusCode.INVALID_ARGUMENT, ""),
    (FingerprintMismatch, grpc.StatusCode.INVALID_ARGUMENT, ""),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, ""),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT, ""),
)
_MAPPED = tuple(error for error, _, _ in _STATUS)


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: KVStore, commit: GroupCommit | None) -> None:
        self.store = store
        self._commit = commit

    async def run(self, fn: Callable[..., T], *args: object, hands_out: bool = False) -> T:
        """Runs a store call against a Redis index: an index that lags after a failed round
        is rewritten first, or the call raises IndexUnavailable.

        A reply that hands out blocks (`hands_out`: a Reserve) waits until every index
        write staged before it has landed: the deletions among them are what stop a
        restarted store from serving the blocks' old chains over their new bytes. Any
        other call's writes land with the next round, unawaited: a chain or an LRU touch
        that has not landed yet is only a miss for a peer or a restart."""
        if self._commit is None:
            return fn(*args)
        storage = self._commit.storage
        if storage.dirty:
            await self._commit.flush()
        staged = storage.staged
        try:
            return fn(*args)
        finally:
            if hands_out:
                await self._commit.flush()
            elif storage.staged != staged:
                self._commit.kick()

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[..., T],
                    *args: object, hands_out: bool = False) -> T:
        try:
            return await self.run(fn, *args, hands_out=hands_out)
        except _MAPPED as e:
            code, prefix = next((c, p) for t, c, p in _STATUS if isinstance(e, t))
            message = e.args[0] if e.args else type(e).__name__
            await context.abort(code, f"{prefix}{message}")
            raise AssertionError("unreachable: abort raises") from e

    async def Describe(self, request, context):
        d = self.store.describe()
        return kvstore_pb2.DescribeResponse(
            instance_id=d.instance_id,
            arena_name=d.arena_name,
            num_blocks=d.num_blocks,
            block_bytes=d.block_bytes,
            block_size=d.block_size,
            model_fingerprint=d.model_fingerprint,
            index_backend=d.index_backend,
            lease_seconds=d.lease_seconds,
        )

    async def Batch(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Its caller gave up before it got here: doing it now would orphan what it makes.
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {request.request_id} arrived after its deadline")
        try:
            call = request_from_proto(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        result = await self._call(context, self.store.execute, request.model_fingerprint, call,
                                  hands_out=any(isinstance(op, Reserve) for op in call.ops))
        return kvstore_pb2.BatchResponse(
            replies=replies_to_proto(result.replies, result.holders),
            instance_id=self.store.instance_id,
            arena_name=self.store.arena.name,
            lapsed_reservations=result.lapsed_reservations,
            lapsed_pins=result.lapsed_pins,
        )

    async def Stats(self, request, context):
        s = await self._call(context, self.store.stats)
        return kvstore_pb2.StatsResponse(
            capacity_blocks=s.capacity_blocks,
            used_blocks=s.used_blocks,
            pinned_blocks=s.pinned_blocks,
            hit_tokens=s.hit_tokens,
            miss_tokens=s.miss_tokens,
            evicted_blocks=s.evicted_blocks,
            bytes_saved_by_reuse=s.bytes_saved_by_reuse,
            pending_reservations=s.pending_reservations,
        )

    async def ReadBlocks(self, request, context):
        chunks = await self._call(
            context, lambda: self.store.read_blocks(from_proto(request.extents))
        )
        for offset, data in chunks:
            yield kvstore_pb2.BlockChunk(offset=offset, data=data, crc32c=checksum(data))

    async def WriteBlocks(self, request_iterator, context):
        write: BlockWrite | None = None
        async for chunk in request_iterator:
            if write is None:
                write = await self._call(
                    context,
                    lambda c=chunk: self.store.begin_write(c.client_id, c.reservation_id,
                                                           from_proto(c.extents)),
                )
            await self._call(context, write.write, chunk.offset, chunk.data, chunk.crc32c)
        if write is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty WriteBlocks stream")
        written = await self._call(context, write.finish)
        return kvstore_pb2.WriteBlocksResponse(bytes_written=written)


class StoreServer:
    """A running store: the gRPC server, health, reflection, metrics and the lease reaper."""

    def __init__(
        self,
        store: KVStore,
        *,
        reap_interval: float | None = None,
        metrics: StoreMetrics | None = None,
        token: str = "",
        tls: ServerTls | None = None,
    ) -> None:
        """`token`: the internal token that every call but health and reflection must
        carry (none required when empty)."""
        self.store = store
        self.tls = tls
        self._worker: ThreadPoolExecutor | None = None
        self._commit: GroupCommit | None = None
        if isinstance(store.backend, RedisBackend):
            self._worker = ThreadPoolExecutor(1, "kvstore-registry")
            self._commit = GroupCommit(store.backend.storage, store.backend.async_client)
        self.servicer = KVStoreServicer(store, self._commit)
        self.metrics = metrics or StoreMetrics()
        self.server = new_server([self.metrics.rpc_errors, *token_interceptors(token)])
        kvstore_pb2_grpc.add_KVStoreServicer_to_server(self.servicer, self.server)
        self.health = add_health_and_reflection(self.server, SERVICE_NAME)
        self._reap_interval = reap_interval or max(0.05, min(5.0, store.lease_seconds / 4))
        self._reaper: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self, address: str) -> int:
        """Serves on `address` ("host:port", port 0 picks one); returns the bound port."""
        port = listen(self.server, address, self.tls)
        await self.server.start()
        await mark_serving(self.health, SERVICE_NAME)
        self.metrics.watch(lambda: self.servicer.run(self.store.stats))
        self._reaper = asyncio.create_task(self._reap())
        if isinstance(self.store.backend, RedisBackend):
            host = address.rsplit(":", 1)[0]
            if host in ("", "0.0.0.0", "[::]"):
                host = socket.gethostname()
            self._heartbeat = asyncio.create_task(
                self._beat(self.store.backend, f"{host}:{port}"))
        return port

    async def stop(self, grace: float = 2.0) -> None:
        """Stops serving, then closes the store (which unlinks the arena)."""
        await self.health.enter_graceful_shutdown()
        for task in (self._reaper, self._heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.server.stop(grace)
        try:
            if self._commit is None:
                self.store.close()
            else:
                with contextlib.suppress(IndexUnavailable):
                    await self._commit.close()  # what does not land is withdrawn by close
                await asyncio.get_running_loop().run_in_executor(self._worker, self.store.close)
        finally:
            if self._worker is not None:
                self._worker.shutdown()

    async def _beat(self, backend: RedisBackend, address: str) -> None:
        """Renews the registry entry every HEARTBEAT_S, with a lease of LEASE_BEATS beats."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(
                    self._worker, backend.heartbeat, address, HEARTBEAT_S * LEASE_BEATS)
            except IndexUnavailable as e:
                log.warning("registry heartbeat failed (retried in %.0f s): %s", HEARTBEAT_S, e)
            await asyncio.sleep(HEARTBEAT_S)

    async def _reap(self) -> None:
        """Expires leases forever; while the Redis index is behind, the expiries wait."""
        while True:
            await asyncio.sleep(self._reap_interval)
            try:
                await self.servicer.run(self.store.expire_leases)
            except IndexUnavailable as e:
                log.warning("lease expiry waits for the index (retried in %.1f s): %s",
                            self._reap_interval, e)

