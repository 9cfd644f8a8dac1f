"""Latency arithmetic shared by the scheduler, the simulator and the load generator."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1
    return ordered[rank]


def gaps(times: Sequence[float]) -> list[float]:
    """Time between consecutive events: token times give the time between tokens (TBT)."""
    return [b - a for a, b in itertools.pairwise(times)]


class LatencyWindow:
    """TTFT and TBT of the most recent requests, for live percentiles."""

    def __init__(self, size: int = 10_000) -> None:
        self.ttfts: deque[float] = deque(maxlen=size)
        self.tbts: deque[float] = deque(maxlen=size * 8)

    def record(self, ttft: float, tbts: Iterable[float]) -> None:
        self.ttfts.append(ttft)
        self.tbts.extend(tbts)


class BusyTime:
    """How much of the time between the first busy interval's start and the last one's
    end was busy, each moment counted once: intervals are added in order of their ends (a
    step's run, as the executor times it, ending when its reply arrives)."""

    def __init__(self) -> None:
        self.busy_s = 0.0
        self.first: float | None = None
        self.last: float | None = None

    def add(self, start: float, end: float) -> None:
        if self.first is None:
            self.first = start
        begin = start if self.last is None else max(start, self.last)
        self.busy_s += max(0.0, end - begin)
        self.last = end if self.last is None else max(self.last, end)

    @property
    def idle_fraction(self) -> float:
        """Time between intervals over the whole span; 0.0 before two ends."""
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return max(0.0, 1.0 - self.busy_s / (self.last - self.first))
