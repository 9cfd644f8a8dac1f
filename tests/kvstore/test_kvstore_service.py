"""The KV store over real gRPC: status codes, the bulk byte API, leases, health, reflection,
and the Batch RPC through the scheduler's client (`RemoteHostKV`)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.kv.block_hash import block_hashes
from common.kv.host_ops import (
    MISS,
    Abort,
    Commit,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
    unanswered,
)
from common.kv.reuse_index import ID_BITS, PinHandle
from common.shm.arena import SHM_DIR
from protos import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.batch_wire import replies_from_proto
from services.kvstore.bulk import CHUNK_BYTES, checksum, from_proto, to_proto, write_chunks
from services.kvstore.service import HEARTBEAT_S, LEASE_BEATS, SERVICE_NAME
from services.scheduler.host_router import HostRouter, RoutedStore, rendezvous_owner
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity
from tests.support.redis_server import RedisServer
from tests.support.stores import BatchCalls, Geometry, InProcessStore, store_starter

FP = "model-a"
BLOCK_SIZE = 4
BLOCK_BYTES = 384 * 1024  # three blocks span more than one 1 MiB chunk
NUM_BLOCKS = 6



async def expect_status(code: grpc.StatusCode, call: object, match: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()
    return info.value.details()


async def held(stub: kvstore_pb2_grpc.KVStoreStub) -> tuple[int, int, int]:
    """Blocks used, blocks pinned, reservations pending."""
    s = await stub.Stats(kvstore_pb2.StatsRequest())
    return s.used_blocks, s.pinned_blocks, s.pending_reservations


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., object]]:
    async with store_starter(Geometry(NUM_BLOCKS, BLOCK_BYTES, BLOCK_SIZE, FP)) as run:
        yield functools.partial(run, reap_interval=0.05)


async def test_error_codes(start: Callable[..., object]) -> None:
    running = await start()
    stub, calls = running.stub, running.calls()
    res = await calls.reserve("c", list(range(8)))
    await calls(Commit(res.reservation_id))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    other = BatchCalls(stub, "other", BLOCK_SIZE, "other-client")
    await expect_status(invalid, stub.Batch(other.request(calls.pin_op("c", [1]))), "other")
    await expect_status(invalid, calls(Reserve(1, "c", (), 0)), "empty token list")
    no_client = calls.request(Release("c"))
    no_client.client_id = ""
    await expect_status(invalid, stub.Batch(no_client), "client id")
    no_id = calls.request(Release("c"))
    no_id.request_id = 0
    await expect_status(invalid, stub.Batch(no_id), "request ids start at 1")
    far = kvstore_pb2.ReadBlocksRequest(extents=[kvstore_pb2.Extent(start=5, length=2)])
    await expect_status(invalid, stub.ReadBlocks(far).read(), "exceeds")
    empty = kvstore_pb2.ReadBlocksRequest(extents=[kvstore_pb2.Extent(start=0, length=0)])
    await expect_status(invalid, stub.ReadBlocks(empty).read(), "bad extent")
    # The arena holds 6 blocks: 2 committed and pinned, 4 in a pending reservation.
    await calls.pin("c", list(range(8)))
    await calls.reserve("d", list(range(100, 116)))
    assert not (await calls.reserve("e", [1])).ok  # no room: recompute instead
    assert await held(stub) == (6, 2, 1)


async def test_another_clients_abort_is_refused_and_its_owner_still_commits(
    start: Callable[..., object],
) -> None:
    running = await start()
    owner, other = running.calls("scheduler-a"), running.calls("scheduler-b")
    res = await owner.reserve("c", list(range(8)))
    pin = await owner.pin("c", list(range(8)))
    before = await held(running.stub)
    denied = grpc.StatusCode.PERMISSION_DENIED
    for op in (Abort(res.reservation_id), Commit(res.reservation_id), Unpin(pin.pin_id)):
        await expect_status(denied, other(Release("c"), op), "another client")
    await expect_status(denied, other(renew_reservations=[res.reservation_id]), "another client")
    chunks = write_chunks("scheduler-b", res.reservation_id, from_proto(res.new_extents),
                          bytes(2 * BLOCK_BYTES))
    await expect_status(denied, running.stub.WriteBlocks(iter(list(chunks))), "another client")
    assert await held(running.stub) == before
    await owner(Commit(res.reservation_id), Unpin(pin.pin_id))
    assert (await owner.pin("c", list(range(8)))).valid_tokens == 8


async def test_a_repeated_request_is_done_once_and_an_abandoned_one_never(
    start: Callable[..., object],
) -> None:
    running = await start()
    calls = running.calls()
    request = calls.request(calls.reserve_op("c", list(range(8))))
    first = await running.stub.Batch(request)
    assert await running.stub.Batch(request) == first  # answered again, not done twice
    assert await held(running.stub) == (2, 0, 1)
    late = calls.request(calls.reserve_op("d", list(range(8))))
    await calls(abandon=[request.request_id, late.request_id])
    assert await held(running.stub) == (0, 0, 0)
    for abandoned in (request, late):
        await expect_status(grpc.StatusCode.ABORTED, running.stub.Batch(abandoned), "abandoned")
    assert await held(running.stub) == (0, 0, 0)


async def test_bulk_write_then_read_is_bit_identical(start: Callable[..., object]) -> None:
    running = await start()
    stub, calls = running.stub, running.calls()
    res = await calls.reserve("c", list(range(12)))
    extents = from_proto(res.new_extents)
    data = np.random.default_rng(0).integers(0, 256, 3 * BLOCK_BYTES, np.uint8).tobytes()
    chunks = list(write_chunks(calls.client_id, res.reservation_id, extents, data))
    assert len(chunks) == 2 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    written = await stub.WriteBlocks(iter(chunks))
    assert written.bytes_written == len(data)
    await calls(Commit(res.reservation_id))
    hit = await calls.pin("c", list(range(12)))
    read = b""
    async for chunk in stub.ReadBlocks(kvstore_pb2.ReadBlocksRequest(extents=hit.extents)):
        assert chunk.offset == len(read) and chunk.crc32c == checksum(chunk.data)
        read += chunk.data
    assert read == data


async def test_writes_land_only_in_a_pending_reservations_new_blocks(
    start: Callable[..., object],
) -> None:
    running = await start()
    stub, calls = running.stub, running.calls()
    res = await calls.reserve("c", list(range(4)))
    await calls(Commit(res.reservation_id))
    committed = from_proto(res.new_extents)
    junk = b"\x01" * BLOCK_BYTES
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.WriteBlocks(iter(list(write_chunks(calls.client_id, res.reservation_id,
                                                committed, junk)))),
        "no pending reservation",
    )
    other = await calls.reserve("d", list(range(50, 54)))
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.WriteBlocks(iter(list(write_chunks(calls.client_id, other.reservation_id,
                                                committed, junk)))),
        "not distinct new blocks",
    )
    read = stub.ReadBlocks(kvstore_pb2.ReadBlocksRequest(extents=res.new_extents))
    assert b"".join([c.data async for c in read]) == bytes(BLOCK_BYTES)


async def test_a_dead_clients_reservation_times_out_and_a_renewed_one_does_not(
    start: Callable[..., object],
) -> None:
    running = await start(lease_seconds=0.3)
    dead, alive = running.calls("dead"), running.calls("alive")
    await dead.reserve("c", list(range(16)))
    kept = await alive.reserve("d", list(range(4)))
    deadline = time.monotonic() + 5
    while (await held(running.stub))[2] > 1:  # the reaper runs every 50 ms
        assert time.monotonic() < deadline, "the dead client's reservation stayed"
        renewed = await alive(renew_reservations=[kept.reservation_id])
        assert list(renewed.lapsed_reservations) == []
        await asyncio.sleep(0.05)
    assert await held(running.stub) == (1, 0, 1)
    await alive(Commit(kept.reservation_id))
    assert (await alive.pin("d", list(range(4)))).valid_tokens == 4


async def test_health_reflection_and_describe(start: Callable[..., object]) -> None:
    running = await start()
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    call = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]))
    names = [s.name async for r in call for s in r.list_services_response.service]
    assert SERVICE_NAME in names
    desc = await running.stub.Describe(kvstore_pb2.DescribeRequest())
    assert (desc.num_blocks, desc.block_bytes, desc.block_size) == (NUM_BLOCKS, BLOCK_BYTES, 4)
    assert desc.index_backend == "memory" and (SHM_DIR / desc.arena_name).exists()


async def test_redis_outage_is_unavailable_and_the_store_recovers(
    start: Callable[..., object], redis_server: RedisServer
) -> None:
    server = redis_server
    try:
        calls = (await start(redis_url=server.url)).calls()
        res = await calls.reserve("c", list(range(8)))
        await calls(Commit(res.reservation_id))
        await calls.reserve("x", list(range(4)))  # waits for c's commit
        server.stop()
        # A call that stages no write needs no Redis; a commit answers before its write
        # lands; a reply that hands out blocks waits for it, and its failed round leaves
        # the index behind, so every call fails until Redis is back.
        res = await calls.reserve("d", list(range(4)))
        await calls(Commit(res.reservation_id))
        await expect_status(grpc.StatusCode.UNAVAILABLE, calls.reserve("e", list(range(4))))
        await expect_status(grpc.StatusCode.UNAVAILABLE, calls.pin("c", list(range(8))))
        server.start()
        assert (await calls.pin("c", list(range(8)))).valid_tokens == 8
    finally:
        server.start()  # back for the module's other tests


async def test_blocks_are_handed_out_only_once_their_old_chain_is_gone_from_redis(
    start: Callable[..., object], redis_server: RedisServer
) -> None:
    """A release's write is not awaited, but the next Reserve waits for it: were it to
    answer first, a store restarted before the write landed would serve the released
    chain over the new reservation's bytes."""
    calls = (await start(redis_url=redis_server.url)).calls()
    convs = [f"full-{i}" for i in range(NUM_BLOCKS - 1)]  # a block each
    for conv in convs:
        res = await calls.reserve(conv, list(range(4)))
        await calls(Commit(res.reservation_id))
    await calls.reserve("flush", list(range(4)))  # the last block: lands them
    index = redis.Redis(port=redis_server.port)
    released = f"fastswitch:kv:{{{FP}:{convs[0]}}}"
    assert index.keys(f"{released}*")
    index.client_pause(300, all=False)  # writes stall for 0.3 s
    await calls(Release(convs[0]))
    res = await calls.reserve("taker", list(range(4)))  # takes its block
    assert res.new_extents
    assert not index.keys(f"{released}*")


