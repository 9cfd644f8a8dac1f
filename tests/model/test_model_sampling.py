"""Sampling: a token depends only on (seed, output index, logits), on the device, unsynced."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from services.executor.model import SamplingInputs, SamplingParams, sample_rows


@dataclass(frozen=True, slots=True)
class SampledToken:
    """One row's choice, as the per-row reference makes it."""

    token_id: int
    logprob: float | None = None


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()
HOST_SYNCS = {"_local_scalar_dense", "nonzero", "item"}


def reference(
    logits: torch.Tensor, params: SamplingParams, output_index: int, banned: Sequence[int] = ()
) -> SampledToken:
    """The one-row algorithm that `sample_rows` must match, float for float."""
    raw = logits.double()
    allowed = raw.clone()
    allowed[list(banned)] = -math.inf
    if params.temperature == 0:
        token_id = int(torch.argmax(allowed))
    else:
        if params.top_k and params.top_k < len(allowed):
            kth = torch.topk(allowed, params.top_k).values[-1]
            allowed = allowed.masked_fill(allowed < kth, -math.inf)
        probs, order = torch.sort(
            torch.softmax(allowed / params.temperature, dim=-1), descending=True, stable=True
        )
        cumulative = torch.cumsum(probs, dim=0)
        top_p = torch.tensor([params.top_p], dtype=cumulative.dtype)
        kept = min(int(torch.searchsorted(cumulative, top_p)) + 1, len(probs))
        mixed = hashlib.blake2b(f"{params.seed}:{output_index}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(mixed, "little") >> 1)
        target = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[kept - 1]
        searched = torch.searchsorted(cumulative[:kept], target.reshape(1), right=True)
        token_id = int(order[min(int(searched), kept - 1)])
    logprob = float(torch.log_softmax(raw, dim=-1)[token_id]) if params.logprobs else None
    return SampledToken(token_id, logprob)


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
    banned: Sequence[Sequence[int]],
) -> list[SampledToken]:
    inputs = SamplingInputs.build(params, output_indices, banned, logits.shape[-1])
    tokens, logprobs = sample_rows(
        logits,
        inputs,
        all_greedy=not any(p.temperature for p in params),
        want_logprobs=any(p.logprobs for p in params),
    )
    values = logprobs.tolist() if logprobs is not None else [None] * len(params)
    return [
        SampledToken(token, value if p.logprobs else None)
        for p, token, value in zip(params, tokens.tolist(), values, strict=True)
    ]


def sample_one(
    logits: torch.Tensor, params: SamplingParams, output_index: int, banned: Sequence[int] = ()
) -> SampledToken:
    return sample_batch(logits.unsqueeze(0), [params], [output_index], [banned])[0]


def draws(
    params: SamplingParams, count: int, logits: torch.Tensor = LOGITS, banned: Sequence[int] = ()
) -> list[int]:
    """Output indices 0..count-1 of one request, as one batch of `count` rows."""
    sampled = sample_batch(logits.expand(count, -1), [params] * count, range(count),
                           [banned] * count)
    return [t.token_id for t in sampled]


def test_greedy_takes_the_argmax_and_reports_its_logprob() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 2.0])
    token = sample_one(logits, SamplingParams(logprobs=True), 0)
    assert token.token_id == 1  # first of the tied maxima
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    assert sample_one(logits, SamplingParams(), 0).logprob is None


def test_seeded_draws_ignore_call_order_and_global_rng() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    forward = draws(params, 64)
    torch.manual_seed(123)
    backward = [sample_one(LOGITS, params, i).token_id for i in reversed(range(64))][::-1]
    interleaved = []
    for i in range(64):
        sample_one(LOGITS, SamplingParams(temperature=1.0, seed=7), i)  # another request
        interleaved.append(sample_one(LOGITS, params, i).token_id)
    assert forward == backward == interleaved
    assert len(set(forward)) > 1


def test_seeds_and_positions_change_the_draws() -> None:
    a = draws(SamplingParams(temperature=1.0, seed=1), 64)
    b = draws(SamplingParams(temperature=1.0, seed=2), 64)
    assert a != b


def test_frequencies_follow_the_distribution() -> None:
    counts = Counter(draws(SamplingParams(temperature=1.0, seed=3), 4000))
    for token, p in enumerate(PROBS.tolist()):
        assert counts[token] / 4000 == pytest.approx(p, abs=0.03)


def test_top_p_keeps_only_the_nucleus() -> None:
    nucleus = Counter(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=4), 500))
    assert set(nucleus) == {0, 1}
    assert nucleus[0] / 500 == pytest.approx(0.5 / 0.8, abs=0.06)
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.1, seed=4), 50)) == {0}


def test_low_temperature_sharpens() -> None:
    cold = Counter(draws(SamplingParams(temperature=0.2, seed=5), 500))
    assert cold[0] / 500 > 0.9


