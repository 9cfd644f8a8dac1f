"""Pin, Reserve and Commit round trips per second against a real KV store process.

For each index backend, the embedded one and Redis (a throwaway redis-server on a free
port), one `python -m services.kvstore` process serves 1, 8 and 64 concurrent clients, each
for a fixed time. Every client is a scheduler's store client (`RemoteHostKV`: one Batch
call per op here) serving one conversation at a time: a turn pins the prompt's cached
prefix (Pin), then swaps the request out twice while it decodes (Reserve of the grown token
list, carrying the turn's Unpin the first time, then Commit); after a few hundred tokens
the conversation ends (Release, untimed) and a new one starts. The arena has room for every
conversation twice over, so the cells measure the operations, not eviction.

Clients are grpc.aio stubs in this one process, each on its own channel and its own
connection (a local subchannel pool), as separate schedulers would be. They share the
machine's cores with the store, so the numbers are whole round trips, the client's Python
included: read them as a ceiling for one store, not as the store's server-side cost.

`redis_over_memory_64` is the Redis backend's ops/s (all three ops) at 64 clients divided
by the embedded backend's, from the same run (`redis_over_memory` has it for every client
count); null unless both ran at 64. On a shared, noisy machine read this ratio rather than
either absolute number.

Run: python -m benchmarks.kvstore_ops [--json FILE] [--seconds 2.5] [--clients 1 8 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import uvloop

from benchmarks.cli import write_json
from benchmarks.redis_process import RedisProcess
from common.kv.block_hash import block_hashes
from common.kv.host_ops import Commit, HostOp, HostReply, Pin, Release, Reserve, Unpin
from common.latency import percentile
from common.shm.arena import ARENA_PREFIX, SHM_DIR
from protos import kvstore_pb2, kvstore_pb2_grpc
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity

T = TypeVar("T")
OPS = ("Pin", "Reserve", "Commit")
BACKENDS = ("memory", "redis")
FINGERPRINT = "bench-kvstore-ops"
BLOCK_SIZE = 16
BLOCK_BYTES = 4096  # the index does not care about block size in bytes; keeps /dev/shm small
VOCAB = 32_000
FIRST_PROMPT_TOKENS = 64
USER_TOKENS_PER_TURN = 32
DECODE_TOKENS_PER_SWAP = 24
SWAPS_PER_TURN = 2
CONVERSATION_TOKENS = 384  # a conversation ends once it holds this many tokens
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class OpStats:
    count: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Cell:
    """One backend at one concurrency. `reserve_reused_fraction` is the share of reserved
    tokens the store already held, so a run shows the prefixes were really reused."""

    backend: str
    clients: int
    seconds: float
    ops: dict[str, OpStats]
    reserve_reused_fraction: float


@dataclass(slots=True)
class Recorder:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    reserved_tokens: int = 0
    reused_tokens: int = 0

    async def timed(self, op: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        reply = await call
        self.latencies[op].append(time.perf_counter() - start)
        return reply

    def cell(self, backend: str, clients: int, seconds: float) -> Cell:
        ops = {
            op: OpStats(
                count=len(samples),
                ops_per_s=len(samples) / seconds,
                p50_ms=percentile(samples, 50) * 1e3,
                p99_ms=percentile(samples, 99) * 1e3,
            )
            for op, samples in self.latencies.items()
        }
        reused = self.reused_tokens / self.reserved_tokens if self.reserved_tokens else 0.0
        return Cell(backend, clients, seconds, ops, reused)


@dataclass(frozen=True, slots=True)
class StoreProcess:
    process: asyncio.subprocess.Process
    address: str
    arena: str  # the shared-memory segment it created


async def play_conversation(
    client: RemoteHostKV, conversation: str, rng: random.Random, deadline: float,
    recorder: Recorder,
) -> None:
    tokens: list[int] = []
    while len(tokens) < CONVERSATION_TOKENS and time.perf_counter() < deadline:
        tokens += _random_tokens(rng, USER_TOKENS_PER_TURN if tokens else FIRST_PROMPT_TOKENS)
        [pinned] = await recorder.timed("Pin", _answered(client, [Pin(1, conversation,
                                                                       *_chain(tokens))]))
        unpin: list[HostOp] = [Unpin(pinned.pin.pin_id)]
        for _ in range(SWAPS_PER_TURN):
            tokens += _random_tokens(rng, DECODE_TOKENS_PER_SWAP)
            [reserved] = await recorder.timed("Reserve", _answered(
                client, [*unpin, Reserve(2, conversation, *_chain(tokens))]))
            unpin = []
            reservation = reserved.reservation
            if reservation is None:
                raise RuntimeError("the store had no room: the arena is sized for every "
                                   "conversation twice over")
            recorder.reserved_tokens += len(tokens)
            recorder.reused_tokens += reservation.valid_tokens
            await recorder.timed("Commit", _answered(client, [Commit(reservation.reservation_id)]))
    await _answered(client, [Release(conversation)])


async def run_client(
    client: RemoteHostKV, name: str, seed: int, deadline: float, recorder: Recorder,
) -> None:
    rng = random.Random(seed)
    n = 0
    while time.perf_counter() < deadline:
        await play_conversation(client, f"{name}-conv{n}", rng, deadline, recorder)
        n += 1


async def measure_cell(
    store: StoreProcess, backend: str, clients: int, seconds: float
) -> Cell:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
    channels = [grpc.aio.insecure_channel(store.address, options=options) for _ in range(clients)]
    try:
        stubs = [kvstore_pb2_grpc.KVStoreStub(channel) for channel in channels]
        # Connected and warm before the clock starts.
        described = await asyncio.gather(
            *(s.Describe(kvstore_pb2.DescribeRequest()) for s in stubs)
        )
        if described[0].index_backend != backend:
            raise RuntimeError(f"asked for a {backend} index, the store runs "
                               f"{described[0].index_backend!r}")
        recorder = Recorder()
        start = time.perf_counter()
        await asyncio.gather(*(
            run_client(RemoteHostKV(channel, StoreIdentity.of(desc), fingerprint=FINGERPRINT,
                                    timeout_s=STOP_TIMEOUT_S),
                       f"{backend}-c{clients}-{i}", seed=i, deadline=start + seconds,
                       recorder=recorder)
            for i, (channel, desc) in enumerate(zip(channels, described, strict=True))
        ))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return recorder.cell(backend, clients, elapsed)


@contextlib.asynccontextmanager
async def running_store(
    backend: str, num_blocks: int, redis_url: str | None
) -> AsyncIterator[StoreProcess]:
    """A store process on a free port; stopped by SIGTERM, which must leave no segment."""
    arena_base = f"{ARENA_PREFIX}bench-{uuid.uuid4().hex[:8]}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.kvstore", "--host", "127.0.0.1", "--port", "0",
        "--instance-id", f"bench-{backend}", "--arena-name", arena_base,
        "--num-blocks", str(num_blocks), "--block-bytes", str(BLOCK_BYTES),
        "--block-size", str(BLOCK_SIZE), "--fingerprint", FINGERPRINT,
        *(["--redis-url", redis_url] if redis_url else []),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        if not line.startswith("kvstore ready"):
            raise RuntimeError(f"the {backend} store failed to start: {line!r}")
        fields = dict(item.split("=", 1) for item in line.split()[2:])
        yield StoreProcess(process, f"127.0.0.1:{fields['port']}", fields["arena"])
    finally:
        code = await _stop(process)
        leftovers = sorted(SHM_DIR.glob(f"{arena_base}*"))
        for path in leftovers:
            path.unlink(missing_ok=True)
    if code != 0 or leftovers:
        raise RuntimeError(
            f"the {backend} store stopped uncleanly: exit code {code}, segments left "
            f"behind (now removed): {[p.name for p in leftovers]}"
        )


async def _stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


async def measure_backend(
    backend: str, clients: Sequence[int], seconds: float, redis_url: str | None
) -> tuple[list[Cell], str]:
    """The backend's cells, and the name of the segment its store used."""
    blocks_per_conversation = math.ceil(
        (CONVERSATION_TOKENS + USER_TOKENS_PER_TURN + SWAPS_PER_TURN * DECODE_TOKENS_PER_SWAP)
        / BLOCK_SIZE
    )
    num_blocks = 2 * max(clients) * blocks_per_conversation
    cells = []
    async with running_store(backend, num_blocks, redis_url) as store:
        for n in clients:
            _progress(f"{backend}: {n} client(s) for {seconds:g} s ...")
            cell = await measure_cell(store, backend, n, seconds)
            _progress(f"{backend}: {n} client(s): {total_ops_per_s(cell):,.0f} ops/s")
            cells.append(cell)
    return cells, store.arena


