"""The selection pass: which requests run or come in this step, and with how many tokens.

The planner ranks the live requests (`preemption.PreemptionPolicy.order`) and describes
each as a `Candidate`; `choose` walks them in that order and keeps each that fits. Residents
stay while they fit; waiting and swapped ones come in until the first that does not (later
ones would jump the queue). A resident that is not chosen is preempted by the planner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.request import Request


@dataclass(frozen=True, slots=True)
class Candidate:
    request: Request
    resident: bool  # its KV is on the device: it stays unless it does not fit
    start: int  # leading tokens whose KV it has, or will have without running them
    later: bool  # it runs only after a host reply or its own swap-in: room now, no tokens
    held_back: bool = False  # it may not come in yet (its last turn's KV is on its way out)


def choose(
    candidates: Iterable[Candidate], room: int, config: SchedulerConfig
) -> list[tuple[Request, int]]:
    """The chosen, each with the tokens it runs this step (0: it only swaps in, or asks
    the host first), within `room` device blocks and the config's batch limits."""
    budget, chosen, admitting = config.max_batched_tokens, [], True
    for c in candidates:
        if len(chosen) == config.max_num_seqs:
            break
        if not c.resident and (not admitting or c.held_back):
            continue
        chunk = min(c.request.num_tokens - c.start, budget)
        if not chunk and not c.resident and not c.later:
            admitting = False  # no token budget left to start anything new
            continue
        # Room for at least its next token, or a swap-in would be pushed straight out.
        blocks = config.blocks_for(c.start + max(chunk, 1))
        if blocks > room:
            admitting = False
            continue
        if c.later:
            chunk = 0
        room -= blocks
        budget -= chunk
        chosen.append((c.request, chunk))
    return chosen
