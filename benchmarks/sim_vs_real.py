"""The simulator checked against the real CPU stack, on one workload, in every mode.

1. **Calibrate** a cost model of this machine's CPU executor (the tiny model, batch-invariant
   as the stack runs it) from microbenchmarks of the executor engine in process:
   - step time against batch tokens and context, fitted by least squares as
     `base + per_token * new tokens + per_attended * sum(new * (start + new))`;
   - copy time against bytes and copies, fitted as `copies * per_copy + bytes / bandwidth`
     (the simulator's `LinkModel`).
2. **Run** one seeded multi-turn workload through the real stack (`stack_trace.py`, all
   arrivals and think times real) and through the simulator with that model. The real
   executor's cache is block-major in every mode, so the simulator prices every mode's
   copies block-major; the scheduler's per-step gRPC cost is `--step-overhead-ms`.
3. **Report** per mode the relative error (sim - real) / real of P50 and P95 TTFT, P99 TBT and
   throughput, under keys ending in `_error`. The goal is |error| <= 0.2 for each.

Timings on a shared, loaded machine are noise: run the calibration and the comparison on a
quiet one. Writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cli import parse_modes
from benchmarks.sim.copy_engine import KvLayout, LinkModel
from benchmarks.sim.cost_model import SequenceWork, StepCostModel
from benchmarks.sim.costs import SimCost
from benchmarks.sim.hardware import GIB, Deployment, GpuSpec, ModelSpec
from benchmarks.sim.simulate import SimOptions, simulate
from benchmarks.sim.virtual_driver import HostCosts
from benchmarks.sim.workload import TurnSpec, WorkloadConfig, generate
from benchmarks.stack_trace import replay_trace
from common.kv.extent import Extent
from common.kv.swap_plan import Copy, Direction, SwapOrder
from common.latency import percentile
from common.shm.arena import HostArena
from services.executor.__main__ import tiny_checkpoint
from services.executor.engine import ExecutorEngine, StepSequence
from services.launch import LocalStack, StackConfig
from services.scheduler.core.config import Mode

BLOCK_SIZE = 16
GOAL = 0.2
# (sequences, context before the step, new tokens per sequence)
STEP_GRID = [(1, 0, 16), (1, 0, 64), (1, 0, 128), (1, 64, 1), (4, 64, 1), (8, 64, 1),
             (8, 256, 1), (16, 128, 1), (4, 0, 32)]
# (copies, blocks per copy)
COPY_GRID = [(1, 1), (1, 8), (1, 32), (8, 1), (32, 1), (4, 8)]


def tiny_model_spec(config: dict[str, Any], max_model_len: int) -> ModelSpec:
    """The tiny checkpoint as a `ModelSpec`, in float32 (the stack's default for it)."""
    return ModelSpec(
        "tiny-llama", num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"], intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], max_context=max_model_len, qkv_bias=False,
        dtype_bytes=4,
    )


@dataclass(frozen=True, slots=True)
class FittedStepModel(StepCostModel):
    """Step time as fitted on this machine, not as a roofline."""

    base_s: float = 0.0
    per_token_s: float = 0.0
    per_attended_s: float = 0.0

    def step_time_s(self, batch: Sequence[SequenceWork]) -> float:
        tokens = sum(new for _, new in batch)
        attended = sum(new * (start + new) for start, new in batch)
        return self.base_s + self.per_token_s * tokens + self.per_attended_s * attended


def _fit(rows: list[list[float]], seconds: list[float]) -> list[float]:
    """Least squares, with coefficients clamped at zero (a cost is never negative)."""
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(seconds), rcond=None)
    return [max(0.0, float(c)) for c in solution]


