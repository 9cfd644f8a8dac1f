"""StoreMembership's failure paths, against real KV stores served in-process and an
executor that refuses on demand: a restart whose new arena cannot be mapped yet, a store
that leaves while a batch is out, lease expiry against a store that still answers, a
registry entry naming the wrong store, an unmap the executor cannot take."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import grpc
import pytest
import redis

from common.kv.block_hash import block_hashes
from common.kv.host_ops import Commit, Reserve, Reserved, unanswered
from protos import executor_pb2 as ex
from services.kvstore.redis_connect import async_redis_client
from services.kvstore.redis_storage import Namespace
from services.kvstore.registry import InstanceEntry
from services.scheduler.host_router import HostRouter
from services.scheduler.remote_host import RemoteHostKV
from services.scheduler.store_membership import StoreMembership
from tests.support.redis_server import RedisServer
from tests.support.stores import Geometry, InProcessStore, store_starter

FP = "model-m"
GEOMETRY = Geometry(num_blocks=8, block_bytes=4096, block_size=4, fingerprint=FP)
TOKENS = list(range(8))


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "refused")


class FakeExecutor:
    """Maps arenas one after another, as the executor does, unless told to refuse."""

    def __init__(self) -> None:
        self.mapped: dict[str, int] = {}
        self.next_block = 0
        self.refuse: grpc.StatusCode | None = None

    async def AttachHostArena(self, request: ex.AttachHostArenaRequest,
                              timeout: float | None = None) -> ex.AttachHostArenaResponse:
        if self.refuse is not None:
            raise rpc_error(self.refuse)
        if request.name not in self.mapped:
            self.mapped[request.name] = self.next_block
            self.next_block += GEOMETRY.num_blocks
        return ex.AttachHostArenaResponse(num_host_blocks=GEOMETRY.num_blocks,
                                          first_host_block=self.mapped[request.name])

    async def DetachHostArena(self, request: ex.DetachHostArenaRequest,
                              timeout: float | None = None) -> ex.DetachHostArenaResponse:
        if self.refuse is not None:
            raise rpc_error(self.refuse)
        if self.mapped.pop(request.name, None) is None:
            raise rpc_error(grpc.StatusCode.NOT_FOUND)
        return ex.DetachHostArenaResponse()


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., object]]:
    async with store_starter(GEOMETRY, "fastswitch-membertest") as run:
        yield run


@pytest.fixture
def executor() -> FakeExecutor:
    return FakeExecutor()


@pytest.fixture
async def membership(executor: FakeExecutor) -> AsyncIterator[StoreMembership]:
    desc = ex.DescribeResponse(model_fingerprint=FP, geometry=ex.BlockGeometry(
        block_size=GEOMETRY.block_size, block_bytes=GEOMETRY.block_bytes))
    router = HostRouter(fingerprint=FP, block_size=GEOMETRY.block_size, retry_s=0.0)
    m = StoreMembership(router, executor, desc, grpc.aio.insecure_channel,  # type: ignore[arg-type]
                        call_timeout_s=2.0)
    yield m
    await m.close()


def entry(store: InProcessStore, lease_until: float) -> InstanceEntry:
    s = store.server.store
    return InstanceEntry(instance_id=s.instance_id, arena_name=s.arena.name, host="h",
                         num_blocks=GEOMETRY.num_blocks, block_bytes=GEOMETRY.block_bytes,
                         block_size=GEOMETRY.block_size, address=store.address,
                         lease_until=lease_until)


async def reserve(router: HostRouter, conv: str) -> Reserved:
    [reply] = await router.execute([Reserve(1, conv, tuple(block_hashes(TOKENS, 4, FP)), 8)])
    assert isinstance(reply, Reserved)
    return reply


async def test_a_restarted_store_stays_down_until_its_new_arena_can_be_mapped(
    start: Callable[..., object], membership: StoreMembership, executor: FakeExecutor,
) -> None:
    old = await start(name="fastswitch-membertest-restart")
    await membership.join(old.address)
    port = int(old.address.rsplit(":", 1)[1])
    await old.stop()
    new = await start(name="fastswitch-membertest-restart", port=port)  # a new arena
    assert new.identity != old.identity and new.identity.instance_id == old.identity.instance_id
    assert (await reserve(membership.router, "c")).reservation is None  # marks it down
    executor.refuse = grpc.StatusCode.UNAVAILABLE  # the executor is restarting, say
    await membership.probe_once()
    assert membership.router.arenas == (old.identity.arena_name,)  # kept, down
    assert membership.router.degraded
    executor.refuse = None
    await membership.probe_once()  # named again, and now replaced
    assert membership.router.arenas == (new.identity.arena_name,)
    assert list(executor.mapped) == [new.identity.arena_name]  # the old one unmapped
    assert not membership.router.degraded
    assert (await reserve(membership.router, "c")).reservation is not None


async def test_a_store_that_leaves_while_a_batch_is_out_answers_nothing(
    start: Callable[..., object], membership: StoreMembership,
) -> None:
    store = await start()
    await membership.join(store.address)
    run = store.server.servicer.run

    async def slow(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.3)
        return await run(*args, **kwargs)  # type: ignore[arg-type]

    store.server.servicer.run = slow  # type: ignore[method-assign]
    batch = asyncio.create_task(reserve(membership.router, "c"))
    await asyncio.sleep(0.1)
    await membership.leave(store.identity.instance_id)
    assert (await batch).reservation is None  # its answer came from a store that left
    assert membership.router.stores == () and membership.router.degraded
    assert await membership.router.execute([Commit(1)]) == []  # nowhere to go


async def test_a_closed_channel_is_an_unanswered_batch_not_an_error(
    start: Callable[..., object],
) -> None:
    store = await start()
    channel = grpc.aio.insecure_channel(store.address)
    client = RemoteHostKV(channel, store.identity, fingerprint=FP, timeout_s=2.0)
    ops = [Reserve(1, "c", tuple(block_hashes(TOKENS, 4, FP)), 8)]
    run = store.server.servicer.run

    async def slow(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.3)
        return await run(*args, **kwargs)  # type: ignore[arg-type]

    store.server.servicer.run = slow  # type: ignore[method-assign]
    batch = asyncio.create_task(client.execute(ops))
    await asyncio.sleep(0.1)
    await channel.close()  # no grace: the call in flight is cancelled
    assert await batch == unanswered(ops)
    assert await client.execute(ops) == unanswered(ops)  # closed: UsageError


async def test_a_lapsed_lease_keeps_a_store_that_still_answers(
    start: Callable[..., object], membership: StoreMembership,
) -> None:
    store = await start()
    now = time.time()
    await membership.sync({store.identity.instance_id: entry(store, now + 6)}, now)
    assert membership.router.arenas == (store.identity.arena_name,)
    lapsed = {store.identity.instance_id: entry(store, now - 1)}  # Redis was away, say
    await membership.sync(lapsed, now)
    assert membership.router.arenas == (store.identity.arena_name,)
    await store.stop()
    await membership.sync(lapsed, now)  # lapsed and silent: it leaves
    assert membership.router.arenas == ()


async def test_a_registry_entry_must_name_the_store_at_its_address(
    start: Callable[..., object], membership: StoreMembership,
) -> None:
    store = await start()
    now = time.time()
    wrong = entry(store, now + 6)
    await membership.sync({"someone-else": wrong}, now)
    assert membership.router.arenas == ()
    await membership.sync({store.identity.instance_id: wrong}, now)
    assert membership.router.arenas == (store.identity.arena_name,)


async def test_an_unmap_the_executor_cannot_take_is_retried(
    start: Callable[..., object], membership: StoreMembership, executor: FakeExecutor,
) -> None:
    store = await start()
    await membership.join(store.address)
    executor.refuse = grpc.StatusCode.UNAVAILABLE
    await membership.leave(store.identity.instance_id)
    assert membership.router.arenas == () and list(executor.mapped) == [
        store.identity.arena_name]
    executor.refuse = None
    await membership.probe_once()
    assert executor.mapped == {}


async def test_the_watcher_skips_a_registry_entry_it_cannot_read(
    start: Callable[..., object], membership: StoreMembership, redis_server: RedisServer,
) -> None:
    store = await start()
    key = Namespace(FP, "").registry
    index = redis.Redis(port=redis_server.port)
    index.delete(key)
    index.hset(key, mapping={
        "from-the-future": json.dumps({"instance_id": "x", "new_field": 1}),
        "garbage": "{not json",
        store.identity.instance_id: json.dumps(asdict(entry(store, time.time() + 6))),
    })
    client = async_redis_client(redis_server.url)
    try:
        assert await membership.watch_once(client)
    finally:
        await client.aclose()
        index.delete(key)
    assert membership.router.arenas == (store.identity.arena_name,)
