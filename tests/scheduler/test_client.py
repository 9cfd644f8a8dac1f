"""The public client against a stand-in scheduler: typed tokens and final, deadlines, and
waiting for SERVING with a bound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from common.client import FastSwitchClient, Final, Token
from common.grpc_serving import add_health_and_reflection, mark_serving
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from services.launch import free_port

SERVICE = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name


class StandIn(pb_grpc.SchedulerServicer):
    """Echoes the prompt's token ids back as tokens; client "slow" never gets an answer."""

    async def Generate(self, request, context):
        if request.client_id == "slow":
            await asyncio.sleep(3600)
        ids = list(request.token_ids.ids)
        for i in ids:
            yield pb.GenerateEvent(request_id="r1", token=pb.Token(id=i, text=chr(i), logprob=-1))
        yield pb.GenerateEvent(request_id="r1", final=pb.Final(
            finish_reason="length", prompt_tokens=len(ids), completion_tokens=len(ids),
            ttft_s=0.5, preemptions=2))


@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[str, health_aio.HealthServicer]]:
    server = grpc.aio.server()
    pb_grpc.add_SchedulerServicer_to_server(StandIn(), server)
    health = add_health_and_reflection(server, SERVICE)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", health
    await server.stop(0)


async def test_tokens_and_final_are_typed(
    scheduler: tuple[str, health_aio.HealthServicer],
) -> None:
    address, health = scheduler
    await mark_serving(health, SERVICE)
    async with FastSwitchClient(address) as client:
        await client.wait_ready(timeout_s=5)
        gen = client.generate([104, 105], client_id="a")
        tokens = [token async for token in gen]
    assert tokens == [Token(104, "h", -1.0), Token(105, "i", -1.0)]
    assert gen.text == "hi" and gen.request_id == "r1"
    assert isinstance(gen.final, Final)
    assert (gen.final.finish_reason, gen.final.completion_tokens, gen.final.preemptions) == (
        "length", 2, 2)


async def test_a_deadline_ends_the_call(scheduler: tuple[str, health_aio.HealthServicer]) -> None:
    address, _ = scheduler
    async with FastSwitchClient(address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.generate([1], client_id="slow", timeout_s=0.2).collect()
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_wait_ready_waits_for_serving_and_is_bounded(
    scheduler: tuple[str, health_aio.HealthServicer],
) -> None:
    address, health = scheduler
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    async with FastSwitchClient(address) as client:
        with pytest.raises(TimeoutError):
            await client.wait_ready(timeout_s=0.3)
        waiting = asyncio.create_task(client.wait_ready(timeout_s=10))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await mark_serving(health, SERVICE)
        await waiting


async def test_wait_ready_gives_up_when_nothing_listens() -> None:
    async with FastSwitchClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(TimeoutError):
            await client.wait_ready(timeout_s=0.5)
