"""The request state machine: the table's invariants, checked exhaustively, and that
nothing but `Request.handle` sets a request's state."""

from __future__ import annotations

import ast
import itertools
from collections import deque
from pathlib import Path

import pytest

from services.scheduler.core.lifecycle import (
    TERMINAL,
    TRANSITIONS,
    Event,
    InvalidTransition,
    RequestState,
    next_state,
)
from services.scheduler.core.request import Request

S, E = RequestState, Event
ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("services", "benchmarks", "common")
HANDLE = (Path("services/scheduler/core/request.py"), "Request.handle")
NON_TERMINAL = [s for s in S if s not in TERMINAL]


def test_terminal_states_have_no_exits() -> None:
    for state, event in itertools.product(TERMINAL, E):
        assert not TRANSITIONS.get(state)
        with pytest.raises(InvalidTransition):
            next_state(state, event)


@pytest.mark.parametrize("state", NON_TERMINAL, ids=lambda s: s.value)
def test_every_live_state_can_be_cancelled_and_fail(state: RequestState) -> None:
    assert next_state(state, E.CANCEL) is S.CANCELLED
    assert next_state(state, E.FAIL) is S.FAILED


def test_every_state_is_reachable_from_waiting() -> None:
    seen, todo = {S.WAITING}, deque([S.WAITING])
    while todo:
        for target in TRANSITIONS.get(todo.popleft(), {}).values():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    assert seen == set(S)


def test_only_a_running_request_finishes() -> None:
    into_finished = {(s, e) for s, moves in TRANSITIONS.items() for e, t in moves.items()
                     if t is S.FINISHED}
    assert into_finished == {(S.RUNNING, E.FINISH)}


def test_next_state_refuses_every_pair_the_table_lacks() -> None:
    """Exhaustive: each (state, event) either is a row, or raises."""
    rows = 0
    for state, event in itertools.product(S, E):
        if event in TRANSITIONS.get(state, {}):
            assert next_state(state, event) is TRANSITIONS[state][event]
            rows += 1
        else:
            with pytest.raises(InvalidTransition, match=f"{event.value} in state {state.value}"):
                next_state(state, event)
    assert rows == sum(len(moves) for moves in TRANSITIONS.values())


def test_handle_moves_by_the_table_and_a_refused_event_changes_nothing() -> None:
    r = Request("r", "c", [1, 2, 3], 4)
    r.handle(E.ADMIT)
    assert r.state is S.PREFILLING
    with pytest.raises(InvalidTransition):
        r.handle(E.FINISH)  # not before its first token
    assert r.state is S.PREFILLING
    r.handle(E.FIRST_TOKEN)
    r.handle(E.FINISH)
    assert r.state is S.FINISHED


# ---- nothing else assigns a state ------------------------------------------------------


def state_assignments(source: str) -> list[tuple[int, str]]:
    """(line, enclosing Class.function) of every assignment to an attribute `state` in
    `source`: `x.state = ...` (plain, annotated, augmented or unpacked), `setattr(x,
    "state", ...)` and `object.__setattr__(x, "state", ...)`."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, scope: tuple[str, ...]) -> None:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            scope = (*scope, node.name)
        if _assigns_state(node):
            found.append((node.lineno, ".".join(scope)))  # type: ignore[attr-defined]
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(ast.parse(source), ())
    return found


def _assigns_state(node: ast.AST) -> bool:
    if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(_sets_state(target) for target in targets)
    if isinstance(node, ast.Call):
        name = ast.unparse(node.func)
        args = node.args
        return (name in ("setattr", "object.__setattr__") and len(args) >= 2
                and isinstance(args[1], ast.Constant) and args[1].value == "state")
    return False


def _sets_state(target: ast.expr) -> bool:
    """The target stores into an attribute `state` (not merely reads one, as an index)."""
    if isinstance(target, ast.Tuple | ast.List):
        return any(map(_sets_state, target.elts))
    if isinstance(target, ast.Starred):
        return _sets_state(target.value)
    return isinstance(target, ast.Attribute) and target.attr == "state"


@pytest.mark.parametrize("line", [
    "r.state = RequestState.RUNNING",
    "self.requests[i].state: RequestState = S.FAILED",
    "a, *b.state = 1, 2",
    "setattr(r, 'state', S.WAITING)",
    "object.__setattr__(r, 'state', S.WAITING)",
])
def test_the_scan_sees_an_assignment(line: str) -> None:
    assert state_assignments(f"class P:\n    def plan(self):\n        {line}\n") == [
        (3, "P.plan")]


def test_the_scan_ignores_reads_and_comparisons() -> None:
    source = ("x = r.state\nif r.state == S.RUNNING:\n    y = {r.state: 1}\nstate = 3\n"
              "counts[r.state in RESIDENT] += 1\nr.state.value = 2\n")
    assert state_assignments(source) == []


def test_only_request_handle_assigns_a_state() -> None:
    sources = {path.relative_to(ROOT): path.read_text()
               for top in SCANNED for path in (ROOT / top).rglob("*.py")}
    found = {(path, scope) for path, source in sources.items() if "state" in source
             for _, scope in state_assignments(source)}
    assert found == {HANDLE}
