"""Whole executor steps on a fake CUDA device (torch's FakeTensorMode on this CPU build):
every tensor a step touches must be on the cache's device, or FakeTensor raises a device
mismatch, and nothing may read a device value back except the one copy of the sampled
tokens. This is what stands between a step and its first CUDA run when no GPU is lent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.decode_step import StepCounter
from services.executor.copy import CpuCopyEngine
from services.executor.engine import ExecutorEngine, StepSequence
from services.executor.model import KVCacheGeometry, SamplingParams, load_checkpoint

CUDA = torch.device("cuda", 0)
BLOCK = 16
def _engine(checkpoint: Path, mode: FakeTensorMode, *, batch_invariant: bool
            ) -> ExecutorEngine:
    """Loaded on the host, then moved to the fake device inside `mode`."""
    config, model = load_checkpoint(checkpoint, batch_invariant=batch_invariant)
    geometry = KVCacheGeometry.for_model(config, num_blocks=32, block_size=BLOCK)
    with mode:
        return ExecutorEngine(config, model.to(CUDA), geometry.allocate(CUDA), backend="cupy",
                              copy_engine=CpuCopyEngine, fingerprint="fake")


STEPS = {
    "mixed": [  # a first chunk, a last chunk that samples, and decodes, greedy and seeded
        StepSequence("chunk", list(range(0, 4)), 0, [5] * 40),
        StepSequence("last-chunk", list(range(4, 8)), 32, [6] * 9, sample=True,
                     sampling=SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3)),
        StepSequence("greedy", list(range(8, 12)), 50, [7], sample=True,
                     banned_token_ids=(1, 2)),
        StepSequence("seeded", list(range(12, 16)), 17, [8], sample=True,
                     sampling=SamplingParams(temperature=1.0, seed=9, logprobs=True)),
    ],
    "decodes": [
        StepSequence(f"r{i}", list(range(4 * i, 4 * i + 4)), 30 + i, [9], sample=True)
        for i in range(6)
    ],
    "no-sample": [StepSequence("chunk", list(range(0, 4)), 0, [5] * 33)],
}


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_step_runs_on_a_cuda_device_and_reads_back_once(
    checkpoint: Path, batch_invariant: bool, step: str
) -> None:
    sequences = STEPS[step]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    engine = _engine(checkpoint, mode, batch_invariant=batch_invariant)
    assert engine.model.attention_backend().name == "triton"
    prepared = engine.prepare_step(engine.begin_step(sequences))  # host work: real tensors
    with mode, StepCounter() as counted:
        launched = engine.launch_step(prepared)
    sampled = sum(seq.sample for seq in sequences)
    assert counted.host_syncs == (1 if sampled else 0)
    assert launched.done is None  # no real CUDA: nothing to wait for
    if sampled:
        assert launched.copied is not None
        rows = 2 if any(seq.sampling.logprobs for seq in sequences) else 1
        assert tuple(launched.copied.shape) == (rows, sampled)
        assert launched.copied.device.type == "cpu"


@pytest.mark.parametrize("batch_invariant", [False, True], ids=["fast", "invariant"])
def test_a_step_fed_from_the_step_before_launches_before_that_one_is_collected(
    checkpoint: Path, batch_invariant: bool
) -> None:
    """Its from_last_step entries take their tokens from the step before on the device: no
    device mismatch, and still the one read back, of its own tokens."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    engine = _engine(checkpoint, mode, batch_invariant=batch_invariant)
    first = engine.prepare_step(engine.begin_step(STEPS["mixed"]))
    with mode:
        engine.launch_step(first)  # never collected: its tokens cannot be read
    seeded = SamplingParams(temperature=1.0, seed=9, logprobs=True)
    sequences = [
        StepSequence("seeded", list(range(12, 16)), 18, (), sample=True, sampling=seeded,
                     from_last_step=True),
        StepSequence("chunk", list(range(0, 4)), 40, [5] * 8),
        StepSequence("greedy", list(range(8, 12)), 51, (), sample=True, from_last_step=True),
    ]
    prepared = engine.prepare_step(engine.begin_step(sequences))
    with mode, StepCounter() as counted:
        launched = engine.launch_step(prepared)
    assert counted.host_syncs == 1
    assert launched.copied is not None
    assert tuple(launched.copied.shape) == (2, 2)
    assert launched.copied.device.type == "cpu"