def test_top_k_keeps_the_k_most_likely_ties_included() -> None:
    counts = Counter(draws(SamplingParams(temperature=1.0, top_k=2, seed=3), 400))
    assert set(counts) == {0, 1}
    tied = torch.tensor([1.0, 3.0, 3.0, 0.0])
    kept = draws(SamplingParams(temperature=1.0, top_k=1, seed=4), 200, tied)
    assert set(kept) == {1, 2}  # both share the k-th value
    assert draws(SamplingParams(temperature=1.0, top_k=10, seed=3), 50) == draws(
        SamplingParams(temperature=1.0, seed=3), 50)  # k past the vocabulary: no cut


def test_banned_tokens_are_never_chosen() -> None:
    assert sample_one(LOGITS, SamplingParams(), 0, banned=[0]).token_id == 1
    assert 0 not in draws(SamplingParams(temperature=1.0, seed=9), 300, banned=[0])
    token = sample_one(LOGITS, SamplingParams(logprobs=True), 0, banned=[0])
    assert token.logprob == pytest.approx(float(LOGITS.double().log_softmax(-1)[1]))


@pytest.mark.parametrize("bad", [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": float("nan")}, {"top_k": -1},
])
def test_invalid_params_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sample_rows_takes_a_batch_of_rows() -> None:
    inputs = SamplingInputs.build([SamplingParams()], [0], [()], len(LOGITS))
    with pytest.raises(ValueError, match=r"\[rows, vocab\]"):
        sample_rows(LOGITS, inputs, all_greedy=True, want_logprobs=False)
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingInputs.build([SamplingParams()], [0, 1], [()], len(LOGITS))


# Few distinct values, so that ties (at the maximum, at the k-th) are common, and extremes.
LOGIT = st.one_of(
    st.sampled_from([-2.0, 0.0, 0.5, 3.0]),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
)
PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(1e-3, 1e3)),
    # Round values, to land exactly on a cumulative mass of tied tokens.
    top_p=st.one_of(st.sampled_from([0.25, 0.5, 1.0]), st.floats(0.0, 1.0, exclude_min=True)),
    seed=st.integers(0, 2**63 - 1),
    logprobs=st.booleans(),
    top_k=st.integers(0, 10),
)


@st.composite
def steps(draw: st.DrawFn) -> tuple[torch.Tensor, list[SamplingParams], list[int], list[list[int]]]:
    vocab = draw(st.integers(1, 8))
    rows = draw(st.integers(1, 5))
    logits = torch.tensor(
        draw(st.lists(st.lists(LOGIT, min_size=vocab, max_size=vocab), min_size=rows,
                      max_size=rows)),
        dtype=torch.float32,
    )
    params = draw(st.lists(PARAMS, min_size=rows, max_size=rows))
    indices = draw(st.lists(st.integers(0, 10**6), min_size=rows, max_size=rows))
    banned = draw(st.lists(
        st.lists(st.integers(0, vocab - 1), max_size=vocab - 1, unique=True),
        min_size=rows, max_size=rows,
    ))
    return logits, params, indices, banned


@settings(max_examples=300, deadline=None)
@given(steps())
def test_a_batch_matches_the_one_row_algorithm_row_by_row(
    step: tuple[torch.Tensor, list[SamplingParams], list[int], list[list[int]]],
) -> None:
    logits, params, indices, banned = step
    batched = sample_batch(logits, params, indices, banned)
    for row, (p, index, ban) in enumerate(zip(params, indices, banned, strict=True)):
        expected = reference(logits[row], p, index, ban)
        assert batched[row] == expected  # floats bit for bit
        assert sample_one(logits[row], p, index, ban) == expected  # whatever shares the batch


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


MIXED = [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9, top_k=3, seed=1,
                                          logprobs=True)]


@pytest.mark.parametrize(("params", "all_greedy", "sorts"), [
    ([SamplingParams()] * 3, True, 0),
    (MIXED, False, 2),
])
def test_a_step_is_one_argmax_and_never_syncs(
    params: list[SamplingParams], all_greedy: bool, sorts: int
) -> None:
    logits = torch.randn(len(params), 16)
    inputs = SamplingInputs.build(params, range(len(params)), [[3]] * len(params), 16)
    for want_logprobs in (False, True):
        with OpCounter() as counter:
            sample_rows(logits, inputs, all_greedy=all_greedy, want_logprobs=want_logprobs)
        assert counter.ops["argmax"] == 1
        assert counter.ops["sort"] == sorts
        assert counter.ops["_log_softmax"] == want_logprobs
        assert not HOST_SYNCS & set(counter.ops)


@pytest.mark.parametrize(("params", "all_greedy"), [([SamplingParams()] * 2, True),
                                                    (MIXED, False)])
def test_rows_sample_on_a_fake_cuda_device(params: list[SamplingParams], all_greedy: bool) -> None:
    cuda = torch.device("cuda", 0)
    inputs = SamplingInputs.build(params, [5, 9], [[1], []], 32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = torch.randn(2, 32).to(cuda, non_blocking=True)
        tokens, logprobs = sample_rows(logits, inputs.to(cuda), all_greedy=all_greedy,
                                       want_logprobs=True)
    assert logprobs is not None
    assert (tokens.device, tokens.dtype, tuple(tokens.shape)) == (cuda, torch.int64, (2,))
    assert (logprobs.device, logprobs.dtype, tuple(logprobs.shape)) == (cuda, torch.float64, (2,))
