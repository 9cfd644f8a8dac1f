"""The decoder: one forward pass per scheduler step over a mixed prefill/decode batch.

A step is laid out on the host once (`StepPlan`), its index lists are packed in one host
buffer (`PackedInputs`) and cross to the device in one copy (`StepInputs`), and the pass
runs with no host sync: embeddings, one paged attention call per layer for the whole step
(`attention.py`), and the logits of the rows asked for. `forward_step` does it all.

Two modes, chosen when the model is built (`DecoderModel(..., batch_invariant=...)`):

- fast (the default): row-wise ops run once on the step's real rows. Logits agree with the
  invariant mode and with HF to float rounding, but their bits may change with the batch
  and the chunking.
- batch-invariant, the property bit-exact preemption relies on: a token's logits and KV are
  the same bits whatever other sequences share the step, however its prompt was chunked and
  wherever its blocks live. Two measures give it:

  - every row-wise op (norms, projections, MLP, lm_head) runs on tiles of exactly
    `ROWS_PER_TILE` rows, zero-padded. BLAS libraries pick GEMM kernels by row count (1 row
    and a handful of rows reduce differently from many), but within one fixed shape a row's
    result does not depend on its place in the tile or on its neighbours; `ROWS_PER_TILE`
    is a multiple of the widest SIMD chunk, so no row falls into a scalar tail loop either;
  - attention visits keys in fixed one-block tiles (see `attention.py`).

  The price: a decode of one token pays for 32 rows. Both modes place KV at the same
  slots, so a cache is valid for either.

The attention backend is "torch" on CPU and "triton" on CUDA unless the model is built with
another (`attention=`); which one ran is part of what names a cache's bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from services.executor.model.attention import PagedAttention, TorchAttention
from services.executor.model.batch import PackedInputs, SequenceStep, StepInputs, StepPlan
from services.executor.model.config import ModelConfig
from services.executor.model.fingerprint import weights_digest
from services.executor.model.kv_cache import KVCacheGeometry
from services.executor.model.layers import (
    PACKED_HEIGHTS,
    DecoderLayer,
    Projection,
    RMSNorm,
    RotaryTable,
)

ROWS_PER_TILE = 32
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def attention_backend(
    name: str, device: torch.device, *, queries_per_kv: int, batch_invariant: bool
) -> PagedAttention:
    """The backend called `name` ("auto": "triton" on CUDA, "torch" elsewhere). Triton is
    imported only when chosen: a CPU install need not have it."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {ATTENTION_BACKENDS}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttention(batch_invariant)
    from services.executor.model.triton_attention import TritonAttention

    return TritonAttention(queries_per_kv, batch_invariant)


