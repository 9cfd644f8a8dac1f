"""The paper-scale benchmark: FastSwitch against the vLLM-style baseline on a virtual clock.

For each (GPU, model) setting, arrival rate and priority-update interval, the same seeded
multi-turn workload runs through the real scheduler core in both modes; the executor and the
copy engine are replaced by the roofline and link cost models (benchmarks/sim/COST_MODEL.md).
Prints the per-point ratios and a table beside the paper's headline numbers; optionally
writes JSON and PNG plots. Run from the repository root: `python -m benchmarks.paper_sim`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.sim.copy_engine import LinkModel
from benchmarks.sim.hardware import GPUS, MODELS, Deployment, DoesNotFit, GpuSpec
from benchmarks.sim.report import (
    Point,
    goals_table,
    modes_table,
    paper_table,
    point_label,
    points_table,
    write_json,
    write_plots,
)
from benchmarks.sim.simulate import (
    SWITCH_COSTS,
    ConservationError,
    ModeResult,
    SimOptions,
    simulate,
)
from benchmarks.sim.trace import load_trace
from benchmarks.sim.virtual_driver import HostCosts
from benchmarks.sim.workload import LogNormal, TurnSpec, WorkloadConfig, generate
from services.scheduler.core.config import Mode
from services.scheduler.core.policy import POLICIES
from services.scheduler.core.preemption import PREEMPTION_POLICIES

DEFAULT_SETTINGS = "a10:llama-3-8b,a100:qwen-2.5-32b,h100:llama-3-8b"
# Small enough for a few minutes on two cores; explicit flags still override it.
QUICK = {"settings": "a10:llama-3-8b", "rates": "0.5,2", "update_every": "25",
         "num_conversations": 60}
MODES = tuple(Mode)  # every mode, side by side
# Outputs as reasoning models produce them (`--workload long-decode`).
LONG_DECODE = {"min_output_tokens": 2048, "max_output_tokens": 8000,
               "response_tokens": LogNormal(mean=4000, sigma=0.5)}


@dataclass(frozen=True)
class Setting:
    name: str
    deployment: Deployment
    device_blocks: int | None = None
    """Overrides the deployment's device KV blocks for this setting alone."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help=f"comma list of GPU:MODEL[:BLOCKS]; GPU in {sorted(GPUS)}, "
                        f"MODEL in {sorted(MODELS)}; BLOCKS overrides that setting's device KV "
                        "blocks (as --device-blocks does for all)")
    parser.add_argument("--rates", default="0.5,1,2",
                        help="new conversations per second, comma list (ignored with --trace)")
    parser.add_argument("--update-every", default="25,50",
                        help="iterations between priority reshuffles, comma list (priority "
                        "policy; the paper's are 25 and 50)")
    parser.add_argument("--workload", choices=("sharegpt", "long-decode"), default="sharegpt",
                        help="long-decode: outputs of 2-8k tokens, as reasoning models write")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="priority")
    parser.add_argument("--priority-levels", type=int, default=4)
    parser.add_argument("--trace", type=Path, help="replay this JSONL trace instead (trace.py)")
    parser.add_argument("--num-conversations", type=int, default=100)
    parser.add_argument("--num-clients", type=int, default=8)
    parser.add_argument("--think-time", type=float, default=10.0,
                        help="mean seconds between a reply and the next user turn")
    parser.add_argument("--mean-turns", type=float, default=5.5)
    parser.add_argument("--max-context", type=int, default=8192,
                        help="a conversation ends before outgrowing this many tokens; the same "
                        "for every setting, so all replay the same conversations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-kv-multiple", type=float, default=4.0,
                        help="host KV blocks as a multiple of the device KV blocks")
    parser.add_argument("--device-blocks", type=int,
                        help="override every deployment's device KV blocks (forces pressure)")
    parser.add_argument("--link-overhead-us", type=float,
                        help="driver cost of one cudaMemcpyAsync (default: the GPU's, 4-5)")
    parser.add_argument("--link-bandwidth-gbs", type=float,
                        help="pinned one-way host link throughput, GB/s (default: the GPU's: "
                        "25 on PCIe 4.0, 50 on PCIe 5.0)")
    parser.add_argument("--compute-efficiency", type=float, default=0.6)
    parser.add_argument("--memory-efficiency", type=float, default=0.85)
    parser.add_argument("--step-overhead-ms", type=float, default=4.0)
    parser.add_argument("--switch-cost", choices=SWITCH_COSTS, default="real",
                        help="zero: free copies, store round trips and planning (the limit)")
    parser.add_argument("--no-limit", action="store_true",
                        help="skip each mode's run at zero switch cost (and its overheads)")
    parser.add_argument("--preemption", default="",
                        help="every mode's preemption policy, or MODE=POLICY pairs (comma "
                        f"list) for some modes; POLICY in {sorted(PREEMPTION_POLICIES)} "
                        "(default: each mode's own)")
    parser.add_argument("--switches", default="",
                        help="ablation: changes to fastswitch's switches, e.g. -turn_offload "
                             "or -host_reuse,-block_groups (see Switches.with_spec)")
    parser.add_argument("--host-rtt-us", type=float, default=250.0,
                        help="one batched KV store round trip per plan (local gRPC)")
    parser.add_argument("--plan-us", type=float, default=150.0,
                        help="the planner's own time per plan")
    parser.add_argument("--lookahead", type=int, choices=[0, 1], default=1,
                        help="1: each step is planned while the one before runs (the real "
                             "driver's default), so planning costs only what outlasts it")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    parser.add_argument("--quick", action="store_true", help=f"preset: {QUICK}")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def parse_settings(text: str) -> list[Setting]:
    settings = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        gpu, _, rest = item.partition(":")
        model, _, blocks = rest.partition(":")
        if gpu not in GPUS or model not in MODELS or not (
                not blocks or (blocks.isdigit() and int(blocks) > 0)):
            raise ValueError(f"unknown setting {item!r}: use GPU:MODEL[:BLOCKS] with GPU in "
                             f"{sorted(GPUS)}, MODEL in {sorted(MODELS)} and BLOCKS > 0")
        name = f"{gpu}/{model}" + (f":{blocks}" if blocks else "")
        settings.append(Setting(name, Deployment(GPUS[gpu], MODELS[model]),
                                int(blocks) if blocks else None))
    if not settings:
        raise ValueError("no settings given")
    return settings


