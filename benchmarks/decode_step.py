"""Decode step time for one model on one device, at several batches and contexts, in one run.

A row is one (batch, context): `batch` sequences whose first `context` tokens are already in
the KV cache (zeros: only time matters) each decode one token per step, greedily, through
the executor engine (`begin_step` then `run_step`, as the service runs a step), for
`--steps` steps after `--warmup`. Side by side, each row reports:

  ms_per_step          wall time of a step, begin_step's validation included (its share is
                       begin_ms_per_step); on CUDA the timed region is synchronized
  ops_per_step         operator calls of one step (aten ops and the project's custom
                       kernels; `prim` metadata queries excepted), seen by a dispatch mode
  host_syncs_per_step  those that make the host wait for the device: `item` and kin,
                       `nonzero`, `equal`, `is_nonzero`, and copies from a device to the host
  roofline_fraction    (weight bytes + KV bytes read) / step time / device bandwidth, the
                       bandwidth measured in the same run by a device-to-device copy; null
                       on a CPU (a dry run computes it anyway, to run the code)
  hf_ms_per_step       with `--hf`: HF `generate` with a static cache at the same shapes, on
                       the model's own weight tensors: the time from its first new token to
                       its last over the `steps` forwards between, in one run; eager
                       (`disable_compile`), as the engine is
  over_hf              hf_ms_per_step / ms_per_step

Weight bytes are those a step reads: every parameter but the embedding table, of which a
step reads a row per sequence (unless it is the output head too). KV bytes read are
batch x context x layers x 2 x kv_heads x head_dim x itemsize.

Ops and syncs are counted in one more step. On CUDA it runs on the device. On a CPU, where no
copy crosses to a host, the same step (same config, dtype, mode, batch and context) is
launched on fake CUDA tensors (FakeTensorMode): what it would run on a GPU.

Models: `tiny` (the test checkpoint), `smollm2` (SmolLM2-135M-Instruct), `llama3-8b`
(LLaMA-3-8B's shape, `--layers` of its 32, random weights built in place on the device).
A row, or its HF peer, that would not fit the device's free memory is skipped, and the JSON
says why. A row that raises gets its `error` and the other rows still run; HF's failures go
to `hf_skipped`. Exits 1 when a row of the engine failed, else 0. `--dry-run`: toy sizes on
this CPU in seconds, every key written (LLaMA-3-8B becomes a 2-layer toy of its shape).

Run: .venv/bin/python -m benchmarks.decode_step [--model llama3-8b --device cuda
     --dtype bfloat16 --batch 1,8,32,128 --context 1024,4096 --hf] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.cli import parse_ints, write_json
from benchmarks.random_model import (
    CUDA,
    fake_cuda_decoder,
    llama3_8b_config,
    random_decoder,
    toy_config,
)
from services.executor.copy import CpuCopyEngine
from services.executor.engine import ExecutorEngine, StepSequence
from services.executor.model import DecoderModel, KVCacheGeometry, ModelConfig, load_checkpoint
from services.executor.model.smollm2 import smollm2_checkpoint
from services.executor.model.tiny_checkpoint import tiny_checkpoint
from services.executor.options import DTYPE_NAMES

MODELS = ("tiny", "smollm2", "llama3-8b")
BLOCK_SIZE = 16
GOAL_CONTEXT = 1024  # the goals' rows are at this context when it was run
SYNC_OPS = frozenset({"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"})
COPY_OPS = frozenset({"_to_copy", "copy_"})
BANDWIDTH_BYTES = {False: 2**30, True: 2**24}  # by dry run
BANDWIDTH_REPEATS = 5
MEMORY_MARGIN = 1.1  # needed bytes times this, plus MEMORY_SLACK, must be free
MEMORY_SLACK = 256 * 2**20
DRY_RUN: dict[str, Any] = {"device": "cpu", "dtype": "float32", "batch": [1, 4],
                           "context": [32], "steps": 2, "warmup": 1, "hf": True}


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class StepCounter(TorchDispatchMode):
    """Counts the operator calls made under it, and among them the host syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func.namespace != "prim":
            self.ops += 1
            if _syncs(func.overloadpacket.__name__, args, kwargs):
                self.host_syncs += 1
        return func(*args, **kwargs)


