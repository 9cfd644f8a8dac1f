"""Chained block hashes: content keys for reusable KV."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from common.kv.block_hash import TokenChain, block_hashes

tokens_st = st.lists(st.integers(0, 2**31), max_size=60)


@given(tokens=tokens_st, cuts=st.lists(st.integers(0, 60), max_size=5))
def test_incremental_chain_equals_fresh_hashes(tokens: list[int], cuts: list[int]) -> None:
    chain = TokenChain(4, "m")
    for n in [*sorted(cuts), len(tokens)]:
        prefix = tokens[: min(n, len(tokens))]
        assert chain.hashes(prefix) == block_hashes(prefix, 4, "m")


@given(a=tokens_st, b=tokens_st)
def test_equal_hash_at_block_i_iff_equal_prefix(a: list[int], b: list[int]) -> None:
    ha, hb = block_hashes(a, 4, "m"), block_hashes(b, 4, "m")
    for i, (x, y) in enumerate(zip(ha, hb, strict=False)):
        assert (x == y) == (a[: 4 * i + 4] == b[: 4 * i + 4])


def test_partial_block_differs_from_full_and_fingerprints_separate() -> None:
    assert block_hashes([1, 2, 3], 4, "m")[0] != block_hashes([1, 2, 3, 0], 4, "m")[0]
    assert block_hashes([1, 2, 3, 4], 4, "m") != block_hashes([1, 2, 3, 4], 4, "other")
    assert len(block_hashes([1] * 9, 4, "m")) == 3
