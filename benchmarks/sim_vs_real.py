"""The simulator checked against the real CPU stack, on one workload, in every mode.

1. **Calibrate** a cost model of this machine's CPU executor (the tiny model, batch-invariant
   as the stack runs it, on the executor's thread count) from microbenchmarks of the
   executor engine in process:
   - step time, fitted by least squares of the relative error on the executor's mechanism
     (`step_features`): `base + per_tile * tiles of 32 rows + per_width_block * width +
     per_row_block * rows * width`, width being the widest sequence's blocks (the
     simulator steps at the same features refitted on the real run, part 2; this fit is
     kept as the check on that one's shape);
   - copy time against bytes and copies, fitted as `copies * per_copy + bytes / bandwidth`
     (the simulator's `LinkModel`);
   - what copies take from a step running beside them (`copy_cpu_share`: on a CPU executor
     a copy is a memcpy on the step's cores, and it holds the GIL between ranges).
2. **Run** each seed's multi-turn workload (`--seeds`, six by default) through a fresh real
   stack (`stack_trace.py`, all arrivals and think times real, lookahead on as the stack runs
   it), then through the simulator. From the same mode and seed's real run the simulator is
   given:
   - the step model's shape and speed: its coefficients refitted (the same features, the same
     fit) on the steps the run's executor timed, from its scheduler's step log. The machine's
     cores are shared, and their speed changes by the minute; a calibration made before the
     run cannot know it, and the microbenchmark grid does not weigh the batches as the run
     does. So the simulator prices steps as the run being checked ran them, and throughput,
     which they mostly decide, is matched in part by this fit rather than predicted (the
     JSON lists what was taken from the run under `taken_from_the_real_run`).
     `--step-shape calibration` keeps the microbenchmark shape and takes only the speed
     from the run: the load factor, the executor's timed seconds over the model's for the
     run's batches. Both fits' median step errors are reported either way;
   - the client's hop: its TTFT less the scheduler's own (`Finished.ttft_s`), mean over the
     run's turns, about 5 ms under load. The simulator's clock starts at the scheduler, so
     this is added to every simulated TTFT;
   - the scheduler's measured per-step overhead (Stats `step_overhead_mean_s`);
   - the store's round trip, timed against the run's store.
   The real executor's cache is block-major in every mode, so the simulator prices every
   mode's copies block-major. The real run's requests are Generate calls of token ids, which
   do not say how much of the prompt is history, so the simulator's do not either: with
   host reuse every turn asks the host first, the first turn too.
3. **Report** per mode the relative error (sim - real) / real of P50 and P95 TTFT, P99 TBT and
   throughput, under keys ending in `_error`, taken over every seed's turns (the runs pooled:
   one seed's 57 turns make its P95 TTFT their third largest, which a few turns that queue
   behind a prefill or not move by 25%; three seeds' 171 turns still left pooled P95 errors
   of +22 to +29% in a run whose seeds erred by 0 to 12%, and six seeds are the default).
   The goal is |error| <= 0.2 for each. Beside them,
   the TTFT deciles of both; how far the real P50 and P95 TTFT move when the pooled turns
   are drawn again (`real_measured.ttft_spread`, a bootstrap: an error within it is the
   real run's own noise); and under `runs` each seed's own comparison: what its real run
   measured (`real_measured`), the simulator's counts and both step fits (`sim`).

About 10 minutes on two shared cores. Writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from benchmarks.cli import parse_modes, parse_seeds
from benchmarks.sim.copy_engine import KvLayout, LinkModel
from benchmarks.sim.cost_model import SequenceWork, StepCostModel
from benchmarks.sim.costs import SimCost
from benchmarks.sim.hardware import GIB, Deployment, GpuSpec, ModelSpec
from benchmarks.sim.simulate import SimOptions, simulate
from benchmarks.sim.virtual_driver import HostCosts
from benchmarks.sim.workload import TurnSpec, WorkloadConfig, generate
from benchmarks.stack_trace import replay_trace
from common.client import FastSwitchClient
from common.kv.block_hash import block_hashes
from common.kv.extent import Extent
from common.kv.host_ops import Pin
from common.kv.swap_plan import Copy, Direction, SwapOrder
from common.latency import percentile
from common.shm.arena import HostArena
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.executor.__main__ import cpu_threads, tiny_checkpoint
from services.executor.engine import ExecutorEngine, StepSequence
from services.executor.model.decoder import ROWS_PER_TILE
from services.executor.service import compute_on
from services.launch import LocalStack, StackConfig
from services.scheduler.core.config import Mode
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity
from services.scheduler.step_log import LoggedStep, read_step_log

BLOCK_SIZE = 16
GOAL = 0.2
# What the simulator is given from each mode's real run rather than predicting it (part 2).
TAKEN_FROM_THE_REAL_RUN = {
    "step_model": "the step model's coefficients, fitted on the steps the run's executor timed "
                  "(its step log): the shape and speed of a step are the run's own; with "
                  "--step-shape calibration only the speed (the load factor: total executor "
                  "time matches by construction)",
    "client_hop_s": "the client's share of its TTFT: the request's way to the scheduler and "
                    "the first token's way back (the client's TTFT less the scheduler's, mean "
                    "over the run's turns), added to every simulated TTFT",
    "step_overhead_mean_s": "the scheduler's measured per-step overhead",
    "store_round_trip_s": "a host operation's round trip, timed against the run's store",
}
STEP_SHAPES = ("log", "calibration")
FIT_ITERATIONS = 50  # reweighted fits at most (`_fit`); they settle in about ten
RESAMPLES = 1000  # bootstrap draws of the turns (`Latencies.ttft_spread`)
# Batches of (context before the step, new tokens): single prefill chunks up to the stack's
# 256-token budget, at no context and behind one; decode batches up to 32 rows and 32 blocks
# wide; and mixes, where a long sequence widens every row's attention.
STEP_GRID: list[list[tuple[int, int]]] = [
    [(0, 16)], [(0, 33)], [(0, 128)], [(0, 256)], [(128, 64)], [(256, 256)],
    [(64, 1)], [(496, 1)], [(64, 1)] * 8, [(256, 1)] * 8, [(128, 1)] * 32, [(400, 1)] * 16,
    [(400, 1)] + [(16, 1)] * 15, [(128, 1)] * 8 + [(0, 128)], [(64, 1)] * 4 + [(256, 64)],
]
# (copies, blocks per copy)
COPY_GRID = [(1, 1), (1, 8), (1, 32), (8, 1), (32, 1), (4, 8)]
# The step run against a stream of copies to measure what they take from it (a mixed one).
CONTENDED_STEP = [(128, 1)] * 8 + [(0, 64)]


def tiny_model_spec(config: dict[str, Any], max_model_len: int) -> ModelSpec:
    """The tiny checkpoint as a `ModelSpec`, in float32 (the stack's default for it)."""
    return ModelSpec(
        "tiny-llama", num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"], intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], max_context=max_model_len, qkv_bias=False,
        dtype_bytes=4,
    )


def step_features(batch: Sequence[SequenceWork], block_size: int = BLOCK_SIZE) -> list[float]:
    """What the batch-invariant CPU executor's step time follows (decoder.py, attention.py):
    a fixed part; the row-wise ops, run once per `ROWS_PER_TILE`-row tile; and the tiled
    attention, which loops over the widest sequence's blocks (`width`) with every row of the
    step in each iteration, so its Python cost is per block of width and its arithmetic per
    row and block. A short decode beside a long one pays the long one's width."""
    rows = sum(new for _, new in batch)
    width = max(-(-(start + new) // block_size) for start, new in batch)
    return [1.0, float(-(-rows // ROWS_PER_TILE)), float(width), float(rows * width)]


@dataclass(frozen=True, slots=True)
class FittedStepModel(StepCostModel):
    """Step time as fitted on this machine (`step_features`), not as a roofline; plus the
    real stack's measured per-step overhead (gRPC, the scheduler's turn), which the
    executor's own timing leaves out."""

    base_s: float = 0.0
    per_tile_s: float = 0.0
    per_width_block_s: float = 0.0
    per_row_block_s: float = 0.0
    overhead_s: float = 0.0

    def executor_s(self, batch: Sequence[SequenceWork]) -> float:
        """The executor's own time for the step, as it times it (`StepResponse.duration_s`)."""
        _, tiles, width, row_blocks = step_features(batch, self.deployment.block_size)
        return (self.base_s + self.per_tile_s * tiles + self.per_width_block_s * width
                + self.per_row_block_s * row_blocks)

    def step_time_s(self, batch: Sequence[SequenceWork]) -> float:
        return self.executor_s(batch) + self.overhead_s

    def slowed(self, factor: float) -> FittedStepModel:
        """The executor `factor` times slower (the machine's load)."""
        return replace(self, base_s=self.base_s * factor, per_tile_s=self.per_tile_s * factor,
                       per_width_block_s=self.per_width_block_s * factor,
                       per_row_block_s=self.per_row_block_s * factor)


def step_errors(model: FittedStepModel, steps: Sequence[LoggedStep]) -> list[float]:
    """The relative error (priced - timed) / timed of `model` on each timed step."""
    return [(model.executor_s(s.batch) - s.duration_s) / s.duration_s
            for s in steps if s.duration_s > 0]


def step_fit_error(model: FittedStepModel, steps: Sequence[LoggedStep]) -> float:
    """The median relative error of `model`'s executor seconds against each timed step."""
    errors = [abs(e) for e in step_errors(model, steps)]
    return statistics.median(errors) if errors else 0.0


def multi_tile_error(model: FittedStepModel, steps: Sequence[LoggedStep]) -> float | None:
    """The median signed relative error on the steps of more than one tile of rows: those
    that carry a prefill chunk, and make the TBT tail (a shape that prices them too high
    against the rest over-predicts it); None where there are none."""
    errors = step_errors(model, [s for s in steps if step_features(s.batch)[1] > 1])
    return statistics.median(errors) if errors else None


def load_factor(model: FittedStepModel, steps: Sequence[LoggedStep]) -> float:
    """How much slower the executor ran the real run's steps than `model` prices them: their
    timed seconds over the model's for the same batches (the machine's load during the run;
    the calibration ran at another moment); 1.0 where nothing was timed."""
    timed = sum(s.duration_s for s in steps)
    priced = sum(model.executor_s(s.batch) for s in steps)
    return timed / priced if priced > 0 and timed > 0 else 1.0


def fit_step_log(deployment: Deployment, steps: Sequence[LoggedStep]) -> FittedStepModel | None:
    """The step model fitted on a real run's own timed steps (`step_features`, `_fit`), so
    its shape and speed are the run's; None where fewer steps were timed than the model has
    coefficients (nothing to fit)."""
    timed = [s for s in steps if s.duration_s > 0]
    if len(timed) < len(step_features([(0, 1)])):
        return None
    base, per_tile, per_width, per_row_block = _fit(
        [step_features(s.batch, deployment.block_size) for s in timed],
        [s.duration_s for s in timed])
    return FittedStepModel(deployment, base_s=base, per_tile_s=per_tile,
                           per_width_block_s=per_width, per_row_block_s=per_row_block)


def step_coefficients(model: FittedStepModel) -> dict[str, float]:
    return {"base_s": model.base_s, "per_tile_s": model.per_tile_s,
            "per_width_block_s": model.per_width_block_s,
            "per_row_block_s": model.per_row_block_s}


def step_models(calibrated: FittedStepModel, steps: Sequence[LoggedStep], shape: str
                ) -> tuple[FittedStepModel, dict[str, Any]]:
    """The executor model the simulator runs on for a real run's `steps`: the fit on the
    steps themselves (`shape` "log", where there are enough), or the calibrated shape slowed
    by the run's load factor ("calibration"). Beside it, both fits compared on the steps:
    coefficients, median step error (and signed, on the steps of more than one tile), and
    priced over timed seconds in all."""
    if shape not in STEP_SHAPES:
        raise ValueError(f"step shape must be one of {STEP_SHAPES}, got {shape!r}")
    factor = load_factor(calibrated, steps)
    fits = {"calibration": calibrated.slowed(factor)}
    logged = fit_step_log(calibrated.deployment, steps)
    if logged is not None:
        fits["log"] = logged
    if shape not in fits:
        print(f"sim_vs_real: {len(steps)} logged steps are too few to fit the step shape on; "
              "the calibration's shape is used, at the run's load factor", file=sys.stderr)
    timed = sum(s.duration_s for s in steps)
    report: dict[str, Any] = {
        "load_factor": factor,
        "executor_step_mean_s": timed / len(steps) if steps else 0.0,
        "step_shape": shape if shape in fits else "calibration",
    }
    for name, model in fits.items():
        report[f"{name}_fit"] = {
            **step_coefficients(model), "median_abs_step_error": step_fit_error(model, steps),
            "multi_tile_median_error": multi_tile_error(model, steps),
            "priced_over_timed": 1 / load_factor(model, steps)}
    return fits[report["step_shape"]], report


def _fit(rows: list[list[float]], seconds: list[float]) -> list[float]:
    """Least squares of the error relative to the fit's own price, with no negative
    coefficient. Iterated: the first fit weighs every point alike, each next one weighs a
    point by 1 / its price under the last (a gamma regression's weights). So small decode
    steps are fitted as well as long prefills; where a time's noise is proportional to it
    the fit is unbiased in the mean (weighing by 1 / the timed seconds instead prices too
    low, 6-10% on the real runs' steps); and a step timed near zero (the executor counts
    its time in the step before when it collects that one late) cannot outweigh the rest,
    as it would at 1 / its seconds. A coefficient that comes out negative is dropped and
    the rest refitted (a cost is never negative)."""
    features, timed = np.array(rows, dtype=float), np.array(seconds, dtype=float)
    weights = np.full(len(timed), 1 / timed.mean())
    coefficients = np.zeros(features.shape[1])
    for _ in range(FIT_ITERATIONS):
        coefficients = _nonnegative_lstsq(features * weights[:, None], timed * weights)
        priced = features @ coefficients
        if not (priced > 0).all() or np.allclose(1 / priced, weights, rtol=1e-9):
            break
        weights = 1 / priced
    return [float(c) for c in coefficients]


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares of `a @ x = b` with no negative x: a column whose coefficient comes out
    negative is dropped (the most negative first) and the rest refitted."""
    keep = list(range(a.shape[1]))
    while True:
        solution, *_ = np.linalg.lstsq(a[:, keep], b, rcond=None)
        if (solution >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(solution)))
    x = np.zeros(a.shape[1])
    x[keep] = np.maximum(solution, 0.0)
    return x


async def _time_step(engine: ExecutorEngine, batch: Sequence[SequenceWork],
                     launch: ThreadPoolExecutor, first_block: int = 0) -> float:
    """One step of `batch` on blocks from `first_block` on, run on `launch`; the executor's
    time for it."""
    tables, next_block = [], first_block
    for start, new in batch:
        blocks = -(-(start + new) // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    claim = engine.begin_step([StepSequence(f"s{i}", table, start, [1] * new, sample=True)
                               for i, (table, (start, new)) in enumerate(zip(tables, batch,
                                                                             strict=True))])
    return (await asyncio.get_running_loop().run_in_executor(launch, engine.run_step, claim)
            ).duration_s


async def calibrate(checkpoint: Path, repeats: int) -> dict[str, Any]:
    """Microbenchmarks of the in-process engine, its steps run as the executor runs them: on
    one thread with the executor's own thread count, and every other thread on one
    (`compute_on`: two OpenMP teams on the same cores slow each other). The step and copy
    fits, their inputs, and what a stream of copies takes from a step."""
    threads = torch.get_num_threads()
    launch = ThreadPoolExecutor(1, thread_name_prefix="calibration-steps")
    compute_on(launch, cpu_threads())
    try:
        return await _calibrate(checkpoint, repeats, launch)
    finally:
        launch.shutdown()
        torch.set_num_threads(threads)


async def _calibrate(checkpoint: Path, repeats: int, launch: ThreadPoolExecutor
                     ) -> dict[str, Any]:
    engine = ExecutorEngine.load(checkpoint, num_gpu_blocks=1024, block_size=BLOCK_SIZE,
                                 batch_invariant=True)
    await _time_step(engine, [(0, 8)], launch)
    # Round robin, so that a burst of load elsewhere on the machine spreads over the points.
    samples: list[list[float]] = [[] for _ in STEP_GRID]
    for _ in range(repeats):
        for times, batch in zip(samples, STEP_GRID, strict=True):
            times.append(await _time_step(engine, batch, launch))
    step_s = [statistics.median(times) for times in samples]
    base, per_tile, per_width, per_row_block = _fit(
        [step_features(batch) for batch in STEP_GRID], step_s)

    block_bytes = engine.geometry.block_bytes
    copy_rows, copy_s = [], []
    with HostArena.local(256, block_bytes) as arena, engine.subscribe() as completions:
        engine.attach_host_arena(arena.name)
        swap_ids = itertools.count(1)

        async def swap(copies: int, blocks: int) -> float:
            """One swap-out of `copies` copies of `blocks` blocks each; its copy time."""
            plan = tuple(Copy(Extent(2 * i * blocks, blocks), Extent(2 * i * blocks, blocks))
                         for i in range(copies))
            engine.submit_swaps([SwapOrder(next(swap_ids), "calib", Direction.OUT, plan)])
            done = await anext(aiter(completions))
            if done.error is not None:  # type: ignore[attr-defined]
                raise RuntimeError(f"calibration swap failed: {done.error}")  # type: ignore[attr-defined]
            return done.duration_s  # type: ignore[attr-defined]

        for copies, blocks in COPY_GRID:
            copy_rows.append([copies, copies * blocks * block_bytes])
            copy_s.append(statistics.median([await swap(copies, blocks)
                                             for _ in range(repeats)]))
        contention = await _copy_contention(engine, swap, repeats, launch)
    engine.close()
    per_copy, per_byte = _fit(copy_rows, copy_s)
    return {
        "torch_threads": cpu_threads(),
        "step_base_s": base, "step_per_tile_s": per_tile,
        "step_per_width_block_s": per_width, "step_per_row_block_s": per_row_block,
        "copy_overhead_s": per_copy,
        "copy_bandwidth_bytes_per_s": 1 / per_byte if per_byte else float("inf"),
        "block_bytes": block_bytes,
        **contention,
        "step_points": [[batch, t] for batch, t in zip(STEP_GRID, step_s, strict=True)],
        "copy_points": [[*point, t] for point, t in zip(COPY_GRID, copy_s, strict=True)],
    }


async def _copy_contention(engine: ExecutorEngine, swap: Callable[[int, int], Awaitable[float]],
                           repeats: int, launch: ThreadPoolExecutor) -> dict[str, float]:
    """What copying takes from a step on this machine's shared cores: one step timed alone
    and with swaps copying back to back beside it (round robin, medians); the step's extra
    seconds over the copy seconds that ran meanwhile."""
    async def copy_until(stop: asyncio.Event) -> float:
        busy = 0.0
        while not stop.is_set():
            busy += await swap(8, 8)
        return busy

    alone, together, copying = [], [], []
    for _ in range(repeats):
        alone.append(await _time_step(engine, CONTENDED_STEP, launch, first_block=512))
        stop = asyncio.Event()
        copier = asyncio.ensure_future(copy_until(stop))
        await asyncio.sleep(0)  # the first swap is submitted before the step starts
        # On blocks the swaps leave alone: they copy the cache's first 128.
        together.append(await _time_step(engine, CONTENDED_STEP, launch, first_block=512))
        stop.set()
        copying.append(await copier)
    extra = statistics.median(together) - statistics.median(alone)
    return {"contended_step_alone_s": statistics.median(alone),
            "contended_step_copying_s": statistics.median(together),
            "contended_copy_s": statistics.median(copying),
            "copy_cpu_share": max(0.0, extra) / statistics.median(copying)}


def workload(args: argparse.Namespace) -> list[TurnSpec]:
    return generate(WorkloadConfig(
        num_conversations=args.conversations, arrival_rate=args.rate, num_clients=4,
        mean_turns=args.mean_turns, mean_think_time_s=args.think_time, max_context=512,
        max_output_tokens=64, seed=args.seed,
    ))


@dataclass(frozen=True)
class Latencies:
    """One run's TTFTs and TBTs, its output tokens and its span: what the compared metrics
    are taken from, after pooling the runs of every seed (`pooled`)."""

    ttfts: list[float]
    tbts: list[float]
    output_tokens: int
    wall_s: float

    @staticmethod
    def pooled(runs: Sequence[Latencies]) -> Latencies:
        """The runs as one: every TTFT and TBT, the tokens over the spans added up."""
        return Latencies([t for r in runs for t in r.ttfts], [g for r in runs for g in r.tbts],
                         sum(r.output_tokens for r in runs), sum(r.wall_s for r in runs))

    def metrics(self) -> dict[str, float]:
        return {
            "p50_ttft_s": percentile(self.ttfts, 50), "p95_ttft_s": percentile(self.ttfts, 95),
            "p99_tbt_s": percentile(self.tbts, 99),
            "throughput_tok_s": self.output_tokens / self.wall_s if self.wall_s else 0,
        }

    def ttft_spread(self, samples: int = RESAMPLES, seed: int = 0) -> dict[str, float]:
        """How far the P50 and P95 TTFT move when the turns are drawn again: half the width
        of the middle 95% of `samples` resamples of the TTFTs (with replacement, the same
        count), over the estimate itself. A percentile of a few hundred turns rests on the
        few turns around it, and which step a turn lands in (behind a long prefill, or
        not) is a race in the real stack: an error of this size is the run's own noise."""
        ttfts = np.array(self.ttfts)
        if not len(ttfts):
            return {"p50_ttft_s": 0.0, "p95_ttft_s": 0.0}
        draws = np.random.default_rng(seed).integers(0, len(ttfts), (samples, len(ttfts)))
        spread = {}
        for q in (50, 95):
            estimate = percentile(self.ttfts, q)
            low, high = np.percentile([percentile(ttfts[d], q) for d in draws], [2.5, 97.5])
            spread[f"p{q}_ttft_s"] = float(high - low) / 2 / estimate if estimate else 0.0
        return spread


def deciles(values: Sequence[float]) -> list[float]:
    """The 10th, 20th, ... 90th nearest-rank percentiles of `values`."""
    return [percentile(values, q) for q in range(10, 100, 10)]


async def store_round_trip_s(address: str, repeats: int) -> float:
    """The median of `repeats` round trips of one host operation (a Pin of a block no one
    stored: it misses and changes nothing) to the store at `address`, from a scheduler's
    store client."""
    async with grpc.aio.insecure_channel(address) as channel:
        described = await kv_grpc.KVStoreStub(channel).Describe(kv.DescribeRequest())
        fingerprint = described.model_fingerprint
        client = RemoteHostKV(channel, StoreIdentity.of(described), fingerprint=fingerprint)
        chain = tuple(block_hashes([0] * BLOCK_SIZE, BLOCK_SIZE, fingerprint))
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            await client.execute([Pin(i, "sim-vs-real", chain, BLOCK_SIZE)])
            times.append(time.perf_counter() - start)
        if client.failing:
            raise RuntimeError("the KV store did not answer")
    return statistics.median(times)


@dataclass(frozen=True)
class RealRun:
    """One mode and seed on the real stack: its latencies, what its scheduler's Stats and the
    store measured, and every step it ran (batch and executor seconds)."""

    latencies: Latencies
    measured: dict[str, Any]
    steps: list[LoggedStep]
    max_model_len: int


async def run_real(mode: Mode, turns: list[TurnSpec], args: argparse.Namespace) -> RealRun:
    with tempfile.TemporaryDirectory(prefix="fastswitch-simvsreal-") as log_dir:
        step_log = Path(log_dir) / "steps.jsonl"
        config = StackConfig(mode=mode.value, num_gpu_blocks=args.gpu_blocks, log_dir=log_dir,
                             extra_env={"FASTSWITCH_STEP_LOG": str(step_log)})
        with LocalStack(config) as stack:
            assert stack.describe is not None
            report = await replay_trace(stack.scheduler_address, turns, seed=args.seed,
                                        vocab=stack.describe.vocab_size)
            async with FastSwitchClient(stack.scheduler_address) as client:
                stats = await client.stats()
            round_trip = await store_round_trip_s(stack.kvstore_address, 4 * args.repeats)
            max_len = stack.describe.max_model_len
        steps = read_step_log(step_log)
    found = Latencies([t.ttft_s for t in report.turns], [g for t in report.turns for g in t.tbts],
                      report.output_tokens, report.wall_s)
    measured = {
        "turns": len(report.turns), "ttft_deciles_s": deciles([t.ttft_s for t in report.turns]),
        "client_hop_s": statistics.fmean(t.ttft_s - t.scheduler_ttft_s for t in report.turns)
        if report.turns else 0.0,
        "step_overhead_mean_s": stats.step_overhead_mean_s,
        "step_overhead_p99_s": stats.step_overhead_p99_s,
        "store_round_trip_s": round_trip,
        "steps": stats.steps, "copies": stats.copies, "preemptions": stats.preemptions,
        "executor_idle_fraction": stats.executor_idle_fraction,
    }
    return RealRun(found, measured, steps, max_len)


def cpu_deployment(max_model_len: int) -> Deployment:
    """The tiny model on this machine, with the stack's step limits."""
    config = json.loads((tiny_checkpoint() / "config.json").read_text())
    cpu = GpuSpec("this machine's CPU", memory_bytes=64 * GIB, hbm_bytes_per_s=1e10,
                  fp16_tensor_flops=1e11)
    stack = StackConfig()
    return Deployment(cpu, tiny_model_spec(config, max_model_len),
                      max_batched_tokens=stack.max_batched_tokens, max_num_seqs=stack.max_num_seqs)


def fitted_model(calibration: dict[str, Any], deployment: Deployment) -> FittedStepModel:
    return FittedStepModel(
        deployment, base_s=calibration["step_base_s"], per_tile_s=calibration["step_per_tile_s"],
        per_width_block_s=calibration["step_per_width_block_s"],
        per_row_block_s=calibration["step_per_row_block_s"])


def run_sim(mode: Mode, turns: list[TurnSpec], calibration: dict[str, Any], real: RealRun,
            args: argparse.Namespace) -> tuple[Latencies, dict[str, Any]]:
    """The simulator on the step model of the same mode's real run (`step_models`), with the
    per-step overhead and the store round trip measured there, the copies and their CPU share
    as the calibration measured them, and the real stack's lookahead. Its requests, as the
    real run's Generate calls of token ids, do not say how much of the prompt is history:
    with host reuse every turn asks the host first, the first turn too. Its TTFTs are the
    client's: the run's client hop is added to each (the simulator leaves out the client's
    way to the scheduler and back; where the request reaches the scheduler, and when the
    next turn's think time starts, are off by the same few milliseconds). Returns its
    latencies, and its counts and step fits."""
    deployment = cpu_deployment(real.max_model_len)
    executor, fits = step_models(fitted_model(calibration, deployment), real.steps,
                                 args.step_shape)
    step = replace(executor, overhead_s=real.measured["step_overhead_mean_s"])
    link = LinkModel(calibration["copy_overhead_s"], calibration["copy_bandwidth_bytes_per_s"])
    host_costs = HostCosts(round_trip_s=real.measured["store_round_trip_s"],
                           copy_cpu_share=calibration["copy_cpu_share"])
    options = SimOptions(policy="priority", update_every=None, device_blocks=args.gpu_blocks,
                         host_kv_multiple=StackConfig().num_host_blocks / args.gpu_blocks,
                         seed=args.seed, vocab=deployment.model.vocab_size, link=link,
                         host_costs=host_costs, lookahead=StackConfig().lookahead,
                         history_known=False)
    result = simulate(deployment, mode, turns, options,
                      cost=SimCost(step, link, KvLayout.BLOCK_MAJOR))
    r, st = result.report, result.stats
    # As the client sees them: the simulator's clock starts at the scheduler.
    latencies = Latencies([t + real.measured["client_hop_s"] for t in r.ttfts], r.tbts,
                          r.output_tokens, r.makespan_s)
    # The planner's own counts: each mode's run is its own, even where the latencies tie
    # (no preemption, and copies that overlap the steps entirely).
    return latencies, {
        "iterations": st.iterations, "copies": result.swaps.copies,
        "preemptions": st.preempted_by_swap + st.preempted_by_recompute,
        "step_mean_s": r.busy_s / st.iterations if st.iterations else 0.0, **fits}


def compare(real: dict[str, float], sim: dict[str, Any],
            measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per metric of `real`, (sim - real) / real under its name ending `_error`."""
    errors = {f"{key.removesuffix('_s')}_error": (sim[key] - real[key]) / real[key]
              if real[key] else None for key in real}
    within = all(e is not None and abs(e) <= GOAL for e in errors.values())
    return {"real": real, "sim": sim, "real_measured": measured or {}, **errors,
            "all_errors_within_goal": within}


async def compare_mode(mode: Mode, calibration: dict[str, Any], args: argparse.Namespace
                       ) -> dict[str, Any]:
    """`mode` on each seed's workload, on a fresh stack and then in the simulator; compared
    on the runs pooled (`Latencies.pooled`), with each seed's own comparison under `runs`."""
    reals, sims, runs = [], [], []
    for seed in args.seeds:
        seeded = argparse.Namespace(**{**vars(args), "seed": seed})
        turns = workload(seeded)
        real = await run_real(mode, turns, seeded)
        sim, counts = run_sim(mode, turns, calibration, real, seeded)
        reals.append(real.latencies)
        sims.append(sim)
        runs.append({"seed": seed, **compare(
            real.latencies.metrics(), {**sim.metrics(), **counts,
                                       "ttft_deciles_s": deciles(sim.ttfts)}, real.measured)})
        print(f"[{mode.value} seed {seed}] {json.dumps(runs[-1])}", file=sys.stderr)
    real_all, sim_all = Latencies.pooled(reals), Latencies.pooled(sims)
    return {**compare(real_all.metrics(), {**sim_all.metrics(),
                                           "ttft_deciles_s": deciles(sim_all.ttfts)},
                      {"ttft_deciles_s": deciles(real_all.ttfts), "turns": len(real_all.ttfts),
                       "ttft_spread": real_all.ttft_spread()}),
            "runs": runs}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    calibration = await calibrate(tiny_checkpoint(), args.repeats)
    print(f"calibrated in {time.monotonic() - t0:.1f}s: {calibration}", file=sys.stderr)
    modes = {mode.value: await compare_mode(mode, calibration, args) for mode in args.modes}
    return {"config": {k: v if k != "modes" else [m.value for m in v]
                       for k, v in vars(args).items() if k != "json"},
            "calibration": calibration, "goal_abs_error_at_most": GOAL,
            "taken_from_the_real_run": TAKEN_FROM_THE_REAL_RUN, "modes": modes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", type=parse_modes, default=list(Mode))
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--rate", type=float, default=2.0, help="new conversations per second")
    parser.add_argument("--mean-turns", type=float, default=2.5)
    parser.add_argument("--think-time", type=float, default=0.5)
    parser.add_argument("--gpu-blocks", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5, help="samples per calibration point")
    parser.add_argument("--seeds", type=parse_seeds, default=list(range(6)),
                        help="comma list: each seed's workload runs on its own stack, and the "
                        "metrics are taken over all their turns")
    parser.add_argument("--step-shape", choices=STEP_SHAPES, default="log",
                        help="log: the step model fitted on each mode's real steps; "
                             "calibration: the microbenchmark fit, slowed by the run's load")
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
