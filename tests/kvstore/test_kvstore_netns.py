"""The remote KV tier end to end: a KV store on "another host" (a network namespace with its
own loopback and /dev/shm, `benchmarks/netns.py`), reachable only over a veth link, serves
an executor and schedulers here through mirror arenas and the gRPC bulk path.

The executor cannot map that store's arena, so the scheduler falls back to a mirror; a
conversation's next turn, asked of a scheduler started after the one that saved it (so its
mirror began empty and every byte came back over the link), and requests preempted to the
store and back both match a run that reuses nothing. A remote store that restarts (a new
arena) is used again through the same mirror. `--kvstore-transport bulk` takes the same
path for a store on this host.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from benchmarks.netns import OtherHost
from common.auth import bearer_metadata
from common.client import FastSwitchClient, Generation
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.launch import Child, LocalStack, StackConfig, free_port, wait_serving
from tests.stack.test_stack import prompts, run_requests
from tests.support.stacks import executor_and_stores

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
BULK_LOG = "served over the gRPC bulk path via mirror"  # what the scheduler logs, per store


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The executor and a KV store on this host; without the device prefix cache every next
    turn's reuse comes from a store. A token: the remote store listens beyond loopback."""
    config = StackConfig(num_gpu_blocks=128, num_host_blocks=256, switches="-device_cache",
                         internal_token=secrets.token_urlsafe(16),
                         log_dir=str(tmp_path_factory.mktemp("netns-logs")))
    with executor_and_stores(config) as s:
        yield s


@dataclass
class RemoteStore:
    """A KV store process in a namespace of its own, listening on the veth link."""

    stack: LocalStack
    host: OtherHost
    argv: list[str]
    child: Child | None = None

    @property
    def address(self) -> str:
        assert self.child is not None
        return self.child.address

    def start(self) -> None:
        log = open(Path(self.stack.config.log_dir) / "remote-kvstore.log", "ab")  # noqa: SIM115
        with log:
            process = subprocess.Popen(
                self.host.command(self.argv), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "FASTSWITCH_INTERNAL_TOKEN": self.stack.config.internal_token,
                     "FASTSWITCH_INTERNAL_TOKEN_FILE": ""})
        port = self.argv[self.argv.index("--port") + 1]
        self.child = Child("kvstore", f"{self.host.address}:{port}", process, tuple(self.argv))
        wait_serving(self.child, 60)

    def stop(self) -> None:
        assert self.child is not None
        assert self.stack.stop_child(self.child) == 0, "the remote store did not stop cleanly"


@pytest.fixture(scope="module")
def remote_store(stack: LocalStack) -> Iterator[RemoteStore]:
    """A KV store of the executor's geometry on "another host"."""
    assert os.geteuid() == 0, "the netns test needs root (ip netns, mount)"
    assert stack.describe is not None
    geometry = stack.describe.geometry
    with OtherHost.create() as host:
        argv = [sys.executable, "-m", "services.kvstore", "--host", host.address,
                "--port", str(free_port()), "--num-blocks", "256",
                "--block-bytes", str(geometry.block_bytes),
                "--block-size", str(geometry.block_size),
                "--fingerprint", stack.describe.model_fingerprint]
        store = RemoteStore(stack, host, argv)
        try:
            store.start()
            yield store
        finally:
            if store.child is not None:
                store.stop()


def store_stats(stack: LocalStack, address: str) -> kv.StatsResponse:
    with grpc.insecure_channel(address) as channel:
        return kv_grpc.KVStoreStub(channel).Stats(
            kv.StatsRequest(), metadata=bearer_metadata(stack.config.internal_token))


def scheduler_log(stack: LocalStack) -> str:
    return (Path(stack.config.log_dir) / "scheduler.log").read_text()


def ids_of(gen: Generation) -> list[int]:
    return [t.id for t in gen.tokens]


async def turn(address: str, conv: str, tokens: list[int]) -> Generation:
    async with FastSwitchClient(address) as client:
        await client.wait_ready()
        return await client.generate(tokens, client_id="u", conversation_id=conv,
                                     max_tokens=8).collect()


async def warm_and_cold(address: str, conv: str, tokens: list[int], tail: list[int]
                        ) -> tuple[Generation, Generation]:
    """A first turn of `conv`, then its next turn (`tail` appended) and the same prompt in
    a fresh conversation."""
    history = tokens + ids_of(await turn(address, conv, tokens)) + tail
    return await turn(address, conv, history), await turn(address, f"cold-{conv}", history)


