"""Two KV store instances on one Redis index, with an executor and a scheduler, as processes.

Shows the scaling contract end to end: new conversations are placed by the rendezvous rule
of `services/scheduler/host_router.py`, a conversation's next turn is served from the
instance that holds it (bit-identical to a cold run, so the executor read the right arena
at the right blocks), and when one instance stops its conversations recompute, correctly,
while the other instance keeps serving reuse and takes every new conversation.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.client import FastSwitchClient, Generation
from common.kv.host_ops import Unpin
from common.shm.arena import SHM_DIR
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.launch import LocalStack, StackConfig
from services.scheduler.host_router import rendezvous_owner
from tests.support.redis_server import RedisServer
from tests.support.stores import BatchCalls

pytestmark = pytest.mark.process

PROMPT_TOKENS = 40
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[LocalStack]:
    # Without the device prefix cache, every next turn's reuse comes from the stores.
    config = StackConfig(num_gpu_blocks=128, num_host_blocks=256, num_kvstores=2,
                         switches="-device_cache", redis_url=redis_server.url,
                         log_dir=str(tmp_path_factory.mktemp("scaling-logs")))
    with LocalStack(config) as s:
        yield s


class Stores:
    """The stack's store instances, by instance id, in the scheduler's order."""

    def __init__(self, stack: LocalStack) -> None:
        assert stack.describe is not None
        self.fingerprint = stack.describe.model_fingerprint
        self.block_size = stack.describe.geometry.block_size
        self.address: dict[str, str] = {}
        self.arena: dict[str, str] = {}
        for address in stack.kvstore_addresses:
            with grpc.insecure_channel(address) as channel:
                desc = kv_grpc.KVStoreStub(channel).Describe(kv.DescribeRequest())
            self.address[desc.instance_id] = address
            self.arena[desc.instance_id] = desc.arena_name
        self.ids = list(self.address)

    def lookup(self, via: str, conv: str, tokens: list[int]) -> kv.PinnedReply:
        """A Pin (and its Unpin) through `via`: its valid tokens there, and the holder."""
        with grpc.insecure_channel(self.address[via]) as channel:
            stub = kv_grpc.KVStoreStub(channel)
            calls = BatchCalls(stub, self.fingerprint, self.block_size)
            pinned = stub.Batch(calls.request(calls.pin_op(conv, tokens))).replies[0].pinned
            stub.Batch(calls.request(Unpin(pinned.pin_id)))
            return pinned

    def used_blocks(self, instance: str) -> int:
        with grpc.insecure_channel(self.address[instance]) as channel:
            return kv_grpc.KVStoreStub(channel).Stats(kv.StatsRequest()).used_blocks

    async def holder(self, via: str, conv: str, tokens: list[int]) -> str:
        """The instance holding `conv`'s prompt, once the finished turn's offload landed."""
        for _ in range(100):
            reply = await asyncio.to_thread(self.lookup, via, conv, tokens)
            if reply.valid_tokens or reply.holder_id != via:  # a peer holds more
                return reply.holder_id
            await asyncio.sleep(0.05)
        raise AssertionError(f"no instance holds {conv!r} after its turn finished")


def convs_owned_by(owner: str, ids: list[str], prefix: str, n: int) -> list[str]:
    names = (f"{prefix}-{i}" for i in range(10_000))
    return [c for c in names if rendezvous_owner(c, ids) == owner][:n]


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(PROMPT_TOKENS)]


def ids_of(gen: Generation) -> list[int]:
    return [t.id for t in gen.tokens]


async def test_two_stores_place_serve_and_survive_one_stopping(stack: LocalStack) -> None:
    stores = Stores(stack)
    assert len(stores.ids) == 2
    first, second = stores.ids  # the second's arena sits after the first's in host ids
    convs = {owner: convs_owned_by(owner, stores.ids, f"turns-{owner}", 2) for owner in stores.ids}
    history: dict[str, list[int]] = {}
    async with FastSwitchClient(stack.scheduler_address) as client:
        await client.wait_ready()

        async def turn(conv: str, tokens: list[int]) -> Generation:
            return await client.generate(tokens, client_id="u", conversation_id=conv,
                                         max_tokens=MAX_TOKENS).collect()

        # (a) First turns land on their rendezvous owners, so both instances get work.
        for n, (owner, owned) in enumerate(convs.items()):
            for k, conv in enumerate(owned):
                tokens = prompt(10 * n + k)
                gen = await turn(conv, tokens)
                assert gen.final.reused_prompt_tokens == 0
                history[conv] = tokens + ids_of(gen)
                assert await stores.holder(first, conv, tokens) == owner
                assert (await asyncio.to_thread(stores.lookup, second, conv, tokens)
                        ).holder_id == owner  # either instance names the same holder
        assert stores.used_blocks(first) > 0 and stores.used_blocks(second) > 0

        # (b) Next turns are served from the holder's arena, and match a cold run.
        for owner, owned in convs.items():
            conv = owned[0]
            extended = history[conv] + [7, 8, 9]
            warm = await turn(conv, extended)
            cold = await turn(f"cold-{conv}", extended)
            assert warm.final.reused_prompt_tokens > 0, owner
            assert cold.final.reused_prompt_tokens == 0
            assert ids_of(warm) == ids_of(cold), owner
            history[conv] = extended + ids_of(warm)

        # (c) The second instance stops: its chains leave the shared index with it.
        child = next(c for c in stack.children if c.address == stores.address[second])
        assert stack.stop_child(child) == 0
        assert not (SHM_DIR / stores.arena[second]).exists()
        for conv in convs[second]:
            gone = stores.lookup(first, conv, history[conv])
            assert (gone.valid_tokens, gone.holder_id) == (0, first)
        for conv in convs[second]:  # its conversations recompute, with correct output
            extended = history[conv] + [4, 5, 6]
            after = await turn(conv, extended)
            cold = await turn(f"cold2-{conv}", extended)
            assert after.final.reused_prompt_tokens == 0
            assert ids_of(after) == ids_of(cold)
            assert after.final.completion_tokens > 0
        for conv in convs[first]:  # the live instance's conversations still reuse
            warm = await turn(conv, history[conv] + [1, 2, 3])
            assert warm.final.reused_prompt_tokens > 0
        assert (await client.stats()).kvstore_degraded
        fresh = convs_owned_by(second, stores.ids, "fresh", 2) + convs_owned_by(
            first, stores.ids, "fresh", 1)
        for k, conv in enumerate(fresh):  # new ones go to the live instance, whatever
            tokens = prompt(100 + k)     # their owner with both up would have been
            await turn(conv, tokens)
            assert await stores.holder(first, conv, tokens) == first


def test_more_than_one_store_needs_a_shared_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        StackConfig(num_kvstores=2, log_dir=str(tmp_path))
