"""The paper-scale simulator: cost adapter, replay glue, conservation, report and CLI."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import paper_sim
from benchmarks.sim.copy_engine import KvLayout, LinkModel
from benchmarks.sim.cost_model import StepCostModel
from benchmarks.sim.costs import SimCost
from benchmarks.sim.hardware import A10, GPUS, LLAMA3_8B, Deployment
from benchmarks.sim.replay import Replay, message_tokens
from benchmarks.sim.report import PAPER_CLAIMS, Point, ratio
from benchmarks.sim.simulate import ConservationError, SimOptions, check_conservation, simulate
from benchmarks.sim.trace import load_trace, write_trace
from benchmarks.sim.virtual_driver import HostCosts
from benchmarks.sim.workload import LogNormal, TurnSpec, WorkloadConfig, generate
from common.kv.swap_plan import plan_copies
from services.scheduler.core.config import Mode
from services.scheduler.core.plan import Direction, ScheduledSeq, StepPlan, SwapOrder
from services.scheduler.core.policy import FCFS, POLICIES
from services.scheduler.core.request import Request

A10_LLAMA = Deployment(A10, LLAMA3_8B)
TINY_DEVICE = 48  # blocks: a few short conversations already preempt each other
SHORT = {
    "user_tokens": LogNormal(mean=40, sigma=0.5),
    "response_tokens": LogNormal(mean=24, sigma=0.5),
    "max_context": 512,
    "max_output_tokens": 64,
    "mean_think_time_s": 0.05,
}
REQUIRED_METRICS = {
    "p95_ttft_s", "p99_tbt_s", "p999_tbt_s", "throughput_tok_s", "swap_out_bytes",
    "swap_in_bytes", "copies", "preemptions", "context_switch_s_p99", "gpu_idle_frac",
}
FAIRNESS_METRICS = {
    "top_p95_ttft_s", "bottom_p95_ttft_s", "top_p99_tbt_s", "bottom_p99_tbt_s",
    "top_p999_tbt_s", "bottom_p999_tbt_s", "vtc_max_gap",
    "vtc_bound_2u", "jain_index", "priority_inversions", "priority_inversion_s",
}


def short_workload(n: int = 8, rate: float = 20.0, seed: int = 3, **overrides) -> list[TurnSpec]:
    config = {**SHORT, **overrides}
    return generate(WorkloadConfig(num_conversations=n, arrival_rate=rate, num_clients=3,
                                   seed=seed, **config))


def options(**overrides) -> SimOptions:
    return replace(SimOptions(update_every=5, device_blocks=TINY_DEVICE, seed=1), **overrides)


def step_model() -> StepCostModel:
    return StepCostModel(A10_LLAMA)


# ---- cost adapter --------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks", [1, 7, 30])
def test_baseline_swap_is_a_copy_per_block_per_layer_per_k_and_v(num_blocks: int) -> None:
    src, dst = list(range(100, 100 + num_blocks)), list(range(num_blocks))
    order = SwapOrder(1, "r", Direction.OUT, tuple(plan_copies(src, dst, merge=False)))
    cost = SimCost.for_mode(step_model(), LinkModel(), Mode.BASELINE)
    transfers = cost.transfers(order)
    assert cost.layout is KvLayout.LAYER_MAJOR
    assert sum(t.num_copies for t in transfers) == num_blocks * LLAMA3_8B.num_layers * 2
    assert sum(t.total_bytes for t in transfers) == num_blocks * A10_LLAMA.block_bytes
    expected = num_blocks * LLAMA3_8B.num_layers * 2 * LinkModel().copy_time_s(32 * 1024)
    assert cost.swap_seconds(order) == pytest.approx(expected)


def test_fastswitch_swap_is_one_copy_per_extent() -> None:
    src = [0, 1, 2, 3, 10, 11, 20]  # three runs, mapped to contiguous host blocks
    order = SwapOrder(1, "r", Direction.IN, tuple(plan_copies(src, range(50, 57))))
    cost = SimCost.for_mode(step_model(), LinkModel(), Mode.FASTSWITCH)
    transfers = cost.transfers(order)
    assert [t.num_copies for t in transfers] == [1, 1, 1]
    assert [t.total_bytes for t in transfers] == [n * A10_LLAMA.block_bytes for n in (4, 2, 1)]
    link = LinkModel()
    expected = sum(link.copy_time_s(n * A10_LLAMA.block_bytes) for n in (4, 2, 1))
    assert cost.swap_seconds(order) == pytest.approx(expected)


def test_step_time_takes_context_from_start_and_new_tokens_from_token_ids() -> None:
    batch = (
        ScheduledSeq("a", (0,), start=0, token_ids=tuple(range(300)), sample=True),
        ScheduledSeq("b", (1,), start=900, token_ids=(5,), sample=True),
    )
    plan = StepPlan(0, batch, (), (), (), barrier=False)
    model = step_model()
    cost = SimCost.for_mode(model, LinkModel(), Mode.FASTSWITCH)
    assert cost.step_seconds(plan) == model.step_time_s([(0, 300), (900, 1)])
    assert cost.step_seconds(plan) > model.step_time_s([(0, 1), (900, 1)])


# ---- replay --------------------------------------------------------------------------------


def test_replay_builds_history_plus_response_plus_new_message() -> None:
    turns = [
        TurnSpec(4, 0, 1.5, prompt_tokens=5, output_tokens=3, client_id=2, history_tokens=0),
        TurnSpec(4, 1, None, prompt_tokens=4, output_tokens=2, client_id=2, history_tokens=8,
                 think_time_s=0.25),
        TurnSpec(4, 2, 100.0, prompt_tokens=2, output_tokens=1, client_id=2, history_tokens=14),
    ]
    replay = Replay(turns, seed=9, vocab=50)
    [(at, first)] = replay.first_turns()
    assert at == 1.5
    assert first.prompt == message_tokens(9, 4, 0, 5, 50)
    assert (first.max_tokens, first.client_id, first.conversation_id) == (3, "client-2", "conv-4")

    first.output = [7, 8, 9]  # what the driver would have sampled
    [(at, second)] = replay.follow_up(first, now=10.0)
    assert at == 10.25  # think time after the previous turn finished
    assert second.prompt == [*first.prompt, 7, 8, 9, *message_tokens(9, 4, 1, 4, 50)]

    second.output = [1, 2]
    [(at, third)] = replay.follow_up(second, now=20.0)
    assert at == 100.0  # a trace time later than the finish is kept
    assert third.prompt[:14] == second.tokens
    third.output = [3]
    assert replay.follow_up(third, now=101.0) == []


def test_replay_rejects_a_turn_that_stopped_short() -> None:
    turns = [
        TurnSpec(0, 0, 0.0, prompt_tokens=5, output_tokens=3, client_id=0, history_tokens=0),
        TurnSpec(0, 1, None, prompt_tokens=4, output_tokens=2, client_id=0, history_tokens=8),
    ]
    replay = Replay(turns, seed=0)
    [(_, first)] = replay.first_turns()
    first.output = [1]  # two tokens short of output_tokens
    with pytest.raises(ValueError, match="history has 6 tokens"):
        replay.follow_up(first, now=1.0)


def test_messages_are_deterministic_and_differ_between_conversations() -> None:
    assert message_tokens(1, 2, 3, 20, 100) == message_tokens(1, 2, 3, 20, 100)
    assert message_tokens(1, 2, 3, 20, 100) != message_tokens(1, 5, 3, 20, 100)


# ---- simulation ----------------------------------------------------------------------------


def test_checked_executor_proves_the_replay_token_exact_in_every_mode() -> None:
    turns = short_workload()
    outputs = {}
    for mode in Mode:
        result = simulate(A10_LLAMA, mode, turns, options(), check_tokens=True)
        s = result.stats
        if mode.switches.swap_preemption:
            assert s.preempted_by_swap > 0  # the check covered real swaps
        else:  # and real recomputes, device cache hits and eager stores
            assert s.preempted_by_recompute and s.device_hit_tokens and s.blocks_stored
        outputs[mode] = {r.request_id: r.output for r in result.report.finished}
    assert outputs[Mode.FASTSWITCH] == outputs[Mode.BASELINE] == outputs[Mode.VLLM_V1]
    assert len(outputs[Mode.BASELINE]) == len(turns)


def test_pressure_shows_the_two_modes_copy_granularity() -> None:
    turns = short_workload()
    base = simulate(A10_LLAMA, Mode.BASELINE, turns, options())
    fs = simulate(A10_LLAMA, Mode.FASTSWITCH, turns, options())
    blocks = base.stats.blocks_out + base.stats.blocks_in
    assert base.swaps.copies == blocks * LLAMA3_8B.num_layers * 2
    assert fs.swaps.copies == fs.stats.copies_out + fs.stats.copies_in
    assert base.report.stall_s > 0 and fs.report.stall_s == 0


def test_copies_cost_a_cpu_executors_step_only_where_they_run_beside_it() -> None:
    turns = short_workload()
    shared = options(host_costs=HostCosts(copy_cpu_share=1.0))
    fs_free = simulate(A10_LLAMA, Mode.FASTSWITCH, turns, options())
    fs_shared = simulate(A10_LLAMA, Mode.FASTSWITCH, turns, shared)
    assert fs_free.swaps.copies > 0
    assert fs_shared.report.busy_s > fs_free.report.busy_s  # its copies overlap the steps
    # The baseline's barrier runs no step beside a copy: nothing changes.
    base_free = simulate(A10_LLAMA, Mode.BASELINE, turns, options())
    base_shared = simulate(A10_LLAMA, Mode.BASELINE, turns, shared)
    assert base_free.swaps.copies > 0
    assert base_shared.report.busy_s == base_free.report.busy_s
    assert base_shared.report.ttfts == base_free.report.ttfts


def test_a_turn_that_does_not_say_its_history_asks_the_host_first_its_first_turn_too() -> None:
    # A Generate of token ids does not say which part of the prompt is history: with host
    # reuse the scheduler asks the host about every turn's prefix before admitting it.
    turns = [TurnSpec(0, 0, 0.0, prompt_tokens=40, output_tokens=4, client_id=0,
                      history_tokens=0)]
    [(_, request)] = Replay(turns, seed=0, history_known=False).first_turns()
    assert request.history_tokens is None
    slow_store = options(host_costs=HostCosts(round_trip_s=0.05))
    for mode, asks in ((Mode.FASTSWITCH, True), (Mode.BASELINE, False)):
        told = simulate(A10_LLAMA, mode, turns, slow_store).report.ttfts
        untold = simulate(A10_LLAMA, mode, turns,
                          replace(slow_store, history_known=False)).report.ttfts
        if asks:  # one round trip more before its prefill
            assert untold[0] == pytest.approx(told[0] + 0.05)
        else:  # no host reuse: nothing to ask
            assert untold == told


def test_a_negative_host_cost_is_refused() -> None:
    with pytest.raises(ValueError, match="never negative"):
        HostCosts(copy_cpu_share=-0.1)


@pytest.mark.parametrize("seed", [1, 3, 4])
def test_a_barrier_never_runs_the_clock_back(seed: int) -> None:
    # vLLM v1 waits for a preempted request's stores; copies that ended during the step
    # before were once "waited for" by moving the clock back to their end.
    turns = short_workload(n=12, seed=seed)
    result = simulate(A10_LLAMA, Mode.VLLM_V1_OFFLOAD_ALL, turns, options(seed=seed))
    assert result.report.stall_s >= 0
    assert min(result.report.tbts) >= step_model().step_time_s([(0, 1)])


class LastComeFirstServed(FCFS):
    def rank(self, request: Request) -> tuple:
        return (-request.arrival,)


def test_the_simulator_runs_the_core_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(POLICIES, "lcfs", LastComeFirstServed)
    turns = short_workload(n=10, rate=200.0)
    schedules = {}
    for policy in ("fcfs", "lcfs"):
        result = simulate(A10_LLAMA, Mode.FASTSWITCH, turns, options(policy=policy))
        schedules[policy] = {rid: t.tokens[0] for rid, t in result.report.times.items()}
    assert schedules["fcfs"].keys() == schedules["lcfs"].keys()
    assert schedules["fcfs"] != schedules["lcfs"]


def test_without_memory_pressure_both_modes_have_identical_latencies() -> None:
    # One turn per conversation: no history to reuse, and the device holds everything.
    turns = short_workload(n=12, mean_turns=1.0)
    runs = {
        mode: simulate(A10_LLAMA, mode, turns, options(device_blocks=None, policy="fcfs"))
        for mode in Mode
    }
    fs, base = runs[Mode.FASTSWITCH].report, runs[Mode.BASELINE].report
    assert runs[Mode.BASELINE].stats.preempted_by_swap == 0
    assert fs.ttfts == base.ttfts and fs.tbts == base.tbts


def test_conservation_is_checked() -> None:
    result = simulate(A10_LLAMA, Mode.FASTSWITCH, short_workload(), options())
    check_conservation(result)
    result.stats.blocks_in += 10**6
    with pytest.raises(ConservationError, match="swapped in"):
        check_conservation(result)
    result.stats.blocks_in -= 10**6
    result.num_turns += 1
    with pytest.raises(ConservationError, match="turns finished"):
        check_conservation(result)


def test_trace_replay_matches_the_generated_workload(tmp_path: Path) -> None:
    turns = short_workload()
    write_trace(tmp_path / "t.jsonl", turns)
    from_trace = load_trace(tmp_path / "t.jsonl")
    a = simulate(A10_LLAMA, Mode.FASTSWITCH, turns, options())
    b = simulate(A10_LLAMA, Mode.FASTSWITCH, from_trace, options())
    assert a.report.ttfts == b.report.ttfts and a.report.tbts == b.report.tbts


def test_a_turn_too_long_for_the_device_is_rejected_up_front() -> None:
    turns = [TurnSpec(0, 0, 0.0, prompt_tokens=900, output_tokens=10, client_id=0,
                      history_tokens=0)]
    with pytest.raises(ValueError, match="needs 910 tokens"):
        simulate(A10_LLAMA, Mode.BASELINE, turns, options())


# ---- report --------------------------------------------------------------------------------


def test_ratios_are_fastswitch_over_baseline_and_claims_invert_speedups() -> None:
    turns = short_workload()
    results = {mode: simulate(A10_LLAMA, mode, turns, options()) for mode in Mode}
    doc = Point("x", 20.0, 5, results).to_json()
    fs, base = doc["modes"]["fastswitch"], doc["modes"]["baseline"]
    assert doc["ratios"]["p95_ttft_s"] == pytest.approx(fs["p95_ttft_s"] / base["p95_ttft_s"])
    assert doc["ratios"]["copies"] == pytest.approx(fs["copies"] / base["copies"])
    ttft = next(c for c in PAPER_CLAIMS if c.key == "p95_ttft_s")
    assert ttft.values([doc]) == [pytest.approx(base["p95_ttft_s"] / fs["p95_ttft_s"])]
    assert ratio(3.0, 0.0) is None and ratio(1.0, 4.0) == 0.25
    swap = next(c for c in PAPER_CLAIMS if c.key == "swap_out_bytes")
    assert swap.ours([{"ratios": {"swap_out_bytes": 0.47}}]) == "-53% .. -53%"


# ---- command line --------------------------------------------------------------------------

TINY_ARGS = [
    "--settings", "a10:llama-3-8b,a100:llama-3-8b",
    "--rates", "10,40",
    "--update-every", "5",
    "--num-conversations", "6",
    "--device-blocks", str(TINY_DEVICE),
    "--max-context", "512",
    "--think-time", "0.05",
]


def test_main_writes_json_for_every_setting_and_mode_deterministically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert paper_sim.main([*TINY_ARGS, "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr()
    assert "P95 TTFT speedup" in out.out and "4.3-5.8x" in out.out
    runs = 4 * 2 * len(Mode)  # 4 points, each mode at its cost and at zero switch cost
    assert f"[{runs:>3}/{runs}]" in out.err
    doc = json.loads((tmp_path / "a.json").read_text())
    seen = {(p["setting"], p["arrival_rate"]) for p in doc["points"]}
    assert seen == {(s, r) for s in ("a10/llama-3-8b", "a100/llama-3-8b") for r in (10.0, 40.0)}
    for point in doc["points"]:
        assert set(point["modes"]) == {m.value for m in Mode}
        for metrics in point["modes"].values():
            assert metrics.keys() >= REQUIRED_METRICS | FAIRNESS_METRICS
        assert point["ratios"].keys() >= REQUIRED_METRICS
        assert set(point["zero_switch_cost"]) == set(point["overhead_over_limit"]) == {
            m.value for m in Mode}
        for mode, metrics in point["zero_switch_cost"].items():
            # Free copies: a swap-in waits only for the step launched before it (its fence).
            paid = point["modes"][mode]["context_switch_s_p99"]
            assert metrics["context_switch_s_p99"] <= paid or paid == 0
        assert set(point["ratios_vs"]) == {m.value for m in Mode} - {"fastswitch"}
        goals = {(g["key"], g["against"]): g for g in point["goals"]}
        assert len(goals) == 7
        fs, v1 = point["modes"]["fastswitch"], point["modes"]["vllm-v1"]
        tbt = goals[("p999_tbt_s", "vllm-v1")]
        assert tbt["figure"] == pytest.approx(v1["p999_tbt_s"] / fs["p999_tbt_s"])
        assert tbt["met"] == (tbt["figure"] >= 1.5)
        tput = goals[("throughput_tok_s", "vllm-v1-offload-all")]
        assert tput["figure"] == pytest.approx(
            fs["throughput_tok_s"] / point["modes"]["vllm-v1-offload-all"]["throughput_tok_s"])
        limit = goals[("p999_tbt_s", "limit")]
        assert limit["figure"] == point["overhead_over_limit"]["fastswitch"]["p999_tbt_s"]
        assert limit["met"] == (limit["figure"] <= 0.10)
    assert {c["paper"] for c in doc["paper_comparison"].values()} >= {"4.3-5.8x", "3.11x"}

    assert paper_sim.main([*TINY_ARGS, "--json", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_main_replays_a_trace(tmp_path: Path) -> None:
    write_trace(tmp_path / "t.jsonl", short_workload(n=4))
    args = ["--settings", "a10:llama-3-8b", "--trace", str(tmp_path / "t.jsonl"), "--policy", "vtc",
            "--device-blocks", str(TINY_DEVICE), "--json", str(tmp_path / "t.json")]
    assert paper_sim.main(args) == 0
    [point] = json.loads((tmp_path / "t.json").read_text())["points"]
    assert (point["arrival_rate"], point["update_every"]) == (None, None)
    assert point["modes"]["baseline"]["turns_finished"] == len(load_trace(tmp_path / "t.jsonl"))


def test_the_host_link_is_the_gpus_unless_a_flag_overrides_it() -> None:
    defaults = paper_sim.parse_args([])
    assert paper_sim.host_link(GPUS["a100"], defaults) == LinkModel(5e-6, 25e9)
    assert paper_sim.host_link(GPUS["h200"], defaults) == LinkModel(4e-6, 50e9)
    narrow = paper_sim.parse_args(["--link-bandwidth-gbs", "12"])
    assert paper_sim.host_link(GPUS["h100"], narrow) == LinkModel(4e-6, 12e9)


def test_a_setting_may_override_its_own_device_blocks() -> None:
    a10, h100 = paper_sim.parse_settings("a10:llama-3-8b,h100:llama-3-8b:3000")
    assert (a10.name, a10.device_blocks) == ("a10/llama-3-8b", None)
    assert (h100.name, h100.device_blocks) == ("h100/llama-3-8b:3000", 3000)
    with pytest.raises(ValueError, match="GPU:MODEL"):
        paper_sim.parse_settings("h100:llama-3-8b:many")
    with pytest.raises(ValueError, match="BLOCKS > 0"):
        paper_sim.parse_settings("h100:llama-3-8b:0")


def test_preemption_is_one_policy_for_every_mode_or_one_per_mode_named() -> None:
    assert paper_sim.parse_preemption("") == {}
    assert paper_sim.parse_preemption("on-order-change") == dict.fromkeys(Mode, "on-order-change")
    assert paper_sim.parse_preemption("fastswitch=on-top-class-ttft, vllm-v1=on-order-change") == {
        Mode.FASTSWITCH: "on-top-class-ttft", Mode.VLLM_V1: "on-order-change"}
    assert paper_sim.parse_preemption(" fastswitch = on-top-class-ttft ") == {
        Mode.FASTSWITCH: "on-top-class-ttft"}
    for bad in ("no-such-policy", "fastswitch=no-such-policy", "no-such-mode=on-order-change"):
        with pytest.raises(ValueError, match="MODE=POLICY"):
            paper_sim.parse_preemption(bad)
    with pytest.raises(ValueError, match="fastswitch is given twice"):
        paper_sim.parse_preemption("fastswitch=on-order-change,fastswitch=on-top-class-ttft")


def test_main_rejects_a_model_that_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert paper_sim.main(["--settings", "a10:qwen-2.5-32b"]) == 2
    assert "does not fit" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_main_writes_plots(tmp_path: Path) -> None:
    args = [*TINY_ARGS, "--settings", "a10:llama-3-8b", "--rates", "10", "--plots",
            str(tmp_path / "p")]
    assert paper_sim.main(args) == 0
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["cdf_a10_llama-3-8b_rate_10_every_5.png", "ratios_a10_llama-3-8b.png"]
    assert all((tmp_path / "p" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
