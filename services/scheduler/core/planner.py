"""The step planner: events in, `StepPlan`s out, and no calls to anything.

Each `plan()` ranks the live requests by the fairness policy and makes one selection pass:
the best-ranked ones that fit in device KV memory and the token budget stay or come in,
each with the tokens it runs this step. The other residents are preempted: by swap once the
host has reserved room for their KV, else by recompute. Then the plan swaps in or admits
the chosen and hands the driver a batch, swap orders (`swaps.SwapManager`) and host
operations (`common.kv.host_ops`).

Events come back whenever the driver has them: sampled tokens (`complete_step`), finished
copies (`swap_done`) and host replies (`host_replied`). A decision that needs a reply waits
for a later plan: a preempted request keeps its device blocks until the host answers its
`Reserve`; a new turn of a conversation asks the host for its prefix (`Pin`) and comes in,
by swap-in or by prefill, in a plan after the answer. A new turn whose conversation's KV is
still in the device prefix cache (`device_cache.DeviceCache`) takes it at once instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

from common.kv.allocator import OutOfBlocks
from common.kv.block_hash import TokenChain
from common.kv.host_ops import (
    Abort,
    Commit,
    HostOp,
    HostReply,
    Pin,
    Release,
    Reserve,
    Reserved,
    Unpin,
)
from common.kv.reuse_index import Hit, PinHandle, Reservation
from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.device_cache import DeviceCache
from services.scheduler.core.plan import (
    Direction,
    PreemptBy,
    Preemption,
    ScheduledSeq,
    StepPlan,
    SwapOrder,
)
from services.scheduler.core.policy import FairnessPolicy
from services.scheduler.core.request import RESIDENT, Request, RequestState
from services.scheduler.core.request_kv import RequestKV
from services.scheduler.core.swaps import Swap, SwapManager

S = RequestState


class Ask(Enum):
    """What a host reply decides."""

    PREEMPT = "preempt"  # host room for a preempted request's KV
    OFFLOAD = "offload"  # host room for a finished turn's KV
    STORE = "store"  # host room for a running request's newly full blocks (eager offload)
    PIN = "pin"  # host KV pinned: a swapped-out request's, or a new turn's prefix


@dataclass(slots=True)
class PlannerStats:
    iterations: int = 0
    preempted_by_swap: int = 0
    preempted_by_recompute: int = 0
    swaps_out: int = 0
    swaps_in: int = 0
    copies_out: int = 0
    copies_in: int = 0
    blocks_out: int = 0
    blocks_in: int = 0
    reuse_saved_blocks: int = 0  # swap-out blocks not copied: the host already held them
    prefix_hit_tokens: int = 0  # prompt tokens swapped in from the host instead of prefilled
    device_hit_tokens: int = 0  # prompt tokens taken from the device prefix cache
    blocks_stored: int = 0  # eager offload: blocks copied to the host while running
    host_ops: int = 0
    finished: int = 0
    cancelled: int = 0


@dataclass
class Planner:
    config: SchedulerConfig
    policy: FairnessPolicy
    fingerprint: str  # the model's, which every host KV chain starts from
    requests: dict[str, Request] = field(default_factory=dict)
    stats: PlannerStats = field(default_factory=PlannerStats)

    def __post_init__(self) -> None:
        on = self.config.on
        self.allocator = self.config.make_allocator()
        self.swaps = SwapManager(merge_copies=on.block_groups, async_swaps=on.async_swaps)
        self.cache = DeviceCache(lambda: self.allocator, self.config.block_size)
        self._kv: dict[str, RequestKV] = {}
        self._awaiting: dict[int, tuple[Request, RequestKV, Ask]] = {}  # host op id -> asker
        self._outbox: list[HostOp] = []  # host operations for the next plan
        self._orders: list[SwapOrder] = []  # swap-outs decided between plans
        self._scheduled: tuple[ScheduledSeq, ...] = ()
        self._op_ids = itertools.count(1)
        self._arrivals = itertools.count()

    # ---- events in -------------------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.state is not S.WAITING:
            raise ValueError(f"new request {request.request_id!r} is {request.state.value}")
        need = self.config.blocks_for(len(request.prompt) + request.max_tokens)
        if need > self.config.num_device_blocks:
            raise ValueError(
                f"request needs {need} KV blocks at its longest; the device holds "
                f"{self.config.num_device_blocks}"
            )
        request.arrival = next(self._arrivals)
        self.policy.on_arrival(request, self.requests.values())
        self.requests[request.request_id] = request
        reuse = self.config.on.host_reuse
        self._kv[request.request_id] = RequestKV(
            host_key=request.kv_key if reuse else f"swap:{request.request_id}",
            private=not reuse or request.conversation_id is None,
            chain=TokenChain(self.config.block_size, self.fingerprint),
        )

    def set_priority(
        self, priority: int, *, request_id: str | None = None, client_id: str | None = None
    ) -> int:
        """Returns how many live requests changed."""
        hits = [
            r
            for r in self.requests.values()
            if r.request_id == request_id or (client_id is not None and r.client_id == client_id)
        ]
        for r in hits:
            r.priority = priority
        return len(hits)

    def cancel(self, request_id: str) -> bool:
        """Frees what the request holds; False when it is unknown or already over. Its
        device blocks under a copy, and its host side, go when the copy ends."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return False
        kv = self._kv[request_id]
        if kv.awaiting is not None:  # its reply will be undone
            del self._awaiting[kv.awaiting]
            kv.awaiting = None
        was, r.state = r.state, S.CANCELLED
        self.stats.cancelled += 1
        mine = {s.order.swap_id for s in self.swaps if s.request is r}
        for order in [o for o in self._orders if o.swap_id in mine]:  # never sent: dropped
            self._orders.remove(order)
            self.swap_done(order.swap_id, ok=False)
        if any(s.request is r and s.order.direction is Direction.IN for s in self.swaps):
            self.swaps.cancel_in(self.allocator, r)
            return True
        if was is S.SWAPPING_OUT and any(s.request is r for s in self.swaps):
            return True  # the rest when its copy ends
        self._release(r)
        self._drop(r)
        return True

    def forget_conversation(self, conversation_id: str) -> bool:
        """Releases the KV kept for a conversation that is over: its device prefix cache
        entry, and its host copy (freed once no swap pins it). False, releasing nothing,
        while a live request, a host reply or a copy in flight still uses it (the store's
        own eviction reclaims it later)."""
        busy = (
            any(r.conversation_id == conversation_id for r in self.requests.values())
            or any(s.kv.host_key == conversation_id for s in self.swaps)
            or any(kv.host_key == conversation_id for _, kv, _ in self._awaiting.values())
        )
        if busy:
            return False
        self.cache.drop(conversation_id, self.swaps.claim)
        self._outbox.append(Release(conversation_id))
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
        in flight, fail; swaps in flight are dropped. Waiting and swapped requests stay."""
        dropped = self.swaps.reset()
        self._outbox += [Abort(s.reservation_id) for s in dropped if s.reservation_id]
        self._orders.clear()
        self._scheduled = ()
        self.cache.clear()
        for op_id, (r, kv, _) in list(self._awaiting.items()):
            if r.state is not S.WAITING:  # a reservation for device KV that is gone
                del self._awaiting[op_id]
                kv.awaiting = None
        busy = (*RESIDENT, S.SWAPPING_OUT, S.SWAPPING_IN)
        failed = [r for r in self.requests.values() if r.state in busy]
        for r in failed:
            del self.requests[r.request_id]
            r.state = S.FAILED
            r.error = "executor restarted"
        for r in failed + [s.request for s in dropped if s.request.state is S.CANCELLED]:
            self._drop(r)
        self.allocator = self.config.make_allocator()
        return failed

    def swap_done(self, swap_id: int, *, ok: bool = True) -> None:
        swap = self.swaps.done(self.allocator, swap_id)
        if swap.order.direction is Direction.OUT:
            self._swap_out_done(swap, ok)
        else:
            self._swap_in_done(swap, ok)

    def host_replied(self, replies: Iterable[HostReply]) -> None:
        """Feeds back the replies to the host operations of earlier plans. A reply that
        nobody waits for any more (its request was cancelled or lost its KV) is undone."""
        for reply in replies:
            asker = self._awaiting.pop(reply.op_id, None)
            if asker is not None and asker[1].awaiting == reply.op_id:
                asker[1].awaiting = None
            if isinstance(reply, Reserved):
                if asker is not None:
                    self._reserved(*asker, reply.reservation)
                elif reply.reservation is not None:
                    self._outbox.append(Abort(reply.reservation.reservation_id))
            elif asker is not None:
                self._pinned(asker[0], asker[1], reply.hit, reply.pin)
            else:
                self._outbox.append(Unpin(reply.pin.pin_id))

    def complete_step(self, sampled: Mapping[str, int]) -> list[Request]:
        """Applies the last plan's results; returns the requests that finished."""
        finished: list[Request] = []
        scheduled, self._scheduled = self._scheduled, ()
        for seq in scheduled:
            r = self.requests.get(seq.request_id)
            if r is None or r.state not in RESIDENT:
                continue  # cancelled while the step ran
            r.num_computed = seq.start + len(seq.token_ids)
            # A recomputed prompt token is served again but charged once.
            prefilled = min(r.num_computed, len(r.prompt))
            new_prompt = max(0, prefilled - max(seq.start, r.prompt_charged))
            r.prompt_charged = max(r.prompt_charged, prefilled)
            if not seq.sample:
                self.policy.on_served(r, new_prompt, 0)
                continue
            token = sampled[seq.request_id]
            r.output.append(token)
            self.policy.on_served(r, new_prompt, 1)
            if r.state is S.PREFILLING:
                r.move(S.RUNNING)
            if len(r.output) >= r.max_tokens or token in r.stop_token_ids:
                self._finish(r)
                finished.append(r)
        if self.config.on.eager_offload:
            for seq in scheduled:
                r = self.requests.get(seq.request_id)
                if r is not None and r.state in RESIDENT:
                    self._store(r, self._kv[r.request_id])
        return finished

    # ---- the decision ----------------------------------------------------------------

    def plan(self) -> StepPlan:
        iteration = self.stats.iterations
        self.stats.iterations += 1
        chosen = self._select()
        keep = {r.request_id for r, _ in chosen}
        preemptions = [
            self._preempt(r)
            for r in list(self.requests.values())
            if r.state in RESIDENT and r.request_id not in keep
        ]
        swaps, self._orders = self._orders, []
        batch: list[ScheduledSeq] = []
        admitting = True
        for r, chunk in chosen:
            if r.state in RESIDENT:
                if chunk and self._grow(r, self.config.blocks_for(r.num_computed + chunk)):
                    batch.append(self._seq(r, chunk))
            elif admitting:
                admitting = self._bring_in(r, chunk, swaps, batch)
        self._scheduled = tuple(batch)
        host_ops, self._outbox = tuple(self._outbox), []
        self.stats.host_ops += len(host_ops)
        return StepPlan(
            iteration, tuple(batch), tuple(swaps), tuple(preemptions), host_ops,
            self.swaps.barrier(),
        )

    def runnable(self, plan: StepPlan) -> StepPlan:
        """The plan less the sequences whose requests left its batch while its barrier
        waited (a swap-in that failed, a cancel): what the driver runs after a barrier."""
        batch = tuple(
            s for s in plan.batch
            if (r := self.requests.get(s.request_id)) is not None and r.state in RESIDENT
        )
        self._scheduled = batch
        return replace(plan, batch=batch)

    def _select(self) -> list[tuple[Request, int]]:
        """The one selection pass: the requests that run or come in this step, each with
        the tokens it runs (0: it only swaps in, or asks the host first). Residents stay
        while they fit; waiting and swapped ones come in until the first that does not."""
        live = [
            r
            for r in self.requests.values()
            if r.state in (*RESIDENT, S.WAITING, S.SWAPPED)
            and self._kv[r.request_id].awaiting is None
        ]
        rank = self.policy.rank
        if self.policy.preemptive:
            order = sorted(live, key=rank)
        else:
            order = sorted((r for r in live if r.state in RESIDENT), key=rank) + sorted(
                (r for r in live if r.state not in RESIDENT), key=rank
            )
        # Draining blocks count as room: they return as soon as their copy ends, and a
        # request that must wait for them should not push out those that already fit.
        room = (
            self.allocator.num_free
            + self.allocator.num_draining
            + self.cache.num_blocks
            + sum(self.allocator.num_blocks_of(r) for r in live if r.state in RESIDENT)
        )
        # A conversation's next turn waits while its last turn's KV is on its way to the
        # host: that copy is about to make the turn's whole prefix reusable.
        offloading = self.swaps.offloading() | {
            kv.host_key for _, kv, ask in self._awaiting.values() if ask is Ask.OFFLOAD
        }
        budget, chosen, admitting = self.config.max_batched_tokens, [], True
        for r in order:
            if len(chosen) == self.config.max_num_seqs:
                break
            kv = self._kv[r.request_id]
            resident = r.state in RESIDENT
            cached = self._cached(r, kv)
            if not resident and (not admitting or (kv.host_key in offloading and not cached)):
                continue
            host = kv.host_tokens if r.state is S.SWAPPED else 0
            start = max(host, r.num_computed, cached)
            chunk = min(r.num_tokens - start, budget)
            # It runs once the host has answered, or once its own swap-in is done.
            later = (not cached and self._asks_host(r, kv)) or bool(
                host and self.config.on.async_swaps
            )
            if not chunk and not resident and not later:
                admitting = False  # no token budget left to start anything new
                continue
            # Room for at least its next token, or a swap-in would be pushed straight out.
            blocks = self.config.blocks_for(start + max(chunk, 1))
            if blocks > room:
                admitting = False
                continue
            if later:
                chunk = 0
            room -= blocks
            budget -= chunk
            chosen.append((r, chunk))
        return chosen

    def _preempt(self, r: Request) -> Preemption:
        r.preemptions += 1
        if not (r.num_computed and self.config.on.swap_preemption):
            self._recompute(r)
            self.stats.preempted_by_recompute += 1
            return Preemption(r.request_id, PreemptBy.RECOMPUTE)
        self._ask(r, self._kv[r.request_id], Ask.PREEMPT, r.num_computed)
        r.move(S.SWAPPING_OUT)  # its device blocks stay until the host has made room
        return Preemption(r.request_id, PreemptBy.SWAP)

    def _bring_in(
        self, r: Request, chunk: int, swaps: list[SwapOrder], batch: list[ScheduledSeq]
    ) -> bool:
        """Swaps in, asks the host about, or admits one request; False when it did not
        fit (admissions stop)."""
        kv = self._kv[r.request_id]
        if r.state is S.SWAPPED:
            return self._swap_in(r, kv, chunk, swaps, batch)
        cached = self._cached(r, kv)
        if not cached and self._asks_host(r, kv):
            self._ask(r, kv, Ask.PIN, r.num_tokens)
            return True
        if cached:
            r.num_computed = self.cache.take(
                kv.host_key, kv.hashes(r.tokens), r.num_tokens, r, self.swaps.claim
            )
        if not chunk or not self._grow(r, self.config.blocks_for(r.num_computed + chunk)):
            if cached:
                self._recompute(r)  # what it took goes back to the cache
            return False
        if cached:
            self.stats.device_hit_tokens += r.num_computed
            r.reused_tokens += r.num_computed
        r.move(S.PREFILLING)
        batch.append(self._seq(r, chunk))
        return True

    def _swap_in(
        self,
        r: Request,
        kv: RequestKV,
        chunk: int,
        swaps: list[SwapOrder],
        batch: list[ScheduledSeq],
    ) -> bool:
        n = self.config.blocks_for(kv.host_tokens)
        total = max(n, self.config.blocks_for(kv.host_tokens + chunk))
        try:
            device = self._allocate(r, total, expected=self._expected(r, total))
        except OutOfBlocks:
            return False
        order = self.swaps.swap_in(r, kv, device[:n]).order
        r.num_computed = kv.host_tokens
        if kv.prefix_hit:
            self.stats.prefix_hit_tokens += kv.host_tokens
            r.reused_tokens += kv.host_tokens
        r.move(S.SWAPPING_IN)
        swaps.append(order)
        self.stats.swaps_in += 1
        self.stats.copies_in += len(order.copies)
        self.stats.blocks_in += n
        if chunk:  # synchronous swaps: the plan's barrier lets it run in this very step
            batch.append(self._seq(r, chunk))
        return True

    # ---- host replies and finished copies --------------------------------------------

    def _reserved(self, r: Request, kv: RequestKV, ask: Ask, res: Reservation | None) -> None:
        """Host room for a preempted request's KV, a finished turn's (offload), or a
        running request's newly full blocks (store)."""
        source: Hashable | None = r
        if ask is Ask.STORE and r.state not in RESIDENT:
            self._store_ended(r, kv, res, ok=False)  # it left meanwhile
            return
        if ask is Ask.OFFLOAD and self.config.on.device_cache:
            source = self.cache.entry(kv.host_key, origin=r)  # None: evicted meanwhile
        if res is None or source is None:
            if res is not None:
                self._outbox.append(Abort(res.reservation_id))
            if ask is Ask.PREEMPT:
                self._recompute(r)
                self.stats.preempted_by_recompute += 1
            elif ask is Ask.OFFLOAD and source is r:
                self._release(r)
            elif ask is Ask.STORE:
                self._store_ended(r, kv, None, ok=False)
            return
        swap = self.swaps.swap_out(
            self.allocator, r, kv, source=source, skip=len(res.valid_blocks),
            host_blocks=res.new_blocks, reservation_id=res.reservation_id,
            offload_only=ask is Ask.OFFLOAD, keep=source is not r or ask is Ask.STORE,
        )
        if ask is Ask.STORE:
            kv.storing = res.num_tokens // self.config.block_size
        self.stats.reuse_saved_blocks += len(res.valid_blocks)
        self.stats.preempted_by_swap += ask is Ask.PREEMPT
        if not swap.order.copies:
            self._swap_out_done(swap, ok=True)
            return
        self._orders.append(swap.order)
        self.stats.swaps_out += 1
        self.stats.copies_out += len(swap.order.copies)
        self.stats.blocks_out += len(swap.reads)

    def _swap_out_done(self, swap: Swap, ok: bool) -> None:
        r, kv = swap.request, swap.kv
        assert swap.reservation_id is not None
        self._outbox.append(Commit(swap.reservation_id) if ok else Abort(swap.reservation_id))
        if swap.kept and not swap.offload_only:
            cancelled = r.state is S.CANCELLED
            if cancelled:
                kv.offload_after_store = False  # nothing is left to offload
            self._store_ended(r, kv, None, ok)
            if cancelled and not any(s.request is r for s in self.swaps):
                self._release(r)  # its cancel waited for this copy (see `cancel`)
                self._drop(r)
        elif r.state is S.CANCELLED:
            self._drop(r)
        elif r.state is S.SWAPPING_OUT and not ok:
            self._recompute(r, keep_kv=False)  # its device KV is gone
        elif r.state is S.SWAPPING_OUT:  # pin what the host now holds, for its swap-in
            self._ask(r, kv, Ask.PIN, r.num_computed)

    def _pinned(self, r: Request, kv: RequestKV, hit: Hit, pin: PinHandle) -> None:
        """Host KV pinned for a swapped-out request, or a new turn's prefix."""
        prefix = r.state is S.WAITING
        usable = min(hit.num_tokens, r.num_tokens - 1) if prefix else hit.num_tokens
        if usable < (self.config.block_size if prefix else 1):
            self._outbox.append(Unpin(pin.pin_id))
            if prefix:
                kv.asked = True  # prefill it
            else:
                self._recompute(r)  # the commit was refused: recompute
            return
        kv.pin, kv.host_tokens, kv.prefix_hit = pin, usable, prefix
        self.cache.drop(kv.host_key, self.swaps.claim)  # older than what the host holds
        r.move(S.SWAPPED)

    def _swap_in_done(self, swap: Swap, ok: bool) -> None:
        r, kv = swap.request, swap.kv
        if kv.pin is not None:
            self._outbox.append(Unpin(kv.pin.pin_id))
            kv.pin = None
        kv.host_tokens, kv.prefix_hit = 0, False
        if r.state is S.CANCELLED:
            self._drop(r)
        elif not ok:
            self._recompute(r, keep_kv=False)  # its blocks hold a failed copy
        else:
            if not self.config.on.host_reuse:  # the baseline drops its host copy
                self._outbox.append(Release(kv.host_key))
            decoding = bool(r.output) and r.num_computed == r.num_tokens - 1
            r.move(S.RUNNING if decoding else S.PREFILLING)

    # ---- helpers ---------------------------------------------------------------------

    def _finish(self, r: Request) -> None:
        """A finished turn of a conversation keeps its device blocks until the host has
        made room for its KV (turn offload); otherwise they are freed now."""
        del self.requests[r.request_id]
        r.move(S.FINISHED)
        self.stats.finished += 1
        kv = self._kv[r.request_id]
        tokens = r.token_slice(0, r.num_computed)
        if self.config.on.device_cache and not kv.private:
            self.cache.put(r, kv.host_key, kv.hashes(tokens), len(tokens), self.swaps.claim)
        if not (self.config.on.turn_offload and not kv.private):
            self._release(r)
        elif kv.storing:  # after that store: the host then holds its prefix
            kv.offload_after_store = True
        else:
            self._ask(r, kv, Ask.OFFLOAD, r.num_computed)
        self._drop(r)

    def _store(self, r: Request, kv: RequestKV) -> None:
        """Eager offload: a running request's newly full blocks go to the host."""
        full = r.num_computed // self.config.block_size
        if kv.storing or kv.private or full <= kv.stored_blocks:
            return
        kv.storing = full
        self._ask(r, kv, Ask.STORE, full * self.config.block_size)

    def _store_ended(self, r: Request, kv: RequestKV, res: Reservation | None, ok: bool) -> None:
        if res is not None:  # the request left before its store could start
            self._outbox.append(Abort(res.reservation_id))
        elif ok:
            self.stats.blocks_stored += kv.storing - kv.stored_blocks
            kv.stored_blocks = kv.storing
        kv.storing = 0
        if kv.offload_after_store:
            kv.offload_after_store = False
            self._ask(r, kv, Ask.OFFLOAD, r.num_computed)

    def _drop(self, r: Request) -> None:
        """The one place a request's KV state goes: its pin and private host copy too."""
        kv = self._kv.pop(r.request_id, None)
        if kv is None:
            return
        if kv.pin is not None:
            self._outbox.append(Unpin(kv.pin.pin_id))
            kv.pin = None
        if kv.private:
            self._outbox.append(Release(kv.host_key))

    def _recompute(self, r: Request, *, keep_kv: bool = True) -> None:
        """Back to waiting, its KV gone, or (`keep_kv`: it is sound) left in the device
        prefix cache."""
        kv = self._kv[r.request_id]
        if keep_kv and self.config.on.device_cache and r.num_computed >= self.config.block_size:
            tokens = r.token_slice(0, r.num_computed)
            self.cache.put(r, kv.host_key, kv.hashes(tokens), len(tokens), self.swaps.claim)
        else:
            self._release(r)
        r.num_computed = 0
        kv.asked = False
        if r.state is not S.WAITING:
            r.move(S.WAITING)

    def _release(self, owner: Hashable) -> None:
        """Frees an owner's device blocks; those a copy still reads drain until it ends."""
        self.allocator.release(owner, draining=self.swaps.claim(self.allocator.table(owner)))

    def _cached(self, r: Request, kv: RequestKV) -> int:
        """Tokens a waiting request would take from the device prefix cache."""
        if r.state is not S.WAITING or kv.host_key not in self.cache:
            return 0
        return self.cache.peek(kv.host_key, kv.hashes(r.tokens), r.num_tokens)

    def _allocate(self, r: Request, n: int, *, expected: int) -> list[int]:
        """`allocate`, evicting from the device prefix cache as far as needed."""
        if n > self.allocator.num_free:
            self.cache.evict(n - self.allocator.num_free, self.swaps.claim)
        return self.allocator.allocate(r, n, expected=expected)

    def _asks_host(self, r: Request, kv: RequestKV) -> bool:
        """A new turn asks the host for its conversation's prefix before it is admitted
        (unless it has no history worth a block)."""
        history = r.history_tokens
        return (
            r.state is S.WAITING
            and self.config.on.host_reuse
            and not (kv.private or kv.asked)
            and (history is None or history >= self.config.block_size)
        )

    def _ask(self, r: Request, kv: RequestKV, ask: Ask, num_tokens: int) -> None:
        """Asks the host to pin (`Ask.PIN`) or reserve (the others) the KV of the request's
        first `num_tokens` tokens; the reply decides `ask`. Only a store lets the request
        run meanwhile."""
        tokens = r.token_slice(0, num_tokens)
        kind = Pin if ask is Ask.PIN else Reserve
        op = kind(next(self._op_ids), kv.host_key, kv.hashes(tokens), len(tokens))
        if ask is not Ask.STORE:
            kv.awaiting = op.op_id
        self._awaiting[op.op_id] = (r, kv, ask)
        self._outbox.append(op)

    def _grow(self, r: Request, blocks: int) -> bool:
        have = self.allocator.num_blocks_of(r)
        if blocks <= have:
            return True
        try:
            self._allocate(r, blocks - have, expected=self._expected(r, blocks))
        except OutOfBlocks:
            return False
        return True

    def _expected(self, r: Request, blocks: int) -> int:
        """Blocks the request will still want after `blocks`: sizes its block group."""
        return max(0, self.config.blocks_for(len(r.prompt) + r.max_tokens) - blocks)

    def _seq(self, r: Request, chunk: int) -> ScheduledSeq:
        start = r.num_computed
        end = start + chunk
        return ScheduledSeq(
            r.request_id,
            self.allocator.table(r),
            start,
            tuple(r.token_slice(start, end)),
            sample=end == r.num_tokens,
        )

    def live(self) -> Iterable[Request]:
        return self.requests.values()

    def swaps_in_flight(self) -> int:
        return len(self.swaps)

    def swapped_blocks(self) -> int:
        """Host blocks pinned for swapped-out requests."""
        return sum(len(kv.pin.blocks) for kv in self._kv.values() if kv.pin is not None)

    def has_work(self) -> bool:
        """Live requests, swaps in flight, or swaps, host operations or replies pending."""
        return bool(self.requests or len(self.swaps) or self._orders or self._outbox
                    or self._awaiting)
