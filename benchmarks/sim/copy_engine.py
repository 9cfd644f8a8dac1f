"""Host<->device KV copies: what one copy costs, and how many a swap needs.

A copy costs `per_copy_overhead_s + bytes / bandwidth`; the overhead is the driver's
per-`cudaMemcpyAsync` submission cost, which is what makes vLLM's many small copies slow and
FastSwitch's few large ones fast. When copies finish is the virtual driver's business (one
FIFO queue per direction). Calibration sources: COST_MODEL.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from benchmarks.sim.hardware import ModelSpec


class KvLayout(StrEnum):
    LAYER_MAJOR = "layer_major"
    """vLLM: one tensor per layer, K and V apart; a block is `2 * layers` separate ranges."""
    BLOCK_MAJOR = "block_major"
    """FastSwitch: `[blocks, layers, 2, ...]`; a run of blocks is one range across all layers."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """`num_copies` back-to-back copies of `bytes_per_copy` each."""

    num_copies: int
    bytes_per_copy: int

    def __post_init__(self) -> None:
        if self.num_copies < 1 or self.bytes_per_copy < 1:
            raise ValueError(f"bad transfer {self.num_copies} x {self.bytes_per_copy} B")

    @property
    def total_bytes(self) -> int:
        return self.num_copies * self.bytes_per_copy


@dataclass(frozen=True, slots=True)
class LinkModel:
    per_copy_overhead_s: float = 5e-6
    bandwidth_bytes_per_s: float = 25e9

    def __post_init__(self) -> None:
        if self.per_copy_overhead_s < 0 or self.bandwidth_bytes_per_s <= 0:
            raise ValueError(
                f"bad link: overhead {self.per_copy_overhead_s} s, "
                f"bandwidth {self.bandwidth_bytes_per_s} B/s"
            )

    def copy_time_s(self, num_bytes: int) -> float:
        return self.per_copy_overhead_s + num_bytes / self.bandwidth_bytes_per_s

    def transfer_time_s(self, transfer: Transfer) -> float:
        return transfer.num_copies * self.copy_time_s(transfer.bytes_per_copy)


def extent_transfer(
    model: ModelSpec, block_size: int, layout: KvLayout, num_blocks: int
) -> Transfer:
    """The copies that move `num_blocks` contiguous blocks (on both sides) in `layout`."""
    if num_blocks < 1:
        raise ValueError(f"an extent has at least one block, got {num_blocks}")
    if layout is KvLayout.LAYER_MAJOR:
        per_layer_kv = block_size * model.num_kv_heads * model.head_dim * model.dtype_bytes
        return Transfer(num_blocks * model.num_layers * 2, per_layer_kv)
    return Transfer(1, num_blocks * model.kv_bytes_per_block(block_size))
