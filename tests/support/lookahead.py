"""Drives an executor engine through steps whose from_last_step entries feed the token the
step before sampled: pipelined, as a scheduler with lookahead sends them (each step begun and
launched before the one before it is collected), or one at a time with each such token given
explicitly, as a scheduler without lookahead would."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from services.executor.engine import ExecutorEngine, LaunchedStep, SampledToken, StepSequence

Tokens = tuple[SampledToken, ...]
Drive = Callable[[ExecutorEngine, Sequence[Sequence[StepSequence]]], list[Tokens]]


def run_explicitly(engine: ExecutorEngine, steps: Sequence[Sequence[StepSequence]]
                   ) -> list[Tokens]:
    """Each step run to its end before the next, from_last_step entries given their token."""
    results: list[Tokens] = []
    last: dict[str, int] = {}
    for step in steps:
        sequences = [replace(seq, token_ids=[last[seq.request_id]], from_last_step=False)
                     if seq.from_last_step else seq for seq in step]
        tokens = engine.run_step(engine.begin_step(sequences)).tokens
        last = {token.request_id: token.token_id for token in tokens}
        results.append(tokens)
    return results


def run_pipelined(engine: ExecutorEngine, steps: Sequence[Sequence[StepSequence]]
                  ) -> list[Tokens]:
    """Each step begun, prepared and launched while the one before is still uncollected."""
    results: list[Tokens] = []
    running: LaunchedStep | None = None
    for step in steps:
        launched = engine.launch_step(engine.prepare_step(engine.begin_step(step)))
        if running is not None:
            results.append(engine.collect_step(running).tokens)
        running = launched
    if running is not None:
        results.append(engine.collect_step(running).tokens)
    return results
