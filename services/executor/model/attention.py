"""Paged causal attention over the block-major cache, in two forms.

- `batched_attention` (the default, fast path): each sequence's chunk of query rows is one
  scaled-dot-product call over its visible keys under a causal mask; grouped-query heads
  are handled by the kernel. Its bits may depend on the chunk's size.
- `invariant_attention`: each query row is attended on its own, over exactly the
  `position + 1` keys it may see, so the shapes of every op for a token depend only on its
  position, never on the chunk or batch around it. A masked, whole-chunk formulation adds
  exact zeros into reductions whose length (and so whose float summation order) depends on
  the chunk.

Both take `q`: [rows, heads, head_dim] for the step's new tokens, whose KV is already
written, and return the attended values in the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.executor.model.batch import SequenceRows, StepLayout


def write_kv(
    layer_cache: torch.Tensor, layout: StepLayout, k: torch.Tensor, v: torch.Tensor
) -> None:
    """layer_cache: `cache[:, layer]`, [num_blocks, 2, block_size, kv_heads, head_dim]."""
    layer_cache[layout.slot_blocks, 0, layout.slot_offsets] = k.to(layer_cache.dtype)
    layer_cache[layout.slot_blocks, 1, layout.slot_offsets] = v.to(layer_cache.dtype)


def _gather(
    layer_cache: torch.Tensor, seq: SequenceRows, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh contiguous keys and values of the sequence's blocks: [blocks * block_size, kv_heads,
    head_dim] each, so a slice [:length] has the same strides and alignment whatever the
    sequence's total length or block placement."""
    keys = layer_cache[:, 0].index_select(0, seq.blocks).flatten(0, 1).to(dtype)
    values = layer_cache[:, 1].index_select(0, seq.blocks).flatten(0, 1).to(dtype)
    return keys, values


def batched_attention(
    layer_cache: torch.Tensor, q: torch.Tensor, layout: StepLayout, scale: float
) -> torch.Tensor:
    """One SDPA call per sequence: its `n` new rows against its `end_pos` keys."""
    out = torch.empty_like(q)
    for seq in layout.sequences:
        keys, values = _gather(layer_cache, seq, q.dtype)
        rows = slice(seq.first_row, seq.first_row + seq.end_pos - seq.start_pos)
        mask = None
        if seq.end_pos - seq.start_pos > 1:  # a lone last row sees every key: no mask
            visible = torch.arange(seq.start_pos, seq.end_pos).unsqueeze(1)
            mask = torch.arange(seq.end_pos).unsqueeze(0) <= visible
        # 4-d [1, heads, rows, head_dim]: with 3-d inputs CPU SDPA falls back to a slow path.
        attended = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            keys[: seq.end_pos].transpose(0, 1).unsqueeze(0),
            values[: seq.end_pos].transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = attended[0].transpose(0, 1)
    return out


def invariant_attention(
    layer_cache: torch.Tensor, q: torch.Tensor, layout: StepLayout, scale: float
) -> torch.Tensor:
    """Row by row: a token's bits depend only on its position and the keys it sees."""
    _, heads, head_dim = q.shape
    kv_heads = layer_cache.shape[3]
    group = heads // kv_heads
    wide = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    for seq in layout.sequences:
        keys, values = _gather(layer_cache, seq, q.dtype)
        for offset, pos in enumerate(range(seq.start_pos, seq.end_pos)):
            row = seq.first_row + offset
            length = pos + 1
            query = (q[row] * scale).view(kv_heads, group, head_dim)
            scores = torch.matmul(query, keys[:length].permute(1, 2, 0))
            probs = torch.softmax(scores, dim=-1, dtype=wide).to(q.dtype)
            attended = torch.matmul(probs, values[:length].transpose(0, 1))
            out[row] = attended.view(heads, head_dim)
    return out
