"""What one iteration must do: the planner's output, carried out by a driver."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from common.kv.host_ops import HostOp
from common.kv.swap_plan import Direction, SwapOrder

__all__ = ["Direction", "PreemptBy", "Preemption", "ScheduledSeq", "StepPlan", "SwapOrder"]


class PreemptBy(Enum):
    SWAP = "swap"
    RECOMPUTE = "recompute"


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """Feed `token_ids` at positions `start`...; sample a token when `sample` is set, never
    one of `banned_token_ids` (the request's stop tokens, before its `min_tokens`)."""

    request_id: str
    block_table: tuple[int, ...]
    start: int
    token_ids: tuple[int, ...]
    sample: bool
    banned_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Preemption:
    request_id: str
    by: PreemptBy


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One iteration. Send `host_ops` to the host KV (in order; feed the replies back with
    `Planner.host_replied` whenever they come, see `common.kv.host_ops`), start `swaps`
    (swap-outs before swap-ins), run `batch`, then report the sampled tokens with
    `Planner.complete_step`. Nothing in a plan waits for the host.

    With `barrier` set (baseline mode) every swap in flight, these included, must complete
    and be reported before the batch runs; the batch may then use blocks swapped in by this
    very plan, and is `Planner.runnable(plan).batch` (a failed swap-in drops its request).
    Without it, the batch touches no block that an unfinished swap touches.
    """

    iteration: int
    batch: tuple[ScheduledSeq, ...]
    swaps: tuple[SwapOrder, ...]
    preemptions: tuple[Preemption, ...]
    host_ops: tuple[HostOp, ...]
    barrier: bool

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.batch)
