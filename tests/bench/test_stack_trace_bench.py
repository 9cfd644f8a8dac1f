"""`python -m benchmarks.stack --trace`: a simulator trace replayed through the real stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import stack
from benchmarks.sim.trace import load_trace, write_trace
from benchmarks.sim.workload import TurnSpec
from benchmarks.stack_trace import TraceDoesNotFit, check_fits, first_conversations


def _turn(conversation: int, turn: int, prompt: int, output: int, history: int = 0) -> TurnSpec:
    return TurnSpec(conversation, turn, None if turn else 0.05 * conversation, prompt, output,
                    client_id=conversation % 2, history_tokens=history, think_time_s=0.05)


TRACE = [
    _turn(0, 0, 30, 12), _turn(1, 0, 40, 9), _turn(0, 1, 20, 10, history=42),
    _turn(2, 0, 25, 7),
]


def test_limit_keeps_whole_conversations_in_order_of_first_appearance() -> None:
    assert first_conversations(TRACE, 2) == TRACE[:3]
    assert first_conversations(TRACE, None) == TRACE
    with pytest.raises(ValueError, match="--limit"):
        first_conversations(TRACE, 0)


def test_a_conversation_longer_than_the_model_is_refused_up_front() -> None:
    check_fits(TRACE, 72)
    with pytest.raises(TraceDoesNotFit, match="conv-0/turn-1 needs 72 tokens"):
        check_fits(TRACE, 71)


def test_limit_without_a_trace_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        stack.main(["--limit", "2"])


def test_trace_replay_returns_the_traces_output_lengths(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    write_trace(trace, TRACE)
    assert load_trace(trace) == TRACE
    out = tmp_path / "stack.json"
    code = stack.main(["--trace", str(trace), "--limit", "2", "--time-scale", "0.5",
                       "--modes", "fastswitch", "--switches=-turn_offload",
                       "--gpu-blocks", "8", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert list(doc["modes"]) == ["fastswitch"]
    assert doc["modes"]["fastswitch"]["output_tokens"] == 12 + 9 + 10
    assert doc["workload"]["switches"] == "-turn_offload"
    assert doc["identical_tokens"] is True
    fs = doc["modes"]["fastswitch"]
    # what fairness buys, from the stack's clients and counters: one class (no updates) ...
    assert fs["top_class"] == fs["bottom_class"] == 0
    assert fs["top_p95_ttft_s"] == fs["bottom_p95_ttft_s"] > 0
    # ... so no request can outrank another: no inversion, whatever waited
    assert fs["priority_inversions"] == fs["priority_inversion_s"] == 0
    assert 0 < fs["vtc_max_gap"] <= fs["vtc_bound_2u"] == 2 * 2 * 8 * 16
    assert 0.5 <= fs["jain_index"] <= 1
    assert "priority inversions (steps)" in doc["table"]
