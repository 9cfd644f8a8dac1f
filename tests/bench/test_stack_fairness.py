"""`benchmarks/stack_fairness.py`: fairness_stats' figures from what the stack's clients saw."""

from __future__ import annotations

import pytest

from benchmarks.stack_fairness import stack_fairness
from common.latency import gaps
from common.loadgen import LoadReport, PriorityUpdate, TurnResult


def _turn(client: str, turn: int, sent: float, tokens: list[float], prompt: int,
          reused: int = 0) -> TurnResult:
    return TurnResult(f"conv-{client}", turn, list(range(len(tokens))), tokens[0] - sent,
                      gaps(tokens), 0, 0, reused, tokens[-1], client, sent, prompt)


def test_classes_service_gaps_and_inversions_from_client_timestamps() -> None:
    report = LoadReport(wall_s=12.0, turns=[
        _turn("a", 0, 0.0, [1.0, 2.0, 3.0], prompt=10),
        _turn("b", 0, 0.0, [4.0, 5.0], prompt=10),
        _turn("b", 1, 6.0, [11.0], prompt=4, reused=2),
    ], priority_log=[
        PriorityUpdate(0.5, "a", 3),  # before a's first token: its whole request is class 3
        PriorityUpdate(5.5, "b", 2),  # b's live request had finished; its next is sent at 2
    ])
    f = stack_fairness(report, kv_tokens=64, inversions=3, inversion_s=0.25)
    assert (f["top_class"], f["bottom_class"]) == (3, 0)
    assert (f["top_p95_ttft_s"], f["top_p99_tbt_s"]) == (1.0, 1.0)
    assert (f["bottom_p95_ttft_s"], f["bottom_p99_tbt_s"]) == (4.0, 1.0)  # b's first turn
    # a: 10 prompt + 3 x 2 = 16 by t=3 while b, backlogged too, had none; b ends at 18
    assert f["vtc_max_gap"] == 16.0
    assert f["vtc_bound_2u"] == 2 * max(10 + 3, 2 * 64)
    assert f["vtc_within_bound"] is True
    assert f["jain_index"] == pytest.approx(34**2 / (2 * (16**2 + 18**2)))
    assert (f["priority_inversions"], f["priority_inversion_s"]) == (3, 0.25)


def test_a_client_not_backlogged_opens_no_gap() -> None:
    """b arrives only after a has finished: their service differs, but over no interval in
    which both waited."""
    report = LoadReport(wall_s=4.0, turns=[
        _turn("a", 0, 0.0, [1.0, 2.0], prompt=10), _turn("b", 0, 2.5, [3.0], prompt=2),
    ])
    f = stack_fairness(report, kv_tokens=64, inversions=0, inversion_s=0.0)
    assert f["vtc_max_gap"] == 0.0
    assert (f["top_class"], f["bottom_class"]) == (0, 0)
