"""`benchmarks/sim_vs_real.py`: the calibrated CPU model, and a small end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import sim_vs_real
from benchmarks.sim.hardware import A10, LLAMA3_8B, Deployment


def test_the_fit_recovers_known_costs_and_never_goes_negative() -> None:
    rows = [[1.0, n, n * n] for n in (1, 4, 16, 64)]
    seconds = [0.002 + 1e-4 * n + 1e-6 * n * n for n in (1, 4, 16, 64)]
    assert sim_vs_real._fit(rows, seconds) == pytest.approx([0.002, 1e-4, 1e-6], rel=1e-6)
    assert sim_vs_real._fit([[1.0, 1.0], [1.0, 2.0]], [2.0, 1.0])[1] == 0.0


def test_fitted_step_time_counts_tokens_and_attended_context() -> None:
    model = sim_vs_real.FittedStepModel(Deployment(A10, LLAMA3_8B), base_s=1e-3,
                                        per_token_s=1e-4, per_attended_s=1e-6)
    # two decodes at contexts 9 and 19, and a 10-token prefill: 12 tokens, 10 + 20 + 100
    assert model.step_time_s([(9, 1), (19, 1), (0, 10)]) == pytest.approx(
        1e-3 + 12e-4 + 130e-6)


def test_errors_are_relative_and_named_error() -> None:
    row = sim_vs_real.compare({"p50_ttft_s": 2.0, "throughput_tok_s": 10.0},
                              {"p50_ttft_s": 2.2, "throughput_tok_s": 5.0})
    assert row["p50_ttft_error"] == pytest.approx(0.1)
    assert row["throughput_tok_error"] == pytest.approx(-0.5)
    assert row["all_errors_within_goal"] is False


def test_a_small_run_reports_every_error(tmp_path: Path) -> None:
    out = tmp_path / "sim_vs_real.json"
    assert sim_vs_real.main(["--conversations", "2", "--modes", "fastswitch", "--repeats", "1",
                             "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["calibration"]["copy_bandwidth_bytes_per_s"] > 0
    errors = [k for k in doc["modes"]["fastswitch"] if "error" in k]
    assert {"p50_ttft_error", "p95_ttft_error", "p99_tbt_error", "throughput_tok_error"} <= set(
        errors)
