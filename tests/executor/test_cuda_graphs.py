"""Decode graphs (`cuda_graphs.py`) on the CPU: which steps replay, how a plan is padded to its
bucket and, with the Triton kernels under the interpreter (tests/conftest.py) and an eager
stand-in for the captured graph, that a replayed step gives the eager step's logits and KV
and puts in the static buffer what `PackedInputs.to` would move; a graph that fails runs its
step eagerly, writes nothing of its own and turns graphs off after one warning; the engine
replays decode steps to the tokens it samples without graphs, also when their tokens are fed
from the step before (filled into the static buffer before the replay), and without CUDA
never replays. With a CUDA device, the same checks run on real captures (`-k cuda`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.executor.copy import CpuCopyEngine
from services.executor.engine import ExecutorEngine, StepSequence
from services.executor.model import (
    DecoderModel,
    KVCacheGeometry,
    SamplingInputs,
    SamplingParams,
    SequenceStep,
    load_checkpoint,
)
from services.executor.model.batch import StepInputs, StepPlan
from services.executor.model.cuda_graphs import (
    BUCKETS,
    DecodeGraphs,
    bucket_for,
    pad_decode_plan,
    replayable,
)
from tests.support.lookahead import Drive, run_explicitly, run_pipelined

BLOCK = 4
NUM_BLOCKS = 24
# Three sequences: (block table, prompt length). Block 0 is no one's: padding reads it.
SEQUENCES = [([1, 2], 5), ([3, 4, 5], 9), ([6], 2)]
MODES = pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def triton_model(checkpoint: Path, batch_invariant: bool, device: str = "cpu") -> DecoderModel:
    model = load_checkpoint(checkpoint, batch_invariant=batch_invariant, attention="triton")[1]
    return model.to(device)


@pytest.fixture(scope="module", params=[False, True], ids=["fast", "invariant"])
def model(checkpoint: Path, request: pytest.FixtureRequest) -> DecoderModel:
    return triton_model(checkpoint, request.param)


def geometry(model: DecoderModel) -> KVCacheGeometry:
    return KVCacheGeometry.for_model(model.config, num_blocks=NUM_BLOCKS, block_size=BLOCK,
                                     dtype=model.dtype)


def prefilled(model: DecoderModel) -> torch.Tensor:
    """A cache of stale NaN bytes but for the prompts' KV."""
    cache = geometry(model).allocate(model.device).fill_(math.nan)
    model.forward_step(cache, [SequenceStep(table, 0, list(range(7, 7 + length)))
                               for table, length in SEQUENCES])
    return cache


def decode_plan(model: DecoderModel, sequences: list[tuple[list[int], int]], token: int
                ) -> StepPlan:
    """One new token for each sequence, at its length."""
    batch = [SequenceStep(table, length, [token + i]) for i, (table, length) in
             enumerate(sequences)]
    return model.plan_step(geometry(model), batch)


def sampling(model: DecoderModel, rows: int) -> dict[str, torch.Tensor]:
    """Each row's own params and one banned token."""
    params = [SamplingParams(temperature=0.5 * i, seed=i) for i in range(rows)]
    return SamplingInputs.build(params, list(range(rows)), [[i] for i in range(rows)],
                                model.config.vocab_size).named()


def test_a_batch_takes_the_smallest_bucket_that_holds_it() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 17, 128)] == [1, 2, 4, 4, 8, 32, 128]
    assert bucket_for(BUCKETS[-1] + 1) is None


def test_only_decode_steps_within_the_width_replay(model: DecoderModel) -> None:
    decode = decode_plan(model, SEQUENCES, 40)
    assert replayable(decode, width=3)
    assert not replayable(decode, width=2)  # the second sequence has 3 blocks
    mixed = model.plan_step(geometry(model), [SequenceStep([1, 2], 5, [40]),
                                              SequenceStep([3, 4, 5], 0, [41, 42])])
    assert not replayable(mixed, width=3)
    assert not replayable(replace(decode, output_rows=[0, 2]), width=3)
    assert not replayable(pad_decode_plan(decode, BUCKETS[-1] + 1, 3), width=3)


