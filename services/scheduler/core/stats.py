"""What the planner has done so far: counts that benchmarks and `/metrics` report."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PlannerStats:
    iterations: int = 0
    preempted_by_swap: int = 0
    preempted_by_recompute: int = 0
    swaps_out: int = 0
    swaps_in: int = 0
    copies_out: int = 0
    copies_in: int = 0
    blocks_out: int = 0
    blocks_in: int = 0
    reuse_saved_blocks: int = 0  # swap-out blocks not copied: the host already held them
    prefix_hit_tokens: int = 0  # prompt tokens swapped in from the host instead of prefilled
    device_hit_tokens: int = 0  # prompt tokens taken from the device prefix cache
    blocks_stored: int = 0  # eager offload: blocks copied to the host while running
    host_ops: int = 0
    wasted_tokens: int = 0  # lookahead: sampled for a request that had finished meanwhile
    finished: int = 0
    cancelled: int = 0
