"""The planner against a host that answers late, out of step with copies, or not at all:
no interleaving leaks a device block, a host pin or a reservation, or serves stale KV (the
token-checking executor verifies every step's KV against the tokens)."""

from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import fields

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from benchmarks.sim.checked_executor import CheckedExecutor, next_token
from common.kv.host_ops import MISS, NO_PIN, HostReply, Pinned, Reserved, apply
from common.kv.reuse_index import PinHandle, ReuseIndex
from services.scheduler.core.config import Mode, SchedulerConfig, Switches
from services.scheduler.core.plan import SwapOrder
from services.scheduler.core.planner import Planner, PlannerStats
from services.scheduler.core.policy import PriorityPolicy
from services.scheduler.core.preemption import PREEMPTION_POLICIES
from services.scheduler.core.request import Request

BS, DEVICE, HOST = 4, 14, 40
# Examples per property run; FASTSWITCH_PROPERTY_EXAMPLES=2000 for a thorough pass.
EXAMPLES = int(os.environ.get("FASTSWITCH_PROPERTY_EXAMPLES", "60"))
PREEMPTIONS = st.sampled_from(sorted(PREEMPTION_POLICIES))  # a new policy is run too


def _faulty(host: ReuseIndex, replies: list[HostReply], rng: random.Random) -> list[HostReply]:
    """Some answers are lost: the store undoes what it did for them (as a lease expiry
    would), and the planner hears the failure."""
    out: list[HostReply] = []
    for reply in replies:
        if rng.random() >= 0.2:
            out.append(reply)
            continue
        if isinstance(reply, Reserved) and reply.reservation is not None:
            host.abort(reply.reservation.reservation_id)
        elif isinstance(reply, Pinned):
            host.unpin(reply.pin.pin_id)
        lost = Reserved(reply.op_id, None) if isinstance(reply, Reserved) else \
            Pinned(reply.op_id, MISS, PinHandle(NO_PIN, ()))
        out.append(lost)
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 100_000), mode=st.sampled_from(list(Mode)),
       faults=st.booleans(), preemption=PREEMPTIONS, lookahead=st.booleans())
# Cancelled while swapping out, its preemption copy done and a store copy still in flight:
# the store's end must finish the cancel.
@example(seed=13180, mode=Mode.FASTSWITCH, faults=True, preemption="on-order-change",
         lookahead=False)
def test_late_lost_and_reordered_replies_leak_nothing(
    seed: int, mode: Mode, faults: bool, preemption: str, lookahead: bool
) -> None:
    run(seed, mode, faults, preemption=preemption, lookahead=lookahead)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), flips=st.sets(st.sampled_from(
    [f.name for f in fields(Switches)])), preemption=PREEMPTIONS)
def test_every_combination_of_switches_leaks_nothing(
    seed: int, flips: set[str], preemption: str
) -> None:
    on = Switches()
    try:
        switches = on.with_spec(",".join(("-" if getattr(on, f) else "+") + f for f in flips))
    except ValueError:
        return  # not a valid combination (offload without reuse)
    run(seed, Mode.FASTSWITCH, seed % 2 == 1, switches, preemption=preemption)


@pytest.mark.parametrize("preemption", sorted(PREEMPTION_POLICIES))
def test_such_runs_really_preempt_recompute_and_reuse(preemption: str) -> None:
    stats = [run(seed, mode, faults, preemption=preemption) for seed in range(6)
             for mode in Mode for faults in (False, True)]
    assert sum(s.preempted_by_swap for s in stats) > 0
    assert sum(s.preempted_by_recompute for s in stats) > 0
    assert sum(s.reuse_saved_blocks + s.prefix_hit_tokens for s in stats) > 0


