"""The device KV cache: one contiguous block-major tensor, so a run of blocks is one byte range.

Layout `[num_blocks, num_layers, 2 (K/V), block_size, kv_heads, head_dim]`: everything a
block holds, for every layer, is contiguous, and a swap of a block run is a single copy.
Attention for layer `l` reads the strided view `cache[:, l]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.executor.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class KVCacheGeometry:
    num_blocks: int
    num_layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
    ) -> KVCacheGeometry:
        return cls(
            num_blocks=num_blocks,
            num_layers=config.num_hidden_layers,
            block_size=block_size,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=dtype,
        )

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.kv_heads, self.head_dim)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, *self.block_shape)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers: the stride between consecutive blocks."""
        elements = 1
        for dim in self.block_shape:
            elements *= dim
        return elements * self.dtype.itemsize

    def allocate(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    @classmethod
    def of(cls, cache: torch.Tensor) -> KVCacheGeometry:
        """The geometry of an existing cache tensor."""
        if cache.dim() != 6 or cache.shape[2] != 2:
            raise ValueError(f"not a block-major KV cache: shape {tuple(cache.shape)}")
        if not cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor")
        num_blocks, num_layers, _, block_size, kv_heads, head_dim = cache.shape
        return cls(num_blocks, num_layers, block_size, kv_heads, head_dim, cache.dtype)
