from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from benchmarks.sim.trace import TraceError, load_trace, write_trace
from benchmarks.sim.workload import LogNormal, TurnSpec, WorkloadConfig, generate

UNBOUNDED = {"max_context": 10**9, "max_output_tokens": 10**8}


def by_conversation(turns: list[TurnSpec]) -> dict[int, list[TurnSpec]]:
    conversations: dict[int, list[TurnSpec]] = {}
    for t in turns:
        conversations.setdefault(t.conversation_id, []).append(t)
    return conversations


def test_mean_turns_per_conversation_is_about_five_and_a_half() -> None:
    per_seed = []
    for seed in range(20):
        config = WorkloadConfig(num_conversations=500, arrival_rate=1.0, seed=seed, **UNBOUNDED)
        per_seed.append(len(generate(config)) / 500)
    assert statistics.mean(per_seed) == pytest.approx(5.5, abs=0.2)
    assert all(abs(mean - 5.5) < 1.0 for mean in per_seed)


def test_same_seed_same_workload_other_seed_other_workload() -> None:
    config = WorkloadConfig(num_conversations=50, arrival_rate=2.0, num_clients=3, seed=7)
    assert generate(config) == generate(config)
    other = WorkloadConfig(num_conversations=50, arrival_rate=2.0, num_clients=3, seed=8)
    assert generate(config) != generate(other)


def test_each_prompt_carries_the_whole_history() -> None:
    turns = generate(WorkloadConfig(num_conversations=200, arrival_rate=1.0, num_clients=5))
    for conversation in by_conversation(turns).values():
        assert [t.turn for t in conversation] == list(range(len(conversation)))
        assert len({t.client_id for t in conversation}) == 1
        history = 0
        for t in conversation:
            assert t.history_tokens == history
            assert t.full_prompt_tokens == history + t.prompt_tokens
            history += t.prompt_tokens + t.output_tokens


