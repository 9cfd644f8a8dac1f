"""Priority inversion: the one definition that the planner marks on each plan, and that the
simulator and the real stack's engine count and time.

A step is inverted when a request of strictly higher priority than one in its batch waits
for the device meanwhile: queued for admission, or swapped out (vllm#40004 asks vLLM to
avoid the same). A request moving to or from the host, or waiting for the host's answer
about its prefix (which any scheduler must wait for), is neither waiting nor running here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from services.scheduler.core.lifecycle import UNPLACED, RequestState
from services.scheduler.core.request import Request

QUEUED = frozenset({*UNPLACED, RequestState.SWAPPED})  # waiting for the device


def inverted(live: Iterable[Request], batch: Collection[str]) -> bool:
    """Whether some queued request of `live` outranks a request whose id is in `batch`."""
    requests = list(live)
    ran = [r.priority for r in requests if r.request_id in batch]
    queued = [r.priority for r in requests if r.state in QUEUED]
    return bool(ran and queued) and max(queued) > min(ran)