def round_trips(server: RedisServer) -> int:
    """MULTI/EXEC transactions the server has run so far."""
    stats = redis.Redis(port=server.port).info("commandstats")
    return stats.get("cmdstat_exec", {}).get("calls", 0)


async def test_concurrent_calls_share_redis_round_trips(
    start: Callable[..., object], redis_server: RedisServer
) -> None:
    calls = (await start(redis_url=redis_server.url)).calls()
    convs = [f"c{i}" for i in range(NUM_BLOCKS)]  # a block each
    reserved = await asyncio.gather(*(calls.reserve(c, list(range(4))) for c in convs))
    before = round_trips(redis_server)
    await asyncio.gather(*(calls(Commit(r.reservation_id)) for r in reserved))
    assert round_trips(redis_server) - before < len(convs)  # group-committed
    pins = await asyncio.gather(*(calls.pin(c, list(range(4))) for c in convs))
    assert all(p.valid_tokens == 4 for p in pins)
    await calls(Release(convs[0]), *(Unpin(p.pin_id) for p in pins))
    await calls.reserve("next", list(range(4)))  # waits for what came before
    keys = redis.Redis(port=redis_server.port).keys(f"fastswitch:kv:{{{FP}:c*")
    assert len(keys) == len(convs) - 1  # every commit, and the release, landed before it


