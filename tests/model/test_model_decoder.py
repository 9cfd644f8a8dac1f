"""The paged decoder: right answers in both modes; with batch invariance on, the same bits under
any chunking, batching, placement; without it, the same answers to float rounding."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.executor.model import (
    DecoderModel,
    KVCacheGeometry,
    SequenceStep,
    load_checkpoint,
)
from services.executor.model.decoder import ROWS_PER_TILE
from services.executor.model.layers import PACKED_HEIGHTS, Projection, packed_height
from services.executor.model.tiny_checkpoint import make_tiny_checkpoint

BLOCK = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), seed=3)


@pytest.fixture(scope="module")
def model(folder: Path) -> DecoderModel:
    """The batch-invariant model: the determinism tests compare bits."""
    return load_checkpoint(folder, batch_invariant=True)[1]


@pytest.fixture(scope="module")
def fast(folder: Path) -> DecoderModel:
    """The same weights on the default, fast path."""
    return load_checkpoint(folder)[1]


def new_cache(model: DecoderModel, num_blocks: int = 64) -> torch.Tensor:
    config = model.config
    return KVCacheGeometry.for_model(
        config, num_blocks=num_blocks, block_size=BLOCK, dtype=model.dtype
    ).allocate()


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefill_in_chunks(
    model: DecoderModel, cache: torch.Tensor, table: list[int], tokens: list[int], sizes: list[int]
) -> torch.Tensor:
    """All positions' logits, prefilling `tokens` in chunks of `sizes` (one step each)."""
    assert sum(sizes) == len(tokens)
    parts, start = [], 0
    for size in sizes:
        step = SequenceStep(table, start, tokens[start : start + size])
        parts.append(model.forward_step(cache, [step], all_positions=True))
        start += size
    return torch.cat(parts)


