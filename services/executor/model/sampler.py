"""Token choice from logits: greedy, or temperature + top-k + top-p with a per-request seed.

A sampled token depends only on (seed, output index, logits): the random draw comes from a
generator seeded by the first two, never from shared state. So a request that is preempted,
recomputed or batched differently draws the same tokens, given the same logits.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    logprobs: bool = False  # also report log P(chosen token) under the unscaled distribution
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th included); 0: all

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    output_index: int,
    banned: Sequence[int] = (),
) -> SampledToken:
    """Chooses the token at `output_index` (0 for the first generated token) from [vocab]
    logits, never one of `banned` (stop tokens before min_tokens, as HF's min_new_tokens)."""
    if logits.dim() != 1:
        raise ValueError(f"sample takes one row of logits, got shape {tuple(logits.shape)}")
    raw = logits.double()
    allowed = raw
    if banned:
        allowed = raw.clone()
        allowed[list(banned)] = -math.inf
    if params.temperature == 0:
        token_id = int(torch.argmax(allowed))
    else:
        scaled = _top_k(allowed, params.top_k) / params.temperature
        token_id = _draw(scaled, params.top_p, _generator(params.seed, output_index))
    logprob = float(torch.log_softmax(raw, dim=-1)[token_id]) if params.logprobs else None
    return SampledToken(token_id, logprob)


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if not k or k >= len(logits):
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -math.inf)


def _draw(scaled: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """Inverse-CDF draw from the smallest set of most likely tokens whose mass reaches top_p."""
    probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True, stable=True)
    cumulative = torch.cumsum(probs, dim=0)
    kept = int(torch.searchsorted(cumulative, torch.tensor([top_p], dtype=cumulative.dtype))) + 1
    kept = min(kept, len(probs))
    target = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[kept - 1]
    choice = min(
        int(torch.searchsorted(cumulative[:kept], target.reshape(1), right=True)), kept - 1
    )
    return int(order[choice])


def _generator(seed: int, output_index: int) -> torch.Generator:
    mixed = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(mixed, "little") >> 1)
