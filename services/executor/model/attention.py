"""Paged causal attention over the block-major cache: one call per layer for the whole step.

A backend (`PagedAttention`) says which extra index lists a step needs on the device
(`host_fields`), and binds a step's inputs once (`bind`) into a `StepAttention`, which each
layer then calls with its cache view and its new q, k and v: it writes k and v into their
slots and returns the attended values. Shapes: `layer_cache` is `cache[:, layer]`,
`[num_blocks, 2, block_size, kv_heads, head_dim]`; q is `[rows, heads, head_dim]`, k and v
`[rows, kv_heads, head_dim]`; the result has q's shape.

Two backends: `TorchAttention` here (CPU), and `TritonAttention` (`triton_attention.py`, CUDA),
which reads the cache through the block table with no gather. Both come in two modes:
- fast: whatever the device does best; a row's bits may depend on the rows around it;
- batch-invariant: a row's bits depend only on its position and the keys it sees, never on
  the chunk or batch around it. Keys are visited in fixed tiles of one cache block, with an
  online softmax; a tile past a row's position is masked whole, and its update is an exact
  no-op (alpha = 1, p = 0), so visiting more tiles for a longer neighbour changes nothing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.executor.model.batch import StepInputs, StepPlan

StepAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class PagedAttention(ABC):
    name: str
    batch_invariant: bool

    def host_fields(self, plan: StepPlan) -> dict[str, list[int]]:
        """Index lists this backend needs beyond the plan's own, to travel with them."""
        return {}

    @abstractmethod
    def bind(self, inputs: StepInputs, scale: float) -> StepAttention:
        """The step's attention, its per-step index work done once for all layers."""


