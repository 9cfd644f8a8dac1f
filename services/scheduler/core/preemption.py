"""Preemption policies: when a running request gives way, which one goes, and by what.

A `FairnessPolicy` ranks requests; a `PreemptionPolicy` turns the ranks into the order in
which the selection pass (`selection.choose`) considers them. A resident that the pass does
not keep (it did not fit in device memory, the token budget or the batch) is preempted, so
the order decides both when preemption happens and which victim goes first. `by` decides
how: a swap keeps its KV on the host, a recompute drops it.

A new policy is one subclass here and one line in `PREEMPTION_POLICIES`; the scheduler's
`--preemption` flag and the planner tests take every registered policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from services.scheduler.core.lifecycle import RESIDENT
from services.scheduler.core.plan import PreemptBy
from services.scheduler.core.policy import FairnessPolicy
from services.scheduler.core.request import Request


class PreemptionPolicy(ABC):
    @abstractmethod
    def order(self, live: Sequence[Request], fairness: FairnessPolicy) -> list[Request]:
        """Every request in `live`, in the order the selection pass considers them."""

    def by(self, request: Request, *, can_swap: bool) -> PreemptBy:
        """How `request` is preempted. `can_swap`: it has KV, and the mode swaps (the
        `swap_preemption` switch)."""
        return PreemptBy.SWAP if can_swap else PreemptBy.RECOMPUTE


class OnOrderChange(PreemptionPolicy):
    """FastSwitch's: under a preemptive fairness policy (priorities), a resident gives way
    as soon as the order ranks a waiting request above it and both do not fit; under the
    others, residents come first and give way only for memory, worst-ranked first."""

    def order(self, live: Sequence[Request], fairness: FairnessPolicy) -> list[Request]:
        if fairness.preemptive:
            return sorted(live, key=fairness.rank)
        return residents_first(live, fairness.rank)


class OnAllocationFailure(PreemptionPolicy):
    """vLLM v1's (`--scheduling-policy priority`): whatever the fairness policy, running
    requests keep their places ahead of every waiting one, and give way only when they
    cannot all grow, worst-ranked first. A waiting request of higher rank never displaces
    a running one."""

    def order(self, live: Sequence[Request], fairness: FairnessPolicy) -> list[Request]:
        return residents_first(live, fairness.rank)


class OnTopClassTTFT(PreemptionPolicy):
    """A resident gives way for priority only to a request of the top class (the highest
    `Request.priority` among the requests the selection pass considers: one of a higher
    priority that waits for the host meanwhile is not among them) that has not sampled a
    token yet, whose wait is its TTFT. A request below the top class never displaces one,
    nor does one that has sampled tokens: its wait is a gap in its stream, and displacing
    another would open a second gap. Under a preemptive fairness policy the order is:

    1. the top class's residents, and its requests without tokens that rank ahead of every
       waiting top-class request with tokens, by rank;
    2. the other residents, shortest first: the one holding the most KV (prompt and output)
       gives way first, so that an admission preempts as few as it can;
    3. the other waiting requests, by rank: a preempted top-class request comes back before
       the top-class newcomers behind it, which never take its room (under a steady stream
       of them it would otherwise wait forever).

    Under the other fairness policies, residents come first, as with `OnOrderChange`."""

    def order(self, live: Sequence[Request], fairness: FairnessPolicy) -> list[Request]:
        if not fairness.preemptive:
            return residents_first(live, fairness.rank)
        top = max((r.priority for r in live), default=0)
        resumed = min((fairness.rank(r) for r in live if r.priority == top and r.output
                       and r.state not in RESIDENT), default=None)  # the first to come back
        first, others = [], []
        for r in live:
            ahead = r.state in RESIDENT or (
                not r.output and (resumed is None or fairness.rank(r) < resumed))
            (first if r.priority == top and ahead else others).append(r)
        stay = sorted((r for r in others if r.state in RESIDENT),
                      key=lambda r: (r.num_tokens, fairness.rank(r)))
        return (sorted(first, key=fairness.rank) + stay
                + sorted((r for r in others if r.state not in RESIDENT), key=fairness.rank))


def residents_first(live: Sequence[Request], rank: Callable[[Request], tuple]) -> list[Request]:
    resident = sorted((r for r in live if r.state in RESIDENT), key=rank)
    return resident + sorted((r for r in live if r.state not in RESIDENT), key=rank)


PREEMPTION_POLICIES: dict[str, type[PreemptionPolicy]] = {
    "on-order-change": OnOrderChange,
    "on-allocation-failure": OnAllocationFailure,
    "on-top-class-ttft": OnTopClassTTFT,
}
