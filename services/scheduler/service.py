"""The public gRPC API: Generate, Chat, SetPriority, Cancel and Stats over the engine.

With API keys (`common.auth`) every call names its tenant, and the ids it uses are that
tenant's own: request and conversation ids are kept internally as `tenant/id`, and never
shown with the prefix. Without keys (a loopback development stack) the caller is `OPEN`:
ids are global, client_id names the fairness principal, and every action is allowed.

Each tenant has limits (`common.auth.TenantLimits`: the key file's, over the flags'
defaults): requests queued and conversations kept (RESOURCE_EXHAUSTED past them, counting
all callers together without keys), and the highest priority a user may set on a request
or with SetPriority (PERMISSION_DENIED above it; admins are not capped). A refusal names
its limit and changes nothing. The keys may be reloaded while the service runs
(`common.key_reload`): each call is authenticated with the keys of its start.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

import grpc

from common.auth import ApiKeys, AuthError, Principal, TenantLimits, authenticate
from common.chat_template import ChatTemplateError, Message, NoChatTemplate
from common.key_reload import ReloadingKeys
from common.latency import percentile
from protos import executor_pb2 as ex
from protos import scheduler_pb2 as pb
from protos import scheduler_pb2_grpc as pb_grpc
from services.scheduler.conversations import (
    ConversationLimits,
    Conversations,
    TooManyConversations,
)
from services.scheduler.core.lifecycle import RESIDENT, SWAP_PHASES, UNADMITTED
from services.scheduler.core.request import Request
from services.scheduler.engine import AdmissionError, Engine
from services.scheduler.prompts import Prompts
from services.scheduler.tenants import TenantRow
from services.scheduler.token_stream import Failed, Finished, TokenEvent

Sampled = pb.GenerateRequest | pb.ChatRequest


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(
        self, engine: Engine, *, mode: str, vocab_size: int, prompts: Prompts,
        eos_token_ids: Sequence[int], model: str = "", keys: ReloadingKeys | None = None,
        conversations: ConversationLimits | None = None,
        tenant_limits: TenantLimits | None = None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.prompts = prompts
        self.mode = mode
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.key_file = keys
        self.conversations = Conversations(conversations or ConversationLimits())
        # Every tenant's, unless the key file sets its own; max_conversations is the
        # conversations' cap.
        self.tenant_limits = replace(tenant_limits or TenantLimits(),
                                     max_conversations=self.conversations.limits.max_per_tenant)

    @property
    def keys(self) -> ApiKeys | None:
        """The keys as they are now (they may be reloaded); None: an open API."""
        return self.key_file.keys if self.key_file is not None else None

    async def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        return await authenticate(self.keys, context)

    def limits(self, tenant: str) -> TenantLimits:
        keys = self.keys
        return keys.limits(tenant).over(self.tenant_limits) if keys else self.tenant_limits

    def _check_caller(self, caller: Principal, request: Sampled) -> str:
        """The request's fairness id; raises AuthError if the caller may not send it
        (another tenant's client_id, a priority above its cap)."""
        client_id = caller.fairness_id(request.client_id)
        if request.HasField("priority"):
            self._check_priority(caller, request.priority)
        return client_id

    async def _refuse(self, caller: Principal, error: AdmissionError,
                      context: grpc.aio.ServicerContext,
                      public: Callable[[str], str] = str) -> None:
        """Aborts the call with the engine's refusal, counted under its limit if any;
        `public` rewrites the message's ids into the caller's."""
        if error.limit:
            self.engine.usage.refused(caller.tenant, error.limit)
        await context.abort(error.code, public(str(error)))

    def _check_priority(self, caller: Principal, priority: int) -> None:
        """Raises AuthError(PERMISSION_DENIED) if a user sets a priority above its cap."""
        cap = self.limits(caller.tenant).max_priority
        if caller.admin or cap is None or priority <= cap:
            return
        self.engine.usage.refused(caller.tenant, "max_priority")
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                        f"priority {priority} is above what tenant {caller.tenant!r} may set "
                        f"(limit max_priority={cap})")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        caller = await self._caller(context)
        kind = request.WhichOneof("prompt")
        try:
            if kind == "messages":
                prompt = self.prompts.chat(_messages(request.messages.messages, "messages"))
            elif kind == "text":
                prompt = self.prompts.text(request.text) if request.text else []
            else:
                prompt = list(request.token_ids.ids)
        except ChatTemplateError as e:
            await context.abort(_template_status(e), str(e))
        bad = [i for i, t in enumerate(prompt) if t >= self.vocab_size]
        if bad:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids.ids[{bad[0]}]={prompt[bad[0]]} is not below the vocabulary size "
                f"{self.vocab_size}",
            )
        async for event in self._run(caller, request, prompt, context):
            yield event

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        caller = await self._caller(context)
        if not request.conversation_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "conversation_id is required")
        if request.message and request.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "set either message or messages, not both")
        try:
            new = (_messages(request.messages, "messages") if request.messages
                   else [Message("user", request.message)] if request.message else [])
        except ChatTemplateError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not new:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "message is empty")
        try:  # refused before anything is kept (or a conversation evicted)
            self._check_caller(caller, request)
            self.engine.check_capacity(caller.tenant, self.limits(caller.tenant).max_queued or 0)
        except AuthError as e:
            await e.abort(context)
        except AdmissionError as e:
            await self._refuse(caller, e, context)
        await self.expire_conversations()
        key = caller.scope(request.conversation_id)
        try:  # one bucket per tenant; one for all when there are no keys
            entry, evicted = self.conversations.open(
                caller.tenant, key, self.limits(caller.tenant).max_conversations)
        except TooManyConversations as e:
            self.engine.usage.refused(caller.tenant, "max_conversations")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        await self._release(evicted)
        if entry.turn.locked():
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"conversation {request.conversation_id!r} already has a turn in flight",
            )
        async with entry.turn:
            conv = entry.conversation
            try:
                try:
                    prompt = self.prompts.next_turn(conv, new)
                except ChatTemplateError as e:
                    await context.abort(_template_status(e), str(e))
                output: list[int] = []
                async for event in self._run(caller, request, prompt, context, output,
                                             len(conv.tokens)):
                    yield event
                # Only a turn that ran to its end becomes history (nothing else was kept).
                self.prompts.record_turn(conv, new, prompt, output)
            finally:
                if conv.tokens:
                    self.conversations.touch(entry)
                else:  # no turn ever finished: nothing to remember
                    self.conversations.forget(entry)

    async def expire_conversations(self) -> None:
        """Forgets the conversations idle past their TTL, and releases their host KV."""
        await self._release(self.conversations.expire())

    async def _release(self, keys: list[str]) -> None:
        if keys:
            for key in keys:
                self.engine.planner.forget_conversation(key)
            self.engine.wake()

    async def _run(
        self,
        caller: Principal,
        request: Sampled,
        prompt: list[int],
        context: grpc.aio.ServicerContext,
        output: list[int] | None = None,
        history_tokens: int | None = None,
    ) -> AsyncIterator[pb.GenerateEvent]:
        rid = request.request_id or uuid.uuid4().hex
        try:
            client_id = self._check_caller(caller, request)
        except AuthError as e:
            await e.abort(context)
        err = _validate(request, client_id, prompt, self.vocab_size)
        if err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        scoped = caller.scope(rid)
        conversation = caller.scope(request.conversation_id) if request.conversation_id \
            else None

        def public(message: str) -> str:
            """A message about the request, with the ids the caller knows."""
            message = message.replace(scoped, rid)
            return message.replace(conversation, request.conversation_id) if conversation \
                else message
        options = request.options
        stop_ids = set(options.stop_token_ids)
        if not options.ignore_eos:
            stop_ids |= self.eos_token_ids
        try:
            core_request = Request(
                request_id=scoped,
                client_id=client_id,
                prompt=prompt,
                max_tokens=request.max_tokens,
                conversation_id=conversation,
                priority=request.priority if request.HasField("priority") else 0,
                stop_token_ids=frozenset(stop_ids),
                min_tokens=options.min_tokens,
                history_tokens=history_tokens,
            )
            stream = await self.engine.submit(
                core_request,
                ex.SamplingParams(
                    temperature=request.temperature,
                    top_p=request.top_p or 1.0,
                    seed=request.seed,
                    logprobs=request.logprobs,
                    top_k=options.top_k,
                ),
                stop=list(request.stop),
                tenant=caller.tenant,
                max_queued=self.limits(caller.tenant).max_queued or 0,
            )
        except AdmissionError as e:
            await self._refuse(caller, e, context, public)
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
                    await context.abort(item.code, public(item.message))
        finally:
            if not done:  # the client went away, or the call was cancelled
                await self.engine.cancel(scoped)

    async def SetPriority(
        self, request: pb.SetPriorityRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPriorityResponse:
        caller = await self._caller(context)
        target = request.WhichOneof("target")
        if target is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "set either request_id or client_id"
            )
        try:
            self._check_priority(caller, request.priority)
        except AuthError as e:
            await e.abort(context)
        if target == "request_id":  # only the caller's own requests are found
            updated = await self.engine.set_priority(
                request.priority, request_id=caller.scope(request.request_id))
        else:
            client_id = request.client_id or caller.tenant  # empty: the caller's own
            if not caller.may_act_for(client_id):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"only an admin sets the priority of another tenant ({client_id!r})")
            updated = await self.engine.set_priority(request.priority, client_id=client_id)
        return pb.SetPriorityResponse(updated=updated)

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        caller = await self._caller(context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        # Scoped: another tenant's request of the same id is not found, hence not cancelled.
        cancelled = await self.engine.cancel(caller.scope(request.request_id))
        return pb.CancelResponse(cancelled=cancelled)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        caller = await self._caller(context)
        if caller.admin:
            return await self.snapshot()
        return self.tenant_snapshot(caller.tenant)

    def tenant_snapshot(self, tenant: str) -> pb.StatsResponse:
        """What a user sees: its own tenant's requests, and whether the service is whole;
        nothing of other tenants' load (the service-wide numbers are left at zero)."""
        planner = self.engine.planner
        mine = [r for r in planner.requests.values() if r.client_id == tenant]
        states = [r.state for r in mine]
        return pb.StatsResponse(
            mode=self.mode,
            waiting=sum(s in UNADMITTED for s in states),
            running=sum(s in RESIDENT for s in states),
            swapped=sum(s in SWAP_PHASES for s in states),
            running_blocks=sum(planner.memory.blocks_of(r) for r in mine
                               if r.state in RESIDENT),
            executor_available=self.engine.executor_ok,
            kvstore_degraded=self.engine.host.degraded,
            model=self.model,
        )

    async def tenant_report(self) -> list[TenantRow]:
        """Each tenant's requests, tokens served and refusals, for the metrics endpoint:
        the key file's tenants, and any that has used the service ("": all callers,
        without keys)."""
        load, usage, keys = self.engine.load(), self.engine.usage, self.keys
        tenants = set(load) | set(usage.tokens) | {t for t, _ in usage.refusals} | \
            (keys.tenants if keys else set())
        return [TenantRow(tenant, *load.get(tenant, (0, 0)), usage.tokens[tenant],
                          {limit: n for (t, limit), n in usage.refusals.items() if t == tenant})
                for tenant in sorted(tenants)]

    async def snapshot(self) -> pb.StatsResponse:
        """What Stats answers; the metrics endpoint exports the same numbers. It never
        waits: the planner makes no calls, and the store's state is the router's view."""
        return self._stats()

    def _stats(self) -> pb.StatsResponse:
        planner = self.engine.planner
        states = [r.state for r in planner.requests.values()]
        metrics = planner.memory.allocator.metrics()
        latency = self.engine.latency
        overheads = list(self.engine.step_overheads)
        return pb.StatsResponse(
            mode=self.mode,
            model=self.model,
            waiting=sum(s in UNADMITTED for s in states),
            running=sum(s in RESIDENT for s in states),
            swapped=sum(s in SWAP_PHASES for s in states),
            running_blocks=metrics.used - planner.memory.cached_blocks,
            cached_blocks=planner.memory.cached_blocks,
            swapped_blocks=planner.transfers.swapped_blocks(),
            draining_blocks=metrics.draining,
            free_blocks=metrics.free,
            swaps_in_flight=len(planner.memory.swaps),
            preemptions=planner.stats.preempted_by_swap + planner.stats.preempted_by_recompute,
            reuse_hit_tokens=planner.stats.prefix_hit_tokens + planner.stats.device_hit_tokens
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
            kvstore_degraded=self.engine.host.degraded,
            kvstores=self.engine.host.store_counts[0],
            kvstores_down=self.engine.host.store_counts[1],
            kvstore_degraded_seconds=self.engine.host.degraded_seconds,
            executor_idle_fraction=self.engine.executor_busy.idle_fraction,
            wasted_tokens=planner.stats.wasted_tokens,
            priority_inversions=self.engine.inversions,
            priority_inversion_s=self.engine.inversion_s,
        )


def _validate(request: Sampled, client_id: str, prompt: list[int], vocab_size: int
              ) -> str | None:
    if not client_id:
        return "client_id is required"
    if not prompt:
        return "the prompt is empty"
    if request.max_tokens <= 0:
        return f"max_tokens must be positive, got {request.max_tokens}"
    if not math.isfinite(request.temperature) or request.temperature < 0:
        return f"temperature must be a finite number >= 0, got {request.temperature}"
    if not (math.isfinite(request.top_p) and 0 <= request.top_p <= 1):
        return f"top_p must be in [0, 1], got {request.top_p}"
    options = request.options
    if options.min_tokens > request.max_tokens:
        return (f"options.min_tokens ({options.min_tokens}) exceeds max_tokens "
                f"({request.max_tokens})")
    bad = [t for t in options.stop_token_ids if t >= vocab_size]
    if bad:
        return f"options.stop_token_ids: {bad[0]} is not below the vocabulary size {vocab_size}"
    return None


def _messages(messages: Sequence[pb.ChatMessage], field: str) -> list[Message]:
    if not messages:
        raise ChatTemplateError(f"{field} is empty")
    return [Message(m.role, m.content) for m in messages]


def _template_status(error: ChatTemplateError) -> grpc.StatusCode:
    if isinstance(error, NoChatTemplate):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT


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
        trailing_text=item.trailing_text,
    )
