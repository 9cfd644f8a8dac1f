"""A stand-in executor whose KV is the token ids themselves, for drivers without a model.

Each device or host block slot stores the token whose KV it would hold. Every step checks
that each sequence's block table holds exactly its prefix, and copies move slots only when
a swap completes, so a block reused while a copy still reads it, or read before its
swap-in ends, shows up as a mismatch. As the real executor does, a step may not write a
block that a swap-out in flight reads, nor touch one that a swap-in in flight writes
(`start_swap` to `finish_swap` or `drop_swap`); and a swap may not start on a block that a
step in flight (`step` to `finish_step`: with lookahead, one runs while the next is planned)
writes, nor, for a swap-in, reads. A row `from_last_step` feeds the token this executor
sampled for its request in its previous step. The sampled token is a pure function of the
prefix (and so identical with or without preemption or lookahead), which makes the planner
testable on its own and keeps the simulator honest.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.scheduler.core.plan import Direction, ScheduledSeq, SwapOrder

EMPTY = -1


class KVMismatch(AssertionError):
    pass


def next_token(prefix: list[int], vocab: int) -> int:
    digest = hashlib.blake2b(repr(prefix).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % vocab


@dataclass
class CheckedExecutor:
    block_size: int
    num_device_blocks: int
    num_host_blocks: int
    vocab: int = 1000
    device: list[list[int]] = field(init=False)
    host: list[list[int]] = field(init=False)
    in_flight: dict[int, SwapOrder] = field(default_factory=dict)
    steps: deque[tuple[set[int], set[int]]] = field(default_factory=deque)  # reads, writes
    last_sampled: dict[str, int] = field(default_factory=dict)  # by the previous step

    def __post_init__(self) -> None:
        self.device = [[EMPTY] * self.block_size for _ in range(self.num_device_blocks)]
        self.host = [[EMPTY] * self.block_size for _ in range(self.num_host_blocks)]

    def step(self, batch: tuple[ScheduledSeq, ...], tokens_of: Mapping[str, list[int]]) -> dict:
        """Runs one step; `tokens_of` gives each request's token list (the truth) up to
        the tokens fed. It stays in flight until `finish_step`."""
        sampled: dict[str, int] = {}
        reads: set[int] = set()
        writes: set[int] = set()
        for seq in batch:
            fed = list(seq.token_ids)
            if seq.from_last_step:
                if seq.token_ids or seq.request_id not in self.last_sampled:
                    raise KVMismatch(f"{seq.request_id}: no token of its own from the last step")
                fed.append(self.last_sampled[seq.request_id])
            seq_reads, seq_writes = self._blocks(seq, len(fed))
            self._check_fences(seq, seq_reads, seq_writes)
            reads |= seq_reads
            writes |= seq_writes
            truth = tokens_of[seq.request_id]
            for pos in range(seq.start):
                held = self._slot(seq.block_table, pos)
                if held != truth[pos]:
                    raise KVMismatch(
                        f"{seq.request_id}: position {pos} holds {held}, expected {truth[pos]}"
                    )
            for i, token in enumerate(fed):
                pos = seq.start + i
                block = seq.block_table[pos // self.block_size]
                self.device[block][pos % self.block_size] = token
            if seq.sample:
                sampled[seq.request_id] = next_token([*truth[: seq.start], *fed], self.vocab)
        self.last_sampled = sampled
        self.steps.append((reads, writes))
        return sampled

    def finish_step(self) -> None:
        self.steps.popleft()

    def start_swap(self, order: SwapOrder) -> None:
        out, device = order.direction is Direction.OUT, order.device_blocks
        for reads, writes in self.steps:
            if device & (writes if out else reads | writes):
                raise KVMismatch(f"swap {order.swap_id} ({order.direction.value}, "
                                 f"{order.request_id}) starts on blocks "
                                 f"{sorted(device & (reads | writes))} of a step in flight")
        self.in_flight[order.swap_id] = order

    def drop_swap(self, order: SwapOrder) -> None:
        """The copy failed: nothing moved."""
        self.in_flight.pop(order.swap_id, None)

    def finish_swap(self, order: SwapOrder) -> None:
        self.in_flight.pop(order.swap_id, None)
        src, dst = (
            (self.device, self.host) if order.direction is Direction.OUT
            else (self.host, self.device)
        )
        for copy in order.copies:
            for s, d in zip(copy.src.blocks(), copy.dst.blocks(), strict=True):
                dst[d] = list(src[s])

    def _blocks(self, seq: ScheduledSeq, fed: int) -> tuple[set[int], set[int]]:
        """The blocks a row reads and writes."""
        end, bs = seq.start + fed, self.block_size
        reads = set(seq.block_table[: -(-end // bs)])
        return reads, {seq.block_table[p // bs] for p in range(seq.start, end)}

    def _check_fences(self, seq: ScheduledSeq, reads: set[int], writes: set[int]) -> None:
        for order in self.in_flight.values():
            device = order.device_blocks
            touched = writes if order.direction is Direction.OUT else reads
            if device & touched:
                raise KVMismatch(
                    f"{seq.request_id} touches blocks {sorted(device & touched)} of swap "
                    f"{order.swap_id} ({order.direction.value}, {order.request_id}) in flight"
                )

    def _slot(self, table: tuple[int, ...], pos: int) -> int:
        return self.device[table[pos // self.block_size]][pos % self.block_size]
