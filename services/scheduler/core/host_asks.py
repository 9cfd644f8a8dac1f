"""Host asks: the planner's host operations out, and their replies matched back in.

Contract:

- `ask` queues a `Reserve` (KV goes out) or a `Pin` (KV comes in) for a request, and
  `send` any other operation; `drain` hands them over in order, for the next plan.
- This is the one record of which reply each request waits for: a reply is matched to its
  `Ask` exactly once (`match`).
- A reply that nobody waits for any more (its ask was `forget`-ten: the request was
  cancelled, or its device KV was lost) is undone here: its reservation is aborted, its pin
  released. The planner never sees it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from common.kv.host_ops import Abort, HostOp, HostReply, Pin, Reserve, Reserved, Unpin
from services.scheduler.core.request import Request
from services.scheduler.core.request_kv import Purpose, RequestKV


@dataclass(frozen=True, slots=True, eq=False)
class Ask:
    op_id: int
    request: Request
    kv: RequestKV
    purpose: Purpose


class HostAsks:
    def __init__(self) -> None:
        self._outbox: list[HostOp] = []
        self._pending: dict[int, Ask] = {}
        self._ids = itertools.count(1)

    def ask(self, r: Request, kv: RequestKV, purpose: Purpose, num_tokens: int) -> None:
        """Asks the host to pin or reserve the KV of the request's first `num_tokens`."""
        tokens = r.token_slice(0, num_tokens)
        kind = Pin if purpose.pins else Reserve
        op = kind(next(self._ids), kv.host_key, kv.hashes(tokens), len(tokens))
        self._pending[op.op_id] = Ask(op.op_id, r, kv, purpose)
        self._outbox.append(op)

    def send(self, op: HostOp) -> None:
        self._outbox.append(op)

    def drain(self) -> tuple[HostOp, ...]:
        ops, self._outbox = tuple(self._outbox), []
        return ops

    def match(self, reply: HostReply) -> Ask | None:
        """The ask `reply` answers, or None (the reply undone) when nobody waits for it."""
        ask = self._pending.pop(reply.op_id, None)
        if ask is None:
            if not isinstance(reply, Reserved):
                self._outbox.append(Unpin(reply.pin.pin_id))
            elif reply.reservation is not None:
                self._outbox.append(Abort(reply.reservation.reservation_id))
        return ask

    def forget(self, unwanted: Callable[[Ask], bool]) -> None:
        """Stops waiting for the asks `unwanted` picks: their replies will be undone."""
        for op_id in [op_id for op_id, ask in self._pending.items() if unwanted(ask)]:
            del self._pending[op_id]

    def __iter__(self) -> Iterator[Ask]:
        return iter(self._pending.values())

    def __bool__(self) -> bool:
        """Operations to send, or replies to wait for."""
        return bool(self._outbox or self._pending)
