"""Paged attention and the KV write as Triton kernels: the CUDA backend of `attention.py`.

The attention kernel serves prefill chunks and decodes in one launch. A program takes one
tile of one sequence's query rows for one KV head: `block_q` new tokens times the
`queries_per_kv` query heads that share the KV head, `BLOCK_M` rows in all. It reads the
block-major cache in place, one cache block of keys at a time (padded to 16 keys, the least
`tl.dot` takes) through the block table and the cache's strides (no gather, no copy), with
causal masking inside the chunk and an online softmax in float32. Tiles are fixed by the
mode, never autotuned, and keys are never split across programs, so in the batch-invariant
mode a row sees the same ops on the same tile shapes whatever the step holds. The write
kernel puts each row's k and v at its slot and skips rows whose slot is negative (padding).

Both run under the Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors), which is how CI
tests them. Each is wrapped as a torch custom op with a fake implementation, so a step runs
under `FakeTensorMode` on a fake CUDA device, and CUDA graphs capture the launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from services.executor.model.attention import PagedAttention, StepAttention
from services.executor.model.batch import StepInputs, StepPlan

MIN_DOT = 16  # tl.dot's least size for every dimension on NVIDIA GPUs
DECODE_TILE_ROWS = MIN_DOT
PREFILL_TILE_ROWS = 64


# The step's index lists sit at any 8-byte offset of one packed buffer, and the block table's
# width changes from step to step: specializing on either would compile a kernel per layout.
@triton.jit(
    do_not_specialize=["stride_table"],
    do_not_specialize_on_alignment=["block_table_ptr", "query_start_ptr", "seq_lens_ptr",
                                    "tile_seq_ptr", "tile_first_ptr", "tile_blocks_ptr"],
)
def _paged_attention_kernel(
    out_ptr, q_ptr, cache_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr,
    tile_seq_ptr, tile_first_ptr, tile_blocks_ptr, scale,
    stride_q_row, stride_q_head, stride_o_row, stride_o_head,
    stride_c_block, stride_c_kv, stride_c_token, stride_c_head, stride_table,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KEYS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    first = tl.load(tile_first_ptr + tile)  # the tile's first query, counted in its chunk
    row0 = tl.load(query_start_ptr + seq)
    num_queries = tl.load(query_start_ptr + seq + 1) - row0
    seq_len = tl.load(seq_lens_ptr + seq)
    chunk_start = seq_len - num_queries  # the position of the chunk's first token

    m = tl.arange(0, BLOCK_M)
    query = first + m // GROUP
    head = kv_head * GROUP + m % GROUP
    live = (m // GROUP < BLOCK_Q) & (query < num_queries)
    position = chunk_start + query
    d = tl.arange(0, HEAD_DIM_P)
    d_live = d < HEAD_DIM
    q = tl.load(
        q_ptr + (row0 + query)[:, None] * stride_q_row + head[:, None] * stride_q_head
        + d[None, :],
        mask=live[:, None] & d_live[None, :], other=0.0,
    )

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    t = tl.arange(0, KEYS)  # a block's keys, padded to what tl.dot takes
    for j in range(0, tl.load(tile_blocks_ptr + tile)):  # the blocks its last row sees
        block = tl.load(block_table_ptr + seq * stride_table + j)
        base = cache_ptr + block * stride_c_block + kv_head * stride_c_head
        # Slots past the sequence's end can hold stale bytes, NaN even: read as zeros.
        key_live = (t < BLOCK_SIZE) & (j * BLOCK_SIZE + t < seq_len)
        k = tl.load(base + t[None, :] * stride_c_token + d[:, None],
                    mask=d_live[:, None] & key_live[None, :], other=0.0)
        v = tl.load(base + stride_c_kv + t[:, None] * stride_c_token + d[None, :],
                    mask=key_live[:, None] & d_live[None, :], other=0.0)
        scores = tl.dot(q, k, input_precision=PRECISION) * scale
        visible = key_live[None, :] & ((j * BLOCK_SIZE + t)[None, :] <= position[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        alpha = tl.exp(best - new_best)
        probs = tl.exp(scores - new_best[:, None])
        total = total * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        best = new_best

    out = acc / total[:, None]
    tl.store(
        out_ptr + (row0 + query)[:, None] * stride_o_row + head[:, None] * stride_o_head
        + d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=live[:, None] & d_live[None, :],
    )


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slots_ptr, stride_k_row, stride_v_row,
    stride_c_block, stride_c_kv, stride_c_token,
    BLOCK_SIZE: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot >= 0:
        i = tl.arange(0, ROW_P)
        live = i < ROW
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        dst = cache_ptr + block * stride_c_block + offset * stride_c_token
        k = tl.load(k_ptr + row * stride_k_row + i, mask=live)
        v = tl.load(v_ptr + row * stride_v_row + i, mask=live)
        tl.store(dst + i, k.to(cache_ptr.dtype.element_ty), mask=live)
        tl.store(dst + stride_c_kv + i, v.to(cache_ptr.dtype.element_ty), mask=live)


def tile_rows(queries_per_kv: int, max_query: int, *, batch_invariant: bool) -> int:
    """BLOCK_M: one decode tile size, or, in the fast mode with a prefill chunk in the step,
    a larger one; always a power of two that holds at least one query's heads."""
    least = max(DECODE_TILE_ROWS, triton.next_power_of_2(queries_per_kv))
    if batch_invariant or max_query == 1:
        return least
    return max(least, PREFILL_TILE_ROWS)