def decode_greedy(
    model: DecoderModel, cache: torch.Tensor, table: list[int], pos: int, token: int, steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Feeds `token` at `pos`, then each argmax; returns the argmaxes and their logits."""
    tokens, logits_seen = [], []
    for _ in range(steps):
        logits = model.forward_step(cache, [SequenceStep(table, pos, [token])])[0]
        logits_seen.append(logits)
        token = int(logits.argmax())
        tokens.append(token)
        pos += 1
    return tokens, logits_seen


# -- correctness ------------------------------------------------------------------------------


def dense_reference(model: DecoderModel, ids: list[int]) -> torch.Tensor:
    """Textbook causal Llama over the whole sequence, from the state dict: no cache, no tiles."""
    cfg, w = model.config, model.state_dict()
    n, heads, kv_heads, d = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    pos = torch.arange(n, dtype=torch.float64)
    freq = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.outer(pos, freq)
    cos, sin = angle.cos(), angle.sin()

    def rope(x: torch.Tensor) -> torch.Tensor:  # x: [heads, n, d]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        h = norm(x, w[f"{p}.input_layernorm.weight"])
        q = linear(h, f"{p}.self_attn.q_proj").view(n, heads, d).transpose(0, 1)
        k = linear(h, f"{p}.self_attn.k_proj").view(n, kv_heads, d).transpose(0, 1)
        v = linear(h, f"{p}.self_attn.v_proj").view(n, kv_heads, d).transpose(0, 1)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))
        att = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + linear(att.transpose(0, 1).reshape(n, heads * d), f"{p}.self_attn.o_proj")
        h = norm(x, w[f"{p}.post_attention_layernorm.weight"])
        gated = F.silu(linear(h, f"{p}.mlp.gate_proj")) * linear(h, f"{p}.mlp.up_proj")
        x = x + linear(gated, f"{p}.mlp.down_proj")
    return F.linear(norm(x, w["model.norm.weight"]), w["lm_head.weight"])


@pytest.mark.parametrize("batch_invariant", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_paged_forward_matches_a_dense_reference(
    tmp_path: Path, arch: str, batch_invariant: bool
) -> None:
    folder = make_tiny_checkpoint(tmp_path, arch=arch, num_layers=2, hidden=64, heads=4)
    model = load_checkpoint(folder, dtype=torch.float64, batch_invariant=batch_invariant)[1]
    ids = prompt(1, 40)
    cache = new_cache(model)
    table = [9, 3, 17]  # scattered on purpose
    paged = prefill_in_chunks(model, cache, table, ids[:37], [20, 17])
    decoded = [model.forward_step(cache, [SequenceStep(table, p, [ids[p]])]) for p in (37, 38, 39)]
    reference = dense_reference(model, ids)
    torch.testing.assert_close(torch.cat([paged, *decoded]), reference.float(), rtol=0, atol=1e-5)
    assert reference.std() > 0.1  # the comparison is not between two near-constant outputs


# -- determinism ------------------------------------------------------------------------------


def test_chunked_prefill_gives_the_same_logits_as_one_shot(model: DecoderModel) -> None:
    ids = prompt(2, 75)
    table = list(range(5))
    one_shot = prefill_in_chunks(model, new_cache(model), table, ids, [75])
    for sizes in ([13, 1, 30, 31], [1] * 10 + [65], [32, 32, 11], [16, 16, 16, 16, 11]):
        chunked = prefill_in_chunks(model, new_cache(model), table, ids, sizes)
        assert torch.equal(chunked, one_shot), sizes


def test_batch_composition_does_not_change_a_sequences_logits(model: DecoderModel) -> None:
    ids = prompt(3, 50)
    alone = new_cache(model)
    prefill_in_chunks(model, alone, [0, 1, 2, 3], ids[:40], [40])
    expected = model.forward_step(alone, [SequenceStep([0, 1, 2, 3], 40, ids[40:])])

    for others_before, others_after in ((1, 0), (0, 2), (3, 1)):
        cache = new_cache(model)
        prefill_in_chunks(model, cache, [0, 1, 2, 3], ids[:40], [40])
        others = [
            # a mix of prefill chunks and decodes, of sizes that shift the tile boundaries
            SequenceStep([20 + 4 * i, 21 + 4 * i, 22 + 4 * i], 0, prompt(10 + i, 7 + 13 * i))
            for i in range(others_before + others_after)
        ]
        batch = [*others[:others_before], SequenceStep([0, 1, 2, 3], 40, ids[40:])]
        batch += others[others_before:]
        logits = model.forward_step(cache, batch)
        assert torch.equal(logits[others_before], expected[0])


def test_relocated_blocks_continue_bit_identically(model: DecoderModel) -> None:
    """Swap-out/in: the scheduler moves a sequence's KV to other blocks mid-generation."""
    ids = prompt(4, 45)
    table = [0, 1, 2, 3, 4]
    cache = new_cache(model)
    first = int(prefill_in_chunks(model, cache, table, ids, [45])[-1].argmax())
    baseline, baseline_logits = decode_greedy(model, cache, table, 45, first, 30)

    cache = new_cache(model)
    prefill_in_chunks(model, cache, table, ids, [20, 25])
    before, before_logits = decode_greedy(model, cache, table, 45, first, 12)
    moved = [40, 13, 27, 8, 55]
    cache[moved] = cache[table]
    cache[table] = float("nan")  # the old blocks now belong to someone else
    after, after_logits = decode_greedy(model, cache, moved, 57, before[-1], 18)

    assert before + after == baseline
    assert torch.equal(torch.stack(before_logits + after_logits), torch.stack(baseline_logits))
    assert len(set(baseline)) > 3  # a real, varied continuation


def test_recompute_from_scratch_equals_continuing(model: DecoderModel) -> None:
    """Preemption by recompute: drop the KV, prefill prompt + generated tokens, go on."""
    ids = prompt(5, 30)
    table = [0, 1, 2, 3]
    cache = new_cache(model)
    first = int(prefill_in_chunks(model, cache, table, ids, [30])[-1].argmax())
    baseline, baseline_logits = decode_greedy(model, cache, table, 30, first, 25)

    # Preempted after 10 tokens: the KV of the prompt, `first` and 9 generated tokens is lost.
    history = [*ids, first, *baseline[:9]]
    fresh, fresh_table = new_cache(model), [33, 7, 61, 2]
    logits = prefill_in_chunks(model, fresh, fresh_table, history, [17, len(history) - 17])
    assert torch.equal(logits[-1], baseline_logits[9])
    rest, rest_logits = decode_greedy(model, fresh, fresh_table, len(history), baseline[9], 15)

    assert rest == baseline[10:]
    assert torch.equal(torch.stack(rest_logits), torch.stack(baseline_logits[10:]))


# -- the fast path -----------------------------------------------------------------------------

# Float32 rounding between the two modes' summation orders, relative to the logits' spread.
FAST_TOLERANCE = 1e-4


def assert_near(actual: torch.Tensor, expected: torch.Tensor) -> None:
    spread = expected.std().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=FAST_TOLERANCE * spread)


