"""The scheduler's driver (`Engine`) in-process: the real planner and policies, a fake
executor whose sampled token is a pure function of the sequence's tokens, and an embedded
store behind a host tier whose replies the test can hold back."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from benchmarks.sim.checked_executor import next_token
from common.kv.host_ops import HostOp, HostReply
from common.kv.reuse_index import ReuseIndex
from common.refusal import refusal_metadata
from common.tokenizer import ByteTokenizer
from protos import executor_pb2 as ex
from services.scheduler.core.config import Mode, SchedulerConfig
from services.scheduler.core.lifecycle import UNADMITTED
from services.scheduler.core.plan import StepPlan
from services.scheduler.core.planner import Planner
from services.scheduler.core.policy import PriorityPolicy
from services.scheduler.core.request import Request, RequestState
from services.scheduler.engine import Engine, EngineLimits
from services.scheduler.local_host import LocalHost
from services.scheduler.step_log import StepLog, read_step_log
from services.scheduler.token_stream import Failed, Finished, TokenEvent, TokenStream

BS = 4
VOCAB = 256  # byte tokens: no EOS is ever sampled
FINGERPRINT = "engine-test"
ARENA = "arena-0"
DEVICE, HOST, EMPTY = "device", "host", -1


def rpc_error(code: grpc.StatusCode, details: str, refused: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(),
                                grpc.aio.Metadata(*refusal_metadata(refused)), details)


class SwapEventCall:
    """The SwapEvents stream: subscribed at once; yields what the executor pushes."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[ex.SwapEvent] = asyncio.Queue()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def __aiter__(self) -> AsyncIterator[ex.SwapEvent]:
        while True:
            yield await self.events.get()


