"""`benchmarks/sim_vs_real.py`: the calibrated CPU model, and a small end-to-end run."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import sim_vs_real
from benchmarks.cli import parse_seeds
from benchmarks.sim.hardware import A10, LLAMA3_8B, Deployment
from services.scheduler.core.config import Mode
from services.scheduler.step_log import LoggedStep


def test_the_fit_recovers_known_costs_and_never_goes_negative() -> None:
    rows = [[1.0, n, n * n] for n in (1, 4, 16, 64)]
    seconds = [0.002 + 1e-4 * n + 1e-6 * n * n for n in (1, 4, 16, 64)]
    assert sim_vs_real._fit(rows, seconds) == pytest.approx([0.002, 1e-4, 1e-6], rel=1e-6)
    assert sim_vs_real._fit([[1.0, 1.0], [1.0, 2.0]], [2.0, 1.0])[1] == 0.0


def test_the_fit_is_unbiased_in_the_mean_under_proportional_noise() -> None:
    # Each time once 20% under and once 20% over its true 1 + n: weighing by 1 / the timed
    # seconds would fit low (the fast points weigh more); weighing by the price does not.
    ns = [1.0, 2.0, 4.0, 8.0]
    rows = [[1.0, n] for n in ns for _ in (0, 1)]
    seconds = [(1 + n) * f for n in ns for f in (0.8, 1.2)]
    assert sim_vs_real._fit(rows, seconds) == pytest.approx([1.0, 1.0], rel=1e-6)


def test_a_step_timed_near_zero_does_not_outweigh_the_rest() -> None:
    rows = [[1.0, n] for n in (1, 2, 4, 8, 16, 32) for _ in range(5)]
    seconds = [0.01 + 1e-3 * n for _, n in rows]
    # one step's time counted in its neighbour's: it took 30 us, the one before it double
    rows += [[1.0, 4.0], [1.0, 4.0]]
    seconds += [3e-5, 2 * (0.01 + 4e-3) - 3e-5]
    base, per_n = sim_vs_real._fit(rows, seconds)
    assert base == pytest.approx(0.01, rel=0.05) and per_n == pytest.approx(1e-3, rel=0.05)


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
    assert sim_vs_real.load_factor(model, steps) == pytest.approx(3.0)
    slowed = model.slowed(3.0)
    assert sim_vs_real.step_fit_error(slowed, steps) == pytest.approx(0.0, abs=1e-12)
    assert [slowed.executor_s(b) for b in batches] == pytest.approx(
        [s.duration_s for s in steps])


def test_a_run_with_no_timed_steps_has_a_neutral_load_factor() -> None:
    for steps in ([], [LoggedStep(0, ((0, 16),), 0.0)]):
        assert sim_vs_real.load_factor(fitted(), steps) == 1.0
        assert sim_vs_real.step_fit_error(fitted(), steps) == 0.0


# A real run's mix: decodes of 1 to 32 rows at several widths, prefill chunks up to 256
# tokens at no context and behind one, and chunks beside decodes.
LOGGED_BATCHES = [
    *[((start, 1),) * rows for rows in (1, 4, 12, 32) for start in (20, 150, 400)],
    *[((start, new),) for new in (16, 100, 256) for start in (0, 256)],
    *[((64, 1),) * rows + ((0, new),) for rows in (3, 20) for new in (40, 236)],
]


def run_steps(model: sim_vs_real.FittedStepModel) -> list[LoggedStep]:
    return [LoggedStep(i, b, model.executor_s(b)) for i, b in enumerate(LOGGED_BATCHES)]


def test_the_log_fit_recovers_the_shape_the_run_stepped_at() -> None:
    truth = sim_vs_real.FittedStepModel(Deployment(A10, LLAMA3_8B), base_s=2e-3,
                                        per_tile_s=8e-3, per_width_block_s=3e-4,
                                        per_row_block_s=2e-6)
    model = sim_vs_real.fit_step_log(truth.deployment, run_steps(truth))
    assert model is not None
    assert sim_vs_real.step_coefficients(model) == pytest.approx(
        sim_vs_real.step_coefficients(truth), rel=1e-6)


def test_the_simulator_steps_at_the_runs_own_shape_and_reports_both_fits() -> None:
    calibrated = fitted()  # prices a tile ten times a decode step's base: a chunk too high
    truth = replace(calibrated, base_s=4e-3, per_tile_s=4e-3, per_row_block_s=4e-6)
    steps = run_steps(truth)
    model, report = sim_vs_real.step_models(calibrated, steps, "log")
    assert report["step_shape"] == "log"
    assert sim_vs_real.step_coefficients(model) == pytest.approx(
        sim_vs_real.step_coefficients(truth), rel=1e-6)
    assert report["log_fit"]["median_abs_step_error"] == pytest.approx(0.0, abs=1e-9)
    assert report["log_fit"]["priced_over_timed"] == pytest.approx(1.0)
    # the calibrated shape, however slowed, misses these steps; in all it prices them right
    assert report["calibration_fit"]["median_abs_step_error"] > 0.1
    # its tiles cost more than the run's: the steps of several tiles are priced too high
    assert report["calibration_fit"]["multi_tile_median_error"] > 0.1
    assert report["log_fit"]["multi_tile_median_error"] == pytest.approx(0.0, abs=1e-9)
    assert report["calibration_fit"]["priced_over_timed"] == pytest.approx(1.0)
    slowed, report = sim_vs_real.step_models(calibrated, steps, "calibration")
    assert report["step_shape"] == "calibration"
    assert slowed == calibrated.slowed(report["load_factor"])
    assert "log_fit" in report


def test_a_log_too_short_to_fit_keeps_the_calibrated_shape() -> None:
    steps = run_steps(fitted())[:3]
    model, report = sim_vs_real.step_models(fitted(), steps, "log")
    assert sim_vs_real.fit_step_log(fitted().deployment, steps) is None
    assert report["step_shape"] == "calibration" and "log_fit" not in report
    assert report["calibration_fit"]["multi_tile_median_error"] is None  # no prefill chunk
    assert model == fitted().slowed(1.0)
    with pytest.raises(ValueError, match="step shape"):
        sim_vs_real.step_models(fitted(), steps, "roofline")


def test_the_simulated_ttfts_are_the_clients_the_run_s_hop_added() -> None:
    args = argparse.Namespace(conversations=4, rate=2.0, mean_turns=2.0, think_time=0.5,
                              gpu_blocks=96, seed=0, step_shape="log")
    calibration = {"copy_overhead_s": 1e-4, "copy_bandwidth_bytes_per_s": 6e9,
                   "copy_cpu_share": 0.0, **{f"step_{k}": v for k, v in
                                             sim_vs_real.step_coefficients(fitted()).items()}}
    truth = replace(fitted(), deployment=sim_vs_real.cpu_deployment(512))

    def sim(hop_s: float) -> sim_vs_real.Latencies:
        real = sim_vs_real.RealRun(
            sim_vs_real.Latencies([], [], 0, 0.0),
            {"step_overhead_mean_s": 0.0, "store_round_trip_s": 1e-3, "client_hop_s": hop_s},
            run_steps(truth), 512)
        latencies, _ = sim_vs_real.run_sim(Mode.FASTSWITCH, sim_vs_real.workload(args),
                                           calibration, real, args)
        return latencies

    at_the_scheduler, at_the_client = sim(0.0), sim(0.005)
    assert at_the_client.ttfts == pytest.approx([t + 0.005 for t in at_the_scheduler.ttfts])
    assert at_the_client.tbts == at_the_scheduler.tbts


def test_runs_are_pooled_before_the_percentiles_are_taken() -> None:
    # Each run alone has a median TTFT of 1 s or 2 s; pooled, the median is 1 s, taken
    # over all six turns, and throughput is all tokens over both spans.
    one = sim_vs_real.Latencies([1.0, 1.0, 1.0], [0.1], 30, 2.0)
    two = sim_vs_real.Latencies([2.0, 2.0, 9.0], [0.3], 10, 3.0)
    pooled = sim_vs_real.Latencies.pooled([one, two])
    assert pooled.ttfts == [1.0, 1.0, 1.0, 2.0, 2.0, 9.0] and pooled.tbts == [0.1, 0.3]
    assert pooled.metrics() == {"p50_ttft_s": 1.0, "p95_ttft_s": 9.0, "p99_tbt_s": 0.3,
                                "throughput_tok_s": 8.0}


def test_the_ttft_spread_is_how_far_redrawn_turns_move_a_percentile() -> None:
    # 94 turns of 0.1 s and 6 of 1 s: the P95 is 1 s, and about half of all redraws of the
    # turns hold fewer than 6 slow ones, which makes it 0.1 s; the median never moves.
    turns = sim_vs_real.Latencies([0.1] * 94 + [1.0] * 6, [], 0, 1.0)
    assert turns.metrics()["p95_ttft_s"] == 1.0
    assert turns.ttft_spread() == {"p50_ttft_s": 0.0, "p95_ttft_s": pytest.approx(0.45)}
    assert turns.ttft_spread(seed=3) == turns.ttft_spread(seed=3)
    assert sim_vs_real.Latencies([0.2] * 50, [], 0, 1.0).ttft_spread() == {
        "p50_ttft_s": 0.0, "p95_ttft_s": 0.0}
    assert sim_vs_real.Latencies([], [], 0, 0.0).ttft_spread() == {
        "p50_ttft_s": 0.0, "p95_ttft_s": 0.0}


def test_seeds_are_distinct_integers() -> None:
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "1,1", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seeds(bad)


def test_deciles_are_the_nearest_rank_tenths() -> None:
    assert sim_vs_real.deciles([float(v) for v in range(1, 21)]) == [
        2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0]


def test_errors_are_relative_and_named_error() -> None:
    row = sim_vs_real.compare({"p50_ttft_s": 2.0, "throughput_tok_s": 10.0},
                              {"p50_ttft_s": 2.2, "throughput_tok_s": 5.0})
    assert row["p50_ttft_error"] == pytest.approx(0.1)
    assert row["throughput_tok_error"] == pytest.approx(-0.5)
    assert row["all_errors_within_goal"] is False


def test_a_small_run_reports_every_error(tmp_path: Path) -> None:
    out = tmp_path / "sim_vs_real.json"
    assert sim_vs_real.main(["--conversations", "2", "--modes", "fastswitch", "--repeats", "1",
                             "--seeds", "0,1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["calibration"]["copy_bandwidth_bytes_per_s"] > 0
    row = doc["modes"]["fastswitch"]
    assert [run["seed"] for run in row["runs"]] == [0, 1]
    for run in row["runs"]:
        assert run["sim"]["load_factor"] > 0 and run["real_measured"]["steps"] > 0
        assert run["sim"]["step_shape"] in {"log", "calibration"}
    # the pooled row is taken over both seeds' turns
    assert row["real_measured"]["turns"] == sum(run["real_measured"]["turns"]
                                                for run in row["runs"]) > 0
    assert len(row["sim"]["ttft_deciles_s"]) == len(row["real_measured"]["ttft_deciles_s"]) == 9
    assert set(row["real_measured"]["ttft_spread"]) == {"p50_ttft_s", "p95_ttft_s"}
    errors = [k for k in doc["modes"]["fastswitch"] if "error" in k]
    assert {"p50_ttft_error", "p95_ttft_error", "p99_tbt_error", "throughput_tok_error"} <= set(
        errors)
