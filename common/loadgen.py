"""A load generator over the public API: clients holding multi-turn conversations, plus
random external priority updates. A client keeps its priority: an update reaches its live
requests, and its later turns are sent at it. Latencies are measured here, on the client
side.

Conversation texts, lengths and think times come from a seeded RNG per (conversation,
turn), so two runs send the same turns whatever the server's schedule; with greedy
sampling they must also get the same tokens back.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.client import FastSwitchClient
from common.latency import gaps

WORDS = (
    "switch", "block", "group", "swap", "copy", "host", "device", "token", "cache", "fair",
    "queue", "turn", "prefix", "reuse", "stream", "drain", "budget", "policy", "latency",
)


@dataclass(frozen=True)
class LoadSpec:
    clients: int = 6
    turns: int = 3
    message_words: tuple[int, int] = (12, 40)
    max_tokens: tuple[int, int] = (32, 96)
    think_s: tuple[float, float] = (0.0, 0.3)
    priority_update_every_s: float = 0.25  # 0: no priority updates
    priority_levels: int = 4
    seed: int = 0


@dataclass
class TurnResult:
    conversation_id: str
    turn: int
    token_ids: list[int]
    ttft_s: float
    tbts: list[float]
    preemptions: int
    bytes_swapped: int
    reused_prompt_tokens: int
    finished_s: float = 0.0  # since the load started
    client_id: str = ""
    sent_s: float = 0.0  # since the load started
    prompt_tokens: int = 0  # as the scheduler counted them
    scheduler_ttft_s: float = 0.0  # the scheduler's own: from the request's arrival there

    @property
    def token_times(self) -> list[float]:
        """When each token came, since the load started."""
        if not self.token_ids:
            return []
        return list(itertools.accumulate(self.tbts, initial=self.sent_s + self.ttft_s))


@dataclass(frozen=True)
class PriorityUpdate:
    """At `at_s` (since the load started, when the call returned), the client's live
    requests were given `priority`, and its later requests are sent at it (before its first
    update, at the default, 0)."""

    at_s: float
    client_id: str
    priority: int


@dataclass
class LoadReport:
    wall_s: float
    turns: list[TurnResult] = field(default_factory=list)
    priority_updates: int = 0
    priority_log: list[PriorityUpdate] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)


async def run_load(
    address: str, spec: LoadSpec, progress: Callable[[str], None] = lambda _: None
) -> LoadReport:
    async with FastSwitchClient(address) as client:
        await client.wait_ready()
        report = LoadReport(wall_s=0.0)
        total = spec.clients * spec.turns
        start = time.monotonic()
        done = asyncio.Event()
        priorities = [0] * spec.clients  # each client's, as last set

        async def conversation(i: int) -> None:
            conv = f"conv-{spec.seed}-{i}"
            for turn in range(spec.turns):
                rng = random.Random(f"{spec.seed}/{conv}/{turn}")
                n_words = rng.randint(*spec.message_words)
                message = " ".join(rng.choice(WORDS) for _ in range(n_words))
                sent = time.monotonic()
                times: list[float] = []
                gen = client.chat(conv, message, client_id=f"client-{i}",
                                  max_tokens=rng.randint(*spec.max_tokens),
                                  priority=priorities[i])
                async for _ in gen:
                    times.append(time.monotonic())
                assert gen.final is not None
                report.turns.append(TurnResult(
                    conv, turn, [t.id for t in gen.tokens], times[0] - sent if times else 0.0,
                    gaps(times), gen.final.preemptions, gen.final.bytes_swapped,
                    gen.final.reused_prompt_tokens, time.monotonic() - start, f"client-{i}",
                    sent - start, gen.final.prompt_tokens, gen.final.ttft_s,
                ))
                progress(f"[{time.monotonic() - start:6.1f}s] {len(report.turns)}/{total} turns"
                         f" done ({conv} turn {turn + 1}: {len(gen.tokens)} tokens,"
                         f" {gen.final.preemptions} preemptions)")
                await asyncio.sleep(rng.uniform(*spec.think_s))

        async def reshuffle_priorities() -> None:
            rng = random.Random(f"{spec.seed}/priorities")
            while spec.priority_update_every_s > 0 and not done.is_set():
                await asyncio.sleep(spec.priority_update_every_s)
                for i in range(spec.clients):
                    priority = priorities[i] = rng.randrange(spec.priority_levels)
                    await client.set_priority(priority, client_id=f"client-{i}")
                    report.priority_log.append(
                        PriorityUpdate(time.monotonic() - start, f"client-{i}", priority))
                report.priority_updates += 1

        updater = asyncio.create_task(reshuffle_priorities())
        try:
            await asyncio.gather(*(conversation(i) for i in range(spec.clients)))
        finally:
            done.set()
            updater.cancel()
            await asyncio.gather(updater, return_exceptions=True)
        report.wall_s = time.monotonic() - start
        report.turns.sort(key=lambda t: (t.conversation_id, t.turn))
        return report
