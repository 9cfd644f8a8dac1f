"""GPUs, model geometries and what fits where: the static facts every other cost follows from.

Numbers and their sources are listed in COST_MODEL.md next to this file.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


class DoesNotFit(ValueError):
    """The model's weights (plus the activation reserve) leave no room for KV cache on the GPU."""


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU and its host link: measured one-way pinned throughput and cost per copy."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    fp16_tensor_flops: float
    host_link_bytes_per_s: float = 25e9  # PCIe 4.0 x16, measured
    copy_overhead_s: float = 5e-6  # one cudaMemcpyAsync


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A Llama/Qwen2-style decoder, as its HF config.json describes it."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    qkv_bias: bool
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def kv_bytes_per_block(self, block_size: int) -> int:
        return block_size * self.kv_bytes_per_token

    @property
    def layer_matmul_params(self) -> int:
        """Weights one token multiplies through in one layer (q, k, v, o and the gated MLP)."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        return attention + 3 * self.hidden_size * self.intermediate_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """All weights: layers, norms, biases, the embedding table and the untied LM head."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer = self.layer_matmul_params + bias + 2 * self.hidden_size
        return self.num_layers * per_layer + 2 * self.lm_head_params + self.hidden_size

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


A10 = GpuSpec("A10 24GB", memory_bytes=24 * GIB, hbm_bytes_per_s=600e9, fp16_tensor_flops=125e12)
A100_80GB = GpuSpec(
    "A100 80GB PCIe", memory_bytes=80 * GIB, hbm_bytes_per_s=1935e9, fp16_tensor_flops=312e12
)
# Hopper SXM5 boards: PCIe 5.0 x16 to the host, about 50 GB/s one way measured.
H100_SXM = GpuSpec(
    "H100 80GB SXM", memory_bytes=80 * GIB, hbm_bytes_per_s=3350e9, fp16_tensor_flops=989e12,
    host_link_bytes_per_s=50e9, copy_overhead_s=4e-6,
)
H200_SXM = GpuSpec(
    "H200 141GB SXM", memory_bytes=141 * GIB, hbm_bytes_per_s=4800e9, fp16_tensor_flops=989e12,
    host_link_bytes_per_s=50e9, copy_overhead_s=4e-6,
)
# Grace Hopper: the GPU reaches host memory over NVLink-C2C, about 300 GB/s measured one
# way (the figure; 450 GB/s per direction on paper), so a copy's fixed cost
# dominates sooner than on PCIe.
GH200 = GpuSpec(
    "GH200 96GB", memory_bytes=96 * GIB, hbm_bytes_per_s=4000e9, fp16_tensor_flops=989e12,
    host_link_bytes_per_s=300e9, copy_overhead_s=4e-6,
)

LLAMA3_8B = ModelSpec(
    "LLaMA-3-8B",
    num_layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
    max_context=8192,
    qkv_bias=False,
)
QWEN25_32B = ModelSpec(
    "Qwen-2.5-32B",
    num_layers=64,
    hidden_size=5120,
    num_heads=40,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=27648,
    vocab_size=152064,
    max_context=32768,
    qkv_bias=True,
)
# A small-KV model: 16 layers x 8 KV heads x 64 dims, 32 KiB per token, 0.5 MiB per block
# of 16 (HF config of meta-llama/Llama-3.2-1B; context capped at 8k here).
LLAMA32_1B = ModelSpec(
    "LLaMA-3.2-1B",
    num_layers=16,
    hidden_size=2048,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    intermediate_size=8192,
    vocab_size=128256,
    max_context=8192,
    qkv_bias=False,
)

GPUS: dict[str, GpuSpec] = {
    "a10": A10, "a100": A100_80GB, "h100": H100_SXM, "h200": H200_SXM, "gh200": GH200,
}
MODELS: dict[str, ModelSpec] = {
    "llama-3-8b": LLAMA3_8B, "qwen-2.5-32b": QWEN25_32B, "llama-3.2-1b": LLAMA32_1B,
}

# cuBLAS workspaces, CUDA graph pools and allocator slack that profiling a forward pass misses.
RUNTIME_WORKSPACE_BYTES = 512 * 1024**2


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model on one GPU (tensor parallel 1), sized the way vLLM sizes its KV cache.

    vLLM gives the KV cache `gpu_memory_utilization * memory - weights - peak activations`; the
    peak comes from a profiling forward pass of `max_batched_tokens` tokens.
    """

    gpu: GpuSpec
    model: ModelSpec
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_batched_tokens: int = 2048
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.block_size <= 0 or self.max_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("block_size, max_batched_tokens and max_num_seqs must be positive")
        if self.num_gpu_blocks < 1:
            budget = self.gpu_memory_utilization * self.gpu.memory_bytes
            raise DoesNotFit(
                f"{self.model.name} does not fit on {self.gpu.name} at tensor parallel 1: "
                f"weights {self.model.weight_bytes / GIB:.1f} GiB + activation reserve "
                f"{self.activation_reserve_bytes / GIB:.1f} GiB exceed the "
                f"{self.gpu_memory_utilization:g} x {self.gpu.memory_bytes / GIB:.0f} GiB = "
                f"{budget / GIB:.1f} GiB budget"
            )

    @property
    def activation_reserve_bytes(self) -> int:
        """Peak of one profiling forward pass: MLP and QKV intermediates of every batched token,
        fp32 logits of every sampled sequence, plus a fixed runtime workspace."""
        m = self.model
        per_token = m.dtype_bytes * (
            2 * m.intermediate_size + (m.num_heads + 2 * m.num_kv_heads) * m.head_dim
            + 2 * m.hidden_size
        )
        logits = self.max_num_seqs * m.vocab_size * 4
        return self.max_batched_tokens * per_token + logits + RUNTIME_WORKSPACE_BYTES

    @property
    def kv_capacity_bytes(self) -> int:
        budget = int(self.gpu_memory_utilization * self.gpu.memory_bytes)
        return budget - self.model.weight_bytes - self.activation_reserve_bytes

    @property
    def block_bytes(self) -> int:
        return self.model.kv_bytes_per_block(self.block_size)

    @property
    def num_gpu_blocks(self) -> int:
        return max(0, self.kv_capacity_bytes // self.block_bytes)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size
