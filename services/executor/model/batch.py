"""A mixed step batch (prefill chunks and decodes), flattened into the token rows one pass runs.

The host lays a step out once (`StepPlan`: Python ints and index lists), and its index
lists reach the device in one copy (`StepInputs`); the forward pass never builds an index
tensor of its own, and never reads one back.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
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
class StepPlan:
    """A step laid out on the host. Rows are the step's new tokens, sequence after sequence.

    Index lists (all of `int` values, one per row, sequence or output):
    - `token_ids`, `positions`, `slots` (the KV slot `block * block_size + offset` each row
      writes) and `row_seq` (the sequence each row belongs to), per row;
    - `query_start` (a sequence's first row; one more entry, the row count), `seq_lens`
      (the positions its keys cover once the step's KV is written) and `block_table`
      (`width` entries per sequence, padded with block 0, which is never read), per sequence;
    - `output_rows`: the rows whose logits the step returns.
    """

    block_size: int
    width: int  # block-table entries per sequence: the blocks of the longest one
    max_query: int  # the most new tokens of one sequence
    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    row_seq: list[int]
    query_start: list[int]
    seq_lens: list[int]
    block_table: list[int]
    output_rows: list[int]

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def all_rows_out(self) -> bool:
        return len(self.output_rows) == self.num_rows

    def fields(self) -> dict[str, list[int]]:
        return {
            "token_ids": self.token_ids,
            "positions": self.positions,
            "slots": self.slots,
            "row_seq": self.row_seq,
            "query_start": self.query_start,
            "seq_lens": self.seq_lens,
            "block_table": self.block_table,
            "output_rows": self.output_rows,
        }

    @classmethod
    def build(
        cls,
        batch: Sequence[SequenceStep],
        *,
        block_size: int,
        num_blocks: int,
        vocab_size: int,
        max_positions: int,
        all_positions: bool = False,
        validated: bool = False,
    ) -> StepPlan:
        """Validates the batch (ValueError naming the sequence), unless the caller has
        (`validated`: the executor engine checks every entry as it claims a step), and lays
        it out; the logits returned are each sequence's last row, or with `all_positions`
        every row."""
        if not batch:
            raise ValueError("a step needs at least one sequence")
        if not validated:
            for index, seq in enumerate(batch):
                _validate(index, seq, block_size, num_blocks, vocab_size, max_positions)
        width = max(-(-seq.end_pos // block_size) for seq in batch)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        row_seq: list[int] = []
        query_start = [0]
        block_table: list[int] = []
        for index, seq in enumerate(batch):
            table = list(seq.block_table[: -(-seq.end_pos // block_size)])
            token_ids.extend(seq.token_ids)
            span = range(seq.start_pos, seq.end_pos)
            positions.extend(span)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
            row_seq.extend([index] * len(span))
            query_start.append(len(token_ids))
            block_table.extend(table + [0] * (width - len(table)))
        if not validated and len(set(slots)) != len(slots):
            raise ValueError("two tokens of this step would write the same KV slot")
        return cls(
            block_size=block_size,
            width=width,
            max_query=max(len(seq.token_ids) for seq in batch),
            token_ids=token_ids,
            positions=positions,
            slots=slots,
            row_seq=row_seq,
            query_start=query_start,
            seq_lens=[seq.end_pos for seq in batch],
            block_table=block_table,
            output_rows=(
                list(range(len(token_ids))) if all_positions
                else [end - 1 for end in query_start[1:]]
            ),
        )


@dataclass(frozen=True, slots=True)
class StepInputs:
    """A step's index lists on the device: views into one buffer that crossed in one copy.
    `plan` stays on the host, for loop bounds and kernel choices."""

    plan: StepPlan
    tensors: Mapping[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@dataclass(frozen=True, slots=True)
class PackedInputs:
    """A step's index lists packed on the host in one int64 buffer, pinned where CUDA is, so
    they reach the device in one non-blocking copy (`to`). Packing is host work only."""

    plan: StepPlan
    buffer: torch.Tensor
    layout: tuple[tuple[str, int, torch.dtype], ...]  # (name, length, dtype), in order

    @classmethod
    def pack(cls, plan: StepPlan, fields: Mapping[str, Sequence[int] | torch.Tensor], *,
             pin: bool) -> PackedInputs:
        """`fields`: int lists, or 1-D CPU tensors of 8-byte elements (int64 or float64),
        each viewed back in its own dtype on the device; `pin` for a CUDA device."""
        parts = [
            value.reshape(-1).view(torch.int64) if isinstance(value, torch.Tensor)
            else _int64s(value)
            for value in fields.values()
        ]
        layout = tuple(
            (name, len(part), value.dtype if isinstance(value, torch.Tensor) else torch.int64)
            for (name, value), part in zip(fields.items(), parts, strict=True)
        )
        buffer = torch.empty(sum(len(part) for part in parts), dtype=torch.int64, pin_memory=pin)
        torch.cat(parts, out=buffer)
        return cls(plan, buffer, layout)

    def to(self, device: torch.device) -> StepInputs:
        """One non-blocking copy. The pinned buffer comes from torch's caching host
        allocator, which does not hand it out again before the copy from it has run, so a
        later step never overwrites this one's bytes in flight."""
        return self._views(self.buffer.to(device, non_blocking=True))

    def into(self, static: torch.Tensor) -> StepInputs:
        """One non-blocking copy into the start of `static`, an int64 buffer at least as
        long, on any device: the inputs at fixed addresses, as CUDA graphs read them."""
        flat = static.narrow(0, 0, len(self.buffer))
        flat.copy_(self.buffer, non_blocking=True)
        return self._views(flat)

    def _views(self, flat: torch.Tensor) -> StepInputs:
        sizes = [length for _, length, _ in self.layout]
        return StepInputs(self.plan, {
            name: part.view(dtype)
            for (name, _, dtype), part in zip(self.layout, flat.split(sizes), strict=True)
        })


def _int64s(values: Sequence[int]) -> torch.Tensor:
    """An int64 tensor of a list, through an array: 2.4x faster than `torch.tensor` for the
    65,536 block-table entries of a 128-sequence decode step padded for a CUDA graph."""
    if not values:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array("q", values), dtype=torch.int64)


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
    if not all(0 <= b < num_blocks for b in seq.block_table):
        bad = [b for b in seq.block_table if not 0 <= b < num_blocks]
        raise ValueError(f"{where}: block ids {bad} outside the cache's {num_blocks} blocks")
    if not all(0 <= t < vocab_size for t in seq.token_ids):
        bad = [t for t in seq.token_ids if not 0 <= t < vocab_size]
        raise ValueError(f"{where}: token ids {bad} outside the vocabulary of {vocab_size}")
