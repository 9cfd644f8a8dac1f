"""A mixed step batch (prefill chunks and decodes), flattened into the token rows one pass runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SequenceStep:
    """One sequence's share of a step: `token_ids` go at positions `start_pos`, `start_pos+1`...

    `start_pos` counts the tokens whose KV is already in the cache; `block_table[i]` is the
    cache block holding positions `[i * block_size, (i + 1) * block_size)`.
    """

    block_table: Sequence[int]
    start_pos: int
    token_ids: Sequence[int]

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SequenceRows:
    """Where one sequence's new tokens sit among the step's rows, and which blocks it reads."""

    first_row: int
    start_pos: int
    end_pos: int
    blocks: torch.Tensor  # the blocks covering [0, end_pos), in order


@dataclass(frozen=True, slots=True)
class StepLayout:
    token_ids: torch.Tensor  # [rows]
    positions: torch.Tensor  # [rows]
    slot_blocks: torch.Tensor  # [rows] block each new token's KV is written to
    slot_offsets: torch.Tensor  # [rows] offset inside that block
    sequences: tuple[SequenceRows, ...]

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    @property
    def last_rows(self) -> torch.Tensor:
        return torch.tensor(
            [seq.first_row + seq.end_pos - seq.start_pos - 1 for seq in self.sequences]
        )

    @classmethod
    def build(
        cls,
        batch: Sequence[SequenceStep],
        *,
        block_size: int,
        num_blocks: int,
        vocab_size: int,
        max_positions: int,
    ) -> StepLayout:
        if not batch:
            raise ValueError("a step needs at least one sequence")
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[tuple[int, int]] = []
        sequences: list[SequenceRows] = []
        for index, seq in enumerate(batch):
            _validate(index, seq, block_size, num_blocks, vocab_size, max_positions)
            blocks_needed = -(-seq.end_pos // block_size)
            sequences.append(
                SequenceRows(
                    first_row=len(token_ids),
                    start_pos=seq.start_pos,
                    end_pos=seq.end_pos,
                    blocks=torch.tensor(list(seq.block_table[:blocks_needed]), dtype=torch.long),
                )
            )
            token_ids.extend(seq.token_ids)
            for pos in range(seq.start_pos, seq.end_pos):
                positions.append(pos)
                slots.append((seq.block_table[pos // block_size], pos % block_size))
        if len(set(slots)) != len(slots):
            raise ValueError("two tokens of this step would write the same KV slot")
        slot_blocks, slot_offsets = zip(*slots, strict=True)
        return cls(
            token_ids=torch.tensor(token_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long),
            sequences=tuple(sequences),
        )


def _validate(
    index: int,
    seq: SequenceStep,
    block_size: int,
    num_blocks: int,
    vocab_size: int,
    max_positions: int,
) -> None:
    where = f"sequence {index}"
    if not seq.token_ids:
        raise ValueError(f"{where}: no new tokens")
    if seq.start_pos < 0:
        raise ValueError(f"{where}: negative start_pos {seq.start_pos}")
    if seq.end_pos > max_positions:
        raise ValueError(f"{where}: position {seq.end_pos - 1} exceeds the model's {max_positions}")
    if len(seq.block_table) * block_size < seq.end_pos:
        raise ValueError(
            f"{where}: {len(seq.block_table)} blocks of {block_size} "
            f"cannot hold {seq.end_pos} tokens"
        )
    bad_blocks = [b for b in seq.block_table if not 0 <= b < num_blocks]
    if bad_blocks:
        raise ValueError(f"{where}: block ids {bad_blocks} outside the cache's {num_blocks} blocks")
    bad_tokens = [t for t in seq.token_ids if not 0 <= t < vocab_size]
    if bad_tokens:
        raise ValueError(f"{where}: token ids {bad_tokens} outside the vocabulary of {vocab_size}")
