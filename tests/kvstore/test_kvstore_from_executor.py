"""`--from-executor`: the store takes its geometry and fingerprint from the executor's
Describe, waiting for an executor that is still starting (the docker-compose start order)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos import executor_pb2, executor_pb2_grpc
from services.kvstore.config import parse_config
from services.launch import free_port

FINGERPRINT = "f" * 64
BLOCK_BYTES = 3 * 4096
BLOCK_SIZE = 8


class DescribeOnly(executor_pb2_grpc.ExecutorServicer):
    def Describe(self, request, context):
        return executor_pb2.DescribeResponse(
            model_fingerprint=FINGERPRINT,
            geometry=executor_pb2.BlockGeometry(block_size=BLOCK_SIZE, block_bytes=BLOCK_BYTES),
        )


def serve_executor(port: int) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(2))
    executor_pb2_grpc.add_ExecutorServicer_to_server(DescribeOnly(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


@pytest.fixture
def executor_port() -> Iterator[int]:
    port = free_port()
    server = serve_executor(port)
    yield port
    server.stop(None)


def test_geometry_comes_from_the_executor(executor_port: int) -> None:
    config = parse_config([], {"FASTSWITCH_KVSTORE_FROM_EXECUTOR": f"127.0.0.1:{executor_port}"})
    assert (config.block_bytes, config.block_size, config.fingerprint) == (
        BLOCK_BYTES, BLOCK_SIZE, FINGERPRINT)


def test_waits_for_an_executor_that_starts_later() -> None:
    port = free_port()
    servers: list[grpc.Server] = []
    starter = threading.Timer(1.0, lambda: servers.append(serve_executor(port)))
    starter.start()
    try:
        config = parse_config(["--from-executor", f"127.0.0.1:{port}", "--connect-timeout", "30"],
                              {})
    finally:
        starter.join()
        for server in servers:
            server.stop(None)
    assert servers, "parse_config returned before the executor existed"
    assert config.block_bytes == BLOCK_BYTES


def test_an_absent_executor_fails_with_its_address(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--from-executor", address, "--connect-timeout", "0.5"], {})
    assert exit_.value.code == 2
    assert address in capsys.readouterr().err


@pytest.mark.parametrize("argv, env", [
    (["--from-executor", "x:1", "--block-bytes", "4096"], {}),
    (["--from-executor", "x:1"], {"FASTSWITCH_MODEL_FINGERPRINT": "fp"}),
    (["--block-bytes", "4096"], {}),  # no fingerprint, no executor
])
def test_geometry_flags_and_from_executor_exclude_each_other(
    argv: list[str], env: dict[str, str]
) -> None:
    def describe(address: str, timeout_s: float):
        raise AssertionError("must be refused before asking the executor")

    with pytest.raises(SystemExit):
        parse_config(argv, env, describe=describe)


def test_explicit_geometry_still_works_without_an_executor() -> None:
    config = parse_config(["--block-bytes", "4096", "--fingerprint", "fp"], {})
    assert (config.block_bytes, config.block_size, config.fingerprint) == (4096, 16, "fp")


def test_the_lease_and_namespace_come_from_flags_or_the_environment() -> None:
    geometry = ["--block-bytes", "4096", "--fingerprint", "fp"]
    config = parse_config(geometry, {})
    assert (config.lease_seconds, config.namespace) == (10.0, "")
    config = parse_config(geometry, {"FASTSWITCH_KVSTORE_LEASE_SECONDS": "2",
                                     "FASTSWITCH_KVSTORE_NAMESPACE": "gpu"})
    assert (config.lease_seconds, config.namespace) == (2.0, "gpu")
    config = parse_config([*geometry, "--kvstore-namespace", "cpu"], {})
    assert config.namespace == "cpu"
    for bad in (["--kvstore-namespace", "a{b}"], ["--lease-seconds", "0"]):
        with pytest.raises(SystemExit):
            parse_config([*geometry, *bad], {})
