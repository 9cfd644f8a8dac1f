"""The `HostTier` contract, run against every tier: the embedded store, a KV store over
gRPC (served in-process), that store behind a mirror, and a router over it.

A new tier (a disk tier, say) joins `TIERS` and must pass the same tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from common.kv.block_hash import block_hashes
from common.kv.host_ops import (
    MISS,
    NO_PIN,
    Abort,
    Commit,
    HostOp,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
    unanswered,
)
from common.kv.reuse_index import ReuseIndex
from common.shm.arena import HostArena
from services.scheduler.host_router import HostRouter, RoutedStore
from services.scheduler.host_tier import HostTier
from services.scheduler.local_host import LocalHost
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity
from services.scheduler.remote_tier import MirroredStore
from tests.support.stores import Geometry, InProcessStore, serve_store

FP = "model-t"
GEOMETRY = Geometry(num_blocks=8, block_bytes=1024, block_size=4, fingerprint=FP)
TOKENS = list(range(10))  # three blocks, the last partial
TIERS = ["embedded", "store", "mirror", "router"]


def chain(tokens: list[int]) -> tuple[bytes, ...]:
    return tuple(block_hashes(tokens, GEOMETRY.block_size, FP))


def reserve(op_id: int, conv: str, tokens: list[int] = TOKENS) -> Reserve:
    return Reserve(op_id, conv, chain(tokens), len(tokens))


def pin(op_id: int, conv: str, tokens: list[int] = TOKENS) -> Pin:
    return Pin(op_id, conv, chain(tokens), len(tokens))


@dataclass
class Rig:
    tier: HostTier
    fail: Callable[[], Awaitable[None]] | None  # makes the tier's backing fail; None: never
    downs: list[str] = field(default_factory=list)


@pytest.fixture(params=TIERS)
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    if request.param == "embedded":
        arena = f"arena-{uuid.uuid4().hex[:8]}"  # never mapped: the index is all it needs
        index = ReuseIndex(fingerprint=FP, block_size=GEOMETRY.block_size,
                           num_blocks=GEOMETRY.num_blocks)
        yield Rig(LocalHost(index, arena), None)
        return
    store = await serve_store(GEOMETRY, f"fastswitch-tiertest-{uuid.uuid4().hex[:8]}")
    client = store.client()
    tier: HostTier = client
    if request.param == "mirror":
        tier = MirroredStore(client, store.channel,
                             HostArena.local(GEOMETRY.num_blocks, GEOMETRY.block_bytes))
    elif request.param == "router":
        tier = HostRouter([RoutedStore(client, 0)], fingerprint=FP,
                          block_size=GEOMETRY.block_size)
    rig = Rig(tier, store.stop)
    if not isinstance(tier, HostRouter):  # a router's members report to it, not it to us
        tier.on_down = rig.downs.append
    try:
        yield rig
    finally:
        tier.close()
        await store.channel.close()
        await store.stop()


async def test_it_is_a_host_tier_with_arenas_to_map(rig: Rig) -> None:
    assert isinstance(rig.tier, HostTier)
    assert rig.tier.arenas and all(isinstance(a, str) and a for a in rig.tier.arenas)
    assert not rig.tier.degraded


async def test_exactly_reserves_and_pins_are_answered_in_their_order(rig: Rig) -> None:
    ops: list[HostOp] = [reserve(1, "a"), Release("x"), pin(2, "b"), Abort(12345),
                         reserve(3, "c"), Unpin(NO_PIN), Commit(54321), pin(4, "a")]
    replies = await rig.tier.execute(ops)
    assert [(type(r), r.op_id) for r in replies] == [
        (Reserved, 1), (Pinned, 2), (Reserved, 3), (Pinned, 4)]
    assert replies[1].hit == MISS and replies[3].hit == MISS  # nothing committed yet


async def test_a_pin_finds_what_was_committed_in_the_tiers_own_blocks(rig: Rig) -> None:
    [reserved] = await rig.tier.execute([reserve(1, "c")])
    assert isinstance(reserved, Reserved) and reserved.reservation is not None
    blocks = reserved.reservation.new_blocks
    assert len(blocks) == 3 and all(0 <= b < GEOMETRY.num_blocks for b in blocks)
    [pinned] = await rig.tier.execute([Commit(reserved.reservation.reservation_id),
                                       pin(2, "c")])
    assert isinstance(pinned, Pinned)
    assert pinned.hit.num_tokens == 10 and pinned.hit.blocks == blocks
    assert pinned.pin.pin_id != NO_PIN and pinned.pin.blocks == blocks
    await rig.tier.execute([Unpin(pinned.pin.pin_id), Release("c")])
    [gone] = await rig.tier.execute([pin(3, "c")])
    assert gone.hit == MISS


async def test_an_aborted_or_uncommitted_reservation_is_not_found(rig: Rig) -> None:
    [aborted, pending] = await rig.tier.execute([reserve(1, "a"), reserve(2, "b")])
    assert aborted.reservation is not None and pending.reservation is not None
    replies = await rig.tier.execute([Abort(aborted.reservation.reservation_id),
                                      pin(3, "a"), pin(4, "b")])
    assert [r.hit for r in replies] == [MISS, MISS]


async def test_no_room_is_a_reservation_of_none(rig: Rig) -> None:
    too_long = list(range(GEOMETRY.block_size * GEOMETRY.num_blocks + 1))
    assert await rig.tier.execute([reserve(1, "c", too_long)]) == [Reserved(1, None)]


async def test_a_tier_that_fails_answers_unanswered_reports_it_and_never_raises(
    rig: Rig,
) -> None:
    if rig.fail is None:
        pytest.skip("this tier has nothing that can fail")
    await rig.fail()
    ops: list[HostOp] = [reserve(1, "c"), Commit(7), pin(2, "c"), Release("c")]
    assert await rig.tier.execute(ops) == unanswered(ops)
    assert rig.downs or rig.tier.degraded


async def test_remap_is_true_only_when_an_arena_lands_elsewhere(rig: Rig) -> None:
    asked: list[str] = []

    def attach_at(first: int) -> Callable[[str], Awaitable[int | None]]:
        async def attach(name: str) -> int | None:
            asked.append(name)
            return first
        return attach

    assert not await rig.tier.remap(attach_at(0))
    assert asked == list(rig.tier.arenas)
    assert await rig.tier.remap(attach_at(GEOMETRY.num_blocks))


async def test_a_store_answering_from_another_arena_is_down() -> None:
    """The store restarted with a new arena: the blocks its client was opened for are not
    the ones it names now."""
    store: InProcessStore = await serve_store(
        GEOMETRY, f"fastswitch-tiertest-{uuid.uuid4().hex[:8]}")
    try:
        stale = StoreIdentity(store.identity.instance_id, "arena-before-the-restart")
        client = RemoteHostKV(store.channel, stale, fingerprint=FP, timeout_s=5.0)
        downs: list[str] = []
        client.on_down = downs.append
        ops: list[HostOp] = [reserve(1, "c"), pin(2, "c")]
        assert await client.execute(ops) == unanswered(ops)
        assert downs and store.identity.arena_name in downs[0]
        assert await client.describe() == store.identity
    finally:
        await store.channel.close()
        await store.stop()
