"""Executor faults over real processes: a refused Step or SubmitSwaps fails only the request
it names; a restarted KV store's old arena is detached and its new one attached; and an
executor restarted after a KV store restart, with the same scheduler, serves again."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.client import FastSwitchClient, Generation
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from protos import scheduler_pb2
from services.launch import Child, LocalStack, StackConfig
from tests.support.executor_proxy import executor_proxy
from tests.support.stacks import executor_and_stores, settled_scheduler, settled_store

pytestmark = pytest.mark.process

SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
VICTIM_PROMPT = "the victim keeps decoding while others are refused " * 2
RECOVERY_S = 20  # how long a restart may be felt before the stack serves again


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(num_gpu_blocks=128, num_host_blocks=512,
                         log_dir=str(tmp_path_factory.mktemp("executor-fault-logs")))
    with executor_and_stores(config) as s:
        yield s


def poison(request: ex.StepRequest | ex.SubmitSwapsRequest, victim_blocks: list[int]) -> None:
    """What a faulty scheduler might send: an out-of-range block for `poison-step`, and for
    `poison-swap*` a swap-in whose copies both write the running victim's first block."""
    if isinstance(request, ex.StepRequest):
        for seq in request.sequences:
            if seq.request_id == "victim":
                victim_blocks[:] = seq.block_table
            if seq.request_id == "poison-step":
                seq.block_table[0] = 1_000_000
        return
    for order in request.swaps:
        if order.request_id.startswith("poison-swap") and order.direction == ex.DIRECTION_IN:
            src = order.copies[0].src
            over = ex.Extent(start=victim_blocks[0], length=1)
            del order.copies[:]
            order.copies.extend([ex.SwapCopy(src=ex.Extent(start=src.start, length=1), dst=over),
                                 ex.SwapCopy(src=ex.Extent(start=src.start, length=1), dst=over)])


@pytest.fixture
async def poisoned(stack: LocalStack) -> AsyncIterator[Child]:
    """A scheduler whose executor calls pass through `poison` on their way."""
    victim_blocks: list[int] = []
    async with executor_proxy(stack.executor_address,
                              lambda r: poison(r, victim_blocks)) as address:
        child = await asyncio.to_thread(stack.spawn, "scheduler", [
            "--executor", address, "--kvstore", stack.kvstore_address,
            "--switches=-device_cache"])  # the second turn swaps in, and is poisoned
        yield child
        assert await asyncio.to_thread(stack.stop_child, child) == 0


def victim_run(client: FastSwitchClient, request_id: str) -> Generation:
    return client.generate(VICTIM_PROMPT, client_id="v", max_tokens=400, request_id=request_id)


async def test_refused_step_and_swap_fail_only_their_own_request(
    stack: LocalStack, poisoned: Child
) -> None:
    async with FastSwitchClient(poisoned.address) as client:
        await client.wait_ready()
        clean = await victim_run(client, "clean").collect()
        victim = victim_run(client, "victim")
        running = asyncio.create_task(victim.collect())
        while not victim.tokens:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as step:
            await client.generate("refused step", client_id="p", max_tokens=8,
                                  request_id="poison-step").collect()
        assert step.value.code() is grpc.StatusCode.INTERNAL
        assert "block_table[0]=1000000 out of range" in step.value.details()
        await client.chat("conv", "a first turn that goes to the host", client_id="p",
                          max_tokens=8, request_id="poison-swap-1").collect()
        with pytest.raises(grpc.aio.AioRpcError) as swap:
            await client.chat("conv", "a second turn swapped in", client_id="p",
                              max_tokens=8, request_id="poison-swap-2").collect()
        assert swap.value.code() is grpc.StatusCode.INTERNAL
        assert "is also written by" in swap.value.details()
        assert not running.done(), "the victim finished before the refusals: not a test"
        assert (await client.stats()).executor_available
        done = await running
        assert [t.id for t in done.tokens] == [t.id for t in clean.tokens]
        after = await client.chat("conv", "the conversation goes on", client_id="p",
                                  max_tokens=8).collect()
        assert after.final.completion_tokens > 0
        s = await settled_scheduler(client)
    assert (s.waiting, s.running, s.swapped, s.swaps_in_flight) == (0, 0, 0, 0)
    assert (s.running_blocks, s.swapped_blocks, s.draining_blocks) == (0, 0, 0)
    store = await settled_store(stack.kvstore_address)
    assert store.pinned_blocks == 0 and store.pending_reservations == 0


