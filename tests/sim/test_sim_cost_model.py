from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.sim.copy_engine import (
    KvLayout,
    LinkModel,
    Transfer,
    extent_transfer,
)
from benchmarks.sim.cost_model import StepCostModel
from benchmarks.sim.hardware import (
    A10,
    A100_80GB,
    LLAMA3_8B,
    QWEN25_32B,
    Deployment,
    DoesNotFit,
)

KIB = 1024
MIB = 1024 * KIB


def test_kv_bytes_per_token_follow_the_geometry() -> None:
    assert LLAMA3_8B.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert QWEN25_32B.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    assert LLAMA3_8B.kv_bytes_per_block(16) == 16 * 131072


def test_parameter_counts_match_the_published_sizes() -> None:
    assert LLAMA3_8B.num_params == pytest.approx(8.03e9, rel=0.01)
    assert QWEN25_32B.num_params == pytest.approx(32.5e9, rel=0.02)


def test_a10_holds_less_kv_than_a100() -> None:
    a10 = Deployment(A10, LLAMA3_8B)
    a100 = Deployment(A100_80GB, LLAMA3_8B)
    assert 0 < a10.kv_capacity_tokens < a100.kv_capacity_tokens
    assert a10.kv_capacity_tokens == a10.num_gpu_blocks * 16
    budget = 0.9 * A10.memory_bytes
    assert a10.kv_capacity_bytes == pytest.approx(
        budget - LLAMA3_8B.weight_bytes - a10.activation_reserve_bytes, abs=1
    )


def test_qwen_32b_fits_a100_but_is_rejected_on_a10() -> None:
    assert Deployment(A100_80GB, QWEN25_32B).num_gpu_blocks > 0
    with pytest.raises(DoesNotFit, match=r"Qwen-2\.5-32B does not fit on A10 .*weights 61\.0 GiB"):
        Deployment(A10, QWEN25_32B)


def test_deployment_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Deployment(A10, LLAMA3_8B, gpu_memory_utilization=0.0)
    with pytest.raises(ValueError, match="block_size"):
        Deployment(A10, LLAMA3_8B, block_size=0)


@pytest.mark.parametrize("gpu", [A10, A100_80GB])
def test_decode_is_memory_bound_and_long_prefill_compute_bound(gpu) -> None:
    model = StepCostModel(Deployment(gpu, LLAMA3_8B))
    decode = model.cost([(1000, 1)] * 32)
    assert not decode.gemm.compute_bound
    assert not decode.attention.compute_bound
    prefill = model.cost([(0, 2048)])
    assert prefill.gemm.compute_bound
    assert prefill.attention.compute_bound
    assert prefill.seconds > decode.seconds


def test_decode_reads_the_weights_and_each_sequences_kv() -> None:
    deployment = Deployment(A100_80GB, LLAMA3_8B)
    cost = StepCostModel(deployment).cost([(100, 1), (300, 1)])
    lm_head_bytes = LLAMA3_8B.lm_head_params * 2
    assert cost.gemm.bytes == LLAMA3_8B.weight_bytes - lm_head_bytes
    assert cost.attention.bytes == (101 + 301) * LLAMA3_8B.kv_bytes_per_token


def test_step_time_grows_with_context_batch_and_model() -> None:
    llama = StepCostModel(Deployment(A100_80GB, LLAMA3_8B))
    qwen = StepCostModel(Deployment(A100_80GB, QWEN25_32B))
    assert llama.step_time_s([(4000, 1)] * 16) > llama.step_time_s([(100, 1)] * 16)
    assert llama.step_time_s([(100, 1)] * 64) > llama.step_time_s([(100, 1)] * 16)
    assert qwen.step_time_s([(100, 1)]) > llama.step_time_s([(100, 1)])
    a10 = StepCostModel(Deployment(A10, LLAMA3_8B))
    assert a10.step_time_s([(100, 1)]) > llama.step_time_s([(100, 1)])


def test_step_overhead_is_added_once() -> None:
    deployment = Deployment(A10, LLAMA3_8B)
    bare = StepCostModel(deployment, step_overhead_s=0.0)
    loaded = StepCostModel(deployment, step_overhead_s=0.01)
    batch = [(10, 5), (20, 1)]
    assert loaded.step_time_s(batch) == pytest.approx(bare.step_time_s(batch) + 0.01)


@pytest.mark.parametrize(
    ("batch", "message"),
    [([], "at least one"), ([(-1, 1)], "context_len"), ([(5, 0)], "new_tokens"),
     ([(8000, 500)], "exceeds")],
)
def test_step_cost_rejects_bad_batches(batch, message) -> None:
    with pytest.raises(ValueError, match=message):
        StepCostModel(Deployment(A10, LLAMA3_8B)).cost(batch)


@given(st.integers(1, 1 << 30), st.integers(1, 1 << 30))
def test_copy_time_is_monotonic_in_bytes(a: int, b: int) -> None:
    link = LinkModel()
    small, large = sorted((a, b))
    assert link.copy_time_s(small) <= link.copy_time_s(large)


def test_small_copies_are_overhead_bound_and_large_ones_bandwidth_bound() -> None:
    link = LinkModel()
    small_bw = 32 * KIB / link.copy_time_s(32 * KIB)
    large_bw = 4 * MIB / link.copy_time_s(4 * MIB)
    assert small_bw < 0.3 * link.bandwidth_bytes_per_s
    assert large_bw > 0.95 * link.bandwidth_bytes_per_s


def test_baseline_issues_a_copy_per_block_layer_and_kv() -> None:
    baseline = extent_transfer(LLAMA3_8B, 16, KvLayout.LAYER_MAJOR, 5)
    assert baseline == Transfer(num_copies=5 * 32 * 2, bytes_per_copy=16 * 8 * 128 * 2)
    fastswitch = extent_transfer(LLAMA3_8B, 16, KvLayout.BLOCK_MAJOR, 5)
    assert fastswitch == Transfer(num_copies=1, bytes_per_copy=5 * 16 * 131072)
    assert baseline.total_bytes == fastswitch.total_bytes
    link = LinkModel()
    assert link.transfer_time_s(baseline) > link.transfer_time_s(fastswitch)


def test_link_and_transfer_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        LinkModel(bandwidth_bytes_per_s=0)
    with pytest.raises(ValueError):
        Transfer(0, 10)
    with pytest.raises(ValueError):
        extent_transfer(LLAMA3_8B, 16, KvLayout.BLOCK_MAJOR, 0)
