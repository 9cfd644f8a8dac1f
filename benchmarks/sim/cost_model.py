"""Step time of one batched forward pass: a roofline over the GEMMs and one over attention.

The GEMMs (q/k/v/o, the MLP, the LM head) stream every weight once per step and do
`2 * params` FLOPs per token, so a decode-only step is bound by weight bandwidth and a long
prefill by tensor-core FLOPs. Attention is its own kernel: it reads each sequence's KV (and
writes the new tokens'), which is what makes large decode batches memory-bound even when the
GEMMs are not. The two rooflines are added, plus a fixed per-step overhead (scheduling,
sampling, launches). Sources and calibration: COST_MODEL.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.sim.hardware import Deployment

# (context_len, new_tokens): tokens already in the KV cache, tokens computed this step.
SequenceWork = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Roofline:
    flops: float
    bytes: float
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def compute_bound(self) -> bool:
        return self.compute_s >= self.memory_s


@dataclass(frozen=True, slots=True)
class StepCost:
    gemm: Roofline
    attention: Roofline
    overhead_s: float

    @property
    def seconds(self) -> float:
        return self.gemm.seconds + self.attention.seconds + self.overhead_s


@dataclass(frozen=True, slots=True)
class StepCostModel:
    """Efficiencies are the achieved fraction of the datasheet peaks (COST_MODEL.md)."""

    deployment: Deployment
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.85
    step_overhead_s: float = 4e-3

    def __post_init__(self) -> None:
        for name in ("compute_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.step_overhead_s < 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {self.step_overhead_s}")

    def _roofline(self, flops: float, num_bytes: float) -> Roofline:
        gpu = self.deployment.gpu
        return Roofline(
            flops=flops,
            bytes=num_bytes,
            compute_s=flops / (gpu.fp16_tensor_flops * self.compute_efficiency),
            memory_s=num_bytes / (gpu.hbm_bytes_per_s * self.memory_efficiency),
        )

    def cost(self, batch: Sequence[SequenceWork]) -> StepCost:
        if not batch:
            raise ValueError("a step needs at least one sequence")
        model = self.deployment.model
        new_tokens = 0
        attention_flops = 0.0
        kv_tokens_touched = 0
        for context_len, new in batch:
            if context_len < 0 or new < 1:
                raise ValueError(
                    f"bad sequence work (context_len={context_len}, new_tokens={new}): "
                    "context_len must be >= 0 and new_tokens >= 1"
                )
            if context_len + new > model.max_context:
                raise ValueError(
                    f"sequence of {context_len + new} tokens exceeds {model.name}'s context "
                    f"of {model.max_context}"
                )
            new_tokens += new
            # Causal attention: new token i (0-based) scores and mixes context_len + i + 1 keys;
            # QK^T and PV are 2 FLOPs per multiply-add each.
            keys = new * context_len + new * (new + 1) // 2
            attention_flops += 4 * model.num_heads * model.head_dim * keys * model.num_layers
            kv_tokens_touched += context_len + new
        # Logits only for each sequence's last position, as vLLM computes them.
        gemm_flops = 2 * (
            new_tokens * model.num_layers * model.layer_matmul_params
            + len(batch) * model.lm_head_params
        )
        # The embedding table is gathered (a few rows), not streamed; every other weight is.
        gemm_bytes = model.weight_bytes - model.lm_head_params * model.dtype_bytes
        attention_bytes = kv_tokens_touched * model.kv_bytes_per_token
        return StepCost(
            gemm=self._roofline(gemm_flops, gemm_bytes),
            attention=self._roofline(attention_flops, attention_bytes),
            overhead_s=self.step_overhead_s,
        )

    def step_time_s(self, batch: Sequence[SequenceWork]) -> float:
        return self.cost(batch).seconds
