"""`make demo`: the real stack, once in fastswitch mode and once in baseline mode.

Each run starts the three services as local processes (by default the tiny checkpoint and
the CPU backend; `--backend cupy`, `--checkpoint DIR` and `--dtype` choose others; the
embedded index), drives them with the load generator (multi-turn conversations and random
priority updates, with device KV memory small enough to force preemption), and reads the
scheduler's counters. The table compares the modes side by side, and `--json FILE` records
both modes' metrics and the ratios. With greedy sampling both modes must return the same
tokens; the run fails if they do not. Timings are real but noisy on a shared 2-core
machine: read the ratios, not the digits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from common.client import FastSwitchClient
from common.latency import percentile
from common.loadgen import LoadReport, LoadSpec, run_load
from services.launch import LocalStack, StackConfig

# key: (label, scale for the table, True if higher is better)
METRICS = {
    "p50_ttft_s": ("P50 TTFT (ms)", 1e3, False),
    "p95_ttft_s": ("P95 TTFT (ms)", 1e3, False),
    "p99_ttft_s": ("P99 TTFT (ms)", 1e3, False),
    "p99_tbt_s": ("P99 TBT (ms)", 1e3, False),
    "p999_tbt_s": ("P99.9 TBT (ms)", 1e3, False),
    "throughput_tok_s": ("tokens/s", 1, True),
    "preemptions": ("preemptions", 1, False),
    "swap_out_bytes": ("swap-out MiB", 2**-20, False),
    "copies": ("copies issued", 1, False),
    "reuse_hit_tokens": ("reuse hit tokens", 1, True),
    "step_overhead_mean_s": ("gRPC overhead per step (ms)", 1e3, False),
    "wall_s": ("wall time (s)", 1, False),
}


def metrics(report: LoadReport, stats) -> dict[str, float]:
    ttfts = [t.ttft_s for t in report.turns]
    tbts = [g for t in report.turns for g in t.tbts]
    return {
        "p50_ttft_s": percentile(ttfts, 50),
        "p95_ttft_s": percentile(ttfts, 95),
        "p99_ttft_s": percentile(ttfts, 99),
        "p99_tbt_s": percentile(tbts, 99),
        "p999_tbt_s": percentile(tbts, 99.9),
        "throughput_tok_s": report.output_tokens / report.wall_s,
        "preemptions": stats.preemptions,
        "swap_out_bytes": stats.swap_out_bytes,
        "copies": stats.copies,
        "reuse_hit_tokens": stats.reuse_hit_tokens,
        "step_overhead_mean_s": stats.step_overhead_mean_s,
        "step_overhead_p99_s": stats.step_overhead_p99_s,
        "steps": stats.steps,
        "wall_s": report.wall_s,
    }


async def one_mode(mode: str, args: argparse.Namespace, log_dir: str):
    config = StackConfig(mode=mode, batch_invariant=True, num_gpu_blocks=args.gpu_blocks,
                         num_host_blocks=args.host_blocks, log_dir=log_dir,
                         backend=args.backend, checkpoint=args.checkpoint, dtype=args.dtype)
    t0 = time.monotonic()
    print(f"[{mode}] starting executor, kvstore and scheduler (logs in {log_dir}) ...",
          file=sys.stderr, flush=True)
    with LocalStack(config) as stack:
        print(f"[{mode}] stack up in {time.monotonic() - t0:.1f}s; running load ...",
              file=sys.stderr, flush=True)
        spec = LoadSpec(clients=args.clients, turns=args.turns, seed=args.seed)
        report = await run_load(
            stack.scheduler_address, spec,
            progress=lambda line: print(f"[{mode}] {line}", file=sys.stderr, flush=True),
        )
        async with FastSwitchClient(stack.scheduler_address) as client:
            stats = await client.stats()
    return metrics(report, stats), [(t.conversation_id, t.turn, t.token_ids)
                                    for t in report.turns]


def print_table(rows: dict[str, dict[str, float]]) -> None:
    width = max(len(label) for label, _, _ in METRICS.values())
    print(f"\n{'':{width}}  {'fastswitch':>12}  {'baseline':>12}  {'gain':>7}")
    for key, (label, scale, higher) in METRICS.items():
        fs, base = rows["fastswitch"][key], rows["baseline"][key]
        gain = (fs / base if higher else base / fs) if fs and base else None
        gain_text = f"{gain:6.2f}x" if gain is not None else "      -"
        print(f"{label:{width}}  {fs * scale:>12.2f}  {base * scale:>12.2f}  {gain_text}")
    print("(gain: how many times better fastswitch is; above 1 favours fastswitch)")


async def main_async(args: argparse.Namespace) -> int:
    rows, outputs = {}, {}
    with tempfile.TemporaryDirectory(prefix="fastswitch-stack-") as log_dir:
        for mode in ("fastswitch", "baseline"):
            rows[mode], outputs[mode] = await one_mode(mode, args, f"{log_dir}/{mode}")
    print_table(rows)
    same = outputs["fastswitch"] == outputs["baseline"]
    if args.json:
        ratios = {
            key: (rows["baseline"][key] / rows["fastswitch"][key]
                  if rows["fastswitch"][key] else None)
            for key in rows["fastswitch"]
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"workload": vars(args), "modes": rows, "baseline_over_fastswitch": ratios,
             "identical_tokens": same}, indent=2))
        print(f"wrote {args.json}")
    if not same:
        print("ERROR: the two modes returned different tokens", file=sys.stderr)
        return 1
    n = len(outputs["fastswitch"])
    print(f"Both modes returned identical tokens for all {n} turns, preemptions included.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--gpu-blocks", type=int, default=96)
    parser.add_argument("--host-blocks", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["cpu", "cupy"], default="cpu")
    parser.add_argument("--checkpoint", default="",
                        help="HF folder; default: the tiny model")
    parser.add_argument("--dtype", default="",
                        choices=["", "auto", "float32", "float16", "bfloat16"],
                        help="the executor's model and KV dtype (default: the checkpoint's)")
    parser.add_argument("--json", default="", help="write both modes' metrics and ratios here")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
