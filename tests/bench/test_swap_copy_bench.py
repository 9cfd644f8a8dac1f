"""The swap-copy benchmark on a tiny geometry (CPU backend): its JSON, its copy counts per
method, way and group length, the context-switch ratio, and its self-check."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.swap_copy import RAW_METHODS, Layout, Method, grouped_blocks, measure

REPO = Path(__file__).resolve().parents[2]
LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
TOKENS, GROUPS, REPEATS = 40, (1, 4), 2  # 10 blocks: in groups of 4, 4 and 2 at length 4


def test_the_script_writes_every_way_and_group_length(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "swap.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/swap_copy.py",
            *("--tokens", str(TOKENS), "--layers", str(LAYERS), "--groups", "1,4"),
            *("--headline-group", "4", "--block-size", str(BLOCK_SIZE)),
            *("--kv-heads", str(KV_HEADS), "--head-dim", str(HEAD_DIM)),
            *("--repeats", str(REPEATS), "--json", str(out)),
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
    assert result["groups"] == list(GROUPS)
    assert set(result["directions"]) == {"out", "in", "both"}
    for way, report in result["directions"].items():
        directions = 2 if way == "both" else 1
        assert report["bytes"] == directions * result["bytes"]
        assert {name: m["copies"] for name, m in report["methods"].items()} == {
            "per_block": directions * blocks * LAYERS * 2,
            "block_major": directions * blocks,
            "group_1": directions * blocks,
            "group_4": directions * 3,
            "memcpy": directions,
        }
        for name, method in report["methods"].items():
            assert len(method["seconds"]) == REPEATS
            assert 0 < method["median_gbps"] <= method["best_gbps"]
            if name in RAW_METHODS:
                assert report[f"{name}_gbps"] == pytest.approx(method["median_gbps"])
        for g in ("1", "4"):
            assert report["group_gbps"][g] == pytest.approx(
                report["methods"][f"group_{g}"]["median_gbps"])
            for other in RAW_METHODS:
                assert report[f"group_over_{other}"][g] == pytest.approx(
                    report["group_gbps"][g] / report[f"{other}_gbps"])
    both = result["directions"]["both"]
    assert result["context_switch_ratio"] == pytest.approx(
        both["group_gbps"]["4"] / both["per_block_gbps"])
    assert f"repeat {REPEATS}/{REPEATS}" in done.stderr
    for way in ("out", "in", "both"):
        assert f"swap-{way}" in done.stdout
    assert "context switch" in done.stdout


def test_groups_never_merge_and_the_two_requests_never_overlap() -> None:
    for length in (1, 2, 4, 32):
        ids = grouped_blocks(10, length)
        assert len(ids) == 10 and ids == sorted(ids)
        runs = sum(1 for a, b in itertools.pairwise(ids) if b != a + 1) + 1
        assert runs == -(-10 // length)
    layout = Layout.for_groups(10, (1, 4))
    out_device, out_host = layout.blocks_of("out", 1)
    in_device, in_host = layout.blocks_of("in", 1)
    assert max(out_device) < layout.region <= min(in_device) and max(in_device) < 2 * layout.region
    assert out_host == list(range(10)) and in_host == list(range(10, 20))


def test_a_method_that_copies_wrong_bytes_fails_the_run() -> None:
    src, dst = torch.arange(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)

    def copy_all_but_the_last_byte() -> None:
        dst[:-1].copy_(src[:-1])

    sloppy = Method("out", "sloppy", 1, copy_all_but_the_last_byte,
                    lambda: torch.equal(dst, src), dst.zero_)
    with pytest.raises(AssertionError, match="out sloppy copied the wrong bytes"):
        measure([sloppy], repeats=1)
