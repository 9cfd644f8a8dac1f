"""The store's own failures; the reuse index's (`common.kv.reuse_index`) are the others."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The call is malformed or names something this store does not hold."""


class IndexUnavailable(Exception):
    """The shared index (Redis) cannot be reached; the call changed nothing that others see."""
