"""HostRouter without processes: the placement rule, global ids, holders, and failover.

Each fake store is an in-process `ReuseIndex`; a shared dict of them stands in for the Redis
index through which a Lookup on one instance finds another instance's chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import pytest

from common.kv.reuse_index import (
    Hit,
    HostCapacityExhausted,
    PinHandle,
    Reservation,
    ReuseIndex,
    StaleReservation,
)
from services.scheduler.host_router import (
    NO_PIN,
    HostRouter,
    RoutedStore,
    StoreIdentity,
    rendezvous_owner,
)

FINGERPRINT = "fp"
BLOCK_SIZE = 4
TOKENS = list(range(10))  # three blocks, the last one partial


class FakeStore:
    """A store that answers like RemoteHostKV; unreachable, it degrades the same way."""

    def __init__(self, instance_id: str, num_blocks: int, shared: dict[str, FakeStore]) -> None:
        self.identity_now: StoreIdentity | None = StoreIdentity(instance_id, f"arena-{instance_id}")
        self.index = ReuseIndex(fingerprint=FINGERPRINT, block_size=BLOCK_SIZE,
                                num_blocks=num_blocks)
        self.shared = shared
        shared[instance_id] = self
        self.reachable = True
        self.on_unreachable = None
        self.calls: list[str] = []

    @property
    def instance_id(self) -> str:
        return next(i for i, s in self.shared.items() if s is self)

    def _answers(self, method: str) -> bool:
        self.calls.append(method)
        if not self.reachable and self.on_unreachable is not None:
            self.on_unreachable()
        return self.reachable

    def hold(self, conv: str, tokens: Sequence[int]) -> None:
        """Puts a committed chain here directly, as an earlier scheduler would have."""
        self.index.commit(self.index.reserve(conv, tokens).reservation_id)

    def identity(self) -> StoreIdentity | None:
        return self.identity_now if self.reachable else None

    def lookup(self, conv: str, tokens: Sequence[int]) -> tuple[Hit, str]:
        if not self._answers("lookup"):
            return Hit(0, ()), ""
        best, holder = self.index.lookup(conv, tokens), self.instance_id
        for peer_id, peer in self.shared.items():
            hit = peer.index.lookup(conv, tokens)
            if hit.num_tokens > best.num_tokens:
                best, holder = hit, peer_id
        return best, holder

    def reserve(self, conv: str, tokens: Sequence[int]) -> Reservation:
        if not self._answers("reserve"):
            raise HostCapacityExhausted("unreachable")
        return self.index.reserve(conv, tokens)

    def commit(self, reservation_id: int) -> None:
        if not self._answers("commit"):
            raise StaleReservation("unreachable")
        self.index.commit(reservation_id)

    def abort(self, reservation_id: int) -> None:
        if self._answers("abort"):
            self.index.abort(reservation_id)

    def pin(self, conv: str, tokens: Sequence[int]) -> tuple[Hit, PinHandle]:
        if not self._answers("pin"):
            return Hit(0, ()), PinHandle(NO_PIN, ())
        return self.index.pin(conv, tokens)

    def unpin(self, pin_id: int) -> None:
        if self._answers("unpin"):
            self.index.unpin(pin_id)

    def release(self, conv: str) -> None:
        if self._answers("release"):
            self.index.release(conv)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(ids: Sequence[str], blocks: int = 10, clock: Clock | None = None
         ) -> tuple[HostRouter, dict[str, FakeStore]]:
    shared: dict[str, FakeStore] = {}
    stores = [FakeStore(i, blocks, shared) for i in ids]
    router = HostRouter(
        [RoutedStore(s, s.identity_now, k * blocks)  # type: ignore[arg-type]
         for k, s in enumerate(stores)],
        fingerprint=FINGERPRINT, block_size=BLOCK_SIZE, retry_s=5.0, clock=clock or Clock(),
    )
    return router, shared


def conv_owned_by(owner: str, ids: Sequence[str], prefix: str = "conv") -> str:
    return next(c for c in (f"{prefix}-{n}" for n in range(1000))
                if rendezvous_owner(c, ids) == owner)


def test_the_rule_is_the_documented_rendezvous_hash() -> None:
    ids = ["kv-a", "kv-b", "kv-c"]
    for conv in ("alice", "bob", "conv-17", ""):
        weights = {i: int.from_bytes(hashlib.blake2b(f"{i}\0{conv}".encode(),
                                                     digest_size=8).digest(), "big")
                   for i in ids}
        assert rendezvous_owner(conv, ids) == max(weights, key=weights.__getitem__)


def test_the_rule_spreads_evenly_and_moves_only_a_lost_instances_conversations() -> None:
    ids = ["kv-a", "kv-b", "kv-c"]
    convs = [f"conv-{n}" for n in range(900)]
    owners = {c: rendezvous_owner(c, ids) for c in convs}
    shares = {i: sum(o == i for o in owners.values()) for i in ids}
    assert all(240 <= n <= 360 for n in shares.values()), shares
    after = {c: rendezvous_owner(c, ["kv-a", "kv-c"]) for c in convs}
    assert all(after[c] == owners[c] for c in convs if owners[c] != "kv-b")


def test_one_store_keeps_its_own_ids() -> None:
    router, shared = make(["only"])
    store = shared["only"].index
    twin = ReuseIndex(fingerprint=FINGERPRINT, block_size=BLOCK_SIZE, num_blocks=10)
    res, expected = router.reserve("c", TOKENS), twin.reserve("c", TOKENS)
    assert res == replace(expected, reservation_id=res.reservation_id)  # ids are random
    store.commit(res.reservation_id)  # the router's id is the store's own
    twin.commit(expected.reservation_id)
    assert router.lookup("c", TOKENS) == twin.lookup("c", TOKENS)
    (hit, handle), (twin_hit, twin_handle) = router.pin("c", TOKENS), twin.pin("c", TOKENS)
    assert hit == twin_hit and handle.blocks == twin_handle.blocks
    store.unpin(handle.pin_id)


def test_ids_are_global_and_calls_find_their_store() -> None:
    ids = ["kv-a", "kv-b"]
    router, shared = make(ids)
    conv = conv_owned_by("kv-b", ids)
    res = router.reserve(conv, TOKENS)
    assert res.new_blocks and all(10 <= b < 20 for b in res.new_blocks)  # kv-b's arena
    assert res.reservation_id % 2 == 1  # the instance index is in the id
    router.commit(res.reservation_id)
    assert shared["kv-b"].index.lookup(conv, TOKENS).num_tokens == 10
    assert shared["kv-a"].index.lookup(conv, TOKENS).num_tokens == 0
    hit = router.lookup(conv, TOKENS)
    assert hit == Hit(10, res.new_blocks)
    _, handle = router.pin(conv, TOKENS)
    assert handle.blocks == hit.blocks and handle.pin_id % 2 == 1
    assert shared["kv-b"].index.stats().pinned == 3
    router.unpin(handle.pin_id)
    assert shared["kv-b"].index.stats().pinned == 0
    router.unpin(NO_PIN)  # a pin that was never made: nothing to call
    assert "unpin" not in shared["kv-a"].calls


def test_a_held_conversation_is_served_by_its_holder() -> None:
    ids = ["kv-a", "kv-b"]
    router, shared = make(ids)
    conv = conv_owned_by("kv-a", ids)
    shared["kv-b"].hold(conv, TOKENS)  # placed on b while a was down, say
    held = shared["kv-b"].index.lookup(conv, TOKENS)
    hit = router.lookup(conv, TOKENS)  # asks a, whose shared index names b
    assert hit == Hit(10, tuple(10 + b for b in held.blocks))
    assert router.pin(conv, TOKENS)[0] == hit
    longer = router.reserve(conv, [*TOKENS, 10, 11, 12, 13])
    assert longer.valid_blocks == hit.blocks[:2]  # on b, reusing its whole blocks
    assert "pin" not in shared["kv-a"].calls and "reserve" not in shared["kv-a"].calls


def test_a_chain_in_a_store_the_router_does_not_know_is_a_miss() -> None:
    router, shared = make(["kv-a"])
    FakeStore("stranger", 10, shared).hold("c", TOKENS)
    assert router.lookup("c", TOKENS) == Hit(0, ())


def test_a_store_that_fails_is_left_out_then_probed_back() -> None:
    ids = ["kv-a", "kv-b"]
    clock = Clock()
    router, shared = make(ids, clock=clock)
    conv = conv_owned_by("kv-b", ids)
    router.commit(router.reserve(conv, TOKENS).reservation_id)
    pending = router.reserve(conv_owned_by("kv-b", ids, "pending"), TOKENS)
    shared["kv-b"].reachable = False
    assert router.lookup(conv, TOKENS) == Hit(0, ())  # b is asked, fails: marked down
    assert router.degraded
    calls = len(shared["kv-b"].calls)
    fresh = router.reserve(conv_owned_by("kv-b", ids, "fresh"), TOKENS)
    assert all(b < 10 for b in fresh.new_blocks)  # b's new conversations go to a
    assert router.lookup(conv, TOKENS) == Hit(0, ())  # its old ones recompute
    with pytest.raises(StaleReservation):
        router.commit(pending.reservation_id)
    assert len(shared["kv-b"].calls) == calls  # nothing more was sent to the down store
    shared["kv-b"].reachable = True
    clock.now += 4.9
    router.probe_down()
    assert router.lookup(conv, TOKENS) == Hit(0, ())  # not probed before retry_s
    clock.now += 0.2
    router.probe_down()
    assert router.reserve(conv_owned_by("kv-b", ids, "later"), TOKENS).reservation_id % 2 == 1
    assert not router.degraded
    assert router.lookup(conv, TOKENS).num_tokens == 10  # its chains were never lost


def test_a_store_back_with_another_arena_stays_out() -> None:
    ids = ["kv-a", "kv-b"]
    clock = Clock()
    router, shared = make(ids, clock=clock)
    shared["kv-b"].reachable = False
    router.lookup(conv_owned_by("kv-b", ids), TOKENS)
    shared["kv-b"].reachable = True
    shared["kv-b"].identity_now = StoreIdentity("kv-b", "arena-kv-b-restarted")
    clock.now += 10
    assert router.probe_down() == [(1, shared["kv-b"].identity_now)]  # to be mapped
    assert all(b < 10 for b in router.reserve(conv_owned_by("kv-b", ids), TOKENS).new_blocks)
    assert router.degraded


def test_a_store_back_with_another_arena_rejoins_where_the_executor_maps_it() -> None:
    ids = ["kv-a", "kv-b"]
    clock = Clock()
    router, shared = make(ids, clock=clock)
    shared["kv-b"].reachable = False
    router.lookup(conv_owned_by("kv-b", ids), TOKENS)
    shared["kv-b"].reachable = True
    shared["kv-b"].identity_now = StoreIdentity("kv-b", "arena-kv-b-restarted")
    clock.now += 10
    [(index, identity)] = router.probe_down()
    router.rejoin(index, identity, 20)  # appended after a's and b's old arena
    assert not router.degraded
    assert router.stores[1].identity == identity
    conv = conv_owned_by("kv-b", ids, "new")
    assert all(20 <= b < 30 for b in router.reserve(conv, TOKENS).new_blocks)
    assert not router.rebase([0, 20])  # an executor restart that mapped them as before
    assert router.rebase([0, 10])  # one that mapped them without the old arena between
    newer = router.reserve(conv_owned_by("kv-b", ids, "newer"), TOKENS)
    assert all(10 <= b < 20 for b in newer.new_blocks)


def test_no_live_store_means_recompute() -> None:
    router, shared = make(["kv-a"])
    shared["kv-a"].reachable = False
    router.lookup("c", TOKENS)
    with pytest.raises(HostCapacityExhausted):
        router.reserve("c", TOKENS)
    assert router.pin("c", TOKENS) == (Hit(0, ()), PinHandle(NO_PIN, ()))


def test_instance_ids_must_be_distinct() -> None:
    shared: dict[str, FakeStore] = {}
    store = FakeStore("kv-a", 10, shared)
    same = RoutedStore(store, StoreIdentity("kv-a", "x"), 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeat"):
        HostRouter([same, same], fingerprint=FINGERPRINT, block_size=BLOCK_SIZE)
