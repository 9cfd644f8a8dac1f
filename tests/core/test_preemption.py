"""Preemption policies: the order each gives the selection pass, alone and in the planner.
Every registered policy is run here and by the planner's property tests."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.kv.host_ops import apply
from services.scheduler.core.config import Mode
from services.scheduler.core.lifecycle import RESIDENT, Event
from services.scheduler.core.plan import PreemptBy
from services.scheduler.core.planner import Planner
from services.scheduler.core.policy import FCFS, POLICIES, FairnessPolicy, PriorityPolicy
from services.scheduler.core.preemption import (
    PREEMPTION_POLICIES,
    OnAllocationFailure,
    OnOrderChange,
    OnTopClassTTFT,
    PreemptionPolicy,
)
from services.scheduler.core.request import Request, RequestState
from tests.core.test_planner import finish_swaps, make_planner, req, run_step, state

S, E = RequestState, Event
# Events that take a new request to each state a selection pass considers.
TO = {S.WAITING: (), S.QUEUED: (E.ASK_HOST, E.HOST_MISS), S.PREFILLING: (E.ADMIT,),
      S.RUNNING: (E.ADMIT, E.FIRST_TOKEN), S.SWAPPED: (E.ASK_HOST, E.PINNED)}


def live(*specs: tuple[str, RequestState, int]) -> list[Request]:
    """Requests (name, state, priority), arriving in the order given."""
    out = []
    for arrival, (name, to, priority) in enumerate(specs):
        r = Request(name, "c", [1], 1, priority=priority, arrival=arrival)
        for event in TO[to]:
            r.handle(event)
        out.append(r)
    return out


MIX = (("low", S.RUNNING, 0), ("mid", S.PREFILLING, 1), ("high", S.WAITING, 5),
       ("back", S.SWAPPED, 3), ("next", S.QUEUED, 2))


@pytest.mark.parametrize(("policy", "fairness", "expected"), [
    (OnOrderChange, PriorityPolicy, ["high", "back", "next", "mid", "low"]),
    (OnOrderChange, FCFS, ["low", "mid", "high", "back", "next"]),
    (OnAllocationFailure, PriorityPolicy, ["mid", "low", "high", "back", "next"]),
    (OnAllocationFailure, FCFS, ["low", "mid", "high", "back", "next"]),
    (OnTopClassTTFT, PriorityPolicy, ["high", "mid", "low", "back", "next"]),
    (OnTopClassTTFT, FCFS, ["low", "mid", "high", "back", "next"]),
])
def test_order(policy: type[PreemptionPolicy], fairness: type[FairnessPolicy],
               expected: list[str]) -> None:
    """On a change of order, a preemptive fairness policy ranks a waiting request above
    residents; otherwise (and always on allocation failure) residents come first."""
    order = policy().order(live(*MIX), fairness())
    assert [r.request_id for r in order] == expected


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(sorted(PREEMPTION_POLICIES)),
       fairness=st.sampled_from(sorted(POLICIES)),
       specs=st.lists(st.tuples(st.sampled_from(list(TO)), st.integers(0, 3)), max_size=8))
def test_every_policy_orders_every_live_request_once(
    policy: str, fairness: str, specs: list[tuple[RequestState, int]]
) -> None:
    requests = live(*((f"r{i}", to, p) for i, (to, p) in enumerate(specs)))
    order = PREEMPTION_POLICIES[policy]().order(requests, POLICIES[fairness]())
    assert sorted(map(id, order)) == sorted(map(id, requests))


@settings(max_examples=200, deadline=None)
@given(specs=st.lists(st.tuples(st.sampled_from(list(TO)), st.integers(0, 3), st.booleans(),
                                st.integers(1, 40)), max_size=8))
def test_on_top_class_ttft_only_top_class_newcomers_pass_a_resident(
    specs: list[tuple[RequestState, int, bool, int]]
) -> None:
    """Before the last resident come only residents and top-class requests without tokens
    that rank ahead of every waiting top-class request with tokens; the residents that may
    give way are ordered by the KV they hold, the most last."""
    requests = live(*((f"r{i}", to, p) for i, (to, p, _, _) in enumerate(specs)))
    for r, (_, _, sampled, length) in zip(requests, specs, strict=True):
        r.prompt, r.output = [1] * length, [7] if sampled else []
    fairness = PriorityPolicy()
    order = OnTopClassTTFT().order(requests, fairness)
    top = max((r.priority for r in requests), default=0)
    resumed = [fairness.rank(r) for r in requests
               if r.priority == top and r.output and r.state not in RESIDENT]
    residents = [i for i, r in enumerate(order) if r.state in RESIDENT]
    for r in order[:max(residents, default=0)]:
        assert r.state in RESIDENT or (
            r.priority == top and not r.output and fairness.rank(r) < min(resumed, default=(1,)))
    others = [r.num_tokens for r in order if r.state in RESIDENT and r.priority != top]
    assert others == sorted(others)


@pytest.mark.parametrize("name", sorted(PREEMPTION_POLICIES))
def test_every_policy_swaps_when_it_can(name: str) -> None:
    policy, (r,) = PREEMPTION_POLICIES[name](), live(("r", S.RUNNING, 0))
    assert policy.by(r, can_swap=True) is PreemptBy.SWAP
    assert policy.by(r, can_swap=False) is PreemptBy.RECOMPUTE


# ---- in the planner --------------------------------------------------------------------


def arrival_beside_two_running(policy: PreemptionPolicy, device_blocks: int,
                               running: tuple[Request, Request], arrival: Request) -> Planner:
    """A planner whose `running` pair has run one step, with `arrival` added after it."""
    p = make_planner(Mode.FASTSWITCH, device_blocks=device_blocks, preemption=policy)
    for r in running:
        p.add(r)
    run_step(p, p.plan())
    p.add(arrival)
    return p


@pytest.mark.parametrize(("policy", "preempted"), [(OnOrderChange, ["low"]),
                                                   (OnAllocationFailure, []),
                                                   (OnTopClassTTFT, ["low"])])
def test_a_higher_priority_arrival_preempts_only_on_a_change_of_order(
    policy: type[PreemptionPolicy], preempted: list[str]
) -> None:
    """Two running requests have room to grow; a higher-priority arrival does not fit
    beside them."""
    p = arrival_beside_two_running(policy(), 8, (req("low", 12, 18, priority=0),
                                                 req("mid", 12, 18, priority=1)),
                                   req("high", 12, 18, priority=5))
    plan = p.plan()
    assert [x.request_id for x in plan.preemptions] == preempted
    assert "mid" in {s.request_id for s in plan.batch}
    if not preempted:
        assert {s.request_id for s in plan.batch} == {"low", "mid"}
        assert state(p, "high") is S.WAITING


@pytest.mark.parametrize(("policy", "preempted"), [(OnOrderChange, ["low"]),
                                                   (OnTopClassTTFT, [])])
def test_below_the_top_class_a_waiting_request_displaces_only_on_a_change_of_order(
    policy: type[PreemptionPolicy], preempted: list[str]
) -> None:
    p = arrival_beside_two_running(policy(), 8, (req("low", 12, 18, priority=0),
                                                 req("top", 12, 18, priority=5)),
                                   req("mid", 12, 18, priority=1))  # above "low", below top
    assert [x.request_id for x in p.plan().preemptions] == preempted


@pytest.mark.parametrize(("policy", "victim", "displaces"), [(OnOrderChange, "short", True),
                                                             (OnTopClassTTFT, "long", False)])
def test_on_top_class_ttft_the_longest_gives_way_and_a_preempted_one_does_not_displace(
    policy: type[PreemptionPolicy], victim: str, displaces: bool
) -> None:
    """A top-class newcomer that does not fit displaces the resident holding the most KV
    (not the lowest-ranked); raised to the top class, that victim waits for room instead of
    displacing in turn."""
    p = arrival_beside_two_running(policy(), 10, (req("long", 20, 18, priority=1),
                                                  req("short", 8, 18, priority=0)),
                                   req("new", 8, 18, priority=5))
    plan = p.plan()
    assert [x.request_id for x in plan.preemptions] == [victim]
    for _ in range(50):
        if state(p, victim) is S.SWAPPED:
            break
        run_step(p, plan)
        finish_swaps(p, plan)
        plan = p.plan()
    run_step(p, plan)
    p.set_priority(9, request_id=victim)
    plan = p.plan()
    assert bool(plan.preemptions) is displaces
    assert state(p, victim) is S.SWAPPED  # nothing comes in while a resident goes


@pytest.mark.parametrize("policy", [OnOrderChange, OnTopClassTTFT])
def test_a_preempted_request_comes_back_though_its_class_keeps_arriving(
    policy: type[PreemptionPolicy],
) -> None:
    """x, displaced by a higher class that then finishes, is of the top class again but has
    tokens: newcomers of its class keep arriving, and must not take its room for ever."""
    p = arrival_beside_two_running(policy(), 20, (req("x", 12, 40, priority=1),
                                                  req("a", 8, 10, priority=1)),
                                   req("hi", 56, 4, priority=5))
    arrivals = 0
    for _ in range(100):
        plan = p.plan()
        run_step(p, plan)
        finish_swaps(p, plan)
        if "x" not in p.requests:
            return
        while sum(r.state in (S.WAITING, S.QUEUED) for r in p.requests.values()) < 2:
            arrivals += 1
            p.add(req(f"n{arrivals}", 32, 8, priority=1))
    raise AssertionError(f"x is still {state(p, 'x')} after 100 steps and {arrivals} arrivals")


def test_on_allocation_failure_the_worst_ranked_resident_gives_way_when_they_cannot_grow() -> None:
    p = arrival_beside_two_running(OnAllocationFailure(), 8, (req("low", 12, 18, priority=0),
                                                              req("mid", 12, 18, priority=1)),
                                   req("high", 4, 4, priority=5))
    while not (plan := p.plan()).preemptions:
        assert state(p, "high") is S.WAITING  # never for the arrival
        run_step(p, plan)
    assert [x.request_id for x in plan.preemptions] == ["low"]
    assert state(p, "high") is S.WAITING  # nothing comes in while a resident goes


def preempting_plans_that_bring_in(policy: PreemptionPolicy, fairness: FairnessPolicy,
                                   seed: int) -> int:
    """Runs random requests to their end; the plans that preempt a resident and also bring
    in (admit, swap in, or ask the host for) a request that was not resident."""
    rng = random.Random(seed)
    p = make_planner(Mode.FASTSWITCH, device_blocks=12, policy=fairness, preemption=policy)
    pending = [req(f"r{i}", rng.randint(2, 16), rng.randint(2, 16), priority=rng.randrange(4),
                   conv=f"conv{i % 2}" if i % 3 else None, seed=seed) for i in range(8)]
    count = 0
    for _ in range(2000):
        if pending and rng.random() < 0.4:
            p.add(pending.pop())
        if not (pending or p.has_work()):
            return count
        if rng.random() < 0.2:
            p.set_priority(rng.randrange(6), request_id=f"r{rng.randrange(8)}")
        waiting = {r: r.state for r in p.live() if r.state not in RESIDENT}
        plan = p.planner.plan()
        count += bool(plan.preemptions) and any(r.state is not was for r, was in waiting.items())
        p.planner.host_replied(apply(p.host, plan.host_ops))
        run_step(p, plan)
        finish_swaps(p, plan)
    raise AssertionError("the run did not end")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), fairness=st.sampled_from(sorted(POLICIES)))
def test_on_allocation_failure_never_preempts_to_bring_a_request_in(
    seed: int, fairness: str
) -> None:
    assert preempting_plans_that_bring_in(OnAllocationFailure(), POLICIES[fairness](), seed) == 0


def test_on_order_change_preempts_to_bring_a_higher_priority_request_in() -> None:
    assert sum(preempting_plans_that_bring_in(OnOrderChange(), PriorityPolicy(), seed)
               for seed in range(10)) > 0
