"""Issue 25's bounds on the core's shape, kept: the planner an orchestrator of at most 300
lines, and no core function over 50 (a mechanism that grows gets a module of its own)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "services" / "scheduler" / "core"


def test_the_planner_is_at_most_300_lines() -> None:
    assert len((CORE / "planner.py").read_text().splitlines()) <= 300


def test_no_core_function_is_over_50_lines() -> None:
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(CORE.glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 50]
    assert not long, long
