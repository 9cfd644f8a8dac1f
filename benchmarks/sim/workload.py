"""Multi-turn chat workloads shaped like ShareGPT, the unit every simulated request starts from.

A conversation opens at a Poisson arrival, belongs to one client, and has a geometric number of
turns. Each turn's prompt is the whole history (earlier prompts and responses) plus a new user
message. A later turn arrives a think time after the previous one *finishes*, which only the
simulator knows, so generated turns k > 0 carry `think_time_s` instead of an `arrival_s`.
Distributions and their sources: COST_MODEL.md; the file format: trace.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TurnSpec:
    conversation_id: int
    turn: int
    arrival_s: float | None
    """Absolute arrival when known in advance: always for turn 0, and for replayed traces."""
    prompt_tokens: int
    """The new user message only; the prompt sent is `history_tokens + prompt_tokens`."""
    output_tokens: int
    client_id: int
    history_tokens: int
    think_time_s: float = 0.0
    """Delay after the previous turn finishes; used when `arrival_s` is None."""

    @property
    def full_prompt_tokens(self) -> int:
        return self.history_tokens + self.prompt_tokens

    def resolve_arrival(self, previous_finish_s: float | None) -> float:
        if self.arrival_s is not None:
            return self.arrival_s
        if previous_finish_s is None:
            raise ValueError(
                f"conversation {self.conversation_id} turn {self.turn} arrives relative to the "
                "previous turn's finish, which was not given"
            )
        return previous_finish_s + self.think_time_s


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Parameterised by its mean (what papers report) and the sigma of the underlying normal."""

    mean: float
    sigma: float

    def sample(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.mean) - self.sigma**2 / 2, self.sigma)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    num_conversations: int
    arrival_rate: float
    """New conversations per second."""
    num_clients: int = 1
    client_weights: tuple[float, ...] | None = None
    """Relative share of conversations per client; uniform when None."""
    mean_turns: float = 5.5
    user_tokens: LogNormal = LogNormal(mean=94.5, sigma=1.1)
    response_tokens: LogNormal = LogNormal(mean=348.5, sigma=0.9)
    mean_think_time_s: float = 10.0
    max_context: int = 8192
    max_output_tokens: int = 2048
    min_output_tokens: int = 1  # e.g. 2048 for a reasoning model's long decodes
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_conversations < 0 or self.arrival_rate <= 0 or self.num_clients < 1:
            raise ValueError("need num_conversations >= 0, arrival_rate > 0, num_clients >= 1")
        if self.client_weights is not None and (
            len(self.client_weights) != self.num_clients or min(self.client_weights) < 0
            or sum(self.client_weights) <= 0
        ):
            raise ValueError(
                f"client_weights must be {self.num_clients} non-negative numbers, not all zero"
            )
        if self.mean_turns < 1 or self.mean_think_time_s < 0:
            raise ValueError("need mean_turns >= 1 and mean_think_time_s >= 0")
        if not 1 <= self.min_output_tokens <= self.max_output_tokens < self.max_context:
            raise ValueError("need 1 <= min_output_tokens <= max_output_tokens < max_context")


def _num_turns(rng: random.Random, mean: float) -> int:
    """Geometric on {1, 2, ...} with the given mean (inverse-CDF, so one draw per conversation)."""
    if mean == 1:
        return 1
    u = 1.0 - rng.random()  # (0, 1]
    return 1 + int(math.log(u) / math.log(1.0 - 1.0 / mean))


def _tokens(rng: random.Random, dist: LogNormal, limit: int, floor: int = 1) -> int:
    return min(limit, max(floor, round(dist.sample(rng))))


def generate(config: WorkloadConfig) -> list[TurnSpec]:
    """Turns ordered by conversation (in arrival order), then by turn; deterministic per seed.

    A conversation ends early when its next turn would not fit the model context, as a chat
    UI stops accepting messages; it never truncates history, which would invalidate the KV.
    """
    rng = random.Random(config.seed)
    clients = range(config.num_clients)
    turns: list[TurnSpec] = []
    now = 0.0
    for conversation_id in range(config.num_conversations):
        now += rng.expovariate(config.arrival_rate)
        client_id = rng.choices(clients, weights=config.client_weights)[0]
        history = 0
        for turn in range(_num_turns(rng, config.mean_turns)):
            output = _tokens(rng, config.response_tokens, config.max_output_tokens,
                             config.min_output_tokens)
            prompt = _tokens(rng, config.user_tokens, config.max_context - output)
            think = (
                rng.expovariate(1.0 / config.mean_think_time_s)
                if turn and config.mean_think_time_s > 0
                else 0.0
            )
            if history + prompt + output > config.max_context:
                break
            turns.append(TurnSpec(
                conversation_id=conversation_id,
                turn=turn,
                arrival_s=now if turn == 0 else None,
                prompt_tokens=prompt,
                output_tokens=output,
                client_id=client_id,
                history_tokens=history,
                think_time_s=think,
            ))
            history += prompt + output
    return turns
