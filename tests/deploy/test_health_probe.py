"""`python -m common.health_probe`: the container health check's exit code follows
grpc.health.v1, for the whole server and for one service, or HTTP /health with --http."""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
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


def test_http_mode_follows_the_status_of_health(capsys: pytest.CaptureFixture[str]) -> None:
    """`--http`: GET /health, 200 healthy, anything else (or nothing listening) not."""
    status = {"code": 503}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        assert main([address, "--http"]) == 1
        assert "HTTP 503" in capsys.readouterr().err
        status["code"] = 200
        assert main([address, "--http"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert main([address, "--http", "--timeout", "0.5"]) == 1