def _syncs(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether the op makes the host wait for a device: a scalar read, a data-dependent
    shape, or a copy from a device to the host."""
    if name in SYNC_OPS:
        return True
    if name not in COPY_OPS:
        return False
    if name == "copy_":  # copy_(destination, source)
        destination, source = args[0].device, args[1].device
    else:  # _to_copy(source, *, device=...)
        source = args[0].device
        destination = torch.device(kwargs.get("device") or source)
    return source.type != "cpu" and destination.type == "cpu"


@dataclass(frozen=True, slots=True)
class Shape:
    """One row's step batch: `batch` sequences with `context` tokens cached, each with blocks
    of its own for `positions` tokens."""

    batch: int
    context: int
    positions: int  # the context, and a token for every step the row runs

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.positions // BLOCK_SIZE)

    @property
    def num_blocks(self) -> int:
        return self.batch * self.blocks_per_seq

    def tables(self) -> list[list[int]]:
        per = self.blocks_per_seq
        return [list(range(i * per, (i + 1) * per)) for i in range(self.batch)]

    def step(self, tables: Sequence[Sequence[int]], index: int, tokens: Sequence[int]
             ) -> list[StepSequence]:
        """Step `index` (from 0): one greedy decode per sequence, at `context + index`."""
        return [StepSequence(f"seq-{i}", table, self.context + index, [token], sample=True)
                for i, (table, token) in enumerate(zip(tables, tokens, strict=True))]


@dataclass(slots=True)
class Row:
    batch: int
    context: int
    ms_per_step: float | None = None
    begin_ms_per_step: float | None = None
    ops_per_step: int | None = None
    host_syncs_per_step: int | None = None
    roofline_fraction: float | None = None
    hf_ms_per_step: float | None = None
    over_hf: float | None = None
    skipped: str | None = None  # why the engine's row did not run
    error: str | None = None  # what the engine raised; the other rows still run
    hf_skipped: str | None = None  # why HF's did not run, or what it raised


def build_model(name: str, *, layers: int | None, positions: int, dtype: torch.dtype,
                device: torch.device, invariant: bool, dry_run: bool
                ) -> tuple[ModelConfig, DecoderModel]:
    """The named model on `device`; LLaMA-3-8B's holds at least `positions` positions."""
    if name == "llama3-8b":
        config = (toy_config(num_layers=2) if dry_run else
                  llama3_8b_config(layers or 32, max(8192, positions)))
        return config, random_decoder(config, dtype=dtype, device=device,
                                      batch_invariant=invariant)
    folder = tiny_checkpoint() if name == "tiny" else smollm2_checkpoint()
    config, model = load_checkpoint(folder, dtype=dtype, batch_invariant=invariant)
    return config, model.to(device)


def make_engine(config: ModelConfig, model: DecoderModel, shape: Shape) -> ExecutorEngine:
    """An engine over a fresh cache on the model's device, with room for `shape`."""
    geometry = KVCacheGeometry.for_model(config, num_blocks=shape.num_blocks,
                                         block_size=BLOCK_SIZE, dtype=model.dtype)
    return ExecutorEngine(config, model, geometry.allocate(model.device), backend="cpu",
                          copy_engine=CpuCopyEngine, fingerprint="decode-step")


def count_step(engine: ExecutorEngine, batch: Sequence[StepSequence], *, collect: bool
               ) -> StepCounter:
    """The ops of one step: prepared and launched, and collected too when `collect` (never
    on fake tensors, whose tokens cannot be read)."""
    claim = engine.begin_step(batch)
    with StepCounter() as counter:
        launched = engine.launch_step(engine.prepare_step(claim))
        if collect:
            engine.collect_step(launched)
    return counter


class FakeCuda:
    """A weightless twin of a model on fake CUDA tensors (same config, dtype and mode), to
    count what a step would run on a GPU without one."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, invariant: bool) -> None:
        self.config = config
        self.mode, self.model = fake_cuda_decoder(config, dtype, batch_invariant=invariant)

    def count(self, shape: Shape, tokens: Sequence[int]) -> StepCounter:
        """Launches the first step of `shape` on a fresh engine."""
        with self.mode:
            engine = make_engine(self.config, self.model, shape)
            return count_step(engine, shape.step(shape.tables(), 0, tokens), collect=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(engine: ExecutorEngine, shape: Shape, tokens: list[int], *, steps: int,
               warmup: int) -> tuple[float, float, list[int]]:
    """Milliseconds per step and begin_step's share of them, over `steps` steps after
    `warmup`, each feeding back the tokens the last one sampled; and the last tokens."""
    device = engine.cache.device
    tables = shape.tables()
    total = begun = 0.0
    for index in range(warmup + steps):
        if index == warmup:
            synchronize(device)
        batch = shape.step(tables, index, tokens)
        started = time.perf_counter()
        claim = engine.begin_step(batch)
        claimed = time.perf_counter()
        result = engine.run_step(claim)
        synchronize(device)
        if index >= warmup:
            total += time.perf_counter() - started
            begun += claimed - started
        tokens = [token.token_id for token in result.tokens]
    return total / steps * 1e3, begun / steps * 1e3, tokens


def free_bytes(device: torch.device) -> int:
    """What the device can still allocate: CUDA's free memory, or the host's available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def too_big(needed: int, device: torch.device) -> str | None:
    """Why `needed` bytes would not fit on `device`, or None when they would."""
    free = free_bytes(device)
    if needed * MEMORY_MARGIN + MEMORY_SLACK <= free:
        return None
    return f"needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"


def kv_token_bytes(config: ModelConfig, itemsize: int) -> int:
    """KV bytes of one token, every layer, K and V."""
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * itemsize


def engine_bytes(config: ModelConfig, shape: Shape, itemsize: int) -> int:
    """The row's cache, one layer's gathered KV four times over (the CPU attention's
    working set), and the logits."""
    cache = shape.num_blocks * BLOCK_SIZE * kv_token_bytes(config, itemsize)
    return cache + 4 * cache // config.num_hidden_layers + shape.batch * config.vocab_size * 16


def hf_bytes(config: ModelConfig, shape: Shape, steps: int, itemsize: int) -> int:
    """HF's static cache, its prefill's activations, and one layer's attention scores."""
    length = shape.context + steps + 1
    tokens = shape.batch * shape.context
    cache = shape.batch * length * kv_token_bytes(config, itemsize)
    activations = tokens * (2 * config.intermediate_size + 4 * config.hidden_size) * itemsize
    scores = tokens * config.num_attention_heads * length * itemsize
    return cache + activations + scores


def weight_bytes(model: DecoderModel) -> int:
    """Parameter bytes a decode step reads (see the module's docstring)."""
    table = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if p is not table or model.config.tie_word_embeddings)