def parse_preemption(text: str) -> dict[Mode, str]:
    """`--preemption`: a policy name for every mode, or MODE=POLICY pairs for some; each
    mode left out keeps its own."""
    text = text.strip()
    if "=" not in text:
        pairs = [(mode.value, text) for mode in MODES] if text else []
    else:
        pairs = [tuple(part.strip() for part in item.partition("=")[::2])
                 for item in text.split(",") if item.strip()]
    modes = {mode.value: mode for mode in MODES}
    chosen: dict[Mode, str] = {}
    for mode, policy in pairs:
        if mode in modes and modes[mode] in chosen:
            raise ValueError(f"bad --preemption {text!r}: {mode} is given twice")
        if mode not in modes or policy not in PREEMPTION_POLICIES:
            raise ValueError(f"bad --preemption {text!r}: use POLICY or MODE=POLICY pairs, "
                             f"MODE in {sorted(modes)}, POLICY in {sorted(PREEMPTION_POLICIES)}")
        chosen[modes[mode]] = policy
    return chosen


def host_link(gpu: GpuSpec, args: argparse.Namespace) -> LinkModel:
    """The GPU's host link, with any of its two numbers overridden by flags."""
    overhead_us, gbs = args.link_overhead_us, args.link_bandwidth_gbs
    return LinkModel(
        gpu.copy_overhead_s if overhead_us is None else overhead_us * 1e-6,
        gpu.host_link_bytes_per_s if gbs is None else gbs * 1e9,
    )