async def calibrate(checkpoint: Path, repeats: int) -> dict[str, Any]:
    """Microbenchmarks of the in-process engine: step and copy fits, and their inputs."""
    engine = ExecutorEngine.load(checkpoint, num_gpu_blocks=512, block_size=BLOCK_SIZE,
                                 batch_invariant=True)
    warm = engine.begin_step([StepSequence("warm", [0], 0, [1] * 8, sample=True)])
    await asyncio.to_thread(engine.run_step, warm)
    step_rows, step_s = [], []
    for seqs, context, new in STEP_GRID:
        per_seq = -(-(context + new) // BLOCK_SIZE)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
        times = []
        for _ in range(repeats):
            claim = engine.begin_step([
                StepSequence(f"s{i}", table, context, [1] * new, sample=True)
                for i, table in enumerate(tables)
            ])
            times.append((await asyncio.to_thread(engine.run_step, claim)).duration_s)
        step_rows.append([1.0, seqs * new, seqs * new * (context + new)])
        step_s.append(statistics.median(times))
    base, per_token, per_attended = _fit(step_rows, step_s)

    block_bytes = engine.geometry.block_bytes
    copy_rows, copy_s = [], []
    with HostArena.local(256, block_bytes) as arena, engine.subscribe() as completions:
        engine.attach_host_arena(arena.name)
        swap_id = 0
        for copies, blocks in COPY_GRID:
            plan = tuple(Copy(Extent(2 * i * blocks, blocks), Extent(2 * i * blocks, blocks))
                         for i in range(copies))
            times = []
            for _ in range(repeats):
                swap_id += 1
                engine.submit_swaps([SwapOrder(swap_id, "calib", Direction.OUT, plan)])
                done = await anext(aiter(completions))
                if done.error is not None:  # type: ignore[attr-defined]
                    raise RuntimeError(f"calibration swap failed: {done.error}")  # type: ignore[attr-defined]
                times.append(done.duration_s)  # type: ignore[attr-defined]
            copy_rows.append([copies, copies * blocks * block_bytes])
            copy_s.append(statistics.median(times))
    engine.close()
    per_copy, per_byte = _fit(copy_rows, copy_s)
    return {
        "step_base_s": base, "step_per_token_s": per_token, "step_per_attended_s": per_attended,
        "copy_overhead_s": per_copy,
        "copy_bandwidth_bytes_per_s": 1 / per_byte if per_byte else float("inf"),
        "block_bytes": block_bytes,
        "step_points": [[*point, t] for point, t in zip(STEP_GRID, step_s, strict=True)],
        "copy_points": [[*point, t] for point, t in zip(COPY_GRID, copy_s, strict=True)],
    }


def workload(args: argparse.Namespace) -> list[TurnSpec]:
    return generate(WorkloadConfig(
        num_conversations=args.conversations, arrival_rate=args.rate, num_clients=4,
        mean_turns=args.mean_turns, mean_think_time_s=args.think_time, max_context=512,
        max_output_tokens=64, seed=args.seed,
    ))


def metrics(ttfts: Sequence[float], tbts: Sequence[float], tokens: int, wall_s: float
            ) -> dict[str, float]:
    return {
        "p50_ttft_s": percentile(ttfts, 50), "p95_ttft_s": percentile(ttfts, 95),
        "p99_tbt_s": percentile(tbts, 99), "throughput_tok_s": tokens / wall_s if wall_s else 0,
    }


async def run_real(mode: Mode, turns: list[TurnSpec], args: argparse.Namespace
                   ) -> tuple[dict[str, float], int]:
    with tempfile.TemporaryDirectory(prefix="fastswitch-simvsreal-") as log_dir:
        config = StackConfig(mode=mode.value, num_gpu_blocks=args.gpu_blocks, log_dir=log_dir)
        with LocalStack(config) as stack:
            assert stack.describe is not None
            report = await replay_trace(stack.scheduler_address, turns, seed=args.seed,
                                        vocab=stack.describe.vocab_size)
            max_len = stack.describe.max_model_len
    found = metrics([t.ttft_s for t in report.turns], [g for t in report.turns for g in t.tbts],
                    report.output_tokens, report.wall_s)
    return found, max_len


def run_sim(mode: Mode, turns: list[TurnSpec], calibration: dict[str, Any],
            args: argparse.Namespace, max_model_len: int) -> dict[str, float]:
    config = json.loads((tiny_checkpoint() / "config.json").read_text())
    cpu = GpuSpec("this machine's CPU", memory_bytes=64 * GIB, hbm_bytes_per_s=1e10,
                  fp16_tensor_flops=1e11)
    deployment = Deployment(cpu, tiny_model_spec(config, max_model_len),
                            max_batched_tokens=256, max_num_seqs=32)
    step = FittedStepModel(deployment, base_s=calibration["step_base_s"] + args.step_overhead_ms
                           * 1e-3, per_token_s=calibration["step_per_token_s"],
                           per_attended_s=calibration["step_per_attended_s"])
    link = LinkModel(calibration["copy_overhead_s"], calibration["copy_bandwidth_bytes_per_s"])
    options = SimOptions(policy="priority", update_every=None, device_blocks=args.gpu_blocks,
                         host_kv_multiple=4096 / args.gpu_blocks, seed=args.seed,
                         vocab=config["vocab_size"], link=link, host_costs=HostCosts())
    result = simulate(deployment, mode, turns, options,
                      cost=SimCost(step, link, KvLayout.BLOCK_MAJOR))
    r, st = result.report, result.stats
    # The planner's own counts: each mode's run is its own, even where the latencies tie
    # (no preemption, and copies that overlap the steps entirely).
    return {**metrics(r.ttfts, r.tbts, r.output_tokens, r.makespan_s),
            "iterations": st.iterations, "copies": result.swaps.copies,
            "preemptions": st.preempted_by_swap + st.preempted_by_recompute}


def compare(real: dict[str, float], sim: dict[str, float]) -> dict[str, Any]:
    errors = {f"{key.removesuffix('_s')}_error": (sim[key] - real[key]) / real[key]
              if real[key] else None for key in real}
    within = all(e is not None and abs(e) <= GOAL for e in errors.values())
    return {"real": real, "sim": sim, **errors, "all_errors_within_goal": within}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    calibration = await calibrate(tiny_checkpoint(), args.repeats)
    print(f"calibrated in {time.monotonic() - t0:.1f}s: {calibration}", file=sys.stderr)
    turns = workload(args)
    modes: dict[str, Any] = {}
    for mode in args.modes:
        real, max_len = await run_real(mode, turns, args)
        modes[mode.value] = compare(real, run_sim(mode, turns, calibration, args, max_len))
        print(f"[{mode.value}] {json.dumps(modes[mode.value])}", file=sys.stderr)
    return {"config": {k: v if k != "modes" else [m.value for m in v]
                       for k, v in vars(args).items() if k != "json"},
            "calibration": calibration, "goal_abs_error_at_most": GOAL, "modes": modes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", type=parse_modes, default=list(Mode))
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--rate", type=float, default=2.0, help="new conversations per second")
    parser.add_argument("--mean-turns", type=float, default=2.5)
    parser.add_argument("--think-time", type=float, default=0.5)
    parser.add_argument("--gpu-blocks", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5, help="samples per calibration point")
    parser.add_argument("--step-overhead-ms", type=float, default=2.0,
                        help="the scheduler's gRPC cost per step (benchmarks.stack reports it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    doc = asyncio.run(main_async(args))
    keys = [k for k in next(iter(doc["modes"].values())) if k.endswith("_error")]
    print(f"{'mode':<12}" + "".join(f"  {k:>22}" for k in keys))
    for mode, row in doc["modes"].items():
        print(f"{mode:<12}" + "".join(f"  {row[k]:>22.3f}" if row[k] is not None
                                      else f"  {'-':>22}" for k in keys))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