def device_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves, read and write counted."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(BANDWIDTH_REPEATS):
        target.copy_(source)
    synchronize(device)
    return 2 * nbytes * BANDWIDTH_REPEATS / (time.perf_counter() - started)


def hf_peer(config: ModelConfig, model: DecoderModel) -> nn.Module:
    """HF's model class for `config`, built on the meta device and handed `model`'s weight
    tensors (shared, not copied), in eval mode; raises ImportError without transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config.to_hf())
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    missing, _ = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    if missing:
        raise RuntimeError(f"HF's {type(hf).__name__} wants weights the model lacks: {missing}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    # The rotary buffers are not weights: computed anew, on the model's device.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config).to(model.device)
    return hf.eval()


class StepClock:
    """A logits processor that only notes when HF's generate calls it: once per new token,
    right after that token's forward (synchronized on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def hf_ms_per_step(hf: nn.Module, shape: Shape, steps: int, vocab: int,
                   device: torch.device) -> float:
    """HF's decode step at `shape`: generate `steps + 1` tokens and time the `steps` forwards
    between the first token's (which is the prefill's) and the last's. Timed within the one
    run: a difference of two runs would carry the noise of two prefills."""
    generator = torch.Generator().manual_seed(shape.batch * 100_003 + shape.context)
    ids = torch.randint(1, vocab, (shape.batch, shape.context), generator=generator)
    ids = ids.to(device)
    clock = StepClock(device)
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                    min_new_tokens=steps + 1, do_sample=False, cache_implementation="static",
                    disable_compile=True, pad_token_id=0, logits_processor=[clock])
    if len(clock.times) != steps + 1:
        raise RuntimeError(f"HF generate made {len(clock.times)} steps, not {steps + 1}")
    return (clock.times[-1] - clock.times[0]) / steps * 1e3