def test_the_executor_cannot_map_the_remote_arena(
    stack: LocalStack, remote_store: RemoteStore,
) -> None:
    with grpc.insecure_channel(remote_store.address) as channel:
        arena = kv_grpc.KVStoreStub(channel).Describe(
            kv.DescribeRequest(), metadata=stack.internal_metadata).arena_name
    assert not (Path("/dev/shm") / arena).exists()  # it lives in the namespace's /dev/shm
    with grpc.insecure_channel(stack.executor_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            ex_grpc.ExecutorStub(channel).AttachHostArena(
                ex.AttachHostArenaRequest(name=arena), metadata=stack.internal_metadata)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(f"127.0.0.1:{remote_store.address.rsplit(':')[1]}") as channel:
        with pytest.raises(grpc.RpcError) as info:  # the store is not on our loopback
            kv_grpc.KVStoreStub(channel).Describe(kv.DescribeRequest(), timeout=2,
                                                  metadata=stack.internal_metadata)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_a_next_turn_comes_back_over_the_link_and_matches_a_cold_run(
    stack: LocalStack, remote_store: RemoteStore,
) -> None:
    args = ["--kvstore", remote_store.address]
    tokens = [random.Random(7).randrange(256) for _ in range(40)]
    first = stack.start_scheduler(extra_args=args)
    try:
        gen = await turn(first.address, "conv-net", tokens)
        assert gen.final.reused_prompt_tokens == 0
    finally:
        assert stack.stop_child(first) == 0
    assert f"{BULK_LOG} " in scheduler_log(stack) and "(transport auto)" in scheduler_log(stack)
    assert store_stats(stack, remote_store.address).used_blocks > 0  # the turn went out
    history = tokens + ids_of(gen) + [7, 8, 9]
    second = stack.start_scheduler(extra_args=args)  # a new, empty mirror
    try:
        warm = await turn(second.address, "conv-net", history)
        cold = await turn(second.address, "cold-net", history)
        async with FastSwitchClient(second.address) as client:
            assert not (await client.stats()).kvstore_degraded
    finally:
        assert stack.stop_child(second) == 0
    assert warm.final.reused_prompt_tokens >= 32 and warm.final.bytes_swapped > 0
    assert cold.final.reused_prompt_tokens == 0
    assert ids_of(warm) == ids_of(cold)


async def test_requests_preempted_to_the_remote_store_match_a_run_alone(
    stack: LocalStack, remote_store: RemoteStore,
) -> None:
    reqs = prompts(8)
    outputs, stats = {}, {}
    for name, budget, concurrent in [("alone", 0, False), ("preempted", 24, True)]:
        child = stack.start_scheduler(extra_args=["--kvstore", remote_store.address,
                                                  "--kv-blocks", str(budget)])
        try:
            outputs[name] = await run_requests(child.address, reqs, concurrent=concurrent,
                                               shuffle_priorities=concurrent)
            async with FastSwitchClient(child.address) as client:
                stats[name] = await client.stats()
        finally:
            assert stack.stop_child(child) == 0
    assert stats["preempted"].preemptions > 0 and stats["preempted"].swap_out_bytes > 0
    assert not stats["preempted"].kvstore_degraded
    assert store_stats(stack, remote_store.address).hit_tokens > 0  # swapped back in
    assert outputs["preempted"] == outputs["alone"]


async def test_a_remote_store_that_restarts_is_used_again_through_its_mirror(
    stack: LocalStack, remote_store: RemoteStore,
) -> None:
    child = stack.start_scheduler(extra_args=["--kvstore", remote_store.address])
    try:
        async with FastSwitchClient(child.address) as client:
            await client.wait_ready()
            remote_store.stop()
            remote_store.start()  # a new arena, in a new private /dev/shm
            tokens = [random.Random(9).randrange(256) for _ in range(40)]
            await turn(child.address, "during", tokens)  # finds the old store gone
            assert (await client.stats()).kvstore_degraded
            for _ in range(300):  # the store is probed every few seconds
                if not (await client.stats()).kvstore_degraded:
                    break
                await asyncio.sleep(0.1)
            assert not (await client.stats()).kvstore_degraded
        warm, cold = await warm_and_cold(child.address, "after", tokens, [3, 4])
    finally:
        assert stack.stop_child(child) == 0
    assert " left: arena " in scheduler_log(stack)  # replaced, with a new mirror
    assert warm.final.reused_prompt_tokens >= 32 and warm.final.bytes_swapped > 0
    assert ids_of(warm) == ids_of(cold)


async def test_the_bulk_transport_serves_a_store_on_this_host_too(stack: LocalStack) -> None:
    local = stack.kvstore_address
    tokens = [random.Random(8).randrange(256) for _ in range(40)]
    child = stack.start_scheduler(extra_args=["--kvstore", local,
                                              "--kvstore-transport", "bulk"])
    try:
        warm, cold = await warm_and_cold(child.address, "conv-bulk", tokens, [1, 2])
    finally:
        assert stack.stop_child(child) == 0
    assert "(transport bulk)" in scheduler_log(stack)
    assert warm.final.reused_prompt_tokens >= 32 and warm.final.bytes_swapped > 0
    assert ids_of(warm) == ids_of(cold)
