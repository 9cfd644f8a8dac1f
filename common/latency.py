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
