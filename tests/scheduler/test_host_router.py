"""HostRouter without processes: the placement rule, batches, global ids, holders, failover.

Each fake store is an in-process `ReuseIndex` behind `host_ops.apply`; a shared dict of them
stands in for the Redis index through which a Pin on one instance names another instance
that holds more of the conversation.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from common.kv import host_ops
from common.kv.block_hash import block_hashes
from common.kv.host_ops import (
    MISS,
    NO_PIN,
    Abort,
    Commit,
    HostOp,
    HostReply,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
    unanswered,
)
from common.kv.reuse_index import ID_BITS, Hit, ReuseIndex
from services.scheduler.host_router import (
    LOCAL_MASK,
    HostRouter,
    RoutedStore,
    rendezvous_owner,
)
from services.scheduler.host_tier import HostTier
from services.scheduler.local_host import LocalHost
from services.scheduler.remote_host import StoreIdentity

FINGERPRINT = "fp"
BLOCK_SIZE = 4
TOKENS = list(range(10))  # three blocks, the last one partial
LONGER = [*TOKENS, 10, 11, 12, 13]


def chain(tokens: Sequence[int]) -> tuple[bytes, ...]:
    return tuple(block_hashes(tokens, BLOCK_SIZE, FINGERPRINT))


def reserve(op_id: int, conv: str, tokens: Sequence[int] = TOKENS) -> Reserve:
    return Reserve(op_id, conv, chain(tokens), len(tokens))


def pin(op_id: int, conv: str, tokens: Sequence[int] = TOKENS) -> Pin:
    return Pin(op_id, conv, chain(tokens), len(tokens))


def new_index(num_blocks: int = 10) -> ReuseIndex:
    return ReuseIndex(fingerprint=FINGERPRINT, block_size=BLOCK_SIZE, num_blocks=num_blocks)


class FakeStore(HostTier):
    """A store's tier that answers like RemoteHostKV opened for `identity`: unreachable, or
    answering from another arena (`identity_now`), it degrades the same way."""

    def __init__(self, instance_id: str, num_blocks: int, shared: dict[str, FakeStore]) -> None:
        self.instance_id = instance_id
        self.identity = self.identity_now = StoreIdentity(instance_id, f"arena-{instance_id}")
        self.index = new_index(num_blocks)
        self.shared = shared
        shared[instance_id] = self
        self.reachable = True
        self.batches: list[list[HostOp]] = []

    @property
    def arenas(self) -> tuple[str, ...]:
        return (self.identity.arena_name,)

    def hold(self, conv: str, tokens: Sequence[int]) -> None:
        """Puts a committed chain here directly, as an earlier scheduler would have."""
        self.index.commit(self.index.reserve(conv, tokens).reservation_id)

    async def describe(self) -> StoreIdentity | None:
        return self.identity_now if self.reachable else None

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        self.batches.append(list(ops))
        if not self.reachable or self.identity_now != self.identity:
            if self.on_down is not None:
                self.on_down("is unreachable" if not self.reachable else "moved")
            return unanswered(ops)
        pins = {op.op_id: op for op in ops if isinstance(op, Pin)}
        return [replace(r, holder=self._holder(pins[r.op_id])) if isinstance(r, Pinned) else r
                for r in host_ops.apply(self.index, ops)]

    def _holder(self, op: Pin) -> str:
        """The instance holding most of `op`'s prefix (this one on ties), as a store names
        it through the shared index."""
        def held(store: FakeStore) -> int:  # the chain stands for the tokens: only their count
            return store.index.lookup(op.conv, range(op.num_tokens), op.chain).num_tokens

        return max(self.shared.values(), key=lambda s: (held(s), s is self)).instance_id

    def sent(self) -> list[HostOp]:
        return [op for batch in self.batches for op in batch]


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
        [RoutedStore(s, k * blocks) for k, s in enumerate(stores)],
        fingerprint=FINGERPRINT, block_size=BLOCK_SIZE, retry_s=5.0, clock=clock or Clock(),
    )
    return router, shared


def conv_owned_by(owner: str, ids: Sequence[str], prefix: str = "conv") -> str:
    return next(c for c in (f"{prefix}-{n}" for n in range(1000))
                if rendezvous_owner(c, ids) == owner)


async def put(router: HostRouter, conv: str, tokens: Sequence[int] = TOKENS) -> Reserved:
    """Reserve, then commit: the conversation is held."""
    [res] = await router.execute([reserve(1, conv, tokens)])
    assert isinstance(res, Reserved) and res.reservation is not None
    await router.execute([Commit(res.reservation.reservation_id)])
    return res


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


async def test_one_store_keeps_its_own_ids_and_answers_as_the_embedded_store() -> None:
    router, shared = make(["only"])
    local = LocalHost(new_index(), "arena-local")
    tiers: list[HostTier] = [router, local]
    answers = []
    for tier in tiers:
        [res] = await tier.execute([reserve(1, "c")])
        assert isinstance(res, Reserved) and res.reservation is not None
        answers.append(res)
        answers.extend(await tier.execute(
            [Commit(res.reservation.reservation_id), pin(2, "c"), reserve(3, "c", LONGER)]))
    # Ids are random (unguessable), so the two answer alike but for them; the router's
    # ids are the store's own.
    def without_ids(replies: list) -> list:
        return [(r.reservation.valid_blocks, r.reservation.new_blocks) if isinstance(r, Reserved)
                else (r.hit, r.pin.blocks) for r in replies]

    assert without_ids(answers[:3]) == without_ids(answers[3:])
    pinned = answers[1]
    assert isinstance(pinned, Pinned) and pinned.hit == Hit(10, (0, 1, 2))
    assert pinned.pin.pin_id in shared["only"].index._pin_handles
    assert not router.degraded and not local.degraded


async def test_ids_and_blocks_are_global_and_ops_find_their_store() -> None:
    ids = ["kv-a", "kv-b"]
    router, shared = make(ids)
    conv = conv_owned_by("kv-b", ids)
    res = (await put(router, conv)).reservation
    assert res.new_blocks and all(10 <= b < 20 for b in res.new_blocks)  # kv-b's arena
    assert res.reservation_id >> ID_BITS == 1  # the store's slot is in the id
    assert shared["kv-b"].sent()[1] == Commit(res.reservation_id & LOCAL_MASK)  # its own
    assert shared["kv-b"].index.lookup(conv, TOKENS).num_tokens == 10
    assert shared["kv-a"].index.lookup(conv, TOKENS).num_tokens == 0
    [pinned] = await router.execute([pin(7, conv)])
    assert pinned.hit == Hit(10, res.new_blocks) and pinned.pin.blocks == res.new_blocks
    assert pinned.pin.pin_id >> ID_BITS == 1
    assert shared["kv-b"].index.stats().pinned == 3
    assert await router.execute([Unpin(pinned.pin.pin_id), Unpin(NO_PIN)]) == []
    assert shared["kv-b"].index.stats().pinned == 0
    assert shared["kv-b"].sent()[-1] == Unpin(pinned.pin.pin_id & LOCAL_MASK)
    assert shared["kv-a"].batches == []  # a pin never made: nothing to send


async def test_one_batch_per_store_in_order_and_replies_in_the_order_of_the_ops() -> None:
    ids = ["kv-a", "kv-b"]
    router, shared = make(ids, blocks=20)
    on_a = [conv_owned_by("kv-a", ids, p) for p in ("x", "y")]
    on_b = [conv_owned_by("kv-b", ids, p) for p in ("x", "y")]
    held = (await put(router, on_b[0])).reservation
    for store in shared.values():
        store.batches.clear()
    ops: list[HostOp] = [
        reserve(1, on_a[0]), pin(2, on_b[0]), Release(on_a[1]), reserve(3, on_b[1]),
        Abort(held.reservation_id + 1), pin(4, on_a[0]), Release(on_b[0]),
    ]
    replies = await router.execute(ops)
    assert [r.op_id for r in replies] == [1, 2, 3, 4]
    assert [len(s.batches) for s in shared.values()] == [1, 1]
    assert shared["kv-a"].batches[0] == [ops[0], ops[2], ops[5]]
    assert shared["kv-b"].batches[0] == [
        ops[1], ops[3], Abort((held.reservation_id & LOCAL_MASK) + 1), ops[6]]
    assert replies[1].hit.blocks == held.new_blocks  # pinned before b's release took it
    assert replies[3].hit == MISS  # a's reservation is pending, not committed
    assert shared["kv-b"].index.lookup(on_b[0], TOKENS).num_tokens == 0


async def test_a_held_conversation_is_served_by_its_holder() -> None:
    ids = ["kv-a", "kv-b"]
    router, shared = make(ids)
    conv = conv_owned_by("kv-a", ids)
    shared["kv-b"].hold(conv, TOKENS)  # placed on b while a was down, say
    held = tuple(10 + b for b in shared["kv-b"].index.lookup(conv, TOKENS).blocks)
    [first] = await router.execute([pin(1, conv)])  # asks a, whose shared index names b
    assert first.hit == MISS
    await router.execute([Unpin(first.pin.pin_id)])
    [second] = await router.execute([pin(2, conv)])
    assert second.hit == Hit(10, held)
    [longer] = await router.execute([Unpin(second.pin.pin_id), reserve(3, conv, LONGER)])
    assert longer.reservation.valid_blocks == held[:2]  # on b, reusing its whole blocks
    assert [type(op) for op in shared["kv-a"].sent()] == [Pin, Unpin]


async def test_a_chain_in_a_store_the_router_does_not_know_is_a_miss() -> None:
    router, shared = make(["kv-a"])
    FakeStore("stranger", 10, shared).hold("c", TOKENS)
    for op_id in (1, 2):
        [pinned] = await router.execute([pin(op_id, "c")])
        assert pinned.hit == MISS
    assert [type(op) for op in shared["kv-a"].sent()] == [Pin, Pin]  # never redirected


async def test_a_store_that_fails_is_left_out_then_probed_back() -> None:
    ids = ["kv-a", "kv-b"]
    clock = Clock()
    router, shared = make(ids, clock=clock)
    conv = conv_owned_by("kv-b", ids)
    await put(router, conv)
    [pending] = await router.execute([reserve(1, conv_owned_by("kv-b", ids, "pending"))])
    shared["kv-b"].reachable = False
    ops = [pin(2, conv), reserve(3, conv_owned_by("kv-a", ids))]
    assert router.degraded_seconds == 0.0
    replies = await router.execute(ops)  # b is asked, fails: marked down
    assert replies[0] == unanswered(ops[:1])[0] and replies[1].reservation is not None
    assert router.degraded and router.store_counts == (2, 1)
    sent = len(shared["kv-b"].sent())
    [fresh] = await router.execute([reserve(4, conv_owned_by("kv-b", ids, "fresh"))])
    assert all(b < 10 for b in fresh.reservation.new_blocks)  # b's new conversations go to a
    [again] = await router.execute([pin(5, conv), Commit(pending.reservation.reservation_id)])
    assert again.hit == MISS and again.pin.pin_id >> ID_BITS == 0  # old ones recompute, on a
    assert len(shared["kv-b"].sent()) == sent  # nothing more was sent to the down store
    shared["kv-b"].reachable = True
    clock.now += 4.9
    assert await router.probe_down() == []
    assert router.degraded  # not probed before retry_s
    clock.now += 0.2
    assert await router.probe_down() == []
    assert not router.degraded
    assert router.degraded_seconds == pytest.approx(5.1)
    clock.now += 100
    assert router.degraded_seconds == pytest.approx(5.1)  # only while degraded
    [later] = await router.execute([reserve(6, conv_owned_by("kv-b", ids, "later"))])
    assert later.reservation.reservation_id >> ID_BITS == 1
    [back] = await router.execute([pin(7, conv)])
    assert back.hit.num_tokens == 10  # its chains were never lost


async def test_a_store_back_with_another_arena_stays_out_until_it_is_replaced() -> None:
    ids = ["kv-a", "kv-b"]
    clock = Clock()
    router, shared = make(ids, clock=clock)
    conv = conv_owned_by("kv-b", ids)
    old = (await put(router, conv)).reservation
    shared["kv-b"].reachable = False
    await router.execute([pin(1, conv)])
    shared["kv-b"].reachable = True
    shared["kv-b"].identity_now = StoreIdentity("kv-b", "arena-kv-b-restarted")
    clock.now += 10
    [identity] = await router.probe_down()  # to be mapped
    assert identity == shared["kv-b"].identity_now
    [res] = await router.execute([reserve(2, conv_owned_by("kv-b", ids))])
    assert all(b < 10 for b in res.reservation.new_blocks) and router.degraded
    router.remove("kv-b")
    shared["kv-b"].identity = identity  # its driver opens it anew
    router.add(RoutedStore(shared["kv-b"], 20))  # after a's and b's old arena
    assert not router.degraded
    assert router.stores[1].identity == identity
    assert router.arenas == ("arena-kv-a", "arena-kv-b-restarted")
    [res] = await router.execute([reserve(3, conv_owned_by("kv-b", ids, "new"))])
    assert all(20 <= b < 30 for b in res.reservation.new_blocks)
    assert res.reservation.reservation_id >> ID_BITS == 2  # a new slot
    sent = len(shared["kv-b"].sent())
    await router.execute([Commit(old.reservation_id)])  # the old arena's: dropped
    assert len(shared["kv-b"].sent()) == sent
    # An executor restart that mapped them as before, then one without the old arena.
    assert not router.rebase({"arena-kv-a": 0, "arena-kv-b-restarted": 20})
    assert router.rebase({"arena-kv-a": 0, "arena-kv-b-restarted": 10})
    [res] = await router.execute([reserve(4, conv_owned_by("kv-b", ids, "newer"))])
    assert all(10 <= b < 20 for b in res.reservation.new_blocks)


async def test_an_arena_gone_at_an_executor_restart_takes_its_store_out_until_replaced(
) -> None:
    """The store restarted unnoticed: the restarted executor cannot map its old arena."""
    ids = ["kv-a", "kv-b"]
    router, shared = make(ids, clock=Clock())
    shared["kv-b"].identity_now = StoreIdentity("kv-b", "arena-kv-b-restarted")
    assert router.rebase({"arena-kv-a": 0, "arena-kv-b": None})  # its host ids are stale
    assert router.degraded
    [res] = await router.execute([reserve(1, conv_owned_by("kv-b", ids))])
    assert all(b < 10 for b in res.reservation.new_blocks)
    [identity] = await router.probe_down()  # probed at once, not after retry_s
    router.remove("kv-b")
    shared["kv-b"].identity = identity
    router.add(RoutedStore(shared["kv-b"], 10))
    assert not router.degraded


async def test_replies_from_an_arena_the_executor_did_not_map_are_dropped() -> None:
    ids = ["kv-a", "kv-b"]
    router, shared = make(ids)
    conv = conv_owned_by("kv-b", ids)
    shared["kv-b"].identity_now = StoreIdentity("kv-b", "arena-kv-b-restarted")
    ops = [reserve(1, conv), pin(2, conv)]
    assert await router.execute(ops) == unanswered(ops)
    assert router.degraded


async def test_no_live_store_means_recompute() -> None:
    router, shared = make(["kv-a"])
    shared["kv-a"].reachable = False
    ops = [reserve(1, "c"), Release("c"), pin(2, "c")]
    assert await router.execute(ops) == unanswered(ops)
    assert await router.execute(ops) == unanswered(ops)
    assert len(shared["kv-a"].batches) == 1  # the first call found it down


def test_instance_ids_must_be_distinct() -> None:
    shared: dict[str, FakeStore] = {}
    store = FakeStore("kv-a", 10, shared)
    same = RoutedStore(store, 0)
    with pytest.raises(ValueError, match="repeat"):
        HostRouter([same, same], fingerprint=FINGERPRINT, block_size=BLOCK_SIZE)


async def test_a_store_that_joins_takes_its_share_and_one_that_leaves_is_forgotten() -> None:
    router, shared = make(["kv-a"])
    assert router.arenas == ("arena-kv-a",)
    b = FakeStore("kv-b", 10, shared)
    router.add(RoutedStore(b, 10))
    ids = ["kv-a", "kv-b"]
    conv = conv_owned_by("kv-b", ids)
    res = (await put(router, conv)).reservation
    assert all(10 <= x < 20 for x in res.new_blocks) and res.reservation_id >> ID_BITS == 1
    [pending] = await router.execute([reserve(2, conv_owned_by("kv-b", ids, "pending"))])
    [pinned] = await router.execute([pin(3, conv)])
    assert pinned.hit.num_tokens == 10
    assert router.remove("kv-b").identity == b.identity_now
    assert router.arenas == ("arena-kv-a",) and not router.degraded
    sent = len(b.sent())
    # Its ids are dropped; its conversations go to the others, and recompute there.
    assert await router.execute([Unpin(pinned.pin.pin_id),
                                 Commit(pending.reservation.reservation_id)]) == []
    [again] = await router.execute([pin(4, conv)])
    assert again.hit == MISS and again.pin.pin_id >> ID_BITS == 0
    assert len(b.sent()) == sent
    with pytest.raises(KeyError):
        router.remove("kv-b")
    c = FakeStore("kv-c", 10, shared)
    router.add(RoutedStore(c, 20))
    [res] = await router.execute([reserve(5, conv_owned_by("kv-c", ["kv-a", "kv-c"]))])
    assert res.reservation.reservation_id >> ID_BITS == 2  # slot 1 is never used again


async def test_a_router_with_no_store_is_degraded_and_answers_nothing() -> None:
    router = HostRouter(fingerprint=FINGERPRINT, block_size=BLOCK_SIZE)
    assert router.degraded and router.arenas == () and router.store_counts == (0, 0)
    ops = [reserve(1, "c"), pin(2, "c"), Release("c")]
    assert await router.execute(ops) == unanswered(ops)


class MembershipMachine(RuleBasedStateMachine):
    """Stores join and leave while conversations are put and pinned. Whatever the order,
    a conversation held by a store that is in is found there, in that store's range of
    global blocks, and ids carry their store's slot; one whose store left is a miss."""

    STORE_BLOCKS = 400  # room for every conversation a run puts: nothing is evicted

    def __init__(self) -> None:
        super().__init__()
        self.shared: dict[str, FakeStore] = {}
        self.router = HostRouter(fingerprint=FINGERPRINT, block_size=BLOCK_SIZE)
        self.first: dict[str, int] = {}  # instance id -> first global block, while in
        self.held: dict[str, str] = {}  # conversation -> the instance that committed it
        self.slot: dict[str, int] = {}  # instance id -> its slot, in join order
        self.next_block = 0

    def _run(self, ops: list[HostOp]) -> list:
        return asyncio.run(self.router.execute(ops))

    @rule()
    def join(self) -> None:
        store = FakeStore(f"kv-{len(self.slot)}", self.STORE_BLOCKS, self.shared)
        self.slot[store.instance_id] = len(self.slot)
        self.router.add(RoutedStore(store, self.next_block))
        self.first[store.instance_id] = self.next_block
        self.next_block += self.STORE_BLOCKS

    @precondition(lambda self: self.first)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        instance_id = data.draw(st.sampled_from(sorted(self.first)))
        self.router.remove(instance_id)
        del self.first[instance_id]

    @rule()
    def put(self) -> None:
        conv = f"conv-{len(self.held)}"
        [res] = self._run([reserve(1, conv)])
        if not self.first:
            assert res.reservation is None
            return
        owner = rendezvous_owner(conv, sorted(self.first))
        first = self.first[owner]
        assert all(first <= b < first + self.STORE_BLOCKS for b in res.reservation.new_blocks)
        self._run([Commit(res.reservation.reservation_id)])
        self.held[conv] = owner

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def pin_and_unpin(self, data: st.DataObject) -> None:
        conv = data.draw(st.sampled_from(sorted(self.held)))
        holder = self.held[conv]
        [pinned] = self._run([pin(1, conv)])
        if holder in self.first:
            first = self.first[holder]
            assert pinned.hit.num_tokens == len(TOKENS)
            assert pinned.pin.pin_id >> ID_BITS == self.slot[holder]
            assert all(first <= b < first + self.STORE_BLOCKS for b in pinned.hit.blocks)
        else:
            assert pinned.hit == MISS
        self._run([Unpin(pinned.pin.pin_id)])

    @invariant()
    def nothing_stays_pinned_and_the_arenas_are_those_in(self) -> None:
        for instance_id in self.first:
            assert self.shared[instance_id].index.stats().pinned == 0
        assert self.router.arenas == tuple(f"arena-{i}" for i in self.first)
        assert self.router.degraded == (not self.first)


def test_membership_changes_keep_conversations_where_they_are() -> None:
    run_state_machine_as_test(
        MembershipMachine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )
