"""Block allocators: bookkeeping invariants under random churn, and block-group placement."""

from __future__ import annotations

from collections.abc import Callable, Hashable

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

from common.kv.allocator import BlockAllocator, OutOfBlocks
from common.kv.extent import Extent, flatten, runs
from common.kv.group_allocator import BlockGroupAllocator, GroupSizing
from common.kv.single_block_allocator import SingleBlockAllocator

POOL = 48
PICKS = st.integers(0, 1000)
SUBSETS = st.just(0) | st.integers(0, 2**POOL - 1)  # bit i selects the i-th candidate

ALLOCATORS: dict[str, Callable[[], BlockAllocator]] = {
    "single": lambda: SingleBlockAllocator(POOL),
    "group-exact": lambda: BlockGroupAllocator(POOL, GroupSizing(min_blocks=1, max_blocks=1)),
    "group-small": lambda: BlockGroupAllocator(POOL, GroupSizing(min_blocks=2, max_blocks=8)),
    "group-default": lambda: BlockGroupAllocator(POOL),
}


def _subset(items: list[int], bits: int) -> list[int]:
    return [item for i, item in enumerate(items) if bits >> i & 1]


def _snapshot(alloc: BlockAllocator, owners: int) -> tuple[object, ...]:
    """Everything observable, the tables of owners r1..r{owners} (every one so far) included."""
    tables = [alloc.table(f"r{i}") for i in range(1, owners + 1)]
    return tables, alloc.num_free, alloc.num_used, alloc.num_draining, alloc.metrics()


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / grow / release / release_draining against a model of the tables."""

    def __init__(self, make: Callable[[], BlockAllocator]) -> None:
        super().__init__()
        self.alloc = make()
        self.tables: dict[Hashable, list[int]] = {}
        self.draining: set[int] = set()
        self.next_owner = 0

    def _allocate(self, owner: Hashable, n: int, expected: int) -> None:
        before = _snapshot(self.alloc, self.next_owner)
        if n > self.alloc.num_free:
            with pytest.raises(OutOfBlocks):
                self.alloc.allocate(owner, n, expected=expected)
            assert _snapshot(self.alloc, self.next_owner) == before
            return
        new = self.alloc.allocate(owner, n, expected=expected)
        assert len(new) == n
        assert not set(new) & self.draining, "draining blocks were handed out"
        if n:
            self.tables.setdefault(owner, []).extend(new)

    def _owner(self, pick: int) -> Hashable:
        return sorted(self.tables)[pick % len(self.tables)]

    @rule(n=st.integers(0, 8), expected=st.integers(-2, 40))
    def allocate_new(self, n: int, expected: int) -> None:
        self.next_owner += 1
        self._allocate(f"r{self.next_owner}", n, expected)

    @rule(pick=PICKS, delta=st.integers(-1, 2), expected=st.integers(0, 8))
    def allocate_around_num_free(self, pick: int, delta: int, expected: int) -> None:
        """The OutOfBlocks boundary, for a new owner or a growing one."""
        self.next_owner += 1
        owner = self._owner(pick) if self.tables and pick % 2 else f"r{self.next_owner}"
        self._allocate(owner, max(self.alloc.num_free + delta, 0), expected)

    @precondition(lambda self: self.tables)
    @rule(pick=PICKS, n=st.integers(1, 6), expected=st.integers(-2, 16))
    def grow(self, pick: int, n: int, expected: int) -> None:
        self._allocate(self._owner(pick), n, expected)

    @precondition(lambda self: self.tables)
    @rule(pick=PICKS, bits=SUBSETS)
    def release(self, pick: int, bits: int) -> None:
        owner = self._owner(pick)
        table = self.tables.pop(owner)
        drain = _subset(table, bits)
        assert self.alloc.release(owner, draining=drain) == table
        self.draining |= set(drain)

    @precondition(lambda self: self.tables)
    @rule(pick=PICKS, keep=st.integers(-1, 10), bits=SUBSETS)
    def transfer(self, pick: int, keep: int, bits: int) -> None:
        src = self._owner(pick)
        self.next_owner += 1
        dst = f"r{self.next_owner}"
        table = self.tables.pop(src)
        kept, rest = table[: max(keep, 0)], table[max(keep, 0) :]
        drain = _subset(rest, bits)
        self.alloc.transfer(src, dst, keep, draining=drain)
        self.draining |= set(drain)
        if kept:
            self.tables[dst] = kept

    @precondition(lambda self: self.draining)
    @rule(bits=SUBSETS)
    def release_draining(self, bits: int) -> None:
        done = _subset(sorted(self.draining), bits)
        self.alloc.release_draining(done)
        self.draining -= set(done)

    @precondition(lambda self: self.tables)
    @rule(pick=PICKS)
    def release_with_foreign_draining_is_refused(self, pick: int) -> None:
        owner = self._owner(pick)
        foreign = set(range(POOL)) - set(self.tables[owner])
        before = _snapshot(self.alloc, self.next_owner)
        with pytest.raises(ValueError):
            self.alloc.release(owner, draining=[min(foreign)])
        assert _snapshot(self.alloc, self.next_owner) == before

    @precondition(lambda self: len(self.draining) < POOL)
    @rule()
    def release_draining_of_non_draining_is_refused(self) -> None:
        block = min(set(range(POOL)) - self.draining)
        before = _snapshot(self.alloc, self.next_owner)
        with pytest.raises(ValueError):
            self.alloc.release_draining([block])
        assert _snapshot(self.alloc, self.next_owner) == before

    @invariant()
    def tables_match_model(self) -> None:
        for i in range(1, self.next_owner + 1):  # released owners included: their table is ()
            assert list(self.alloc.table(f"r{i}")) == self.tables.get(f"r{i}", [])

    @invariant()
    def no_block_owned_twice_or_draining(self) -> None:
        owned = [b for table in self.tables.values() for b in table]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert not set(owned) & self.draining, "an owned block is draining"
        assert set(owned) | self.draining <= set(range(POOL))

    @invariant()
    def counts_add_up(self) -> None:
        a = self.alloc
        assert a.num_used == sum(len(t) for t in self.tables.values())
        assert a.num_draining == len(self.draining)
        assert a.num_free + a.num_used + a.num_draining == POOL

    @invariant()
    def metrics_agree(self) -> None:
        owned = {b for table in self.tables.values() for b in table}
        free_runs = list(runs(sorted(set(range(POOL)) - owned - self.draining)))
        m = self.alloc.metrics()
        assert (m.total, m.free, m.used, m.draining) == (
            POOL,
            self.alloc.num_free,
            self.alloc.num_used,
            self.alloc.num_draining,
        )
        assert m.num_extents == len(free_runs)
        assert 0 <= m.fragmentation < 1
        if free_runs:
            largest = max(r.length for r in free_runs)
            assert m.fragmentation == pytest.approx(1 - largest / m.free)
        groups = [g.length for t in self.tables.values() for g in runs(t)]
        assert m.mean_group_len == pytest.approx(sum(groups) / len(groups) if groups else 0.0)

    @invariant()
    def group_free_space_is_exact(self) -> None:
        """Free extents are maximal; they and the slack are exactly the unowned blocks."""
        if not isinstance(self.alloc, BlockGroupAllocator):
            return
        extents = list(self.alloc._free)
        free_blocks = flatten(extents)
        assert free_blocks == sorted(set(free_blocks)), "free extents overlap"
        assert extents == list(runs(free_blocks)), "adjacent free extents were not merged"
        slack = self.alloc._slack
        slack_blocks = flatten(slack.values())
        everything = free_blocks + slack_blocks
        assert len(everything) == len(set(everything)), "slack overlaps free space or slack"
        owned = {b for table in self.tables.values() for b in table}
        assert set(everything) == set(range(POOL)) - owned - self.draining
        assert self.alloc.num_slack == len(slack_blocks)
        for owner, extent in slack.items():
            assert extent.start == self.tables[owner][-1] + 1, "slack must follow its table"


@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_allocator_invariants_under_churn(name: str) -> None:
    run_state_machine_as_test(
        lambda: AllocatorMachine(ALLOCATORS[name]),
        settings=settings(max_examples=120, stateful_step_count=50, deadline=None),
    )


def _exact() -> GroupSizing:
    """No slack: a group is exactly what was asked for, so placement is easy to read."""
    return GroupSizing(min_blocks=1, max_blocks=1024, free_share=1)


def test_group_grows_in_place_when_next_blocks_are_free() -> None:
    alloc = BlockGroupAllocator(32, _exact())
    assert alloc.allocate("a", 4) == [0, 1, 2, 3]
    assert alloc.allocate("a", 2) == [4, 5]
    assert alloc.allocate("b", 4) == [6, 7, 8, 9]
    assert alloc.allocate("a", 2) == [10, 11], "b sits after a: a starts a new group"
    alloc.release("b")
    assert alloc.allocate("a", 3) == [12, 13, 14], "grows in place after its last block"
    assert list(runs(alloc.table("a"))) == [Extent(0, 6), Extent(10, 5)]
    assert alloc.metrics().mean_group_len == pytest.approx(5.5)


def test_group_uses_its_slack_then_grows_past_it() -> None:
    alloc = BlockGroupAllocator(32, GroupSizing(min_blocks=4, max_blocks=8, free_share=1))
    assert alloc.allocate("a", 2, expected=4) == [0, 1]
    assert alloc.num_slack == 4
    assert alloc.allocate("b", 3) == [6, 7, 8], "b must not land in a's slack"
    assert alloc.num_slack == 4 + 1
    assert alloc.allocate("a", 3) == [2, 3, 4]
    assert alloc.allocate("a", 2) == [5, 10], "a's slack, then a new group past b's slack"
    assert alloc.num_slack == 1 + 3
    assert alloc.num_free == 32 - 10


def test_group_slack_is_capped_by_max_blocks_and_raised_to_min_blocks() -> None:
    alloc = BlockGroupAllocator(64, GroupSizing(min_blocks=4, max_blocks=8, free_share=1))
    alloc.allocate("a", 1)
    assert alloc.num_slack == 3
    alloc.allocate("b", 2, expected=100)
    assert alloc.num_slack == 3 + 6
    alloc.allocate("c", 20, expected=100)
    assert alloc.num_slack == 3 + 6, "a group longer than max_blocks keeps no slack"
    assert alloc.table("c") == tuple(range(12, 32))


def test_group_reclaims_other_owners_slack_largest_first_before_failing() -> None:
    alloc = BlockGroupAllocator(32, _exact())
    alloc.allocate("a", 2, expected=8)  # [0, 10): slack 8
    alloc.allocate("b", 2, expected=4)  # [10, 16): slack 4
    alloc.allocate("c", 16)  # [16, 32): no free extent is left
    assert alloc.num_free == 12 == alloc.num_slack
    assert alloc.allocate("d", 3) == [2, 3, 4], "a's slack (the largest) is reclaimed"
    assert alloc.num_slack == 4, "b keeps its slack"
    assert alloc.allocate("b", 4) == [12, 13, 14, 15]
    assert alloc.allocate("e", 5) == [5, 6, 7, 8, 9]
    assert alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate("e", 1)


def test_group_reclaims_the_last_slack_only_when_nothing_else_is_free() -> None:
    alloc = BlockGroupAllocator(16, GroupSizing(free_share=1))
    alloc.allocate("a", 2, expected=14)
    assert alloc.num_slack == 14
    assert alloc.allocate("b", 10) == list(range(2, 12))
    assert alloc.num_slack == 0
    assert alloc.allocate("a", 1) == [12], "a's slack is gone: a new group"
    assert alloc.allocate("c", 3) == [13, 14, 15], "a's new slack is reclaimed"
    with pytest.raises(OutOfBlocks):
        alloc.allocate("c", 1)


@pytest.mark.parametrize(
    ("n", "expected", "hole"),
    [(2, 0, Extent(3, 3)), (2, 4, Extent(7, 6)), (2, 8, Extent(14, 10)), (4, 0, Extent(7, 6))],
)
def test_expected_places_a_new_group_in_the_best_fitting_extent(
    n: int, expected: int, hole: Extent
) -> None:
    alloc = BlockGroupAllocator(32, _exact())
    for owner, size in [("x1", 3), ("h1", 3), ("x2", 1), ("h2", 6), ("x3", 1), ("h3", 10)]:
        alloc.allocate(owner, size)
    alloc.allocate("x4", alloc.num_free)
    for hole_owner in ("h1", "h2", "h3"):
        alloc.release(hole_owner)
    assert sorted(alloc._free) == [Extent(3, 3), Extent(7, 6), Extent(14, 10)]
    got = alloc.allocate("new", n, expected=expected)
    assert got == list(range(hole.start, hole.start + n))
    assert alloc.num_slack == min(hole.length, n + expected) - n


def test_group_spans_extents_when_no_single_one_fits() -> None:
    alloc = BlockGroupAllocator(12, _exact())
    for owner, size in [("h1", 3), ("x1", 1), ("h2", 5), ("x2", 1), ("h3", 2)]:
        alloc.allocate(owner, size)
    for hole_owner in ("h1", "h2", "h3"):
        alloc.release(hole_owner)
    assert alloc.allocate("a", 9) == [4, 5, 6, 7, 8, 0, 1, 2, 10]
    assert alloc.num_free == 1


def test_draining_blocks_wait_for_release_draining() -> None:
    for alloc in (SingleBlockAllocator(4), BlockGroupAllocator(4, _exact())):
        alloc.allocate("a", 4)
        alloc.release("a", draining=[1, 2])
        assert alloc.num_free == 2
        assert sorted(alloc.allocate("b", 2)) == [0, 3]
        with pytest.raises(OutOfBlocks):
            alloc.allocate("b", 1)
        alloc.release_draining([2])
        assert alloc.allocate("b", 1) == [2]


def test_single_block_allocator_queues_freed_blocks_at_the_tail() -> None:
    alloc = SingleBlockAllocator(8)
    assert alloc.allocate("a", 3) == [0, 1, 2]
    alloc.release("a")
    assert alloc.allocate("b", 6) == [3, 4, 5, 6, 7, 2]
    assert alloc.allocate("c", 2) == [1, 0]


@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_release_of_an_owner_without_blocks_returns_nothing(name: str) -> None:
    alloc = ALLOCATORS[name]()
    alloc.allocate("a", 0)
    assert alloc.release("a") == []
    assert alloc.num_free == POOL


def test_slack_shrinks_as_free_memory_runs_out() -> None:
    sizing = GroupSizing(min_blocks=4, max_blocks=256, free_share=32)
    assert sizing.group_len(2, 100, free=4096) == 102  # plenty free: room for the hint
    assert sizing.group_len(2, 100, free=1024) == 32  # 1/32 of what is free
    assert sizing.group_len(2, 100, free=64) == 4  # nearly full: min_blocks
    assert sizing.group_len(40, 100, free=64) == 40  # never less than asked for