async def run(backends: Sequence[str], clients: Sequence[int], seconds: float) -> dict:
    cells: list[Cell] = []
    segments: list[str] = []
    for backend in backends:
        if backend == "memory":
            backend_cells, segment = await measure_backend(backend, clients, seconds, None)
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server is not installed; use --backends memory")
            with tempfile.TemporaryDirectory() as workdir, \
                    RedisProcess(binary, Path(workdir)) as redis_server:
                _progress(f"redis-server on port {redis_server.port}")
                backend_cells, segment = await measure_backend(
                    backend, clients, seconds, redis_server.url
                )
        cells += backend_cells
        segments.append(segment)
    return {
        "config": {
            "seconds_per_cell": seconds,
            "clients": list(clients),
            "backends": list(backends),
            "channels": "one grpc.aio channel (and connection) per client",
            "block_size": BLOCK_SIZE,
            "conversation_tokens": CONVERSATION_TOKENS,
            "swaps_per_turn": SWAPS_PER_TURN,
            "arena_segments": segments,
        },
        "cells": [asdict(cell) for cell in cells],
        # Redis against the embedded index, at each client count that ran (1: one round
        # trip a Reserve; 64: group commit at work). The figure is the 64 one.
        "redis_over_memory": {str(n): backend_ratio(cells, "redis", "memory", clients=n)
                              for n in clients},
        "redis_over_memory_64": backend_ratio(cells, "redis", "memory", clients=64),
    }


