"""`python -m tools.gpu_correctness --json FILE [--dry-run]`: the model on a GPU computes what
it computes on the CPU, and its batch-invariant mode gives the same tokens however a batch
is made up (issue 24, step 1). Exits 0 when every check passed, 1 otherwise.

Checks, each `{name, passed, max_abs_diff, bound}` (and `error` when one raised):

- `logits_<model>_<dtype>`: every row's logits of a scripted run through `forward_step`
  (three sequences, prefill chunks beside decodes, blocks scattered over the cache), the
  subject against the reference: passed when max |difference| <= bound, which is the
  dtype's tolerance times the largest |reference logit|. On CUDA the subject is the GPU in
  the fast mode (Triton attention) and the reference the CPU in float32: the tiny model and
  a small LLaMA-shaped random model (GQA, head_dim 128) in float32, and the small LLaMA in
  bfloat16 (its float32 weights rounded) with a looser tolerance.
- `invariant_tokens_<model>_<dtype>`: in the batch-invariant mode on the subject device,
  three sequences decode greedily alone, all together, and staggered in another order with
  their prompts in small chunks beside the others' decodes, their blocks placed anew each
  time: passed when the tokens are identical and the logits equal to the bit
  (max_abs_diff 0).
- `fake_cuda_<model>_<dtype>_<mode>` (dry run only): the scripted run of each model and
  mode the GPU checks use, on fake CUDA tensors (FakeTensorMode): the device path runs end
  to end on a CPU-only build, with the logits' device and shape checked.

`--dry-run`: the same code on this CPU, in seconds: the logits checks compare the CPU's fast
path (reference) to its invariant path, and the invariance checks run on the CPU.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.cli import write_json
from benchmarks.random_model import (
    CUDA,
    fake_cuda_decoder,
    llama_config,
    random_decoder,
    toy_config,
)
from services.executor.model import (
    DecoderModel,
    KVCacheGeometry,
    ModelConfig,
    SequenceStep,
    load_checkpoint,
)
from services.executor.model.tiny_checkpoint import tiny_checkpoint

BLOCK_SIZE = 16  # the Triton kernel's dot products need at least 16 keys per block
NUM_BLOCKS = 24
RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # of the largest |reference logit|
# The scripted run: each sequence's prompt length, then each step's (sequence, new tokens).
SCRIPT_PROMPTS = (45, 20, 7)
SCRIPT: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, 16), (1, 20), (2, 7)),  # a first chunk beside two whole prompts
    ((0, 29), (1, 1), (2, 1)),  # the rest of the first prompt beside two decodes
    ((0, 1), (1, 1), (2, 1)),  # decodes
)
INVARIANT_PROMPTS = (23, 9, 17)
NEW_TOKENS = 6


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def small_llama_config() -> ModelConfig:
    """LLaMA-3's layer shape scaled down: GQA (4 query heads per KV head), head_dim 128."""
    return llama_config(
        vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_layers=2, heads=8,
        kv_heads=2, rope_theta=500000.0, max_position_embeddings=1024,
    )


def reference_models(dry_run: bool) -> dict[str, DecoderModel]:
    """The models checked, in float32 on the CPU, fast mode: the references. A dry run's
    LLaMA is a toy of its shape (benchmarks/random_model.py)."""
    llama = toy_config(num_layers=2) if dry_run else small_llama_config()
    return {
        "tiny": load_checkpoint(tiny_checkpoint(), dtype=torch.float32)[1],
        "llama": random_decoder(llama, dtype=torch.float32, device="cpu"),
    }


def twin(model: DecoderModel, *, dtype: torch.dtype, batch_invariant: bool,
         device: torch.device) -> DecoderModel:
    """`model`'s weights (rounded to `dtype`) in a new model of that mode, on `device`."""
    copy = DecoderModel(model.config, dtype, batch_invariant=batch_invariant)
    copy.load_state_dict(model.state_dict())
    return copy.to(device)


@dataclass(slots=True)
class Check:
    name: str
    passed: bool = False
    max_abs_diff: float | None = None
    bound: float | None = None
    error: str | None = None


def scattered_tables(blocks: Sequence[int], seed: int) -> list[list[int]]:
    """Block tables of `blocks[i]` blocks each, drawn from a shuffled cache."""
    order = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(order)
    tables, used = [], 0
    for count in blocks:
        tables.append(order[used:used + count])
        used += count
    return tables


def token_stream(length: int, vocab: int, seed: int) -> list[int]:
    """Token ids drawn without torch, so that fake tensors never hold them."""
    draw = random.Random(seed)
    return [draw.randrange(1, vocab) for _ in range(length)]


