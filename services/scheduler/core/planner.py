"""The step planner: events in, `StepPlan`s out.

Each `plan()` ranks the live requests by the fairness policy, keeps the best-ranked ones
that fit in device KV memory, preempts the rest (swap, or recompute when the host has no
room), swaps in or admits what now fits, and hands the driver a batch under the token
budget. Swap completions (`swap_done`) and sampled tokens (`complete_step`) come back as
events whenever the driver has them.

In fastswitch mode a request waits only for its own swap: swapped-out blocks drain until
their copy ends, and a swapped-in request runs from the step after its copy ends. In
baseline mode the plan carries a barrier, as vLLM's synchronous swap does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from common.kv.allocator import OutOfBlocks
from common.kv.block_hash import TokenChain
from common.kv.reuse_index import HostCapacityExhausted, PinHandle, StaleReservation
from common.kv.swap_plan import plan_copies
from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.host import HostKV
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

S = RequestState


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
    finished: int = 0
    cancelled: int = 0


@dataclass(slots=True)
class _Swap:
    order: SwapOrder
    request: Request
    host_key: str
    draining: tuple[int, ...] = ()  # device blocks to release when the copy ends
    reservation_id: int | None = None
    pin: PinHandle | None = None
    offload_only: bool = False  # a finished turn's KV kept for the next turn


@dataclass
class Planner:
    config: SchedulerConfig
    policy: FairnessPolicy
    host: HostKV
    requests: dict[str, Request] = field(default_factory=dict)
    stats: PlannerStats = field(default_factory=PlannerStats)

    def __post_init__(self) -> None:
        if self.host.block_size != self.config.block_size:
            raise ValueError("host and device block sizes differ")
        self.allocator = self.config.make_allocator()
        self._swaps: dict[int, _Swap] = {}
        self._swapped_kv: dict[str, tuple[int, PinHandle]] = {}  # request -> (tokens, pin)
        self._host_keys: dict[str, str] = {}  # request -> where its swapped KV lives
        self._chains: dict[str, TokenChain] = {}  # request -> its tokens' hash chain
        # Host prefix a waiting request would get, valid while the host epoch is unchanged;
        # the epoch moves whenever this planner changes what the host holds.
        self._prefix_hits: dict[str, tuple[int, int]] = {}
        self._host_epoch = 0
        self._scheduled: tuple[ScheduledSeq, ...] = ()
        self._offloads: list[SwapOrder] = []  # finished turns' swap-outs, for the next plan
        self._ids = itertools.count(1)
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
        """Frees what the request holds; False when it is unknown or already over."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return False
        if r.state in RESIDENT:
            self.allocator.release(request_id)
        elif r.state is S.SWAPPED:
            _, pin = self._swapped_kv.pop(request_id)
            self.host.unpin(pin.pin_id)
        elif r.state is S.SWAPPING_IN:  # the copy still writes these blocks
            swap = next(s for s in self._swaps.values() if s.request is r)
            swap.draining = self.allocator.table(request_id)
            self.allocator.release(request_id, draining=swap.draining)
        if r.state not in (S.SWAPPING_OUT, S.SWAPPING_IN):  # else when the copy ends
            self._forget_private_kv(r)
        self._chains.pop(request_id, None)
        r.state = S.CANCELLED
        self.stats.cancelled += 1
        return True

    def forget_conversation(self, conversation_id: str) -> bool:
        """Releases the host KV kept for a conversation that is over (its blocks are freed
        once no swap pins them); False, releasing nothing, while a live request or a copy
        in flight still uses it (the store's own eviction reclaims it later)."""
        if self._offloads or any(r.conversation_id == conversation_id
                                 for r in self.requests.values()) or any(
                s.host_key == conversation_id for s in self._swaps.values()):
            return False
        self._host_epoch += 1
        self.host.release(conversation_id)
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
        for swap in self._swaps.values():
            if swap.reservation_id is not None:
                self.host.abort(swap.reservation_id)
            if swap.pin is not None:
                self.host.unpin(swap.pin.pin_id)
        self._swaps.clear()
        self._offloads.clear()
        self._scheduled = ()
        busy = (*RESIDENT, S.SWAPPING_OUT, S.SWAPPING_IN)
        failed = [r for r in self.requests.values() if r.state in busy]
        for r in failed:
            del self.requests[r.request_id]
            r.state = S.FAILED
            r.error = "executor restarted"
            self._forget_private_kv(r)
            self._chains.pop(r.request_id, None)
        self.allocator = self.config.make_allocator()
        return failed

    def swap_done(self, swap_id: int, *, ok: bool = True) -> None:
        swap = self._swaps.pop(swap_id)
        r = swap.request
        if swap.draining:
            self.allocator.release_draining(swap.draining)
        if swap.order.direction is Direction.OUT:
            self._swap_out_done(swap, r, ok)
        else:
            self._swap_in_done(swap, r, ok)

    def complete_step(self, sampled: Mapping[str, int]) -> list[Request]:
        """Applies the last plan's results; returns the requests that finished."""
        finished: list[Request] = []
        scheduled, self._scheduled = self._scheduled, ()
        for seq in scheduled:
            r = self.requests.get(seq.request_id)
            if r is None or r.state not in RESIDENT:
                continue  # cancelled while the step ran
            r.num_computed = seq.start + len(seq.token_ids)
            new_prompt = max(0, min(r.num_computed, len(r.prompt)) - seq.start)
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
        return finished

    # ---- the decision ----------------------------------------------------------------

    def plan(self) -> StepPlan:
        iteration = self.stats.iterations
        self.stats.iterations += 1
        wanted = self._choose_resident()
        keep = {r.request_id for r in wanted}
        swaps, self._offloads = self._offloads, []
        preemptions = [
            self._preempt(r, swaps)
            for r in list(self.requests.values())
            if r.state in RESIDENT and r.request_id not in keep
        ]
        batch: list[ScheduledSeq] = []
        budget, admitting = self.config.max_batched_tokens, True
        for r in wanted:
            chunk = min(r.num_tokens - r.num_computed, budget)
            if r.state in RESIDENT:
                if chunk and self._grow(r, self.config.blocks_for(r.num_computed + chunk)):
                    batch.append(self._seq(r, chunk))
                    budget -= chunk
            elif admitting:
                fed = self._bring_in(r, chunk, swaps, batch)
                admitting = fed is not None
                budget -= fed or 0
        self._scheduled = tuple(batch)
        barrier = not self.config.async_swaps and bool(self._swaps)
        return StepPlan(iteration, tuple(batch), tuple(swaps), tuple(preemptions), barrier)

    def _choose_resident(self) -> list[Request]:
        """The best-ranked requests whose KV fits on the device this step: residents are
        kept while they fit; waiting and swapped ones are taken until the first misfit."""
        live = [r for r in self.requests.values() if r.state in (*RESIDENT, S.WAITING, S.SWAPPED)]
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
            + sum(self.allocator.num_blocks_of(r.request_id) for r in live if r.state in RESIDENT)
        )
        # A conversation's next turn waits while its last turn's KV is still being copied
        # to the host: the copy is about to make that turn's whole prefix reusable.
        offloading = {s.host_key for s in self._swaps.values() if s.offload_only}
        budget, wanted, admitting = self.config.max_batched_tokens, [], True
        for r in order:
            if len(wanted) == self.config.max_num_seqs:
                break
            if r.state not in RESIDENT and not admitting:
                continue
            if r.state is S.WAITING and r.kv_key in offloading:
                continue
            kv = self._kv_to_swap_in(r)
            chunk = min(r.num_tokens - max(kv, r.num_computed), budget)
            if kv and self.config.async_swaps:
                chunk = 0  # runs once its own swap-in is done
            elif not chunk and r.state not in RESIDENT:
                admitting = False  # no token budget left to start anything new
                continue
            # Room for at least its next token, or a swap-in would be pushed straight out.
            blocks = self.config.blocks_for(max(kv, r.num_computed) + max(chunk, 1))
            if blocks > room:
                admitting = False
                continue
            room -= blocks
            budget -= chunk
            wanted.append(r)
        return wanted

    def _kv_to_swap_in(self, r: Request) -> int:
        """Tokens of KV the host would give `r` on admission (0 for residents)."""
        if r.state is S.SWAPPED:
            return self._swapped_kv[r.request_id][0]
        if r.state is S.WAITING and self.config.reuse and r.conversation_id is not None:
            epoch, usable = self._prefix_hits.get(r.request_id, (-1, 0))
            if epoch != self._host_epoch:
                tokens = r.tokens
                hit = self.host.lookup(r.kv_key, tokens, self._chain(r, tokens))
                usable = min(hit.num_tokens, r.num_tokens - 1)
                usable = usable if usable >= self.config.block_size else 0
                self._prefix_hits[r.request_id] = (self._host_epoch, usable)
            return usable
        return 0

    def _preempt(self, r: Request, swaps: list[SwapOrder]) -> Preemption:
        r.preemptions += 1
        order = self._swap_out(r, offload_only=False) if r.num_computed else None
        if order is None:
            self.allocator.release(r.request_id)
            r.num_computed = 0
            r.move(S.WAITING)
            self.stats.preempted_by_recompute += 1
            return Preemption(r.request_id, PreemptBy.RECOMPUTE)
        if order.copies:
            swaps.append(order)
        self.stats.preempted_by_swap += 1
        return Preemption(r.request_id, PreemptBy.SWAP)

    def _swap_out(self, r: Request, *, offload_only: bool) -> SwapOrder | None:
        """Copies the KV the host lacks; None when the host has no room for it."""
        key = self._host_key(r)
        self._host_epoch += 1
        try:
            tokens = r.token_slice(0, r.num_computed)
            res = self.host.reserve(key, tokens, self._chain(r, tokens))
        except HostCapacityExhausted:
            return None
        table = self.allocator.table(r.request_id)
        done = len(res.valid_blocks)
        src = table[done : done + len(res.new_blocks)]
        copies = plan_copies(src, res.new_blocks, merge=self.config.merge_copies)
        self.allocator.release(r.request_id, draining=src)
        order = SwapOrder(next(self._ids), r.request_id, Direction.OUT, tuple(copies))
        swap = _Swap(order, r, key, src, res.reservation_id, offload_only=offload_only)
        self.stats.reuse_saved_blocks += done
        if not offload_only:
            r.move(S.SWAPPING_OUT)
        if copies:
            self._swaps[order.swap_id] = swap
            self.stats.swaps_out += 1
            self.stats.copies_out += len(copies)
            self.stats.blocks_out += len(src)
        else:
            self._swap_out_done(swap, r, ok=True)
        return order

    def _swap_out_done(self, swap: _Swap, r: Request, ok: bool) -> None:
        assert swap.reservation_id is not None
        self._host_epoch += 1
        if not ok:
            self.host.abort(swap.reservation_id)
        else:
            try:
                self.host.commit(swap.reservation_id)
            except StaleReservation:  # the conversation moved on meanwhile (commit aborted)
                ok = False
        if r.state is S.CANCELLED:
            self._forget_private_kv(r)
        elif r.state is S.SWAPPING_OUT and not ok:
            r.num_computed = 0  # its device KV is gone: recompute
            r.move(S.WAITING)
        elif r.state is S.SWAPPING_OUT:
            tokens = r.token_slice(0, r.num_computed)
            hit, pin = self.host.pin(swap.host_key, tokens, self._chain(r, tokens))
            self._swapped_kv[r.request_id] = (hit.num_tokens, pin)
            r.move(S.SWAPPED)

    def _bring_in(
        self, r: Request, chunk: int, swaps: list[SwapOrder], batch: list[ScheduledSeq]
    ) -> int | None:
        """Swaps in or admits one request: the tokens it runs this step, or None when it
        did not fit (admissions stop)."""
        if r.state is S.SWAPPED:
            num_tokens, pin = self._swapped_kv[r.request_id]
            return self._swap_in(r, num_tokens, pin, chunk, swaps, batch)
        usable = self._kv_to_swap_in(r)
        if usable:
            tokens = r.token_slice(0, usable)
            hit, pin = self.host.pin(r.kv_key, tokens, self._chain(r, tokens))
            # The host may have evicted part of it since the lookup: use what is pinned.
            fed = None
            if hit.num_tokens >= self.config.block_size:
                fed = self._swap_in(r, hit.num_tokens, pin, chunk, swaps, batch)
            if fed is not None:
                self.stats.prefix_hit_tokens += hit.num_tokens
                r.reused_tokens += hit.num_tokens
                return fed
            self.host.unpin(pin.pin_id)
            if hit.num_tokens >= self.config.block_size:
                return None  # it did not fit
        if not chunk or not self._grow(r, self.config.blocks_for(chunk)):
            return None
        r.move(S.PREFILLING)
        batch.append(self._seq(r, chunk))
        return chunk

    def _swap_in(
        self,
        r: Request,
        num_tokens: int,
        pin: PinHandle,
        chunk: int,
        swaps: list[SwapOrder],
        batch: list[ScheduledSeq],
    ) -> int | None:
        n = self.config.blocks_for(num_tokens)
        chunk = 0 if self.config.async_swaps else min(chunk, r.num_tokens - num_tokens)
        total = max(n, self.config.blocks_for(num_tokens + chunk))
        try:
            device = self.allocator.allocate(r.request_id, total, expected=self._expected(r, total))
        except OutOfBlocks:
            return None
        self._swapped_kv.pop(r.request_id, None)
        copies = plan_copies(pin.blocks[:n], device[:n], merge=self.config.merge_copies)
        order = SwapOrder(next(self._ids), r.request_id, Direction.IN, tuple(copies))
        self._swaps[order.swap_id] = _Swap(order, r, self._host_key(r), pin=pin)
        r.num_computed = num_tokens
        r.move(S.SWAPPING_IN)
        swaps.append(order)
        self.stats.swaps_in += 1
        self.stats.copies_in += len(copies)
        self.stats.blocks_in += n
        if chunk:
            batch.append(self._seq(r, chunk))
        return chunk

    def _swap_in_done(self, swap: _Swap, r: Request, ok: bool) -> None:
        assert swap.pin is not None
        self.host.unpin(swap.pin.pin_id)
        if r.state is S.CANCELLED:
            self._forget_private_kv(r)
            return
        if not ok:
            self.allocator.release(r.request_id)
            r.num_computed = 0
            r.move(S.WAITING)
            return
        if not self.config.reuse:
            self._forget_private_kv(r)
        decoding = bool(r.output) and r.num_computed == r.num_tokens - 1
        r.move(S.RUNNING if decoding else S.PREFILLING)

    # ---- helpers ---------------------------------------------------------------------

    def _finish(self, r: Request) -> None:
        del self.requests[r.request_id]
        r.move(S.FINISHED)
        self.stats.finished += 1
        keep = self.config.reuse and self.config.offload_finished and r.conversation_id
        order = self._swap_out(r, offload_only=True) if keep else None
        if order is None:
            self.allocator.release(r.request_id)
        elif order.copies:
            self._offloads.append(order)
        self._forget_private_kv(r)
        self._chains.pop(r.request_id, None)

    def _grow(self, r: Request, blocks: int) -> bool:
        have = self.allocator.num_blocks_of(r.request_id)
        if blocks <= have:
            return True
        try:
            self.allocator.allocate(r.request_id, blocks - have, expected=self._expected(r, blocks))
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
            self.allocator.table(r.request_id),
            start,
            tuple(r.token_slice(start, end)),
            sample=end == r.num_tokens,
        )

    def _host_key(self, r: Request) -> str:
        """Reuse keys KV by conversation; the baseline keeps each swap private."""
        if self.config.reuse:
            return r.kv_key
        return self._host_keys.setdefault(r.request_id, f"swap:{r.request_id}")

    def _chain(self, r: Request, tokens: list[int]) -> list[bytes]:
        chain = self._chains.get(r.request_id)
        if chain is None:
            chain = self._chains[r.request_id] = TokenChain(
                self.config.block_size, self.host.fingerprint
            )
        return chain.hashes(tokens)

    def _forget_private_kv(self, r: Request) -> None:
        self._prefix_hits.pop(r.request_id, None)
        if not self.config.reuse or r.conversation_id is None:
            self._host_epoch += 1
            self.host.release(self._host_keys.pop(r.request_id, r.kv_key))

    def live(self) -> Iterable[Request]:
        return self.requests.values()

    def swaps_in_flight(self) -> int:
        return len(self._swaps)

    def swapped_blocks(self) -> int:
        """Host blocks held for swapped-out requests."""
        return sum(len(pin.blocks) for _, pin in self._swapped_kv.values())

    def has_work(self) -> bool:
        """Live requests, swaps in flight, or swaps waiting for the next plan."""
        return bool(self.requests or self._swaps or self._offloads)