def total_ops_per_s(cell: Cell) -> float:
    return sum(s.count for s in cell.ops.values()) / cell.seconds


def backend_ratio(cells: Sequence[Cell], over: str, under: str, clients: int) -> float | None:
    """`over`'s total ops/s at `clients` divided by `under`'s; None unless both ran."""
    rates = {c.backend: total_ops_per_s(c) for c in cells if c.clients == clients}
    if over not in rates or under not in rates:
        return None
    return rates[over] / rates[under]


def format_table(cells: Sequence[dict]) -> str:
    header = f"{'backend':<8} {'clients':>7}  {'op':<8} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
    lines = [header, "-" * len(header)]
    for cell in cells:
        for op, s in cell["ops"].items():
            lines.append(
                f"{cell['backend']:<8} {cell['clients']:>7}  {op:<8} {s['ops_per_s']:>9,.0f} "
                f"{s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kvstore_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--seconds", type=float, default=2.5, help="measured time per cell")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    args = parser.parse_args(argv)
    if args.seconds <= 0 or min(args.clients) <= 0:
        parser.error("--seconds and --clients must be positive")
    report = uvloop.run(run(args.backends, args.clients, args.seconds))
    print(format_table(report["cells"]))
    for n, ratio in report["redis_over_memory"].items():
        if ratio is not None:
            print(f"redis_over_memory at {n} clients: {ratio:.2f}")
    if report["redis_over_memory_64"] is not None:
        print(f"redis_over_memory_64: {report['redis_over_memory_64']:.2f}")
    if args.json:
        write_json(args.json, report)
    return report


def _chain(tokens: list[int]) -> tuple[tuple[bytes, ...], int]:
    """The hash chain of `tokens` and their number: a Pin's or Reserve's last fields."""
    return tuple(block_hashes(tokens, BLOCK_SIZE, FINGERPRINT)), len(tokens)


async def _answered(client: RemoteHostKV, ops: list[HostOp]) -> list[HostReply]:
    """The replies of one Batch; raises if the store did not answer it."""
    replies = await client.execute(ops)
    if client.failing:
        raise RuntimeError("the KV store did not answer a Batch (see the log)")
    return replies


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
