"""The public gRPC API: Generate, Chat, SetPriority, Cancel and Stats over the engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from common.latency import percentile
from protos import executor_pb2 as ex
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from services.scheduler.core.request import Request, RequestState
from services.scheduler.engine import AdmissionError, Engine
from services.scheduler.token_stream import Failed, Finished, TokenEvent

S = RequestState
STATS_WAIT_S = 0.25  # how long Stats waits for the planner's thread


@dataclass
class _Conversation:
    tokens: list[int] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, engine: Engine, *, mode: str, vocab_size: int) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.mode = mode
        self.vocab_size = vocab_size
        self._conversations: dict[str, _Conversation] = {}
        self._last_stats = pb.StatsResponse(mode=mode)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        if request.WhichOneof("prompt") == "text":
            prompt = self.tokenizer.encode(request.text) if request.text else []
        else:
            prompt = list(request.token_ids.ids)
        bad = [i for i, t in enumerate(prompt) if t >= self.vocab_size]
        if bad:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids.ids[{bad[0]}]={prompt[bad[0]]} is not below the vocabulary size "
                f"{self.vocab_size}",
            )
        async for event in self._run(request, prompt, context):
            yield event

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        if not request.conversation_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "conversation_id is required")
        if not request.message:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "message is empty")
        conv = self._conversations.setdefault(request.conversation_id, _Conversation())
        if conv.lock.locked():
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"conversation {request.conversation_id!r} already has a turn in flight",
            )
        async with conv.lock:
            turn = self.tokenizer.encode(
                f"User: {request.message}\nAssistant:", add_bos=not conv.tokens
            )
            prompt = conv.tokens + turn
            output: list[int] = []
            async for event in self._run(request, prompt, context, output):
                yield event
            conv.tokens = prompt + output

    async def _run(
        self,
        request: pb.GenerateRequest | pb.ChatRequest,
        prompt: list[int],
        context: grpc.aio.ServicerContext,
        output: list[int] | None = None,
    ) -> AsyncIterator[pb.GenerateEvent]:
        rid = getattr(request, "request_id", "") or uuid.uuid4().hex
        err = _validate(request, prompt)
        if err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        try:
            core_request = Request(
                request_id=rid,
                client_id=request.client_id,
                prompt=prompt,
                max_tokens=request.max_tokens,
                conversation_id=request.conversation_id or None,
                priority=request.priority if request.HasField("priority") else 0,
                stop_token_ids=frozenset(self.tokenizer.eos_ids),
            )
            stream = await self.engine.submit(
                core_request,
                ex.SamplingParams(
                    temperature=request.temperature,
                    top_p=request.top_p or 1.0,
                    seed=request.seed,
                    logprobs=getattr(request, "logprobs", False),
                ),
                stop=list(request.stop),
            )
        except AdmissionError as e:
            await context.abort(e.code, str(e))
        done = False
        try:
            async for item in stream:
                if isinstance(item, TokenEvent):
                    if output is not None:
                        output.append(item.token_id)
                    token = pb.Token(id=item.token_id, text=item.text, logprob=item.logprob)
                    yield pb.GenerateEvent(request_id=rid, token=token)
                elif isinstance(item, Finished):
                    done = True
                    yield pb.GenerateEvent(request_id=rid, final=_final(item))
                else:
                    assert isinstance(item, Failed)
                    done = True
                    await context.abort(item.code, item.message)
        finally:
            if not done:  # the client went away, or the call was cancelled
                await self.engine.cancel(rid)

    async def SetPriority(
        self, request: pb.SetPriorityRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPriorityResponse:
        target = request.WhichOneof("target")
        if target is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "set either request_id or client_id"
            )
        updated = await self.engine.set_priority(
            request.priority, **{target: getattr(request, target)}
        )
        return pb.SetPriorityResponse(updated=updated)

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        return pb.CancelResponse(cancelled=await self.engine.cancel(request.request_id))

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        return await self.snapshot()

    async def snapshot(self) -> pb.StatsResponse:
        """What Stats answers; the metrics endpoint exports the same numbers. While the
        planner's thread is held up (a stalled KV store call), the last numbers, with the
        executor's and the store's state as of now."""
        try:
            self._last_stats = await asyncio.wait_for(
                asyncio.shield(self.engine.core(self._stats)), STATS_WAIT_S)
        except TimeoutError:
            self._last_stats.executor_available = self.engine.executor_ok
            self._last_stats.kvstore_degraded = getattr(
                self.engine.planner.host, "degraded", False)
        return self._last_stats

    def _stats(self) -> pb.StatsResponse:
        planner = self.engine.planner
        states = [r.state for r in planner.requests.values()]
        metrics = planner.allocator.metrics()
        latency = self.engine.latency
        overheads = list(self.engine.step_overheads)
        return pb.StatsResponse(
            mode=self.mode,
            waiting=states.count(S.WAITING),
            running=sum(s in (S.RUNNING, S.PREFILLING) for s in states),
            swapped=sum(s in (S.SWAPPED, S.SWAPPING_OUT, S.SWAPPING_IN) for s in states),
            running_blocks=metrics.used,
            swapped_blocks=planner.swapped_blocks(),
            draining_blocks=metrics.draining,
            free_blocks=metrics.free,
            swaps_in_flight=planner.swaps_in_flight(),
            preemptions=planner.stats.preempted_by_swap + planner.stats.preempted_by_recompute,
            reuse_hit_tokens=planner.stats.prefix_hit_tokens
            + planner.stats.reuse_saved_blocks * planner.config.block_size,
            ttft_p50_s=percentile(latency.ttfts, 50),
            ttft_p95_s=percentile(latency.ttfts, 95),
            ttft_p99_s=percentile(latency.ttfts, 99),
            tbt_p50_s=percentile(latency.tbts, 50),
            tbt_p99_s=percentile(latency.tbts, 99),
            tbt_p999_s=percentile(latency.tbts, 99.9),
            finished=planner.stats.finished,
            swap_out_bytes=self.engine.swap_out_bytes,
            copies=self.engine.copies,
            steps=self.engine.steps,
            step_overhead_mean_s=sum(overheads) / len(overheads) if overheads else 0.0,
            step_overhead_p99_s=percentile(overheads, 99),
            executor_available=self.engine.executor_ok,
            kvstore_degraded=getattr(planner.host, "degraded", False),
        )


def _validate(request: pb.GenerateRequest | pb.ChatRequest, prompt: list[int]) -> str | None:
    if not request.client_id:
        return "client_id is required"
    if not prompt:
        return "the prompt is empty"
    if request.max_tokens <= 0:
        return f"max_tokens must be positive, got {request.max_tokens}"
    if request.temperature < 0:
        return f"temperature must be >= 0, got {request.temperature}"
    if not 0 <= request.top_p <= 1:
        return f"top_p must be in [0, 1], got {request.top_p}"
    return None


def _final(item: Finished) -> pb.Final:
    tbts = item.tbts
    return pb.Final(
        finish_reason=item.finish_reason,
        prompt_tokens=item.prompt_tokens,
        completion_tokens=item.completion_tokens,
        ttft_s=item.ttft_s,
        tbt_mean_s=sum(tbts) / len(tbts) if tbts else 0.0,
        tbt_p99_s=percentile(tbts, 99),
        tbt_max_s=max(tbts, default=0.0),
        preemptions=item.preemptions,
        bytes_swapped=item.bytes_swapped,
        reused_prompt_tokens=item.reused_tokens,
    )
