"""The swap manager against a real allocator: swap-outs, stores, swap-ins, claims, cancels
and finished copies in any order never hand out a block under a copy, end each swap once,
and leave every block free once all is done."""

from __future__ import annotations

import itertools
from collections.abc import Callable

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

from common.kv.allocator import BlockAllocator
from common.kv.extent import flatten
from common.kv.group_allocator import BlockGroupAllocator, GroupSizing
from common.kv.reuse_index import PinHandle
from common.kv.single_block_allocator import SingleBlockAllocator
from common.kv.swap_plan import Direction, SwapOrder
from services.scheduler.core.request import Request
from services.scheduler.core.request_kv import Purpose, RequestKV
from services.scheduler.core.swaps import Swap, SwapManager
from tests.core.copies_in_flight import assert_never_handed_out, request_kv, touched

POOL = 24
PICKS = st.integers(0, 1000)
ALLOCATORS: dict[str, Callable[[], BlockAllocator]] = {
    "single": lambda: SingleBlockAllocator(POOL),
    "group": lambda: BlockGroupAllocator(POOL, GroupSizing(min_blocks=2, max_blocks=8)),
}
# (keep, purpose): what a copy out of a request's blocks is for.
OUT_KINDS = [(False, Purpose.PREEMPT), (False, Purpose.OFFLOAD), (True, Purpose.STORE),
             (True, Purpose.OFFLOAD)]


class Harness:
    """A swap manager, its allocator, and requests with their KV bookkeeping."""

    def __init__(self, allocator: BlockAllocator, *, async_swaps: bool = True,
                 merge: bool = True) -> None:
        self.allocator = allocator
        self.swaps = SwapManager(allocator, merge_copies=merge, async_swaps=async_swaps)
        self.kv: dict[str, RequestKV] = {}
        self._ids = itertools.count()

    def request(self, blocks: int = 0) -> Request:
        r = Request(f"r{next(self._ids)}", "c", [1], 1)
        self.kv[r.request_id] = request_kv(f"conv:{r.request_id}", 4)
        if blocks:
            self.allocator.allocate(r, blocks)
        return r

    def swap_out(self, r: Request, purpose: Purpose, *, skip: int = 0, copy: int | None = None,
                 keep: bool = False) -> Swap:
        """Copies `copy` of its blocks after `skip` (all of them by default) to fresh host
        blocks."""
        n = len(self.allocator.table(r)) - skip if copy is None else copy
        host = [next(self._ids) for _ in range(n)]
        return self.swaps.swap_out(r, self.kv[r.request_id], purpose, source=r, skip=skip,
                                   host_blocks=host, reservation_id=next(self._ids), keep=keep)

    def swap_in(self, r: Request, n: int, extra: int = 0) -> Swap:
        """Allocates `n + extra` blocks and swaps `n` of them in from a fresh pin."""
        kv = self.kv[r.request_id]
        kv.pin = PinHandle(next(self._ids), tuple(next(self._ids) for _ in range(n + 1)))
        device = self.allocator.allocate(r, n + extra)
        return self.swaps.swap_in(r, kv, device[:n])

    def release(self, owner: object) -> None:
        """What `DeviceMemory.release` does: blocks a copy reads drain."""
        self.allocator.release(owner, draining=self.swaps.claim(self.allocator.table(owner)))


def _reads(swap: Swap) -> list[int]:
    return flatten(c.src for c in swap.order.copies)


def test_swap_out_frees_the_rest_now_and_the_copied_blocks_when_done() -> None:
    h = Harness(SingleBlockAllocator(8))
    r = h.request(5)
    table = h.allocator.table(r)
    swap = h.swap_out(r, Purpose.PREEMPT, skip=1, copy=3)
    assert _reads(swap) == list(table[1:4])
    assert h.allocator.table(r) == () and h.allocator.num_draining == 3
    assert h.allocator.num_free == 5
    assert h.swaps.done(swap.order.swap_id) is swap
    assert h.allocator.num_free == 8 and h.allocator.num_draining == 0


def test_a_swap_out_that_copies_nothing_is_not_in_flight() -> None:
    h = Harness(SingleBlockAllocator(8), async_swaps=False)
    r = h.request(3)
    h.swap_out(r, Purpose.PREEMPT, copy=0)
    assert len(h.swaps) == 0 and not h.swaps.barrier()
    assert h.allocator.num_free == 8


def test_a_store_frees_nothing_and_a_block_it_reads_drains_when_freed() -> None:
    h = Harness(SingleBlockAllocator(8))
    r = h.request(4)
    store = h.swap_out(r, Purpose.STORE, copy=2, keep=True)
    assert h.allocator.num_blocks_of(r) == 4 and h.allocator.num_draining == 0
    h.release(r)  # finished while its store is in flight
    assert h.allocator.num_draining == 2 and h.allocator.num_free == 6
    assert_never_handed_out(h.allocator, set(_reads(store)))
    h.swaps.done(store.order.swap_id)
    assert h.allocator.num_free == 8


