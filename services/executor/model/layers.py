"""The row-wise building blocks of a Llama/Qwen2 layer, named as HF names their weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.executor.model.config import ModelConfig
from services.executor.model.rope import rope_frequencies

# A CPU projection of PACKED_FROM_ROWS rows or more, up to its largest packed height, pads them
# to the next height and multiplies a copy of its weight that MKL packed for that many rows.
PACKED_FROM_ROWS = 4
PACKED_HEIGHTS = (8, 16, 32)  # by default
MKL_PACKING = torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()


def packed_height(rows: int, heights: tuple[int, ...] = PACKED_HEIGHTS) -> int | None:
    """The GEMM height, of ascending `heights`, a CPU projection of `rows` rows pads them to,
    or None: by HF's weight."""
    if rows < PACKED_FROM_ROWS:
        return None
    return next((height for height in heights if height >= rows), None)


class Projection(nn.Linear):
    """`nn.Linear`, with HF's row-major `[out, in]` weight (the one it loads, saves and
    names), that on a CPU multiplies 4 to 32 float32 rows by copies of that weight which MKL
    packed for a GEMM of 8, 16 or 32 rows (`cblas_sgemm_pack`), padding the rows up to one.

    MKL packs the weight into its GEMM kernel's layout on every call of 4 rows or more; a
    weight packed once for a height skips that. Measured side by side in one process
    (SmolLM2, fast mode, 2 cores): a step 1.3x faster at batch 8, 1.15x at 16 and 1.1x at 32,
    and the output head alone 2.3x at 8 rows; from 1 to 3 rows MKL runs a GEMV on HF's
    weight, which packing does not beat. MKL also fixes, when it packs, how many threads
    share the product: a weight packed on one thread ran a batch-8 step on two as slowly as
    on one (90-95 ms against 59-62). So a copy is packed for a height and the calling
    thread's intra-op thread count; pack on the thread that runs the steps
    (`DecoderModel.pack_projections`, which also sets the heights). Each copy costs the
    weight's bytes again (540 MB for SmolLM2); one is made at its first call, and again once
    the weight has changed.
    Elsewhere (another device or dtype, other row counts, gradients wanted, a torch without
    MKL) it is `F.linear` on HF's weight.
    """

    # Packed copies by (height, threads), and the weight, data pointer and version they were
    # packed from.
    _packed: tuple[dict[tuple[int, int], torch.Tensor], torch.Tensor, int, int] | None = None
    heights: tuple[int, ...] = PACKED_HEIGHTS  # ascending; () packs none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        height = packed_height(rows, self.heights)
        if height is None or not self.packs_for(x):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if rows < height:
            flat = F.pad(flat, (0, 0, 0, height - rows))
        out = torch.ops.mkl._mkl_linear(flat, self.packed_weight(height), self.weight,
                                        self.bias, height)
        return out[:rows].reshape(*x.shape[:-1], self.out_features)

    def packs_for(self, x: torch.Tensor) -> bool:
        """Whether `x` (of a packed height) multiplies a packed weight: float32 on a CPU,
        with MKL, and no gradient wanted (MKL's product has none)."""
        return (MKL_PACKING and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
                and not (torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (x, self.weight, self.bias))))

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Projection:
        self._packed = None  # moved or cast (`to`, `half`, ...): the copies are of the old one
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        """As `nn.Linear`'s, without the packed copies (MKL-DNN tensors, which cannot be
        copied or saved): a copy packs its own."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        return state

    def pack(self, heights: tuple[int, ...]) -> None:
        """From now on pads rows to `heights` (ascending; () packs none), drops the copies
        packed for other heights, and packs the weight for each of `heights` now, where a
        call would use them."""
        self.heights = heights
        if self._packed is not None:
            for key in [key for key in self._packed[0] if key[0] not in heights]:
                del self._packed[0][key]
        if self.packs_for(self.weight):
            for height in heights:
                self.packed_weight(height)

    def packed_weight(self, height: int) -> torch.Tensor:
        """The weight packed by MKL for GEMMs of `height` rows on this thread's intra-op
        thread count (an opaque MKL-DNN tensor). Packed again once the weight is another
        tensor, holds other memory or was written in place, but not after a write through
        `weight.data` (a version counter of its own) or to an inference tensor (which has
        none): write the parameter itself."""
        weight = self.weight
        source = (weight, weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if self._packed is None or self._packed[1] is not weight or self._packed[2:] != source[1:]:
            self._packed = ({}, *source)
        packed = self._packed[0]
        key = (height, torch.get_num_threads())
        if key not in packed:
            packed[key] = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), height)
        return packed[key]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryTable(nn.Module):
    """cos/sin for every position, computed once: a lookup is exact, a recomputation might not be.

    Layout is HF's "rotate half": dims `[i, i + head_dim/2]` form a pair. The table is HF's
    `LlamaRotaryEmbedding` output for the config's RoPE type, `attention_scaling` included.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        max_positions = config.max_position_embeddings
        inv_freq, scale = rope_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, max_positions
        )
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos() * scale, persistent=False)
        self.register_buffer("sin", angles.sin() * scale, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[rows, 1, head_dim]` for a step's positions, once for every layer."""
        cos = self.cos.index_select(0, positions).unsqueeze(1).to(dtype)
        sin = self.sin.index_select(0, positions).unsqueeze(1).to(dtype)
        return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [rows, heads, head_dim]; cos and sin from `RotaryTable.lookup`."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class SelfAttentionProjections(nn.Module):
    """The q/k/v/o weights; the attention itself is paged and lives in `attention.py`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        q_size = config.num_attention_heads * head_dim
        kv_size = config.num_key_value_heads * head_dim
        self.q_proj = Projection(hidden, q_size, bias=config.attention_bias)
        self.k_proj = Projection(hidden, kv_size, bias=config.attention_bias)
        self.v_proj = Projection(hidden, kv_size, bias=config.attention_bias)
        self.o_proj = Projection(q_size, hidden, bias=config.o_proj_bias)


class GatedMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Projection(hidden, inner, bias=bias)
        self.up_proj = Projection(hidden, inner, bias=bias)
        self.down_proj = Projection(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A pre-norm layer split around attention, so the executor can page attention in between."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttentionProjections(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        h = self.input_layernorm(x)
        attn = self.self_attn
        q = attn.q_proj(h).view(rows, self.heads, self.head_dim)
        k = attn.k_proj(h).view(rows, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(rows, self.kv_heads, self.head_dim)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual. attended: [rows, heads * head_dim]."""
        x = x + self.self_attn.o_proj(attended)
        return x + self.mlp(self.post_attention_layernorm(x))
