"""Sampling: a token depends only on (seed, output index, logits)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from services.executor.model import SamplingParams, sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draws(params: SamplingParams, count: int, logits: torch.Tensor = LOGITS) -> list[int]:
    return [sample(logits, params, i).token_id for i in range(count)]


def test_greedy_takes_the_argmax_and_reports_its_logprob() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 2.0])
    token = sample(logits, SamplingParams(logprobs=True), 0)
    assert token.token_id == 1  # first of the tied maxima
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    assert sample(logits, SamplingParams(), 0).logprob is None


def test_seeded_draws_ignore_call_order_and_global_rng() -> None:
    params = SamplingParams(temperature=1.0, seed=42)
    forward = draws(params, 64)
    torch.manual_seed(123)
    backward = [sample(LOGITS, params, i).token_id for i in reversed(range(64))][::-1]
    interleaved = []
    for i in range(64):
        sample(LOGITS, SamplingParams(temperature=1.0, seed=7), i)  # another request
        interleaved.append(sample(LOGITS, params, i).token_id)
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
    assert sample(LOGITS, SamplingParams(), 0, banned=[0]).token_id == 1
    assert 0 not in draws_banned(SamplingParams(temperature=1.0, seed=9), 300, [0])
    token = sample(LOGITS, SamplingParams(logprobs=True), 0, banned=[0])
    assert token.logprob == pytest.approx(float(LOGITS.double().log_softmax(-1)[1]))


def draws_banned(params: SamplingParams, count: int, banned: list[int]) -> list[int]:
    return [sample(LOGITS, params, i, banned=banned).token_id for i in range(count)]


@pytest.mark.parametrize("bad", [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": float("nan")}, {"top_k": -1},
])
def test_invalid_params_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sample_takes_one_row() -> None:
    with pytest.raises(ValueError, match="one row"):
        sample(LOGITS.unsqueeze(0), SamplingParams(), 0)
