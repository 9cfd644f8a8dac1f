"""`benchmarks/fairness.py`: VTC's gap against 2U, priority inversions, tokens charged once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import fairness
from services.scheduler.core.config import Mode
from services.scheduler.core.policy import FCFS
from services.scheduler.core.request import Request


def test_jain_index_is_one_when_equal_and_one_over_n_when_one_gets_all() -> None:
    assert fairness.jain([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert fairness.jain([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)


def test_largest_gap_is_over_every_interval_and_pair() -> None:
    # a leads b by 5, then b catches up and leads by 2: over [t1, t3] b gained 7 more
    series = [(5.0, 0.0, 0.0), (5.0, 7.0, 1.0)]
    assert fairness.largest_gap(series) == 7.0
    assert fairness.largest_gap([]) == 0.0


def test_the_ledger_counts_tokens_charged_beyond_a_request() -> None:
    ledger = fairness.Ledger(FCFS(), ["a"])
    request = Request(request_id="r", client_id="a", prompt=[1] * 10, max_tokens=4)
    ledger.on_arrival(request, [])
    ledger.on_served(request, 10, 0)
    assert ledger.double_charged_tokens() == 0
    ledger.on_served(request, 6, 0)  # a recompute charged again
    assert ledger.double_charged_tokens() == 6
    assert ledger.service["a"] == 16


def test_report_runs_small_and_the_policies_keep_their_promises(tmp_path: Path) -> None:
    out = tmp_path / "fairness.json"
    assert fairness.main(["--per-client", "10", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    modes = doc["points"][0]["modes"]
    assert list(modes) == [m.value for m in Mode]
    for mode, p in modes.items():
        vtc, fcfs = p["vtc"], p["fcfs_contrast"]
        assert vtc["window_samples"] > 0, mode
        assert vtc["max_gap"] <= vtc["bound_2u"], mode
        assert vtc["jain_index"] > fcfs["jain_index"], mode
        # vLLM v1 as shipped never preempts for priority (vllm#40004): inversions show.
        preempts_for_priority = Mode(mode).preemption == "on-order-change"
        assert (p["priority"]["inversions"] == 0) is preempts_for_priority, mode
        assert p["priority_fcfs_contrast"]["inversions"] > 0, "the check can see inversions"
        assert vtc["double_charged_tokens"] == p["priority"]["double_charged_tokens"] == 0, mode


def test_a_run_with_no_instant_of_all_backlogged_reports_no_index(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Too few requests for every client to wait at once: no window, so no Jain's index
    (shown as "-"), rather than a crash."""
    assert fairness.main(["--per-client", "4", "--modes", "fastswitch"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "fastswitch" and row[3:5] == ["-", "-"]
