"""Replays a JSONL trace (benchmarks/sim/trace.py) against the real stack, as the simulator does.

A turn's prompt is its conversation's history (earlier prompts and the tokens they got back)
plus `prompt_tokens` seeded token ids (`benchmarks.sim.replay.message_tokens`, so the prompts
are the simulator's). It asks for `output_tokens` with `ignore_eos`, so output lengths follow
the trace. A turn is sent at `arrival_s * time_scale` after the start when the trace gives
`arrival_s` (never before the previous turn finished), else `think_time_s * time_scale` after
the previous turn finished.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from benchmarks.sim.replay import message_tokens, request_id
from benchmarks.sim.workload import TurnSpec
from common.client import FastSwitchClient, Sampling
from common.latency import gaps
from common.loadgen import LoadReport, TurnResult


class TraceDoesNotFit(ValueError):
    """A conversation of the trace outgrows the model's context."""


def first_conversations(turns: Sequence[TurnSpec], limit: int | None) -> list[TurnSpec]:
    """The turns of the first `limit` conversations, in the order they first appear."""
    if limit is None:
        return list(turns)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    keep: list[int] = []
    for t in turns:
        if t.conversation_id not in keep and len(keep) < limit:
            keep.append(t.conversation_id)
    return [t for t in turns if t.conversation_id in keep]


def check_fits(turns: Sequence[TurnSpec], max_model_len: int) -> None:
    for t in turns:
        if t.full_prompt_tokens + t.output_tokens > max_model_len:
            raise TraceDoesNotFit(
                f"{request_id(t)} needs {t.full_prompt_tokens + t.output_tokens} tokens of "
                f"context; the model has {max_model_len} (use --limit or a shorter trace)"
            )


async def replay_trace(
    address: str,
    turns: Sequence[TurnSpec],
    *,
    seed: int,
    vocab: int,
    time_scale: float = 1.0,
    progress: Callable[[str], None] = lambda _: None,
) -> LoadReport:
    """Sends every turn, each conversation's one after the other; latencies client-side."""
    if time_scale < 0:
        raise ValueError(f"--time-scale must be >= 0, got {time_scale}")
    by_conversation: dict[int, list[TurnSpec]] = {}
    for t in turns:
        by_conversation.setdefault(t.conversation_id, []).append(t)
    async with FastSwitchClient(address) as client:
        await client.wait_ready()
        report = LoadReport(wall_s=0.0)
        start = time.monotonic()

        async def conversation(specs: list[TurnSpec]) -> None:
            history: list[int] = []
            for spec in sorted(specs, key=lambda s: s.turn):
                if spec.arrival_s is not None:
                    await asyncio.sleep(start + spec.arrival_s * time_scale - time.monotonic())
                else:
                    await asyncio.sleep(spec.think_time_s * time_scale)
                prompt = history + message_tokens(
                    seed, spec.conversation_id, spec.turn, spec.prompt_tokens, vocab
                )
                sent = time.monotonic()
                times: list[float] = []
                gen = client.generate(
                    prompt, client_id=f"client-{spec.client_id}", max_tokens=spec.output_tokens,
                    conversation_id=f"conv-{spec.conversation_id}", request_id=request_id(spec),
                    sampling=Sampling(ignore_eos=True),
                )
                async for _ in gen:
                    times.append(time.monotonic())
                assert gen.final is not None
                tokens = [t.id for t in gen.tokens]
                if len(tokens) != spec.output_tokens:
                    raise RuntimeError(f"{request_id(spec)}: {len(tokens)} tokens back, the "
                                       f"trace says {spec.output_tokens} (ignore_eos was set)")
                report.turns.append(TurnResult(
                    f"conv-{spec.conversation_id}", spec.turn, tokens,
                    times[0] - sent if times else 0.0, gaps(times), gen.final.preemptions,
                    gen.final.bytes_swapped, gen.final.reused_prompt_tokens,
                    time.monotonic() - start, f"client-{spec.client_id}", sent - start,
                    gen.final.prompt_tokens, gen.final.ttft_s,
                ))
                history = prompt + tokens
                progress(f"[{time.monotonic() - start:6.1f}s] {len(report.turns)}/{len(turns)} "
                         f"turns done ({request_id(spec)}: {len(tokens)} tokens)")

        await asyncio.gather(*(conversation(specs) for specs in by_conversation.values()))
        report.wall_s = time.monotonic() - start
        report.turns.sort(key=lambda t: (t.conversation_id, t.turn))
        return report