def run(seed: int, mode: Mode, faults: bool, switches: Switches | None = None, *,
        preemption: str = "on-order-change", lookahead: bool = False) -> PlannerStats:
    """One random run to its end, under the named preemption policy; checks that nothing
    is left and that every finished request got its own tokens, and returns its stats.
    With `lookahead` the next step is mostly planned before the last one completes, as the
    real driver does."""
    rng = random.Random(seed)
    config = SchedulerConfig(mode=mode, block_size=BS, num_device_blocks=DEVICE,
                             max_num_seqs=6, max_batched_tokens=24, switches=switches)
    host = ReuseIndex(fingerprint="fp", block_size=BS, num_blocks=HOST)
    planner = Planner(config, PriorityPolicy(), host.fingerprint,
                      PREEMPTION_POLICIES[preemption]())
    executor = CheckedExecutor(BS, DEVICE, HOST, vocab=50)
    replies: deque[list[HostReply]] = deque()
    copies: list[SwapOrder] = []
    outputs: dict[str, list[int]] = {}
    running: deque[dict[str, int]] = deque()  # steps in flight, oldest first
    pending = [
        Request(f"r{i}", "c", [rng.randrange(50) for _ in range(rng.randint(1, 20))],
                rng.randint(1, 12), conversation_id=f"conv{i % 3}" if i % 2 else None,
                priority=rng.randrange(4))
        for i in range(8)
    ]
    prompts = {r.request_id: list(r.prompt) for r in pending}

    def deliver_some() -> None:
        for _ in range(rng.randint(0, len(replies))):
            planner.host_replied(replies.popleft())

    def finish_some(every: bool = False) -> None:
        for order in [o for o in copies if every or rng.random() < 0.5]:
            copies.remove(order)
            ok = not faults or rng.random() >= 0.1
            if ok:
                executor.finish_swap(order)
            else:
                executor.drop_swap(order)
            planner.swap_done(order.swap_id, ok=ok)

    def complete_steps(keep: int) -> None:
        while len(running) > keep:
            executor.finish_step()
            if faults and rng.random() < 0.03:  # refused: it, and those after it, undone
                for _ in range(len(running) - 1):
                    executor.finish_step()
                running.clear()
                planner.steps_refused()
                return
            for r in planner.complete_step(running.popleft()):
                outputs[r.request_id] = r.output

    for _ in range(3000):
        if pending and rng.random() < 0.3:
            planner.add(pending.pop())
        if not (planner.has_work() or pending or replies or copies):
            break
        if rng.random() < 0.1:
            planner.set_priority(rng.randrange(6), request_id=f"r{rng.randrange(8)}")
        if faults and planner.requests and rng.random() < 0.03:
            planner.cancel(rng.choice(list(planner.requests)))
        plan = planner.plan()
        answered = apply(host, plan.host_ops)
        if answered:
            replies.append(_faulty(host, answered, rng) if faults else answered)
        copies.extend(plan.swaps)
        for order in plan.swaps:
            executor.start_swap(order)
        if plan.barrier:
            complete_steps(keep=0)
            deliver_some()
            finish_some(every=True)
            plan = planner.runnable(plan)
        if plan.batch:
            truth = {s.request_id: planner.requests[s.request_id].tokens for s in plan.batch}
            running.append(executor.step(plan.batch, truth))
        # With lookahead, mostly: the step before completes once this one is sent.
        complete_steps(keep=1 if lookahead and rng.random() < 0.8 else 0)
        deliver_some()
        finish_some()
    else:
        raise AssertionError("the run did not end")

    for request_id, output in outputs.items():  # greedy: a pure function of the prompt
        tokens = list(prompts[request_id])
        for _ in output:
            tokens.append(next_token(tokens, 50))
        assert output == tokens[len(prompts[request_id]):], request_id
    assert not pending and not planner.requests and not planner.has_work()
    if not faults:
        assert len(outputs) == 8
    metrics = planner.memory.allocator.metrics()
    assert (metrics.used, metrics.draining) == (planner.memory.cached_blocks, 0)
    planner.memory.evict(DEVICE)
    assert planner.memory.allocator.metrics().used == 0
    stats = host.stats()
    assert stats.pinned == 0 and not host._pending
    assert not planner.transfers.kv
    return planner.stats
