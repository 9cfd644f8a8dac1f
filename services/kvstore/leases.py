"""What the store holds for its clients, and for how long: leases and recent requests.

Sans-IO: every call takes `now` (the store's clock); nothing here reads a clock or sleeps.

- `LeaseTable`: the ids of reservations (or pins), each with its owner (the client that
  made it) and the time it lapses unless renewed. Only the owner may renew or end it.
- `RecentRequests`: each client's requests of the last lease period, by request id, with
  their answers, so that a late duplicate is answered from the first answer, not done
  twice; and the requests a client abandoned, so that one that arrives late is refused.
  It keeps at most `max_entries` (the oldest go first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class NotOwner(Exception):
    """A client named a reservation or pin that another client holds."""


class AbandonedRequest(Exception):
    """The request's client abandoned it before it arrived (its deadline passed)."""


@dataclass(slots=True)
class _Lease:
    owner: str
    until: float


class LeaseTable:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "reservation" or "pin", for messages
        self._leases: dict[int, _Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: int) -> bool:
        return lease_id in self._leases

    def grant(self, lease_id: int, owner: str, until: float) -> None:
        self._leases[lease_id] = _Lease(owner, until)

    def check_owner(self, lease_id: int, client: str) -> None:
        """Raises NotOwner if another client holds `lease_id` (an unknown id passes)."""
        lease = self._leases.get(lease_id)
        if lease is not None and lease.owner != client:
            raise NotOwner(f"{self.kind} {lease_id} belongs to another client")

    def extend(self, lease_id: int, until: float) -> bool:
        """Moves the lease's end to `until`; False if it is not held (ended or lapsed)."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        lease.until = until
        return True

    def end(self, lease_id: int) -> bool:
        """Forgets the lease; False if it was not held."""
        return self._leases.pop(lease_id, None) is not None

    def lapsed(self, now: float) -> list[int]:
        """The ids whose lease ended by `now` (still held: `end` them)."""
        return [i for i, lease in self._leases.items() if lease.until <= now]


@dataclass(slots=True)
class _Request(Generic[T]):
    answer: T | None  # None: abandoned
    until: float


class RecentRequests(Generic[T]):
    def __init__(self, max_entries: int = 1 << 16) -> None:
        self._requests: OrderedDict[tuple[str, int], _Request[T]] = OrderedDict()
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._requests)

    def answer(self, client: str, request_id: int, now: float) -> T | None:
        """The first answer to this request, if it came in the last lease period; raises
        AbandonedRequest if the client abandoned it."""
        entry = self._requests.get((client, request_id))
        if entry is None or entry.until <= now:
            return None
        if entry.answer is None:
            raise AbandonedRequest(f"request {request_id} was abandoned by its client")
        return entry.answer

    def record(self, client: str, request_id: int, answer: T, until: float) -> None:
        self._put((client, request_id), _Request(answer, until))

    def abandon(self, client: str, request_ids: Iterable[int], until: float) -> list[T]:
        """Marks the requests abandoned; the answers of those that were answered."""
        answered = []
        for request_id in request_ids:
            entry = self._requests.get((client, request_id))
            if entry is not None and entry.answer is not None:
                answered.append(entry.answer)
            self._put((client, request_id), _Request(None, until))
        return answered

    def forget_lapsed(self, now: float) -> None:
        for key in [k for k, entry in self._requests.items() if entry.until <= now]:
            del self._requests[key]

    def _put(self, key: tuple[str, int], entry: _Request[T]) -> None:
        self._requests[key] = entry
        self._requests.move_to_end(key)
        while len(self._requests) > self._max_entries:
            self._requests.popitem(last=False)
