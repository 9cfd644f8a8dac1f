"""Decode-only steps replayed as CUDA graphs, one graph per batch bucket (`DecodeGraphs`).

A step can replay (`replayable`) when it is decode-only (one new token per sequence), wants
every row's logits, has at most `BUCKETS[-1]` sequences and block tables of at most `width`
columns. It is padded on the host to the smallest bucket that holds it (`pad_decode_plan`)
and packed as every step is (`DecoderModel.pack`); the buffer crosses in one non-blocking
copy into one static device buffer, which every bucket's graph reads at fixed addresses.
The graph runs the model's forward, embedding to logits, the KV writes included (the cache
is the engine's and never moves). Fields the caller adds (`extra`: the sampling inputs,
whose size varies) travel in the same copy, after the graph's, and are read by eager code.

A padding sequence feeds token 0 at position 0 into slot -1, which the Triton write kernel
skips, and attends to the one key its table's block 0 holds (whatever it is: a swap may be
writing it); only its own logits see it, and they are cut off. So
graphs need the Triton backend (the torch backend would write slot -1) and a real CUDA
device. Each bucket is captured on its first use, not at start: start-up stays as it was
and only buckets that serve steps take memory. Capture runs on an all-padding step, so
neither its eager warm-up (on a side stream, as torch asks, which compiles the Triton
kernels) nor the capture writes the cache; all buckets share one memory pool. Anything that
raises in capture or replay logs one warning and turns graphs off for the process: that
step runs eagerly on its padded inputs, and every later one as it would without graphs.

Both modes replay. In the batch-invariant one a row's bits never depend on the rows beside
it (row-wise ops in fixed tiles, attention in one tile per sequence), so a replay gives the
eager step's bits; in the fast one the bucket's matrix shapes may round differently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from services.executor.model.batch import PackedInputs, StepInputs, StepPlan
from services.executor.model.decoder import DecoderModel
from services.executor.model.kv_cache import KVCacheGeometry

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_WIDTH = 512  # block-table columns a graph reads at most: 8192 tokens of 16-token blocks
EXTRA_CAPACITY = 8192  # int64 elements of `extra` a replayed step may carry


def bucket_for(num_seqs: int) -> int | None:
    """The smallest bucket of at least `num_seqs` sequences; None past the largest."""
    return next((bucket for bucket in BUCKETS if bucket >= num_seqs), None)


def replayable(plan: StepPlan, width: int) -> bool:
    """Whether graphs of `width` block-table columns can run the step."""
    return (plan.max_query == 1 and plan.all_rows_out and plan.num_seqs <= BUCKETS[-1]
            and plan.width <= width)


def pad_decode_plan(plan: StepPlan, bucket: int, width: int) -> StepPlan:
    """A replayable `plan` grown to `bucket` sequences of `width` block-table columns.

    The plan's own rows and sequences come first, unchanged but for the table's extra
    columns (block 0, never read). Each padding sequence feeds token 0 at position 0 into
    slot -1 (written nowhere), has one key and an all-zero table; every row is an output row.
    """
    pad = bucket - plan.num_seqs
    table: list[int] = []
    for seq in range(plan.num_seqs):
        table += plan.block_table[seq * plan.width:(seq + 1) * plan.width]
        table += [0] * (width - plan.width)
    table += [0] * (width * pad)
    return replace(
        plan,
        width=width,
        token_ids=plan.token_ids + [0] * pad,
        positions=plan.positions + [0] * pad,
        slots=plan.slots + [-1] * pad,
        row_seq=plan.row_seq + list(range(plan.num_seqs, bucket)),
        query_start=plan.query_start + list(range(plan.num_rows + 1, bucket + 1)),
        seq_lens=plan.seq_lens + [1] * pad,
        block_table=table,
        output_rows=list(range(bucket)),
    )


def padding_plan(bucket: int, block_size: int, width: int) -> StepPlan:
    """A decode step of `bucket` padding sequences only: it writes nothing."""
    empty = StepPlan(block_size=block_size, width=0, max_query=1, token_ids=[], positions=[],
                     slots=[], row_seq=[], query_start=[0], seq_lens=[], block_table=[],
                     output_rows=[])
    return pad_decode_plan(empty, bucket, width)


@dataclass(frozen=True, slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # float32 [bucket, vocab], rewritten by each replay
    layout: tuple[tuple[str, int, torch.dtype], ...]  # its fields, from the static buffer's start


class DecodeGraphs:
    """The decode graphs of one model and KV cache, on a CUDA device, with Triton attention.

    A step's host work (`pack`) and device work (`launch`) are apart, as the engine's are.
    """

    def __init__(self, model: DecoderModel, cache: torch.Tensor, *,
                 max_width: int = MAX_WIDTH, extra_capacity: int = EXTRA_CAPACITY) -> None:
        geometry = KVCacheGeometry.of(cache)
        self.model = model
        self.cache = cache
        self.block_size = geometry.block_size
        # Wider serves no sequence: none has more positions than the model, nor (unless it
        # repeats blocks, and then it runs eagerly) more blocks than the cache.
        self.width = min(-(-model.config.max_position_embeddings // self.block_size),
                         geometry.num_blocks, max_width)
        self.enabled = True
        largest = model.pack(padding_plan(BUCKETS[-1], self.block_size, self.width))
        self._static = torch.empty(len(largest.buffer) + extra_capacity, dtype=torch.int64,
                                   device=cache.device)
        self._graphs: dict[int, _Captured] = {}
        self._pool: tuple[int, int] | None = None

    @staticmethod
    def supported(model: DecoderModel, cache: torch.Tensor) -> bool:
        """A real CUDA device (a fake one has no graphs) and the Triton backend."""
        return (cache.device.type == "cuda" and torch.cuda.is_available()
                and model.attention_backend().name == "triton")

    def pack(self, plan: StepPlan, extra: dict[str, torch.Tensor]) -> PackedInputs | None:
        """Host work: the step padded to its bucket and packed, `extra` after the graph's
        fields; or None: it runs eagerly (not replayable, too much `extra`, graphs off)."""
        bucket = bucket_for(plan.num_seqs)
        if not self.enabled or bucket is None or not replayable(plan, self.width):
            return None
        packed = self.model.pack(pad_decode_plan(plan, bucket, self.width), extra)
        return packed if len(packed.buffer) <= len(self._static) else None

    def launch(self, packed: PackedInputs, rows: int,
               fill: Callable[[StepInputs], None] | None = None
               ) -> tuple[torch.Tensor, StepInputs]:
        """Device work of a step from `pack`: the logits of its first `rows` rows (float32,
        valid until the next replay) and its inputs on the device. `fill` writes into those
        inputs on the device (in the static buffer) before the forward reads them. Replays
        the bucket's graph, captured on first use; if that raises, logs one warning and
        turns graphs off. With graphs off the padded step runs eagerly."""
        bucket = packed.plan.num_seqs
        if self.enabled:
            try:
                captured = self._graphs.get(bucket) or self._capture(bucket)
                if packed.layout[:len(captured.layout)] != captured.layout:
                    raise RuntimeError(f"a bucket-{bucket} step's fields moved since capture")
                inputs = packed.into(self._static)
                if fill is not None:
                    fill(inputs)
                captured.graph.replay()
                return captured.logits.narrow(0, 0, rows), inputs
            except Exception as exc:
                log.warning("CUDA graphs are off for this process, steps run eagerly: the "
                            "bucket-%d graph failed: %s: %s", bucket, type(exc).__name__, exc)
                self.enabled = False
                self._graphs.clear()
        inputs = packed.to(self.cache.device)
        if fill is not None:
            fill(inputs)
        return self.model.forward(self.cache, inputs).narrow(0, 0, rows), inputs

    def _capture(self, bucket: int) -> _Captured:
        """The bucket's graph, recorded over an all-padding step: it writes no KV."""
        blank = self.model.pack(padding_plan(bucket, self.block_size, self.width))
        graph, logits = self._record(blank.into(self._static))
        self._graphs[bucket] = _Captured(graph, logits, blank.layout)
        return self._graphs[bucket]

    def _record(self, inputs: StepInputs) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The forward over `inputs` as a graph and its output: one eager warm-up on a side
        stream (Triton compiles, cuBLAS sets up), then the capture on the same stream."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.forward(self.cache, inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the copy engines' threads keep using CUDA while this one captures.
        with torch.cuda.graph(graph, pool=self._pool, stream=side,
                              capture_error_mode="thread_local"):
            logits = self.model.forward(self.cache, inputs)
        return graph, logits
