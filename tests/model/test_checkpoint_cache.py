"""`build_once`: one build per target however many builders race, and no half-built target."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from common.checkpoint_cache import build_once


def test_concurrent_builders_build_once_and_all_get_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"
    started, release = threading.Event(), threading.Event()
    builds: list[Path] = []

    def build(out: Path) -> Path:
        builds.append(out)
        started.set()
        assert release.wait(10)
        out.mkdir()
        (out / "config.json").write_text("{}")
        return out

    results: list[Path] = []
    first = threading.Thread(target=lambda: results.append(build_once(target, build)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(build_once(target, build)))
    second.start()
    second.join(0.2)  # the second builder is now waiting for the first (or done, wrongly)
    release.set()
    first.join(10)
    second.join(10)
    assert results == [target, target]
    assert len(builds) == 1
    assert (target / "config.json").read_text() == "{}"


def test_a_failed_build_leaves_nothing_and_the_next_one_builds(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def broken(out: Path) -> Path:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        build_once(target, broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]

    def build(out: Path) -> Path:
        out.mkdir()
        (out / "config.json").write_text("{}")
        return out

    assert build_once(target, build) == target
