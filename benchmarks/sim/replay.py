"""Turns `TurnSpec`s into planner `Request`s, one conversation turn after the other.

A turn's prompt is the conversation's whole history, i.e. the previous turn's prompt and the
tokens it actually generated, plus a new user message. The message's token ids are synthetic
but a pure function of (seed, conversation, turn), so both modes see the same prompts and the
reuse index sees real prefixes. A later turn exists only once the previous one finished, so
it is created by the driver's `follow_up` callback; it arrives `think_time_s` after that
finish, or at its trace time if that is later (a user cannot answer a reply not yet written).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.sim.workload import TurnSpec
from services.scheduler.core.request import Request


def message_tokens(seed: int, conversation_id: int, turn: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(f"{seed}/message/{conversation_id}/{turn}")
    return [rng.randrange(vocab) for _ in range(n)]


def request_id(spec: TurnSpec) -> str:
    return f"conv-{spec.conversation_id}/turn-{spec.turn}"


@dataclass
class Replay:
    turns: Sequence[TurnSpec]
    seed: int
    vocab: int = 32000
    history_known: bool = True
    """Each request says how much of its prompt is its conversation's history, as a Chat
    request does; False: it does not, as a Generate of token ids does not (the scheduler
    then asks the host about every turn's prefix, the first turn's too)."""
    _specs: dict[tuple[int, int], TurnSpec] = field(init=False, repr=False)
    _spec_of: dict[str, TurnSpec] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._specs = {(t.conversation_id, t.turn): t for t in self.turns}
        if len(self._specs) != len(self.turns):
            raise ValueError("a (conversation, turn) pair appears twice")
        self._spec_of = {}

    def first_turns(self) -> list[tuple[float, Request]]:
        """What to submit before the run: every conversation's opening turn."""
        openers = [t for t in self.turns if t.turn == 0]
        return [(t.resolve_arrival(None), self._request(t, [])) for t in openers]

    def follow_up(self, done: Request, now: float) -> list[tuple[float, Request]]:
        spec = self._spec_of[done.request_id]
        nxt = self._specs.get((spec.conversation_id, spec.turn + 1))
        if nxt is None:
            return []
        at = now + nxt.think_time_s if nxt.arrival_s is None else max(nxt.arrival_s, now)
        return [(at, self._request(nxt, done.tokens))]

    def _request(self, spec: TurnSpec, history: list[int]) -> Request:
        if len(history) != spec.history_tokens:
            raise ValueError(
                f"{request_id(spec)}: history has {len(history)} tokens, the workload says "
                f"{spec.history_tokens} (a turn stopped before its output_tokens)"
            )
        message = message_tokens(
            self.seed, spec.conversation_id, spec.turn, spec.prompt_tokens, self.vocab
        )
        request = Request(
            request_id=request_id(spec),
            client_id=f"client-{spec.client_id}",
            prompt=history + message,
            max_tokens=spec.output_tokens,
            conversation_id=f"conv-{spec.conversation_id}",
            history_tokens=len(history) if self.history_known else None,
        )
        self._spec_of[request.request_id] = spec
        return request
