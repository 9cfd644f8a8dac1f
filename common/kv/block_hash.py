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

HASH_BYTES = 16  # each block hash


def root_hash(fingerprint: str) -> bytes:
    seed = b"fastswitch/kv/v1:" + fingerprint.encode()
    return hashlib.blake2b(seed, digest_size=HASH_BYTES).digest()


def block_hashes(tokens: Sequence[int], block_size: int, fingerprint: str) -> list[bytes]:
    """One hash per block of `tokens`, the last one possibly over a partial block."""
    return TokenChain(block_size, fingerprint).hashes(tokens)


class TokenChain:
    """The hash chain of one append-only token list (a request's prompt plus output), kept
    between calls so that a growing request is hashed once per block, not once per step."""

    def __init__(self, block_size: int, fingerprint: str) -> None:
        self.block_size = block_size
        self._root = root_hash(fingerprint)
        self._full: list[bytes] = []

    def hashes(self, tokens: Sequence[int]) -> list[bytes]:
        """`block_hashes(tokens)`; `tokens` must extend the lists hashed before."""
        bs = self.block_size
        num_full = len(tokens) // bs
        for i in range(len(self._full), num_full):
            self._full.append(_hash_block(self._parent(i), tokens[i * bs : (i + 1) * bs]))
        chain = self._full[:num_full]
        if len(tokens) % bs:
            chain.append(_hash_block(self._parent(num_full), tokens[num_full * bs :]))
        return chain

    def _parent(self, i: int) -> bytes:
        return self._full[i - 1] if i else self._root


def _hash_block(parent: bytes, block: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=HASH_BYTES)
    h.update(pack(f"<I{len(block)}q", len(block), *block))
    return h.digest()


def matching_blocks(held: Sequence[bytes], wanted: Sequence[bytes]) -> int:
    """How many leading blocks two chains share: the prefix whose KV the one holds for
    the other."""
    n = 0
    for a, b in zip(held, wanted, strict=False):
        if a != b:
            break
        n += 1
    return n


def tokens_in_blocks(num_blocks: int, num_tokens: int, block_size: int) -> int:
    """Tokens covered by the first `num_blocks` blocks of a `num_tokens`-token chain."""
    return min(num_blocks * block_size, num_tokens)