def test_a_block_read_by_two_copies_is_freed_by_the_last_to_end() -> None:
    h = Harness(SingleBlockAllocator(8))
    r = h.request(4)
    first = h.swap_out(r, Purpose.STORE, copy=2, keep=True)
    second = h.swap_out(r, Purpose.PREEMPT)  # reads all four, two of them under `first`
    assert h.allocator.num_draining == 4
    h.swaps.done(second.order.swap_id)
    assert h.allocator.num_draining == 2
    assert_never_handed_out(h.allocator, set(_reads(first)))
    h.swaps.done(first.order.swap_id)
    assert h.allocator.num_free == 8


def test_a_cancelled_swap_in_drains_until_its_copy_ends() -> None:
    h = Harness(SingleBlockAllocator(8))
    r = h.request()
    swap = h.swap_in(r, 3, extra=1)
    h.swaps.cancel_in(r)
    assert h.allocator.table(r) == () and h.allocator.num_draining == 4
    assert_never_handed_out(h.allocator, touched([swap.order]))
    h.swaps.done(swap.order.swap_id)
    assert h.allocator.num_free == 8


def test_cancelling_a_swap_in_leaves_the_requests_store_in_flight_alone() -> None:
    """Preempted while its eager store was still copying, a request can be swapped back in
    before that store ends; cancelled then, it is its swap-in's blocks that drain, and the
    store still frees the block it read when it ends."""
    h = Harness(SingleBlockAllocator(8))
    r = h.request(2)
    store = h.swap_out(r, Purpose.STORE, copy=1, keep=True)
    preempt = h.swap_out(r, Purpose.PREEMPT)
    h.swaps.done(preempt.order.swap_id)
    into = h.swap_in(r, 2)
    h.swaps.cancel_in(r)
    h.swaps.done(store.order.swap_id)
    assert_never_handed_out(h.allocator, touched([into.order]))
    h.swaps.done(into.order.swap_id)
    assert h.allocator.num_free == 8 and h.allocator.num_draining == 0


def test_each_swap_ends_once_with_its_purpose() -> None:
    h = Harness(SingleBlockAllocator(8))
    out = h.swap_out(h.request(2), Purpose.OFFLOAD, keep=True)
    r = h.request()
    h.kv[r.request_id].pinned_for = Purpose.PREFIX
    into = h.swap_in(r, 2)
    assert h.swaps.offloading() == {out.kv.host_key}
    assert h.swaps.done(into.order.swap_id).purpose is Purpose.PREFIX
    assert h.swaps.done(out.order.swap_id).purpose is Purpose.OFFLOAD
    for swap in (out, into):
        with pytest.raises(KeyError):
            h.swaps.done(swap.order.swap_id)
    assert h.swaps.offloading() == set()


@pytest.mark.parametrize("async_swaps", [True, False])
def test_a_barrier_waits_for_every_swap_only_without_async_swaps(async_swaps: bool) -> None:
    h = Harness(SingleBlockAllocator(8), async_swaps=async_swaps)
    assert not h.swaps.barrier()
    a = h.swap_out(h.request(2), Purpose.PREEMPT)
    b = h.swap_in(h.request(), 2)
    for swap in (a, b):
        assert h.swaps.barrier() is not async_swaps
        h.swaps.done(swap.order.swap_id)
    assert not h.swaps.barrier()


