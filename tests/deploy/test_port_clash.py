"""A service never shares its port: where a live server holds it, the service exits saying
so, instead of the kernel splitting connections between the two (grpc's SO_REUSEPORT)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from common.grpc_serving import SERVER_OPTIONS
from common.tls import listen


@pytest.fixture
async def held_port() -> AsyncIterator[int]:
    """A port a live gRPC server holds, with grpc's default options (SO_REUSEPORT on)."""
    holder = grpc.aio.server()
    port = holder.add_insecure_port("127.0.0.1:0")
    await holder.start()
    yield port
    await holder.stop(None)


async def test_grpcs_default_would_share_the_port_ours_refuses_it(held_port: int) -> None:
    shared = grpc.aio.server()
    assert shared.add_insecure_port(f"127.0.0.1:{held_port}") == held_port  # the hazard
    ours = grpc.aio.server(options=SERVER_OPTIONS)
    with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{held_port}: it is in use"):
        listen(ours, f"127.0.0.1:{held_port}", None)


async def test_a_service_started_on_a_held_port_exits_saying_so(held_port: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.kvstore", "--port", str(held_port), "--num-blocks",
         "4", "--block-bytes", "64", "--block-size", "16", "--fingerprint", "port-clash"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{held_port}: it is in use" in done.stderr
    assert "Traceback" not in done.stderr