def run_script(model: DecoderModel) -> list[torch.Tensor]:
    """Every row's logits of each step of `SCRIPT`, on the model's device (in the model's
    fake mode, if it has one, when called inside it)."""
    config = model.config
    fed = [0] * len(SCRIPT_PROMPTS)
    lengths = [sum(n for step in SCRIPT for s, n in step if s == seq)
               for seq in range(len(SCRIPT_PROMPTS))]
    streams = [token_stream(n, config.vocab_size, seed) for seed, n in enumerate(lengths)]
    tables = scattered_tables([-(-n // BLOCK_SIZE) for n in lengths], seed=0)
    geometry = KVCacheGeometry.for_model(config, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                         dtype=model.dtype)
    cache = geometry.allocate(model.device)
    logits = []
    for step in SCRIPT:
        batch = []
        for seq, count in step:
            batch.append(SequenceStep(tables[seq], fed[seq],
                                      streams[seq][fed[seq]:fed[seq] + count]))
            fed[seq] += count
        logits.append(model.forward_step(cache, batch, all_positions=True))
    return logits


def compare_logits(reference: DecoderModel, subject: DecoderModel, name: str) -> Check:
    """The scripted run's logits on `subject` against `reference`."""
    check = Check(name)
    expected = torch.cat(run_script(reference))
    actual = torch.cat(run_script(subject)).cpu()
    check.max_abs_diff = (actual - expected).abs().max().item()
    check.bound = RTOL[subject.dtype] * expected.abs().max().item()
    check.passed = check.max_abs_diff <= check.bound
    return check


@dataclass(frozen=True, slots=True)
class Composition:
    """How the sequences of the invariance check share steps: `groups` run one after the
    other, each a batch whose members join `stagger` steps apart, prefilling at most
    `chunk` prompt tokens a step, with blocks placed by `seed`."""

    name: str
    groups: tuple[tuple[int, ...], ...]
    chunk: int
    stagger: int
    seed: int


COMPOSITIONS = (
    Composition("alone", ((0,), (1,), (2,)), chunk=1024, stagger=0, seed=1),
    Composition("together", ((0, 1, 2),), chunk=1024, stagger=0, seed=2),
    Composition("staggered_chunked", ((2, 0, 1),), chunk=5, stagger=2, seed=3),
)


def greedy(model: DecoderModel, composition: Composition
           ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each sequence's `NEW_TOKENS` greedy tokens, and the logits each was chosen from
    (`[NEW_TOKENS, vocab]` on the CPU), under `composition`."""
    config = model.config
    prompts = [token_stream(n, config.vocab_size, 10 + seed)
               for seed, n in enumerate(INVARIANT_PROMPTS)]
    tables = scattered_tables(
        [-(-(n + NEW_TOKENS) // BLOCK_SIZE) for n in INVARIANT_PROMPTS], composition.seed)
    geometry = KVCacheGeometry.for_model(config, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                         dtype=model.dtype)
    cache = geometry.allocate(model.device)
    tokens = [list(prompt) for prompt in prompts]  # fed or to feed, generated ones appended
    fed = [0] * len(prompts)
    chosen: list[list[torch.Tensor]] = [[] for _ in prompts]
    for group in composition.groups:
        step = 0
        while any(len(chosen[seq]) < NEW_TOKENS for seq in group):
            members = [seq for order, seq in enumerate(group)
                       if step >= order * composition.stagger and len(chosen[seq]) < NEW_TOKENS]
            batch = []
            for seq in members:
                feed = tokens[seq][fed[seq]:][:composition.chunk]
                batch.append(SequenceStep(tables[seq], fed[seq], feed))
                fed[seq] += len(feed)
            logits = model.forward_step(cache, batch).cpu()
            for seq, row in zip(members, logits, strict=True):
                if fed[seq] == len(tokens[seq]):  # the prompt is in: this row picks a token
                    chosen[seq].append(row)
                    tokens[seq].append(int(row.argmax()))
            step += 1
    return ([t[len(p):] for t, p in zip(tokens, prompts, strict=True)],
            [torch.stack(rows) for rows in chosen])


def check_invariance(model: DecoderModel, name: str) -> Check:
    """`greedy` under every composition against the first."""
    check = Check(name, bound=0.0)
    runs = [greedy(model, composition) for composition in COMPOSITIONS]
    (tokens, logits), others = runs[0], runs[1:]
    check.max_abs_diff = max((a - b).abs().max().item() for _, other in others
                             for a, b in zip(logits, other, strict=True))
    mismatched = [c.name for c, (t, _) in zip(COMPOSITIONS[1:], others, strict=True)
                  if t != tokens]
    check.passed = not mismatched and check.max_abs_diff == 0.0
    if mismatched:
        check.error = f"tokens differ from {COMPOSITIONS[0].name}'s in {', '.join(mismatched)}"
    return check


def check_fake_step(config: ModelConfig, dtype: torch.dtype, batch_invariant: bool,
                    name: str) -> Check:
    """The scripted run on a fake-CUDA model of `config`: every row's logits, on the device."""
    check = Check(name)
    mode, model = fake_cuda_decoder(config, dtype, batch_invariant=batch_invariant)
    with mode:
        logits = run_script(model)
    rows = [sum(n for _, n in step) for step in SCRIPT]
    shapes = [tuple(t.shape) for t in logits]
    wanted = [(r, config.vocab_size) for r in rows]
    check.passed = (shapes == wanted and all(t.device == CUDA for t in logits)
                    and all(t.dtype == torch.float32 for t in logits))
    if not check.passed:
        check.error = f"logits {shapes} on {[str(t.device) for t in logits]}, wanted {wanted}"
    return check


def guarded(name: str, run: Callable[[str], Check]) -> Check:
    """`run(name)`, or a failed check naming what it raised."""
    log(f"{name} ...")
    started = time.perf_counter()
    try:
        check = run(name)
    except Exception as exc:
        check = Check(name, error=f"{type(exc).__name__}: {exc}")
    log(f"{name}: {'passed' if check.passed else 'FAILED'}, max_abs_diff "
        f"{check.max_abs_diff} (bound {check.bound}) in {time.perf_counter() - started:.1f}s"
        + (f"; {check.error}" if check.error else ""))
    return check


def checks(dry_run: bool) -> list[Check]:
    """Every check, in order (see the module's docstring)."""
    device = torch.device("cpu") if dry_run else CUDA
    references = reference_models(dry_run)
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    logits_runs = (("tiny", torch.float32), ("llama", torch.float32), ("llama", torch.bfloat16))
    invariant_runs = (("tiny", torch.float32), ("llama", torch.bfloat16))
    done = []
    for model, dtype in logits_runs:
        reference = references[model]

        def logits_check(name: str, reference: DecoderModel = reference,
                         dtype: torch.dtype = dtype) -> Check:
            # On the CPU the subject is the invariant path, on a GPU the fast one.
            subject = twin(reference, dtype=dtype, batch_invariant=dry_run, device=device)
            return compare_logits(reference, subject, name)

        done.append(guarded(f"logits_{model}_{short[dtype]}", logits_check))
    for model, dtype in invariant_runs:
        reference = references[model]

        def invariance_check(name: str, reference: DecoderModel = reference,
                             dtype: torch.dtype = dtype) -> Check:
            subject = twin(reference, dtype=dtype, batch_invariant=True, device=device)
            return check_invariance(subject, name)

        done.append(guarded(f"invariant_tokens_{model}_{short[dtype]}", invariance_check))
    if dry_run:  # the GPU's models, at the GPU's sizes: fake tensors compute nothing
        configs = {"tiny": references["tiny"].config, "llama": small_llama_config()}
        fake_runs = [(m, d, False) for m, d in logits_runs] + [(m, d, True)
                                                                for m, d in invariant_runs]
        for model, dtype, invariant in fake_runs:
            mode = "invariant" if invariant else "fast"

            def fake_check(name: str, config: ModelConfig = configs[model],
                           dtype: torch.dtype = dtype, invariant: bool = invariant) -> Check:
                return check_fake_step(config, dtype, invariant, name)

            done.append(guarded(f"fake_cuda_{model}_{short[dtype]}_{mode}", fake_check))
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the report here")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on this CPU: fast path against invariant path, "
                             "and each model on fake CUDA tensors")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error(f"torch {torch.__version__} sees no CUDA device (--dry-run runs on a CPU)")
    started = time.perf_counter()
    torch.manual_seed(0)
    done = checks(args.dry_run)
    passed = all(check.passed for check in done)
    write_json(args.json, {
        "passed": passed,
        "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(CUDA),
        "dry_run": args.dry_run,
        "seconds": time.perf_counter() - started,
        "checks": [asdict(check) for check in done],
    })
    log(f"gpu_correctness: {sum(c.passed for c in done)}/{len(done)} checks passed")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
