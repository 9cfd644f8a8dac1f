"""Host KV bandwidth of the two paths to a KV store, side by side in one run.

  shm   the store's arena is mapped: a swap is one copy between the KV cache and the
        arena (here a numpy copy between a buffer standing for the cache and an arena)
  bulk  the store is on another host: the executor copies into a local mirror arena, and
        the scheduler's `MirroredStore` (services/scheduler/remote_tier.py) moves the
        blocks over gRPC: WriteBlocks before the Commit, ReadBlocks after the Pin

Each repeat reserves `--blocks` blocks of one conversation on a real `services.kvstore`
process, then times, in turn: the shm write (cache to mirror), the bulk write (a Commit
through `MirroredStore`: the push and the Batch), the shm read (mirror to cache) and the
bulk read (a Pin through `MirroredStore`: the Batch and the pull, after the mirror is
wiped). The pulled bytes are checked against the written ones after timing, so a wrong
transfer cannot report a fast time. GB/s are 1e9 bytes per second, medians over repeats.

A bulk swap costs its shm copy too (into or out of the mirror), so `bulk_over_shm_*` (bulk
GB/s over shm GB/s) reads as how much slower a remote store's tier is than a local one.
With `--netns` (root) the store runs in a network namespace of its own with a private
/dev/shm (benchmarks/netns.py), so the bytes cross a veth link, as to another host;
without it they cross loopback.

Run: python -m benchmarks.remote_tier [--json FILE] [--blocks 128] [--block-bytes 1048576]
     [--repeats 5] [--netns]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import uvloop

from benchmarks.cli import write_json
from benchmarks.netns import OtherHost
from common.auth import bearer_interceptors
from common.kv.block_hash import block_hashes
from common.kv.extent import Extent, runs
from common.kv.host_ops import Commit, Pin, Pinned, Release, Reserve, Reserved, Unpin
from common.shm.arena import HostArena
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity
from services.scheduler.remote_tier import MirroredStore

FINGERPRINT = "bench-remote-tier"
BLOCK_SIZE = 16
STOP_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
PATHS = ("shm_write", "bulk_write", "shm_read", "bulk_read")


@contextlib.asynccontextmanager
async def running_store(
    num_blocks: int, block_bytes: int, token: str, host: OtherHost | None,
) -> AsyncIterator[str]:
    """A store process (in `host`'s namespace, if given) on a free port; its address."""
    bind = host.address if host else "127.0.0.1"
    argv = [sys.executable, "-m", "services.kvstore", "--host", bind, "--port", "0",
            "--num-blocks", str(num_blocks), "--block-bytes", str(block_bytes),
            "--block-size", str(BLOCK_SIZE), "--fingerprint", FINGERPRINT]
    process = await asyncio.create_subprocess_exec(
        *(host.command(argv) if host else argv), stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "FASTSWITCH_INTERNAL_TOKEN": token,
             "FASTSWITCH_INTERNAL_TOKEN_FILE": ""})
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        if not line.startswith("kvstore ready"):
            raise RuntimeError(f"the store failed to start: {line!r}")
        fields = dict(item.split("=", 1) for item in line.split()[2:])
        yield f"{bind}:{fields['port']}"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"the store stopped uncleanly: exit code {process.returncode}")


def block_rows(arena: HostArena, view: memoryview) -> np.ndarray:
    """The arena's blocks as rows of a (num_blocks, block_bytes) uint8 array over `view`."""
    return np.frombuffer(view, dtype=np.uint8).reshape(arena.num_blocks, arena.block_bytes)


def copy_extents(cache: np.ndarray, arena: np.ndarray, extents: Sequence[Extent], *,
                 into_arena: bool) -> None:
    """One copy per extent, as the executor's copy engine makes them: the cache's blocks in
    order, the arena's at `extents`."""
    at = 0
    for e in extents:
        span = slice(e.start, e.start + e.length)
        if into_arena:
            arena[span] = cache[at : at + e.length]
        else:
            cache[at : at + e.length] = arena[span]
        at += e.length


