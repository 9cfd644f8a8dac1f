"""The KV store over real gRPC: status codes, the bulk byte API, leases, health, reflection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.shm.arena import SHM_DIR
from protos import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.assemble import open_store
from services.kvstore.bulk import CHUNK_BYTES, checksum, from_proto, write_chunks
from services.kvstore.config import StoreConfig
from services.kvstore.service import SERVICE_NAME, StoreServer
from tests.support.redis_server import RedisServer

FP = "model-a"
BLOCK_SIZE = 4
BLOCK_BYTES = 384 * 1024  # three blocks span more than one 1 MiB chunk
NUM_BLOCKS = 6



def tokens_request(conv: str, tokens: list[int], fp: str = FP) -> kvstore_pb2.TokensRequest:
    return kvstore_pb2.TokensRequest(conversation_id=conv, token_ids=tokens, model_fingerprint=fp)


async def expect_status(code: grpc.StatusCode, call: object, match: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()
    return info.value.details()


class Running:
    def __init__(self, server: StoreServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.stub = kvstore_pb2_grpc.KVStoreStub(channel)


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., object]]:
    started: list[Running] = []
    base = f"fastswitch-kvtest-{uuid.uuid4().hex[:8]}"

    async def run(redis_url: str | None = None, lease_seconds: float = 30.0) -> Running:
        config = StoreConfig(
            host="127.0.0.1", port=0, redis_url=redis_url, num_blocks=NUM_BLOCKS,
            block_bytes=BLOCK_BYTES, block_size=BLOCK_SIZE, fingerprint=FP,
            arena_name=f"{base}-{len(started)}", instance_id=f"{base}-{len(started)}",
            lease_seconds=lease_seconds,
        )
        server = StoreServer(open_store(config), reap_interval=0.05)
        port = await server.start("127.0.0.1:0")
        running = Running(server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        started.append(running)
        return running

    yield run
    for running in started:
        await running.channel.close()
        await running.server.stop(grace=0)
    assert not list(SHM_DIR.glob(f"{base}*")), "a stopped store left its arena behind"


async def test_error_codes(start: Callable[..., object]) -> None:
    stub = (await start()).stub
    res = await stub.Reserve(tokens_request("c", list(range(8))))
    await stub.Commit(kvstore_pb2.ReservationRef(reservation_id=res.reservation_id))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await expect_status(invalid, stub.Commit(kvstore_pb2.ReservationRef(
        reservation_id=res.reservation_id)), "no pending reservation")  # double commit
    await expect_status(invalid, stub.Abort(kvstore_pb2.ReservationRef(reservation_id=999)))
    await expect_status(invalid, stub.Lookup(tokens_request("c", [1], fp="other")), "other")
    await expect_status(invalid, stub.Reserve(tokens_request("c", [])), "empty token list")
    far = kvstore_pb2.ReadBlocksRequest(extents=[kvstore_pb2.Extent(start=5, length=2)])
    await expect_status(invalid, stub.ReadBlocks(far).read(), "exceeds")
    empty = kvstore_pb2.ReadBlocksRequest(extents=[kvstore_pb2.Extent(start=0, length=0)])
    await expect_status(invalid, stub.ReadBlocks(empty).read(), "bad extent")
    await expect_status(invalid, stub.Unpin(kvstore_pb2.PinRef(pin_id=5)), "no pin")
    # The arena holds 6 blocks: 2 committed and pinned, 4 in a pending reservation.
    await stub.Pin(tokens_request("c", list(range(8))))
    await stub.Reserve(tokens_request("d", list(range(100, 116))))
    details = await expect_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Reserve(tokens_request("e", [1]))
    )
    assert "recompute instead" in details and "0 evictable" in details
    stats = await stub.Stats(kvstore_pb2.StatsRequest())
    assert (stats.used_blocks, stats.pinned_blocks, stats.pending_reservations) == (6, 2, 1)


async def test_bulk_write_then_read_is_bit_identical(start: Callable[..., object]) -> None:
    stub = (await start()).stub
    res = await stub.Reserve(tokens_request("c", list(range(12))))
    extents = from_proto(res.new_extents)
    data = np.random.default_rng(0).integers(0, 256, 3 * BLOCK_BYTES, np.uint8).tobytes()
    chunks = list(write_chunks(res.reservation_id, extents, data))
    assert len(chunks) == 2 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    written = await stub.WriteBlocks(iter(chunks))
    assert written.bytes_written == len(data)
    await stub.Commit(kvstore_pb2.ReservationRef(reservation_id=res.reservation_id))
    hit = await stub.Lookup(tokens_request("c", list(range(12))))
    read = b""
    async for chunk in stub.ReadBlocks(kvstore_pb2.ReadBlocksRequest(extents=hit.extents)):
        assert chunk.offset == len(read) and chunk.crc32c == checksum(chunk.data)
        read += chunk.data
    assert read == data


async def test_writes_land_only_in_a_pending_reservations_new_blocks(
    start: Callable[..., object],
) -> None:
    stub = (await start()).stub
    res = await stub.Reserve(tokens_request("c", list(range(4))))
    await stub.Commit(kvstore_pb2.ReservationRef(reservation_id=res.reservation_id))
    committed = from_proto(res.new_extents)
    junk = b"\x01" * BLOCK_BYTES
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.WriteBlocks(iter(list(write_chunks(res.reservation_id, committed, junk)))),
        "no pending reservation",
    )
    other = await stub.Reserve(tokens_request("d", list(range(50, 54))))
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.WriteBlocks(iter(list(write_chunks(other.reservation_id, committed, junk)))),
        "not distinct new blocks",
    )
    read = stub.ReadBlocks(kvstore_pb2.ReadBlocksRequest(extents=res.new_extents))
    assert b"".join([c.data async for c in read]) == bytes(BLOCK_BYTES)


async def test_a_dead_clients_reservation_times_out(start: Callable[..., object]) -> None:
    stub = (await start(lease_seconds=0.2)).stub
    res = await stub.Reserve(tokens_request("c", list(range(16))))
    for _ in range(100):  # the reaper runs every 50 ms
        if (await stub.Stats(kvstore_pb2.StatsRequest())).used_blocks == 0:
            break
        await asyncio.sleep(0.05)
    stats = await stub.Stats(kvstore_pb2.StatsRequest())
    assert (stats.used_blocks, stats.pending_reservations) == (0, 0)
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Commit(kvstore_pb2.ReservationRef(reservation_id=res.reservation_id)),
    )


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
        stub = (await start(redis_url=server.url)).stub
        res = await stub.Reserve(tokens_request("c", list(range(8))))
        await stub.Commit(kvstore_pb2.ReservationRef(reservation_id=res.reservation_id))
        server.stop()
        await expect_status(
            grpc.StatusCode.UNAVAILABLE, stub.Lookup(tokens_request("c", list(range(8))))
        )
        server.start()
        hit = await stub.Lookup(tokens_request("c", list(range(8))))
        assert hit.valid_tokens == 8
    finally:
        server.start()  # back for the module's other tests
