"""Shared-memory segments between processes on one host: the host KV arena (no torch)."""
