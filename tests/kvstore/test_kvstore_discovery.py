"""KV stores that join and leave a running scheduler through the Redis registry, as processes.

The scheduler is given the stores' Redis index, not their addresses (`--kvstore redis://`).
A store started later is attached to the executor and takes its share of new
conversations; one that stops cleanly, or is killed and lets its lease run out, is
detached, and its conversations recompute with output identical to a cold run; one that
restarts under the same instance id is used again with its new arena.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from common.client import FastSwitchClient, Generation
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.launch import Child, LocalStack, StackConfig
from services.scheduler.host_router import rendezvous_owner
from tests.support.redis_server import RedisClusterServer, RedisServer

pytestmark = pytest.mark.process

LEASE_S = 6.0  # services/kvstore/service.py: HEARTBEAT_S * LEASE_BEATS


@pytest.fixture(scope="module", params=["redis_server", "redis_cluster"],
                ids=["redis", "redis-cluster"])
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalStack]:
    """The registry in one Redis, or in a 3-master Redis Cluster."""
    index: RedisServer | RedisClusterServer = request.getfixturevalue(request.param)
    config = StackConfig(num_gpu_blocks=128, num_host_blocks=256, switches="-device_cache",
                         redis_url=index.url, discover_kvstores=True,
                         log_dir=str(tmp_path_factory.mktemp("discovery-logs")))
    with LocalStack(config) as s:
        yield s


def mapped_arenas(stack: LocalStack) -> list[str]:
    with stack.channel(stack.executor_address) as channel:
        desc = ex_grpc.ExecutorStub(channel).Describe(ex.DescribeRequest(),
                                                      metadata=stack.internal_metadata)
    return list(desc.host_arenas)


def store_of(child: Child) -> kv.DescribeResponse:
    with grpc.insecure_channel(child.address) as channel:
        return kv_grpc.KVStoreStub(channel).Describe(kv.DescribeRequest())


def used_blocks(child: Child) -> int:
    with grpc.insecure_channel(child.address) as channel:
        return kv_grpc.KVStoreStub(channel).Stats(kv.StatsRequest()).used_blocks


async def until(what: str, check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.2)


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(40)]


def ids_of(gen: Generation) -> list[int]:
    return [t.id for t in gen.tokens]


async def test_stores_join_and_leave_a_running_scheduler(stack: LocalStack) -> None:
    [first] = [c for c in stack.children if c.name == "kvstore"]
    arena_first = store_of(first).arena_name
    assert mapped_arenas(stack) == [arena_first]
    async with FastSwitchClient(stack.scheduler_address) as client:
        await client.wait_ready()

        async def turn(conv: str, tokens: list[int]) -> Generation:
            return await client.generate(tokens, client_id="u", conversation_id=conv,
                                         max_tokens=6).collect()

        # (a) A store started after the scheduler is mapped, and takes its conversations.
        second = stack.start_kvstore()
        joined = store_of(second)
        await until("the second store is mapped",
                    lambda: mapped_arenas(stack) == [arena_first, joined.arena_name])
        ids = [store_of(first).instance_id, joined.instance_id]
        owned = [c for c in (f"c-{n}" for n in range(200))
                 if rendezvous_owner(c, ids) == joined.instance_id][:3]
        history: dict[str, list[int]] = {}
        for k, conv in enumerate(owned):
            tokens = prompt(k)
            history[conv] = tokens + ids_of(await turn(conv, tokens))
        await until("the second store holds its conversations", lambda: used_blocks(second) > 0)
        stats = await client.stats()
        assert (stats.kvstores, stats.kvstores_down, stats.kvstore_degraded) == (2, 0, False)

        # (b) It stops cleanly: it leaves the registry, its arena is unmapped, and its
        # conversations recompute, correctly; the scheduler is not degraded, as it is gone.
        assert stack.stop_child(second) == 0
        await until("the stopped store's arena is unmapped",
                    lambda: mapped_arenas(stack) == [arena_first])
        for conv in owned:
            extended = history[conv] + [3, 4, 5]
            after, cold = await turn(conv, extended), await turn(f"cold-{conv}", extended)
            assert after.final.reused_prompt_tokens == 0
            assert ids_of(after) == ids_of(cold)
        stats = await client.stats()
        assert (stats.kvstores, stats.kvstores_down, stats.kvstore_degraded) == (1, 0, False)

        # (c) One killed outright is down until its lease runs out, then leaves.
        third = stack.start_kvstore()
        killed = store_of(third)
        await until("the third store is mapped", lambda: killed.arena_name in mapped_arenas(
            stack))
        third.process.send_signal(signal.SIGKILL)
        third.process.wait()
        stack.children.remove(third)
        await until("the killed store leaves after its lease",
                    lambda: killed.arena_name not in mapped_arenas(stack),
                    timeout_s=LEASE_S + 15)
        assert not (await client.stats()).kvstore_degraded

        # (d) A store restarted under the same instance id comes back with its new arena.
        instance = store_of(first).instance_id
        assert stack.stop_child(first) == 0
        restarted = stack.restart(first)
        renewed = store_of(restarted)
        assert renewed.instance_id == instance and renewed.arena_name != arena_first
        await until("the restarted store's new arena is mapped",
                    lambda: mapped_arenas(stack) == [renewed.arena_name])
        tokens = prompt(99)
        cold = await turn("after-restart", tokens)
        warm = await turn("after-restart", tokens + ids_of(cold) + [1, 2])
        assert warm.final.reused_prompt_tokens > 0  # served from the new arena
        assert not (await client.stats()).kvstore_degraded
