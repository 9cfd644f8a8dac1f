"""A digest of weight tensors: with the config, it names the KV bytes a model produces."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Covers names, dtypes, shapes and bytes, so a cast or a reshaped tensor changes it too."""
    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
