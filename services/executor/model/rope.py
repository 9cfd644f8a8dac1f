"""Rotary frequencies as HF transformers' `modeling_rope_utils` computes them.

Each function repeats HF's float32 operations in HF's order, so our cos/sin tables match
`LlamaRotaryEmbedding`'s to the last bit or nearly. The parameters come from a
`RopeScaling` that `config.read_rope` resolved the way HF resolves them.

`dynamic` (NTK) is exact: HF recomputes its frequencies only once a sequence reaches
`max_position_embeddings`, and the decoder refuses positions from there on, so for every
position it accepts HF uses the frequencies computed at init, which are the ones here.
"""

from __future__ import annotations

import math

import torch

from services.executor.model.config import RopeScaling


def rope_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling, max_positions: int
) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies `[head_dim / 2]`, and the factor HF multiplies cos and
    sin by (its `attention_scaling`: yarn's attention factor, 1 for the other types)."""
    kind = scaling.rope_type
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling), scaling.attention_factor
    if kind == "dynamic":
        # HF's formula at its init-time seq_len = max_positions: theta, up to rounding.
        factor = scaling.factor
        ratio = factor * max_positions / max_positions - (factor - 1)
        theta = theta * ratio ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if kind == "linear":
        inv_freq /= scaling.factor
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    return inv_freq, scaling.attention_factor


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = context / low, context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Interpolated (divided by `factor`) below the beta_slow rotation count, extrapolated
    (kept) above beta_fast, a linear ramp between."""
    context = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_share = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    return interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share
