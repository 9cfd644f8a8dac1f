"""Checkpoint folders written once into a cache and reused: the tiny model, SmolLM2.

Concurrent builders (several executors or test workers starting at once) each build into a
scratch folder beside the target and race to an atomic rename; the losers drop theirs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache() -> Path:
    return Path(os.environ.get("FASTSWITCH_CACHE", Path.home() / ".cache" / "fastswitch"))


def build_once(target: Path, build: Callable[[Path], Path]) -> Path:
    """`target`, built by `build(scratch_dir)` (which returns the folder it wrote) unless a
    finished one, with its config.json, is already there."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as scratch:
        written = build(Path(scratch) / "ckpt")
        try:
            written.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    return target