def test_padding_keeps_the_real_rows_and_writes_nothing(model: DecoderModel) -> None:
    plan = decode_plan(model, SEQUENCES, 40)
    padded = pad_decode_plan(plan, 4, width=5)
    n = plan.num_seqs
    for name in ("token_ids", "positions", "slots", "row_seq", "seq_lens"):
        assert getattr(padded, name)[:n] == getattr(plan, name)
    assert padded.query_start == [0, 1, 2, 3, 4]
    assert (padded.token_ids[n:], padded.positions[n:], padded.slots[n:],
            padded.seq_lens[n:]) == ([0], [0], [-1], [1])
    assert padded.output_rows == [0, 1, 2, 3]
    assert (padded.width, padded.max_query, padded.block_size) == (5, 1, BLOCK)
    table = [padded.block_table[s * 5:(s + 1) * 5] for s in range(4)]
    assert table == [[1, 2, 0, 0, 0], [3, 4, 5, 0, 0], [6, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    tiles = model.attention_backend().host_fields(padded)
    assert tiles == {"tile_seq": [0, 1, 2, 3], "tile_first": [0, 0, 0, 0],
                     "tile_blocks": [2, 3, 1, 1]}


class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: each replay runs the forward it was
    recorded over again, over the same input tensors, into the same output tensor."""

    def __init__(self, forward: Callable[[], torch.Tensor]) -> None:
        self.forward = forward
        self.logits = forward()

    def replay(self) -> None:
        with torch.inference_mode():
            self.logits.copy_(self.forward())


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every capture records an `EagerGraph` instead; lists the buckets captured."""
    buckets: list[int] = []

    def record(graphs: DecodeGraphs, inputs: StepInputs) -> tuple[EagerGraph, torch.Tensor]:
        buckets.append(inputs.plan.num_seqs)
        graph = EagerGraph(lambda: graphs.model.forward(graphs.cache, inputs))
        return graph, graph.logits

    monkeypatch.setattr(DecodeGraphs, "_record", record)
    return buckets


def assert_same(actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
    """Bit-exact in the invariant mode; in the fast one, to rounding of other matrix shapes."""
    tolerance = 0 if exact else 1e-4
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, equal_nan=True)


def eager(model: DecoderModel, cache: torch.Tensor, plan: StepPlan,
          extra: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.forward(cache, model.pack(plan, extra).to(cache.device))


def replay_three_steps(graphs: DecodeGraphs) -> None:
    """Decodes in buckets 4, 1 and 4 again, each step replayed by `graphs` on a copy of the
    cache and run eagerly on the original: the same logits, KV and fields on the device."""
    model = graphs.model
    eager_cache = graphs.cache.clone()
    exact = model.batch_invariant
    lengths = {table[0]: length for table, length in SEQUENCES}
    for token, sequences in enumerate([SEQUENCES, SEQUENCES[:1], SEQUENCES], start=40):
        sequences = [(table, lengths[table[0]]) for table, _ in sequences]
        plan = decode_plan(model, sequences, token)
        extra = sampling(model, plan.num_seqs)
        expected = eager(model, eager_cache, plan, extra)
        packed = graphs.pack(plan, extra)
        assert packed is not None
        assert packed.plan == pad_decode_plan(plan, bucket_for(plan.num_seqs) or 0, graphs.width)
        logits, inputs = graphs.launch(packed, plan.num_seqs)
        assert logits.shape == expected.shape
        assert_same(logits, expected, exact)
        assert_same(graphs.cache, eager_cache, exact)
        moved = packed.to(model.device).tensors
        assert inputs.tensors.keys() == moved.keys()
        for name, tensor in moved.items():
            assert torch.equal(inputs[name], tensor), name
        for table, _ in sequences:
            lengths[table[0]] += 1


def test_replayed_steps_give_the_eager_logits_kv_and_fields(
    model: DecoderModel, captures: list[int]
) -> None:
    replay_three_steps(DecodeGraphs(model, prefilled(model)))
    assert captures == [4, 1]


@CUDA
@MODES
def test_cuda_replayed_steps_give_the_eager_logits_kv_and_fields(
    checkpoint: Path, batch_invariant: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = triton_model(checkpoint, batch_invariant, "cuda")
    graphs = DecodeGraphs(model, prefilled(model))
    with caplog.at_level(logging.WARNING, logger="services.executor.model.cuda_graphs"):
        replay_three_steps(graphs)
    assert graphs.enabled and not caplog.records


def test_a_failing_graph_runs_its_step_eagerly_and_turns_graphs_off_after_one_warning(
    model: DecoderModel, caplog: pytest.LogCaptureFixture
) -> None:
    cache = prefilled(model)
    eager_cache = cache.clone()
    graphs = DecodeGraphs(model, cache)  # on the CPU, capture raises
    plan = decode_plan(model, SEQUENCES, 40)
    extra = sampling(model, plan.num_seqs)
    expected = eager(model, eager_cache, plan, extra)
    with caplog.at_level(logging.WARNING, logger="services.executor.model.cuda_graphs"):
        packed = graphs.pack(plan, extra)
        assert packed is not None
        logits, _ = graphs.launch(packed, plan.num_seqs)
        assert not graphs.enabled
        assert graphs.pack(plan, extra) is None
        again, _ = graphs.launch(packed, plan.num_seqs)  # packed before graphs went off
    assert len(caplog.records) == 1
    assert "CUDA graphs are off for this process" in caplog.records[0].getMessage()
    assert_same(logits, expected, model.batch_invariant)
    assert torch.equal(again, logits)
    assert_same(cache, eager_cache, model.batch_invariant)


def test_steps_past_the_extra_capacity_run_eagerly(model: DecoderModel) -> None:
    graphs = DecodeGraphs(model, prefilled(model), extra_capacity=64)
    plan = decode_plan(model, SEQUENCES, 40)
    too_many = {"sampling.banned": torch.zeros(100_000, dtype=torch.int64)}
    assert graphs.pack(plan, too_many) is None
    assert graphs.pack(plan, sampling(model, plan.num_seqs)) is not None


def decode_steps() -> list[list[StepSequence]]:
    """A prefill (eager) and two decode steps fed from the step before, greedy and seeded."""
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5, logprobs=True)
    steps = [[StepSequence(f"r{i}", table, 0, list(range(7, 7 + length)), sample=True,
                           sampling=seeded if i else SamplingParams(), banned_token_ids=(i,))
              for i, (table, length) in enumerate(SEQUENCES)]]
    for _ in range(2):
        steps.append([replace(seq, start=seq.end, token_ids=(), from_last_step=True)
                      for seq in steps[-1]])
    return steps


def graphed_and_plain(model: DecoderModel) -> list[ExecutorEngine]:
    """Two engines on copies of one model, with and without graphs."""
    cache = geometry(model).allocate(model.device)
    return [ExecutorEngine(model.config, model, cache.clone(), backend="cpu",
                           copy_engine=CpuCopyEngine, fingerprint="graphs", cuda_graphs=graphs)
            for graphs in (True, False)]


# How the graphed engine is driven: each step to its end, or each decode step launched before
# the step before is collected, its tokens filled into the static buffer before the replay.
DRIVERS = pytest.mark.parametrize("drive", [run_explicitly, run_pipelined],
                                  ids=["explicit", "pipelined"])


@DRIVERS
def test_the_engine_replays_decode_steps_to_the_same_tokens(
    checkpoint: Path, captures: list[int], monkeypatch: pytest.MonkeyPatch, drive: Drive
) -> None:
    monkeypatch.setattr(DecodeGraphs, "supported", staticmethod(lambda model, cache: True))
    engines = graphed_and_plain(triton_model(checkpoint, batch_invariant=True))
    assert [engine.cuda_graphs for engine in engines] == [True, False]
    assert drive(engines[0], decode_steps()) == run_explicitly(engines[1], decode_steps())
    assert captures == [4]
    assert engines[0].cuda_graphs  # no replay failed
    assert torch.equal(engines[0].cache, engines[1].cache)


@CUDA
@DRIVERS
def test_cuda_engine_replays_decode_steps_to_the_same_tokens(checkpoint: Path,
                                                             drive: Drive) -> None:
    engines = graphed_and_plain(triton_model(checkpoint, True, "cuda"))
    assert [engine.cuda_graphs for engine in engines] == [True, False]
    assert drive(engines[0], decode_steps()) == run_explicitly(engines[1], decode_steps())
    assert engines[0].cuda_graphs  # no capture or replay failed
    assert torch.equal(engines[0].cache, engines[1].cache)


def test_cuda_graphs_asked_for_without_cuda_leave_steps_eager(checkpoint: Path) -> None:
    engine = ExecutorEngine.load(checkpoint, num_gpu_blocks=NUM_BLOCKS, block_size=BLOCK,
                                 cuda_graphs=True)  # the cpu backend, on a GPU machine too
    assert not engine.cuda_graphs
    prompt = StepSequence("a", [1, 2], 0, [5, 6, 7], sample=True)
    decode = StepSequence("a", [1, 2], 3, [8], sample=True)
    assert len(engine.run_step(engine.begin_step([prompt])).tokens) == 1
    assert len(engine.run_step(engine.begin_step([decode])).tokens) == 1
    engine.close()