class SwapMachine(RuleBasedStateMachine):
    """Random requests that hold blocks, copy them out (freeing them or not), are released,
    swap in (anew, or a request released before, its stores maybe still in flight), are
    cancelled mid swap-in, and copies that end in any order."""

    def __init__(self, make: Callable[[], BlockAllocator], async_swaps: bool) -> None:
        super().__init__()
        allocator = make()
        merge = isinstance(allocator, BlockGroupAllocator)
        self.h = Harness(allocator, async_swaps=async_swaps, merge=merge)
        self.owners: list[Request] = []  # hold their blocks
        self.parked: list[Request] = []  # hold none: swapped out or released
        self.flight: dict[int, tuple[SwapOrder, Purpose]] = {}
        self.incoming: dict[int, Request] = {}  # swap-in id -> its (live) request

    def _fits(self, n: int) -> bool:
        return n <= self.h.allocator.num_free

    @rule(n=st.integers(1, 6))
    def allocate(self, n: int) -> None:
        if self._fits(n):
            self.owners.append(self.h.request(n))

    @precondition(lambda self: self.owners)
    @rule(pick=PICKS, n=st.integers(1, 3))
    def grow(self, pick: int, n: int) -> None:
        if self._fits(n):
            self.h.allocator.allocate(self.owners[pick % len(self.owners)], n)

    @precondition(lambda self: self.owners)
    @rule(pick=PICKS, skip=st.integers(0, 3), copy=st.integers(0, 6),
          kind=st.sampled_from(OUT_KINDS))
    def swap_out(self, pick: int, skip: int, copy: int, kind: tuple[bool, Purpose]) -> None:
        keep, purpose = kind
        r = self.owners[pick % len(self.owners)]
        table = self.h.allocator.table(r)
        skip = min(skip, len(table))
        copy = min(copy, len(table) - skip)
        swap = self.h.swap_out(r, purpose, skip=skip, copy=copy, keep=keep)
        assert _reads(swap) == list(table[skip : skip + copy])
        assert swap.order.direction is Direction.OUT and swap.purpose is purpose
        if copy:
            self.flight[swap.order.swap_id] = (swap.order, purpose)
        assert self.h.allocator.table(r) == (table if keep else ())
        if not keep:
            self.owners.remove(r)
            self.parked.append(r)

    @precondition(lambda self: self.owners)
    @rule(pick=PICKS)
    def release(self, pick: int) -> None:
        r = self.owners.pop(pick % len(self.owners))
        self.h.release(r)
        self.parked.append(r)

    def _returning(self) -> list[Request]:
        """Parked requests that may swap back in: their own copies out may still be in
        flight if they are stores (a preemption's or an offload's copy ends first)."""
        busy = {o.request_id for o, purpose in self.flight.values() if purpose is not Purpose.STORE}
        return [r for r in self.parked if r.request_id not in busy]

    @rule(n=st.integers(1, 4), extra=st.integers(0, 2))
    def swap_in(self, n: int, extra: int) -> None:
        if self._fits(n + extra):
            self._swap_in(self.h.request(), n, extra)

    @precondition(lambda self: self._returning())
    @rule(pick=PICKS, n=st.integers(1, 4), extra=st.integers(0, 2))
    def swap_back_in(self, pick: int, n: int, extra: int) -> None:
        back = self._returning()
        if self._fits(n + extra):
            r = back[pick % len(back)]
            self.parked.remove(r)
            self._swap_in(r, n, extra)

    def _swap_in(self, r: Request, n: int, extra: int) -> None:
        swap = self.h.swap_in(r, n, extra)
        pin = self.h.kv[r.request_id].pin
        assert pin is not None
        assert _reads(swap) == list(pin.blocks[:n])
        assert flatten(c.dst for c in swap.order.copies) == list(self.h.allocator.table(r)[:n])
        self.flight[swap.order.swap_id] = (swap.order, swap.purpose)
        self.incoming[swap.order.swap_id] = r

    @precondition(lambda self: self.incoming)
    @rule(pick=PICKS)
    def cancel_in(self, pick: int) -> None:
        swap_id = sorted(self.incoming)[pick % len(self.incoming)]
        r = self.incoming.pop(swap_id)
        self.h.swaps.cancel_in(r)
        assert self.h.allocator.table(r) == ()

    @precondition(lambda self: self.flight)
    @rule(pick=PICKS)
    def done(self, pick: int) -> None:
        swap_id = sorted(self.flight)[pick % len(self.flight)]
        order, purpose = self.flight.pop(swap_id)
        swap = self.h.swaps.done(swap_id)
        assert swap.order is order and swap.purpose is purpose
        with pytest.raises(KeyError):
            self.h.swaps.done(swap_id)
        if swap_id in self.incoming:
            self.owners.append(self.incoming.pop(swap_id))  # its blocks are its own now

    @invariant()
    def no_block_under_a_copy_is_handed_out(self) -> None:
        orders = [order for order, _ in self.flight.values()]
        assert_never_handed_out(self.h.allocator, touched(orders))
        live = [*self.owners, *self.incoming.values()]
        assert self.h.allocator.num_used == sum(map(self.h.allocator.num_blocks_of, live))

    @invariant()
    def barrier_and_offloads_follow_the_copies_in_flight(self) -> None:
        swaps = self.h.swaps
        assert len(swaps) == len(self.flight)
        assert swaps.barrier() == (not swaps.async_swaps and bool(self.flight))
        offloads = {o.request_id for o, purpose in self.flight.values()
                    if purpose is Purpose.OFFLOAD}
        assert swaps.offloading() == {f"conv:{rid}" for rid in offloads}

    def teardown(self) -> None:
        while self.flight:
            self.done(0)
        for r in self.owners:
            self.h.release(r)
        allocator = self.h.allocator
        assert (allocator.num_free, allocator.num_used, allocator.num_draining) == (POOL, 0, 0)


@pytest.mark.parametrize(("name", "async_swaps"), [("group", True), ("single", False)],
                         ids=["fastswitch", "baseline"])
def test_swap_manager_under_random_orders(name: str, async_swaps: bool) -> None:
    run_state_machine_as_test(
        lambda: SwapMachine(ALLOCATORS[name], async_swaps),
        settings=settings(max_examples=60, stateful_step_count=50, deadline=None),
    )
