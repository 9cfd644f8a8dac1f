"""What fairness buys: the figures, defined once, for the simulator and the real stack.

`fairness_figures` turns what a run observed into the report's keys:

- each request's TTFT and TBTs under the priority it had when each token came (its
  *class*), so that the top and bottom classes' latencies can be told apart even when
  priorities are reshuffled during the run;
- priority inversions: steps in which a strictly higher-priority request waited (not yet
  admitted, or swapped out) while a lower-priority one ran (`StepPlan.inverted`, defined in
  the scheduler's core); counted, and timed as the steps' durations;
- service per client (`ServiceGaps`: 1 per prompt token computed, 2 per output token,
  VTC's weights): the largest difference between two clients' service over any interval
  in which both were backlogged, against VTC's 2U bound (Sheng et al., OSDI'24, Theorem
  4.3), and Jain's index of the service of the clients ever backlogged.

`FairnessStats` observes a simulated run step by step; `benchmarks.stack_fairness` feeds the
same figures from what the real stack's clients and scheduler saw.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.sim.virtual_driver import RequestTimes
from common.latency import percentile
from services.scheduler.core.plan import StepPlan
from services.scheduler.core.planner import Planner

INPUT_WEIGHT, OUTPUT_WEIGHT = 1.0, 2.0  # VTC's default weights


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one gets everything."""
    total, squares = sum(values), sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def largest_gap(series: Sequence[Sequence[float]]) -> float:
    """The largest |service_a(t1, t2) - service_b(t1, t2)| over intervals and client pairs,
    from cumulative service samples (one row per instant, one column per client)."""
    gap = 0.0
    for a, b in itertools.combinations(range(len(series[0]) if series else 0), 2):
        diffs = [0.0, *(row[a] - row[b] for row in series)]  # 0: before anyone was served
        gap = max(gap, max(diffs) - min(diffs))
    return gap


def vtc_bound(longest_input: int, kv_tokens: int) -> float:
    """VTC's 2U: `longest_input` bounds a prompt, `kv_tokens` is what the device's KV holds
    (M in the paper)."""
    return 2 * max(INPUT_WEIGHT * longest_input, OUTPUT_WEIGHT * kv_tokens)


@dataclass
class _Pair:
    """Two clients' service difference while both stay backlogged: its range so far."""

    low: float
    high: float


@dataclass
class ServiceGaps:
    """Service per client, and the largest gap between two clients over any interval in
    which both stayed backlogged. Contract: at each instant, `serve` what was served, then
    `observe` who is backlogged."""

    service: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    max_gap: float = 0.0
    _pairs: dict[tuple[str, str], _Pair] = field(default_factory=dict)
    _backlogged_ever: set[str] = field(default_factory=set)

    def serve(self, client: str, prompt_tokens: int, output_tokens: int) -> None:
        self.service[client] += INPUT_WEIGHT * prompt_tokens + OUTPUT_WEIGHT * output_tokens

    def observe(self, backlogged: Iterable[str]) -> None:
        """A pair's interval ends when either client stops being backlogged."""
        clients = sorted(set(backlogged))
        self._backlogged_ever.update(clients)
        kept: dict[tuple[str, str], _Pair] = {}
        for a, b in itertools.combinations(clients, 2):
            diff = self.service[a] - self.service[b]
            pair = self._pairs.get((a, b)) or _Pair(diff, diff)
            pair.low, pair.high = min(pair.low, diff), max(pair.high, diff)
            self.max_gap = max(self.max_gap, pair.high - pair.low)
            kept[(a, b)] = pair
        self._pairs = kept

    def jain_index(self) -> float | None:
        """Of the service of the clients ever backlogged; None if none was."""
        served = [self.service[c] for c in sorted(self._backlogged_ever)]
        return jain(served) if served else None


def fairness_figures(token_classes: Mapping[str, Sequence[int]],
                     times: Mapping[str, RequestTimes], gaps: ServiceGaps, bound_2u: float,
                     inversions: int, inversion_s: float) -> dict[str, Any]:
    """The report's keys. `token_classes`: per request, its priority at each of its tokens
    (as many as `times[request].tokens`)."""
    ttfts: dict[int, list[float]] = defaultdict(list)
    tbts: dict[int, list[float]] = defaultdict(list)
    for rid, classes in token_classes.items():
        t = times[rid]
        ttfts[classes[0]].append(t.tokens[0] - t.arrival)
        for priority, gap in zip(classes[1:], t.tbts, strict=True):
            tbts[priority].append(gap)
    classes = sorted(ttfts)
    top, bottom = (classes[-1], classes[0]) if classes else (0, 0)
    return {
        "top_class": top,
        "bottom_class": bottom,
        "top_p95_ttft_s": percentile(ttfts[top], 95),
        "bottom_p95_ttft_s": percentile(ttfts[bottom], 95),
        "top_p99_tbt_s": percentile(tbts[top], 99),
        "bottom_p99_tbt_s": percentile(tbts[bottom], 99),
        "top_p999_tbt_s": percentile(tbts[top], 99.9),
        "bottom_p999_tbt_s": percentile(tbts[bottom], 99.9),
        "vtc_max_gap": gaps.max_gap,
        "vtc_bound_2u": bound_2u,
        "vtc_within_bound": gaps.max_gap <= bound_2u,
        "jain_index": gaps.jain_index(),
        "priority_inversions": inversions,
        "priority_inversion_s": inversion_s,
    }


@dataclass
class FairnessStats:
    """Observes a simulated run: `observe` after every step."""

    inversions: int = 0
    inversion_s: float = 0.0
    gaps: ServiceGaps = field(default_factory=ServiceGaps)
    longest_input: int = 0  # the longest context run, a bound on the longest prompt
    token_classes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    """Per request, the priority it had at each of its tokens."""
    # id: (client, priority, prompt tokens)
    _who: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    def observe(self, plan: StepPlan, step_s: float, planner: Planner) -> None:
        """`plan` was just made, and its step (`step_s` long, 0 if none) launched."""
        live = list(planner.requests.values())
        for r in live:
            self._who[r.request_id] = (r.client_id, r.priority, len(r.prompt))
        if plan.inverted:
            self.inversions += 1
            self.inversion_s += step_s
        ran = [s for s in plan.batch if s.request_id in self._who]
        for seq in ran:
            client, priority, prompt = self._who[seq.request_id]
            end = seq.start + seq.num_tokens
            self.longest_input = max(self.longest_input, end)
            # As the stack counts it: the prompt tokens computed, and each sampled token.
            self.gaps.serve(client, max(0, min(end, prompt) - seq.start), seq.sample)
            if seq.sample:
                self.token_classes[seq.request_id].append(priority)
        # Backlogged: every client with a request in the system, as the stack counts it.
        self.gaps.observe({r.client_id for r in live} | {self._who[s.request_id][0] for s in ran})

    def to_json(self, times: dict[str, RequestTimes], kv_tokens: int) -> dict[str, Any]:
        """`times`: each request's arrival and token times; `kv_tokens`: what the device's
        KV holds (M in VTC's bound)."""
        return fairness_figures(self.token_classes, times, self.gaps,
                                vtc_bound(self.longest_input, kv_tokens), self.inversions,
                                self.inversion_s)
