"""What fairness buys, as the real stack showed it: `fairness_stats`' figures (one definition
of each) fed from the clients' timestamps and the scheduler's counters.

- A request's class at a token is its client's priority then: the latest
  `PriorityUpdate` of its client before the token (a client's turns are sent at its
  priority, `common.loadgen`); 0 (the default) before any.
- Service: when a request's first token comes, its prompt tokens that were computed (the
  scheduler's count less those reused); one output token per token. A prompt computed
  again after a preemption by recompute is not seen from the client, so service is a
  lower bound where the simulator's counts recomputes.
- A client is backlogged from when it sends a request until that request's last token.
- Priority inversions are the scheduler's (`Stats.priority_inversions` and `_s`, per
  `services.scheduler.core.inversion`): once a request has started, a client cannot tell
  its waits (swapped out) from its running.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from benchmarks.sim.fairness_stats import ServiceGaps, fairness_figures, vtc_bound
from benchmarks.sim.virtual_driver import RequestTimes
from common.loadgen import LoadReport, PriorityUpdate, TurnResult

START, SERVE, END = 0, 1, 2  # at one instant: arrivals, then service, then ends


class PriorityLog:
    """Each client's priority updates, in time order."""

    def __init__(self, updates: Sequence[PriorityUpdate]) -> None:
        self._at: dict[str, list[float]] = defaultdict(list)
        self._priority: dict[str, list[int]] = defaultdict(list)
        for u in sorted(updates, key=lambda u: u.at_s):
            self._at[u.client_id].append(u.at_s)
            self._priority[u.client_id].append(u.priority)

    def priority(self, turn: TurnResult, at_s: float) -> int:
        """The priority `turn`'s request had at `at_s`: its client's then."""
        times = self._at.get(turn.client_id, [])
        i = bisect.bisect_right(times, at_s) - 1
        return self._priority[turn.client_id][i] if i >= 0 else 0


def _request_id(turn: TurnResult) -> str:
    return f"{turn.conversation_id}/{turn.turn}"


def stack_fairness(report: LoadReport, kv_tokens: int, inversions: int,
                   inversion_s: float) -> dict[str, Any]:
    """`fairness_figures`' keys for one run; `kv_tokens`: what the device's KV holds."""
    log = PriorityLog(report.priority_log)
    served = [t for t in report.turns if t.token_ids]
    times = {_request_id(t): RequestTimes(t.sent_s, t.token_times) for t in served}
    classes = {_request_id(t): [log.priority(t, at) for at in t.token_times] for t in served}
    events: list[tuple[float, int, str, int]] = []  # (time, kind, client, prompt tokens)
    for t in served:
        at = t.token_times
        events += [(t.sent_s, START, t.client_id, 0), (at[-1], END, t.client_id, 0),
                   (at[0], SERVE, t.client_id, t.prompt_tokens - t.reused_prompt_tokens),
                   *((a, SERVE, t.client_id, 0) for a in at[1:])]
    gaps, backlog = ServiceGaps(), Counter[str]()
    for _, instant in itertools.groupby(sorted(events), key=lambda e: e[0]):
        ending = []
        for _, kind, client, prompt in instant:
            if kind == START:
                backlog[client] += 1
            elif kind == SERVE:
                gaps.serve(client, prompt, 1)
            else:
                ending.append(client)
        gaps.observe(c for c, n in backlog.items() if n)
        backlog.subtract(ending)
    longest = max((t.prompt_tokens + len(t.token_ids) for t in served), default=0)
    return fairness_figures(classes, times, gaps, vtc_bound(longest, kv_tokens), inversions,
                            inversion_s)
