"""The architecture hyper-parameters of a Llama/Qwen2 decoder, read from an HF `config.json`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class ConfigError(ValueError):
    """The config describes a model this decoder cannot run faithfully."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2 always has it)
    o_proj_bias: bool  # HF Llama's `attention_bias` also covers o_proj; Qwen2's never does
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    @property
    def queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        _reject_unsupported(raw)
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        is_qwen2 = model_type == "qwen2"
        llama_bias = bool(raw.get("attention_bias", False))
        eos = raw.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", True)) if is_qwen2 else llama_bias,
            o_proj_bias=False if is_qwen2 else llama_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(json.loads(Path(path).read_text()))

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` that `from_hf` reads back to an equal config."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        raw = {key: value for key, value in asdict(self).items() if key != "eos_token_ids"}
        del raw["o_proj_bias"]
        if self.model_type == "qwen2":
            del raw["mlp_bias"]
        elif self.o_proj_bias != self.attention_bias:
            raise ConfigError("HF Llama configs cannot express o_proj_bias != attention_bias")
        eos = list(self.eos_token_ids)
        raw["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        raw["architectures"] = [arch]
        raw["hidden_act"] = "silu"
        return raw

    def fingerprint(self, weights_digest: str) -> str:
        """Identifies the KV a model produces: equal fingerprints mean reusable KV bytes."""
        canonical = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(f"{canonical}\n{weights_digest}".encode()).hexdigest()


def _reject_unsupported(raw: dict[str, Any]) -> None:
    """Features that would silently change the math if ignored."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only silu)")
    scaling = raw.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ConfigError(f"rope_scaling {scaling!r} is not supported")
    if raw.get("use_sliding_window"):
        raise ConfigError("sliding-window attention is not supported")
