"""`benchmarks/sim_vs_real.py`: the calibrated CPU model, and a small end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import sim_vs_real
from benchmarks.sim.hardware import A10, LLAMA3_8B, Deployment
from services.scheduler.step_log import LoggedStep


def test_the_fit_recovers_known_costs_and_never_goes_negative() -> None:
    rows = [[1.0, n, n * n] for n in (1, 4, 16, 64)]
    seconds = [0.002 + 1e-4 * n + 1e-6 * n * n for n in (1, 4, 16, 64)]
    assert sim_vs_real._fit(rows, seconds) == pytest.approx([0.002, 1e-4, 1e-6], rel=1e-6)
    assert sim_vs_real._fit([[1.0, 1.0], [1.0, 2.0]], [2.0, 1.0])[1] == 0.0


def fitted() -> sim_vs_real.FittedStepModel:
    return sim_vs_real.FittedStepModel(Deployment(A10, LLAMA3_8B), base_s=1e-3, per_tile_s=1e-2,
                                       per_width_block_s=1e-4, per_row_block_s=1e-6)


def test_fitted_step_time_counts_tiles_and_the_widest_sequences_blocks_for_every_row() -> None:
    # two decodes at contexts 9 and 40, and a 31-token prefill: 33 rows, 2 tiles of 32;
    # the widest sequence ends at token 41, 3 blocks of 16, and every row attends over them
    batch = [(9, 1), (40, 1), (0, 31)]
    assert sim_vs_real.step_features(batch) == [1.0, 2.0, 3.0, 99.0]
    assert fitted().step_time_s(batch) == pytest.approx(1e-3 + 2e-2 + 3e-4 + 99e-6)


def test_the_load_factor_is_the_timed_over_the_priced_seconds_of_the_real_steps() -> None:
    model = fitted()
    batches = [((0, 16),), ((16, 1), (0, 40))]
    steps = [LoggedStep(i, b, 3 * model.executor_s(b)) for i, b in enumerate(batches)]
    load = sim_vs_real.load_factor(model, steps)
    assert load["load_factor"] == pytest.approx(3.0)
    assert load["step_fit_median_abs_error"] == pytest.approx(0.0, abs=1e-12)
    slowed = model.slowed(load["load_factor"], overhead_s=2e-3)
    assert [slowed.step_time_s(b) for b in batches] == pytest.approx(
        [s.duration_s + 2e-3 for s in steps])


def test_a_run_with_no_timed_steps_has_a_neutral_load_factor() -> None:
    for steps in ([], [LoggedStep(0, ((0, 16),), 0.0)]):
        assert sim_vs_real.load_factor(fitted(), steps) == {
            "load_factor": 1.0, "executor_step_mean_s": 0.0, "step_fit_median_abs_error": 0.0}


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
    row = doc["modes"]["fastswitch"]
    assert row["sim"]["load_factor"] > 0 and row["real_measured"]["steps"] > 0
    errors = [k for k in doc["modes"]["fastswitch"] if "error" in k]
    assert {"p50_ttft_error", "p95_ttft_error", "p99_tbt_error", "throughput_tok_error"} <= set(
        errors)