async def measure(tier: MirroredStore, cache: np.ndarray, repeats: int) -> dict[str, list[float]]:
    """Seconds of each path per repeat."""
    blocks = cache.shape[0]
    tokens = list(range(blocks * BLOCK_SIZE))
    chain = tuple(block_hashes(tokens, BLOCK_SIZE, FINGERPRINT))
    back = np.zeros_like(cache)
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    view = tier.mirror.view()
    mirror = block_rows(tier.mirror, view)
    mirror[:] = 0  # faulted in: the timings are of copies, not of first touches
    try:
        for r in range(repeats):
            conv = f"bench-{r}"
            [reserved] = await tier.execute([Reserve(1, conv, chain, len(tokens))])
            if not isinstance(reserved, Reserved) or reserved.reservation is None:
                raise RuntimeError("the store has no room for the blocks")
            extents = list(runs(reserved.reservation.new_blocks))
            start = time.perf_counter()
            copy_extents(cache, mirror, extents, into_arena=True)
            seconds["shm_write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await tier.execute([Commit(reserved.reservation.reservation_id)])
            seconds["bulk_write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            copy_extents(back, mirror, extents, into_arena=False)
            seconds["shm_read"].append(time.perf_counter() - start)
            if not np.array_equal(back, cache):
                raise RuntimeError("the bytes read back from the arena differ")
            mirror[:] = 0
            start = time.perf_counter()
            [pinned] = await tier.execute([Pin(2, conv, chain, len(tokens))])
            seconds["bulk_read"].append(time.perf_counter() - start)
            assert isinstance(pinned, Pinned)
            if len(pinned.pin.blocks) != blocks or not np.array_equal(
                    mirror[np.asarray(pinned.pin.blocks)], cache):
                raise RuntimeError("the bytes pulled back differ from those written")
            await tier.execute([Unpin(pinned.pin.pin_id), Release(conv)])
            _progress(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{path} {cache.nbytes / seconds[path][-1] / 1e9:.2f} GB/s" for path in PATHS))
    finally:
        del mirror
        view.release()
    return seconds


async def run(blocks: int, block_bytes: int, repeats: int, netns: bool) -> dict:
    token = secrets.token_urlsafe(16)
    cache = np.random.default_rng(0).integers(0, 256, (blocks, block_bytes), dtype=np.uint8)
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(OtherHost.create()) if netns else None
        async with running_store(blocks, block_bytes, token, host) as address:
            _progress(f"store at {address}{' (netns ' + host.namespace + ')' if host else ''}"
                      f"; {blocks} blocks of {block_bytes} B, {repeats} repeats")
            channel = grpc.aio.insecure_channel(address, interceptors=bearer_interceptors(token))
            try:
                described = await kv_grpc.KVStoreStub(channel).Describe(kv.DescribeRequest())
                client = RemoteHostKV(channel, StoreIdentity.of(described),
                                      fingerprint=FINGERPRINT, timeout_s=CALL_TIMEOUT_S)
                tier = MirroredStore(client, channel, HostArena.local(blocks, block_bytes),
                                     timeout_s=CALL_TIMEOUT_S)
                mirror = tier.mirror.name
                try:
                    seconds = await measure(tier, cache, repeats)
                finally:
                    tier.close()
            finally:
                await channel.close()
    gbps = {path: cache.nbytes / statistics.median(s) / 1e9 for path, s in seconds.items()}
    return {
        "config": {"blocks": blocks, "block_bytes": block_bytes, "bytes": cache.nbytes,
                   "repeats": repeats, "netns": netns, "store": address, "mirror": mirror,
                   "load_average": list(os.getloadavg())},
        **{f"{path}_gbps": gbps[path] for path in PATHS},
        "bulk_over_shm_write": gbps["bulk_write"] / gbps["shm_write"],
        "bulk_over_shm_read": gbps["bulk_read"] / gbps["shm_read"],
        "seconds": seconds,
    }


def format_table(report: dict) -> str:
    rows = [f"{'path':<6} {'write GB/s':>11} {'read GB/s':>10}"]
    for path in ("shm", "bulk"):
        rows.append(f"{path:<6} {report[f'{path}_write_gbps']:>11.2f} "
                    f"{report[f'{path}_read_gbps']:>10.2f}")
    rows.append(f"bulk/shm: write {report['bulk_over_shm_write']:.3f}, "
                f"read {report['bulk_over_shm_read']:.3f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote_tier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--blocks", type=int, default=128, help="blocks moved per transfer")
    parser.add_argument("--block-bytes", type=int, default=1 << 20, help="bytes per block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--netns", action="store_true",
                        help="run the store in a network namespace of its own (root)")
    args = parser.parse_args(argv)
    if min(args.blocks, args.block_bytes, args.repeats) <= 0:
        parser.error("--blocks, --block-bytes and --repeats must be positive")
    if args.netns and os.geteuid() != 0:
        parser.error("--netns needs root (ip netns, mount)")
    report = uvloop.run(run(args.blocks, args.block_bytes, args.repeats, args.netns))
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return report


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
