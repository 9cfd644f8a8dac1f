"""vLLM v1 as shipped: preemption only when a running request cannot grow, prompt-only
offload, and a wait for a preempted request's stores."""

from __future__ import annotations

from services.scheduler.core.config import Mode
from services.scheduler.core.plan import PreemptBy
from services.scheduler.core.preemption import OnAllocationFailure
from services.scheduler.core.request import RequestState
from tests.core.test_planner import make_planner, req, run_step, state


def test_a_higher_priority_arrival_waits_instead_of_preempting() -> None:
    p = make_planner(Mode.VLLM_V1, device_blocks=8)
    assert isinstance(p.planner._preemption, OnAllocationFailure)
    p.add(req("low", 12, 18, priority=0))
    p.add(req("mid", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("high", 12, 18, priority=5))
    plan = p.plan()
    assert not plan.preemptions
    assert state(p, "high") in {RequestState.WAITING, RequestState.QUEUED}
    assert state(p, "low") is state(p, "mid") is RequestState.RUNNING


def test_growth_that_does_not_fit_preempts_the_lowest_priority_by_recompute() -> None:
    p = make_planner(Mode.VLLM_V1, device_blocks=12)
    p.add(req("low", 16, 20, priority=0))
    p.add(req("high", 16, 20, priority=5))
    preempted = []
    for _ in range(40):
        plan = p.plan()
        preempted += [(x.request_id, x.by) for x in plan.preemptions]
        run_step(p, plan)
        if preempted:
            break
    assert preempted == [("low", PreemptBy.RECOMPUTE)]


def stored_blocks(mode: Mode) -> int:
    p = make_planner(mode, device_blocks=16)
    p.add(req("a", 20, 40, conv="c"))
    while p.requests:
        plan = p.plan()
        for order in plan.swaps:
            p.swap_done(order.swap_id)
        run_step(p, plan)
    return p.stats.blocks_stored


def test_prompt_only_offload_stores_the_prompt_and_offload_all_the_decode_too() -> None:
    assert stored_blocks(Mode.VLLM_V1) == 5  # its 20-token prompt: 5 blocks of 4
    assert stored_blocks(Mode.VLLM_V1_OFFLOAD_ALL) > 5
