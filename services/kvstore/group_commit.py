"""Group commit of a Redis index's writes: one round trip carries every call made meanwhile.

Store calls run on the event loop against the storage's mirror and leave their writes
buffered. `flush` returns once every write buffered so far has landed, the round in flight
included (or raises IndexUnavailable if one failed); `kick` starts a round and returns at
once (a failed round leaves the index dirty, so the next call rewrites it first). One
round is in flight at a time, on an asyncio Redis client, so writes land in order; at N
concurrent clients a round carries up to N calls' writes. (The service flushes before a
reply that hands out blocks, and kicks after any other call that wrote.)
"""

from __future__ import annotations

import asyncio
import logging

import redis

from services.kvstore.errors import IndexUnavailable
from services.kvstore.redis_storage import (
    SCAN_COUNT,
    AsyncRedisClient,
    RedisIndexStorage,
    Writes,
    is_cluster,
    queue,
)

log = logging.getLogger("fastswitch.kvstore")


class GroupCommit:
    def __init__(self, storage: RedisIndexStorage, client: AsyncRedisClient) -> None:
        self.storage = storage
        self.client = client
        self._next: asyncio.Future[None] | None = None  # the round now gathering writes
        self._sending: asyncio.Future[None] | None = None  # the round in flight
        self._rounds: asyncio.Task[None] | None = None
        storage.deferred = True

    async def flush(self) -> None:
        """Returns once the writes buffered so far, and the round in flight, are in Redis.
        Raises IndexUnavailable if they are not: Redis lags the mirror."""
        round_ = self._start() or self._sending
        if round_ is not None:
            await asyncio.shield(round_)
        if self.storage.dirty:
            raise IndexUnavailable("Redis index unreachable; it is rewritten on recovery")

    def kick(self) -> None:
        """Starts landing the writes buffered so far, without waiting for them."""
        self._start()

    def _start(self) -> asyncio.Future[None] | None:
        """The round that will carry the buffered writes; None if there are none."""
        if self._next is None:
            if not self.storage.has_writes:
                return None
            self._next = asyncio.get_running_loop().create_future()
            if self._rounds is None:
                self._rounds = asyncio.create_task(self._run())
        return self._next

    async def close(self) -> None:
        """Lands what is buffered, then hands flushing back to the storage's callers."""
        try:
            await self.flush()
        finally:
            self.storage.deferred = False
            await self.client.aclose()

    async def _run(self) -> None:
        try:
            while self._next is not None:
                done = self._sending = self._next
                self._next = None
                writes = self.storage.take_writes()
                if writes is None:
                    done.set_result(None)
                    continue
                try:
                    await self._send(writes)
                except BaseException as e:  # whatever it was, what it carried may not be in
                    self.storage.settle(writes, landed=False)
                    done.set_exception(IndexUnavailable(f"Redis index unreachable: {e!r}"))
                    done.exception()  # retrieved: a round nobody awaits any more is no error
                    if not isinstance(e, Exception):
                        raise  # cancelled
                    if not isinstance(e, redis.RedisError):
                        log.exception("a Redis index round failed; the index is rewritten")
                else:
                    self.storage.settle(writes, landed=True)
                    done.set_result(None)
        finally:
            self._rounds = self._sending = None
            if self._next is not None:  # the loop ended early: no round will carry it
                self._next.set_exception(IndexUnavailable("the index's rounds stopped"))
                self._next.exception()
                self._next = None

    async def _send(self, writes: Writes) -> None:
        """`RedisIndexStorage.send`, on the asyncio client."""
        held = []
        if writes.rewrite:
            match = self.storage.namespace.own_chains
            held = [key async for key in self.client.scan_iter(match=match, count=SCAN_COUNT)]
        async with self.client.pipeline(transaction=not is_cluster(self.client)) as pipe:
            queue(pipe, writes.with_deletions(held))
            await pipe.execute()
