"""Which KV stores the scheduler uses, and the executor's arenas for them.

The driver side of `HostRouter`'s membership. `join` connects to a store, checks its blocks
and model against the executor's, has the executor map its arena (or, for a store on
another host, a local mirror of it: `remote_tier`) and adds it to the router; `leave`
removes a store, lets its batches in flight end, and has the executor unmap its arena
(swaps in flight finish first; later ones into it are refused, and their requests
recompute), retrying an unmap the executor could not take; `restarted` replaces a store
that came back with a new arena: the new one is mapped first, and only then does the old
one leave, so a store that cannot be mapped yet stays down and is tried again. Changes
hold the router's lock, which the engine's remap after an executor restart holds too.

Stores come from a fixed address list (`--kvstore a,b`), joined at start and kept: a store
that stops is down and probed (`probe`), never removed. Or from the Redis registry the
stores share (`--kvstore redis://...`): `watch` reads it every `poll_s`; an entry serving
at an address joins (if the store there is the one the entry names), one that is gone
leaves, one with a new arena or address is replaced, and one whose lease ran out leaves
unless the store still answers with its arena (its heartbeats may only have missed an
unreachable Redis). A Redis that does not answer changes nothing: the stores known stay,
down or up as they answer. Only entries under the stack's namespace are read. `renew`
renews the stores' leases of what the scheduler holds. The background loops log what fails
and go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
import redis

from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.kvstore.redis_storage import AsyncRedisClient, Namespace
from services.kvstore.registry import InstanceEntry, parse_entries
from services.scheduler.host_router import HostRouter, RoutedStore
from services.scheduler.host_tier import HostTier
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity
from services.scheduler.remote_tier import Transport, map_store

log = logging.getLogger("fastswitch.scheduler.kvstore")
T = TypeVar("T")


class StoreRefused(Exception):
    """The store cannot serve this executor: other blocks, another model, a taken id."""


@dataclass(frozen=True, slots=True)
class _Link:
    address: str
    channel: grpc.aio.Channel
    index_backend: str  # "memory" or "redis"
    tier: HostTier  # closed when the store leaves
    num_blocks: int


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
        namespace: str = "",
    ) -> None:
        """`channel` opens a channel to a store's address (with the internal token and
        TLS); `call_timeout_s` is the deadline of each host-op batch; `transport` how the
        executor reaches a store's blocks; `namespace` the stack's in a shared Redis."""
        self.router = router
        self.executor = executor
        self.desc = desc
        self._channel = channel
        self._call_timeout_s = call_timeout_s
        self._transport = transport
        self._registry_key = Namespace(desc.model_fingerprint, "", namespace).registry
        self._links: dict[str, _Link] = {}  # by instance id
        self._failing: dict[str, str] = {}  # address -> why it last failed to join
        self._unmapped_late: set[str] = set()  # arenas of stores gone, still to unmap

    @property
    def backends(self) -> set[str]:
        """The index backends of the stores in."""
        return {link.index_backend for link in self._links.values()}

    async def join(self, address: str, wait_s: float = 0.0) -> StoreIdentity:
        """Adds the store at `address`; `wait_s` > 0 waits that long for one still starting.
        Raises StoreRefused, or grpc.aio.AioRpcError if it (or the executor) does not
        answer; then nothing changed."""
        async with self.router.lock:
            return await self._admit(*await self._connect(address, wait_s))

    async def leave(self, instance_id: str) -> None:
        async with self.router.lock:
            await self._leave(instance_id)

    async def restarted(self, identity: StoreIdentity) -> None:
        """The store came back with the arena `identity` names: it is replaced, once the
        new arena is mapped (until then it stays down, and `probe` names it again)."""
        async with self.router.lock:
            link = self._links.get(identity.instance_id)
            current = self.router.store(identity.instance_id)
            if link is None or current is None or current.identity == identity:
                return  # already replaced, or gone
            connected = await self._logged(link.address, self._connect(
                link.address, 0.0, replacing=identity.instance_id))
            if connected is not None:
                await self._leave(identity.instance_id)
                await self._logged(link.address, self._admit(*connected))

    async def sync(self, entries: Mapping[str, InstanceEntry], now: float) -> None:
        """Makes the stores in those that `entries` (a registry's) list as serving at
        `now`; see the module's docstring."""
        async with self.router.lock:
            for instance_id in list(self._links):
                if await self._gone(instance_id, entries.get(instance_id), now):
                    await self._leave(instance_id)
            for instance_id, entry in entries.items():
                if entry.serving(now) and instance_id not in self._links:
                    await self._logged(entry.address, self._join_as(instance_id, entry.address))

    async def probe(self) -> None:
        """Forever: probes down stores, so that one which answers again is used with no
        request's help; replaces one that answers with a new arena; retries unmaps."""
        while True:
            await asyncio.sleep(self.router.retry_s / 5)
            try:
                await self.probe_once()
            except Exception:
                log.exception("probing the KV stores failed; trying again")

    async def probe_once(self) -> None:
        for identity in await self.router.probe_down():
            await self.restarted(identity)
        async with self.router.lock:
            for name in list(self._unmapped_late):
                await self._unmap(name)

    async def renew(self, interval_s: float) -> None:
        """Forever: renews the leases on what the scheduler holds in the live stores."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.router.renew()
            except Exception:
                log.exception("renewing the KV stores' leases failed; trying again")

    async def watch(self, client: AsyncRedisClient, poll_s: float = 1.0) -> None:
        """Forever: follows the registry of the stores serving the executor's model."""
        readable = True
        while True:
            await asyncio.sleep(poll_s)
            was = readable
            try:
                readable = await self.watch_once(client, quiet=not readable)
            except Exception:
                log.exception("following the KV store registry failed; trying again")
            if readable and not was:
                log.info("KV store registry readable again")

    async def watch_once(self, client: AsyncRedisClient, quiet: bool = False) -> bool:
        """One read of the registry, and `sync`; False if Redis did not answer."""
        try:
            raw = await client.hgetall(self._registry_key)
        except redis.RedisError as e:
            if not quiet:
                log.warning("KV store registry unreadable (%s): keeping the %d stores known",
                            e, len(self._links))
            return False
        await self.sync(parse_entries(raw), time.time())
        return True

    async def close(self) -> None:
        for link in self._links.values():
            await link.channel.close()
            link.tier.close()
        self._links.clear()

    async def _gone(self, instance_id: str, entry: InstanceEntry | None, now: float) -> bool:
        """The store in under `instance_id` is no longer the one `entry` lists: none is
        listed, or with another address or arena, or its lease ran out and it does not
        answer with its arena."""
        store = self.router.store(instance_id)
        if store is None or entry is None or entry.arena_name != store.identity.arena_name \
                or entry.address not in ("", self._links[instance_id].address):
            return True
        return not entry.serving(now) and await store.client.describe() != store.identity

    async def _join_as(self, instance_id: str, address: str) -> StoreIdentity:
        """Joins the store at `address` if it is `instance_id`."""
        return await self._admit(*await self._connect(address, 0.0, expect=instance_id))

    async def _logged(self, address: str, call: Awaitable[T]) -> T | None:
        """Awaits a join's step; None, logged once per address and reason, if it fails."""
        try:
            return await call
        except Exception as e:
            if isinstance(e, grpc.aio.AioRpcError):
                why = f"{e.code().name} {e.details()}"
            else:
                why = str(e) or type(e).__name__
            if self._failing.get(address) != why:
                log.warning("KV store %s cannot join yet: %s", address, why)
            self._failing[address] = why
            return None

    async def _connect(self, address: str, wait_s: float, *, expect: str | None = None,
                       replacing: str | None = None) -> tuple[_Link, RoutedStore]:
        """Describes, checks and maps the store at `address`, changing nothing else; the
        store must be `expect` if given, and may take the id of `replacing`."""
        channel = self._channel(address)
        try:
            store: kv.DescribeResponse = await kv_grpc.KVStoreStub(channel).Describe(
                kv.DescribeRequest(), timeout=wait_s or self._call_timeout_s,
                wait_for_ready=wait_s > 0)
            self._check(address, store, expect, replacing)
            client = RemoteHostKV(channel, StoreIdentity.of(store),
                                  fingerprint=self.desc.model_fingerprint,
                                  timeout_s=self._call_timeout_s)
            routed = await map_store(self.executor, channel, store, client,
                                     transport=self._transport, timeout_s=self._call_timeout_s)
        except BaseException:
            await channel.close()
            raise
        self._failing.pop(address, None)
        link = _Link(address, channel, store.index_backend, routed.tier, store.num_blocks)
        return link, routed

    async def _admit(self, link: _Link, routed: RoutedStore) -> StoreIdentity:
        """Adds a connected store to the router (its id is free: `_check`, `_leave`), or
        undoes its connection and raises StoreRefused."""
        try:
            self.router.add(routed)
        except (ValueError, RuntimeError) as e:
            await link.channel.close()
            await self._unmap(routed.arena)
            link.tier.close()
            raise StoreRefused(str(e)) from e
        self._links[routed.identity.instance_id] = link
        log.info("KV store %s at %s joined: arena %s, host blocks %d..%d (%s index)",
                 routed.identity.instance_id, link.address, routed.arena, routed.first_block,
                 routed.first_block + link.num_blocks - 1, link.index_backend)
        return routed.identity

    def _check(self, address: str, store: kv.DescribeResponse, expect: str | None,
               replacing: str | None) -> None:
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
        if expect is not None and store.instance_id != expect:
            raise StoreRefused(f"kvstore {address} is instance {store.instance_id!r}, not "
                               f"{expect!r} as its registry entry says")
        taken = self._links.get(store.instance_id)
        if taken is not None and store.instance_id != replacing:
            raise StoreRefused(f"kvstore {address} is instance {store.instance_id!r}, which "
                               f"{taken.address} is already")

    async def _leave(self, instance_id: str) -> None:
        link = self._links.pop(instance_id)
        routed = self.router.remove(instance_id)
        await link.channel.close(grace=self._call_timeout_s)  # its batches out end first
        await self._unmap(routed.arena)
        link.tier.close()
        log.info("KV store %s at %s left: arena %s unmapped; its conversations move to the "
                 "others", instance_id, link.address, routed.arena)

    async def _unmap(self, name: str) -> None:
        """Has the executor unmap `name`; one it cannot reach now is retried by `probe`."""
        try:
            await self.executor.DetachHostArena(ex.DetachHostArenaRequest(name=name), timeout=10)
        except grpc.aio.AioRpcError as e:
            # NOT_FOUND: a restarted executor, which never mapped it.
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                if name not in self._unmapped_late:
                    log.warning("could not unmap arena %s yet: %s", name, e.details())
                self._unmapped_late.add(name)
                return
        self._unmapped_late.discard(name)
