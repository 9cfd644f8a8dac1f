"""Fairness policies: who deserves the GPU next.

A policy only orders requests; the planner turns the order into admissions and
preemptions. A *preemptive* policy's order applies to running requests too (a higher
priority arrival evicts a lower one). A non-preemptive policy orders only who is admitted
next; running requests are then preempted only for memory, worst-ranked first.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.scheduler.core.request import Request


class FairnessPolicy(ABC):
    preemptive: bool = False

    @abstractmethod
    def rank(self, request: Request) -> tuple:
        """Smaller ranks are served first."""

    def on_arrival(self, request: Request, backlogged: Iterable[Request]) -> None:
        """A request joined; `backlogged` are the other live requests."""

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """A step computed `prompt_tokens` of prefill and sampled `output_tokens` for it."""


class FCFS(FairnessPolicy):
    def rank(self, request: Request) -> tuple:
        return (request.arrival,)


class PriorityPolicy(FairnessPolicy):
    """Higher `Request.priority` first, then arrival; priorities change from outside."""

    preemptive = True

    def rank(self, request: Request) -> tuple:
        return (-request.priority, request.arrival)


@dataclass
class VirtualTokenCounter(FairnessPolicy):
    """VTC (Sheng et al., OSDI'24): serve the backlogged client that has received least.

    Each client's counter grows by `input_weight` per prefill token and `output_weight`
    per generated token. A client that returns from idle is lifted to the smallest
    counter among backlogged clients, so idling earns no credit to burst with later.
    """

    input_weight: float = 1.0
    output_weight: float = 2.0
    counters: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_weight < 0 or self.output_weight < 0:
            raise ValueError(f"token weights must not be negative, got {self}")

    def rank(self, request: Request) -> tuple:
        return (self.counters.get(request.client_id, 0.0), request.arrival)

    def on_arrival(self, request: Request, backlogged: Iterable[Request]) -> None:
        clients = {r.client_id for r in backlogged}
        if request.client_id in clients:
            return
        floor = min((self.counters.get(c, 0.0) for c in clients), default=None)
        if floor is not None:
            mine = self.counters.get(request.client_id, 0.0)
            self.counters[request.client_id] = max(mine, floor)

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        cost = self.input_weight * prompt_tokens + self.output_weight * output_tokens
        self.counters[request.client_id] = self.counters.get(request.client_id, 0.0) + cost


@dataclass
class RandomPriorityUpdates:
    """The FastSwitch evaluation's external updates: every `every` iterations, each live
    request draws a fresh priority from `levels`. Seeded, so runs are reproducible."""

    every: int
    levels: int = 4
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.every <= 0 or self.levels <= 0:
            raise ValueError(f"every and levels must be positive, got {self}")
        self._rng = random.Random(self.seed)

    def updates(self, iteration: int, live: Iterable[Request]) -> dict[str, int]:
        if iteration == 0 or iteration % self.every:
            return {}
        ordered = sorted(live, key=lambda r: r.request_id)
        return {r.request_id: self._rng.randrange(self.levels) for r in ordered}


POLICIES: dict[str, type[FairnessPolicy]] = {
    "fcfs": FCFS,
    "priority": PriorityPolicy,
    "vtc": VirtualTokenCounter,
}
