"""Swap plans: maximal copies over runs consecutive on both sides (the acceptance test that
block groups need far fewer of them is in tests/sim/test_swap_plan_acceptance.py)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.kv.extent import Extent, flatten
from common.kv.swap_plan import Copy, plan_copies


def test_runs_consecutive_on_both_sides_become_one_copy() -> None:
    assert plan_copies([4, 5, 6], [20, 21, 22]) == [Copy(Extent(4, 3), Extent(20, 3))]


@pytest.mark.parametrize(
    ("src", "dst", "lengths"),
    [
        ([4, 5, 6], [20, 22, 23], [1, 2]),  # the host side breaks after the first block
        ([4, 6, 7], [20, 21, 22], [1, 2]),  # the device side breaks after the first block
        ([6, 5, 4], [22, 21, 20], [1, 1, 1]),  # descending is not one byte range
        ([4, 5, 6], [22, 21, 20], [1, 1, 1]),
    ],
)
def test_runs_not_consecutive_on_both_sides_are_split(
    src: list[int], dst: list[int], lengths: list[int]
) -> None:
    copies = plan_copies(src, dst)
    assert [c.num_blocks for c in copies] == lengths
    assert flatten(c.src for c in copies) == src
    assert flatten(c.dst for c in copies) == dst


def test_split_points_are_exactly_where_either_side_breaks() -> None:
    copies = plan_copies([0, 1, 2, 3, 9, 10], [5, 6, 8, 9, 10, 11])
    assert copies == [
        Copy(Extent(0, 2), Extent(5, 2)),
        Copy(Extent(2, 2), Extent(8, 2)),
        Copy(Extent(9, 2), Extent(10, 2)),
    ]


def test_without_merge_every_block_is_its_own_copy() -> None:
    copies = plan_copies([4, 5, 6], [20, 21, 22], merge=False)
    assert copies == [Copy(Extent(b, 1), Extent(b + 16, 1)) for b in (4, 5, 6)]


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        plan_copies([1, 2], [3])
    with pytest.raises(ValueError):
        Copy(Extent(0, 2), Extent(5, 3))


def test_empty_plan() -> None:
    assert plan_copies([], []) == []


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Block tables made of short runs, as allocators produce them."""
    n = draw(st.integers(0, 40))
    src = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n, unique=True))
    dst = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n, unique=True))
    return sorted(src) if draw(st.booleans()) else src, sorted(dst)


@settings(max_examples=200, deadline=None)
@given(_pairs(), st.booleans())
def test_plans_cover_pairs_in_order_with_maximal_copies(
    pair: tuple[list[int], list[int]], merge: bool
) -> None:
    src, dst = pair
    copies = plan_copies(src, dst, merge=merge)
    assert flatten(c.src for c in copies) == src
    assert flatten(c.dst for c in copies) == dst
    if not merge:
        assert len(copies) == len(src)
        return
    for a, b in itertools.pairwise(copies):
        assert (a.src.end, a.dst.end) != (b.src.start, b.dst.start), "mergeable copies were split"


# --- acceptance: copies per swap-out under realistic churn ------------------------------------
