"""The step planner, driven by hand and by the virtual driver with the token-checking executor."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.sim.checked_executor import CheckedExecutor, next_token
from benchmarks.sim.virtual_driver import HostCosts, UnitCost, VirtualDriver
from common.kv.host_ops import MISS, NO_PIN, Pin, Pinned, apply
from common.kv.reuse_index import PinHandle, ReuseIndex
from services.scheduler.core.config import Mode, SchedulerConfig, Switches
from services.scheduler.core.plan import Direction, PreemptBy, StepPlan, SwapOrder
from services.scheduler.core.planner import Planner
from services.scheduler.core.policy import (
    FCFS,
    PriorityPolicy,
    RandomPriorityUpdates,
    VirtualTokenCounter,
)
from services.scheduler.core.preemption import (
    PREEMPTION_POLICIES,
    PreemptionPolicy,
)
from services.scheduler.core.request import Request, RequestState

BS = 4
DEVICE_ALL = 10**6  # evict(DEVICE_ALL) empties the device prefix cache
SWAP_MODES = [Mode.FASTSWITCH, Mode.BASELINE]  # the modes that preempt by swap


class Answered:
    """A planner whose host operations are answered as soon as each plan is made (one
    round trip per plan, of no time); everything else is the planner's own."""

    def __init__(self, planner: Planner, host: ReuseIndex) -> None:
        self.planner = planner
        self.host = host

    def plan(self) -> StepPlan:
        plan = self.planner.plan()
        self.planner.host_replied(apply(self.host, plan.host_ops))
        return plan

    def __getattr__(self, name: str):
        return getattr(self.planner, name)


def make_planner(mode: Mode, *, device_blocks: int = 16, host_blocks: int = 256, policy=None,
                 max_seqs: int = 8, budget: int = 64, switches: str = "",
                 preemption: PreemptionPolicy | None = None) -> Planner:
    """A planner answered by an in-process host; `preemption` None: the mode's own."""
    config = SchedulerConfig(mode=mode, block_size=BS, num_device_blocks=device_blocks,
                             max_num_seqs=max_seqs, max_batched_tokens=budget,
                             switches=mode.switches.with_spec(switches))
    host = ReuseIndex(fingerprint="test", block_size=BS, num_blocks=host_blocks)
    planner = Planner(config, policy or PriorityPolicy(), host.fingerprint, preemption)
    return Answered(planner, host)


def req(rid: str, n_prompt: int, max_tokens: int, *, client: str = "c", priority: int = 0,
        conv: str | None = None, seed: int = 0) -> Request:
    rng = random.Random(f"{rid}/{seed}")
    prompt = [rng.randrange(100) for _ in range(n_prompt)]
    return Request(rid, client, prompt, max_tokens, conversation_id=conv, priority=priority)


def run_step(planner: Planner, plan: StepPlan) -> list[Request]:
    """Completes the plan's step (if it has one), sampling from each row's known tokens."""
    if not plan.batch:
        return []
    sampled = {s.request_id: next_token(planner.requests[s.request_id].tokens[:-1], 100)
               for s in plan.batch if s.sample and s.request_id in planner.requests}
    return planner.complete_step(sampled)


def finish_swaps(planner: Planner, plan: StepPlan) -> None:
    for order in plan.swaps:
        planner.swap_done(order.swap_id)


def state(planner: Planner, rid: str) -> RequestState:
    return planner.requests[rid].state


@pytest.mark.parametrize("mode", SWAP_MODES)
def test_high_priority_arrival_preempts_lowest_priority_runner(mode: Mode) -> None:
    p = make_planner(mode, device_blocks=8)
    p.add(req("low", 12, 18, priority=0))
    p.add(req("mid", 12, 18, priority=1))
    run_step(p, p.plan())
    assert state(p, "low") is state(p, "mid") is RequestState.RUNNING
    p.add(req("high", 12, 18, priority=5))
    plan = p.plan()
    assert [(x.request_id, x.by) for x in plan.preemptions] == [("low", PreemptBy.SWAP)]
    assert state(p, "mid") is RequestState.RUNNING
    assert "mid" in {s.request_id for s in plan.batch}
    assert not plan.swaps  # the host is asked for room first
    run_step(p, plan)
    out = [s for s in p.plan().swaps if s.direction is Direction.OUT]
    assert [s.request_id for s in out] == ["low"]


