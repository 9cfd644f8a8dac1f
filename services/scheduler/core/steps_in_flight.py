"""Steps in flight: planned, handed to the driver, and not yet completed.

A plan's step changes its requests at once, as if it had already run: each row's tokens
count as computed, and each sampled row appends a `PENDING` output token. So the next plan
can be made while the step runs (lookahead: the driver sends step N+1 before step N's
tokens are back), and a decode row whose input is step N's token names it
(`ScheduledSeq.from_last_step`) instead of carrying it.

Contract:

- `issue` is called once per plan with a batch; `complete` hands back the oldest step's
  rows, in order, for the planner to fill in their tokens; `refuse_all` undoes every step
  in flight, newest first (a step did not run, and those sent after it depend on it).
- `discard(r)` undoes a request's rows in flight (it finished or stopped at an earlier
  step): its outputs and computed tokens go back to what the completed steps made. Rows
  whose request left count as wasted when their step completes.
- Every block of a step's tables is held (`SwapManager.hold_step`) until it completes or is
  refused: nothing frees it for reuse under the step.
- At most two steps are in flight: one running, one queued behind it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from services.scheduler.core.device_memory import DeviceMemory
from services.scheduler.core.plan import ScheduledSeq
from services.scheduler.core.request import Request

PENDING = -1  # an output token a step in flight samples: known when the step completes
MAX_IN_FLIGHT = 2


@dataclass(frozen=True, slots=True, eq=False)
class IssuedRow:
    seq: ScheduledSeq
    request: Request
    sampled_at: int | None  # index in `request.output` of the token the row samples

    @property
    def end(self) -> int:
        """Tokens computed once the row has run."""
        return self.seq.start + self.seq.num_tokens


class StepsInFlight:
    def __init__(self, memory: DeviceMemory) -> None:
        self.memory = memory
        self._steps: deque[tuple[int, list[IssuedRow]]] = deque()

    def issue(self, step_id: int, batch: tuple[ScheduledSeq, ...],
              requests: Mapping[str, Request]) -> None:
        if len(self._steps) >= MAX_IN_FLIGHT:
            raise RuntimeError(f"{MAX_IN_FLIGHT} steps are in flight: complete one first")
        rows = []
        for seq in batch:
            r = requests[seq.request_id]
            r.num_computed = seq.start + seq.num_tokens
            if seq.sample:
                r.output.append(PENDING)
            rows.append(IssuedRow(seq, r, len(r.output) - 1 if seq.sample else None))
        self.memory.swaps.hold_step(step_id, {b for s in batch for b in s.block_table})
        self._steps.append((step_id, rows))

    def complete(self) -> list[IssuedRow]:
        step_id, rows = self._steps.popleft()
        self.memory.swaps.step_done(step_id)
        return rows

    def keep_only(self, step_id: int, kept: set[str]) -> set[str]:
        """Step `step_id`, the newest, runs only the rows of `kept` (after a barrier): the
        others' pending outputs go (their requests left the batch: a failed swap-in, a
        cancel). A step left with no row is not run at all. Returns the rows it keeps:
        none if the step is no longer in flight (refused meanwhile)."""
        if not self._steps or self._steps[-1][0] != step_id:
            return set()
        _, rows = self._steps.pop()
        for row in rows:
            if row.seq.request_id not in kept:
                _drop_pending(row)
                row.request.num_computed = min(row.request.num_computed, row.seq.start)
        if kept:
            self._steps.append((step_id, [r for r in rows if r.seq.request_id in kept]))
        else:
            self.memory.swaps.step_done(step_id)
        return kept

    def discard(self, r: Request) -> None:
        """Undoes `r`'s rows in flight, newest first."""
        for _, rows in reversed(self._steps):
            for row in reversed(rows):
                if row.request is r:
                    _drop_pending(row)
                    r.num_computed = min(r.num_computed, row.seq.start)

    def refuse_all(self) -> None:
        """No step in flight ran: each is undone, newest first, and its blocks let go."""
        while self._steps:
            step_id, rows = self._steps.pop()
            for row in reversed(rows):
                _drop_pending(row)
                row.request.num_computed = row.seq.start
            self.memory.swaps.step_done(step_id)

    def clear(self) -> None:
        """The device was lost, and with it the steps (their holds went with the memory)."""
        self._steps.clear()

    def busy(self) -> set[str]:
        """Requests with a row in flight."""
        return {row.seq.request_id for _, rows in self._steps for row in rows}

    def __bool__(self) -> bool:
        return bool(self._steps)


def _drop_pending(row: IssuedRow) -> None:
    out = row.request.output
    if row.sampled_at is not None and len(out) == row.sampled_at + 1:
        out.pop()