def query_tiles(plan: StepPlan, block_q: int) -> dict[str, list[int]]:
    """Every tile's sequence, first query (counted in the sequence's chunk) and the number of
    cache blocks its last row sees: each sequence's new rows in runs of `block_q`."""
    tiles: dict[str, list[int]] = {"tile_seq": [], "tile_first": [], "tile_blocks": []}
    starts = plan.query_start
    for seq, seq_len in enumerate(plan.seq_lens):
        queries = starts[seq + 1] - starts[seq]
        for first in range(0, queries, block_q):
            last_position = seq_len - queries + min(first + block_q, queries) - 1
            tiles["tile_seq"].append(seq)
            tiles["tile_first"].append(first)
            tiles["tile_blocks"].append(last_position // plan.block_size + 1)
    return tiles


@torch.library.custom_op("fastswitch::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor,
    query_start: torch.Tensor, seq_lens: torch.Tensor, tile_seq: torch.Tensor,
    tile_first: torch.Tensor, tile_blocks: torch.Tensor, scale: float, block_m: int,
) -> torch.Tensor:
    """q [rows, heads, head_dim]; layer_cache [blocks, 2, block_size, kv_heads, head_dim];
    block_table [seqs, width]; one program per tile and KV head."""
    out = torch.empty_like(q)
    _, heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = layer_cache.shape
    group = heads // kv_heads
    grid = (len(tile_seq), kv_heads)
    _paged_attention_kernel[grid](
        out, q, layer_cache, block_table, query_start, seq_lens, tile_seq, tile_first,
        tile_blocks, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2),
        layer_cache.stride(3), block_table.stride(0),
        GROUP=group, BLOCK_Q=block_m // group, BLOCK_M=block_m, BLOCK_SIZE=block_size,
        KEYS=max(MIN_DOT, triton.next_power_of_2(block_size)), HEAD_DIM=head_dim,
        HEAD_DIM_P=max(MIN_DOT, triton.next_power_of_2(head_dim)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out


@paged_attention.register_fake
def _paged_attention_fake(
    q: torch.Tensor, layer_cache: torch.Tensor, block_table: torch.Tensor,
    query_start: torch.Tensor, seq_lens: torch.Tensor, tile_seq: torch.Tensor,
    tile_first: torch.Tensor, tile_blocks: torch.Tensor, scale: float, block_m: int,
) -> torch.Tensor:
    _same_device(q, layer_cache, block_table, query_start, seq_lens, tile_seq, tile_first,
                 tile_blocks)
    return torch.empty_like(q)


@torch.library.custom_op("fastswitch::write_kv", mutates_args=("layer_cache",))
def write_kv(
    layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """k and v [rows, kv_heads, head_dim] at `slots` (block * block_size + offset; negative:
    skipped). A token's kv_heads x head_dim values must be contiguous in the cache."""
    rows = k.shape[0]
    width = k.shape[1] * k.shape[2]
    k, v = k.reshape(rows, width), v.reshape(rows, width)
    _write_kv_kernel[(rows,)](
        k, v, layer_cache, slots, k.stride(0), v.stride(0),
        layer_cache.stride(0), layer_cache.stride(1), layer_cache.stride(2),
        BLOCK_SIZE=layer_cache.shape[2], ROW=width, ROW_P=triton.next_power_of_2(width),
        num_warps=1,
    )


@write_kv.register_fake
def _write_kv_fake(
    layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    _same_device(layer_cache, k, v, slots)


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        names = sorted(map(str, devices))
        raise RuntimeError(f"paged attention inputs on several devices: {names}")


@dataclass(frozen=True, slots=True)
class TritonAttention(PagedAttention):
    """The Triton kernels; tiles of `tile_rows(...)` query rows."""

    queries_per_kv: int
    batch_invariant: bool = False
    name: str = "triton"

    def host_fields(self, plan: StepPlan) -> dict[str, list[int]]:
        return query_tiles(plan, self._block_m(plan) // self.queries_per_kv)

    def bind(self, inputs: StepInputs, scale: float) -> StepAttention:
        plan = inputs.plan
        block_m = self._block_m(plan)
        table = inputs["block_table"].view(plan.num_seqs, plan.width)
        query_start, seq_lens, slots = inputs["query_start"], inputs["seq_lens"], inputs["slots"]
        tiles = inputs["tile_seq"], inputs["tile_first"], inputs["tile_blocks"]

        def step_attention(
            layer_cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            write_kv(layer_cache, k.contiguous(), v.contiguous(), slots)
            return paged_attention(q.contiguous(), layer_cache, table, query_start, seq_lens,
                                   *tiles, scale, block_m)

        return step_attention

    def _block_m(self, plan: StepPlan) -> int:
        return tile_rows(self.queries_per_kv, plan.max_query,
                         batch_invariant=self.batch_invariant)
