"""Our RoPE tables against HF transformers' `LlamaRotaryEmbedding`, for every config form and
RoPE type we accept: the same dict goes to `ModelConfig.from_hf` and to `LlamaConfig`."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from services.executor.model import ConfigError, ModelConfig
from services.executor.model.layers import RotaryTable

MAX_POSITIONS = 4096
BASE = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 512}  # fmt: skip
FORMS: dict[str, dict[str, Any]] = {
    "t4 top-level rope_theta": {"rope_theta": 500000.0},
    "no rope_theta: HF's 10000": {},
    "t5 rope_parameters": {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}},
    "t5 rope_parameters wins over top level": {
        "rope_theta": 7.0, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}},
    "rope_scaling with type": {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4}},
    "rope_scaling with rope_type": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "rope_scaling wins over rope_parameters": {
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}},
    "t5 linear": {"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 3.0}},
    "dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 3.7}},
    "llama3 t4": {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},
    "llama3 t5": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}},
    "llama3 without original: max_position_embeddings": {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1, "high_freq_factor": 4}},
    "yarn (Qwen2.5 style)": {"rope_theta": 1e6, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
    "yarn with mscale": {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "mscale": 0.707,
        "mscale_all_dim": 1.0, "original_max_position_embeddings": 512, "beta_fast": 16}},
    "yarn with attention_factor, untruncated": {"rope_scaling": {
        "rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25, "truncate": False,
        "beta_slow": 2.0, "original_max_position_embeddings": 2048}},
    "yarn, top-level original_max_position_embeddings": {
        "original_max_position_embeddings": 256,
        "rope_scaling": {"rope_type": "yarn", "factor": 16.0}},
}  # fmt: skip


def hf_tables(raw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**copy.deepcopy(raw))  # HF writes defaults into the dicts it gets
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(MAX_POSITIONS)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0], sin[0]


@pytest.mark.parametrize("extra", FORMS.values(), ids=FORMS.keys())
def test_tables_equal_hf_rotary_embedding(extra: dict[str, Any]) -> None:
    raw = BASE | extra
    config = ModelConfig.from_hf(copy.deepcopy(raw))
    ours = RotaryTable(config)
    want_cos, want_sin = hf_tables(raw)
    torch.testing.assert_close(ours.cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.sin, want_sin, rtol=0, atol=1e-6)
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_scaling_changes_the_tables_and_the_fingerprint() -> None:
    """A guard on the test above: every type really scales something at these settings."""
    plain = ModelConfig.from_hf(BASE)
    for name in ("t5 linear", "llama3 t5", "yarn with mscale", "dynamic"):
        config = ModelConfig.from_hf(BASE | copy.deepcopy(FORMS[name]))
        assert config.fingerprint("w") != plain.fingerprint("w"), name
        if name != "dynamic":  # equal to default below max_position_embeddings, as in HF
            assert not torch.allclose(RotaryTable(config).cos, RotaryTable(plain).cos), name


@pytest.mark.parametrize("rope_type", ["longrope", "proportional", "mrope"])
def test_unknown_types_are_refused_by_name(rope_type: str) -> None:
    for extra in ({"rope_scaling": {"type": rope_type, "factor": 2.0}},
                  {"rope_parameters": {"rope_type": rope_type, "rope_theta": 1e4}}):  # fmt: skip
        with pytest.raises(ConfigError, match=f"RoPE type '{rope_type}' is not supported"):
            ModelConfig.from_hf(BASE | extra)
