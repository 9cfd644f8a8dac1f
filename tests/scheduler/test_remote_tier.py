"""`MirroredStore` against a real KV store over gRPC: a commit pushes the mirror's bytes
first, a pin pulls them back before it answers, and a transfer that fails never leaves the
store holding a chain without its bytes nor a swap-in reading stale mirror bytes."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from common.kv.block_hash import block_hashes
from common.kv.host_ops import (
    MISS,
    Commit,
    HostOp,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
)
from common.kv.reuse_index import PinHandle
from common.shm.arena import SHM_DIR, HostArena
from protos import kvstore_pb2
from services.scheduler.remote_host import RemoteHostKV
from services.scheduler.remote_tier import MirroredStore
from tests.support.stores import Geometry, InProcessStore, serve_store

FP = "model-a"
BLOCK_SIZE = 4
BLOCK_BYTES = 3 << 17  # 384 KiB: 1 MiB chunks end inside blocks
NUM_BLOCKS = 8
NOWHERE = "127.0.0.1:1"  # nothing listens: a bulk path that fails


def chain_of(tokens: list[int]) -> tuple[bytes, ...]:
    return tuple(block_hashes(tokens, BLOCK_SIZE, FP))


def pattern(block_hash: bytes) -> bytes:
    """What a block whose chain hash is `block_hash` holds (same prefix, same KV)."""
    return random.Random(block_hash).randbytes(BLOCK_BYTES)


def span(block: int) -> slice:
    return slice(block * BLOCK_BYTES, (block + 1) * BLOCK_BYTES)


class Store:
    """An in-process KV store, its stub, and mirrored clients of it."""

    def __init__(self, served: InProcessStore) -> None:
        self.served = served
        self.server = served.server
        self.channel = served.channel
        self.stub = served.stub
        self.client = served.client()

    async def stop(self) -> None:
        await self.served.stop()

    async def stats(self) -> kvstore_pb2.StatsResponse:
        return await self.stub.Stats(kvstore_pb2.StatsRequest())

    def store_bytes(self, block: int) -> bytes:
        with self.server.store.arena.view() as view:
            return bytes(view[span(block)])


@asynccontextmanager
async def running_store() -> AsyncIterator[Store]:
    name = f"fastswitch-tiertest-{uuid.uuid4().hex[:8]}"
    running = Store(await serve_store(Geometry(NUM_BLOCKS, BLOCK_BYTES, BLOCK_SIZE, FP), name))
    try:
        yield running
    finally:
        await running.channel.close()
        await running.stop()
    assert not (SHM_DIR / name).exists()


@contextmanager
def mirrored(client: RemoteHostKV, channel: grpc.aio.Channel) -> Iterator[MirroredStore]:
    tier = MirroredStore(client, channel, HostArena.local(NUM_BLOCKS, BLOCK_BYTES),
                         timeout_s=5.0)
    name = tier.mirror.name
    try:
        yield tier
    finally:
        tier.close()
    assert not (SHM_DIR / name).exists(), "close leaves the mirror behind"


def swap_out(tier: MirroredStore, reserved: Reserved, chain: tuple[bytes, ...]) -> None:
    """What the executor's swap-out does: the reservation's new blocks land in the mirror."""
    res = reserved.reservation
    assert res is not None
    with tier.mirror.view() as view:
        for k, block in enumerate(res.new_blocks):
            view[span(block)] = pattern(chain[len(res.valid_blocks) + k])


def wipe(tier: MirroredStore, keep: tuple[int, ...] = ()) -> None:
    """Zeroes the mirror but for the blocks `keep` (a swap-out still to be committed)."""
    with tier.mirror.view() as view:
        for block in set(range(NUM_BLOCKS)) - set(keep):
            view[span(block)] = bytes(BLOCK_BYTES)


def mirror_bytes(tier: MirroredStore, block: int) -> bytes:
    with tier.mirror.view() as view:
        return bytes(view[span(block)])


async def save(tier: MirroredStore, conv: str, tokens: list[int]) -> Reserved:
    chain = chain_of(tokens)
    [reserved] = await tier.execute([Reserve(1, conv, chain, len(tokens))])
    assert isinstance(reserved, Reserved) and reserved.reservation is not None
    swap_out(tier, reserved, chain)
    return reserved


async def test_a_commit_pushes_the_blocks_and_a_pin_pulls_them_back() -> None:
    tokens = list(range(14))  # four blocks, the last partial: 1.5 MiB, two chunks
    chain = chain_of(tokens)
    async with running_store() as store:
        with mirrored(store.client, store.channel) as tier:
            reserved = await save(tier, "c", tokens)
            res = reserved.reservation
            assert (await store.stats()).pending_reservations == 1
            assert await tier.execute([Commit(res.reservation_id)]) == []
            assert (await store.stats()).pending_reservations == 0  # committed
            for k, block in enumerate(res.new_blocks):
                assert store.store_bytes(block) == pattern(chain[k])
            wipe(tier)
            # A longer token list finds the full blocks (its fourth differs), pulled back.
            longer = [*tokens, 99, 98]
            [pinned] = await tier.execute([Pin(2, "c", chain_of(longer), 16)])
            assert pinned.hit.blocks == res.new_blocks[:3]
            for k, block in enumerate(pinned.pin.blocks):
                assert mirror_bytes(tier, block) == pattern(chain[k])
            await tier.execute([Unpin(pinned.pin.pin_id), Release("c")])
            stats = await store.stats()
            assert (stats.used_blocks, stats.pinned_blocks) == (0, 0)


async def test_a_commit_whose_push_fails_is_aborted() -> None:
    async with running_store() as store:
        async with grpc.aio.insecure_channel(NOWHERE) as nowhere:
            with mirrored(store.client, nowhere) as tier:  # Batch works, WriteBlocks fails
                tokens = list(range(8))
                reserved = await save(tier, "c", tokens)
                assert (await store.stats()).pending_reservations == 1
                await tier.execute([Commit(reserved.reservation.reservation_id)])
        stats = await store.stats()
        assert (stats.pending_reservations, stats.used_blocks) == (0, 0)  # aborted
        [pinned] = await store.client.execute([Pin(2, "c", chain_of(tokens), 8)])
        assert pinned.hit == MISS


async def test_a_commit_of_a_reservation_never_seen_is_aborted() -> None:
    async with running_store() as store:
        tokens = list(range(8))
        [reserved] = await store.client.execute(
            [Reserve(1, "c", chain_of(tokens), 8)])  # not through the mirror
        with mirrored(store.client, store.channel) as tier:
            await tier.execute([Commit(reserved.reservation.reservation_id)])
        stats = await store.stats()
        assert (stats.pending_reservations, stats.used_blocks) == (0, 0)


async def test_a_pin_whose_pull_fails_pins_nothing() -> None:
    tokens = list(range(8))
    async with running_store() as store:
        with mirrored(store.client, store.channel) as tier:
            reserved = await save(tier, "c", tokens)
            await tier.execute([Commit(reserved.reservation.reservation_id)])
        async with grpc.aio.insecure_channel(NOWHERE) as nowhere:
            with mirrored(store.client, nowhere) as tier:  # Batch works, ReadBlocks fails
                answer = await tier.execute([Pin(2, "c", chain_of(tokens), 8)])
                assert answer == [Pinned(2, MISS, PinHandle(0, ()))]
        stats = await store.stats()
        assert stats.pinned_blocks == 0 and stats.used_blocks == 2  # undone, still held


async def test_a_store_that_stops_mid_way_commits_nothing_and_answers_nothing() -> None:
    tokens = list(range(8))
    async with running_store() as store:
        with mirrored(store.client, store.channel) as tier:
            reserved = await save(tier, "c", tokens)
            await store.stop()
            answer = await tier.execute([Commit(reserved.reservation.reservation_id),
                                         Pin(2, "c", chain_of(tokens), 8)])
            assert answer == [Pinned(2, MISS, PinHandle(0, ()))]


# A step: (conversation, what): "save" reserves and swaps out the grown token list, its
# Commit going with the next batch; "pin" wipes the mirror (but for a swap-out whose
# Commit goes with it), pins, and checks the pulled bytes.
STEPS = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["save", "save", "pin",
                                                                "release"]),
                           st.integers(1, 9)), min_size=1, max_size=12)


@settings(max_examples=20, deadline=None)
@given(steps=STEPS, seed=st.integers(0, 2**16))
def test_bytes_pulled_through_the_mirror_are_those_written(
    steps: list[tuple[int, str, int]], seed: int,
) -> None:
    asyncio.run(_play(steps, random.Random(seed)))


async def _play(steps: list[tuple[int, str, int]], rng: random.Random) -> None:
    async with running_store() as store:
        with mirrored(store.client, store.channel) as tier:
            tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
            pending: list[HostOp] = []  # the last save's Commit, sent with the next batch
            swapped: tuple[int, ...] = ()  # its new blocks, which the Commit pushes
            for conv, what, grow in steps:
                name = f"conv-{conv}"
                if what == "save":
                    tokens[conv] += [rng.randrange(64) for _ in range(grow)]
                    chain = chain_of(tokens[conv])
                    answer = await tier.execute(
                        [*pending, Reserve(1, name, chain, len(tokens[conv]))])
                    [reserved] = answer
                    pending = []
                    if reserved.reservation is not None:  # else: no room, recompute
                        swap_out(tier, reserved, chain)
                        pending = [Commit(reserved.reservation.reservation_id)]
                        swapped = reserved.reservation.new_blocks
                elif what == "pin" and tokens[conv]:
                    wipe(tier, keep=swapped if pending else ())
                    chain = chain_of(tokens[conv])
                    [pinned] = await tier.execute(
                        [*pending, Pin(2, name, chain, len(tokens[conv]))])
                    pending = []
                    for k, block in enumerate(pinned.pin.blocks):
                        assert mirror_bytes(tier, block) == pattern(chain[k])
                    await tier.execute([Unpin(pinned.pin.pin_id)])
                elif what == "release":
                    await tier.execute([*pending, Release(name)])
                    pending = []
                    tokens[conv] = []
