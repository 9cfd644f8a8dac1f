"""The two modes share every line of scheduling code and differ only in these switches."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from common.kv.allocator import BlockAllocator
from common.kv.group_allocator import BlockGroupAllocator, GroupSizing
from common.kv.single_block_allocator import SingleBlockAllocator


class Mode(Enum):
    FASTSWITCH = "fastswitch"  # block groups, async per-request swaps, host KV reuse
    BASELINE = "baseline"  # vLLM: single blocks, swaps behind a global barrier, no reuse


@dataclass(frozen=True)
class SchedulerConfig:
    mode: Mode = Mode.FASTSWITCH
    block_size: int = 16
    num_device_blocks: int = 1024
    max_num_seqs: int = 32
    max_batched_tokens: int = 512
    group_sizing: GroupSizing = field(default_factory=GroupSizing)
    offload_finished: bool = True  # fastswitch: keep a finished turn's KV for the next turn

    def __post_init__(self) -> None:
        for name in ("block_size", "num_device_blocks", "max_num_seqs", "max_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def async_swaps(self) -> bool:
        return self.mode is Mode.FASTSWITCH

    @property
    def reuse(self) -> bool:
        return self.mode is Mode.FASTSWITCH

    @property
    def merge_copies(self) -> bool:
        return self.mode is Mode.FASTSWITCH

    def make_allocator(self) -> BlockAllocator:
        if self.mode is Mode.FASTSWITCH:
            return BlockGroupAllocator(self.num_device_blocks, self.group_sizing)
        return SingleBlockAllocator(self.num_device_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
