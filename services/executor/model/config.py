"""The architecture hyper-parameters of a Llama/Qwen2 decoder, read from an HF `config.json`.

Reads what transformers 4 and 5 write, and reads it as HF does: RoPE in either form (see
`read_rope`), `dtype` or `torch_dtype`, an `eos_token_id` that may be a list. Anything that
would change the math if ignored is refused with `ConfigError`, never skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.executor.options import DTYPE_NAMES

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
DEFAULT_ROPE_THETA = 10000.0  # HF's when a config names none
# The parameters each RoPE type's frequencies depend on, as `RopeScaling` fields.
ROPE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "truncate"),
}  # fmt: skip


class ConfigError(ValueError):
    """The config describes a model this decoder cannot run faithfully."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """A RoPE type and the parameters its frequencies depend on, HF's defaults resolved.

    Fields the type does not use (see `ROPE_PARAMETERS`) keep their defaults, so two configs
    that differ only in parameters HF ignores are equal.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    attention_factor: float = 1.0  # multiplies cos and sin (HF's attention_scaling)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def to_hf(self) -> dict[str, Any]:
        """The `rope_scaling` dict that `read_rope` reads back to this value."""
        used = ROPE_PARAMETERS[self.rope_type]
        return {"rope_type": self.rope_type} | {key: getattr(self, key) for key in used}


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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    dtype: str | None = None  # the checkpoint's own; None: it names none

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
    def from_hf(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        """`raw`: a `config.json`; `generation`: its `generation_config.json`, whose EOS ids
        are added after the config's (in order, without repeats)."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        _reject_unsupported(raw)
        hidden = raw["hidden_size"]
        heads = raw["num_attention_heads"]
        is_qwen2 = model_type == "qwen2"
        llama_bias = bool(raw.get("attention_bias", False))
        rope_theta, rope_scaling = read_rope(raw)
        eos = _eos_ids(raw) + _eos_ids(generation or {})
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
            rope_theta=rope_theta,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", True)) if is_qwen2 else llama_bias,
            o_proj_bias=False if is_qwen2 else llama_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            rope_scaling=rope_scaling,
            dtype=_dtype(raw),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(json.loads(Path(path).read_text()))

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` that `from_hf` reads back to an equal config."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        raw = asdict(self)
        for key in ("eos_token_ids", "o_proj_bias", "rope_scaling", "dtype"):
            del raw[key]
        if self.model_type == "qwen2":
            del raw["mlp_bias"]
        elif self.o_proj_bias != self.attention_bias:
            raise ConfigError("HF Llama configs cannot express o_proj_bias != attention_bias")
        eos = list(self.eos_token_ids)
        raw["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if self.rope_scaling.rope_type != "default":
            raw["rope_scaling"] = self.rope_scaling.to_hf()
        if self.dtype is not None:
            raw["torch_dtype"] = self.dtype  # transformers 5 reads it too
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
    if raw.get("use_sliding_window"):
        raise ConfigError("sliding-window attention is not supported")


def read_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) of a `config.json`, resolved as transformers 5 resolves them.

    transformers 4 writes `rope_theta` at the top level and scaling in `rope_scaling` (type
    under `type` or `rope_type`); transformers 5 writes `rope_parameters` holding
    `rope_theta`, `rope_type` and the type's parameters. When both dicts are present
    `rope_scaling` wins, and a `rope_theta` inside it wins over the top-level one.
    """
    params: dict[str, Any] = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_PARAMETERS:
        raise ConfigError(
            f"RoPE type {rope_type!r} is not supported (only {', '.join(ROPE_PARAMETERS)})"
        )
    partial = params.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ConfigError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, RopeScaling()

    def need(key: str) -> float:
        if params.get(key) is None:
            raise ConfigError(f"RoPE type {rope_type!r} needs {key!r}")
        return float(params[key])

    factor = need("factor")
    if rope_type in ("linear", "dynamic"):
        return theta, RopeScaling(rope_type, factor)
    # HF prefers a top-level original_max_position_embeddings, where Phi3 writes it.
    original = int(
        raw.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or raw["max_position_embeddings"]
    )
    if rope_type == "llama3":
        return theta, RopeScaling(
            rope_type,
            factor,
            original,
            low_freq_factor=need("low_freq_factor"),
            high_freq_factor=need("high_freq_factor"),
        )
    return theta, RopeScaling(
        rope_type,
        factor,
        original,
        attention_factor=_yarn_attention_factor(factor, params),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
    )


def _yarn_attention_factor(factor: float, params: dict[str, Any]) -> float:
    """The given `attention_factor`, else HF's from `factor`, `mscale` and `mscale_all_dim`."""
    given = params.get("attention_factor")
    if given is not None:
        return float(given)

    def mscale_of(scale: float, mscale: float = 1) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
    return mscale_of(factor)


def _eos_ids(raw: dict[str, Any]) -> list[int]:
    eos = raw.get("eos_token_id")
    return list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])


def _dtype(raw: dict[str, Any]) -> str | None:
    """transformers 5's `dtype`, else transformers 4's `torch_dtype`."""
    name = raw.get("dtype") or raw.get("torch_dtype")
    if name is not None and name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is not one of {DTYPE_NAMES}")
    return name
