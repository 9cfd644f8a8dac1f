"""Drives a `Planner` on a virtual clock: the demo's and the simulator's executor and host.

Step and copy durations come from a `CostModel`. Copies run on two FIFO copy queues
(device-to-host and host-to-device) that overlap the steps; a barrier plan (baseline
mode) makes the step wait for every copy in flight, which is the stall FastSwitch removes.
Each plan costs `HostCosts.plan_s` of scheduler time, and its host operations are carried
out on an in-process index, answered one `HostCosts.round_trip_s` later, as the real
driver's one store round trip per plan is. With `lookahead` (the real driver's default),
step N+1 is planned when step N is launched, so its planning is charged only where it
outlasts step N; without it, every plan waits for the last step's tokens. Where copies are
memcpys on the cores that run the steps (a CPU executor), a step is lengthened by
`HostCosts.copy_cpu_share` of the copy time that runs beside it. The planner and policies are
the real ones; only time is simulated.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from benchmarks.sim.checked_executor import CheckedExecutor
from common.kv.host_ops import HostIndex, HostReply, apply
from common.latency import gaps
from services.scheduler.core.plan import Direction, StepPlan, SwapOrder
from services.scheduler.core.planner import Planner
from services.scheduler.core.policy import RandomPriorityUpdates
from services.scheduler.core.request import Request


@dataclass(frozen=True)
class HostCosts:
    """What the host side costs (all default to free): one store round trip per plan that
    has host operations; the planner's own time per plan; and the step time lost per second
    of copying beside a step, where copies take the cores the step runs on (a CPU executor;
    a GPU's copy engines take none, and 0 is right there)."""

    round_trip_s: float = 0.0
    plan_s: float = 0.0
    copy_cpu_share: float = 0.0

    def __post_init__(self) -> None:
        if min(self.round_trip_s, self.plan_s, self.copy_cpu_share) < 0:
            raise ValueError(f"host costs are never negative: {self}")


class CostModel(Protocol):
    def step_seconds(self, plan: StepPlan) -> float: ...

    def swap_seconds(self, order: SwapOrder) -> float: ...


@dataclass(frozen=True)
class UnitCost:
    """A deliberately plain cost model for demos and tests (not a hardware model)."""

    step_base: float = 1e-3
    per_token: float = 2e-5
    per_copy: float = 2e-4
    per_block: float = 2e-5

    def step_seconds(self, plan: StepPlan) -> float:
        return self.step_base + self.per_token * plan.num_tokens

    def swap_seconds(self, order: SwapOrder) -> float:
        return self.per_copy * len(order.copies) + self.per_block * order.num_blocks


@dataclass
class RequestTimes:
    arrival: float
    tokens: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return self.tokens[0] - self.arrival if self.tokens else None

    @property
    def tbts(self) -> list[float]:
        return gaps(self.tokens)


@dataclass
class RunReport:
    makespan_s: float
    busy_s: float
    stall_s: float  # steps waiting on a barrier
    output_tokens: int
    times: dict[str, RequestTimes]
    context_switch_s: list[float]  # each swap-in: submit to completion
    finished: list[Request]

    @property
    def ttfts(self) -> list[float]:
        return [t.ttft for t in self.times.values() if t.ttft is not None]

    @property
    def tbts(self) -> list[float]:
        return [d for t in self.times.values() for d in t.tbts]

    @property
    def throughput_tok_s(self) -> float:
        return self.output_tokens / self.makespan_s if self.makespan_s else 0.0

    @property
    def gpu_idle_frac(self) -> float:
        return 1 - self.busy_s / self.makespan_s if self.makespan_s else 0.0


FollowUp = Callable[[Request, float], Iterable[tuple[float, Request]]]


class VirtualDriver:
    def __init__(
        self,
        planner: Planner,
        cost: CostModel,
        host: HostIndex,
        *,
        host_costs: HostCosts = HostCosts(),
        executor: CheckedExecutor | None = None,
        priority_updates: RandomPriorityUpdates | None = None,
        follow_up: FollowUp | None = None,
        on_iteration: Callable[[VirtualDriver, StepPlan], None] | None = None,
        lookahead: bool = True,
    ) -> None:
        self.planner = planner
        self.cost = cost
        self.host = host
        self.host_costs = host_costs
        self.executor = executor
        self.priority_updates = priority_updates
        self.follow_up = follow_up
        self.on_iteration = on_iteration
        self.lookahead = lookahead
        self.now = 0.0
        self._running: tuple[float, dict[str, int]] | None = None  # the step in flight
        self._arrivals: list[tuple[float, int, Request]] = []
        self._inflight: list[tuple[float, int, SwapOrder, float]] = []  # done, id, order, start
        self._replies: list[tuple[float, int, list[HostReply]]] = []  # due, seq, replies
        self._queue_free = {Direction.OUT: 0.0, Direction.IN: 0.0}
        self._copying: list[tuple[float, float]] = []  # (start, end) of each copy queued
        self._seq = itertools.count()
        self._times: dict[str, RequestTimes] = {}
        self._switch: list[float] = []
        self._finished: list[Request] = []
        self._busy = self._stall = 0.0
        self._output_tokens = 0
        self.step_s = 0.0  # the step launched this iteration, in seconds (0: none)

    def submit(self, at: float, request: Request) -> None:
        heapq.heappush(self._arrivals, (at, next(self._seq), request))

    def run(self, *, max_iterations: int = 1_000_000) -> RunReport:
        for _ in range(max_iterations):
            self._admit_arrivals()
            self._deliver_swaps(until=self.now)
            self._deliver_replies(until=self.now)
            if not (self.planner.has_work() or self._arrivals):
                break
            self._apply_priority_updates()
            plan = self.planner.plan()
            self.step_s = 0.0
            overlapped = self.lookahead and self._running is not None
            if not overlapped:  # planning waits for the last step's tokens
                self.now += self.host_costs.plan_s
            ready = self.now + (self.host_costs.plan_s if overlapped else 0.0)
            self._send_host_ops(plan, at=ready)
            # A copy waits for the step launched before it (the executor's step fence).
            fence = self._running[0] if overlapped and self._running else 0.0
            self._start_swaps(plan.swaps, not_before=max(ready, fence))
            ran = self._complete_running()
            self.now = max(self.now, ready)
            if plan.barrier and self._inflight:
                # Copies that ended while the last step ran are only delivered here: the
                # clock never runs back to them.
                done = max(self.now, *(t for t, *_ in self._inflight))
                self._stall += done - self.now
                self.now = done
                self._deliver_swaps(until=done)
                plan = self.planner.runnable(plan)
            if plan.batch:
                self._launch(plan)
            elif not (ran or plan.preemptions or plan.swaps or plan.host_ops
                      or self._idle_until_next_event()):
                raise RuntimeError(f"scheduler stuck at iteration {plan.iteration}: {plan}")
            if self.on_iteration:
                self.on_iteration(self, plan)
        else:
            raise RuntimeError(f"did not finish in {max_iterations} iterations")
        return RunReport(
            makespan_s=self.now,
            busy_s=self._busy,
            stall_s=self._stall,
            output_tokens=self._output_tokens,
            times=self._times,
            context_switch_s=self._switch,
            finished=self._finished,
        )

    def _admit_arrivals(self) -> None:
        while self._arrivals and self._arrivals[0][0] <= self.now:
            at, _, request = heapq.heappop(self._arrivals)
            self._times[request.request_id] = RequestTimes(arrival=at)
            self.planner.add(request)

    def _apply_priority_updates(self) -> None:
        if self.priority_updates is None:
            return
        updates = self.priority_updates.updates(self.planner.stats.iterations, self.planner.live())
        for request_id, priority in updates.items():
            self.planner.set_priority(priority, request_id=request_id)

    def _send_host_ops(self, plan: StepPlan, *, at: float) -> None:
        """Carries the plan's host operations out, sent at `at` (once it is planned); the
        replies arrive a round trip on."""
        if plan.host_ops:
            replies = apply(self.host, plan.host_ops)
            due = at + self.host_costs.round_trip_s
            heapq.heappush(self._replies, (due, next(self._seq), replies))

    def _deliver_replies(self, *, until: float) -> None:
        while self._replies and self._replies[0][0] <= until:
            self.planner.host_replied(heapq.heappop(self._replies)[2])

    def _start_swaps(self, orders: Iterable[SwapOrder], *, not_before: float) -> None:
        for order in orders:  # swap-outs come first in a plan
            start = max(self.now, not_before, self._queue_free[order.direction])
            done = start + self.cost.swap_seconds(order)
            self._queue_free[order.direction] = done
            if self.host_costs.copy_cpu_share:
                self._copying.append((start, done))
            heapq.heappush(self._inflight, (done, order.swap_id, order, self.now))
            if self.executor is not None:
                self.executor.start_swap(order)

    def _deliver_swaps(self, *, until: float) -> None:
        while self._inflight and self._inflight[0][0] <= until:
            done, _, order, submitted = heapq.heappop(self._inflight)
            if self.executor is not None:
                self.executor.finish_swap(order)
            if order.direction is Direction.IN:
                self._switch.append(done - submitted)
            self.planner.swap_done(order.swap_id)

    def _launch(self, plan: StepPlan) -> None:
        """Starts the plan's step now; without lookahead it also completes at once."""
        if self.executor is not None:
            truth = {s.request_id: self.planner.requests[s.request_id].tokens for s in plan.batch}
            sampled = self.executor.step(plan.batch, truth)
        else:
            sampled = {s.request_id: 0 for s in plan.batch if s.sample}
        seconds = self.cost.step_seconds(plan)
        seconds += self.host_costs.copy_cpu_share * self._copy_overlap(self.now, seconds)
        self._busy += seconds
        self.step_s = seconds
        self._running = (self.now + seconds, sampled)
        if not self.lookahead:
            self._complete_running()

    def _copy_overlap(self, start: float, seconds: float) -> float:
        """Copy seconds queued so far that run within [start, start + seconds): every copy
        that can overlap a step is queued by its launch (later plans' copies wait for its
        fence, or, behind a barrier, it waits for them)."""
        self._copying = [(a, b) for a, b in self._copying if b > start]
        end = start + seconds
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self._copying)

    def _complete_running(self) -> bool:
        """Completes the step in flight, if any, at its end: its tokens reach the clients
        (not those of requests that finished at an earlier step: wasted)."""
        if self._running is None:
            return False
        end, sampled = self._running
        self._running = None
        self.now = max(self.now, end)
        if self.executor is not None:
            self.executor.finish_step()
        served = [request_id for request_id in sampled if request_id in self.planner.requests]
        for request_id in served:
            self._times[request_id].tokens.append(self.now)
        self._output_tokens += len(served)
        for request in self.planner.complete_step(sampled):
            self._finished.append(request)
            for at, nxt in self.follow_up(request, self.now) if self.follow_up else ():
                self.submit(at, nxt)
        return True

    def _idle_until_next_event(self) -> bool:
        """Nothing ran: jump to the next swap completion, host reply or arrival. False if
        there is none."""
        upcoming = [t for t, *_ in (*self._inflight[:1], *self._arrivals[:1], *self._replies[:1])]
        if not upcoming:
            return False
        self.now = max(self.now, min(upcoming))
        return True