@dataclass
class FakeExecutor:
    """Answers the engine's calls, checking that each step's KV is its sequence's prefix
    (as benchmarks/sim/checked_executor.py does); copies move block contents when they
    complete. Swaps complete at once unless `hold` names their direction; then
    `complete_swaps` sends their events. `fail_step` makes the next Step whose batch
    holds one of its request ids raise the error."""

    hold: tuple[int, ...] = ()  # the directions whose swaps wait for `complete_swaps`
    # Each device or host block holds the tokens whose KV it would hold.
    slots: defaultdict[tuple[str, int], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [EMPTY] * BS))
    steps: list[ex.StepRequest] = field(default_factory=list)
    held: list[ex.SwapOrder] = field(default_factory=list)
    fail_step: dict[str, grpc.aio.AioRpcError] = field(default_factory=dict)
    attached: list[str] = field(default_factory=list)
    call: SwapEventCall = field(default_factory=SwapEventCall)
    last_sampled: dict[str, int] = field(default_factory=dict)  # by the step before
    step_delay_s: float = 0.0  # how long a step runs
    refuse_swaps: grpc.aio.AioRpcError | None = None  # raised by the next SubmitSwaps

    async def Step(self, request: ex.StepRequest) -> ex.StepResponse:
        await asyncio.sleep(self.step_delay_s)  # a call suspends its caller, as a real one does
        for seq in request.sequences:
            if seq.request_id in self.fail_step:
                raise self.fail_step.pop(seq.request_id)
        self.steps.append(request)
        response = ex.StepResponse(duration_s=1e-3 * len(self.steps))  # distinct per step
        last, self.last_sampled = self.last_sampled, {}
        for seq in request.sequences:
            table = list(seq.block_table)
            fed = [self.slots[DEVICE, table[p // BS]][p % BS] for p in range(seq.start)]
            assert EMPTY not in fed, f"{seq.request_id}: its KV before {seq.start} is missing"
            fed += [last[seq.request_id]] if seq.from_last_step else seq.token_ids
            for p in range(seq.start, len(fed)):
                self.slots[DEVICE, table[p // BS]][p % BS] = fed[p]
            if seq.sample:
                token = self.last_sampled[seq.request_id] = next_token(fed, VOCAB)
                response.tokens.add(request_id=seq.request_id, token_id=token)
        return response

    async def SubmitSwaps(self, request: ex.SubmitSwapsRequest) -> ex.SubmitSwapsResponse:
        if self.refuse_swaps is not None:
            error, self.refuse_swaps = self.refuse_swaps, None
            raise error
        self.held += request.swaps
        for order in request.swaps:
            if order.direction not in self.hold:
                self.complete_swaps(order.swap_id)
        return ex.SubmitSwapsResponse(tickets=[s.swap_id for s in request.swaps])

    def complete_swaps(self, swap_id: int | None = None) -> None:
        done = [s for s in self.held if swap_id in (None, s.swap_id)]
        for order in done:
            self.held.remove(order)
            src, dst = (DEVICE, HOST) if order.direction == ex.DIRECTION_OUT else (HOST, DEVICE)
            for copy in order.copies:
                for i in range(copy.src.length):
                    self.slots[dst, copy.dst.start + i] = list(self.slots[src, copy.src.start + i])
            self.call.events.put_nowait(ex.SwapEvent(
                ticket=order.swap_id, request_id=order.request_id, direction=order.direction,
                bytes=sum(c.src.length for c in order.copies)))

    def SwapEvents(self, request: ex.SwapEventsRequest) -> SwapEventCall:
        self.call = SwapEventCall()
        return self.call

    async def Describe(self, request: ex.DescribeRequest, timeout: float | None = None
                       ) -> ex.DescribeResponse:
        return ex.DescribeResponse(model_fingerprint=FINGERPRINT, host_arenas=self.attached)

    async def AttachHostArena(self, request: ex.AttachHostArenaRequest,
                              timeout: float | None = None) -> ex.AttachHostArenaResponse:
        self.attached.append(request.name)
        return ex.AttachHostArenaResponse(num_host_blocks=256, first_host_block=0)


class HeldHost(LocalHost):
    """`LocalHost` that records each `execute` and, while `gate` is clear, answers none."""

    def __init__(self) -> None:
        super().__init__(ReuseIndex(fingerprint=FINGERPRINT, block_size=BS, num_blocks=256),
                         ARENA)
        self.calls: list[tuple[HostOp, ...]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()  # set while a call waits at the gate
        self.delay_s = 0.0  # how long each reply takes

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        self.calls.append(tuple(ops))
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
            self.waiting.clear()
        await asyncio.sleep(self.delay_s)
        return await super().execute(ops)


@dataclass
class Rig:
    engine: Engine
    executor: FakeExecutor
    host: HeldHost
    plans: list[StepPlan]
    health: list[bool]
    healthy: asyncio.Event


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    config = SchedulerConfig(mode=Mode.FASTSWITCH, block_size=BS, num_device_blocks=32,
                             max_num_seqs=8, max_batched_tokens=64,
                             switches=Mode.FASTSWITCH.switches.with_spec("-device_cache"))
    planner = Planner(config, PriorityPolicy(), FINGERPRINT)
    plans: list[StepPlan] = []
    plan = planner.plan

    def recorded() -> StepPlan:
        plans.append(plan())
        return plans[-1]

    planner.plan = recorded  # type: ignore[method-assign]
    health: list[bool] = []
    healthy = asyncio.Event()

    async def on_health(ok: bool) -> None:
        health.append(ok)
        if ok:
            healthy.set()

    executor, host = FakeExecutor(), HeldHost()
    engine = Engine(planner, executor, host, tokenizer=ByteTokenizer(),  # type: ignore[arg-type]
                    limits=EngineLimits(max_model_len=256, probe_s=3600),
                    on_health=on_health)
    await engine.start()
    yield Rig(engine, executor, host, plans, health, healthy)
    await engine.close(grace_s=1)


def make(rid: str, n: int = 10, max_tokens: int = 5, *, conv: str | None = None,
         prompt: list[int] | None = None, history: int | None = None) -> Request:
    return Request(rid, "client", prompt or [(7 * i + len(rid)) % VOCAB for i in range(n)],
                   max_tokens, conversation_id=conv, history_tokens=history)


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, VOCAB))
    return tokens[len(prompt):]


async def collect(stream: TokenStream) -> tuple[list[int], Finished | Failed]:
    tokens: list[int] = []
    async for item in stream:
        if isinstance(item, TokenEvent):
            tokens.append(item.token_id)
        else:
            return tokens, item
    raise AssertionError("stream ended without a final event")


async def submit(rig: Rig, request: Request) -> TokenStream:
    return await rig.engine.submit(request, ex.SamplingParams())


async def test_a_request_streams_every_token_and_finishes(rig: Rig) -> None:
    request = make("r1", n=10, max_tokens=6)
    tokens, final = await collect(await submit(rig, request))
    assert tokens == expected(request.prompt, 6)
    assert isinstance(final, Finished)
    assert (final.finish_reason, final.prompt_tokens, final.completion_tokens) == ("length", 10, 6)
    assert not rig.engine.planner.requests


async def test_the_steps_of_inverted_plans_are_counted_and_timed(rig: Rig) -> None:
    """The core marks a plan inverted (`core.inversion`); the engine counts and times the
    steps that ran it. Here every other plan is marked."""
    plan, marked = rig.engine.planner.plan, []

    def every_other() -> StepPlan:
        p = plan()
        marked.append(bool(p.batch) and p.iteration % 2 == 0)
        return replace(p, inverted=marked[-1])

    rig.engine.planner.plan = every_other  # type: ignore[method-assign]
    await collect(await submit(rig, make("r1", n=10, max_tokens=6)))
    assert rig.engine.inversions == sum(marked) >= 2
    assert rig.engine.inversion_s > 0


async def test_the_step_log_has_every_completed_step_its_batch_and_executor_time(
    rig: Rig, tmp_path: Path
) -> None:
    log = StepLog(tmp_path / "steps.jsonl")
    rig.engine.on_step = log.record
    await collect(await submit(rig, make("r1", n=40, max_tokens=4)))
    await collect(await submit(rig, make("r2", n=9, max_tokens=3)))
    log.close()
    logged = read_step_log(tmp_path / "steps.jsonl")
    # The executor knows a step by its iteration plus the scheduler's random base.
    base = rig.executor.steps[0].iteration - logged[0].iteration
    assert [(s.iteration + base, s.batch) for s in logged] == [
        (step.iteration, tuple((seq.start, len(seq.token_ids) or 1) for seq in step.sequences))
        for step in rig.executor.steps
    ]
    assert [s.duration_s for s in logged] == pytest.approx(
        [1e-3 * (i + 1) for i in range(len(logged))])


async def test_a_step_sent_while_one_is_in_flight_names_it_as_the_one_it_follows(
        rig: Rig) -> None:
    """With lookahead a step goes out before the one before it is back; the executor begins
    them in the order sent only if each names the one it follows."""
    await collect(await submit(rig, make("r1", n=10, max_tokens=8)))
    steps = rig.executor.steps
    followers = [(before, step) for before, step in itertools.pairwise(steps)
                 if step.HasField("follows")]
    assert followers and all(step.follows == before.iteration for before, step in followers)
    assert not steps[0].HasField("follows")
    assert all(s.HasField("follows") for s in steps if any(q.from_last_step
                                                              for q in s.sequences))


async def test_each_plans_host_ops_reach_the_tier_in_order_in_one_call(rig: Rig) -> None:
    first = make("t1", n=12, max_tokens=4, conv="conv")
    tokens, _ = await collect(await submit(rig, first))
    history = first.prompt + tokens
    second = make("t2", conv="conv", prompt=[*history, 1, 2, 3], max_tokens=4, history=len(history))
    _, final = await collect(await submit(rig, second))
    await rig.engine.close(grace_s=1)  # the last plans' operations land too
    assert isinstance(final, Finished) and final.reused_tokens > 0
    with_ops = [plan.host_ops for plan in rig.plans if plan.host_ops]
    assert len(with_ops) > 2
    assert rig.host.calls == with_ops


async def test_a_late_host_reply_holds_only_its_own_request(rig: Rig) -> None:
    first = make("t1", n=12, max_tokens=4, conv="conv")
    tokens, _ = await collect(await submit(rig, first))
    history = first.prompt + tokens
    rig.host.gate.clear()
    second = await submit(rig, make("t2", conv="conv", prompt=[*history, 5], max_tokens=3,
                                    history=len(history)))
    await rig.host.waiting.wait()  # its Pin is at the store, unanswered
    other = make("other", n=9, max_tokens=5)
    tokens, final = await collect(await submit(rig, other))
    assert tokens == expected(other.prompt, 5) and isinstance(final, Finished)
    assert rig.engine.planner.requests["t2"].state in UNADMITTED  # asking, or held back
    assert all(s.request_id != "t2" for step in rig.executor.steps for s in step.sequences)
    rig.host.gate.set()
    _, final = await collect(second)
    assert isinstance(final, Finished) and final.completion_tokens == 3


async def test_a_swapped_in_request_runs_once_its_swap_completes(rig: Rig) -> None:
    first = make("t1", n=12, max_tokens=4, conv="conv")
    tokens, _ = await collect(await submit(rig, first))
    history = first.prompt + tokens
    rig.executor.hold = (ex.DIRECTION_IN,)
    second = await submit(rig, make("t2", conv="conv", prompt=[*history, 9], max_tokens=3,
                                    history=len(history)))
    while not any(s.direction == ex.DIRECTION_IN for s in rig.executor.held):
        await asyncio.sleep(0)
    other = make("other", n=9, max_tokens=5)  # steps run while the copy is in flight
    tokens, final = await collect(await submit(rig, other))
    assert tokens == expected(other.prompt, 5) and isinstance(final, Finished)
    assert rig.engine.planner.requests["t2"].state is RequestState.SWAPPING_IN
    assert all(s.request_id != "t2" for step in rig.executor.steps for s in step.sequences)
    rig.executor.complete_swaps()
    tokens, final = await collect(second)
    assert isinstance(final, Finished) and final.reused_tokens > 0
    assert tokens == expected([*history, 9], 3)


async def test_an_unavailable_executor_fails_requests_until_it_reconnects(rig: Rig) -> None:
    rig.executor.fail_step["a"] = rpc_error(grpc.StatusCode.UNAVAILABLE, "executor gone")
    _, final = await collect(await submit(rig, make("a")))
    assert isinstance(final, Failed) and final.code is grpc.StatusCode.UNAVAILABLE
    await rig.healthy.wait()
    assert rig.health == [False, True]
    assert rig.executor.attached == [ARENA]  # re-attached on reconnect
    tokens, final = await collect(await submit(rig, make("b")))
    assert isinstance(final, Finished) and tokens == expected(make("b").prompt, 5)


async def test_a_refused_step_fails_only_the_named_request(rig: Rig) -> None:
    rig.executor.fail_step["bad"] = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad tokens",
                                              refused="bad")
    bad, good = make("bad"), make("good", n=11)
    streams = [await submit(rig, bad), await submit(rig, good)]
    (_, failed), (tokens, finished) = [await collect(s) for s in streams]
    assert isinstance(failed, Failed) and failed.code is grpc.StatusCode.INTERNAL
    assert isinstance(finished, Finished) and tokens == expected(good.prompt, 5)
    assert rig.health == [] and rig.engine.executor_ok


async def test_close_lets_swaps_and_host_ops_land(rig: Rig) -> None:
    rig.executor.hold = (ex.DIRECTION_OUT, ex.DIRECTION_IN)
    stream = await submit(rig, make("t1", n=24, max_tokens=40, conv="conv"))
    while not rig.executor.held:
        await asyncio.sleep(0)
    closing = asyncio.create_task(rig.engine.close(grace_s=5))
    _, final = await collect(stream)
    assert isinstance(final, Failed) and final.code is grpc.StatusCode.UNAVAILABLE
    assert not closing.done()  # waits for the swap in flight
    rig.host.delay_s = 0.1  # a remote store: close must wait for its replies
    rig.executor.hold = ()
    rig.executor.complete_swaps()
    await closing
    assert not rig.engine.planner.has_work()
    assert rig.host.calls == [plan.host_ops for plan in rig.plans if plan.host_ops]
    assert rig.host.index.stats().pinned == 0 and not rig.host.index._pending


async def test_a_refused_swap_in_recomputes_and_the_loop_goes_on(rig: Rig) -> None:
    first = make("t1", n=12, max_tokens=4, conv="conv")
    tokens, _ = await collect(await submit(rig, first))
    history = first.prompt + tokens
    rig.executor.refuse_swaps = rpc_error(grpc.StatusCode.FAILED_PRECONDITION,
                                          "clash with a copy in flight", refused="t2")
    second = make("t2", conv="conv", prompt=[*history, 9], max_tokens=3, history=len(history))
    tokens, final = await asyncio.wait_for(collect(await submit(rig, second)), 10)
    assert tokens == expected([*history, 9], 3) and isinstance(final, Finished)
    assert rig.executor.refuse_swaps is None  # it was refused once, then recomputed


async def test_a_discarded_rows_token_never_reaches_a_request_that_reuses_its_id(
    rig: Rig,
) -> None:
    rig.executor.step_delay_s = 0.02  # the next step is in flight when one finishes
    prompt = [(7 * i + 3) % VOCAB for i in range(10)]
    stop = expected(prompt, 8)[2]
    first = Request("same-id", "client", prompt, 8, stop_token_ids=frozenset({stop}))
    tokens, final = await collect(await submit(rig, first))
    assert isinstance(final, Finished) and tokens[-1] == stop
    reused = Request("same-id", "client", [(5 * i + 1) % VOCAB for i in range(9)], 4)
    tokens, final = await collect(await submit(rig, reused))
    assert tokens == expected(reused.prompt, 4)
    assert isinstance(final, Finished) and final.completion_tokens == 4
    assert rig.engine.planner.stats.wasted_tokens >= 1


async def test_a_cancel_counts_only_the_tokens_it_streamed(rig: Rig) -> None:
    rig.executor.step_delay_s = 0.01
    stream = await submit(rig, make("r1", n=10, max_tokens=50))
    streamed = 0
    async for item in stream:
        if isinstance(item, TokenEvent):
            streamed += 1
            if streamed == 5:
                await rig.engine.cancel("r1")
        else:
            assert isinstance(item, Finished) and item.completion_tokens == streamed
            break
