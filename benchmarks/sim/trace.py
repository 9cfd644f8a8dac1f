"""JSONL workload traces: one turn per line, so a workload can be saved, edited and replayed.

Each line is an object with `conversation_id`, `turn`, `arrival_s`, `prompt_tokens`,
`output_tokens`, `client_id` and optionally `think_time_s` (default 0). `prompt_tokens` is the
new user message; the history is derived from the conversation's earlier turns. `arrival_s`
may be null for turns after the first, which then arrive `think_time_s` after the previous
turn finishes. Blank lines are ignored; anything else wrong is a `TraceError` naming the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.sim.workload import TurnSpec

# Integer fields and the smallest value each may take.
_INT_FIELDS = {
    "conversation_id": 0,
    "turn": 0,
    "prompt_tokens": 1,
    "output_tokens": 1,
    "client_id": 0,
}
_FIELDS = {*_INT_FIELDS, "arrival_s", "think_time_s"}


class TraceError(ValueError):
    """A malformed trace; the message names the file, the line and the field."""


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    conversation_id: int
    turn: int
    arrival_s: float | None
    prompt_tokens: int
    output_tokens: int
    client_id: int
    think_time_s: float


def write_trace(path: str | Path, turns: Iterable[TurnSpec]) -> None:
    with Path(path).open("w", encoding="utf-8") as out:
        for t in turns:
            record = {
                "conversation_id": t.conversation_id,
                "turn": t.turn,
                "arrival_s": t.arrival_s,
                "prompt_tokens": t.prompt_tokens,
                "output_tokens": t.output_tokens,
                "client_id": t.client_id,
                "think_time_s": t.think_time_s,
            }
            out.write(json.dumps(record) + "\n")


def _number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    if value < 0:
        raise TraceError(f"{where}: field '{name}' must be >= 0, got {value!r}")
    return float(value)


def _parse_line(where: str, number: int, text: str) -> _Line:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise TraceError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _FIELDS)
    if unknown:
        raise TraceError(f"{where}: unknown field '{unknown[0]}'")
    missing = [name for name in (*_INT_FIELDS, "arrival_s") if name not in record]
    if missing:
        raise TraceError(f"{where}: missing field '{missing[0]}'")
    ints: dict[str, int] = {}
    for name, least in _INT_FIELDS.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TraceError(
                f"{where}: field '{name}' must be an integer >= {least}, got {value!r}"
            )
        ints[name] = value
    arrival = record["arrival_s"]
    if arrival is None and ints["turn"] == 0:
        raise TraceError(f"{where}: field 'arrival_s' must be a number for turn 0, got null")
    return _Line(
        number=number,
        arrival_s=None if arrival is None else _number(where, "arrival_s", arrival),
        think_time_s=_number(where, "think_time_s", record.get("think_time_s", 0.0)),
        **ints,
    )


def load_trace(path: str | Path) -> list[TurnSpec]:
    """Turns in file order, with each turn's history derived from its conversation."""
    path = Path(path)
    lines: list[_Line] = []
    with path.open(encoding="utf-8") as trace:
        for number, text in enumerate(trace, start=1):
            if text.strip():
                lines.append(_parse_line(f"{path}:{number}", number, text))

    conversations: dict[int, dict[int, _Line]] = {}
    for line in lines:
        turns = conversations.setdefault(line.conversation_id, {})
        if line.turn in turns:
            raise TraceError(
                f"{path}:{line.number}: conversation {line.conversation_id} turn {line.turn} "
                f"already appears on line {turns[line.turn].number}"
            )
        turns[line.turn] = line

    history: dict[tuple[int, int], int] = {}
    for conversation_id, turns in conversations.items():
        first = turns[min(turns)]
        tokens = 0
        for turn in range(len(turns)):
            line = turns.get(turn)
            if line is None:
                raise TraceError(
                    f"{path}: conversation {conversation_id} has turns {sorted(turns)}; "
                    f"turn {turn} is missing"
                )
            if line.client_id != first.client_id:
                raise TraceError(
                    f"{path}:{line.number}: field 'client_id' is {line.client_id} but "
                    f"conversation {conversation_id} belongs to client {first.client_id} "
                    f"(line {first.number})"
                )
            history[conversation_id, turn] = tokens
            tokens += line.prompt_tokens + line.output_tokens

    return [
        TurnSpec(
            conversation_id=line.conversation_id,
            turn=line.turn,
            arrival_s=line.arrival_s,
            prompt_tokens=line.prompt_tokens,
            output_tokens=line.output_tokens,
            client_id=line.client_id,
            history_tokens=history[line.conversation_id, line.turn],
            think_time_s=line.think_time_s,
        )
        for line in lines
    ]
