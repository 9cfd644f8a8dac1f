"""Chained content hashes of token blocks: the key that makes reused KV provably current.

Block i's hash covers the model fingerprint and every token up to the end of block i, so
two chains agree on block i exactly when the model and the whole prefix agree. A trailing
partial block gets a hash too (its length is hashed), which lets a swapped-out request
resume exactly; a longer prompt never matches it, so only full blocks are shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from struct import pack


def root_hash(fingerprint: str) -> bytes:
    return hashlib.blake2b(b"fastswitch/kv/v1:" + fingerprint.encode(), digest_size=16).digest()


def block_hashes(tokens: Sequence[int], block_size: int, fingerprint: str) -> list[bytes]:
    """One hash per block of `tokens`, the last one possibly over a partial block."""
    parent = root_hash(fingerprint)
    chain: list[bytes] = []
    for start in range(0, len(tokens), block_size):
        block = tokens[start : start + block_size]
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(pack(f"<I{len(block)}q", len(block), *block))
        parent = h.digest()
        chain.append(parent)
    return chain


def tokens_in_blocks(num_blocks: int, num_tokens: int, block_size: int) -> int:
    """Tokens covered by the first `num_blocks` blocks of a `num_tokens`-token chain."""
    return min(num_blocks * block_size, num_tokens)
