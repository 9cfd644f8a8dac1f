"""The step planner: events in, `StepPlan`s out, and no calls to anything.

Each `plan()` ranks the live requests (the fairness policy's ranks, in the preemption policy's
order) and makes one selection pass (`selection.choose`): those that fit in device KV memory and
the token budget stay or come in. Residents left out are preempted, by swap or by recompute
(`preemption`). The plan then swaps in or admits the chosen and hands the driver a batch, swap
orders and host operations.

Events come back whenever the driver has them: sampled tokens (`complete_step`), finished copies
(`swap_done`) and host replies (`host_replied`). A decision that needs a reply waits in a named
state (`lifecycle`) for a later plan; `transfers` carries KV moves through their replies and
copies. A plan's step applies at once (`steps_in_flight`), so the next plan may be made while it
runs (lookahead). Who holds what: `Request.state` (moved only by `Request.handle`), host KV per
request (`RequestKV`), awaited replies (`HostAsks`), steps in flight (`StepsInFlight`), and device
blocks, copies in flight and the prefix cache (`DeviceMemory`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from common.kv.host_ops import HostReply
from services.scheduler.core import admission
from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.device_memory import DeviceMemory
from services.scheduler.core.host_asks import HostAsks
from services.scheduler.core.inversion import inverted
from services.scheduler.core.lifecycle import ON_DEVICE, RESIDENT, SELECTABLE, Event
from services.scheduler.core.plan import PreemptBy, Preemption, ScheduledSeq, StepPlan, SwapOrder
from services.scheduler.core.policy import FairnessPolicy
from services.scheduler.core.preemption import PREEMPTION_POLICIES, PreemptionPolicy
from services.scheduler.core.request import Request, RequestState
from services.scheduler.core.request_kv import Purpose
from services.scheduler.core.selection import Candidate, choose
from services.scheduler.core.stats import PlannerStats
from services.scheduler.core.steps_in_flight import PENDING, StepsInFlight
from services.scheduler.core.transfers import Transfers

S, E, P = RequestState, Event, Purpose


@dataclass
class Planner:
    config: SchedulerConfig
    policy: FairnessPolicy
    fingerprint: str  # the model's, which every host KV chain starts from
    preemption: PreemptionPolicy | None = None  # None: the mode's own (`Mode.preemption`)
    requests: dict[str, Request] = field(default_factory=dict)
    stats: PlannerStats = field(default_factory=PlannerStats)

    def __post_init__(self) -> None:
        self._preemption = self.preemption or PREEMPTION_POLICIES[self.config.mode.preemption]()
        self.memory = DeviceMemory(self.config)
        self.asks = HostAsks()
        self.transfers = Transfers(self.config, self.fingerprint, self.memory, self.asks,
                                   self.stats)
        self.steps = StepsInFlight(self.memory)
        self._arrivals = itertools.count()

    # ---- events in -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Raises ValueError or `QueueFull` (`admission.check`), changing nothing."""
        admission.check(request, self.requests, self.config)
        request.arrival = next(self._arrivals)
        self.policy.on_arrival(request, self.requests.values())
        self.requests[request.request_id] = request
        self.transfers.track(request)

    def set_priority(
        self, priority: int, *, request_id: str | None = None, client_id: str | None = None
    ) -> int:
        """Returns how many live requests changed."""
        hits = [r for r in self.requests.values() if r.request_id == request_id
                or (client_id is not None and r.client_id == client_id)]
        for r in hits:
            r.priority = priority
        return len(hits)

    def cancel(self, request_id: str) -> bool:
        """Frees what the request holds; False when it is unknown or already over. Its
        device blocks under a copy, and its host side, go when the copy ends."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return False
        self.asks.forget(lambda ask: ask.request is r)  # their replies will be undone
        self.steps.discard(r)  # its rows in flight are wasted; no pending output is left
        was = r.state
        r.handle(E.CANCEL)
        self.stats.cancelled += 1
        self.transfers.cancelled(r, was)
        return True

    def forget_conversation(self, conversation_id: str) -> bool:
        """Releases the KV kept for a conversation that is over: its device prefix cache
        entry, and its host copy (freed once no swap pins it). False, releasing nothing,
        while a live request, a host reply or a copy in flight still uses it (the store's
        own eviction reclaims it later)."""
        if (any(r.conversation_id == conversation_id for r in self.requests.values())
                or self.transfers.in_use(conversation_id)):
            return False
        self.transfers.forget(conversation_id)
        return True

    def stop(self, request_id: str) -> bool:
        """Finishes a decoding request early (a stop string matched); False if it is not."""
        r = self.requests.get(request_id)
        if r is None or r.state is not S.RUNNING:
            return False
        self._finish(r)
        return True

    def reset_device(self) -> list[Request]:
        """The executor lost device memory (it restarted): requests whose KV was there, or
        in flight, fail; swaps in flight are dropped. The others stay."""
        self.steps.clear()
        cancelled = self.transfers.device_lost()
        failed = [r for r in self.requests.values() if r.state in ON_DEVICE]
        for r in failed:
            del self.requests[r.request_id]
            r.handle(E.FAIL)
            r.error = "executor restarted"
        for r in failed + cancelled:
            self.transfers.drop(r)
        return failed

    def swap_done(self, swap_id: int, *, ok: bool = True) -> None:
        self.transfers.swap_done(swap_id, ok)

    def host_replied(self, replies: Iterable[HostReply]) -> None:
        """Feeds back the replies to the host operations of earlier plans, in any order."""
        for reply in replies:
            self.transfers.replied(reply)

    def complete_step(self, sampled: Mapping[str, int]) -> list[Request]:
        """Applies the oldest step in flight's tokens; returns the requests that finished.
        A row whose request left meanwhile (it finished at an earlier step) is wasted."""
        finished: list[Request] = []
        rows = self.steps.complete()
        for row in rows:
            r, seq = row.request, row.seq
            if self.requests.get(seq.request_id) is not r:
                self.stats.wasted_tokens += seq.sample
                continue
            # A recomputed prompt token is served again but charged once.
            prefilled = min(row.end, len(r.prompt))
            new_prompt = max(0, prefilled - max(seq.start, r.prompt_charged))
            r.prompt_charged = max(r.prompt_charged, prefilled)
            if row.sampled_at is None:
                self.policy.on_served(r, new_prompt, 0)
                continue
            token = r.output[row.sampled_at] = sampled[seq.request_id]
            self.policy.on_served(r, new_prompt, 1)
            if r.state is S.PREFILLING:
                r.handle(E.FIRST_TOKEN)
            stopped = token in r.stop_token_ids and row.sampled_at >= r.min_tokens
            if row.sampled_at + 1 >= r.max_tokens or stopped:
                self._finish(r)
                finished.append(r)
        for row in rows if self.config.on.eager_offload else ():
            if self.requests.get(row.seq.request_id) is row.request:
                self.transfers.store(row.request, row.end)
        return finished

    def skip(self, plan: StepPlan) -> None:
        """The driver will not run the plan's batch (its swaps were refused): undone."""
        if plan.batch:
            self.steps.keep_only(plan.iteration, set())

    def steps_refused(self) -> None:
        """The steps in flight did not run (the executor refused the oldest; the later
        ones depend on it): each is undone, as if never planned."""
        self.steps.refuse_all()

    # ---- the decision ----------------------------------------------------------------

    def plan(self) -> StepPlan:
        iteration = self.stats.iterations
        self.stats.iterations += 1
        chosen = self._select()
        # A request with a row in a step in flight stays until the step is back.
        keep = {r.request_id for r, _ in chosen} | self.steps.busy()
        preemptions = [self._preempt(r) for r in list(self.requests.values())
                       if r.state in RESIDENT and r.request_id not in keep]
        swaps, self.transfers.orders = self.transfers.orders, []
        batch: list[ScheduledSeq] = []
        admitting = True
        for r, chunk in chosen:
            if r.state in RESIDENT:
                if chunk and self._grow(r, r.num_computed + chunk):
                    batch.append(self._seq(r, chunk))
            elif admitting:
                admitting = self._bring_in(r, chunk, swaps, batch)
        if batch:
            self.steps.issue(iteration, tuple(batch), self.requests)
        host_ops = self.asks.drain()
        self.stats.host_ops += len(host_ops)
        return StepPlan(iteration, tuple(batch), tuple(swaps), tuple(preemptions), host_ops,
                        self.memory.swaps.barrier(),
                        inverted(self.requests.values(), {s.request_id for s in batch}))

    def runnable(self, plan: StepPlan) -> StepPlan:
        """The plan less the sequences whose requests left its batch while its barrier
        waited (a swap-in that failed, a cancel), or none if its step was refused
        meanwhile: what the driver runs after a barrier."""
        resident = {s.request_id for s in plan.batch if (r := self.requests.get(s.request_id))
                    is not None and r.state in RESIDENT}
        kept = self.steps.keep_only(plan.iteration, resident) if plan.batch else set()
        return replace(plan, batch=tuple(s for s in plan.batch if s.request_id in kept),
                       inverted=plan.inverted and inverted(self.requests.values(), kept))

    def _select(self) -> list[tuple[Request, int]]:
        # Not one whose last pending token is its last: it finishes when its step is back.
        live = [r for r in self.requests.values()
                if r.state in SELECTABLE and len(r.output) < r.max_tokens]
        room = self.memory.room(r for r in live if r.state in RESIDENT)
        offloading = self.transfers.offloading()
        order = self._preemption.order(live, self.policy)
        return choose((self._candidate(r, offloading) for r in order), room, self.config)

    def _candidate(self, r: Request, offloading: set[str]) -> Candidate:
        kv = self.transfers.kv[r.request_id]
        cached = self.transfers.cached_tokens(r)
        host = kv.host_tokens if r.state is S.SWAPPED else 0
        # It runs once the host has answered, or once its own swap-in is done.
        later = (not cached and self.transfers.asks_host(r)) or bool(
            host and self.config.on.async_swaps)
        return Candidate(r, r.state in RESIDENT, max(host, r.num_computed, cached), later,
                         held_back=kv.host_key in offloading and not cached)

    def _preempt(self, r: Request) -> Preemption:
        r.preemptions += 1
        can_swap = bool(r.num_computed) and self.config.on.swap_preemption
        if not can_swap or self._preemption.by(r, can_swap=True) is PreemptBy.RECOMPUTE:
            self.transfers.recompute(r)
            self.stats.preempted_by_recompute += 1
            return Preemption(r.request_id, PreemptBy.RECOMPUTE)
        self.transfers.ask(r, E.PREEMPT, P.PREEMPT)  # its blocks stay until the host has room
        return Preemption(r.request_id, PreemptBy.SWAP)

    def _bring_in(
        self, r: Request, chunk: int, swaps: list[SwapOrder], batch: list[ScheduledSeq]
    ) -> bool:
        """Swaps in, asks the host about, or admits `r`; False: no fit, admissions stop."""
        if r.state is S.SWAPPED:
            order = self.transfers.swap_in(r, chunk, admission.longest(r, self.config))
            swaps += [order] if order is not None else []
            if order is not None and chunk:  # synchronous swaps: runs behind the barrier
                batch.append(self._seq(r, chunk))
            return order is not None
        cached = self.transfers.cached_tokens(r)
        if not cached and self.transfers.asks_host(r):
            self.transfers.ask(r, E.ASK_HOST, P.PREFIX)
            return True
        r.num_computed = self.transfers.take_cached(r) if cached else 0
        if not chunk or not self._grow(r, r.num_computed + chunk):
            if cached:
                self.transfers.recompute(r)  # what it took goes back to the cache
            return False
        self.stats.device_hit_tokens += r.num_computed
        r.reused_tokens += r.num_computed
        r.handle(E.ADMIT)
        batch.append(self._seq(r, chunk))
        return True

    # ---- helpers ---------------------------------------------------------------------

    def _finish(self, r: Request) -> None:
        self.steps.discard(r)  # its rows in flight are wasted
        del self.requests[r.request_id]
        r.handle(E.FINISH)
        self.stats.finished += 1
        self.transfers.finished(r)

    def _grow(self, r: Request, num_tokens: int) -> bool:
        blocks = self.config.blocks_for(num_tokens)
        return self.memory.grow(r, blocks, admission.longest(r, self.config))

    def _seq(self, r: Request, chunk: int) -> ScheduledSeq:
        start, end = r.num_computed, r.num_computed + chunk
        sample = end == r.num_tokens
        early = sample and len(r.output) < r.min_tokens  # stop tokens are not sampled yet
        tokens = tuple(r.token_slice(start, end))
        pending = tokens[-1] == PENDING  # a step in flight samples it
        return ScheduledSeq(r.request_id, self.memory.table(r), start,
                            tokens[:-1] if pending else tokens, sample,
                            banned_token_ids=tuple(sorted(r.stop_token_ids)) if early else (),
                            from_last_step=pending)

    # ---- what the drivers read -------------------------------------------------------

    def live(self) -> Iterable[Request]:
        return self.requests.values()

    def has_work(self) -> bool:
        """Live requests, swaps in flight, or swaps, host operations or replies pending."""
        return bool(self.requests or len(self.memory.swaps) or self.transfers.orders
                    or self.asks or self.steps)
