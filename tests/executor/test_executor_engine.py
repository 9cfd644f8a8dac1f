"""The executor engine in process: how steps and swaps that share device blocks are kept apart.

Copies are held at a gate, so "in flight" is a state the test controls rather than a race.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from common.kv.swap_plan import Copy, plan_copies
from common.shm.arena import HostArena
from common.tokenizer import ByteTokenizer
from services.executor import engine as engine_module
from services.executor.copy import CpuCopyEngine, Direction
from services.executor.copy.engine import Swap, Ticket
from services.executor.engine import (
    BackendUnavailable,
    DeviceFailure,
    ExecutorEngine,
    InvalidInput,
    PreconditionFailed,
    StepSequence,
    SwapDone,
    SwapOrder,
    copy_engine_factory,
)
from services.executor.model import (
    KVCacheGeometry,
    SamplingInputs,
    SamplingParams,
    SequenceStep,
    load_checkpoint,
    sample_rows,
)
from tests.support.lookahead import run_explicitly, run_pipelined

REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 4
EOS = ByteTokenizer.EOS  # the tiny checkpoint's


class GatedCopyEngine(CpuCopyEngine):
    gate = threading.Event()

    def _run(self, swap: Swap[object]) -> float:  # type: ignore[override]
        assert self.gate.wait(timeout=30), "test never opened the copy gate"
        return super()._run(swap)  # type: ignore[arg-type]


@pytest.fixture
def engine(checkpoint: Path) -> Iterator[ExecutorEngine]:
    config, model = load_checkpoint(checkpoint)
    cache = KVCacheGeometry.for_model(config, num_blocks=16, block_size=BLOCK_SIZE).allocate()
    engine = ExecutorEngine(config, model, cache, backend="cpu", copy_engine=GatedCopyEngine)
    GatedCopyEngine.gate.set()
    with HostArena.local(8, engine.geometry.block_bytes) as arena:
        engine.attach_host_arena(arena.name)
        yield engine
        GatedCopyEngine.gate.set()
        engine.close()


def step(engine: ExecutorEngine, *sequences: StepSequence) -> None:
    engine.run_step(engine.begin_step(sequences))


def seq(request_id: str, table: list[int], start: int, count: int) -> StepSequence:
    return StepSequence(request_id, table, start, [5 + i for i in range(count)])


def order(swap_id: int, request_id: str, direction: str, src: list[int],
          dst: list[int]) -> SwapOrder:
    return SwapOrder(swap_id, request_id, direction, plan_copies(src, dst))  # type: ignore[arg-type]


async def test_a_draining_block_is_never_written_but_may_be_read(engine: ExecutorEngine) -> None:
    step(engine, seq("a", [0, 1, 2], 0, 8))
    with engine.subscribe() as completions:
        GatedCopyEngine.gate.clear()
        engine.submit_swaps([order(1, "a", "out", [0, 1], [0, 1])])
        with pytest.raises(PreconditionFailed,
                           match=r"sequences\[0\]\.block_table\[0\]=1 is in flight in swap 1 "
                                 r"\(out of 'a'\)"):
            engine.begin_step([seq("b", [1], 0, 2)])
        step(engine, seq("c", [0, 1, 3], 8, 1))  # reads the draining blocks, writes block 3
        GatedCopyEngine.gate.set()
        done: SwapDone = await anext(completions)  # type: ignore[assignment]
    assert (done.swap_id, done.error, done.bytes) == (1, None, 2 * engine.geometry.block_bytes)
    step(engine, seq("b", [1], 0, 2))  # drained: the block may be reused


async def test_a_block_being_swapped_in_is_neither_read_nor_shared(
    engine: ExecutorEngine,
) -> None:
    with engine.subscribe() as completions:
        GatedCopyEngine.gate.clear()
        engine.submit_swaps([order(1, "a", "in", [0], [5])])
        with pytest.raises(PreconditionFailed, match=r"block_table\[1\]=5 is in flight"):
            engine.begin_step([seq("a", [4, 5], 4, 1)])
        with pytest.raises(PreconditionFailed, match=r"swaps\[0\]: device block 5 is also in "
                                                     r"swap 1 \(in of 'a'\)"):
            engine.submit_swaps([order(2, "b", "out", [5], [3])])
        GatedCopyEngine.gate.set()
        await anext(completions)
    engine.submit_swaps([order(2, "b", "out", [5], [3])])


async def test_swaps_proceed_during_a_step_except_on_its_blocks(engine: ExecutorEngine) -> None:
    before = engine.cache.clone()
    claim = engine.begin_step([seq("a", [6, 7], 0, 6)])
    with pytest.raises(PreconditionFailed, match=r"device block 7 is used by the running step "
                                                 r"\(sequences\[0\]\.block_table\[1\]\)"):
        engine.submit_swaps([order(1, "a", "out", [7], [0])])
    with pytest.raises(PreconditionFailed, match="used by the running step"):
        engine.submit_swaps([order(2, "b", "in", [0], [6])])
    with engine.subscribe() as completions:
        engine.submit_swaps([order(3, "b", "out", [2], [4])])
        done: SwapDone = await anext(completions)  # type: ignore[assignment]
    assert (done.swap_id, done.error) == (3, None)
    assert torch.equal(engine.cache, before)  # the claimed step has not run yet
    engine.run_step(claim)
    engine.submit_swaps([order(1, "a", "out", [7], [0])])


def test_a_step_samples_only_its_sampling_rows(engine: ExecutorEngine) -> None:
    greedy = StepSequence("greedy", [0, 1], 0, [5, 6, 7], sample=True,
                          sampling=SamplingParams(logprobs=True))
    seeded = StepSequence("seeded", [4], 0, [8, 9], sample=True,
                          sampling=SamplingParams(temperature=1.5, top_k=50, seed=5))
    sequences = [greedy, seq("chunk", [2, 3], 0, 6), seeded]  # a prefill chunk samples nothing
    logits = engine.model.forward_step(  # the step's logits, on a copy of the cache
        engine.cache.clone(), [SequenceStep(s.block_table, s.start, s.token_ids) for s in sequences]
    )
    favourite = int(logits[0].argmax())
    sequences[0] = replace(greedy, banned_token_ids=(favourite,))
    result = engine.run_step(engine.begin_step(sequences))
    drawn, _ = sample_rows(  # output index: the sampled token's position in the request
        logits[2:], SamplingInputs.build([seeded.sampling], [2], [()], logits.shape[-1]),
        all_greedy=False, want_logprobs=False,
    )
    runner_up = int(logits[0].masked_fill(torch.arange(logits.shape[-1]) == favourite,
                                          -torch.inf).argmax())
    assert [(t.request_id, t.token_id) for t in result.tokens] == [
        ("greedy", runner_up), ("seeded", int(drawn[0]))]
    # The fast mode's logits depend on the rows beside them in their last bits (the step
    # projects only its sampling rows, the reference all three; some CPUs' GEMMs block
    # two rows and three differently).
    assert result.tokens[0].logprob == pytest.approx(
        float(logits[0].double().log_softmax(-1)[runner_up]), rel=1e-6)
    assert result.tokens[1].logprob is None


def test_swaps_need_an_attached_arena(checkpoint: Path) -> None:
    config, model = load_checkpoint(checkpoint)
    cache = KVCacheGeometry.for_model(config, num_blocks=4, block_size=BLOCK_SIZE).allocate()
    bare = ExecutorEngine(config, model, cache, backend="cpu", copy_engine=CpuCopyEngine)
    with pytest.raises(PreconditionFailed, match="no host arena attached"):
        bare.submit_swaps([order(1, "a", "out", [0], [0])])


def test_load_takes_the_checkpoints_dtype_and_describes_the_folder(
    tmp_path: Path, checkpoint: Path
) -> None:
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps(json.loads((checkpoint / "config.json").read_text()) | {"dtype": "bfloat16"})
    )
    for weights in checkpoint.glob("*.safetensors"):
        (tmp_path / weights.name).symlink_to(weights)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3]}))
    auto = ExecutorEngine.load(tmp_path, num_gpu_blocks=4, block_size=BLOCK_SIZE)
    assert (auto.model.dtype, auto.cache.dtype) == (torch.bfloat16, torch.bfloat16)
    described = auto.describe()
    auto.close()
    assert described.checkpoint == str(tmp_path.resolve())
    assert (described.eos_token_id, described.eos_token_ids) == (EOS, (EOS, 3))
    forced = ExecutorEngine.load(tmp_path, num_gpu_blocks=4, dtype=torch.float32)
    forced.close()
    assert (forced.model.dtype, forced.cache.dtype) == (torch.float32, torch.float32)


def _cuda_ready() -> bool:
    try:
        copy_engine_factory("cupy")
    except BackendUnavailable:
        return False
    return True


@pytest.mark.skipif(_cuda_ready(), reason="CuPy and a CUDA device are present here")
def test_cupy_backend_fails_fast_without_cuda() -> None:
    with pytest.raises(BackendUnavailable, match="--backend cupy needs"):
        copy_engine_factory("cupy")
    run = subprocess.run(
        [sys.executable, "-m", "services.executor", "--backend", "cupy", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0
    assert "error: --backend cupy needs" in run.stderr


@pytest.mark.skipif(not _cuda_ready(), reason="needs CuPy and a CUDA device (none here)")
async def test_cupy_swap_round_trip_into_other_blocks(checkpoint: Path) -> None:
    engine = ExecutorEngine.load(checkpoint, num_gpu_blocks=16, block_size=BLOCK_SIZE,
                                 backend="cupy")
    engine.cache.copy_(torch.randn_like(engine.cache))
    original = engine.cache.clone()
    with HostArena.local(8, engine.geometry.block_bytes) as arena:
        engine.attach_host_arena(arena.name)
        with engine.subscribe() as completions:
            engine.submit_swaps([order(1, "a", "out", [2, 3, 7], [0, 1, 2])])
            assert (await anext(completions)).error is None  # type: ignore[attr-defined]
            engine.submit_swaps([order(2, "a", "in", [0, 1, 2], [10, 11, 12])])
            assert (await anext(completions)).error is None  # type: ignore[attr-defined]
        engine.close()
    assert torch.equal(engine.cache[[10, 11, 12]], original[[2, 3, 7]])
    untouched = [b for b in range(16) if b not in (10, 11, 12)]
    assert torch.equal(engine.cache[untouched], original[untouched])


class FenceRecorder(CpuCopyEngine):
    """Records each step fence it hands out and the fence each swap was told to wait for."""

    fences: ClassVar[list[object]] = []
    waits: ClassVar[list[tuple[str, object]]] = []

    def step_fence(self) -> Future[object]:
        fence = super().step_fence()
        self.fences.append(fence)
        return fence

    def submit(self, direction: Direction, request_id: str, copies: Sequence[Copy],
               after: Future[object] | None = None) -> Ticket:
        self.waits.append((direction, after))
        return super().submit(direction, request_id, copies, after)


@pytest.fixture
def fenced(checkpoint: Path) -> Iterator[ExecutorEngine]:
    """An engine with an arena attached, on a copy engine that records its fences."""
    config, model = load_checkpoint(checkpoint)
    cache = KVCacheGeometry.for_model(config, num_blocks=16, block_size=BLOCK_SIZE).allocate()
    engine = ExecutorEngine(config, model, cache, backend="cpu", copy_engine=FenceRecorder)
    FenceRecorder.fences.clear()
    FenceRecorder.waits.clear()
    with HostArena.local(8, engine.geometry.block_bytes) as arena:
        engine.attach_host_arena(arena.name)
        yield engine
        engine.close()


def test_swaps_both_ways_wait_for_the_fence_of_the_last_step_launched(
    fenced: ExecutorEngine,
) -> None:
    for first in (0, 4):
        step(fenced, seq(f"a{first}", [first, first + 1], 0, 5))
        fence = FenceRecorder.fences[-1]
        fenced.submit_swaps([order(first + 1, "x", "out", [first], [first]),
                             order(first + 2, "y", "in", [first + 1], [8 + first])])
        assert FenceRecorder.waits[-2:] == [("out", fence), ("in", fence)]
    assert len(FenceRecorder.fences) == 2  # one per step


def test_an_arena_the_copy_engine_cannot_take_is_released(checkpoint: Path) -> None:
    def refuse(device: torch.Tensor, host: torch.Tensor) -> CpuCopyEngine:
        raise RuntimeError("cudaErrorHostMemoryAlreadyRegistered")  # as a CUDA error reads

    config, model = load_checkpoint(checkpoint)
    cache = KVCacheGeometry.for_model(config, num_blocks=16, block_size=BLOCK_SIZE).allocate()
    engine = ExecutorEngine(config, model, cache, backend="cpu", copy_engine=refuse)
    with HostArena.local(8, engine.geometry.block_bytes) as arena:
        with pytest.raises(DeviceFailure, match="could not be mapped for copies: RuntimeError: "
                                                "cudaErrorHostMemoryAlreadyRegistered"):
            engine.attach_host_arena(arena.name)
        assert engine.describe().host_arenas == ()
        engine._make_copy_engine = CpuCopyEngine  # the device recovered: the same arena attaches
        assert engine.attach_host_arena(arena.name).first_block == 0
    engine.close()


def follow(request_id: str, table: list[int], start: int,
           sampling: SamplingParams | None = None) -> StepSequence:
    """An entry fed the token its request sampled in the step before, sampling the next."""
    return StepSequence(request_id, table, start, (), sample=True,
                        sampling=sampling or SamplingParams(), from_last_step=True)


def lookahead_steps() -> list[list[StepSequence]]:
    """Four steps of greedy and seeded requests, prefill chunks among them, their decodes fed
    from the step before, in another order from step to step."""
    seeded = SamplingParams(temperature=0.9, top_k=40, seed=11, logprobs=True)
    chunked = SamplingParams(temperature=1.2, top_p=0.8, seed=3)
    a, b, c, d = [1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11]
    return [
        [StepSequence("a", a, 0, [5, 6, 7, 8, 9], sample=True),
         StepSequence("b", b, 0, list(range(20, 29)), sample=True, sampling=seeded),
         seq("c", c, 0, 6)],
        [follow("a", a, 5), follow("b", b, 9, seeded),
         StepSequence("c", c, 6, [31, 32, 33], sample=True, sampling=chunked,
                      banned_token_ids=(4,))],
        [follow("a", a, 6), follow("b", b, 10, seeded), follow("c", c, 9, chunked)],
        [follow("c", c, 10, chunked), StepSequence("d", d, 0, [40, 41, 42, 43], sample=True),
         follow("a", a, 7)],
    ]


def twin(engine: ExecutorEngine) -> ExecutorEngine:
    """Another engine over the same model and a copy of the cache."""
    return ExecutorEngine(engine.config, engine.model, engine.cache.clone(), backend="cpu",
                          copy_engine=CpuCopyEngine, fingerprint="twin")


def test_from_last_step_entries_sample_as_the_tokens_given_explicitly(
    engine: ExecutorEngine,
) -> None:
    explicit = twin(engine)
    expected = run_explicitly(explicit, lookahead_steps())
    assert len({token.token_id for tokens in expected for token in tokens}) > 3
    assert run_pipelined(engine, lookahead_steps()) == expected
    assert torch.equal(engine.cache, explicit.cache)


def test_one_step_queues_behind_the_running_one_and_a_third_is_refused(
    engine: ExecutorEngine,
) -> None:
    running = engine.begin_step([seq("a", [0, 1], 0, 6)])
    queued = engine.begin_step([seq("b", [2, 3], 0, 6)])
    with pytest.raises(PreconditionFailed, match="a step is already queued") as refused:
        engine.begin_step([seq("c", [4], 0, 2)])
    assert refused.value.request_id == ""
    with pytest.raises(PreconditionFailed, match=r"device block 3 is used by the queued step "
                                                 r"\(sequences\[0\]\.block_table\[1\]\)"):
        engine.submit_swaps([order(1, "b", "out", [3], [0])])
    with pytest.raises(PreconditionFailed, match="device block 1 is used by the running step"):
        engine.submit_swaps([order(2, "x", "in", [0], [1])])
    engine.submit_swaps([order(3, "c", "in", [0], [4])])  # the refused step claimed nothing
    prepared = engine.prepare_step(queued)  # host work while the running step waits
    with pytest.raises(RuntimeError, match="the step begun before this one is not launched"):
        engine.launch_step(prepared)
    first = engine.launch_step(engine.prepare_step(running))
    second = engine.launch_step(prepared)
    engine.collect_step(first)
    engine.collect_step(second)
    step(engine, seq("d", [5], 0, 2))


def test_the_durations_of_a_step_and_the_one_queued_behind_it_do_not_overlap(
    engine: ExecutorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = iter(range(1, 100))
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    first = engine.launch_step(engine.prepare_step(engine.begin_step([seq("a", [0], 0, 2)])))  # 1
    second = engine.launch_step(engine.prepare_step(engine.begin_step([seq("b", [1], 0, 2)])))  # 2
    assert engine.collect_step(first).duration_s == 3 - 1
    assert engine.collect_step(second).duration_s == 4 - 3  # from the first's end, not from 2


def test_a_swap_beside_a_queued_step_waits_for_the_fence_of_the_step_launched_last(
    fenced: ExecutorEngine,
) -> None:
    launched = fenced.launch_step(fenced.prepare_step(fenced.begin_step(
        [seq("a", [0, 1], 0, 5)])))
    fence = FenceRecorder.fences[-1]
    queued = fenced.begin_step([seq("b", [2, 3], 0, 5)])
    fenced.submit_swaps([order(1, "x", "out", [4], [0]), order(2, "y", "in", [1], [5])])
    assert FenceRecorder.waits[-2:] == [("out", fence), ("in", fence)]
    fenced.collect_step(launched)
    fenced.run_step(queued)


def test_a_bad_from_last_step_entry_is_refused_and_changes_nothing(
    engine: ExecutorEngine,
) -> None:
    step(engine, StepSequence("a", [0, 1], 0, [5, 6, 7], sample=True), seq("chunk", [2], 0, 4))
    before = engine.cache.clone()
    bad = [
        (replace(follow("a", [0, 1], 3), token_ids=[9]), InvalidInput,
         r"sequences\[1\]\.token_ids is not empty: with from_last_step"),
        (follow("chunk", [2, 3], 4), PreconditionFailed,
         r"sequences\[1\]\.from_last_step: the step before this one sampled no token for "
         r"'chunk'"),
        (follow("a", [0, 1], 4), PreconditionFailed,
         r"sequences\[1\]\.start=4: the step before this one sampled 'a''s token for position 3"),
    ]
    for entry, error, message in bad:
        with pytest.raises(error, match=message) as refused:
            engine.begin_step([seq("other", [5], 0, 3), entry])
        assert refused.value.request_id == entry.request_id
    assert torch.equal(engine.cache, before)
    step(engine, follow("a", [0, 1], 3))  # the refusals left the step before as it was


def test_entries_that_follow_a_failed_step_are_refused(
    engine: ExecutorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    step(engine, StepSequence("a", [0, 1], 0, [5, 6, 7], sample=True))
    failing = engine.prepare_step(engine.begin_step([follow("a", [0, 1], 3)]))
    queued = engine.prepare_step(engine.begin_step([follow("a", [0, 1], 4)]))

    def lost(*args: object) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.model, "forward", lost)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.launch_step(failing)
    monkeypatch.undo()
    before = engine.cache.clone()
    with pytest.raises(PreconditionFailed, match=r"sequences\[0\]\.from_last_step: the step "
                                                 r"before this one failed") as refused:
        engine.launch_step(queued)
    assert refused.value.request_id == "a"
    assert torch.equal(engine.cache, before)
    with pytest.raises(PreconditionFailed, match=r"sampled no token for 'a' \(or failed\)"):
        engine.begin_step([follow("a", [0, 1], 5)])
    step(engine, StepSequence("a", [0, 1], 3, [8], sample=True))  # the engine goes on
