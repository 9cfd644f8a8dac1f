"""The layering rules: `common/`, the scheduler and the KV store import without torch, no
production module imports `tools/`, and no production modules import each other in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = ("services", "common", "benchmarks")


def _modules(folders: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every absolute module name `path` imports, `TYPE_CHECKING` and function bodies included;
    `from a import b` counts as both `a` and `a.b`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["services.scheduler.__main__", "services.kvstore.__main__"])
def test_service_imports_without_torch(module: str) -> None:
    probe = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch'))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"{module} imports torch"


def test_no_torch_in_common_the_scheduler_or_the_kv_store() -> None:
    torch_free = _modules(("common", "services/scheduler", "services/kvstore"))
    offenders = {
        name: sorted(i for i in _imports(path) if i == "torch" or i.startswith("torch."))
        for name, path in torch_free.items()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_production_module_imports_tools() -> None:
    offenders = {
        name: sorted(i for i in _imports(path) if i == "tools" or i.startswith("tools."))
        for name, path in _modules(PRODUCTION).items()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_import_cycles() -> None:
    modules = _modules((*PRODUCTION, "tools"))
    graph = {name: _imports(path) & modules.keys() - {name} for name, path in modules.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append([*path[path.index(name):], name])
            return
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []
