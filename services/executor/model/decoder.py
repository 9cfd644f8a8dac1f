"""The decoder: one forward pass per scheduler step over a mixed prefill/decode batch.

Two modes, chosen when the model is built (`DecoderModel(..., batch_invariant=...)`):

- fast (the default): row-wise ops run once on the step's real rows, and attention is one
  masked SDPA call per sequence chunk. Logits agree with the invariant mode and with HF to
  float rounding, but their bits may change with the batch and the chunking.
- batch-invariant, the property bit-exact preemption relies on: a token's logits and KV are
  the same bits whatever other sequences share the step, however its prompt was chunked and
  wherever its blocks live. Two measures give it:

  - every row-wise op (norms, projections, MLP, lm_head) runs on tiles of exactly
    `ROWS_PER_TILE` rows, zero-padded. MKL picks GEMM kernels by row count (1 row and a
    handful of rows reduce differently from many), but within one fixed shape a row's
    result does not depend on its place in the tile or on its neighbours; `ROWS_PER_TILE`
    is a multiple of the widest SIMD chunk, so no row falls into a scalar tail loop either;
  - attention is per query row over exactly its visible keys (see `attention.py`).

  The price: a decode of one token pays for 32 rows, and attention is a Python loop over
  rows. Both modes place KV at the same slots, so a cache is valid for either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from services.executor.model.attention import batched_attention, invariant_attention, write_kv
from services.executor.model.batch import SequenceStep, StepLayout
from services.executor.model.config import ModelConfig
from services.executor.model.fingerprint import weights_digest
from services.executor.model.kv_cache import KVCacheGeometry
from services.executor.model.layers import DecoderLayer, RMSNorm, RotaryTable

ROWS_PER_TILE = 32


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
        batch_invariant: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.batch_invariant = batch_invariant
        self.model = DecoderBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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

    @torch.inference_mode()
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
        geometry = KVCacheGeometry.of(cache)
        self._check_cache(geometry)
        layout = StepLayout.build(
            batch,
            block_size=geometry.block_size,
            num_blocks=geometry.num_blocks,
            vocab_size=self.config.vocab_size,
            max_positions=self.config.max_position_embeddings,
        )
        if self.batch_invariant:
            rowwise, attention = _in_tiles, invariant_attention
        else:
            rowwise, attention = _at_once, batched_attention
        x = self.model.embed_tokens(layout.token_ids)
        for index, layer in enumerate(self.model.layers):
            q, k, v = rowwise(partial(layer.project_qkv, rotary=self.rotary), x, layout.positions)
            layer_cache = cache[:, index]
            write_kv(layer_cache, layout, k, v)
            attended = attention(layer_cache, q, layout, self.scale).flatten(1)
            (x,) = rowwise(_single(layer.finish), x, attended)
        wanted = x if all_positions else x[layout.last_rows]
        (logits,) = rowwise(_single(self._logits), wanted)
        return logits.float()

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
    return tuple(torch.cat(parts)[:rows] for parts in zip(*outputs, strict=True))


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    missing = -len(t) % ROWS_PER_TILE
    if not missing:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((missing, *t.shape[1:]))])
