"""Checkpoint folders written once into a cache and reused: the tiny model, SmolLM2.

Concurrent builders (several executors or test workers starting at once) take turns on a
lock file beside the target, so only the first builds and the others find its folder. The
build goes to a scratch folder that is renamed into place, so a crash never leaves a
half-written target.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_cache() -> Path:
    return Path(os.environ.get("FASTSWITCH_CACHE", Path.home() / ".cache" / "fastswitch"))


def build_once(target: Path, build: Callable[[Path], Path]) -> Path:
    """`target`, built by `build(scratch_dir)` (which returns the folder it wrote) unless a
    finished one, with its config.json, is already there. Blocks while another process
    builds the same target."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / "config.json").is_file():  # built while we waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as scratch:
            build(Path(scratch) / "ckpt").rename(target)
    return target
