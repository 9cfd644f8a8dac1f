"""The executor's gRPC face (grpc.aio): protobuf in, engine calls, status codes out.

Steps run on worker threads so the event loop keeps serving SubmitSwaps and streaming
SwapEvents while a forward pass is in progress: one prepares steps (host work), one launches
them (device work) and one collects them (waits for their tokens), each in the order the
steps began. So a Step that arrives while another runs is prepared meanwhile, launched right
after it and answered after it; one more is refused by the engine ("already queued").

Steps sent at once on one channel may arrive in either order (a large one's message takes
longer). So a Step that names the step it follows (`StepRequest.follows`) begins only once
that one has begun or been refused, waiting up to `FOLLOW_WAIT_S` for it: steps begin in the
order the scheduler sent them, whatever order they arrive in. A step refused or past its
deadline is settled too, so one lost call holds up the next for at most its deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NoReturn, TypeVar

import grpc
import torch
from grpc_health.v1.health import aio as health_aio

from common.grpc_serving import add_health_and_reflection
from common.kv.extent import Extent
from common.kv.swap_plan import Copy
from common.refusal import refusal_metadata
from protos import executor_pb2, executor_pb2_grpc
from services.executor.copy import CompletionStream, Direction
from services.executor.engine import (
    DeviceFailure,
    ExecutorEngine,
    InvalidInput,
    PreconditionFailed,
    PreparedStep,
    Refused,
    StepClaim,
    StepResult,
    StepSequence,
    SwapDone,
    SwapOrder,
    blame,
)
from services.executor.metrics import ExecutorMetrics
from services.executor.model import SamplingParams
from services.executor.model.layers import PACKED_HEIGHTS

log = logging.getLogger(__name__)

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
_DIRECTIONS: dict[int, Direction] = {executor_pb2.DIRECTION_OUT: Direction.OUT,
                                     executor_pb2.DIRECTION_IN: Direction.IN}
_DIRECTION_ENUM = {name: value for value, name in _DIRECTIONS.items()}
T = TypeVar("T")
SETTLED_KEPT = 64  # iterations of the steps settled last, that a follower may name
FOLLOW_WAIT_S = 10.0  # how long a Step may wait for the one it follows (within its deadline)


def compute_on(worker: ThreadPoolExecutor, threads: int) -> None:
    """Gives torch `threads` intra-op threads on `worker`'s thread, and one on this thread and
    on every thread started later.

    GNU OpenMP, which torch and MKL share here, gives each thread that opens a parallel region
    a team of its own, kept while that thread lives, and stops spinning between regions once
    its threads outnumber the cores. So a second team (the one the loading thread kept, say)
    slows every step: SmolLM2 at batch 1 on 2 cores and 2 threads took 85-96 ms a step
    launched on a worker thread after the main thread had loaded the model with 2, against
    42-56 ms with the main thread on 1 (measured side by side, in fresh processes). Call it
    before other threads compute: between its two settings the process-wide count is
    `threads`, which a thread's first parallel op in that gap would keep."""
    worker.submit(_set_threads, threads).result()
    torch.set_num_threads(1)