def host_arenas(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        return list(ex_grpc.ExecutorStub(channel).Describe(ex.DescribeRequest()).host_arenas)


def store_arena(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        return kv_grpc.KVStoreStub(channel).Describe(kv.DescribeRequest(), timeout=5).arena_name


def ready(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SCHEDULER), timeout=2).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


async def wait_until(what: str, check, timeout_s: float = RECOVERY_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.2)


async def two_turns(client: FastSwitchClient, conversation: str) -> list[list[int]]:
    """A conversation whose second turn reuses the first's KV from the host."""
    first = await client.chat(conversation, "tell me about block groups and swaps",
                              client_id="a", max_tokens=24).collect()
    second = await client.chat(conversation, "and then?", client_id="a", max_tokens=8).collect()
    assert second.final.reused_prompt_tokens > 0
    return [[t.id for t in first.tokens], [t.id for t in second.tokens]]


def kill(stack: LocalStack, child: Child) -> None:
    child.process.send_signal(signal.SIGKILL)
    child.process.wait()
    stack.children.remove(child)


async def test_store_restart_then_executor_restart_recover_with_the_same_scheduler(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The store's new arena replaces the old one in the executor (detached, not kept), and
    an executor restarted afterwards maps the new arena, not the dead one."""
    config = StackConfig(num_gpu_blocks=64, num_host_blocks=256,
                         log_dir=str(tmp_path_factory.mktemp("restart-logs")))
    with LocalStack(config) as stack:
        address = stack.scheduler_address
        old_arena = store_arena(stack.kvstore_address)
        async with FastSwitchClient(address) as client:
            await client.wait_ready()
            clean = await two_turns(client, "clean")

            store = stack._child("kvstore")
            kill(stack, store)
            await asyncio.to_thread(stack.restart, store)
            new_arena = store_arena(stack.kvstore_address)
            assert new_arena != old_arena
            # A request notices the dead store; the prober then has the executor swap arenas.
            await client.chat("notice", "anyone there?", client_id="a", max_tokens=4).collect()

            async def replaced() -> bool:
                return (host_arenas(stack.executor_address) == [new_arena]
                        and not (await client.stats()).kvstore_degraded)

            await wait_until("the new arena replaces the old one", replaced)
            assert await two_turns(client, "after-store") == clean

            executor = stack._child("executor")
            kill(stack, executor)
            await asyncio.to_thread(stack.restart, executor)

            async def serving() -> bool:
                return ready(address)

            await wait_until("ready again after the executor restart", serving)
            assert host_arenas(stack.executor_address) == [new_arena]
            assert await two_turns(client, "after-executor") == clean


async def test_executor_restart_after_an_unnoticed_store_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The store restarts while nothing runs, so the scheduler has not noticed when the
    executor restarts too: the dead arena cannot be mapped again, and the new one is."""
    config = StackConfig(num_gpu_blocks=64, num_host_blocks=256,
                         log_dir=str(tmp_path_factory.mktemp("unnoticed-logs")))
    with LocalStack(config) as stack:
        address = stack.scheduler_address
        async with FastSwitchClient(address) as client:
            await client.wait_ready()
            clean = await two_turns(client, "clean")
            await asyncio.sleep(1)  # the last turn's copy to the host has landed
            store, executor = stack._child("kvstore"), stack._child("executor")
            kill(stack, store)
            await asyncio.to_thread(stack.restart, store)
            kill(stack, executor)
            await asyncio.to_thread(stack.restart, executor)
            new_arena = store_arena(stack.kvstore_address)

            async def recovered() -> bool:
                return ready(address) and host_arenas(stack.executor_address) == [new_arena]

            await wait_until("ready again with the new arena", recovered)
            assert await two_turns(client, "after") == clean