def test_the_fast_path_is_the_default(fast: DecoderModel) -> None:
    assert not fast.batch_invariant
    assert not DecoderModel(fast.config).batch_invariant


def test_cpu_projections_of_4_to_32_rows_multiply_weights_packed_for_their_height(
        tmp_path: Path) -> None:
    """`Projection`: HF's row-major weight stays the parameter (ties and state_dict as they
    were); 4 to 32 rows are padded to a height of 8, 16 or 32 and multiply the weight packed
    for it, packed once and again after the weight changes, to the same values as `F.linear`
    on the weight."""
    _, model = load_checkpoint(make_tiny_checkpoint(tmp_path, arch="qwen2", seed=4))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as Qwen2's are
    assert not [name for name in model.state_dict() if "packed" in name]
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Projection) and q.bias is not None and q.weight.is_contiguous()
    assert [packed_height(rows) for rows in (1, 3, 4, 8, 9, 17, 32, 33)] == [
        None, None, 8, 8, 16, 32, 32, None]
    for rows, heights in ((1, set()), (3, set()), (33, set()), (5, {8}), (32, {8, 32}),
                          (9, {8, 16, 32})):
        assert_same_product(q, rows)
        assert packed_heights(q) == heights  # 1-3 and 33 rows: none
    packed = q.packed_weight(8)
    assert q.packed_weight(8) is packed
    assert_same_product(q, 6, leading=(2, 3))  # any leading shape, as nn.Linear takes
    with torch.no_grad():
        q.weight.mul_(2)  # in place: packed again
    assert_same_product(q, 8)
    assert q.packed_weight(8) is not packed and packed_heights(q) == {8}
    q.weight = torch.nn.Parameter(q.weight.detach() + 1, requires_grad=False)  # another one
    assert_same_product(q, 8)
    threads = torch.get_num_threads()
    try:  # MKL fixes a packed weight's threads: another count packs its own
        torch.set_num_threads(threads + 1)
        assert packed_heights(q) == set()
        assert_same_product(q, 8)
        assert packed_heights(q) == {8} and len(q._packed[0]) == 2
    finally:
        torch.set_num_threads(threads)
    x = torch.ones(8, q.in_features, requires_grad=True)  # gradients wanted: F.linear's
    q(x).sum().backward()
    assert x.grad is not None
    q.weight.requires_grad_(True)
    q(torch.ones(8, q.in_features)).sum().backward()
    assert q.weight.grad is not None
    q.weight.requires_grad_(False)
    assert_same_product(q, 8)
    copied = copy.deepcopy(q)  # without the packed copies, which MKL-DNN cannot copy
    assert copied._packed is None and q._packed is not None
    assert_same_product(copied, 8)
    q.to(torch.float64)  # moved or cast: the copies are dropped
    assert q._packed is None


@pytest.mark.parametrize("invariant", [False, True], ids=["fast", "invariant"])
def test_pack_projections_packs_every_height_the_mode_steps_at(folder: Path, invariant: bool
                                                               ) -> None:
    """After `pack_projections` (as `ExecutorService` runs it) a step packs nothing more:
    the batch-invariant mode's tiles need only their own height, the fast mode all of them;
    in bfloat16 nothing is packed."""
    model = load_checkpoint(folder, batch_invariant=invariant)[1]
    model.pack_projections()
    projections = [m for m in model.modules() if isinstance(m, Projection)]
    heights = {ROWS_PER_TILE} if invariant else set(PACKED_HEIGHTS)

    assert [packed_heights(p) for p in projections] == [heights] * len(projections)
    cache = new_cache(model)
    for rows in (5, 12, 30):  # through heights 8, 16 and 32
        model.forward_step(cache, [SequenceStep(list(range(4)), 0, prompt(rows, rows))])
    assert [packed_heights(p) for p in projections] == [heights] * len(projections)
    model.pack_projections(() if invariant else (8,))  # fewer: 9 rows and more, unpacked
    model.forward_step(cache, [SequenceStep(list(range(4)), 0, prompt(12, 12))])
    assert [packed_heights(p) for p in projections] == [set() if invariant else {8}] * len(
        projections)  # the copies for other heights are not kept either
    bf16 = load_checkpoint(folder, dtype=torch.bfloat16)[1]
    bf16.pack_projections()
    assert not [m for m in bf16.modules() if isinstance(m, Projection) and m._packed]


