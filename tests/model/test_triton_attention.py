"""The Triton kernels (the CUDA attention backend) on CPU tensors under Triton's interpreter
(tests/conftest.py turns it on): the same attention and the same KV writes as the torch
backend's batch-invariant path, to 1e-5 in float32, for mixed prefill chunks and decodes
over scattered blocks, with stale slots full of NaN."""

from __future__ import annotations

import pytest
import torch

from services.executor.model.attention import TorchAttention
from services.executor.model.batch import PackedInputs, SequenceStep, StepPlan
from services.executor.model.triton_attention import TritonAttention, query_tiles, write_kv

BLOCK = 16
NUM_BLOCKS = 64


def _step(lengths: list[tuple[int, int]], seed: int, block: int = BLOCK) -> StepPlan:
    """Sequences of (tokens already cached, new tokens), over shuffled blocks."""
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    batch, used = [], 0
    for start, new in lengths:
        count = -(-(start + new) // block)
        batch.append(SequenceStep(order[used : used + count], start, [1] * new))
        used += count
    return StepPlan.build(batch, block_size=block, num_blocks=NUM_BLOCKS, vocab_size=2,
                          max_positions=4096)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block"),
                         [(8, 2, 32, 16), (9, 3, 64, 16), (4, 4, 48, 16), (4, 2, 8, 4),
                          (6, 2, 32, 24)])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_kernel_matches_the_invariant_torch_path(
    heads: int, kv_heads: int, head_dim: int, block: int, batch_invariant: bool
) -> None:
    """Shapes tl.dot cannot take as they are (blocks of 4 or 24 keys, a head of 8) are
    padded inside the kernel."""
    plan = _step([(37, 1), (0, 21), (5, 1), (16, 16), (70, 3)], seed=heads, block=block)
    generator = torch.Generator().manual_seed(head_dim)
    rows = plan.num_rows
    q, k, v = (torch.randn(rows, n, head_dim, generator=generator)
               for n in (heads, kv_heads, kv_heads))
    # Every slot a step may read holds keys from before; the rest, stale bytes: NaN.
    cache = torch.full((NUM_BLOCKS, 1, 2, block, kv_heads, head_dim), float("nan"))
    for seq in range(plan.num_seqs):
        blocks = plan.block_table[seq * plan.width : (seq + 1) * plan.width]
        for pos in range(plan.seq_lens[seq]):
            cache[blocks[pos // block], :, :, pos % block] = torch.randn(
                1, 2, kv_heads, head_dim, generator=generator)
    triton = TritonAttention(heads // kv_heads, batch_invariant)
    reference = TorchAttention(batch_invariant=True)
    inputs = PackedInputs.pack(
        plan, {**plan.fields(), **triton.host_fields(plan), **reference.host_fields(plan)},
        pin=False,
    ).to(torch.device("cpu"))
    ours, theirs = cache.clone(), cache.clone()

    got = triton.bind(inputs, head_dim**-0.5)(ours.select(1, 0), q, k, v)
    want = reference.bind(inputs, head_dim**-0.5)(theirs.select(1, 0), q, k, v)

    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_tiles_cover_every_row_once_and_see_up_to_their_last_row() -> None:
    plan = _step([(0, 10), (37, 1), (3, 5)], seed=0)
    tiles = query_tiles(plan, block_q=4)
    assert list(zip(tiles["tile_seq"], tiles["tile_first"], strict=True)) == [
        (0, 0), (0, 4), (0, 8), (1, 0), (2, 0), (2, 4)]
    # the last row of each tile: positions 3, 7, 9; 37; 6, 7
    assert tiles["tile_blocks"] == [1, 1, 1, 3, 1, 1]


def test_a_negative_slot_writes_nothing() -> None:
    cache = torch.zeros(4, 2, BLOCK, 2, 8)
    k, v = torch.ones(3, 2, 8), torch.full((3, 2, 8), 2.0)
    write_kv(cache, k, v, torch.tensor([17, -1, 3]))
    assert cache[1, 0, 1].eq(1).all() and cache[1, 1, 1].eq(2).all()
    assert cache[0, 0, 3].eq(1).all() and cache[0, 1, 3].eq(2).all()
    assert cache.count_nonzero() == 2 * 2 * 2 * 8
