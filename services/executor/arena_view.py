"""Torch views of a host arena (common/shm/arena.py), through which the executor copies KV."""

from __future__ import annotations

import math

import torch

from common.shm.arena import HostArena


def arena_tensor(
    arena: HostArena, dtype: torch.dtype = torch.uint8, block_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """A zero-copy view `[num_blocks, *block_shape]` of `arena`; default: each block's bytes.

    The tensor keeps the mapping alive (see `HostArena.view`).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if block_shape is None:
        if arena.block_bytes % itemsize:
            raise ValueError(f"block of {arena.block_bytes} bytes is not a whole {dtype}")
        block_shape = (arena.block_bytes // itemsize,)
    elif math.prod(block_shape) * itemsize != arena.block_bytes:
        raise ValueError(f"block shape {block_shape} of {dtype} is not {arena.block_bytes} bytes")
    flat = torch.frombuffer(arena.view(), dtype=dtype, count=arena.nbytes // itemsize)
    return flat.view(arena.num_blocks, *block_shape)