def packed_heights(projection: Projection) -> set[int]:
    """The heights `projection` has packed its weight for, on this thread's thread count."""
    packed = projection._packed[0] if projection._packed else {}
    return {height for height, threads in packed if threads == torch.get_num_threads()}


def assert_same_product(projection: Projection, rows: int, leading: tuple[int, ...] = ()
                        ) -> None:
    """`projection` on `rows` rows (shaped `leading` where given) gives `F.linear`'s values,
    to float rounding."""
    x = torch.randn(*(leading or (rows,)), projection.in_features,
                    generator=torch.Generator().manual_seed(rows))
    expected = F.linear(x, projection.weight, projection.bias)
    torch.testing.assert_close(projection(x), expected, rtol=0,
                               atol=1e-6 * expected.abs().max().item())


def test_fast_path_matches_the_invariant_path(model: DecoderModel, fast: DecoderModel) -> None:
    """A mixed batch (a chunk after a prefix, a fresh prefill, a decode) and greedy decoding."""
    ids = prompt(6, 60)
    table = [0, 1, 2, 3, 4, 5]
    results = []
    for m in (model, fast):
        cache = new_cache(m)
        prefill_in_chunks(m, cache, table, ids[:33], [20, 13])
        prefill_in_chunks(m, cache, [10, 11], ids[:5], [5])
        mixed = m.forward_step(cache, [
            SequenceStep(table, 33, ids[33:]),
            SequenceStep([20, 21], 0, ids[:19]),
            SequenceStep([10, 11], 5, [ids[5]]),
        ], all_positions=True)
        tokens, logits = decode_greedy(m, cache, table, 60, int(mixed[26].argmax()), 20)
        results.append((mixed, tokens, torch.stack(logits)))
    (want_mixed, want_tokens, want_logits), (mixed, tokens, logits) = results
    assert_near(mixed, want_mixed)
    assert_near(logits, want_logits)
    assert tokens == want_tokens
    assert len(set(want_tokens)) > 3


def test_fast_chunked_prefill_matches_one_shot_to_rounding(fast: DecoderModel) -> None:
    ids = prompt(2, 75)
    table = list(range(5))
    one_shot = prefill_in_chunks(fast, new_cache(fast), table, ids, [75])
    for sizes in ([13, 1, 30, 31], [1] * 10 + [65], [16, 16, 16, 16, 11]):
        assert_near(prefill_in_chunks(fast, new_cache(fast), table, ids, sizes), one_shot)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (SequenceStep([0], 0, []), "no new tokens"),
        (SequenceStep([0], 10, list(range(7))), "cannot hold"),
        (SequenceStep([0, 99], 10, list(range(7))), "outside the cache"),
        (SequenceStep([0], 0, [999]), "outside the vocabulary"),
    ],
)
def test_bad_steps_are_rejected(model: DecoderModel, step: SequenceStep, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.forward_step(new_cache(model), [step])


def test_two_sequences_writing_one_slot_are_rejected(model: DecoderModel) -> None:
    with pytest.raises(ValueError, match="same KV slot"):
        model.forward_step(new_cache(model), [SequenceStep([0], 0, [1]), SequenceStep([0], 0, [2])])


def test_a_cache_for_another_model_is_rejected(model: DecoderModel) -> None:
    wrong = torch.zeros(4, model.config.num_hidden_layers + 1, 2, BLOCK, 2, model.config.head_dim)
    with pytest.raises(ValueError, match="does not fit"):
        model.forward_step(wrong, [SequenceStep([0], 0, [1])])
