"""FreeExtents against a set-of-blocks model: same contents, always maximal extents."""

from __future__ import annotations

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

from common.kv.extent import Extent, flatten, runs
from common.kv.free_extents import FreeExtents

UNIVERSE = 64
PICKS = st.integers(0, UNIVERSE)
LENGTHS = st.integers(1, 8)  # short runs keep the free space fragmented


def _free_of(*extents: Extent) -> FreeExtents:
    free = FreeExtents()
    for extent in extents:
        free.add(extent)
    return free


def _run_in(blocks: set[int], pick: int, length: int, *, inside: bool) -> Extent:
    """An extent starting at the `pick`-th block of `blocks` (or of its complement when
    `inside` is False), at most `length` long, and staying within that set."""
    pool = sorted(blocks) if inside else sorted(set(range(UNIVERSE)) - blocks)
    start = pool[pick % len(pool)]
    n = 1
    while n < length and start + n < UNIVERSE and ((start + n) in blocks) == inside:
        n += 1
    return Extent(start, n)


class FreeExtentsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.free = _free_of(Extent(0, UNIVERSE))
        self.model = set(range(UNIVERSE))

    @precondition(lambda self: len(self.model) < UNIVERSE)
    @rule(pick=PICKS, length=LENGTHS)
    def add(self, pick: int, length: int) -> None:
        extent = _run_in(self.model, pick, length, inside=False)
        merged = self.free.add(extent)
        self.model |= set(extent.blocks())
        assert set(extent.blocks()) <= set(merged.blocks())
        assert merged in list(self.free)

    @precondition(lambda self: self.model)
    @rule(pick=PICKS, length=LENGTHS)
    def take(self, pick: int, length: int) -> None:
        extent = _run_in(self.model, pick, length, inside=True)
        self.free.take(extent)
        self.model -= set(extent.blocks())

    @precondition(lambda self: self.model)
    @rule(pick=PICKS, length=LENGTHS)
    def add_overlapping_is_refused(self, pick: int, length: int) -> None:
        extent = _run_in(self.model, pick, length, inside=True)
        before = list(self.free)
        with pytest.raises(ValueError):
            self.free.add(extent)
        assert list(self.free) == before

    @precondition(lambda self: len(self.model) < UNIVERSE)
    @rule(pick=PICKS, length=LENGTHS)
    def take_used_is_refused(self, pick: int, length: int) -> None:
        extent = _run_in(self.model, pick, length, inside=False)
        before = list(self.free)
        with pytest.raises(ValueError):
            self.free.take(extent)
        assert list(self.free) == before

    @rule(n=st.integers(1, 12) | st.integers(UNIVERSE - 4, UNIVERSE + 1))
    def allocate(self, n: int) -> None:
        if n > len(self.model):
            with pytest.raises(ValueError):
                self.free.allocate(n)
            return
        fits = [e for e in self.free if e.length >= n]
        taken = self.free.allocate(n)
        blocks = flatten(taken)
        assert len(blocks) == n == len(set(blocks))
        assert set(blocks) <= self.model
        if fits:
            assert len(taken) == 1, "one extent fits, so one extent is used"
        self.model -= set(blocks)

    @invariant()
    def contents_match_model(self) -> None:
        extents = list(self.free)
        blocks = flatten(extents)
        assert blocks == sorted(self.model)
        assert extents == list(runs(blocks)), "free extents must be maximal"
        assert self.free.total == len(self.model)
        assert len(self.free) == len(extents)

    @invariant()
    def best_fit_is_smallest_lowest(self) -> None:
        extents = list(self.free)
        for n in range(1, UNIVERSE + 1):
            fits = [e for e in extents if e.length >= n]
            want = min(fits, key=lambda e: (e.length, e.start)) if fits else None
            assert self.free.best_fit(n) == want
        longest = max(extents, key=lambda e: (e.length, e.start), default=None)
        assert self.free.largest() == longest


def test_free_extents_match_set_model() -> None:
    run_state_machine_as_test(
        FreeExtentsMachine,
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )


def test_add_merges_with_both_neighbours() -> None:
    free = _free_of(Extent(0, 2), Extent(5, 3))
    assert free.add(Extent(2, 3)) == Extent(0, 8)
    assert list(free) == [Extent(0, 8)]
    assert free.total == 8


def test_add_merges_with_previous_only_when_touching() -> None:
    free = _free_of(Extent(0, 2))
    assert free.add(Extent(3, 1)) == Extent(3, 1)
    assert list(free) == [Extent(0, 2), Extent(3, 1)]


def test_take_splits_container() -> None:
    free = _free_of(Extent(10, 10))
    free.take(Extent(13, 2))
    assert list(free) == [Extent(10, 3), Extent(15, 5)]
    assert free.containing(14) is None
    assert free.containing(16) == Extent(15, 5)
    assert free.starting_at(15) == Extent(15, 5)
    assert free.starting_at(16) is None


def test_take_across_two_extents_is_refused() -> None:
    free = _free_of(Extent(0, 2), Extent(3, 2))
    with pytest.raises(ValueError):
        free.take(Extent(1, 3))


def test_best_fit_prefers_smallest_then_lowest_address() -> None:
    free = _free_of(Extent(0, 5), Extent(10, 3), Extent(20, 3), Extent(30, 8))
    assert free.best_fit(3) == Extent(10, 3)
    assert free.best_fit(4) == Extent(0, 5)
    assert free.best_fit(6) == Extent(30, 8)
    assert free.best_fit(9) is None


def test_allocate_falls_back_to_largest_first() -> None:
    free = _free_of(Extent(0, 2), Extent(10, 5), Extent(20, 3))
    assert free.allocate(7) == [Extent(10, 5), Extent(0, 2)]
    assert list(free) == [Extent(20, 3)]


def test_allocate_too_much_changes_nothing() -> None:
    free = _free_of(Extent(0, 2), Extent(10, 5))
    with pytest.raises(ValueError):
        free.allocate(8)
    assert list(free) == [Extent(0, 2), Extent(10, 5)]
    assert free.total == 7
