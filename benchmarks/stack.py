"""`make demo`: the real stack, once per scheduler mode (`--modes`, default all of them).

Each run starts the three services as local processes (by default the tiny checkpoint and
the CPU backend; `--backend cupy`, `--checkpoint DIR` and `--dtype` choose others; the
embedded index), drives them with the load generator (multi-turn conversations and random
priority updates, with device KV memory small enough to force preemption), and reads the
scheduler's counters. It also reports what fairness buys, as the simulator defines it
(`stack_fairness`): the top and bottom priority classes' latencies, VTC's service gap and
Jain's index, and the scheduler's priority inversions. `--trace FILE` replays a simulator
trace instead (stack_trace.py), `--limit` conversations of it at `--time-scale` times its
pace. `--switches` ablates fastswitch's mechanisms; `--lookahead-ablation` also runs
fastswitch with the scheduler sending one step at a time, to measure what the lookahead
buys (the executor's idle fraction, tokens/s) and costs (tokens wasted at finishes);
`--steady-decode` makes the load one long decode per client with no think time and no
priority updates. The table
compares the modes side by side, and `--json FILE` records every mode's metrics and the
ratios to fastswitch. With greedy sampling all modes (and the ablation) must return the
same tokens; the run fails if they do not. Timings are real but noisy on a shared 2-core
machine: read the ratios, not the digits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.cli import parse_modes
from benchmarks.sim.trace import load_trace
from benchmarks.stack_fairness import stack_fairness
from benchmarks.stack_trace import check_fits, first_conversations, replay_trace
from common.client import FastSwitchClient
from common.latency import percentile
from common.loadgen import LoadReport, LoadSpec, run_load
from services.executor.options import AUTO_DTYPE, BACKENDS, DTYPE_NAMES
from services.launch import LocalStack, StackConfig
from services.scheduler.core.config import Mode
from services.scheduler.core.policy import POLICIES

FASTSWITCH = Mode.FASTSWITCH.value
NO_LOOKAHEAD = "fastswitch-lookahead-0"  # the ablation's row: one step at a time

# key: (label, scale for the table, True if higher is better; None: not a comparison)
METRICS = {
    "p50_ttft_s": ("P50 TTFT (ms)", 1e3, False),
    "p95_ttft_s": ("P95 TTFT (ms)", 1e3, False),
    "p99_ttft_s": ("P99 TTFT (ms)", 1e3, False),
    "p99_tbt_s": ("P99 TBT (ms)", 1e3, False),
    "p999_tbt_s": ("P99.9 TBT (ms)", 1e3, False),
    "throughput_tok_s": ("tokens/s", 1, True),
    "output_tokens": ("output tokens", 1, True),
    "preemptions": ("preemptions", 1, False),
    "swap_out_bytes": ("swap-out MiB", 2**-20, False),
    "copies": ("copies issued", 1, False),
    "reuse_hit_tokens": ("reuse hit tokens", 1, True),
    "step_overhead_mean_s": ("gRPC overhead per step (ms)", 1e3, False),
    "executor_idle_fraction": ("executor idle (%)", 1e2, False),
    "wasted_tokens": ("tokens wasted (lookahead)", 1, False),
    "wall_s": ("wall time (s)", 1, False),
    # What fairness buys (benchmarks/stack_fairness.py); classes are priorities
    "top_class": ("top class", 1, None),
    "top_p95_ttft_s": ("top class P95 TTFT (ms)", 1e3, False),
    "top_p99_tbt_s": ("top class P99 TBT (ms)", 1e3, False),
    "bottom_class": ("bottom class", 1, None),
    "bottom_p95_ttft_s": ("bottom class P95 TTFT (ms)", 1e3, False),
    "bottom_p99_tbt_s": ("bottom class P99 TBT (ms)", 1e3, False),
    "vtc_max_gap": ("VTC largest service gap", 1, False),
    "vtc_bound_2u": ("VTC 2U bound", 1, None),
    "jain_index": ("Jain's index of service", 1, True),
    "priority_inversions": ("priority inversions (steps)", 1, False),
    "priority_inversion_s": ("priority inversion time (s)", 1, False),
}


def metrics(report: LoadReport, stats, kv_tokens: int) -> dict[str, Any]:
    """`kv_tokens`: what the device's KV holds (VTC's bound)."""
    ttfts = [t.ttft_s for t in report.turns]
    tbts = [g for t in report.turns for g in t.tbts]
    return {
        "p50_ttft_s": percentile(ttfts, 50),
        "p95_ttft_s": percentile(ttfts, 95),
        "p99_ttft_s": percentile(ttfts, 99),
        "p99_tbt_s": percentile(tbts, 99),
        "p999_tbt_s": percentile(tbts, 99.9),
        "throughput_tok_s": report.output_tokens / report.wall_s,
        "output_tokens": report.output_tokens,
        "preemptions": stats.preemptions,
        "swap_out_bytes": stats.swap_out_bytes,
        "copies": stats.copies,
        "reuse_hit_tokens": stats.reuse_hit_tokens,
        "step_overhead_mean_s": stats.step_overhead_mean_s,
        "step_overhead_p99_s": stats.step_overhead_p99_s,
        "executor_idle_fraction": stats.executor_idle_fraction,
        "wasted_tokens": stats.wasted_tokens,
        "steps": stats.steps,
        "wall_s": report.wall_s,
        **stack_fairness(report, kv_tokens, stats.priority_inversions,
                         stats.priority_inversion_s),
    }


async def one_mode(mode: str, args: argparse.Namespace, log_dir: str, *,
                   lookahead: bool = True):
    switches = args.switches if mode == FASTSWITCH else ""
    config = StackConfig(mode=mode, batch_invariant=True, num_gpu_blocks=args.gpu_blocks,
                         num_host_blocks=args.host_blocks, log_dir=log_dir,
                         backend=args.backend, checkpoint=args.checkpoint, dtype=args.dtype,
                         policy=args.policy, lookahead=lookahead,
                         extra_env={"FASTSWITCH_SWITCHES": switches})
    t0 = time.monotonic()
    print(f"[{mode}] starting executor, kvstore and scheduler (logs in {log_dir}) ...",
          file=sys.stderr, flush=True)
    with LocalStack(config) as stack:
        print(f"[{mode}] stack up in {time.monotonic() - t0:.1f}s; running load ...",
              file=sys.stderr, flush=True)

        def progress(line: str) -> None:
            print(f"[{mode}] {line}", file=sys.stderr, flush=True)
        if args.trace_turns is None:
            spec = LoadSpec(clients=args.clients, turns=args.turns, seed=args.seed)
            if args.steady_decode:
                spec = replace(spec, turns=1, message_words=(4, 8), max_tokens=(192, 192),
                               think_s=(0.0, 0.0), priority_update_every_s=0.0)
            report = await run_load(stack.scheduler_address, spec, progress=progress)
        else:
            assert stack.describe is not None
            check_fits(args.trace_turns, stack.describe.max_model_len)
            report = await replay_trace(
                stack.scheduler_address, args.trace_turns, seed=args.seed,
                vocab=stack.describe.vocab_size, time_scale=args.time_scale, progress=progress,
            )
        async with FastSwitchClient(stack.scheduler_address) as client:
            stats = await client.stats()
    kv_tokens = config.num_gpu_blocks * config.block_size
    return metrics(report, stats, kv_tokens), [(t.conversation_id, t.turn, t.token_ids)
                                    for t in report.turns]


def lookahead_report(on: dict[str, float], off: dict[str, float]) -> dict[str, float | None]:
    """What the lookahead buys and costs, fastswitch with it against without, one run."""
    return {
        "executor_idle_fraction_on": on["executor_idle_fraction"],
        "executor_idle_fraction_off": off["executor_idle_fraction"],
        "tokens_per_s_on": on["throughput_tok_s"],
        "tokens_per_s_off": off["throughput_tok_s"],
        "tokens_per_s_on_over_off": gain(off["throughput_tok_s"], on["throughput_tok_s"], True),
        "wasted_tokens_on": on["wasted_tokens"],
        "wasted_share_on": on["wasted_tokens"] / on["output_tokens"]
        if on["output_tokens"] else None,
    }


def gain(mode_value: float, fastswitch_value: float, higher_is_better: bool) -> float | None:
    """How many times better fastswitch is than a mode (above 1 favours fastswitch)."""
    if not mode_value or not fastswitch_value:
        return None
    return fastswitch_value / mode_value if higher_is_better else mode_value / fastswitch_value


def over_fastswitch(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """`{mode}_over_fastswitch`: each other mode's metric over fastswitch's, for the metrics
    that compare (not the class labels); None where either is missing or fastswitch's is 0."""
    fs = rows.get(FASTSWITCH)
    if fs is None:
        return {}
    return {f"{mode}_over_fastswitch": {
        key: row[key] / fs[key] if fs[key] and row[key] is not None else None
        for key, (_, _, higher) in METRICS.items() if higher is not None
    } for mode, row in rows.items() if mode != FASTSWITCH}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The modes side by side, one metric a line, then each mode against fastswitch."""
    width = max(len(label) for label, _, _ in METRICS.values())
    others = [m for m in rows if m != FASTSWITCH and FASTSWITCH in rows]
    head = "".join(f"  {m:>12}" for m in rows) + "".join(f"  {'vs ' + m:>12}" for m in others)
    lines = [f"{'':{width}}{head}"]
    for key, (label, scale, higher) in METRICS.items():
        cells = "".join(f"  {'-':>12}" if row[key] is None else f"  {row[key] * scale:>12.2f}"
                        for row in rows.values())
        for m in others:
            g = None if higher is None else gain(rows[m][key], rows[FASTSWITCH][key], higher)
            cells += f"  {g:11.2f}x" if g is not None else f"  {'-':>12}"
        lines.append(f"{label:{width}}{cells}")
    if others:
        lines.append("(vs MODE: how many times better fastswitch is; above 1 favours fastswitch)")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    rows, outputs = {}, {}
    with tempfile.TemporaryDirectory(prefix="fastswitch-stack-") as log_dir:
        for mode in args.modes:
            rows[mode], outputs[mode] = await one_mode(mode, args, f"{log_dir}/{mode}")
        if args.lookahead_ablation:
            rows[NO_LOOKAHEAD], outputs[NO_LOOKAHEAD] = await one_mode(
                FASTSWITCH, args, f"{log_dir}/no-lookahead", lookahead=False)
    table = format_table(rows)
    print(f"\n{table}")
    first = outputs[args.modes[0]]
    same = all(out == first for out in outputs.values())
    if args.json:
        doc = {"workload": {k: v for k, v in vars(args).items() if k != "trace_turns"},
               "modes": rows, "identical_tokens": same, "table": table}
        doc |= over_fastswitch(rows)
        fs = rows.get(FASTSWITCH, {})
        if NO_LOOKAHEAD in rows and fs:
            doc["lookahead"] = lookahead_report(fs, rows[NO_LOOKAHEAD])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {args.json}")
    if not same:
        print("ERROR: the modes returned different tokens", file=sys.stderr)
        return 1
    print(f"All {len(rows)} modes returned identical tokens for all {len(first)} turns, "
          "preemptions included.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--gpu-blocks", type=int, default=96)
    parser.add_argument("--host-blocks", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=BACKENDS, default="cpu")
    parser.add_argument("--checkpoint", default="",
                        help="HF folder; default: the tiny model")
    parser.add_argument("--dtype", default="",
                        choices=["", AUTO_DTYPE, *DTYPE_NAMES],
                        help="the executor's model and KV dtype (default: the checkpoint's)")
    parser.add_argument("--modes", type=lambda text: [m.value for m in parse_modes(text)],
                        default=[m.value for m in Mode],
                        help="comma list of scheduler modes (default: all)")
    parser.add_argument("--switches", default="",
                        help="ablation: changes to fastswitch's switches, "
                        "e.g. --switches=-turn_offload")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="priority")
    parser.add_argument("--trace", type=Path, help="replay this JSONL trace (benchmarks/sim)")
    parser.add_argument("--limit", type=int, help="with --trace: its first N conversations")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="with --trace: multiplies arrival and think times (0: no waits)")
    parser.add_argument("--json", default="", help="write every mode's metrics and ratios here")
    parser.add_argument("--lookahead-ablation", action="store_true",
                        help="also run fastswitch with --lookahead 0 (JSON key: lookahead)")
    parser.add_argument("--steady-decode", action="store_true",
                        help="one long decode per client, no think time, no priority updates")
    args = parser.parse_args(argv)
    args.trace_turns = None
    if args.trace is not None:
        try:
            args.trace_turns = first_conversations(load_trace(args.trace), args.limit)
        except (OSError, ValueError) as error:
            parser.error(str(error))
    elif args.limit is not None:
        parser.error("--limit needs --trace")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
