"""A request's life, as one state machine (in the manner of h11's `_state.py`).

Theory of operation. A request is always in exactly one `RequestState`, and it changes
state only through `next_state(state, event)`, whose every move is one row of
`TRANSITIONS`. The planner decides *what* happens (which request runs, which is preempted,
what a host reply means); this table decides what is *allowed* to happen, and names every
phase, so that no flag beside the state says which phase a request is in.

Where its KV is, by state:

- `WAITING`, `QUEUED`: nowhere (new, or preempted by recompute). A `WAITING` request of
  a conversation first asks the host for its prefix (`ASK_HOST`); a `QUEUED` one was
  answered with nothing usable, or need not ask, and is admitted by prefill (`ADMIT`),
  taking what the device prefix cache holds for it.
- `ASKING_HOST`: a `Pin` of its conversation's prefix is out; the reply either pins it
  (`PINNED`, to `SWAPPED`) or misses (`HOST_MISS`, to `QUEUED`).
- `PREFILLING`, `RUNNING`: on the device; these are the states a batch draws from.
- `RESERVING`: preempted by swap; its device blocks stay until the host has reserved room
  (`RESERVED`), or refused it (`DROP_KV`: recompute).
- `SWAPPING_OUT`: its copy to the host is in flight (`COPIED_OUT` when it ends).
- `PINNING`: its KV is committed on the host; a `Pin` keeps it there for the swap-in.
- `SWAPPED`: pinned on the host, its own KV or a new turn's prefix (`SWAP_IN`).
- `SWAPPING_IN`: its copy back is in flight; it resumes decoding (`RESUME_DECODE`) or
  prefilling the rest (`RESUME_PREFILL`) once its own copy ends.

`DROP_KV` is recompute: from any phase that holds or moves KV, back to `WAITING`. Only a
`RUNNING` request finishes; any live request can be cancelled or fail (the device lost).
The three terminal states have no way out.

A request's pending host operation is not a field: the states `ASKING_HOST`, `RESERVING`
and `PINNING` say that one is out, and `host_asks.HostAsks` holds which.
"""

from __future__ import annotations

from enum import Enum


class RequestState(Enum):
    WAITING = "waiting"
    QUEUED = "queued"
    ASKING_HOST = "asking_host"
    PREFILLING = "prefilling"
    RUNNING = "running"
    RESERVING = "reserving"
    SWAPPING_OUT = "swapping_out"
    PINNING = "pinning"
    SWAPPED = "swapped"
    SWAPPING_IN = "swapping_in"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class Event(Enum):
    ASK_HOST = "ask_host"
    HOST_MISS = "host_miss"
    PINNED = "pinned"
    ADMIT = "admit"
    FIRST_TOKEN = "first_token"
    PREEMPT = "preempt"
    RESERVED = "reserved"
    COPIED_OUT = "copied_out"
    SWAP_IN = "swap_in"
    RESUME_PREFILL = "resume_prefill"
    RESUME_DECODE = "resume_decode"
    DROP_KV = "drop_kv"
    FINISH = "finish"
    CANCEL = "cancel"
    FAIL = "fail"


S, E = RequestState, Event
TERMINAL = frozenset({S.FINISHED, S.CANCELLED, S.FAILED})
RESIDENT = frozenset({S.PREFILLING, S.RUNNING})  # KV on the device, schedulable
UNPLACED = frozenset({S.WAITING, S.QUEUED})  # no KV anywhere: admitted by prefill
SELECTABLE = frozenset({*RESIDENT, *UNPLACED, S.SWAPPED})  # a selection pass considers them
UNADMITTED = frozenset({*UNPLACED, S.ASKING_HOST})  # waiting to come in the first time
SWAP_PHASES = frozenset({S.RESERVING, S.SWAPPING_OUT, S.PINNING, S.SWAPPED, S.SWAPPING_IN})
# Holding or moving device KV: lost with the device.
ON_DEVICE = frozenset({*RESIDENT, S.RESERVING, S.SWAPPING_OUT, S.SWAPPING_IN})

_KV_PHASES = (S.PREFILLING, S.RUNNING, S.RESERVING, S.SWAPPING_OUT, S.PINNING, S.SWAPPING_IN)
TRANSITIONS: dict[RequestState, dict[Event, RequestState]] = {
    S.WAITING: {E.ASK_HOST: S.ASKING_HOST, E.ADMIT: S.PREFILLING, E.DROP_KV: S.WAITING},
    S.QUEUED: {E.ADMIT: S.PREFILLING, E.DROP_KV: S.WAITING},
    S.ASKING_HOST: {E.PINNED: S.SWAPPED, E.HOST_MISS: S.QUEUED},
    S.PREFILLING: {E.FIRST_TOKEN: S.RUNNING, E.PREEMPT: S.RESERVING},
    S.RUNNING: {E.PREEMPT: S.RESERVING, E.FINISH: S.FINISHED},
    S.RESERVING: {E.RESERVED: S.SWAPPING_OUT},
    S.SWAPPING_OUT: {E.COPIED_OUT: S.PINNING},
    S.PINNING: {E.PINNED: S.SWAPPED},
    S.SWAPPED: {E.SWAP_IN: S.SWAPPING_IN},
    S.SWAPPING_IN: {E.RESUME_PREFILL: S.PREFILLING, E.RESUME_DECODE: S.RUNNING},
}
for _state in _KV_PHASES:
    TRANSITIONS[_state][E.DROP_KV] = S.WAITING
for _state in set(RequestState) - TERMINAL:
    TRANSITIONS[_state] |= {E.CANCEL: S.CANCELLED, E.FAIL: S.FAILED}


class InvalidTransition(RuntimeError):
    pass


def next_state(state: RequestState, event: Event) -> RequestState:
    """The state `event` moves a request in `state` to; raises when no row allows it."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(f"{event.value} in state {state.value}") from None