def test_first_turns_arrive_by_poisson_process_later_ones_after_think_time() -> None:
    rate = 4.0
    config = WorkloadConfig(num_conversations=4000, arrival_rate=rate, mean_think_time_s=3.0)
    turns = generate(config)
    firsts = [t.arrival_s for t in turns if t.turn == 0]
    assert all(a is not None for a in firsts)
    assert firsts == sorted(firsts)
    gaps = [b - a for a, b in zip([0.0, *firsts], firsts, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.1)
    later = [t for t in turns if t.turn > 0]
    assert all(t.arrival_s is None for t in later)
    assert statistics.mean(t.think_time_s for t in later) == pytest.approx(3.0, rel=0.1)


def test_conversations_never_outgrow_the_context() -> None:
    config = WorkloadConfig(
        num_conversations=300, arrival_rate=1.0, max_context=1024, max_output_tokens=512
    )
    turns = generate(config)
    assert turns
    assert all(t.full_prompt_tokens + t.output_tokens <= 1024 for t in turns)
    assert all(t.output_tokens <= 512 and t.prompt_tokens >= 1 for t in turns)
    # Long histories end conversations early, so there are fewer turns than unbounded.
    unbounded = generate(WorkloadConfig(num_conversations=300, arrival_rate=1.0, **UNBOUNDED))
    assert len(turns) < len(unbounded)


def test_message_lengths_follow_the_configured_means() -> None:
    turns = generate(WorkloadConfig(num_conversations=3000, arrival_rate=1.0, **UNBOUNDED))
    assert statistics.mean(t.prompt_tokens for t in turns) == pytest.approx(94.5, rel=0.1)
    assert statistics.mean(t.output_tokens for t in turns) == pytest.approx(348.5, rel=0.1)
    # Heavy-tailed: the median message is well below the mean.
    assert statistics.median(t.prompt_tokens for t in turns) < 0.7 * 94.5


def test_lognormal_is_parameterised_by_its_mean() -> None:
    rng = random.Random(1)
    samples = [LogNormal(mean=100.0, sigma=1.0).sample(rng) for _ in range(20000)]
    assert statistics.mean(samples) == pytest.approx(100.0, rel=0.05)


def test_clients_are_assigned_by_weight() -> None:
    uniform = generate(WorkloadConfig(num_conversations=400, arrival_rate=1.0, num_clients=4))
    assert {t.client_id for t in uniform} == {0, 1, 2, 3}
    skewed = WorkloadConfig(
        num_conversations=100, arrival_rate=1.0, num_clients=3, client_weights=(0.0, 1.0, 0.0)
    )
    assert {t.client_id for t in generate(skewed)} == {1}
    with pytest.raises(ValueError, match="client_weights"):
        WorkloadConfig(num_conversations=1, arrival_rate=1.0, num_clients=2, client_weights=(1,))


def test_resolve_arrival() -> None:
    first = TurnSpec(0, 0, 2.0, 10, 20, 0, 0)
    later = TurnSpec(0, 1, None, 10, 20, 0, 30, think_time_s=1.5)
    assert first.resolve_arrival(None) == 2.0
    assert later.resolve_arrival(10.0) == 11.5
    with pytest.raises(ValueError, match="turn 1"):
        later.resolve_arrival(None)


def test_trace_round_trip(tmp_path: Path) -> None:
    turns = generate(WorkloadConfig(num_conversations=40, arrival_rate=1.0, num_clients=3))
    path = tmp_path / "trace.jsonl"
    write_trace(path, turns)
    assert load_trace(path) == turns


def test_trace_with_absolute_arrivals_derives_history(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    rows = [
        {"conversation_id": 5, "turn": 1, "arrival_s": 9.0, "prompt_tokens": 7,
         "output_tokens": 8, "client_id": 2},
        {"conversation_id": 5, "turn": 0, "arrival_s": 1.0, "prompt_tokens": 3,
         "output_tokens": 4, "client_id": 2},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_trace(path)
    assert [(t.turn, t.arrival_s, t.history_tokens) for t in loaded] == [(1, 9.0, 7), (0, 1.0, 0)]


GOOD = {"conversation_id": 0, "turn": 0, "arrival_s": 0.5, "prompt_tokens": 3,
        "output_tokens": 4, "client_id": 0}


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"conversation_id": 1, "turn": 0', r":2: not valid JSON"),
        ("[1, 2]", r":2: expected a JSON object"),
        (json.dumps({**GOOD, "conversation_id": 1, "prompt_tokens": 0}),
         r":2: field 'prompt_tokens' must be an integer >= 1, got 0"),
        (json.dumps({**GOOD, "conversation_id": 1, "output_tokens": "9"}),
         r":2: field 'output_tokens' must be an integer >= 1, got '9'"),
        (json.dumps({**GOOD, "conversation_id": 1, "client_id": True}),
         r":2: field 'client_id' must be an integer"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "turn"}), r":2: missing field 'turn'"),
        (json.dumps({**GOOD, "conversation_id": 1, "prompt_token": 3}),
         r":2: unknown field 'prompt_token'"),
        (json.dumps({**GOOD, "conversation_id": 1, "arrival_s": None}),
         r":2: field 'arrival_s' must be a number for turn 0"),
        (json.dumps({**GOOD, "conversation_id": 1, "arrival_s": -1}),
         r":2: field 'arrival_s' must be >= 0"),
        (json.dumps({**GOOD, "turn": 1, "arrival_s": None, "think_time_s": "soon"}),
         r":2: field 'think_time_s' must be a finite number"),
        (json.dumps(GOOD), r":2: conversation 0 turn 0 already appears on line 1"),
        (json.dumps({**GOOD, "turn": 2}), r"conversation 0 has turns \[0, 2\]; turn 1 is missing"),
        (json.dumps({**GOOD, "turn": 1, "client_id": 4}),
         r":2: field 'client_id' is 4 but conversation 0 belongs to client 0 \(line 1\)"),
    ],
)
def test_bad_traces_name_the_line_and_field(tmp_path: Path, second_line: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + second_line + "\n")
    with pytest.raises(TraceError, match=message):
        load_trace(path)
