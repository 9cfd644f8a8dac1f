"""Paged causal attention over the block-major cache, computed so its bits never depend on
how a sequence was chunked, batched or placed.

Each query row is attended on its own, over exactly the `position + 1` keys it may see:
the shapes of every op for a token depend only on its position, never on the chunk or
batch around it. A masked, whole-chunk formulation would add exact zeros into reductions
whose length (and so whose float summation order) depends on the chunk.
"""

from __future__ import annotations

import torch

from services.executor.model.batch import StepLayout


def write_kv(
    layer_cache: torch.Tensor, layout: StepLayout, k: torch.Tensor, v: torch.Tensor
) -> None:
    """layer_cache: `cache[:, layer]`, [num_blocks, 2, block_size, kv_heads, head_dim]."""
    layer_cache[layout.slot_blocks, 0, layout.slot_offsets] = k.to(layer_cache.dtype)
    layer_cache[layout.slot_blocks, 1, layout.slot_offsets] = v.to(layer_cache.dtype)


def paged_attention(
    layer_cache: torch.Tensor, q: torch.Tensor, layout: StepLayout, scale: float
) -> torch.Tensor:
    """q: [rows, heads, head_dim] for the step's new tokens, whose KV is already written."""
    _, heads, head_dim = q.shape
    kv_heads = layer_cache.shape[3]
    group = heads // kv_heads
    wide = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    for seq in layout.sequences:
        # Fresh contiguous copies: a slice [:length] then has the same strides and alignment
        # whatever the sequence's total length or block placement.
        keys = layer_cache[:, 0].index_select(0, seq.blocks).flatten(0, 1).to(q.dtype)
        values = layer_cache[:, 1].index_select(0, seq.blocks).flatten(0, 1).to(q.dtype)
        for offset, pos in enumerate(range(seq.start_pos, seq.end_pos)):
            row = seq.first_row + offset
            length = pos + 1
            query = (q[row] * scale).view(kv_heads, group, head_dim)
            scores = torch.matmul(query, keys[:length].permute(1, 2, 0))
            probs = torch.softmax(scores, dim=-1, dtype=wide).to(q.dtype)
            attended = torch.matmul(probs, values[:length].transpose(0, 1))
            out[row] = attended.view(heads, head_dim)
    return out
