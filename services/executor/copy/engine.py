"""The copy engine interface: submit block-group swaps, learn of their completion later.

Everything except the copies themselves lives here and is shared by the backends:
validation, ticket bookkeeping, per-request ordering, and completion dispatch. A backend
supplies how copies are queued (`_enqueue`, on the caller's thread) and how a queued swap
is carried to its end (`_run`, on the direction's worker: "copy-out" or "copy-in").
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import torch

from common.kv.swap_plan import Copy
from services.executor.copy.layout import DIRECTIONS, BlockLayout, ByteRange, Direction

FenceT = TypeVar("FenceT")


@dataclass(frozen=True, slots=True, eq=False)
class Ticket:
    """One accepted swap; `future` resolves to its SwapCompletion (it never raises): wait
    on it with `future.result(timeout)`, or in a loop with `asyncio.wrap_future`."""

    id: int
    request_id: str
    direction: Direction
    future: Future[SwapCompletion] = field(repr=False)

    def done(self) -> bool:
        return self.future.done()


@dataclass(frozen=True, slots=True)
class SwapCompletion:
    """`bytes` is the size of the swap; `error` is None when every copy succeeded."""

    ticket: Ticket
    request_id: str
    direction: Direction
    bytes: int
    duration_s: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Swap(Generic[FenceT]):
    """A submission as a backend sees it; `prev` is the request's unfinished earlier swap."""

    ticket: Ticket
    ranges: tuple[ByteRange, ...]
    after: FenceT | None
    prev: Ticket | None

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ranges)


class SwapError(RuntimeError):
    pass


class CopyEngine(ABC, Generic[FenceT]):
    """Copies between a device cache and a host cache of the same block layout.

    Swaps of one request run in submission order (a swap-in never overtakes the swap-out it
    reads from); swaps of different requests are independent. A swap ordered after a failed
    one fails too, without copying where the backend can still avoid it.
    """

    def __init__(self, device: torch.Tensor, host: torch.Tensor) -> None:
        self.layout = BlockLayout.of(device, host)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._outstanding: dict[int, Ticket] = {}
        self._last_of_request: dict[str, Ticket] = {}
        self._closed = False
        self._workers = {
            direction: ThreadPoolExecutor(1, thread_name_prefix=f"copy-{direction}")
            for direction in DIRECTIONS
        }

    @abstractmethod
    def step_fence(self) -> FenceT:
        """A fence at the end of the work queued so far; call it right after a step and pass
        it as `after=` to swap-outs of requests that step wrote."""

    def _enqueue(self, swap: Swap[FenceT]) -> None:
        """Queue copies ahead on the caller's thread; a GPU backend puts them on its stream."""

    def _host_dependencies(self, swap: Swap[FenceT]) -> list[Future[Any]]:
        """What must finish before a worker takes the swap up. Waiting here, not on the
        worker, keeps one stalled request from holding up the others in its direction."""
        return [swap.prev.future] if swap.prev is not None else []

    @abstractmethod
    def _run(self, swap: Swap[FenceT]) -> float:
        """Carry the swap to its end on its direction's worker; returns copy seconds."""

    def submit(
        self,
        direction: Direction,
        request_id: str,
        copies: Sequence[Copy],
        after: FenceT | None = None,
    ) -> Ticket:
        """Validate (ValueError, nothing copied), then start the swap without waiting for it."""
        ranges = self.layout.byte_ranges(direction, copies)
        with self._lock:
            if self._closed:
                raise RuntimeError("copy engine is closed")
            future: Future[SwapCompletion] = Future()
            future.set_running_or_notify_cancel()  # a waiter's cancellation must not cancel it
            ticket = Ticket(next(self._ids), request_id, direction, future)
            prev = self._last_of_request.get(request_id)
            swap = Swap(ticket, ranges, after, prev if prev and not prev.done() else None)
            self._outstanding[ticket.id] = ticket
            self._last_of_request[request_id] = ticket
            worker = self._workers[direction]
            try:
                self._enqueue(swap)
            except Exception as exc:
                worker.submit(self._resolve, swap, 0.0, _describe(exc))
            else:
                _when_done(self._host_dependencies(swap), lambda: worker.submit(self._finish, swap))
        return ticket

    def wait_all(self, timeout: float | None = None) -> list[SwapCompletion]:
        """The baseline's global barrier: waits for every swap still running, and returns
        their completions in ticket order (those that finished earlier are not included)."""
        with self._lock:
            tickets = sorted(self._outstanding.values(), key=lambda t: t.id)
        _, pending = wait([t.future for t in tickets], timeout)
        if pending:
            raise TimeoutError(f"{len(pending)} swaps still running after {timeout}s")
        return [t.future.result() for t in tickets]

    def close(self) -> None:
        """Refuse new swaps and let the submitted ones finish."""
        with self._lock:
            self._closed = True
        self.wait_all()
        for worker in self._workers.values():
            worker.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _finish(self, swap: Swap[FenceT]) -> None:
        try:
            if swap.prev is not None:
                prev = swap.prev.future.result()
                if prev.error is not None:
                    raise SwapError(f"ordered after failed ticket {prev.ticket.id}: {prev.error}")
            duration = self._run(swap)
        except Exception as exc:
            self._resolve(swap, 0.0, _describe(exc))
        else:
            self._resolve(swap, duration, None)

    def _resolve(self, swap: Swap[FenceT], duration_s: float, error: str | None) -> None:
        ticket = swap.ticket
        completion = SwapCompletion(
            ticket, ticket.request_id, ticket.direction, swap.nbytes, duration_s, error
        )
        with self._lock:
            del self._outstanding[ticket.id]
            if self._last_of_request.get(ticket.request_id) is ticket:
                del self._last_of_request[ticket.request_id]
        ticket.future.set_result(completion)


def _when_done(futures: list[Future[Any]], then: Callable[[], object]) -> None:
    if not futures:
        then()
    else:
        futures[0].add_done_callback(lambda _: _when_done(futures[1:], then))


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SwapError) else f"{type(exc).__name__}: {exc}"
