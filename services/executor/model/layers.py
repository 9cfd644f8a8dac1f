"""The row-wise building blocks of a Llama/Qwen2 layer, named as HF names their weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.executor.model.config import ModelConfig
from services.executor.model.rope import rope_frequencies

BY_COLUMN_FROM_ROWS = 4  # a CPU projection of this many rows or more reads its weight by column


class Projection(nn.Linear):
    """`nn.Linear`, with HF's row-major `[out, in]` weight (the one it loads, saves and
    names), that on a CPU multiplies `BY_COLUMN_FROM_ROWS` or more rows by a column-major
    copy of that weight.

    MKL repacks a row-major weight on every GEMM of 4 rows or more, but reads an
    `[in, out]`-contiguous one as it lies; from 1 to 3 rows it runs a GEMV-like kernel that
    is faster on the row-major weight. Measured on 2 cores (SmolLM2's projections, fp32, 30
    layers of distinct weights): by column, 1.6x faster at 4-8 rows and 2-2.4x at 16-32;
    by row, 1.2x faster at 2-3 rows, and a batch-1 step 1.2x faster while another process
    takes a core (as the scheduler does, beside the executor). The copy costs the weight's
    bytes again; it is made at the first such call, and again once the weight has changed.
    """

    # The copy, and the weight, data pointer and version it was copied from.
    _by_column: tuple[torch.Tensor, torch.Tensor, int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.numel() < BY_COLUMN_FROM_ROWS * x.shape[-1]
                or (torch.is_grad_enabled() and self.weight.requires_grad)):  # the copy has none
            return F.linear(x, self.weight, self.bias)
        out = torch.matmul(x, self.weight_by_column())
        return out if self.bias is None else out + self.bias

    def weight_by_column(self) -> torch.Tensor:
        """The weight as `[in, out]`, contiguous: its transpose, copied. Copied again once the
        weight is another tensor, holds other memory or was written in place, but not after a
        write through `weight.data` (a version counter of its own) or to an inference tensor
        (which has none): write the parameter itself."""
        weight = self.weight
        version = 0 if weight.is_inference() else weight._version
        cached = self._by_column
        if (cached is None or cached[1] is not weight
                or cached[2:] != (weight.data_ptr(), version)):
            cached = (weight.detach().t().contiguous(), weight, weight.data_ptr(), version)
            self._by_column = cached
        return cached[0]


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
