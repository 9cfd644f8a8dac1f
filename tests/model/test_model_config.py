"""HF config parsing and the KV cache geometry derived from it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.executor.model import ConfigError, KVCacheGeometry, ModelConfig


def hf(model_type: str, **overrides: Any) -> dict[str, Any]:
    base = {
        "model_type": model_type,
        "vocab_size": 1000,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 2048,
        "eos_token_id": 7,
    }
    return base | overrides


def test_qwen2_has_qkv_bias_unless_its_config_says_otherwise() -> None:
    qwen = ModelConfig.from_hf(hf("qwen2"))
    assert (qwen.attention_bias, qwen.o_proj_bias) == (True, False)
    assert not ModelConfig.from_hf(hf("qwen2", attention_bias=False)).attention_bias


def test_llama_bias_follows_attention_bias_for_all_projections() -> None:
    plain = ModelConfig.from_hf(hf("llama"))
    assert (plain.attention_bias, plain.o_proj_bias) == (False, False)
    biased = ModelConfig.from_hf(hf("llama", attention_bias=True))
    assert (biased.attention_bias, biased.o_proj_bias) == (True, True)


def test_defaults_and_derived_fields() -> None:
    config = ModelConfig.from_hf(hf("llama", num_key_value_heads=None))
    assert config.head_dim == 16
    assert config.num_key_value_heads == 8
    assert config.tie_word_embeddings is False
    assert config.eos_token_ids == (7,)
    assert ModelConfig.from_hf(hf("llama", head_dim=32)).head_dim == 32
    assert ModelConfig.from_hf(hf("llama", eos_token_id=[7, 9])).eos_token_ids == (7, 9)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_to_hf_round_trips(model_type: str) -> None:
    config = ModelConfig.from_hf(hf(model_type, tie_word_embeddings=True, dtype="bfloat16"))
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, "'longrope'"),
        ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, "'su'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
        ({"rope_scaling": {"type": "linear"}}, "needs 'factor'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"dtype": "float8_e4m3fn"}, "dtype 'float8_e4m3fn'"),
        ({"num_key_value_heads": 3}, "multiple"),
    ],
)
def test_unsupported_configs_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf("llama") | overrides)


def test_fingerprint_depends_on_config_and_weights() -> None:
    config = ModelConfig.from_hf(hf("llama"))
    other_theta = ModelConfig.from_hf(hf("llama", rope_theta=1e4))
    assert config.fingerprint("w") == ModelConfig.from_hf(hf("llama")).fingerprint("w")
    assert config.fingerprint("w") != config.fingerprint("v")
    assert config.fingerprint("w") != other_theta.fingerprint("w")


def test_geometry_is_block_major_and_contiguous() -> None:
    config = ModelConfig.from_hf(hf("llama"))
    geometry = KVCacheGeometry.for_model(config, num_blocks=10, block_size=4, dtype=torch.float16)
    assert geometry.shape == (10, 3, 2, 4, 2, 16)
    assert geometry.block_bytes == 3 * 2 * 4 * 2 * 16 * 2
    cache = geometry.allocate()
    assert KVCacheGeometry.of(cache) == geometry
    # One block is one contiguous byte range across all layers, K and V.
    assert cache.stride(0) * cache.element_size() == geometry.block_bytes
    assert cache[3:6].is_contiguous()
    layer = cache[:, 1]
    assert layer.shape == (10, 2, 4, 2, 16)
    layer[2, 0, 1] = 1.0
    assert cache[2, 1, 0, 1].eq(1).all()


def test_geometry_rejects_non_caches() -> None:
    with pytest.raises(ValueError, match="block-major"):
        KVCacheGeometry.of(torch.zeros(4, 2, 3, 4, 2, 16))
    with pytest.raises(ValueError, match="contiguous"):
        KVCacheGeometry.of(torch.zeros(4, 2, 2, 4, 16, 2).transpose(4, 5))
