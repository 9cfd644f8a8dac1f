"""KV store faults under concurrent traffic, over real processes: the store paused
(SIGSTOP, then SIGCONT) and its Redis restarted. Nothing is orphaned: within one lease
period of the traffic ending, the store holds no reservation or pin, the scheduler is not
degraded, and new requests get the tokens they got before the fault."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from common.client import FastSwitchClient
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.launch import LocalStack, StackConfig
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.process

LEASE_S = 2.0
RENEW_S = 0.5
CONVERSATIONS = 6
REFERENCE = "a fresh conversation after the fault, compared with one before it"


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory,
          redis_server: RedisServer) -> Iterator[LocalStack]:
    # Few device blocks, so that concurrent conversations preempt (reservations and
    # pins on the store); no device prefix cache, so that every next turn asks the store.
    config = StackConfig(
        num_gpu_blocks=48, num_host_blocks=512, switches="-device_cache",
        redis_url=redis_server.url, log_dir=str(tmp_path_factory.mktemp("kvstore-faults")),
        extra_env={"FASTSWITCH_KVSTORE_LEASE_SECONDS": str(LEASE_S),
                   "FASTSWITCH_KVSTORE_RENEW_S": str(RENEW_S)})
    with LocalStack(config) as s:
        yield s


def store_held(stack: LocalStack) -> tuple[int, int]:
    """The store's pending reservations and pinned blocks."""
    with stack.channel(stack.kvstore_address) as channel:
        s = kv_grpc.KVStoreStub(channel).Stats(kv.StatsRequest(), timeout=5)
    return s.pending_reservations, s.pinned_blocks


@contextlib.asynccontextmanager
async def traffic(client: FastSwitchClient) -> AsyncIterator[list[int]]:
    """Conversations taking turns, concurrently, until the block ends (turns in flight
    finish first); yields the count of turns done."""
    done = [0]
    stop = asyncio.Event()

    async def converse(k: int) -> None:
        turn = 0
        while not stop.is_set():
            gen = await asyncio.wait_for(client.chat(
                f"busy-{k}", f"turn {turn} of conversation {k}: tell me more " * 3,
                client_id=f"user-{k}", max_tokens=12).collect(), 60)
            assert gen.final is not None and gen.final.completion_tokens > 0
            done[0] += 1
            turn += 1

    tasks = [asyncio.create_task(converse(k)) for k in range(CONVERSATIONS)]
    try:
        yield done
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def reference_tokens(client: FastSwitchClient, conv: str) -> list[int]:
    gen = await client.chat(conv, REFERENCE, client_id="reference", max_tokens=16).collect()
    return [t.id for t in gen.tokens]


async def settles(stack: LocalStack, client: FastSwitchClient, within_s: float) -> None:
    """The store holds nothing and the scheduler is not degraded, within `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        held = await asyncio.to_thread(store_held, stack)
        degraded = (await client.stats()).kvstore_degraded
        if held == (0, 0) and not degraded:
            return
        assert time.monotonic() < deadline, (
            f"{within_s} s after the traffic: the store holds {held} (pending reservations, "
            f"pinned blocks), kvstore_degraded={degraded}")
        await asyncio.sleep(0.1)


async def survive(stack: LocalStack, fault: Callable[[], None], heal: Callable[[], None],
                  fault_s: float) -> None:
    async with FastSwitchClient(stack.scheduler_address) as client:
        await client.wait_ready()
        before = await reference_tokens(client, "reference-before")
        async with traffic(client) as done:
            while done[0] < CONVERSATIONS:  # every conversation has a turn on the store
                await asyncio.sleep(0.1)
            fault()
            try:
                await asyncio.sleep(fault_s)
            finally:
                heal()
            turns = done[0]
            while done[0] < turns + CONVERSATIONS:  # traffic goes on after the recovery
                await asyncio.sleep(0.1)
        await settles(stack, client, within_s=LEASE_S + 2 * RENEW_S)
        assert await reference_tokens(client, "reference-after") == before
        stats = await client.stats()
        assert stats.kvstore_degraded_seconds > 0


async def test_a_paused_store_orphans_nothing(stack: LocalStack) -> None:
    store = stack._child("kvstore").process
    await survive(stack, lambda: store.send_signal(signal.SIGSTOP),
                  lambda: store.send_signal(signal.SIGCONT), fault_s=2 * LEASE_S)


async def test_a_redis_restart_orphans_nothing(
    stack: LocalStack, redis_server: RedisServer
) -> None:
    try:
        await survive(stack, redis_server.stop, redis_server.start, fault_s=2 * LEASE_S)
    finally:
        redis_server.start()  # back for the module's other tests, whatever happened
