"""KV transfers: what each host reply and each finished copy means for a request's KV.

The planner decides that KV moves (a preemption, a finished turn, a swap-in, a full block
stored); this carries the decision through its host round trips and copies, one `Purpose`
at a time, and moves the request's state as each step lands:

- `PREEMPT`: `Reserve` -> swap-out (frees the device blocks) -> `Commit` -> `Pin` for the
  swap-in (`RESERVING`, `SWAPPING_OUT`, `PINNING`, then `SWAPPED`). A refused reservation,
  a failed copy or a refused pin falls back to recompute.
- `OFFLOAD`: a finished turn's `Reserve` -> a copy from its device prefix cache entry (kept)
  or from its own blocks (freed) -> `Commit`.
- `STORE` (eager offload): a running request's newly full blocks, `Reserve` -> a copy that
  keeps them -> `Commit`.
- `RESUME` and `PREFIX`: the `Pin` reply; the planner then swaps in.

Every reservation is committed or aborted, and every pin unpinned, exactly once.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from common.kv.allocator import OutOfBlocks
from common.kv.block_hash import TokenChain
from common.kv.host_ops import Abort, Commit, HostReply, Release, Reserved, Unpin
from common.kv.reuse_index import Hit, PinHandle, Reservation
from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.device_memory import DeviceMemory
from services.scheduler.core.host_asks import Ask, HostAsks
from services.scheduler.core.lifecycle import ON_DEVICE, RESIDENT, UNPLACED, Event, RequestState
from services.scheduler.core.plan import Direction, SwapOrder
from services.scheduler.core.request import Request
from services.scheduler.core.request_kv import Purpose, RequestKV
from services.scheduler.core.stats import PlannerStats
from services.scheduler.core.swaps import Swap

S, E, P = RequestState, Event, Purpose
DEVICE_SOURCED = frozenset({P.OFFLOAD, P.STORE})  # asks whose copies read device blocks


@dataclass
class Transfers:
    config: SchedulerConfig
    fingerprint: str  # the model's, which every host KV chain starts from
    memory: DeviceMemory
    asks: HostAsks
    stats: PlannerStats
    kv: dict[str, RequestKV] = field(default_factory=dict)  # per live request (and finishing)
    orders: list[SwapOrder] = field(default_factory=list)  # swap-outs decided between plans

    def track(self, r: Request) -> None:
        """A new request's KV bookkeeping."""
        reuse = self.config.on.host_reuse
        self.kv[r.request_id] = RequestKV(
            host_key=r.kv_key if reuse else f"swap:{r.request_id}",
            private=not reuse or r.conversation_id is None,
            chain=TokenChain(self.config.block_size, self.fingerprint),
        )

    def offloading(self) -> set[str]:
        """Host keys a finished turn's KV is on its way to. The conversation's next turn
        waits for it: that copy is about to make the turn's whole prefix reusable."""
        keys = self.memory.swaps.offloading()
        return keys | {a.kv.host_key for a in self.asks if a.purpose is P.OFFLOAD}

    # ---- decisions that move KV -------------------------------------------------------

    def ask(self, r: Request, event: Event, purpose: Purpose) -> None:
        """Moves the request into a phase that waits for the host (a preemption's
        reservation, a new turn's prefix), and asks for its KV."""
        r.handle(event)
        n = r.num_tokens if purpose is P.PREFIX else r.num_computed
        self.asks.ask(r, self.kv[r.request_id], purpose, n)

    def asks_host(self, r: Request) -> bool:
        """A new turn asks the host for its conversation's prefix before it is admitted
        (unless it has no history worth a block)."""
        kv, history = self.kv[r.request_id], r.history_tokens
        return (r.state is S.WAITING and self.config.on.host_reuse and not kv.private
                and (history is None or history >= self.config.block_size))

    def cached_tokens(self, r: Request) -> int:
        """Tokens a request without KV would take from the device prefix cache."""
        if r.state not in UNPLACED:
            return 0
        kv = self.kv[r.request_id]
        return self.memory.cache.usable(kv.host_key, kv.hashes(r.tokens), r.num_tokens)

    def take_cached(self, r: Request) -> int:
        kv = self.kv[r.request_id]
        return self.memory.cache_take(kv.host_key, kv.hashes(r.tokens), r.num_tokens, r)

    def swap_in(self, r: Request, chunk: int, longest: int) -> SwapOrder | None:
        """Device blocks for a swapped request's pinned KV and its next `chunk` tokens, and
        the copy that fills them; None when they do not fit."""
        kv = self.kv[r.request_id]
        n = self.config.blocks_for(kv.host_tokens)
        total = max(n, self.config.blocks_for(kv.host_tokens + chunk))
        try:
            device = self.memory.allocate(r, total, expected=max(0, longest - total))
        except OutOfBlocks:
            return None
        order = self.memory.swaps.swap_in(r, kv, device[:n]).order
        r.num_computed = kv.host_tokens
        if kv.pinned_for is P.PREFIX:
            self.stats.prefix_hit_tokens += kv.host_tokens
            r.reused_tokens += kv.host_tokens
        r.handle(E.SWAP_IN)
        self.stats.swaps_in += 1
        self.stats.copies_in += len(order.copies)
        self.stats.blocks_in += n
        return order

    def cancelled(self, r: Request, was: RequestState) -> None:
        """Frees a cancelled request's KV: at once, or (under a copy) when the copy ends."""
        swaps = self.memory.swaps
        mine = {s.order.swap_id for s in swaps if s.request is r}
        for order in [o for o in self.orders if o.swap_id in mine]:  # never sent: dropped
            self.orders.remove(order)
            self.swap_out_done(swaps.done(order.swap_id), ok=False)
        if any(s.request is r and s.order.direction is Direction.IN for s in swaps):
            swaps.cancel_in(r)
        elif not (was is S.SWAPPING_OUT and any(s.request is r for s in swaps)):
            self.memory.release(r)
            self.drop(r)

    def device_lost(self) -> list[Request]:
        """Device memory is gone: swaps in flight are dropped (their reservations aborted)
        and asks for device KV forgotten. Returns the cancelled requests whose copies were
        dropped: nothing will end them now."""
        dropped = self.memory.reset()
        for swap in dropped:
            if swap.reservation_id:
                self.asks.send(Abort(swap.reservation_id))
        self.orders.clear()
        self.asks.forget(lambda a: a.request.state in ON_DEVICE or a.purpose in DEVICE_SOURCED)
        return [s.request for s in dropped if s.request.state is S.CANCELLED]

    def forget(self, host_key: str) -> None:
        """Releases a conversation's KV: its device prefix cache entry, its host copy."""
        self.memory.cache_drop(host_key)
        self.asks.send(Release(host_key))

    def in_use(self, host_key: str) -> bool:
        """A copy in flight or an awaited reply still uses the host key's KV."""
        return (any(s.kv.host_key == host_key for s in self.memory.swaps)
                or any(a.kv.host_key == host_key for a in self.asks))

    # ---- host replies ----------------------------------------------------------------

    def replied(self, reply: HostReply) -> None:
        ask = self.asks.match(reply)
        if ask is not None and isinstance(reply, Reserved):
            self.reserved(ask, reply.reservation)
        elif ask is not None and not isinstance(reply, Reserved):
            self.pinned(ask, reply.hit, reply.pin)

    def reserved(self, ask: Ask, res: Reservation | None) -> None:
        """Host room for a preempted request's KV, a finished turn's, or newly full blocks."""
        r, kv, purpose = ask.request, ask.kv, ask.purpose
        if purpose is P.STORE and r.state not in RESIDENT:
            self.store_ended(r, kv, res, ok=False)  # it left meanwhile
            return
        source: Hashable | None = r
        if purpose is P.OFFLOAD and self.config.on.device_cache:
            source = self.memory.cache.entry(kv.host_key, origin=r)  # None: evicted meanwhile
        if res is None or source is None:
            if res is not None:
                self.asks.send(Abort(res.reservation_id))
            if purpose is P.PREEMPT:
                self.recompute(r)
                self.stats.preempted_by_recompute += 1
            elif purpose is P.OFFLOAD and source is r:
                self.memory.release(r)
            elif purpose is P.STORE:
                self.store_ended(r, kv, None, ok=False)
            return
        if purpose is P.PREEMPT:
            r.handle(E.RESERVED)
        swap = self.memory.swaps.swap_out(
            r, kv, purpose, source=source, skip=len(res.valid_blocks),
            host_blocks=res.new_blocks, reservation_id=res.reservation_id,
            keep=source is not r or purpose is P.STORE,
        )
        if purpose is P.STORE:
            kv.storing = res.num_tokens // self.config.block_size
        self.stats.reuse_saved_blocks += len(res.valid_blocks)
        self.stats.preempted_by_swap += purpose is P.PREEMPT
        if not swap.order.copies:
            self.swap_out_done(swap, ok=True)
            return
        self.orders.append(swap.order)
        self.stats.swaps_out += 1
        self.stats.copies_out += len(swap.order.copies)
        self.stats.blocks_out += len(swap.reads)

    def pinned(self, ask: Ask, hit: Hit, pin: PinHandle) -> None:
        """Host KV pinned for a swapped-out request, or a new turn's prefix."""
        r, kv = ask.request, ask.kv
        prefix = ask.purpose is P.PREFIX
        usable = min(hit.num_tokens, r.num_tokens - 1) if prefix else hit.num_tokens
        if usable < (self.config.block_size if prefix else 1):
            self.asks.send(Unpin(pin.pin_id))
            if prefix:
                r.handle(E.HOST_MISS)  # prefill it
            else:
                self.recompute(r)  # the commit was refused
            return
        kv.pin, kv.host_tokens, kv.pinned_for = pin, usable, ask.purpose
        self.memory.cache_drop(kv.host_key)  # older than what the host holds
        r.handle(E.PINNED)

    # ---- finished copies -------------------------------------------------------------

    def swap_done(self, swap_id: int, ok: bool) -> None:
        swap = self.memory.swaps.done(swap_id)
        if swap.order.direction is Direction.OUT:
            self.swap_out_done(swap, ok)
        else:
            self.swap_in_done(swap, ok)

    def swap_out_done(self, swap: Swap, ok: bool) -> None:
        r, kv = swap.request, swap.kv
        assert swap.reservation_id is not None
        self.asks.send(Commit(swap.reservation_id) if ok else Abort(swap.reservation_id))
        if swap.purpose is P.STORE:
            cancelled = r.state is S.CANCELLED
            if cancelled:
                kv.offload_after_store = False  # nothing is left to offload
            self.store_ended(r, kv, None, ok)
            if cancelled and not any(s.request is r for s in self.memory.swaps):
                self.memory.release(r)  # its cancel waited for this copy
                self.drop(r)
        elif r.state is S.CANCELLED:
            self.drop(r)
        elif swap.purpose is P.PREEMPT and not ok:
            self.recompute(r, keep_kv=False)  # its device KV is gone
        elif swap.purpose is P.PREEMPT:  # pin what the host now holds, for its swap-in
            r.handle(E.COPIED_OUT)
            self.asks.ask(r, kv, P.RESUME, r.num_computed)

    def swap_in_done(self, swap: Swap, ok: bool) -> None:
        r, kv = swap.request, swap.kv
        if kv.pin is not None:
            self.asks.send(Unpin(kv.pin.pin_id))
            kv.pin = None
        kv.host_tokens = 0
        if r.state is S.CANCELLED:
            self.drop(r)
        elif not ok:
            self.recompute(r, keep_kv=False)  # its blocks hold a failed copy
        else:
            if not self.config.on.host_reuse:  # the baseline drops its host copy
                self.asks.send(Release(kv.host_key))
            decoding = bool(r.output) and r.num_computed == r.num_tokens - 1
            r.handle(E.RESUME_DECODE if decoding else E.RESUME_PREFILL)

    # ---- decisions' KV side ----------------------------------------------------------

    def finished(self, r: Request) -> None:
        """A finished turn of a conversation keeps its device blocks until the host has
        made room for its KV (turn offload); otherwise they are freed now."""
        kv = self.kv[r.request_id]
        tokens = r.token_slice(0, r.num_computed)
        if self.config.on.device_cache and not kv.private:
            self.memory.cache_put(r, kv.host_key, kv.hashes(tokens), len(tokens))
        if not (self.config.on.turn_offload and not kv.private):
            self.memory.release(r)
        elif kv.storing:  # after that store: the host then holds its prefix
            kv.offload_after_store = True
        else:
            self.asks.ask(r, kv, P.OFFLOAD, r.num_computed)
        self.drop(r)

    def store(self, r: Request, computed: int) -> None:
        """Eager offload: a running request's newly full blocks (of its first `computed`
        tokens, whose steps have completed; `offload_prompt_only`: of its prompt) go to
        the host."""
        kv = self.kv[r.request_id]
        upto = min(computed, len(r.prompt)) if self.config.on.offload_prompt_only else computed
        full = upto // self.config.block_size
        if kv.storing or kv.private or full <= kv.stored_blocks:
            return
        kv.storing = full
        self.asks.ask(r, kv, P.STORE, full * self.config.block_size)

    def store_ended(self, r: Request, kv: RequestKV, res: Reservation | None, ok: bool) -> None:
        if res is not None:  # the request left before its store could start
            self.asks.send(Abort(res.reservation_id))
        elif ok:
            self.stats.blocks_stored += kv.storing - kv.stored_blocks
            kv.stored_blocks = kv.storing
        kv.storing = 0
        if kv.offload_after_store:
            kv.offload_after_store = False
            self.asks.ask(r, kv, P.OFFLOAD, r.num_computed)

    def recompute(self, r: Request, *, keep_kv: bool = True) -> None:
        """Back to waiting, its KV gone, or (`keep_kv`: it is sound) left in the device
        prefix cache. With `wait_stores_on_preempt`, the next step first waits for the
        stores in flight (among them its own)."""
        kv = self.kv[r.request_id]
        if self.config.on.wait_stores_on_preempt and any(
                s.request is r and s.purpose is P.STORE for s in self.memory.swaps):
            self.memory.swaps.hold()
        if keep_kv and self.config.on.device_cache and r.num_computed >= self.config.block_size:
            tokens = r.token_slice(0, r.num_computed)
            self.memory.cache_put(r, kv.host_key, kv.hashes(tokens), len(tokens))
        else:
            self.memory.release(r)
        r.num_computed = 0
        r.handle(E.DROP_KV)

    def drop(self, r: Request) -> None:
        """The one place a request's KV state goes: its pin and private host copy too."""
        kv = self.kv.pop(r.request_id, None)
        if kv is None:
            return
        if kv.pin is not None:
            self.asks.send(Unpin(kv.pin.pin_id))
            kv.pin = None
        if kv.private:
            self.asks.send(Release(kv.host_key))

    def swapped_blocks(self) -> int:
        """Host blocks pinned for swapped-out requests."""
        return sum(len(kv.pin.blocks) for kv in self.kv.values() if kv.pin is not None)
