"""The conversation key a chat request's host KV is kept under, from its messages alone.

The scheduler keeps host KV per conversation key, and within one key the store returns the
longest prefix whose token hash chain matches the new prompt. An OpenAI client sends no
conversation id: it resends the whole history each turn. The key is therefore derived from
what every turn of a conversation starts with, the messages up to and including the first
user message, and from who asks (the bearer key and the fairness principal), so that a
resent history lands on the key of its previous turns and tenants never share one.

Two conversations that open with the same messages share a key; that is safe (the hash
chain decides what is reused) and at worst each one's KV replaces the other's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

PREFIX = "http:"


def conversation_key(
    messages: Sequence[tuple[str, str]], *, client_id: str, authorization: str
) -> str:
    """`http:` and a hash of (authorization, client_id, the opening messages)."""
    first_user = next((i for i, (role, _) in enumerate(messages) if role == "user"),
                      len(messages) - 1)
    opening = [list(m) for m in messages[: first_user + 1]]
    material = json.dumps([authorization, client_id, opening], ensure_ascii=False)
    return PREFIX + hashlib.blake2b(material.encode(), digest_size=16).hexdigest()
