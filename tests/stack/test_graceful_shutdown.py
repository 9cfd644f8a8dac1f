"""SIGTERM with requests in flight: the scheduler stops accepting and lets them finish
within its grace period, every process exits 0, and no shared-memory segment survives."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.client import FastSwitchClient, Generation
from common.shm.arena import SHM_DIR
from services.launch import Child, LocalStack, StackConfig

pytestmark = pytest.mark.process


@pytest.fixture
def arena_base() -> str:
    """The kvstore's segment prefix: this test's segments, whatever else runs meanwhile."""
    return f"fastswitch-sigterm-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def stack(arena_base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(StackConfig(
        num_gpu_blocks=64, num_host_blocks=512,
        extra_env={"FASTSWITCH_KVSTORE_ARENA_NAME": arena_base},
        log_dir=str(tmp_path_factory.mktemp("sigterm-logs")),
    ))
    try:
        stack.start(scheduler=False)
        yield stack
    finally:
        stack.stop()
        for leftover in SHM_DIR.glob(f"{arena_base}*"):  # never leak into other tests
            leftover.unlink()


def segments(prefix: str) -> set[str]:
    return {path.name for path in SHM_DIR.glob(f"{prefix}*")}


async def in_flight(client: FastSwitchClient, n: int, max_tokens: int
                    ) -> tuple[list[Generation], list[asyncio.Task[Generation]]]:
    """`n` requests (more than fit: some swap out), returned once tokens are streaming."""
    gens = [client.generate(f"request {i} " * 4, client_id=f"c{i}", max_tokens=max_tokens,
                            priority=i % 3) for i in range(n)]
    tasks = [asyncio.create_task(g.collect()) for g in gens]
    while not any(g.tokens for g in gens):
        failed = [t for t in tasks if t.done()]
        assert not failed, failed[0].exception()
        await asyncio.sleep(0.02)
    return gens, tasks


async def wait_not_serving(address: str) -> None:
    """Until health says NOT_SERVING: draining, the server still answers."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while (await stub.Check(health_pb2.HealthCheckRequest())).status == (
            health_pb2.HealthCheckResponse.SERVING
        ):
            await asyncio.sleep(0.01)


async def exit_code(child: Child) -> int:
    return await asyncio.to_thread(child.process.wait, 60)


async def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(
    stack: LocalStack,
) -> None:
    scheduler = stack.start_scheduler(extra_args=["--kv-blocks", "16", "--shutdown-grace", "60"])
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        gens, tasks = await in_flight(client, 6, max_tokens=24)
        scheduler.process.send_signal(signal.SIGTERM)
        await wait_not_serving(scheduler.address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.generate("too late", client_id="late").collect()
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        assert (await client.stats()).running > 0  # still draining, still answering
        await asyncio.gather(*tasks)
    assert [g.final.finish_reason for g in gens] == ["length"] * len(gens)
    assert all(g.final.completion_tokens == 24 for g in gens)
    assert await exit_code(scheduler) == 0


async def test_sigterm_to_every_service_exits_cleanly_and_frees_shared_memory(
    stack: LocalStack, arena_base: str
) -> None:
    scheduler = stack.start_scheduler(extra_args=["--kv-blocks", "24", "--shutdown-grace", "1"])
    arena = segments(arena_base)
    assert len(arena) == 1, arena  # the kvstore's arena, mapped by the executor
    scheduler_segments = f"fastswitch-local-{scheduler.process.pid}-"
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        _, tasks = await in_flight(client, 6, max_tokens=150)  # 6 x 12 blocks > 24
        while (await client.stats()).preemptions == 0:  # swaps under way as well
            assert not all(t.done() for t in tasks), "finished without a preemption"
            await asyncio.sleep(0.02)
        for child in stack.children:
            child.process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(exit_code(c) for c in stack.children))
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert dict(zip((c.name for c in stack.children), codes, strict=True)) == {
        "executor": 0, "kvstore": 0, "scheduler": 0}
    for result in results:  # each ends: finished, or failed with a clear status
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        else:
            assert isinstance(result, Generation) and result.final is not None
    assert segments(arena_base) == set()
    assert segments(scheduler_segments) == set()
