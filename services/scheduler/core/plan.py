"""What one iteration must do: the planner's output, carried out by a driver."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from common.kv.swap_plan import Direction, SwapOrder

__all__ = ["Direction", "PreemptBy", "Preemption", "ScheduledSeq", "StepPlan", "SwapOrder"]


class PreemptBy(Enum):
    SWAP = "swap"
    RECOMPUTE = "recompute"


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """Feed `token_ids` at positions `start`...; sample a token when `sample` is set."""

    request_id: str
    block_table: tuple[int, ...]
    start: int
    token_ids: tuple[int, ...]
    sample: bool


@dataclass(frozen=True, slots=True)
class Preemption:
    request_id: str
    by: PreemptBy


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One iteration. Start `swaps` (swap-outs before swap-ins), run `batch`, then report
    the sampled tokens with `Planner.complete_step`.

    With `barrier` set (baseline mode) every swap in flight, these included, must complete
    and be reported before `batch` runs; the batch may then use blocks swapped in by this
    very plan. Without it, the batch touches no block that an unfinished swap touches.
    """

    iteration: int
    batch: tuple[ScheduledSeq, ...]
    swaps: tuple[SwapOrder, ...]
    preemptions: tuple[Preemption, ...]
    barrier: bool

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.batch)

    @property
    def is_idle(self) -> bool:
        return not self.batch and not self.swaps