def goal_row(rows: Sequence[Row], batch: int, contexts: Sequence[int]) -> Row | None:
    """The row of `batch` at GOAL_CONTEXT when it was run, else at the first context."""
    context = GOAL_CONTEXT if GOAL_CONTEXT in contexts else contexts[0]
    return next((r for r in rows if (r.batch, r.context) == (batch, context)), None)


def summarize(rows: Sequence[Row], contexts: Sequence[int]) -> dict[str, Any]:
    """`ops_growth`, `max_host_syncs` and `goals` of the rows."""
    counted = [r for r in rows if r.context == contexts[0] and r.ops_per_step is not None]
    growth = None
    if counted:
        smallest = min(counted, key=lambda r: r.batch)
        largest = max(counted, key=lambda r: r.batch)
        growth = largest.ops_per_step / smallest.ops_per_step  # type: ignore[operator]
    syncs = [r.host_syncs_per_step for r in rows if r.host_syncs_per_step is not None]

    def goal(batch: int, key: str) -> float | None:
        row = goal_row(rows, batch, contexts)
        return None if row is None else getattr(row, key)

    return {
        "ops_growth": growth,
        "max_host_syncs": max(syncs, default=None),
        "goals": {
            "roofline_batch1": goal(1, "roofline_fraction"),
            "roofline_batch64": goal(64, "roofline_fraction"),
            "over_hf_batch32": goal(32, "over_hf"),
        },
    }


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def describe(row: Row) -> str:
    head = f"batch {row.batch:>4} context {row.context:>5}:"
    if row.skipped or row.error:
        return f"{head} {f'skipped ({row.skipped})' if row.skipped else f'FAILED: {row.error}'}"
    hf = f"HF skipped ({row.hf_skipped})" if row.hf_skipped else (
        f"HF {_fmt(row.hf_ms_per_step)} ms ({_fmt(row.over_hf)}x)")
    return (f"{head} {_fmt(row.ms_per_step)} ms/step (begin {_fmt(row.begin_ms_per_step)}), "
            f"{row.ops_per_step} ops, {row.host_syncs_per_step} syncs, roofline "
            f"{_fmt(row.roofline_fraction)}, {hf}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--layers", type=int, help="llama3-8b only: its first N layers (32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--batch", type=parse_ints, default=[1, 8])
    parser.add_argument("--context", type=parse_ints, default=[256])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--hf", action="store_true", help="HF generate at the same shapes")
    parser.add_argument("--invariant", action="store_true", help="the batch-invariant mode")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes on this CPU, in seconds: " + ", ".join(
                            f"{key} {value}" for key, value in DRY_RUN.items()))
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.layers is not None and args.model != "llama3-8b":
        parser.error("--layers applies to --model llama3-8b only")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.dry_run:
        vars(args).update(DRY_RUN)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    return args


def run_row(args: argparse.Namespace, config: ModelConfig, model: DecoderModel,
            fake: FakeCuda | None, shape: Shape) -> Row:
    """The engine's figures for one shape (`fake`: where ops are counted off the device)."""
    row = Row(shape.batch, shape.context)
    if shape.positions > config.max_position_embeddings:
        row.skipped = (f"context + steps need {shape.positions} positions, the model has "
                       f"{config.max_position_embeddings}")
        return row
    device = model.device
    row.skipped = too_big(engine_bytes(config, shape, model.dtype.itemsize), device)
    if row.skipped:
        return row
    tokens = [1 + i % (config.vocab_size - 1) for i in range(shape.batch)]
    try:
        engine = make_engine(config, model, shape)
        row.ms_per_step, row.begin_ms_per_step, tokens = time_steps(
            engine, shape, tokens, steps=args.steps, warmup=args.warmup)
        if fake is None:
            index = args.warmup + args.steps  # the step after the timed ones
            counter = count_step(engine, shape.step(shape.tables(), index, tokens),
                                 collect=True)
        else:
            counter = fake.count(shape, tokens)
    except torch.OutOfMemoryError as exc:
        row.skipped = f"out of memory: {_first_line(exc)}"
        return row
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {_first_line(exc)}"
        return row
    finally:
        engine = None  # frees the cache before the next row or HF's turn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.ops_per_step, row.host_syncs_per_step = counter.ops, counter.host_syncs
    return row


