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
    one of `banned_token_ids` (the request's stop tokens, before its `min_tokens`). With
    `from_last_step`, `token_ids` is empty and the one token fed at `start` is the one the
    executor sampled for this request in the step before (lookahead: it is not known yet)."""

    request_id: str
    block_table: tuple[int, ...]
    start: int
    token_ids: tuple[int, ...]
    sample: bool
    banned_token_ids: tuple[int, ...] = ()
    from_last_step: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.from_last_step


@dataclass(frozen=True, slots=True)
class Preemption:
    request_id: str
    by: PreemptBy


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One iteration. Send `host_ops` to the host KV (in order; feed the replies back with
    `Planner.host_replied` whenever they come, see `common.kv.host_ops`), start `swaps`
    (swap-outs before swap-ins), run `batch`, then report the sampled tokens with
    `Planner.complete_step` (or `Planner.steps_refused` if it did not run). Nothing in a
    plan waits for the host. The next plan may be made before this one's step completes
    (lookahead: see `steps_in_flight`); at most two steps are in flight.

    With `barrier` set (baseline mode) every swap in flight, these included, must complete
    and be reported before the batch runs; the batch may then use blocks swapped in by this
    very plan, and is `Planner.runnable(plan).batch` (a failed swap-in drops its request).
    Without it, the batch touches no block that an unfinished swap touches.

    `inverted`: a request that outranks one in `batch` waits for the device meanwhile
    (`inversion`); a driver counts such steps and times them.
    """

    iteration: int
    batch: tuple[ScheduledSeq, ...]
    swaps: tuple[SwapOrder, ...]
    preemptions: tuple[Preemption, ...]
    host_ops: tuple[HostOp, ...]
    barrier: bool
    inverted: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.batch)
