"""`python -m common.health_probe`: the container health check's exit code follows
grpc.health.v1, for the whole server and for one service."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from common.grpc_serving import add_health_and_reflection, mark_serving
from common.health_probe import main
from services.launch import free_port

SERVICE = "fastswitch.test.Probe"


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, health_aio.HealthServicer]]:
    server = grpc.aio.server()
    health = add_health_and_reflection(server, SERVICE)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", health
    await server.stop(0)


async def probe(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_exit_code_follows_the_serving_status(
    server: tuple[str, health_aio.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    address, health = server
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await probe(address) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    await mark_serving(health, SERVICE)
    assert await probe(address) == 0
    assert await probe(address, SERVICE) == 0
    assert await probe(address, "fastswitch.test.Other") == 1  # NOT_FOUND
    await health.enter_graceful_shutdown()
    assert await probe(address) == 1


def test_nothing_listening_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    assert main([address, "--timeout", "0.5"]) == 1
    assert address in capsys.readouterr().err


async def test_runs_as_a_module(server: tuple[str, health_aio.HealthServicer]) -> None:
    address, health = server
    await mark_serving(health, SERVICE)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "common.health_probe", address,
        stderr=subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 0, err.decode()