@dataclass(frozen=True, slots=True)
class TorchAttention(PagedAttention):
    """CPU: fast mode attends all single-token rows (decodes) in one padded SDPA call and each
    prefill chunk in one call of its own; invariant mode runs the block-tiled online softmax
    over every row at once. Neither loops over decode rows."""

    batch_invariant: bool = False
    name: str = "torch"

    def host_fields(self, plan: StepPlan) -> dict[str, list[int]]:
        if self.batch_invariant:
            return {}
        starts = plan.query_start
        decodes = [s for s in range(plan.num_seqs) if starts[s + 1] - starts[s] == 1]
        keys = plan.width * plan.block_size
        stale = [  # each decode's gathered keys past its end, counted across all of them
            d * keys + key
            for d, s in enumerate(decodes)
            for key in range(plan.seq_lens[s], keys)
        ]
        return {"decode_seqs": decodes, "decode_rows": [starts[s] for s in decodes],
                "decode_stale": stale}

    def bind(self, inputs: StepInputs, scale: float) -> StepAttention:
        plan = inputs.plan
        block_size = plan.block_size
        slots = inputs["slots"]
        slot_blocks = torch.div(slots, block_size, rounding_mode="floor")
        slot_offsets = torch.remainder(slots, block_size)
        tables = inputs["block_table"].view(plan.num_seqs, plan.width)
        if self.batch_invariant:
            attend = _tiled_attention(inputs, tables, scale)
        else:
            attend = _padded_attention(inputs, tables, scale)

        def step_attention(
            layer_cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            layer_cache.select(1, 0).index_put_((slot_blocks, slot_offsets), k)
            layer_cache.select(1, 1).index_put_((slot_blocks, slot_offsets), v)
            return attend(layer_cache, q)

        return step_attention


def _padded_attention(
    inputs: StepInputs, tables: torch.Tensor, scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    plan = inputs.plan
    decode_rows, decode_seqs = inputs["decode_rows"], inputs["decode_seqs"]
    num_decodes = len(decode_seqs)
    only_decodes = plan.max_query == 1
    keys_per_seq = plan.width * plan.block_size
    decode_blocks = tables.index_select(0, decode_seqs).reshape(-1)
    decode_lens = inputs["seq_lens"].index_select(0, decode_seqs)
    key_pos = torch.arange(keys_per_seq, device=tables.device)
    decode_valid = key_pos.unsqueeze(0) < decode_lens.unsqueeze(1)
    decode_mask = decode_valid.view(num_decodes, 1, 1, keys_per_seq)
    # Slots past a sequence's end hold stale bytes, NaN even: zeroed, they weigh nothing.
    decode_stale = inputs["decode_stale"]
    starts = plan.query_start
    prefills = [
        (s, starts[s], starts[s + 1] - starts[s], plan.seq_lens[s])
        for s in range(plan.num_seqs)
        if starts[s + 1] - starts[s] > 1
    ]

    def gather(layer_cache: torch.Tensor, blocks: torch.Tensor, count: int,
               stale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[count, kv_heads, keys, head_dim] keys and values of `count` sequences' blocks,
        zeros at the keys `stale` counts (across the sequences, in order)."""
        kv_heads, head_dim = layer_cache.shape[3:]
        keys = layer_cache.select(1, 0).index_select(0, blocks).view(-1, kv_heads * head_dim)
        values = layer_cache.select(1, 1).index_select(0, blocks).view(-1, kv_heads * head_dim)
        if stale is not None:
            keys, values = keys.index_fill_(0, stale, 0), values.index_fill_(0, stale, 0)
        shape = (count, -1, kv_heads, head_dim)
        return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)

    def attend_decodes(layer_cache: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        keys, values = gather(layer_cache, decode_blocks, num_decodes, decode_stale)
        return _sdpa(queries.unsqueeze(2), keys, values, decode_mask, scale).squeeze(2)

    def attend(layer_cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if only_decodes:
            return attend_decodes(layer_cache, q)
        out = torch.empty_like(q)
        if num_decodes:
            queries = q.index_select(0, decode_rows)
            out.index_copy_(0, decode_rows, attend_decodes(layer_cache, queries))
        for seq, first_row, rows, end_pos in prefills:
            blocks = tables[seq, : -(-end_pos // plan.block_size)]
            keys, values = gather(layer_cache, blocks, 1)
            visible = torch.arange(end_pos - rows, end_pos, device=q.device).unsqueeze(1)
            mask = torch.arange(end_pos, device=q.device).unsqueeze(0) <= visible
            queries = q[first_row : first_row + rows].transpose(0, 1).unsqueeze(0)
            attended = _sdpa(queries, keys[:, :, :end_pos], values[:, :, :end_pos], mask, scale)
            out[first_row : first_row + rows] = attended[0].transpose(0, 1)
        return out

    return attend


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    """4-d [batch, heads, rows, head_dim]: with 3-d inputs CPU SDPA falls back to a slow path."""
    return F.scaled_dot_product_attention(
        q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
    )


def _tiled_attention(
    inputs: StepInputs, tables: torch.Tensor, scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The batch-invariant form: every row against one cache block of keys at a time, with
    the same ops on the same shapes for each row whatever else the step holds."""
    plan = inputs.plan
    block_size = plan.block_size
    row_blocks = tables.index_select(0, inputs["row_seq"])  # [rows, width]
    key_pos = torch.arange(plan.width * block_size, device=tables.device)
    hidden = key_pos.unsqueeze(0) > inputs["positions"].unsqueeze(1)
    hidden_scores = hidden.view(plan.num_rows, 1, 1, plan.width, block_size)
    # Keys a row may not see can be stale bytes, NaN even: zeroed, they weigh nothing.
    hidden_values = hidden.view(plan.num_rows, plan.width, block_size, 1, 1)

    def attend(layer_cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        rows, heads, head_dim = q.shape
        kv_heads = layer_cache.shape[3]
        queries = (q * scale).view(rows, kv_heads, heads // kv_heads, head_dim)
        wide = torch.promote_types(q.dtype, torch.float32)
        best = queries.new_full(queries.shape[:3], -math.inf, dtype=wide)
        total = torch.zeros_like(best)
        acc = torch.zeros(queries.shape, dtype=wide, device=q.device)
        for j in range(plan.width):
            blocks = row_blocks.select(1, j)
            keys = layer_cache.select(1, 0).index_select(0, blocks).to(q.dtype)
            values = layer_cache.select(1, 1).index_select(0, blocks).to(q.dtype)
            values = values.masked_fill(hidden_values.select(1, j), 0)
            scores = torch.matmul(queries, keys.permute(0, 2, 3, 1)).to(wide)
            scores = scores.masked_fill(hidden_scores.select(3, j), -math.inf)
            new_best = torch.maximum(best, scores.amax(-1))
            alpha = torch.exp(best - new_best)
            probs = torch.exp(scores - new_best.unsqueeze(-1))
            total = total * alpha + probs.sum(-1)
            mixed = torch.matmul(probs.to(q.dtype), values.transpose(1, 2)).to(wide)
            acc = acc * alpha.unsqueeze(-1) + mixed
            best = new_best
        return (acc / total.unsqueeze(-1)).to(q.dtype).view(rows, heads, head_dim)

    return attend