def workloads(args: argparse.Namespace) -> dict[float | None, list[TurnSpec]]:
    """One workload per arrival rate, shared by every setting and mode (None: the trace)."""
    if args.trace is not None:
        return {None: load_trace(args.trace)}
    return {
        rate: generate(WorkloadConfig(
            num_conversations=args.num_conversations,
            arrival_rate=rate,
            num_clients=args.num_clients,
            mean_turns=args.mean_turns,
            mean_think_time_s=args.think_time,
            max_context=args.max_context,
            seed=args.seed,
            **_shape(args),
        ))
        for rate in (float(r) for r in args.rates.split(","))
    }


def _shape(args: argparse.Namespace) -> dict[str, Any]:
    if args.workload == "long-decode":
        return LONG_DECODE
    return {"max_output_tokens": min(2048, args.max_context // 2)}


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that determine the results (not where they are written)."""
    skip = {"json", "plots", "quick"}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in skip}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = parse_settings(args.settings)
        preemption = parse_preemption(args.preemption)
    except (ValueError, DoesNotFit) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    everys: list[int | None] = (
        [int(e) for e in args.update_every.split(",")] if args.policy == "priority" else [None]
    )
    loads = workloads(args)
    runs = [(mode, args.switch_cost) for mode in MODES]
    runs += [] if args.no_limit or args.switch_cost == "zero" else [
        (mode, "zero") for mode in MODES]
    total = len(settings) * len(loads) * len(everys) * len(runs)
    started, done = time.perf_counter(), 0
    points: list[Point] = []
    for setting in settings:
        link = host_link(setting.deployment.gpu, args)
        for rate, turns in loads.items():
            for every in everys:
                options = SimOptions(
                    policy=args.policy,
                    update_every=every,
                    priority_levels=args.priority_levels,
                    host_kv_multiple=args.host_kv_multiple,
                    device_blocks=(setting.device_blocks if setting.device_blocks is not None
                                   else args.device_blocks),
                    link=link,
                    compute_efficiency=args.compute_efficiency,
                    memory_efficiency=args.memory_efficiency,
                    step_overhead_s=args.step_overhead_ms * 1e-3,
                    seed=args.seed,
                    host_costs=HostCosts(args.host_rtt_us * 1e-6, args.plan_us * 1e-6),
                    lookahead=bool(args.lookahead),
                )
                label = point_label(setting.name, rate, every)
                results: dict[str, dict[Mode, ModeResult]] = {"real": {}, "zero": {}}
                for mode, cost in runs:
                    run_start = time.perf_counter()
                    try:
                        switches = args.switches if mode is Mode.FASTSWITCH else ""
                        results[cost][mode] = simulate(
                            setting.deployment, mode, turns,
                            replace(options, switches=switches, switch_cost=cost,
                                    preemption=preemption.get(mode, "")))
                    except (ConservationError, ValueError) as error:
                        print(f"error: {label} {mode.value}: {error}", file=sys.stderr)
                        return 1
                    done += 1
                    now = time.perf_counter()
                    print(f"[{done:>3}/{total}] {label} {mode.value:<19} {cost:<4} "
                          f"{now - run_start:6.1f} s  (elapsed {now - started:6.1f} s)",
                          file=sys.stderr, flush=True)
                points.append(Point(setting.name, rate, every,
                                    results[args.switch_cost], results["zero"]
                                    if args.switch_cost == "real" else {}))

    point_docs = [p.to_json() for p in points]
    print("\nPer point (x = baseline / FastSwitch for latencies, FastSwitch / baseline for "
          "throughput):")
    print(points_table(point_docs))
    print("\nAgainst the paper (FastSwitch, arXiv 2411.18424):")
    print(paper_table(point_docs))
    print("\nPer mode: the top and bottom priority classes, fairness, and the overhead over "
          "zero switch cost (metric / limit - 1):")
    print(modes_table(point_docs))
    print("\nIssue 27's goals for fastswitch (factor: how much better; limit: overhead):")
    print(goals_table(point_docs))
    if args.json is not None:
        write_json(args.json, run_config(args), point_docs)
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plots is not None:
        written = write_plots(args.plots, points)
        print(f"wrote {len(written)} plots into {args.plots}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
