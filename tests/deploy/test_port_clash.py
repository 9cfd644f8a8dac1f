"""A service never shares its port: where a live server holds it, the service exits saying
so, instead of the kernel splitting connections between the two (grpc's SO_REUSEPORT); a
local stack whose pick of a free port was taken first picks another."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from common.grpc_serving import new_server
from common.tls import ADDRESS_UNAVAILABLE, listen
from services import launch
from services.launch import ChildExited, LocalStack, StackConfig

KVSTORE_ARGS = ["--num-blocks", "4", "--block-bytes", "64", "--block-size", "16",
                "--fingerprint", "port-clash"]
fresh_port = launch.free_port


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
    ours = new_server()
    with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{held_port}: it is in use"):
        listen(ours, f"127.0.0.1:{held_port}", None)


async def test_a_service_started_on_a_held_port_exits_saying_so(held_port: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.kvstore", "--port", str(held_port), *KVSTORE_ARGS],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ADDRESS_UNAVAILABLE
    assert f"cannot listen on 127.0.0.1:{held_port}: it is in use" in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_stack_picks_another_port_when_its_pick_is_taken_first(
    held_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race `free_port` leaves open: another process binds the port between the pick and
    the child's bind. The child exits saying so (`ADDRESS_UNAVAILABLE`), and the stack picks
    again; a child that exits for another reason is not started again."""
    picks = iter([held_port])
    monkeypatch.setattr(launch, "free_port", lambda: next(picks, None) or fresh_port())
    stack = LocalStack(StackConfig(log_dir=str(tmp_path)))
    try:
        child = await asyncio.to_thread(stack.spawn, "kvstore", KVSTORE_ARGS, 60)
        assert child.port != held_port and child.process.poll() is None
        picked: list[int] = []
        monkeypatch.setattr(launch, "free_port", lambda: picked.append(fresh_port()) or picked[-1])
        with pytest.raises(ChildExited, match="kvstore exited with code 2"):  # argparse's
            await asyncio.to_thread(stack.spawn, "kvstore", ["--num-blocks", "many"], 60)
        assert len(picked) == 1
    finally:
        stack.stop()
    assert f"cannot listen on 127.0.0.1:{held_port}" in (tmp_path / "kvstore.log").read_text()


async def test_a_port_asked_for_is_not_swapped_for_another(held_port: int, tmp_path: Path
                                                          ) -> None:
    stack = LocalStack(StackConfig(log_dir=str(tmp_path)))
    with pytest.raises(ChildExited, match=f"kvstore exited with code {ADDRESS_UNAVAILABLE}"):
        await asyncio.to_thread(stack.spawn, "kvstore", KVSTORE_ARGS, 60, held_port)
    assert not stack.children


@pytest.mark.parametrize("held", ["api", "metrics"])
async def test_the_http_front_door_on_a_held_port_exits_saying_so(held_port: int, held: str
                                                                  ) -> None:
    """Its API port (bound for uvicorn, whose own bind would exit 1) and its metrics port
    alike, so that `LocalStack.spawn` picks another."""
    ports = {"api": fresh_port(), "metrics": fresh_port(), held: held_port}
    done = subprocess.run(
        [sys.executable, "-m", "services.http", "--port", str(ports["api"]),
         "--metrics-port", str(ports["metrics"])],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ADDRESS_UNAVAILABLE
    assert f"cannot listen on 127.0.0.1:{held_port}: it is in use" in done.stderr
    assert "Traceback" not in done.stderr