@pytest.mark.parametrize("index", ["redis_server", "redis_cluster"])
async def test_a_serving_store_registers_its_address_under_a_lease(
    start: Callable[..., object], index: str, request: pytest.FixtureRequest
) -> None:
    running = await start(redis_url=request.getfixturevalue(index).url)
    store = running.server.store
    registry = store.backend.registry
    for _ in range(100):
        entry = registry.own()
        if entry is not None and entry.address:
            break
        await asyncio.sleep(0.02)
    assert entry is not None and entry.arena_name == store.arena.name
    async with grpc.aio.insecure_channel(entry.address) as channel:  # the address serves it
        desc = await kvstore_pb2_grpc.KVStoreStub(channel).Describe(kvstore_pb2.DescribeRequest())
    assert desc.instance_id == store.instance_id
    assert time.time() < entry.lease_until <= time.time() + HEARTBEAT_S * LEASE_BEATS


# --- Batch: a scheduler's host intents, by hash chain -----------------------------------


def chain_of(tokens: list[int]) -> tuple[bytes, ...]:
    return tuple(block_hashes(tokens, BLOCK_SIZE, FP))


def client_of(running: InProcessStore) -> RemoteHostKV:
    return running.client()


async def test_a_batch_is_one_round_trip_answered_in_order(start: Callable[..., object]) -> None:
    running = await start()
    client, stub = client_of(running), running.stub
    desc = await stub.Describe(kvstore_pb2.DescribeRequest())
    tokens = list(range(10))
    assert client.identity == StoreIdentity(desc.instance_id, desc.arena_name)
    [reserved, missed] = await client.execute([Reserve(1, "c", chain_of(tokens), 10),
                                               Pin(2, "d", chain_of([5]), 1)])
    res = reserved.reservation
    assert (res.conversation, res.num_tokens, res.valid_tokens) == ("c", 10, 0)
    assert len(res.new_blocks) == 3 and missed.hit == MISS
    data = np.random.default_rng(1).integers(0, 256, 3 * BLOCK_BYTES, np.uint8).tobytes()
    await stub.WriteBlocks(iter(list(write_chunks(client.client_id, res.reservation_id,
                                                  res.new_extents, data))))
    [pinned] = await client.execute([Commit(res.reservation_id),
                                     Pin(3, "c", chain_of(tokens), 10)])
    assert pinned.hit.num_tokens == 10 and pinned.hit.blocks == res.new_blocks
    assert pinned.holder == desc.instance_id
    read = stub.ReadBlocks(kvstore_pb2.ReadBlocksRequest(extents=to_proto(res.new_extents)))
    assert b"".join([c.data async for c in read]) == data
    assert await client.execute([Unpin(pinned.pin.pin_id), Unpin(pinned.pin.pin_id),
                                 Unpin(missed.pin.pin_id), Abort(999), Release("c")]) == []
    stats = await stub.Stats(kvstore_pb2.StatsRequest())
    assert (stats.used_blocks, stats.pinned_blocks, stats.pending_reservations) == (0, 0, 0)


