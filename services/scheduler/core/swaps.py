"""The swap manager: every copy between device and host in flight, and when a batch may run.

Contract (as vLLM's offload manager states its own):

- A device block that a swap-out reads is *draining* from the plan that orders the copy
  until the copy is reported done: it belongs to nobody, and the allocator hands it out
  again only then. A request's other blocks are freed at once.
- A store (a copy that keeps its blocks: a turn offload from the device prefix cache, or
  vLLM's eager offload of a running request) frees nothing; a block it reads that is freed
  before it ends must be freed through `claim`, which makes it drain until then.
- A device block that a swap-in writes belongs to its request from the start. With async
  swaps the request is not scheduled until its own copy is reported done, and nothing else
  waits. Without them (the baseline) every plan made while any swap is in flight carries a
  barrier: the step waits for all of them, and may then use what they swapped in.
  A `hold` (vLLM v1 waiting for a preempted request's stores) puts a barrier on the
  next plan alone.
- A swap-in cancelled mid-copy leaves its blocks draining until the copy ends.
- A step sent to the executor and not yet completed holds every block of its batch's
  block tables (`hold_step` to `step_done`): one freed meanwhile drains until the step ends,
  as under a copy. With lookahead a step still runs after the next plan was made (and its
  finishes and cancels applied), so no block is reused while a queued step may write it.
- Each swap is reported done exactly once, `ok` or not; `done` hands back what the swap
  held, and its `Purpose`, so that the planner can commit, abort or unpin its host side.
- The manager is bound to one allocator: when the device is lost, both are replaced.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from common.kv.allocator import BlockAllocator
from common.kv.swap_plan import Direction, SwapOrder, plan_copies
from services.scheduler.core.request import Request
from services.scheduler.core.request_kv import Purpose, RequestKV


@dataclass(slots=True, eq=False)
class Swap:
    order: SwapOrder
    request: Request
    kv: RequestKV
    purpose: Purpose
    reads: tuple[int, ...] = ()  # swap-out: the device blocks the copy reads
    draining: list[int] = field(default_factory=list)  # device blocks freed when it ends
    reservation_id: int | None = None  # swap-out: the host reservation it fills


@dataclass(slots=True, eq=False)
class StepHold:
    """A step in flight: the blocks its batch reads and writes."""

    reads: frozenset[int]
    draining: list[int] = field(default_factory=list)


class SwapManager:
    def __init__(
        self, allocator: BlockAllocator, *, merge_copies: bool, async_swaps: bool
    ) -> None:
        self.allocator = allocator
        self.merge_copies = merge_copies
        self.async_swaps = async_swaps
        self._swaps: dict[int, Swap] = {}
        self._steps: dict[int, StepHold] = {}
        self._ids = itertools.count(1)
        self._hold = False

    def swap_out(
        self,
        r: Request,
        kv: RequestKV,
        purpose: Purpose,
        *,
        source: Hashable,
        skip: int,
        host_blocks: Sequence[int],
        reservation_id: int,
        keep: bool = False,
    ) -> Swap:
        """Copies `source`'s device blocks `skip:` (those the host lacks) into
        `host_blocks`. Unless `keep` (a store), frees all of `source`'s device blocks, the
        copied ones once the copy ends. The swap is in flight unless it copies nothing."""
        table = self.allocator.table(source)
        src = table[skip : skip + len(host_blocks)]
        copies = plan_copies(src, host_blocks, merge=self.merge_copies)
        if not keep:
            rest = self.claim([b for b in table if b not in set(src)])
            self.allocator.release(source, draining=[*src, *rest])
        order = SwapOrder(next(self._ids), r.request_id, Direction.OUT, tuple(copies))
        swap = Swap(order, r, kv, purpose, src, [] if keep else list(src), reservation_id)
        if copies:
            self._swaps[order.swap_id] = swap
        return swap

    def claim(self, blocks: Collection[int]) -> list[int]:
        """Of `blocks`, about to be freed, those that copies or steps in flight still read:
        they are theirs to free when they end (the caller releases them draining)."""
        wanted, claimed = set(blocks), set()
        for reader in self._readers():
            mine = [b for b in reader.reads if b in wanted and b not in claimed]
            reader.draining += mine
            claimed.update(mine)
        return [b for b in blocks if b in claimed]

    def hold_step(self, step_id: int, blocks: Collection[int]) -> None:
        self._steps[step_id] = StepHold(frozenset(blocks))

    def step_done(self, step_id: int) -> None:
        self._end(self._steps.pop(step_id))

    def swap_in(self, r: Request, kv: RequestKV, device_blocks: Sequence[int]) -> Swap:
        """Copies the host blocks `kv.pin` holds into the first of `device_blocks`."""
        assert kv.pin is not None
        n = len(device_blocks)
        copies = plan_copies(kv.pin.blocks[:n], device_blocks, merge=self.merge_copies)
        order = SwapOrder(next(self._ids), r.request_id, Direction.IN, tuple(copies))
        swap = self._swaps[order.swap_id] = Swap(order, r, kv, kv.pinned_for)
        return swap

    def cancel_in(self, r: Request) -> None:
        """The request of a swap-in in flight is gone: its blocks drain until the copy ends.
        (A store of its earlier residency may still be in flight too: that one is left be.)"""
        swap = next(s for s in self._swaps.values()
                    if s.request is r and s.order.direction is Direction.IN)
        swap.draining = list(self.allocator.table(r))
        self.allocator.release(r, draining=swap.draining)

    def done(self, swap_id: int) -> Swap:
        """Ends a swap: the blocks it drained are freed, unless another copy or step in
        flight still reads them (that one frees them when it ends)."""
        swap = self._swaps.pop(swap_id)
        self._end(swap)
        return swap

    def _end(self, ended: Swap | StepHold) -> None:
        free = []
        for block in ended.draining:
            other = next((r for r in self._readers() if block in r.reads), None)
            if other is not None:
                if block not in other.draining:
                    other.draining.append(block)
            else:
                free.append(block)
        if free:
            self.allocator.release_draining(free)

    def _readers(self) -> Iterator[Swap | StepHold]:
        """What reads device blocks: swap-outs and steps in flight."""
        yield from (s for s in self._swaps.values() if s.order.direction is Direction.OUT)
        yield from self._steps.values()

    def reset(self) -> list[Swap]:
        """The device was lost: every swap in flight is dropped, unreported."""
        dropped = list(self._swaps.values())
        self._swaps.clear()
        self._steps.clear()
        return dropped

    def hold(self) -> None:
        """The next plan carries a barrier even with async swaps (a store must end before
        its blocks are reused)."""
        self._hold = True

    def barrier(self) -> bool:
        """Whether the plan being made waits for every swap in flight; ends a `hold`."""
        held, self._hold = self._hold, False
        return (held or not self.async_swaps) and bool(self._swaps)

    def offloading(self) -> set[str]:
        """Host keys a finished turn's KV is being copied to."""
        return {s.kv.host_key for s in self._swaps.values() if s.purpose is Purpose.OFFLOAD}

    def __len__(self) -> int:
        """Swaps in flight."""
        return len(self._swaps)

    def __iter__(self) -> Iterator[Swap]:
        return iter(self._swaps.values())
