"""Token choice from logits: greedy, or temperature + top-k + top-p with a per-request seed.

A sampled token depends only on (seed, output index, logits): the random draw comes from a
generator seeded by the first two, never from shared state. So a request that is preempted,
recomputed or batched differently draws the same tokens, given the same logits.

The draw is made on the host (`SamplingInputs.build`), since it needs no logits; the choice
runs for all of a step's rows at once on the logits' device (`sample_rows`), with no host
sync, so the only copy back is the chosen tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

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
class SamplingInputs:
    """Per sampled row, in row order; every field a 1-D tensor of 8-byte elements (int64 or
    float64) so the engine can pack them into one int64 buffer and view them back."""

    temperature: torch.Tensor  # float64 [n]; 0 = greedy
    top_p: torch.Tensor  # float64 [n]
    top_k: torch.Tensor  # int64 [n]; 0 = all
    uniform: torch.Tensor  # float64 [n]; the row's draw in [0, 1) (unused for greedy rows)
    banned: torch.Tensor  # int64 [m]; flat indices row * vocab + token to set to -inf

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
        banned: Sequence[Sequence[int]],
        vocab_size: int,
    ) -> SamplingInputs:
        """Host (CPU) tensors for rows sampled with `params[i]` at `output_indices[i]` (0 for a
        request's first token), never choosing `banned[i]` (stop tokens before min_tokens, as
        HF's min_new_tokens; each in [0, vocab_size), never all of them)."""
        if not len(params) == len(output_indices) == len(banned):
            raise ValueError("params, output_indices and banned need one entry per row")
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float64),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
            uniform=torch.tensor(
                [_uniform(p.seed, i) if p.temperature else 0.0
                 for p, i in zip(params, output_indices, strict=True)],
                dtype=torch.float64,
            ),
            banned=torch.tensor(
                [row * vocab_size + token for row, tokens in enumerate(banned) for token in tokens],
                dtype=torch.int64,
            ),
        )

    def named(self) -> dict[str, torch.Tensor]:
        """The fields by name, to travel in a step's one copy (`DecoderModel.pack`)."""
        return {f"sampling.{f.name}": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_named(cls, tensors: Mapping[str, torch.Tensor]) -> SamplingInputs:
        return cls(*(tensors[f"sampling.{f.name}"] for f in fields(cls)))

    def to(self, device: torch.device) -> SamplingInputs:
        """The same inputs on `device`, each copied without waiting."""
        return SamplingInputs(
            *(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self))
        )


def sample_rows(
    logits: torch.Tensor, inputs: SamplingInputs, *, all_greedy: bool, want_logprobs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: float32 [n, vocab] on any device; inputs on the same device. Returns token ids
    int64 [n] and, if want_logprobs, float64 [n] logprobs, both on that device; no host sync.

    `all_greedy` says every row's temperature is 0: then the step is one argmax. A logprob is
    log P(token) under the raw logits, before bans, top-k, top-p and temperature.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_rows takes [rows, vocab] logits, got {tuple(logits.shape)}")
    allowed = _ban(logits, inputs.banned)
    tokens = torch.argmax(allowed, dim=-1)
    if not all_greedy:
        tokens = torch.where(inputs.temperature == 0, tokens, _draw(allowed, inputs))
    if not want_logprobs:
        return tokens, None
    raw = torch.log_softmax(logits.double(), dim=-1)
    return tokens, raw.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _ban(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    if not banned.numel():  # a shape, known on the host
        return logits
    return logits.reshape(-1).index_fill(0, banned, -math.inf).view(logits.shape)


def _draw(allowed: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
    """Each row's inverse-CDF draw, in float64, from the smallest set of most likely tokens
    (stable order) whose mass reaches top_p, after top-k and temperature. The softmax runs
    over the row in token order and only then is sorted, so that every float matches the
    one-row algorithm's."""
    vocab = allowed.shape[-1]
    k = torch.where(inputs.top_k == 0, vocab, inputs.top_k.clamp(max=vocab))
    kth = torch.sort(allowed, dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
    temperature = torch.where(inputs.temperature == 0, 1.0, inputs.temperature)  # greedy: unused
    scaled = allowed.double().masked_fill(allowed < kth, -math.inf) / temperature.unsqueeze(1)
    probs, order = torch.sort(torch.softmax(scaled, dim=-1), dim=-1, descending=True, stable=True)
    cumulative = torch.cumsum(probs, dim=-1)
    # Counts where the one-row algorithm searches: left for top_p, right for the draw.
    kept = ((cumulative < inputs.top_p.unsqueeze(1)).sum(-1) + 1).clamp(max=vocab)
    target = inputs.uniform.unsqueeze(1) * cumulative.gather(1, (kept - 1).unsqueeze(1))
    in_kept = torch.arange(vocab, device=allowed.device) < kept.unsqueeze(1)
    choice = torch.minimum(((cumulative <= target) & in_kept).sum(-1), kept - 1)
    return order.gather(1, choice.unsqueeze(1)).squeeze(1)


def _uniform(seed: int, output_index: int) -> float:
    mixed = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(mixed, "little") >> 1)
    return float(torch.rand((), generator=generator, dtype=torch.float64))