def test_fastswitch_keeps_others_running_while_one_swaps() -> None:
    p = make_planner(Mode.FASTSWITCH, device_blocks=8)
    p.add(req("a", 12, 18, priority=0))
    p.add(req("b", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("c", 12, 18, priority=5))
    plan = p.plan()
    assert not plan.barrier
    assert {s.request_id for s in plan.batch} == {"b"}  # a swaps out, b decodes meanwhile
    run_step(p, plan)
    assert state(p, "a") is RequestState.SWAPPING_OUT
    plan2 = p.plan()  # the host made room: a's copy starts
    assert [s.request_id for s in plan2.swaps] == ["a"] and not plan2.barrier
    assert "b" in {s.request_id for s in plan2.batch}
    run_step(p, plan2)  # the swap of a is still in flight
    plan3 = p.plan()
    assert "b" in {s.request_id for s in plan3.batch}
    assert state(p, "c") is RequestState.WAITING  # a's blocks are still draining
    assert p.memory.allocator.num_draining > 0
    finish_swaps(p, plan2)
    run_step(p, plan3)
    plan4 = p.plan()
    assert {s.request_id for s in plan4.batch} == {"b", "c"}
    assert state(p, "a") is RequestState.SWAPPED


def test_fastswitch_swap_in_runs_only_after_its_own_copy() -> None:
    p = make_planner(Mode.FASTSWITCH, device_blocks=10)
    p.add(req("a", 12, 18, priority=0))
    p.add(req("b", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("c", 12, 3, priority=2))
    for _ in range(20):
        plan = p.plan()
        swap_ins = [s for s in plan.swaps if s.direction is Direction.IN]
        if swap_ins:
            break
        run_step(p, plan)
        finish_swaps(p, plan)
    assert [s.request_id for s in swap_ins] == ["a"]
    assert "c" not in p.requests  # a comes back once c is done
    assert "a" not in {s.request_id for s in plan.batch}
    assert state(p, "a") is RequestState.SWAPPING_IN
    run_step(p, plan)
    during = p.plan()
    assert "a" not in {s.request_id for s in during.batch}  # its copy is still in flight
    assert "b" in {s.request_id for s in during.batch}
    run_step(p, during)
    finish_swaps(p, plan)
    assert "a" in {s.request_id for s in p.plan().batch}


def test_baseline_plans_a_barrier_and_runs_swapped_in_requests_at_once() -> None:
    p = make_planner(Mode.BASELINE, device_blocks=8)
    p.add(req("a", 12, 18, priority=0))
    p.add(req("b", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("c", 12, 18, priority=5))
    run_step(p, p.plan())  # a waits for host room
    plan = p.plan()
    assert plan.barrier and plan.swaps
    assert all(len(s.copies) == s.num_blocks for s in plan.swaps)  # one copy per block
    finish_swaps(p, plan)
    run_step(p, plan)
    run_step(p, p.plan())  # a's swapped KV is pinned
    p.set_priority(9, request_id="a")  # b makes room for it, by swap
    for _ in range(6):
        plan = p.plan()
        if any(s.direction is Direction.IN for s in plan.swaps):
            break
        finish_swaps(p, plan)
        run_step(p, plan)
    assert plan.barrier
    assert [s.request_id for s in plan.swaps if s.direction is Direction.IN] == ["a"]
    assert "a" in {s.request_id for s in plan.batch}  # runs right after the barrier


def test_vtc_does_not_starve_a_light_client() -> None:
    """A heavy client queues 12 requests, a light one keeps one request in flight: VTC
    gives the light client the next free slot every time, so it gets about half the GPU."""
    p = make_planner(Mode.FASTSWITCH, device_blocks=64, policy=VirtualTokenCounter(),
                     max_seqs=2, budget=32)
    for i in range(12):
        p.add(req(f"heavy{i}", 16, 10, client="heavy"))
    p.add(req("light0", 16, 10, client="light"))
    first_run: dict[str, int] = {}
    light_arrived = {"light0": 0}
    for step in range(300):
        plan = p.plan()
        for s in plan.batch:
            first_run.setdefault(s.request_id, step)
        for r in run_step(p, plan):
            if r.client_id == "light" and len(light_arrived) < 6:
                light_arrived[f"light{len(light_arrived)}"] = step + 1
                p.add(req(f"light{len(light_arrived) - 1}", 16, 10, client="light"))
        if not p.requests:
            break
    assert not p.requests
    assert first_run["light0"] <= min(first_run[f"heavy{i}"] for i in range(2, 12))
    waits = [first_run[rid] - at for rid, at in light_arrived.items()]
    assert len(waits) == 6 and max(waits) <= 10  # never behind more than one heavy request


@pytest.mark.parametrize("mode", SWAP_MODES)
def test_recompute_when_host_is_full(mode: Mode) -> None:
    p = make_planner(mode, device_blocks=8, host_blocks=2)
    p.add(req("a", 12, 18, priority=0))
    p.add(req("b", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("c", 12, 18, priority=5))
    plan = p.plan()
    assert [(x.request_id, x.by) for x in plan.preemptions] == [("a", PreemptBy.SWAP)]
    # The host refused the reservation: a recomputes.
    assert state(p, "a") is RequestState.WAITING and p.requests["a"].num_computed == 0
    assert p.stats.preempted_by_recompute == 1 and p.stats.preempted_by_swap == 0
    assert p.memory.allocator.num_blocks_of(p.requests["a"]) == 0


@pytest.mark.parametrize("mode", SWAP_MODES)
def test_cancel_in_every_state_frees_everything(mode: Mode) -> None:
    p = make_planner(mode, device_blocks=8)
    for rid, prio in (("a", 0), ("b", 1)):
        p.add(req(rid, 12, 18, priority=prio))
    run_step(p, p.plan())
    p.add(req("c", 12, 18, priority=5))
    p.add(req("w", 12, 18, priority=-1))
    plan = p.plan()  # a swapping out, c admitted or waiting, w waiting
    assert p.cancel("a") and p.cancel("w") and p.cancel("b")
    assert not p.cancel("a")
    finish_swaps(p, plan)
    run_step(p, plan)
    assert p.cancel("c")
    assert len(p.memory.swaps) == 0
    p.plan()  # the host operations the cancels left go out
    assert not p.has_work()
    metrics = p.memory.allocator.metrics()
    assert (metrics.used, metrics.draining, metrics.free) == (0, 0, 8)
    assert p.host.stats().used == 0 and p.host.stats().pinned == 0


def test_failed_swap_out_falls_back_to_recompute() -> None:
    p = make_planner(Mode.FASTSWITCH, device_blocks=8)
    p.add(req("a", 12, 18, priority=0))
    p.add(req("b", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("c", 12, 18, priority=5))
    run_step(p, p.plan())
    plan = p.plan()
    (out,) = [s for s in plan.swaps if s.direction is Direction.OUT]
    p.swap_done(out.swap_id, ok=False)
    assert state(p, "a") is RequestState.WAITING and p.requests["a"].num_computed == 0
    assert p.memory.allocator.num_draining == 0
    p.plan()  # its Abort goes out
    assert p.host.stats().used == 0


def test_next_turn_swaps_in_the_conversation_prefix() -> None:
    p = make_planner(Mode.FASTSWITCH, device_blocks=32, switches="-device_cache,-eager_offload")
    first = req("t1", 20, 6, conv="conv")
    p.add(first)
    while "t1" in p.requests:
        plan = p.plan()
        run_step(p, plan)
        finish_swaps(p, plan)
    assert not p.plan().swaps  # the finished turn asks the host for room
    offload = p.plan()  # its KV goes to the host
    assert [s.direction for s in offload.swaps] == [Direction.OUT]
    finish_swaps(p, offload)
    second = Request("t2", "c", [*first.tokens, 7, 8, 9, 10, 11], 4, conversation_id="conv")
    p.add(second)
    asking = p.plan()  # commits the offload, then asks for the prefix
    assert [type(op).__name__ for op in asking.host_ops] == ["Commit", "Pin"]
    assert not asking.swaps and not asking.batch
    plan = p.plan()
    (swap_in,) = plan.swaps
    assert swap_in.direction is Direction.IN and not plan.batch
    assert p.stats.prefix_hit_tokens == 24  # 25 history tokens hold KV; 6 full blocks
    finish_swaps(p, plan)
    plan = p.plan()
    (seq,) = plan.batch
    assert seq.start == 24 and len(seq.token_ids) == len(second.prompt) - 24


@dataclass(frozen=True)
class JitteryCost(UnitCost):
    """Swap durations vary with the swap id, so completions interleave unpredictably."""

    seed: int = 0

    def swap_seconds(self, order: SwapOrder) -> float:
        jitter = random.Random(self.seed * 7919 + order.swap_id).uniform(0.1, 20)
        return super().swap_seconds(order) * jitter


def run_workload(mode: Mode, *, seed: int, device_blocks: int, n_requests: int,
                 update_every: int, policy=None, preemption: PreemptionPolicy | None = None,
                 lookahead: bool = True) -> tuple[dict[str, list[int]], Planner]:
    p = make_planner(mode, device_blocks=device_blocks, policy=policy or PriorityPolicy(),
                     host_blocks=4096, budget=48, preemption=preemption)
    executor = CheckedExecutor(BS, device_blocks, 4096, vocab=100)
    rng = random.Random(seed)
    driver = VirtualDriver(p.planner, JitteryCost(seed=seed), p.host, executor=executor,
                           host_costs=HostCosts(round_trip_s=0.002 * (seed % 3)),
                           priority_updates=RandomPriorityUpdates(every=update_every, seed=seed),
                           lookahead=lookahead)
    for i in range(n_requests):
        conv = f"conv{i % 3}" if i % 2 else None
        driver.submit(rng.uniform(0, 0.01),
                      req(f"r{i}", rng.randint(1, 30), rng.randint(1, 25), conv=conv,
                          client=f"c{i % 3}", seed=seed))
    report = driver.run(max_iterations=20_000)
    return {r.request_id: r.output for r in report.finished}, p


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(list(Mode)),
       policy=st.sampled_from([PriorityPolicy, VirtualTokenCounter, FCFS]),
       preemption=st.sampled_from(sorted(PREEMPTION_POLICIES)))
def test_random_workloads_are_exact_and_leak_nothing(
    seed: int, mode: Mode, policy, preemption: str
) -> None:
    tight, planner = run_workload(mode, seed=seed, device_blocks=14, n_requests=8,
                                  update_every=3, policy=policy(),
                                  preemption=PREEMPTION_POLICIES[preemption]())
    roomy, _ = run_workload(mode, seed=seed, device_blocks=512, n_requests=8,
                            update_every=10_000, policy=policy(), lookahead=False)
    assert tight == roomy  # bit-identical with and without preemption and lookahead
    assert len(tight) == 8
    metrics = planner.memory.allocator.metrics()
    assert (metrics.used, metrics.draining) == (planner.memory.cached_blocks, 0)
    planner.memory.evict(DEVICE_ALL)
    assert planner.memory.allocator.metrics().used == 0
    assert planner.host.stats().pinned == 0
    assert not planner.transfers.kv and not len(planner.memory.swaps) and not planner.has_work()


def test_tight_memory_really_preempts() -> None:
    outputs = {}
    for mode in SWAP_MODES:
        outputs[mode], planner = run_workload(mode, seed=3, device_blocks=14, n_requests=8,
                                              update_every=3)
        assert planner.stats.preempted_by_swap > 0
    assert outputs[Mode.FASTSWITCH] == outputs[Mode.BASELINE]


def test_stop_finishes_a_decoding_request_early() -> None:
    p = make_planner(Mode.FASTSWITCH)
    p.add(req("a", 6, 20, conv="c"))
    run_step(p, p.plan())  # asks the host for the conversation's prefix
    run_step(p, p.plan())
    assert p.stop("a") and not p.stop("a")
    assert "a" not in p.requests and p.stats.finished == 1


@pytest.mark.parametrize("mode", SWAP_MODES)
def test_reset_device_fails_device_requests_and_keeps_the_rest(mode: Mode) -> None:
    p = make_planner(mode, device_blocks=8)
    p.add(req("a", 12, 18, priority=0))
    p.add(req("b", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("c", 12, 18, priority=5))
    p.add(req("w", 12, 18, priority=-5))
    p.plan()  # a swaps out (in flight), b runs, c waits for a's blocks, w waits
    failed = p.reset_device()
    assert {r.request_id for r in failed} == {"a", "b"}
    assert all(r.state is RequestState.FAILED for r in failed)
    assert set(p.requests) == {"c", "w"} and len(p.memory.swaps) == 0
    assert p.memory.allocator.metrics().used == 0 and p.host.stats().pinned == 0
    while p.requests:  # the survivors run on the fresh device
        plan = p.plan()
        run_step(p, plan)
        finish_swaps(p, plan)


def test_a_request_that_can_never_fit_is_refused() -> None:
    p = make_planner(Mode.FASTSWITCH, device_blocks=8)
    with pytest.raises(ValueError, match="needs 9 KV blocks"):
        p.add(req("big", 30, 6))
    assert not p.requests


def test_a_waiting_turn_asks_the_host_once_and_waits_for_the_answer() -> None:
    p = make_planner(Mode.FASTSWITCH, device_blocks=8)
    p.add(req("a", 28, 4, priority=5))  # fills the device
    p.add(req("w", 12, 4, priority=0, conv="w-conv"))
    asked = []
    for _ in range(3):
        plan = p.plan()
        asked += [op for op in plan.host_ops if isinstance(op, Pin)]
        run_step(p, plan)
    assert not asked  # no room for it yet: nothing pinned on its behalf
    while "w" in p.requests:
        plan = p.plan()
        asked += [op for op in plan.host_ops if isinstance(op, Pin) and op.conv == "w-conv"]
        assert not any(s.request_id == "w" for s in plan.batch) or asked
        run_step(p, plan)
        finish_swaps(p, plan)
    assert len(asked) == 1


def test_a_plan_never_runs_a_turn_before_the_host_answered() -> None:
    planner = Planner(SchedulerConfig(block_size=BS, num_device_blocks=16), PriorityPolicy(),
                      "test")
    planner.add(req("t", 8, 2, conv="conv"))
    first = planner.plan()
    (pin,) = first.host_ops
    assert isinstance(pin, Pin) and not first.batch
    assert not planner.plan().batch  # still waiting for the reply
    planner.host_replied([Pinned(pin.op_id, MISS, PinHandle(NO_PIN, ()))])
    (seq,) = planner.plan().batch
    assert seq.start == 0 and len(seq.token_ids) == 8


def test_without_turn_offload_a_finished_turn_leaves_nothing_on_the_host() -> None:
    config = SchedulerConfig(mode=Mode.FASTSWITCH, block_size=BS, num_device_blocks=16,
                             switches=Switches().with_spec("-turn_offload,-eager_offload"))
    host = ReuseIndex(fingerprint="t", block_size=BS, num_blocks=64)
    p = Answered(Planner(config, PriorityPolicy(), host.fingerprint), host)
    p.add(req("t1", 20, 6, conv="conv"))
    while p.has_work():
        plan = p.plan()
        assert not plan.swaps
        run_step(p, plan)
    assert p.host.stats().used == 0
    assert p.memory.allocator.metrics().used == p.memory.cached_blocks > 0  # the cache keeps it
