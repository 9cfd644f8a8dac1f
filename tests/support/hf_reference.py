"""Greedy decoding driven two ways, to compare our paged decoder with HF transformers.

HF runs each sequence alone and unpadded, the plainest reference; our side runs them
together, one batch per step, in one block-major cache, over scattered blocks, prefilling
each prompt in the given chunks (one per step) so prefills share steps with decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.executor.model import DecoderModel, KVCacheGeometry, SequenceStep

BLOCK = 16
NUM_BLOCKS = 32


@dataclass(frozen=True, slots=True)
class Greedy:
    """Greedy generation from one prompt: the logits of every position and the tokens picked."""

    logits: torch.Tensor  # [prompt + decode_steps, vocab], float32
    tokens: list[int]  # argmax after the prompt, then after each decode step


def hf_greedy(model: torch.nn.Module, prompt: list[int], decode_steps: int) -> Greedy:
    """HF's model called step by step with its own KV cache; `decode_steps + 1` tokens."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        rows = [out.logits[0]]
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(decode_steps):
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            rows.append(out.logits[0])
            tokens.append(int(out.logits[0, -1].argmax()))
    return Greedy(torch.cat(rows).float(), tokens)


@dataclass
class _Running:
    """One sequence as the executor sees it across steps."""

    table: list[int]
    prompt: list[int]
    chunks: tuple[int, ...]
    decode_steps: int
    fed: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.tokens) == self.decode_steps + 1

    def next_input(self) -> list[int]:
        if self.fed < len(self.prompt):
            chunk = self.chunks[len(self.rows)]
            return self.prompt[self.fed : self.fed + chunk]
        return [self.tokens[-1]]

    def take(self, fed: list[int], logits: torch.Tensor) -> None:
        self.fed += len(fed)
        self.rows.append(logits)
        if self.fed >= len(self.prompt):
            self.tokens.append(int(logits[-1].argmax()))

    def result(self) -> Greedy:
        return Greedy(torch.cat(self.rows), self.tokens)


def our_greedy(
    model: DecoderModel,
    prompts: Sequence[list[int]],
    chunks: Sequence[tuple[int, ...]],
    *,
    decode_steps: int,
    seed: int,
) -> list[Greedy]:
    """All prompts in one batch per step, each over blocks scattered through the cache (by
    `seed`); prompt i is prefilled in `chunks[i]`, which must sum to its length."""
    geometry = KVCacheGeometry.for_model(model.config, num_blocks=NUM_BLOCKS, block_size=BLOCK)
    # NaN everywhere no step has written: a read of a stale slot would poison the logits.
    cache = geometry.allocate().fill_(float("nan"))
    order = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    blocks_each = -(-(max(map(len, prompts)) + decode_steps) // BLOCK)
    running = [
        _Running(order[i * blocks_each : (i + 1) * blocks_each], prompt, split, decode_steps)
        for i, (prompt, split) in enumerate(zip(prompts, chunks, strict=True))
    ]
    while active := [seq for seq in running if not seq.done]:
        inputs = [seq.next_input() for seq in active]
        batch = [
            SequenceStep(seq.table, seq.fed, fed) for seq, fed in zip(active, inputs, strict=True)
        ]
        logits = model.forward_step(cache, batch, all_positions=True)
        per_sequence = logits.split([len(fed) for fed in inputs])
        for seq, fed, rows in zip(active, inputs, per_sequence, strict=True):
            seq.take(fed, rows)
    return [seq.result() for seq in running]
