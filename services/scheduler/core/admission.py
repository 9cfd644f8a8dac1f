"""Admission: whether a new request may join the planner at all.

Contract: `check` raises ValueError for a request that can never run (a duplicate id, one
that is not new, one whose KV at its longest exceeds the device), and `QueueFull` while
`SchedulerConfig.max_waiting` requests wait to come in; it changes nothing either way.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.lifecycle import UNADMITTED, RequestState
from services.scheduler.core.request import Request


class QueueFull(RuntimeError):
    """Too many requests wait to come in: `SchedulerConfig.max_waiting`."""


def check(request: Request, requests: Mapping[str, Request], config: SchedulerConfig) -> None:
    if request.request_id in requests:
        raise ValueError(f"duplicate request id {request.request_id!r}")
    if request.state is not RequestState.WAITING:
        raise ValueError(f"new request {request.request_id!r} is {request.state.value}")
    need = longest(request, config)
    if need > config.num_device_blocks:
        raise ValueError(f"request needs {need} KV blocks at its longest; the device holds "
                         f"{config.num_device_blocks}")
    check_queue(requests, config)


def check_queue(requests: Mapping[str, Request], config: SchedulerConfig) -> None:
    """Raises `QueueFull` when no more requests may wait."""
    waiting = sum(r.state in UNADMITTED for r in requests.values())
    if config.max_waiting is not None and waiting >= config.max_waiting:
        raise QueueFull(f"queue full: {waiting} requests waiting "
                        f"(limit max_waiting={config.max_waiting})")


def longest(request: Request, config: SchedulerConfig) -> int:
    """Blocks the request needs at its longest: sizes its block group."""
    return config.blocks_for(len(request.prompt) + request.max_tokens)
