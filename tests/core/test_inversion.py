"""Priority inversion, as the planner marks it on each plan (`core.inversion`)."""

from __future__ import annotations

import pytest

from services.scheduler.core.config import Mode
from services.scheduler.core.inversion import inverted
from services.scheduler.core.request import RequestState
from tests.core.test_planner import make_planner, req, run_step


def _at(state: RequestState, rid: str, priority: int):
    r = req(rid, 4, 4, priority=priority)
    r.state = state
    return r


@pytest.mark.parametrize(("queued", "state", "expected"), [
    (2, RequestState.WAITING, True),
    (2, RequestState.SWAPPED, True),
    (2, RequestState.SWAPPING_OUT, False),  # moving to the host: neither waits nor runs
    (1, RequestState.WAITING, False),  # equal priority is no inversion
])
def test_a_step_is_inverted_when_a_strictly_higher_priority_request_waits(
        queued: int, state: RequestState, expected: bool) -> None:
    live = [_at(RequestState.RUNNING, "run", 1), _at(RequestState.RUNNING, "idle", 0),
            _at(state, "wait", queued)]
    assert inverted(live, {"run"}) is expected
    assert inverted(live, set()) is False  # nothing ran


def inverted_plans(mode: Mode) -> list[bool]:
    """A higher-priority request arrives while two lower ones run and the device is full:
    each plan's mark, until all finish."""
    p = make_planner(mode, device_blocks=8)
    p.add(req("low", 12, 18, priority=0))
    p.add(req("mid", 12, 18, priority=1))
    run_step(p, p.plan())
    p.add(req("high", 12, 18, priority=5))
    marks = []
    while p.requests:
        plan = p.plan()
        marks.append(plan.inverted)
        for order in plan.swaps:
            p.swap_done(order.swap_id)
        run_step(p, plan)
    return marks


def test_plans_stay_inverted_longer_where_the_mode_never_preempts_for_priority() -> None:
    fastswitch, vllm = inverted_plans(Mode.FASTSWITCH), inverted_plans(Mode.VLLM_V1)
    # fastswitch preempts at once; the arrival waits only for the swap-out to free blocks
    assert fastswitch[0] and sorted(fastswitch, reverse=True) == fastswitch
    # vLLM v1 lets it wait until a running request cannot grow (vllm#40004)
    assert sum(vllm) > sum(fastswitch)