def run_hf(args: argparse.Namespace, config: ModelConfig, hf: nn.Module, device: torch.device,
           row: Row, shape: Shape) -> None:
    """HF's figures for the row's shape, into `row`."""
    length = shape.context + args.steps + 1
    if length > config.max_position_embeddings:
        row.hf_skipped = (f"context + steps need {length} positions, the model has "
                          f"{config.max_position_embeddings}")
        return
    itemsize = next(hf.parameters()).element_size()
    row.hf_skipped = too_big(hf_bytes(config, shape, args.steps, itemsize), device)
    if row.hf_skipped:
        return
    try:
        row.hf_ms_per_step = hf_ms_per_step(hf, shape, args.steps, config.vocab_size, device)
    except torch.OutOfMemoryError as exc:
        row.hf_skipped = f"out of memory: {_first_line(exc)}"
    except Exception as exc:  # the peer's failure is no verdict on the engine
        row.hf_skipped = f"failed: {type(exc).__name__}: {_first_line(exc)}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if row.hf_ms_per_step is not None and row.ms_per_step is not None:
        row.over_hf = row.hf_ms_per_step / row.ms_per_step


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = CUDA if args.device == "cuda" else torch.device("cpu")
    dtype: torch.dtype = getattr(torch, args.dtype)
    positions = max(args.context) + args.warmup + args.steps + 1
    log(f"decode_step: building {args.model} ({args.dtype}) on {device} ...")
    config, model = build_model(args.model, layers=args.layers, positions=positions, dtype=dtype,
                                device=device, invariant=args.invariant, dry_run=args.dry_run)
    weights = weight_bytes(model)
    fake = None if device.type == "cuda" else FakeCuda(config, dtype, args.invariant)
    bandwidth = None
    if device.type == "cuda" or args.dry_run:
        bandwidth = device_bandwidth(device, BANDWIDTH_BYTES[args.dry_run])
        log(f"device-to-device copy: {bandwidth / 1e9:.1f} GB/s")
    hf, hf_missing = None, None
    if args.hf:
        try:
            hf = hf_peer(config, model)
            hf_ms_per_step(hf, Shape(1, 8, 11), 2, config.vocab_size, device)  # warm-up
        except ImportError as exc:
            hf, hf_missing = None, f"transformers is not importable: {exc}"
        except Exception as exc:  # the peer's failure is no verdict on the engine
            hf, hf_missing = None, f"failed: {type(exc).__name__}: {_first_line(exc)}"
        if hf_missing:
            log(f"HF: {hf_missing}")
    rows = []
    for context in args.context:
        for batch in args.batch:
            shape = Shape(batch, context, context + args.warmup + args.steps + 1)
            row = run_row(args, config, model, fake, shape)
            if row.ms_per_step is not None and bandwidth is not None:
                kv_read = batch * context * kv_token_bytes(config, model.dtype.itemsize)
                row.roofline_fraction = ((weights + kv_read) / (row.ms_per_step / 1e3)
                                         / bandwidth)
            if hf is not None:
                run_hf(args, config, hf, device, row, shape)
            else:
                row.hf_skipped = hf_missing or "not asked for (--hf)"
            log(describe(row))
            rows.append(row)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "dtype": args.dtype,
        "layers": config.num_hidden_layers,
        "invariant": args.invariant,
        "dry_run": args.dry_run,
        "steps": args.steps,
        "warmup": args.warmup,
        "block_size": BLOCK_SIZE,
        # On CUDA a decode step replays a graph: its ops are those the host still dispatches.
        "ops_counted_on": "cuda (decode steps replay CUDA graphs)" if fake is None
                          else "fake cuda",
        "weight_bytes": weights,
        "bandwidth_gbps": None if bandwidth is None else bandwidth / 1e9,
        "torch": torch.__version__,
        "load_average": os.getloadavg()[0],
        "results": [asdict(row) for row in rows],
        **summarize(rows, args.context),
    }
    print("\n".join(describe(row) for row in rows))
    print(f"ops_growth {_fmt(result['ops_growth'], '.3f')}, max_host_syncs "
          f"{result['max_host_syncs']}, goals {result['goals']}")
    if args.json:
        write_json(args.json, result)
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