class DecoderBody(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderModel(nn.Module):
    """Llama/Qwen2 causal LM whose `state_dict` keys are HF's (`model.layers.0...`, `lm_head`)."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype = torch.float32, *,
        batch_invariant: bool = False, attention: str = "auto",
    ) -> None:
        super().__init__()
        self.config = config
        self.batch_invariant = batch_invariant
        self.attention = attention  # a name from ATTENTION_BACKENDS
        self._backends: dict[torch.device, PagedAttention] = {}
        self.model = DecoderBody(config)
        self.lm_head = Projection(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryTable(config)
        self.scale = config.head_dim**-0.5
        self.to(dtype)
        self.requires_grad_(False)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def fingerprint(self) -> str:
        """Stable across processes and loads; changes with any weight, dtype or config field."""
        return self.config.fingerprint(weights_digest(self.state_dict()))

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def attention_backend(self) -> PagedAttention:
        """The paged attention for the model's device and mode."""
        device = self.device
        if device not in self._backends:
            self._backends[device] = attention_backend(
                self.attention, device, queries_per_kv=self.config.queries_per_kv,
                batch_invariant=self.batch_invariant,
            )
        return self._backends[device]

    def plan_step(
        self, geometry: KVCacheGeometry, batch: Sequence[SequenceStep], *,
        all_positions: bool = False, validated: bool = False,
    ) -> StepPlan:
        """Validates the batch against the cache and the model (ValueError), unless the
        caller has (`validated`), and lays it out."""
        self._check_cache(geometry)
        return StepPlan.build(
            batch,
            block_size=geometry.block_size,
            num_blocks=geometry.num_blocks,
            vocab_size=self.config.vocab_size,
            max_positions=self.config.max_position_embeddings,
            all_positions=all_positions,
            validated=validated,
        )

    def pack(self, plan: StepPlan, extra: dict[str, torch.Tensor] | None = None
             ) -> PackedInputs:
        """The plan's index lists, the attention backend's and `extra` (1-D CPU tensors of
        8-byte elements) in one host buffer; `.to(model.device)` moves them in one copy."""
        fields: dict[str, list[int] | torch.Tensor] = {
            **plan.fields(), **self.attention_backend().host_fields(plan), **(extra or {})
        }
        # Pinned for a real CUDA device (a fake one, on a CPU build, has no pinned memory).
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        return PackedInputs.pack(plan, fields, pin=pin)

    @torch.inference_mode()
    def forward(self, cache: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Writes the step's new KV into `cache` and returns float32 logits of the plan's
        output rows, `[len(output_rows), vocab]`; no host sync."""
        rowwise = _in_tiles if self.batch_invariant else _at_once
        attend = self.attention_backend().bind(inputs, self.scale)
        x = self.model.embed_tokens(inputs["token_ids"])
        cos, sin = self.rotary.lookup(inputs["positions"], x.dtype)
        for index, layer in enumerate(self.model.layers):
            q, k, v = rowwise(layer.project_qkv, x, cos, sin)
            attended = attend(cache.select(1, index), q, k, v).flatten(1)
            (x,) = rowwise(_single(layer.finish), x, attended)
        if not inputs.plan.all_rows_out:
            x = x.index_select(0, inputs["output_rows"])
        (logits,) = rowwise(_single(self._logits), x)
        return logits.float()

    def forward_step(
        self,
        cache: torch.Tensor,
        batch: Sequence[SequenceStep],
        *,
        all_positions: bool = False,
    ) -> torch.Tensor:
        """Writes the batch's new KV into `cache` and returns float32 logits.

        Shape `[len(batch), vocab]` for each sequence's last new token, or with
        `all_positions` `[total new tokens, vocab]`, sequences in batch order.
        """
        plan = self.plan_step(KVCacheGeometry.of(cache), batch, all_positions=all_positions)
        return self.forward(cache, self.pack(plan).to(self.device))

    def pack_projections(self, heights: tuple[int, ...] = PACKED_HEIGHTS) -> None:
        """Has every projection pad its rows to `heights` (`Projection`; on a CPU, in
        float32; () packs none), and packs their weights now for those this mode's steps
        run at, so that no step pays for it: the batch-invariant mode's `ROWS_PER_TILE`-row
        tiles need only that one, the fast mode all. Call it on the thread that will run the
        steps, on their intra-op thread count."""
        if self.batch_invariant:
            heights = tuple(h for h in heights if h == ROWS_PER_TILE)
        for module in self.modules():
            if isinstance(module, Projection):
                module.pack(heights)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))

    def _check_cache(self, geometry: KVCacheGeometry) -> None:
        expected = (
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
        )
        actual = (geometry.num_layers, geometry.kv_heads, geometry.head_dim)
        if actual != expected:
            raise ValueError(
                f"KV cache (layers, kv_heads, head_dim)={actual} "
                f"does not fit the model's {expected}"
            )


RowFn = Callable[..., tuple[torch.Tensor, ...]]


def _single(fn: Callable[..., torch.Tensor]) -> RowFn:
    return lambda *rows: (fn(*rows),)


def _at_once(fn: RowFn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The fast path: `fn` on all the step's rows in one call."""
    return fn(*inputs)


def _in_tiles(fn: RowFn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The invariant path: `fn` on each zero-padded `ROWS_PER_TILE`-row tile, re-joined and
    trimmed to the real rows."""
    rows = len(inputs[0])
    tiles = zip(*(_pad_rows(t).split(ROWS_PER_TILE) for t in inputs), strict=True)
    outputs = [fn(*tile) for tile in tiles]
    return tuple(torch.cat(parts).narrow(0, 0, rows) for parts in zip(*outputs, strict=True))


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    missing = -len(t) % ROWS_PER_TILE
    if not missing:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])
