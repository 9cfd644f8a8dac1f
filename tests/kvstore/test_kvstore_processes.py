"""The store as its own process: executor-like clients share its arena by name, and its
Redis index outlives it only as far as the memory behind it does."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.kv.extent import Extent, flatten
from common.kv.host_ops import Commit, Unpin
from common.shm.arena import SHM_DIR, HostArena
from protos import kvstore_pb2, kvstore_pb2_grpc
from tests.support.redis_server import RedisServer
from tests.support.stores import BatchCalls

pytestmark = pytest.mark.process

FP = "model-a"
BLOCK_SIZE = 4
BLOCK_BYTES = 2 * 4096 + 128
TOKENS = list(range(1000, 1014))  # 4 blocks, the last partial
REPO = Path(__file__).resolve().parents[2]


def pattern(i: int) -> bytes:
    """What the i-th block of the conversation holds."""
    return random.Random(i).randbytes(BLOCK_BYTES)


def span(block: int) -> slice:
    return slice(block * BLOCK_BYTES, (block + 1) * BLOCK_BYTES)


def _calls(stub: kvstore_pb2_grpc.KVStoreStub) -> BatchCalls:
    return BatchCalls(stub, FP, BLOCK_SIZE)


def _blocks(extents: list[kvstore_pb2.Extent]) -> list[int]:
    return flatten(Extent(e.start, e.length) for e in extents)


def executor_writes(port: int) -> None:
    """Maps the arena by name, writes the new blocks of a reservation, commits."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        arena = HostArena.attach(stub.Describe(kvstore_pb2.DescribeRequest()).arena_name)
        calls = _calls(stub)
        res = stub.Batch(calls.request(calls.reserve_op("conv", TOKENS))).replies[0].reserved
        assert res.ok and res.valid_tokens == 0
        with arena.view() as view:
            for i, block in enumerate(_blocks(res.new_extents)):
                view[span(block)] = pattern(i)
        arena.close()
        stub.Batch(calls.request(Commit(res.reservation_id)))


def executor_reads(port: int) -> None:
    """Pins the conversation's blocks, checks every byte, unpins; exits 3 on a mismatch."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        arena = HostArena.attach(stub.Describe(kvstore_pb2.DescribeRequest()).arena_name)
        calls = _calls(stub)
        pin = stub.Batch(calls.request(calls.pin_op("conv", TOKENS))).replies[0].pinned
        with arena.view() as view:
            same = pin.valid_tokens == len(TOKENS) and all(
                view[span(block)] == pattern(i) for i, block in enumerate(_blocks(pin.extents))
            )
        arena.close()
        stub.Batch(calls.request(Unpin(pin.pin_id)))
    if not same:
        sys.exit(3)


def run_client(target: object, port: int) -> int | None:
    process = mp.get_context("spawn").Process(target=target, args=(port,))
    process.start()
    process.join(60)
    return process.exitcode


class StoreProcess:
    def __init__(self, redis_url: str, arena_base: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.kvstore", "--host", "127.0.0.1", "--port", "0",
             "--redis-url", redis_url, "--instance-id", "proc-a", "--arena-name", arena_base,
             "--num-blocks", "16", "--block-bytes", str(BLOCK_BYTES),
             "--block-size", str(BLOCK_SIZE), "--fingerprint", FP],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the ready line, or "" if it died
        assert line.startswith("kvstore ready"), f"store failed to start: {line!r}"
        fields = dict(item.split("=", 1) for item in line.split()[2:])
        self.port = int(fields["port"])
        self.arena_name = fields["arena"]

    def valid_tokens(self) -> int:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            calls = _calls(stub)
            pin = stub.Batch(calls.request(calls.pin_op("conv", TOKENS))).replies[0].pinned
            stub.Batch(calls.request(Unpin(pin.pin_id)))
            return pin.valid_tokens

    def stop(self, sig: signal.Signals) -> int:
        self.process.send_signal(sig)
        return self.process.wait(30)


@pytest.fixture
def arena_base() -> Iterator[str]:
    base = f"fastswitch-kvtest-{uuid.uuid4().hex[:8]}"
    yield base
    for path in SHM_DIR.glob(f"{base}*"):
        path.unlink()


def test_store_process_lifecycle(redis_server: RedisServer, arena_base: str) -> None:
    store = None
    try:
        store = StoreProcess(redis_server.url, arena_base)
        assert run_client(executor_writes, store.port) == 0
        assert run_client(executor_reads, store.port) == 0

        # A crash leaves the segment; the restarted store inherits its bytes.
        assert store.stop(signal.SIGKILL) != 0
        crashed_segment = store.arena_name
        store = StoreProcess(redis_server.url, arena_base)
        assert store.valid_tokens() == len(TOKENS)
        assert run_client(executor_reads, store.port) == 0
        assert not (SHM_DIR / crashed_segment).exists()  # cleaned up as stale

        # A crash whose memory is lost too: the index survives but must not be served.
        assert store.stop(signal.SIGKILL) != 0
        (SHM_DIR / store.arena_name).unlink()
        store = StoreProcess(redis_server.url, arena_base)
        assert store.valid_tokens() == 0

        # SIGTERM stops cleanly and leaves no segment behind.
        assert store.stop(signal.SIGTERM) == 0
        store = None
        assert not list(SHM_DIR.glob(f"{arena_base}*"))
    finally:
        if store is not None:
            store.stop(signal.SIGKILL)