def _set_threads(threads: int) -> None:
    """This thread's intra-op threads, set after torch's own first setup of the thread, which
    would otherwise later reset them to the process-wide count."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


class ExecutorService(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, engine: ExecutorEngine, metrics: ExecutorMetrics | None = None, *,
                 step_threads: int = 0, packed_heights: tuple[int, ...] = PACKED_HEIGHTS
                 ) -> None:
        """`step_threads`: torch's intra-op threads for launching steps, where the forward
        pass runs, and one for every other thread (`compute_on`); 0: leave torch's as they
        are. The model's projections are packed for `packed_heights` on that thread before
        this returns (`DecoderModel.pack_projections`)."""
        self._engine = engine
        self._metrics = metrics or ExecutorMetrics()
        # One thread each, so that each stage takes the steps in the order they arrived.
        self._prepare_worker = ThreadPoolExecutor(1, thread_name_prefix="step-prepare")
        self._launch_worker = ThreadPoolExecutor(1, thread_name_prefix="step-launch")
        self._collect_worker = ThreadPoolExecutor(1, thread_name_prefix="step-collect")
        if step_threads:
            compute_on(self._launch_worker, step_threads)
        self._launch_worker.submit(engine.model.pack_projections, packed_heights).result()
        self._streams: set[CompletionStream] = set()
        self._settled = asyncio.Condition()  # notified whenever a step begins, or is refused
        self._recently_settled: deque[int] = deque(maxlen=SETTLED_KEPT)  # their iterations

    async def Describe(
        self, request: executor_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.DescribeResponse:
        d = self._engine.describe()
        g = d.geometry
        return executor_pb2.DescribeResponse(
            model_fingerprint=d.fingerprint,
            geometry=executor_pb2.BlockGeometry(
                block_size=g.block_size,
                num_layers=g.num_layers,
                kv_heads=g.kv_heads,
                head_dim=g.head_dim,
                dtype=str(g.dtype).removeprefix("torch."),
                block_bytes=g.block_bytes,
            ),
            num_gpu_blocks=g.num_blocks,
            backend=d.backend,
            vocab_size=d.vocab_size,
            max_model_len=d.max_model_len,
            host_arena=d.host_arenas[0] if d.host_arenas else "",
            num_host_blocks=d.num_host_blocks,
            eos_token_id=d.eos_token_id,
            host_arenas=d.host_arenas,
            checkpoint=d.checkpoint,
            eos_token_ids=d.eos_token_ids,
            tokenizer_sha256=d.tokenizer_sha256,
            batch_invariant=d.batch_invariant,
        )

    async def AttachHostArena(
        self, request: executor_pb2.AttachHostArenaRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.AttachHostArenaResponse:
        try:  # pinning tens of GB takes seconds: off the event loop
            attached = await asyncio.to_thread(self._engine.attach_host_arena, request.name)
        except FileNotFoundError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"name: no arena {request.name!r}")
        except Refused as exc:  # not a fitting arena
            await _abort(context, exc)
        except DeviceFailure as exc:
            log.error("attaching host arena %s failed: %s", request.name, exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        return executor_pb2.AttachHostArenaResponse(
            num_host_blocks=attached.num_blocks, first_host_block=attached.first_block
        )

    async def DetachHostArena(
        self, request: executor_pb2.DetachHostArenaRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.DetachHostArenaResponse:
        try:  # waits for the arena's swaps in flight: off the event loop
            detached = await asyncio.to_thread(self._engine.detach_host_arena, request.name)
        except FileNotFoundError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"name: no attached arena {request.name!r}"
            )
        except InvalidInput as exc:
            await _abort(context, exc)
        log.info("detached host arena %s (host blocks [%d, %d))", detached.name,
                 detached.first_block, detached.first_block + detached.num_blocks)
        return executor_pb2.DetachHostArenaResponse(
            num_host_blocks=detached.num_blocks, first_host_block=detached.first_block
        )

    async def Step(
        self, request: executor_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.StepResponse:
        claim = await self._begin_step(request, context)
        # Submitted before any await: the workers take the steps in the order they began.
        prepared = self._prepare_worker.submit(self._engine.prepare_step, claim)
        launched = self._launch_worker.submit(self._launch, prepared)
        try:  # shielded: a cancelled call lets the step finish
            collected = await asyncio.shield(asyncio.wrap_future(launched))
            result = await asyncio.shield(asyncio.wrap_future(collected))
        except Refused as exc:  # the step before, whose tokens it feeds, failed
            await _abort(context, exc)
        except Exception as exc:
            log.exception("step %d failed", request.iteration)
            await context.abort(grpc.StatusCode.INTERNAL, f"step failed: {exc!r}")
        self._metrics.step.observe(result.duration_s)
        self._metrics.step_sequences.observe(len(request.sequences))
        return executor_pb2.StepResponse(
            tokens=[
                executor_pb2.SampledToken(
                    request_id=t.request_id,
                    token_id=t.token_id,
                    logprob=0.0 if t.logprob is None else t.logprob,
                )
                for t in result.tokens
            ],
            duration_s=result.duration_s,
        )

    def _launch(self, prepared: Future[PreparedStep]) -> Future[StepResult]:
        """On the launch worker: launches the step once prepared, and hands it to the collect
        worker."""
        launched = self._engine.launch_step(prepared.result())
        return self._collect_worker.submit(self._engine.collect_step, launched)

    async def _begin_step(
        self, request: executor_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> StepClaim:
        """Begins the step once the one it follows has begun or been refused; either way
        it is then settled, and the step that follows it may begin."""
        async with self._settled:
            try:
                limit = context.time_remaining()
                deadline_first = limit is not None and limit < FOLLOW_WAIT_S
                followed = not request.HasField("follows") or await _wait_for(
                    self._settled, lambda: request.follows in self._recently_settled,
                    limit if deadline_first else FOLLOW_WAIT_S)
                remaining = context.time_remaining()
                # A wait cut short by the deadline is the deadline's doing, whatever the
                # two clocks say just after it (gRPC's may still show a little left).
                if (not followed and deadline_first) or (remaining is not None
                                                         and remaining <= 0):
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the step ran"
                    )
                if not followed:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"follows: step {request.follows}, which this one follows, has not "
                        f"begun or been refused within {FOLLOW_WAIT_S:g} s")
                try:
                    sequences = [_sequence(i, s) for i, s in enumerate(request.sequences)]
                    return self._engine.begin_step(sequences)
                except Refused as exc:
                    await _abort(context, exc)
            finally:
                self._recently_settled.append(request.iteration)
                self._settled.notify_all()

    async def SubmitSwaps(
        self, request: executor_pb2.SubmitSwapsRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.SubmitSwapsResponse:
        try:
            orders = [_order(i, s) for i, s in enumerate(request.swaps)]
            tickets = self._engine.submit_swaps(orders)
        except Refused as exc:
            await _abort(context, exc)
        self._metrics.swaps_in_flight.inc(len(tickets))
        return executor_pb2.SubmitSwapsResponse(tickets=tickets)

    async def SwapEvents(
        self, request: executor_pb2.SwapEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[executor_pb2.SwapEvent]:
        with self._engine.subscribe() as stream:
            self._streams.add(stream)
            # Headers now tell the client it is subscribed: every later swap reaches it.
            await context.send_initial_metadata(())
            try:
                async for done in stream:
                    yield _event(done)  # type: ignore[arg-type]  # the engine's hub relays SwapDone
            finally:
                self._streams.discard(stream)

    def end_streams(self) -> None:
        """Ends the open SwapEvents calls, so that a graceful stop need not wait them out."""
        for stream in list(self._streams):
            stream.close()

    def close(self) -> None:
        """After the server stopped: waits for the steps still running or queued."""
        for worker in (self._prepare_worker, self._launch_worker, self._collect_worker):
            worker.shutdown(wait=True)


def add_to_server(service: ExecutorService, server: grpc.aio.Server) -> health_aio.HealthServicer:
    """Registers the executor, grpc.health.v1 and reflection; returns the health servicer."""
    executor_pb2_grpc.add_ExecutorServicer_to_server(service, server)
    return add_health_and_reflection(server, SERVICE_NAME)


async def _wait_for(condition: asyncio.Condition, predicate: Callable[[], bool],
                    timeout: float) -> bool:
    """Waits (holding `condition`) until `predicate` holds, for up to `timeout` seconds;
    False if it still does not."""
    try:
        await asyncio.wait_for(condition.wait_for(predicate), timeout)
    except TimeoutError:
        return False
    return True


async def _abort(context: grpc.aio.ServicerContext, exc: Refused) -> NoReturn:
    """The refusal's status, with the request it names in the trailing metadata."""
    code = (
        grpc.StatusCode.FAILED_PRECONDITION
        if isinstance(exc, PreconditionFailed)
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    await context.abort(code, str(exc), trailing_metadata=refusal_metadata(exc.request_id))


def _field(where: str, build: Callable[[], T]) -> T:
    """Builds a domain value, naming the field in the error if the value is malformed."""
    try:
        return build()
    except ValueError as exc:
        raise InvalidInput(f"{where}: {exc}") from exc


def _sequence(index: int, seq: executor_pb2.SequenceInput) -> StepSequence:
    s = seq.sampling
    with blame(seq.request_id):
        sampling = _field(
            f"sequences[{index}].sampling",
            lambda: SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p or 1.0,  # proto3's default 0 means "no nucleus cut"
                seed=s.seed,
                logprobs=s.logprobs,
                top_k=s.top_k,
            ),
        )
    return StepSequence(
        request_id=seq.request_id,
        block_table=list(seq.block_table),
        start=seq.start,
        token_ids=list(seq.token_ids),
        sample=seq.sample,
        sampling=sampling,
        banned_token_ids=tuple(seq.banned_token_ids),
        from_last_step=seq.from_last_step,
    )


def _order(index: int, order: executor_pb2.SwapOrder) -> SwapOrder:
    with blame(order.request_id):
        return _parse_order(f"swaps[{index}]", order)


def _parse_order(where: str, order: executor_pb2.SwapOrder) -> SwapOrder:
    if order.direction not in _DIRECTIONS:
        raise InvalidInput(
            f"{where}.direction={order.direction} is not DIRECTION_OUT or DIRECTION_IN"
        )
    copies = [
        _field(
            f"{where}.copies[{j}]",
            lambda c=c: Copy(Extent(c.src.start, c.src.length), Extent(c.dst.start, c.dst.length)),
        )
        for j, c in enumerate(order.copies)
    ]
    return SwapOrder(order.swap_id, order.request_id, _DIRECTIONS[order.direction], tuple(copies))


def _event(done: SwapDone) -> executor_pb2.SwapEvent:
    return executor_pb2.SwapEvent(
        ticket=done.swap_id,
        request_id=done.request_id,
        direction=_DIRECTION_ENUM[done.direction],
        bytes=done.bytes,
        duration_s=done.duration_s,
        error=done.error or "",
    )
