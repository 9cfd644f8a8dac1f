"""Fairness policies on their own: FCFS, priority, VTC's counters and floor, priority updates."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.core.policy import (
    FCFS,
    POLICIES,
    FairnessPolicy,
    PriorityPolicy,
    RandomPriorityUpdates,
    VirtualTokenCounter,
)
from services.scheduler.core.request import Request

CLIENTS = ("A", "B", "C", "D")


def _req(rid: str, client: str = "A", *, priority: int = 0, arrival: int = 0) -> Request:
    request = Request(rid, client, [1], 1, priority=priority)
    request.arrival = arrival
    return request


# Requests as the planner makes them: arrival is a sequence number, unique per request.
REQUESTS = st.lists(
    st.tuples(st.sampled_from(CLIENTS), st.integers(-3, 3)), min_size=1, max_size=12
).map(
    lambda specs: [
        _req(f"r{i}", client, priority=priority, arrival=i)
        for i, (client, priority) in enumerate(specs)
    ]
)


# --- every policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_registered_policies_build_without_arguments(name: str) -> None:
    assert isinstance(POLICIES[name](), FairnessPolicy)
    assert POLICIES[name]().preemptive == (name == "priority")


@pytest.mark.parametrize("policy_type", list(POLICIES.values()))
@settings(max_examples=60, deadline=None)
@given(requests=REQUESTS, shuffle_seed=st.integers(0, 2**32))
def test_ranks_are_a_total_order_that_breaks_ties_by_arrival(
    policy_type: type[FairnessPolicy], requests: list[Request], shuffle_seed: int
) -> None:
    """Distinct requests never tie, and of two requests that differ only in arrival (same
    client and priority) the earlier one ranks first, whatever order they are ranked in."""
    policy = policy_type()
    for i, r in enumerate(requests):
        policy.on_arrival(r, requests[:i])
        policy.on_served(r, r.arrival % 5, r.arrival % 2)
    shuffled = list(requests)
    random.Random(shuffle_seed).shuffle(shuffled)
    ranked = sorted(shuffled, key=policy.rank)
    assert len({policy.rank(r) for r in requests}) == len(requests)
    for earlier in requests:
        for later in requests:
            same = (earlier.client_id, earlier.priority) == (later.client_id, later.priority)
            if same and earlier.arrival < later.arrival:
                assert ranked.index(earlier) < ranked.index(later)


# --- FCFS and priority ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(requests=REQUESTS)
def test_fcfs_serves_in_arrival_order_whatever_the_priority_or_service(
    requests: list[Request],
) -> None:
    fcfs = FCFS()
    for r in requests:
        fcfs.on_arrival(r, requests)
        fcfs.on_served(r, 100, 1)
    assert sorted(reversed(requests), key=fcfs.rank) == requests


@settings(max_examples=60, deadline=None)
@given(requests=REQUESTS)
def test_priority_serves_the_highest_priority_first_then_by_arrival(
    requests: list[Request],
) -> None:
    ranked = sorted(reversed(requests), key=PriorityPolicy().rank)
    assert ranked == sorted(requests, key=lambda r: (-r.priority, r.arrival))


def test_a_priority_changed_from_outside_reorders_at_once() -> None:
    policy = PriorityPolicy()
    first, second = _req("first", arrival=0), _req("second", arrival=1)
    assert policy.rank(first) < policy.rank(second)
    second.priority = 1
    assert policy.rank(second) < policy.rank(first)


# --- virtual token counter ------------------------------------------------------------------


def test_vtc_charges_prefill_and_output_tokens_by_their_weights() -> None:
    vtc = VirtualTokenCounter(input_weight=0.5, output_weight=3)
    a = _req("a", "A")
    vtc.on_arrival(a, [])
    vtc.on_served(a, 10, 0)
    assert vtc.counters == {"A": 5}
    vtc.on_served(a, 0, 2)
    vtc.on_served(_req("b", "A", arrival=1), 4, 1)
    assert vtc.counters == {"A": 5 + 6 + 2 + 3}


def test_vtc_serves_the_client_that_received_least() -> None:
    vtc = VirtualTokenCounter()
    heavy_old, light_new = _req("h", "heavy", arrival=0), _req("l", "light", arrival=1)
    vtc.on_arrival(heavy_old, [])
    vtc.on_arrival(light_new, [heavy_old])
    assert vtc.rank(heavy_old) < vtc.rank(light_new), "equal counters: arrival decides"
    vtc.on_served(heavy_old, 1, 0)
    assert vtc.rank(light_new) < vtc.rank(heavy_old)


def test_vtc_lifts_a_client_returning_from_idle_to_the_backlogged_minimum() -> None:
    vtc = VirtualTokenCounter(input_weight=1, output_weight=2)
    a, b = _req("a", "A"), _req("b", "B", arrival=1)
    vtc.on_arrival(a, [])
    vtc.on_arrival(b, [a])
    vtc.on_served(a, 10, 1)
    vtc.on_served(b, 20, 0)
    assert vtc.counters == {"A": 12, "B": 20}
    c = _req("c", "C", arrival=2)
    vtc.on_arrival(c, [a, b])
    assert vtc.counters["C"] == 12, "lifted to the smallest backlogged counter, no banked credit"
    a_again = _req("a2", "A", arrival=3)
    vtc.on_served(a, 0, 10)  # A is now at 32, above the floor: it keeps its counter
    vtc.on_arrival(a_again, [b, c])
    assert vtc.counters["A"] == 32


def test_vtc_leaves_a_backlogged_client_and_a_lone_arrival_as_they_are() -> None:
    vtc = VirtualTokenCounter()
    a, b = _req("a", "A"), _req("b", "B", arrival=1)
    vtc.on_arrival(a, [])
    assert vtc.counters.get("A", 0.0) == 0.0
    vtc.on_arrival(b, [a])
    vtc.on_served(b, 50, 0)
    vtc.on_arrival(_req("b2", "B", arrival=2), [a, b])  # B is backlogged: not lifted, not reset
    assert vtc.counters["B"] == 50
    vtc.on_served(a, 7, 0)
    vtc.on_arrival(_req("a2", "A", arrival=3), [])  # nobody backlogged: no floor to lift to
    assert vtc.counters["A"] == 7


@pytest.mark.parametrize("weights", [(-1, 2), (1, -0.5)])
def test_vtc_refuses_negative_weights(weights: tuple[float, float]) -> None:
    with pytest.raises(ValueError):
        VirtualTokenCounter(input_weight=weights[0], output_weight=weights[1])


# One step of a workload: a client's request arrives, its oldest live request is served or
# ends, or the client goes idle (all its requests end).
EVENT_CLIENTS = st.sampled_from(CLIENTS[:3])
EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), EVENT_CLIENTS),
        st.tuples(st.just("serve"), EVENT_CLIENTS, st.integers(0, 40), st.integers(0, 1)),
        st.tuples(st.just("finish"), EVENT_CLIENTS),
        st.tuples(st.just("idle"), EVENT_CLIENTS),
    ),
    min_size=10,
    max_size=60,
)


@settings(max_examples=100, deadline=None)
@given(
    events=EVENTS,
    input_weight=st.sampled_from([0, 0.5, 1, 3]),
    output_weight=st.sampled_from([0, 1, 2, 7.5]),
)
def test_vtc_counters_only_grow_and_returning_clients_start_at_the_floor(
    events: list[tuple], input_weight: float, output_weight: float
) -> None:
    vtc = VirtualTokenCounter(input_weight=input_weight, output_weight=output_weight)
    live: list[Request] = []
    for arrival, (kind, client, *served) in enumerate(events):
        before = dict(vtc.counters)
        mine = before.get(client, 0.0)
        oldest = next((r for r in live if r.client_id == client), None)
        if kind == "arrive":
            request = _req(f"r{arrival}", client, arrival=arrival)
            backlogged = {r.client_id for r in live}
            vtc.on_arrival(request, live)
            live.append(request)
            if backlogged and client not in backlogged:
                floor = min(before.get(c, 0.0) for c in backlogged)
                assert vtc.counters[client] == max(mine, floor)
            else:
                assert vtc.counters.get(client, 0.0) == mine
            others = {c: v for c, v in vtc.counters.items() if c != client}
            assert others == {c: v for c, v in before.items() if c != client}
        elif oldest is not None and kind == "serve":
            vtc.on_served(oldest, *served)
            prompt, output = served
            assert vtc.counters[client] == mine + input_weight * prompt + output_weight * output
        elif oldest is not None and kind == "finish":
            live.remove(oldest)
        elif kind == "idle":
            live = [r for r in live if r.client_id != client]
        assert all(vtc.counters[c] >= v for c, v in before.items()), "a counter decreased"


# --- external priority updates --------------------------------------------------------------


@pytest.mark.parametrize("every, levels", [(0, 4), (-3, 4), (3, 0), (3, -1)])
def test_random_priority_updates_refuse_non_positive_settings(every: int, levels: int) -> None:
    with pytest.raises(ValueError):
        RandomPriorityUpdates(every=every, levels=levels)


def test_random_priority_updates_come_every_few_iterations_for_every_live_request() -> None:
    live = [_req(f"r{i}") for i in range(5)]
    updates = RandomPriorityUpdates(every=3, levels=4, seed=1)
    assert [updates.updates(i, live) for i in (0, 1, 2, 4, 5)] == [{}] * 5
    drawn = updates.updates(3, live)
    assert set(drawn) == {r.request_id for r in live}
    assert set(drawn.values()) <= set(range(4))
    assert updates.updates(3, []) == {}


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    every=st.integers(1, 4),
    levels=st.integers(1, 6),
    num_live=st.integers(0, 8),
    shuffle_seed=st.integers(0, 2**32),
)
def test_random_priority_updates_are_a_function_of_the_seed_not_of_the_live_order(
    seed: int, every: int, levels: int, num_live: int, shuffle_seed: int
) -> None:
    live = [_req(f"r{i}") for i in range(num_live)]
    shuffled = list(live)
    random.Random(shuffle_seed).shuffle(shuffled)
    first = RandomPriorityUpdates(every=every, levels=levels, seed=seed)
    second = RandomPriorityUpdates(every=every, levels=levels, seed=seed)
    for iteration in range(12):
        drawn = first.updates(iteration, live)
        assert drawn == second.updates(iteration, shuffled)
        assert all(0 <= level < levels for level in drawn.values())


def test_random_priority_updates_differ_between_seeds() -> None:
    live = [_req(f"r{i}") for i in range(8)]
    draws = [
        [RandomPriorityUpdates(every=1, seed=seed).updates(i, live) for i in range(1, 6)]
        for seed in (0, 1)
    ]
    assert draws[0] != draws[1]