async def test_a_bad_batch_is_invalid_argument_and_changes_nothing(
    start: Callable[..., object],
) -> None:
    running = await start()
    stub, calls = running.stub, running.calls()
    good = Reserve(1, "c", chain_of(list(range(8))), 8)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for bad, match in [
        (Pin(2, "c", chain_of([1, 2, 3, 4, 5]), 4), "2 hashes for 4 tokens"),
        (Reserve(2, "c", (b"short",), 3), "16 bytes"),
        (Pin(2, "", chain_of([1]), 1), "empty conversation"),
        (Pin(1, "d", chain_of([1]), 1), "op id 1 repeats"),
        (Abort(0), "start at 1"),
    ]:
        await expect_status(invalid, calls(good, bad), match)
    other = BatchCalls(stub, "other", BLOCK_SIZE, "other-client").request(good)
    await expect_status(invalid, stub.Batch(other), "other")
    unset = calls.request(good)
    unset.ops.append(kvstore_pb2.BatchOp())
    await expect_status(invalid, stub.Batch(unset), "names no operation")
    stats = await stub.Stats(kvstore_pb2.StatsRequest())
    assert (stats.used_blocks, stats.pending_reservations, stats.miss_tokens) == (0, 0, 0)


async def test_a_full_store_answers_no_room_and_a_dead_one_unanswered(
    start: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    running = await start()
    client = client_of(running)
    many = list(range(BLOCK_SIZE * NUM_BLOCKS + 1))
    answer = await client.execute([Reserve(1, "c", chain_of(many), len(many))])
    assert answer == [Reserved(1, None)]
    unreachable: list[str] = []
    async with grpc.aio.insecure_channel("127.0.0.1:1") as nowhere:  # nothing listens
        dead = RemoteHostKV(nowhere, client.identity, fingerprint=FP, timeout_s=5.0)
        dead.on_down = unreachable.append
        ops = [Pin(2, "c", chain_of([1]), 1), Release("c"), Reserve(3, "d", chain_of([1]), 1)]
        for _ in range(2):
            assert await dead.execute(ops) == unanswered(ops)
        assert unreachable == ["is unreachable"] * 2
        assert len([r for r in caplog.records if "Batch failed" in r.message]) == 1
        assert await dead.describe() is None


@pytest.mark.parametrize("index", ["redis_server", "redis_cluster"])
async def test_a_batch_pin_on_another_instance_names_the_holder(
    start: Callable[..., object], index: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(index).url
    a, b = await start(redis_url=url), await start(redis_url=url)
    tokens = list(range(8))
    on_a = client_of(a)
    [reserved] = await on_a.execute([Reserve(1, "c", chain_of(tokens), 8)])
    # The commit's write lands with a's next round, which a reply handing out blocks
    # waits for.
    await on_a.execute([Commit(reserved.reservation.reservation_id),
                        Reserve(3, "d", chain_of(tokens), 8)])
    [pinned] = await client_of(b).execute([Pin(2, "c", chain_of(tokens), 8)])
    assert pinned.hit == MISS  # b holds none of it itself
    assert pinned.holder == a.server.store.instance_id


async def test_a_router_over_two_stores_sends_one_batch_each(
    start: Callable[..., object],
) -> None:
    stores = [await start(), await start()]
    routed = [RoutedStore(client_of(running), k * NUM_BLOCKS)
              for k, running in enumerate(stores)]
    router = HostRouter(routed, fingerprint=FP, block_size=BLOCK_SIZE)
    ids = [r.identity.instance_id for r in routed]
    convs = [next(c for c in (f"conv-{n}" for n in range(100))
                  if rendezvous_owner(c, ids) == owner) for owner in ids]
    tokens = list(range(8))
    replies = await router.execute(
        [Reserve(k, c, chain_of(tokens), 8) for k, c in enumerate(convs)])
    for k, reply in enumerate(replies):
        res = reply.reservation
        assert all(k * NUM_BLOCKS <= b < (k + 1) * NUM_BLOCKS for b in res.new_blocks)
        assert res.reservation_id >> ID_BITS == k  # the store's slot
    pins = await router.execute([
        *(Commit(r.reservation.reservation_id) for r in replies),
        *(Pin(10 + k, c, chain_of(tokens), 8) for k, c in enumerate(convs))])
    assert [p.hit.blocks for p in pins] == [r.reservation.new_blocks for r in replies]
    await router.execute([*(Unpin(p.pin.pin_id) for p in pins), *(Release(c) for c in convs)])
    for running in stores:
        stats = await running.stub.Stats(kvstore_pb2.StatsRequest())
        assert (stats.used_blocks, stats.pinned_blocks) == (0, 0)


def test_replies_that_do_not_answer_the_ops_are_refused() -> None:
    ops = [Reserve(1, "c", chain_of([1]), 1), Release("c"), Pin(2, "c", chain_of([1]), 1)]
    pinned = kvstore_pb2.BatchReply(pinned=kvstore_pb2.PinnedReply(op_id=2))
    reserved = kvstore_pb2.BatchReply(reserved=kvstore_pb2.ReservedReply(op_id=1))
    replies, holders = replies_from_proto([reserved, pinned], ops)
    assert replies == [Reserved(1, None), Pinned(2, MISS, PinHandle(0, ()))]
    assert holders == {2: ""}
    for wrong in ([reserved], [pinned, reserved], [reserved, reserved]):
        with pytest.raises(ValueError, match=r"replies to|does not answer"):
            replies_from_proto(wrong, ops)


def test_replies_with_ids_over_48_bits_are_refused() -> None:
    """The router puts a store's slot above bit 48 of every id it hands the planner."""
    ops = [Reserve(1, "c", chain_of([1]), 1), Pin(2, "c", chain_of([1]), 1)]
    fits = [kvstore_pb2.BatchReply(reserved=kvstore_pb2.ReservedReply(
                op_id=1, ok=True, reservation_id=(1 << ID_BITS) - 1)),
            kvstore_pb2.BatchReply(pinned=kvstore_pb2.PinnedReply(op_id=2))]
    replies_from_proto(fits, ops)
    wide_reservation = kvstore_pb2.BatchReply(reserved=kvstore_pb2.ReservedReply(
        op_id=1, ok=True, reservation_id=1 << ID_BITS))
    wide_pin = kvstore_pb2.BatchReply(pinned=kvstore_pb2.PinnedReply(op_id=2, pin_id=1 << 60))
    for replies in ([wide_reservation, fits[1]], [fits[0], wide_pin]):
        with pytest.raises(ValueError, match="over 48 bits"):
            replies_from_proto(replies, ops)


async def test_a_round_that_fails_oddly_leaves_the_index_to_be_rewritten(
    start: Callable[..., object], redis_server: RedisServer
) -> None:
    """Not only a RedisError: whatever stops a group-commit round, its writes are not
    lost and later rounds still run."""
    running = await start(redis_url=redis_server.url)
    commit = running.server.servicer._commit
    send = commit._send
    failures = [RuntimeError("a bug in the round")]

    async def failing(writes: object) -> None:
        if failures:
            raise failures.pop()
        await send(writes)  # type: ignore[arg-type]

    commit._send = failing
    calls = running.calls()
    res = await calls.reserve("c", list(range(8)))
    await calls(Commit(res.reservation_id))
    while failures:  # the commit's round, in the background
        await asyncio.sleep(0.01)
    await calls.reserve("d", list(range(4)))  # rewrites the index
    assert redis.Redis(port=redis_server.port).keys(f"fastswitch:kv:{{{FP}:c}}*")
    assert not commit.storage.dirty


async def test_a_client_renews_what_it_holds_and_forgets_what_lapsed(
    start: Callable[..., object],
) -> None:
    running = await start(lease_seconds=0.3)
    client = client_of(running)
    tokens = list(range(8))
    [reserved, _] = await client.execute([Reserve(1, "c", chain_of(tokens), 8),
                                          Pin(2, "d", chain_of([1]), 1)])
    assert client.held == (1, 1)
    for _ in range(10):  # a second: three lease periods
        await client.renew()
        await asyncio.sleep(0.1)
    assert await held(running.stub) == (2, 0, 1)
    await client.execute([Commit(reserved.reservation.reservation_id)])
    assert client.held == (0, 1)
    await asyncio.sleep(0.5)  # the pin lapses unrenewed
    await client.renew()
    assert client.held == (0, 0)
    assert await held(running.stub) == (2, 0, 0)


async def test_a_call_that_timed_out_is_undone_by_the_next_one(
    start: Callable[..., object],
) -> None:
    """The store carries a Batch out after its caller gave up on it: the caller abandons
    it with its next call, and what it made is aborted and unpinned."""
    running = await start()
    servicer = running.server.servicer
    run = servicer.run
    done = asyncio.Event()

    async def late(*args: object, **kwargs: object) -> object:
        result = await run(*args, **kwargs)  # type: ignore[arg-type]
        done.set()
        await asyncio.sleep(2.0)  # answered after the caller's deadline
        return result

    servicer.run = late  # type: ignore[method-assign]
    # A deadline long enough for the call to reach the store on a loaded machine (a call
    # still queued when it passes is never run, and there is nothing to undo).
    client = running.client(timeout_s=1.0)
    tokens = list(range(8))
    ops = [Reserve(1, "c", chain_of(tokens), 8), Pin(2, "d", chain_of([1]), 1)]
    assert await client.execute(ops) == unanswered(ops)
    assert client.failing and client.held == (0, 0)
    await asyncio.wait_for(done.wait(), 10)
    assert await held(running.stub) == (2, 0, 1)  # done on the store, owned by no one
    servicer.run = run  # type: ignore[method-assign]
    await client.execute([Release("x")])  # carries the abandonment
    assert await held(running.stub) == (0, 0, 0)
