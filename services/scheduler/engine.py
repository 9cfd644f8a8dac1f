"""The scheduler's asyncio driver: the iteration loop around the sans-IO planner.

Each iteration plans a step, hands its host operations to the host worker, starts its
swaps on the executor, runs its batch, and feeds the sampled tokens back. Swap completions
stream in on their own task, and host replies on the host worker's, which sends each
plan's operations in one batch per store, in plan order, and never holds up a step. The
planner makes no calls, so it runs on the event loop itself: no thread, no lock. In
fastswitch mode a step waits for nothing but its own batch; in baseline mode a plan's
barrier makes the step wait for every swap in flight.

Executor outages: a failed executor call, or a failed probe (`EngineLimits.probe_s`) while
idle, starts one. Requests on the device fail at once with UNAVAILABLE; new ones wait up to
`EngineLimits.outage_wait_s` for the executor and then get UNAVAILABLE, and so does every
request still held once the outage has lasted that long. `on_health(False)` is called when
an outage starts and `on_health(True)` once the executor is back with the arenas attached.
Only UNAVAILABLE, DEADLINE_EXCEEDED and an executor whose state is not the one assumed
(`common.refusal.executor_lost`) mean an outage: any other error is a refusal, which fails
the request it names (or, naming none, those of the refused call) with INTERNAL, and the
rest go on. Refused swaps count as failed copies (their requests recompute); a
FAILED_PRECONDITION on them (a detached arena, a clash with a copy in flight) fails no one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from common.kv.extent import Extent
from common.kv.host_ops import HostOp, unanswered
from common.latency import BusyTime, LatencyWindow, gaps
from common.refusal import executor_lost, refused_request
from common.tokenizer import IncrementalDetokenizer, Tokenizer
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from services.scheduler.core import admission
from services.scheduler.core.admission import QueueFull
from services.scheduler.core.lifecycle import RESIDENT
from services.scheduler.core.plan import Direction, StepPlan, SwapOrder
from services.scheduler.core.planner import Planner
from services.scheduler.core.request import Request
from services.scheduler.host_tier import HostTier
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.tenants import TenantUsage
from services.scheduler.token_stream import Finished, TokenStream

log = logging.getLogger("fastswitch.scheduler")


class AdmissionError(Exception):
    """A request the engine refuses; `code` is the gRPC status to answer with, `limit` the
    name of the limit that refused it (empty for other refusals)."""

    def __init__(self, code: grpc.StatusCode, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.limit = limit


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int
    lookahead: bool = True  # send step N+1 before step N's tokens are back
    outage_wait_s: float = 2.0  # how long a request waits for a lost executor
    probe_s: float = 1.0  # how often an idle engine checks that the executor answers


@dataclass
class _Tracked:
    stream: TokenStream
    request: Request
    sampling: ex.SamplingParams
    tenant: str  # whose limits and usage it counts towards (see tenants.py)
    bytes_swapped: int = 0
    timings: list[float] = field(default_factory=list)


# A step sent: its plan, its call, when it was sent, and whose each of its rows is.
SentStep = tuple[StepPlan, asyncio.Future[ex.StepResponse], float, dict[str, _Tracked | None]]


class Engine:
    def __init__(
        self,
        planner: Planner,
        executor: ex_grpc.ExecutorStub,
        host: HostTier,
        *,
        tokenizer: Tokenizer,
        limits: EngineLimits,
        metrics: SchedulerMetrics | None = None,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        on_step: Callable[[StepPlan, float], None] | None = None,
    ) -> None:
        """`on_step`: called with each completed step's plan and the executor's seconds
        on it (e.g. `StepLog.record`)."""
        self.planner = planner
        self.executor = executor
        self.host = host
        self.tokenizer = tokenizer
        self.limits = limits
        self._host_ops: asyncio.Queue[tuple[HostOp, ...]] = asyncio.Queue()
        self._tracked: dict[str, _Tracked] = {}
        self._swaps: dict[int, asyncio.Future[None]] = {}
        self._swap_started: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._events_ready = asyncio.Event()
        self.latency = LatencyWindow()
        self.swap_out_bytes = 0
        self.copies = 0
        self.step_overheads: deque[float] = deque(maxlen=10_000)
        self.steps = 0
        # Steps whose plan was inverted (`core.inversion`), and their time, as step_overheads
        # times a step: from when the executor could take it up until it came back.
        self.inversions = 0
        self.inversion_s = 0.0
        # Steps sent and not yet completed, oldest first: at most the running one and, with
        # lookahead, one queued behind it.
        self._steps_sent: deque[SentStep] = deque()
        # A step's id at the executor: its iteration plus a random base, so that a restarted
        # scheduler's steps never follow steps an earlier one sent (StepRequest.follows).
        self._step_id_base = secrets.randbits(62)
        self.executor_busy = BusyTime()
        self.executor_ok = True
        self._executor_back = asyncio.Event()
        self._executor_back.set()
        self._busy = asyncio.Lock()  # held by the loop's iterations and by a recovery
        self.on_health = on_health
        self.on_step = on_step
        self.metrics = metrics or SchedulerMetrics()
        self.usage = TenantUsage()
        self.accepting = True

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        await self._subscribe_swap_events()
        self._tasks.append(asyncio.create_task(self._host_worker(), name="host-worker"))
        self._tasks.append(asyncio.create_task(self._loop(), name="iteration-loop"))
        self._tasks.append(asyncio.create_task(self._probe_executor(), name="executor-probe"))

    async def _subscribe_swap_events(self) -> None:
        """(Re)starts the swap event stream and returns once the executor has subscribed
        it, so that no completion of a swap submitted afterwards can be missed."""
        for task in self._tasks:
            if task.get_name() == "swap-events":
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self._tasks.remove(task)
        self._events_ready.clear()
        self._tasks.append(asyncio.create_task(self._swap_events(), name="swap-events"))
        await self._events_ready.wait()

    async def drain(self, grace_s: float) -> bool:
        """Refuses new requests (UNAVAILABLE, which clients may retry elsewhere) and waits
        up to `grace_s` for those in flight to finish; True if they all did."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while self._tracked and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._tracked

    async def close(self, grace_s: float = 5.0) -> None:
        """Cancels what is still running, lets swaps in flight and the host operations
        that follow land (so the KV store is left with no pending reservation or pin),
        then stops."""
        await self._fail_all("scheduler shutting down")
        self._wake.set()
        deadline = time.monotonic() + grace_s
        while self.executor_ok and time.monotonic() < deadline:
            if self.planner.has_work():
                await asyncio.sleep(0.02)
                continue
            try:  # the last plans' host operations (aborts, unpins) must reach the store
                await asyncio.wait_for(self._host_ops.join(), deadline - time.monotonic())
            except TimeoutError:
                break
            if not self.planner.has_work():
                break
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- requests in -----------------------------------------------------------------

    async def submit(
        self, request: Request, sampling: ex.SamplingParams, stop: Sequence[str] = (), *,
        tenant: str = "", max_queued: int = 0,
    ) -> TokenStream:
        """Admits `request` for `tenant`, which may have at most `max_queued` requests
        queued (0: no cap); raises AdmissionError, having changed nothing, if it cannot."""
        await self._wait_for_executor()
        self._check_admissible(request, tenant, max_queued)
        stream = TokenStream(IncrementalDetokenizer(self.tokenizer), stop)
        tracked = _Tracked(stream, request, sampling, tenant, timings=[time.monotonic()])
        self._tracked[request.request_id] = tracked
        try:
            self.planner.add(request)
        except ValueError as e:  # checked above, so never QueueFull
            del self._tracked[request.request_id]
            raise AdmissionError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        self._wake.set()
        return stream

    def _check_admissible(self, request: Request, tenant: str, max_queued: int) -> None:
        if not self.accepting:
            raise AdmissionError(grpc.StatusCode.UNAVAILABLE, "scheduler is shutting down")
        if request.request_id in self._tracked:
            raise AdmissionError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {request.request_id!r} is in flight"
            )
        total = len(request.prompt) + request.max_tokens
        if len(request.prompt) >= self.limits.max_model_len or total > self.limits.max_model_len:
            raise AdmissionError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the model context of {self.limits.max_model_len} tokens",
            )
        self.check_capacity(tenant, max_queued)

    def check_capacity(self, tenant: str, max_queued: int) -> None:
        """Raises AdmissionError(RESOURCE_EXHAUSTED) if the queue, or `tenant`'s share of it
        (`max_queued`, 0: no cap), has no room for one more request."""
        try:
            admission.check_queue(self.planner.requests, self.planner.config)
        except QueueFull as e:
            raise AdmissionError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                                 limit="max_waiting") from e
        queued = self.load().get(tenant, (0, 0))[0]
        if max_queued and queued >= max_queued:
            whose = f"tenant {tenant!r} has" if tenant else "the callers have"
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{whose} {queued} requests queued (limit max_queued={max_queued})",
                limit="max_queued",
            )

    def load(self) -> dict[str, tuple[int, int]]:
        """(queued, running) requests by tenant, of those in flight."""
        counts: dict[str, list[int]] = {}
        for tracked in self._tracked.values():
            counts.setdefault(tracked.tenant, [0, 0])[tracked.request.state in RESIDENT] += 1
        return {tenant: (queued, running) for tenant, (queued, running) in counts.items()}

    def wake(self) -> None:
        """Has the loop plan again: the planner has something to send (host operations)."""
        self._wake.set()

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        cancelled = self.planner.cancel(request_id)
        tracked = self._tracked.pop(request_id, None)
        if tracked is not None:
            tracked.stream.finish(self._final(tracked, reason))
        self._wake.set()
        return cancelled

    async def set_priority(
        self, priority: int, *, request_id: str | None = None, client_id: str | None = None
    ) -> int:
        n = self.planner.set_priority(priority, request_id=request_id, client_id=client_id)
        self._wake.set()
        return n

    # ---- the loop --------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._busy:
                while self.planner.has_work():
                    if not await self._iteration():
                        break  # nothing can run until a swap completes or a request arrives

    async def _iteration(self) -> bool:
        """Plans one step and sends it; then, with lookahead, completes the step before it
        (sent last iteration: the executor queued this one behind it, so it never waits
        for this loop), else this one."""
        plan = self.planner.plan()
        if plan.host_ops:
            self._host_ops.put_nowait(plan.host_ops)
        try:
            if plan.swaps and not await self._submit_swaps(plan.swaps):
                self.planner.skip(plan)  # re-planned without the refused request
                await self._complete_steps(keep=0)
                return True
            if plan.barrier:
                await self._complete_steps(keep=0)
                await asyncio.gather(*list(self._swaps.values()))
                plan = self.planner.runnable(plan)
            if plan.batch:
                self._send_step(plan)
            ahead = self.limits.lookahead and bool(plan.batch)  # this one runs meanwhile
            completed = await self._complete_steps(keep=1 if ahead else 0)
        except grpc.aio.AioRpcError as e:
            await self._executor_lost(e)
            return False
        return bool(plan.batch or completed or plan.preemptions)

    async def _submit_swaps(self, orders: Sequence[SwapOrder]) -> bool:
        """Starts the swaps; False if the executor refused them (then none started)."""
        loop = asyncio.get_running_loop()
        for order in orders:
            self._swaps[order.swap_id] = loop.create_future()
            self._swap_started[order.swap_id] = time.monotonic()
            self.copies += len(order.copies)
        try:
            await self.executor.SubmitSwaps(
                ex.SubmitSwapsRequest(swaps=[_swap_message(o) for o in orders])
            )
        except grpc.aio.AioRpcError as e:
            if executor_lost(e):
                raise
            for order in orders:  # as failed copies: their requests fall back to recompute
                del self._swaps[order.swap_id], self._swap_started[order.swap_id]
                self.planner.swap_done(order.swap_id, ok=False)
            if e.code() is grpc.StatusCode.FAILED_PRECONDITION:
                # A detached arena, or a clash with a copy in flight: not the request's fault.
                log.warning("swaps refused; their requests recompute: %s", e.details())
            else:
                await self._fail_refused(e, [o.request_id for o in orders])
            return False
        return True

    def _send_step(self, plan: StepPlan) -> None:
        """Sends the plan's step: the executor begins it after the one still in flight,
        whichever arrives first."""
        request = ex.StepRequest(iteration=self._step_id_base + plan.iteration)
        if self._steps_sent:
            request.follows = self._step_id_base + self._steps_sent[-1][0].iteration
        for seq in plan.batch:
            tracked = self._tracked.get(seq.request_id)
            request.sequences.append(
                ex.SequenceInput(
                    request_id=seq.request_id,
                    block_table=seq.block_table,
                    start=seq.start,
                    token_ids=seq.token_ids,
                    from_last_step=seq.from_last_step,
                    sample=seq.sample,
                    sampling=tracked.sampling if tracked is not None else None,
                    banned_token_ids=seq.banned_token_ids,
                )
            )
        call = asyncio.ensure_future(self.executor.Step(request))
        # Whose each row is: a token reaches only the request it was sampled for, not a
        # later one under the same id (a discarded row's request left before it was back).
        owners = {seq.request_id: self._tracked.get(seq.request_id) for seq in plan.batch}
        self._steps_sent.append((plan, call, time.monotonic(), owners))

    async def _complete_steps(self, keep: int) -> bool:
        """Completes the steps sent, oldest first, until `keep` are left in flight; False
        if there were none. A step the executor refused ran nothing, and those sent after
        it are undone with it (they build on its tokens)."""
        completed = False
        while len(self._steps_sent) > keep:
            plan, call, sent, owners = self._steps_sent.popleft()
            completed = True
            try:
                response = await call
            except grpc.aio.AioRpcError as e:
                if executor_lost(e):
                    raise
                later = [c for _, c, _, _ in self._steps_sent]
                self._steps_sent.clear()
                await asyncio.gather(*later, return_exceptions=True)  # outcomes moot
                self.planner.steps_refused()
                await self._fail_refused(e, [seq.request_id for seq in plan.batch])
                return True
            self._stepped(plan, response, sent, owners)
            if self.on_step is not None:
                self.on_step(plan, response.duration_s)
        return completed

    def _stepped(self, plan: StepPlan, response: ex.StepResponse, sent: float,
                 owners: dict[str, _Tracked | None]) -> None:
        """Applies a completed step's tokens and streams them out."""
        now = time.monotonic()
        self.steps += 1
        # From when the executor could take it up (sent, or the step before it back).
        ready = max(sent, self.executor_busy.last or sent)
        self.step_overheads.append(now - ready - response.duration_s)
        if plan.inverted:
            self.inversions += 1
            self.inversion_s += now - ready
        self.metrics.step.observe(now - sent)
        self.executor_busy.add(now - response.duration_s, now)
        sampled = {t.request_id: t.token_id for t in response.tokens}
        finished = self.planner.complete_step(sampled)
        done = {r.request_id for r in finished}
        for token in response.tokens:
            tracked = self._tracked.get(token.request_id)
            if tracked is None or tracked is not owners.get(token.request_id):
                continue  # cancelled, or its row was wasted (it finished a step earlier)
            tracked.timings.append(now)
            self.usage.tokens[tracked.tenant] += 1
            self.metrics.observe_token(tracked.timings)
            stopped = tracked.stream.push(token.token_id, token.logprob)
            if stopped and token.request_id not in done and self.planner.stop(token.request_id):
                done.add(token.request_id)
        for request_id in done:
            tracked = self._tracked.pop(request_id, None)
            if tracked is not None:
                output = tracked.request.output
                eos = bool(output) and output[-1] in tracked.request.stop_token_ids
                reason = "stop" if tracked.stream.stopped or eos else "length"
                final = self._final(tracked, reason)
                self.latency.record(final.ttft_s, final.tbts)
                tracked.stream.finish(final)

    async def _host_worker(self) -> None:
        """Carries out each plan's host operations, one plan after another (so that every
        store sees them in plan order), and feeds the replies back to the planner."""
        while True:
            ops = await self._host_ops.get()
            try:
                replies = await self.host.execute(ops)
            except Exception:  # a tier must not raise; if one does, nothing was done
                log.exception("host operations failed")
                replies = unanswered(ops)
            self.planner.host_replied(replies)
            self._host_ops.task_done()
            self._wake.set()

    async def _swap_events(self) -> None:
        """Feeds swap completions to the planner until the stream breaks."""
        while True:
            try:
                call = self.executor.SwapEvents(ex.SwapEventsRequest())
                await call.initial_metadata()  # sent once the executor has subscribed us
                self._events_ready.set()
                async for event in call:
                    await self._swap_completed(event)
            except grpc.aio.AioRpcError as e:
                log.warning("swap event stream lost (%s); retrying", e.code().name)
            await asyncio.sleep(0.5)

    async def _swap_completed(self, event: ex.SwapEvent) -> None:
        future = self._swaps.pop(event.ticket, None)
        if future is None:
            return  # a swap from before an executor restart
        direction = "out" if event.direction == ex.DIRECTION_OUT else "in"
        started = self._swap_started.pop(event.ticket)
        self.metrics.observe_swap(direction, time.monotonic() - started, event.bytes)
        if event.error:
            log.warning("swap %d of %s failed: %s", event.ticket, event.request_id, event.error)
        self.planner.swap_done(event.ticket, ok=not event.error)
        tracked = self._tracked.get(event.request_id)
        if tracked is not None:
            tracked.bytes_swapped += event.bytes
        if event.direction == ex.DIRECTION_OUT:
            self.swap_out_bytes += event.bytes
        if not future.done():
            future.set_result(None)
        self._wake.set()

    async def _wait_for_executor(self) -> None:
        """Returns once the executor is up, or raises UNAVAILABLE after the outage wait."""
        if self.executor_ok:
            return
        try:
            await asyncio.wait_for(self._executor_back.wait(), self.limits.outage_wait_s)
        except TimeoutError:
            raise AdmissionError(grpc.StatusCode.UNAVAILABLE, "executor unavailable") from None

    async def _probe_executor(self) -> None:
        """Notices an executor that died while nothing ran, so that health tells at once."""
        while True:
            await asyncio.sleep(self.limits.probe_s)
            if not self.executor_ok or self._busy.locked():
                continue  # an outage is being handled, or the loop's calls will tell
            try:
                await self.executor.Describe(ex.DescribeRequest(), timeout=self.limits.probe_s)
            except grpc.aio.AioRpcError as e:
                async with self._busy:
                    if self.executor_ok:
                        await self._executor_lost(e)

    async def _set_health(self, ok: bool) -> None:
        if self.on_health is not None and self.accepting:
            await self.on_health(ok)

    async def _executor_lost(self, error: grpc.aio.AioRpcError) -> None:
        """Fails what lived on the device, then waits for the executor to come back; what
        is still held once the outage has lasted `outage_wait_s` fails too."""
        log.error("executor call failed: %s %s", error.code().name, error.details())
        self.executor_ok = False
        self._executor_back.clear()
        await self._set_health(False)
        failed = self.planner.reset_device()
        for _, call, _, _ in self._steps_sent:
            call.cancel()
        self._steps_sent.clear()
        for future in self._swaps.values():
            future.cancel()
        self._swaps.clear()
        self._swap_started.clear()
        message = f"executor unavailable: {error.details()}"
        for request in failed:
            tracked = self._tracked.pop(request.request_id, None)
            if tracked is not None:
                tracked.stream.fail(grpc.StatusCode.UNAVAILABLE, message)
        give_up = time.monotonic() + self.limits.outage_wait_s
        while (moved := await self._reconnect()) is None:
            if self._tracked and time.monotonic() >= give_up:
                await self._fail_all(message)
            await asyncio.sleep(0.5)
        if moved:
            await self._fail_all("the executor mapped the host arenas at other block ids")
        log.warning("executor is back; %d request(s) failed, the rest continue", len(failed))
        self.executor_ok = True
        self._executor_back.set()
        await self._set_health(True)
        self._wake.set()

    async def _fail_all(self, message: str) -> None:
        """Cancels every request held and ends its stream with UNAVAILABLE."""
        for request_id in list(self._tracked):
            self.planner.cancel(request_id)
            self._tracked.pop(request_id).stream.fail(grpc.StatusCode.UNAVAILABLE, message)

    async def _fail_refused(self, error: grpc.aio.AioRpcError, called: Sequence[str]) -> None:
        """Fails the request a refused call names, or every request of the call (`called`)
        if it names none, with INTERNAL: the executor refused what this scheduler sent."""
        named = refused_request(error)
        victims = [named] if named else list(dict.fromkeys(called))
        log.error("executor refused %s (%s): %s", ", ".join(victims), error.code().name,
                  error.details())
        message = f"the executor refused this request: {error.code().name} {error.details()}"
        for request_id in victims:
            self.planner.cancel(request_id)
            tracked = self._tracked.pop(request_id, None)
            if tracked is not None:
                tracked.stream.fail(grpc.StatusCode.INTERNAL, message)
        self._wake.set()

    async def _reconnect(self) -> bool | None:
        """Re-attaches the host arenas and the swap event stream: True if the arenas
        landed at other host block ids, None if it can't yet."""
        try:
            await self.executor.Describe(ex.DescribeRequest(), timeout=2)
            moved = await self.host.remap(self._reattach)
            await asyncio.wait_for(self._subscribe_swap_events(), timeout=10)
        except (grpc.aio.AioRpcError, TimeoutError):
            return None
        return moved

    async def _reattach(self, name: str) -> int | None:
        """The arena's first host block; None if it is gone (its KV store restarted with a
        new arena, which `host.remap` hears of, so that the store is replaced)."""
        try:
            attached = await self.executor.AttachHostArena(
                ex.AttachHostArenaRequest(name=name), timeout=10)
        except grpc.aio.AioRpcError as e:
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            log.warning("host arena %s is gone: its KV store restarted", name)
            return None
        return attached.first_host_block

    def _final(self, tracked: _Tracked, reason: str) -> Finished:
        times = tracked.timings  # arrival, then one entry per token
        return Finished(
            finish_reason=reason,
            prompt_tokens=len(tracked.request.prompt),
            completion_tokens=len(tracked.request.output),
            ttft_s=times[1] - times[0] if len(times) > 1 else 0.0,
            tbts=gaps(times[1:]),
            preemptions=tracked.request.preemptions,
            bytes_swapped=tracked.bytes_swapped,
            reused_tokens=tracked.request.reused_tokens,
        )


def _swap_message(order: SwapOrder) -> ex.SwapOrder:
    direction = ex.DIRECTION_OUT if order.direction is Direction.OUT else ex.DIRECTION_IN
    return ex.SwapOrder(
        swap_id=order.swap_id,
        request_id=order.request_id,
        direction=direction,
        copies=[ex.SwapCopy(src=_extent(c.src), dst=_extent(c.dst)) for c in order.copies],
    )


def _extent(extent: Extent) -> ex.Extent:
    return ex.Extent(start=extent.start, length=extent.length)
