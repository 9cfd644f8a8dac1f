"""Host<->device KV copies: what one copy costs, how many a swap needs, and when they finish.

A copy costs `per_copy_overhead_s + bytes / bandwidth`; the overhead is the driver's
per-`cudaMemcpyAsync` submission cost, which is what makes vLLM's many small copies slow and
FastSwitch's few large ones fast. The copy engine has one FIFO queue per direction, and the
two run independently of each other and of compute. Calibration sources: COST_MODEL.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from benchmarks.sim.hardware import ModelSpec
from common.kv.swap_plan import Copy


class Direction(StrEnum):
    H2D = "h2d"  # swap-in
    D2H = "d2h"  # swap-out


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


def plan_transfers(
    model: ModelSpec, block_size: int, layout: KvLayout, plan: Iterable[Copy]
) -> list[Transfer]:
    """One transfer per copy of a swap plan (`common.kv.swap_plan.plan_copies`)."""
    return [extent_transfer(model, block_size, layout, copy.num_blocks) for copy in plan]


@dataclass
class CopyEngineModel:
    """A FIFO copy queue per direction; the caller passes submit times, nothing reads a clock."""

    link: LinkModel
    _free_at: dict[Direction, float] = field(
        default_factory=lambda: dict.fromkeys(Direction, 0.0), init=False, repr=False
    )

    def free_at(self, direction: Direction) -> float:
        """When the queue finishes everything submitted to it so far."""
        return self._free_at[direction]

    def submit(
        self, direction: Direction, submit_s: float, transfers: Sequence[Transfer]
    ) -> list[float]:
        """Queue `transfers` behind earlier work in `direction`; return each one's completion."""
        done = max(submit_s, self._free_at[direction])
        completions: list[float] = []
        for transfer in transfers:
            done += self.link.transfer_time_s(transfer)
            completions.append(done)
        self._free_at[direction] = done
        return completions
