"""The swap-copy benchmark on a tiny geometry (CPU backend): its JSON, its copy counts per way
and direction, and its self-check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.swap_copy import METHODS, Method, measure

REPO = Path(__file__).resolve().parents[2]
LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
TOKENS, GROUP, REPEATS = 40, 4, 2  # 10 blocks in groups of 4, 4 and 2


def test_the_script_writes_both_directions_four_ways(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "swap.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/swap_copy.py",
            *("--tokens", str(TOKENS), "--layers", str(LAYERS), "--group", str(GROUP)),
            *("--block-size", str(BLOCK_SIZE), "--kv-heads", str(KV_HEADS)),
            *("--head-dim", str(HEAD_DIM), "--repeats", str(REPEATS), "--json", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.read_text())

    blocks = TOKENS // BLOCK_SIZE
    assert result["backend"] == "cpu"
    assert result["bytes"] == TOKENS * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # fp16
    assert set(result["directions"]) == {"out", "in"}
    for direction in result["directions"].values():
        assert {name: m["copies"] for name, m in direction["methods"].items()} == {
            "per_block": blocks * LAYERS * 2,
            "block_major": blocks,
            "group": 3,
            "memcpy": 1,
        }
        for name in METHODS:
            method = direction["methods"][name]
            assert len(method["seconds"]) == REPEATS
            assert direction[f"{name}_gbps"] == pytest.approx(method["median_gbps"])
            assert 0 < method["median_gbps"] <= method["best_gbps"]
        for other in ("per_block", "block_major", "memcpy"):
            assert direction[f"group_over_{other}"] == pytest.approx(
                direction["group_gbps"] / direction[f"{other}_gbps"]
            )
    assert f"repeat {REPEATS}/{REPEATS}" in done.stderr
    assert "swap-out" in done.stdout and "swap-in" in done.stdout
    assert "group/block_major" in done.stdout


def test_a_method_that_copies_wrong_bytes_fails_the_run() -> None:
    src, dst = torch.arange(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)

    def copy_all_but_the_last_byte() -> None:
        dst[:-1].copy_(src[:-1])

    sloppy = Method("sloppy", 1, copy_all_but_the_last_byte, lambda: torch.equal(dst, src))
    with pytest.raises(AssertionError, match="sloppy copied the wrong bytes"):
        measure([sloppy], repeats=1)
