"""Which KV stores the scheduler uses, and the executor's arenas for them.

The driver side of `HostRouter`'s membership. `join` connects to a store, checks its blocks
and model against the executor's, has the executor map its arena (or, for a store on
another host, a local mirror of it: `remote_tier`) and adds it to the router; `leave`
removes a store and has the executor unmap its arena (swaps in flight finish first; later
ones into it are refused, and their requests recompute); `restarted` replaces a store that
came back with a new arena (leave, then join at the same address). Changes run one at a
time.

Stores come from a fixed address list (`--kvstore a,b`), joined at start and kept: a store
that stops is down and probed (`probe`), never removed. Or from the Redis registry the
stores share (`--kvstore redis://...`): `watch` reads it every `poll_s`; an entry serving
at an address joins, one that is gone, has stopped serving or whose lease ran out leaves,
and one with a new arena or address is replaced. A Redis that does not answer changes
nothing: the stores known stay, down or up as they answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import redis

from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.kvstore.redis_storage import AsyncRedisClient, Namespace
from services.kvstore.registry import InstanceEntry, parse_entries
from services.scheduler.host_router import HostRouter, RoutedStore, StoreIdentity
from services.scheduler.remote_host import RemoteHostKV
from services.scheduler.remote_tier import MappedStore, Transport, map_store

log = logging.getLogger("fastswitch.scheduler.kvstore")


class StoreRefused(Exception):
    """The store cannot serve this executor: other blocks, another model, a taken id."""


@dataclass(frozen=True, slots=True)
class _Link:
    address: str
    channel: grpc.aio.Channel
    index_backend: str  # "memory" or "redis"
    mapped: MappedStore


class StoreMembership:
    def __init__(
        self,
        router: HostRouter,
        executor: ex_grpc.ExecutorStub,
        desc: ex.DescribeResponse,
        channel: Callable[[str], grpc.aio.Channel],
        *,
        call_timeout_s: float = 1.0,
        transport: Transport = Transport.AUTO,
    ) -> None:
        """`channel` opens a channel to a store's address (with the internal token and
        TLS); `call_timeout_s` is the deadline of each host-op batch; `transport` how the
        executor reaches a store's blocks."""
        self.router = router
        self.executor = executor
        self.desc = desc
        self._channel = channel
        self._call_timeout_s = call_timeout_s
        self._transport = transport
        self._links: dict[str, _Link] = {}  # by instance id
        self._lock = asyncio.Lock()
        self._failing: dict[str, str] = {}  # address -> why it last failed to join

    @property
    def addresses(self) -> dict[str, str]:
        """The address of each store in, by instance id."""
        return {i: link.address for i, link in self._links.items()}

    @property
    def backends(self) -> set[str]:
        """The index backends of the stores in."""
        return {link.index_backend for link in self._links.values()}

    async def join(self, address: str, wait_s: float = 0.0) -> StoreIdentity:
        """Adds the store at `address`; `wait_s` > 0 waits that long for one still starting.
        Raises StoreRefused, or grpc.aio.AioRpcError if it (or the executor) does not
        answer; then nothing changed."""
        async with self._lock:
            return await self._join(address, wait_s)

    async def leave(self, instance_id: str) -> None:
        async with self._lock:
            await self._leave(instance_id)

    async def restarted(self, identity: StoreIdentity) -> None:
        """The store came back with the arena `identity` names: it is replaced."""
        async with self._lock:
            link = self._links.get(identity.instance_id)
            if link is None or self._identity(identity.instance_id) == identity:
                return  # already replaced, or gone
            await self._leave(identity.instance_id)
            await self._join_logged(link.address)

    async def sync(self, entries: Mapping[str, InstanceEntry], now: float) -> None:
        """Makes the stores in those of `entries` serving at `now` (a registry's)."""
        serving = {i: e for i, e in entries.items() if e.serving(now)}
        async with self._lock:
            for instance_id, link in list(self._links.items()):
                entry = serving.get(instance_id)
                identity = self._identity(instance_id)
                if entry is None or entry.address != link.address or (
                        identity is not None and entry.arena_name != identity.arena_name):
                    await self._leave(instance_id)
            for instance_id, entry in serving.items():
                if instance_id not in self._links:
                    await self._join_logged(entry.address)

    async def probe(self) -> None:
        """Forever: probes down stores, so that one which answers again is used with no
        request's help, and replaces one that answers with a new arena."""
        while True:
            await asyncio.sleep(self.router.retry_s / 5)
            for identity in await self.router.probe_down():
                await self.restarted(identity)

    async def watch(self, client: AsyncRedisClient, poll_s: float = 1.0) -> None:
        """Forever: follows the registry of the stores serving the executor's model."""
        readable = True
        while True:
            await asyncio.sleep(poll_s)
            was, readable = readable, await self.watch_once(client, quiet=not readable)
            if readable and not was:
                log.info("KV store registry readable again")

    async def watch_once(self, client: AsyncRedisClient, quiet: bool = False) -> bool:
        """One read of the registry, and `sync`; False if Redis did not answer."""
        try:
            raw = await client.hgetall(Namespace(self.desc.model_fingerprint, "").registry)
        except redis.RedisError as e:
            if not quiet:
                log.warning("KV store registry unreadable (%s): keeping the %d stores known",
                            e, len(self._links))
            return False
        await self.sync(parse_entries(raw), time.time())
        return True

    async def close(self) -> None:
        for link in self._links.values():
            link.mapped.close()
            await link.channel.close()
        self._links.clear()

    def _identity(self, instance_id: str) -> StoreIdentity | None:
        return next((s.identity for s in self.router.stores
                     if s.identity.instance_id == instance_id), None)

    async def _join_logged(self, address: str) -> None:
        """Joins, or logs why not (once per address and reason): the next sync retries."""
        try:
            await self._join(address, 0.0)
        except (StoreRefused, grpc.aio.AioRpcError) as e:
            why = str(e) if isinstance(e, StoreRefused) else f"{e.code().name} {e.details()}"
            if self._failing.get(address) != why:
                log.warning("KV store %s cannot join yet: %s", address, why)
            self._failing[address] = why
        else:
            self._failing.pop(address, None)

    async def _join(self, address: str, wait_s: float) -> StoreIdentity:
        channel = self._channel(address)
        try:
            store: kv.DescribeResponse = await kv_grpc.KVStoreStub(channel).Describe(
                kv.DescribeRequest(), timeout=wait_s or self._call_timeout_s,
                wait_for_ready=wait_s > 0)
            self._check(address, store)
            client = RemoteHostKV(channel, fingerprint=self.desc.model_fingerprint,
                                  timeout_s=self._call_timeout_s)
            mapped = await map_store(self.executor, channel, store, client,
                                     transport=self._transport, timeout_s=self._call_timeout_s)
        except BaseException:
            await channel.close()
            raise
        identity = StoreIdentity(store.instance_id, store.arena_name)
        routed = RoutedStore(mapped.client, identity, mapped.first_block, mapped.mapped_arena)
        self.router.add(routed)  # cannot fail: _check refused a taken id, slots last for ages
        self._links[identity.instance_id] = _Link(address, channel, store.index_backend, mapped)
        log.info("KV store %s at %s joined: arena %s, host blocks %d..%d (%s index)",
                 identity.instance_id, address, routed.arena, mapped.first_block,
                 mapped.first_block + store.num_blocks - 1, store.index_backend)
        return identity

    def _check(self, address: str, store: kv.DescribeResponse) -> None:
        geometry = self.desc.geometry
        if store.block_bytes != geometry.block_bytes or store.block_size != geometry.block_size:
            raise StoreRefused(
                f"kvstore {address} blocks ({store.block_size} tokens, {store.block_bytes} B) "
                f"differ from the executor's ({geometry.block_size} tokens, "
                f"{geometry.block_bytes} B)")
        if store.model_fingerprint != self.desc.model_fingerprint:
            raise StoreRefused(
                f"kvstore {address} holds KV of model {store.model_fingerprint[:16]}, the "
                f"executor runs {self.desc.model_fingerprint[:16]}")
        taken = self._links.get(store.instance_id)
        if taken is not None:
            raise StoreRefused(f"kvstore {address} is instance {store.instance_id!r}, which "
                               f"{taken.address} is already")

    async def _leave(self, instance_id: str) -> None:
        link = self._links.pop(instance_id)
        routed = self.router.remove(instance_id)
        try:
            await self.executor.DetachHostArena(
                ex.DetachHostArenaRequest(name=routed.arena), timeout=10)
        except grpc.aio.AioRpcError as e:
            # NOT_FOUND: the executor restarted since and never mapped it; otherwise it is
            # unavailable, and a restarted one will not map it either.
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                log.warning("could not unmap arena %s: %s", routed.arena, e.details())
        link.mapped.close()
        await link.channel.close()
        log.info("KV store %s at %s left: arena %s unmapped; its conversations move to the "
                 "others", instance_id, link.address, routed.arena)
