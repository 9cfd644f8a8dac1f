"""`make gpu-check` without a GPU: the exit-2 path, the metadata the accelerator machine
needs (Python 3.12, CUDA 12 and 13 extras), the carried wheels' pins against pyproject's,
and the script's pure parts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tools.gpu_check import (
    NO_CUDA_EXIT,
    Step,
    check_skips,
    goals,
    junit_report,
    wheels_to_install,
)

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
WHEELS_LIST = REPO / "tools" / "gpu_wheels.txt"


def _carried() -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in WHEELS_LIST.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def _pyproject_requirements() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    specs = [*project["dependencies"], *(s for extra in project["optional-dependencies"].values()
                                         for s in extra)]
    reqs = [Requirement(spec) for spec in specs]
    return {_canonical(r.name): r for r in reqs if _canonical(r.name) != "fastswitch"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_without_cuda_it_exits_2_at_once_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "tools/gpu_check.py", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no device, even on a GPU machine
    )
    assert run.returncode == NO_CUDA_EXIT == 2
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1
    assert "sees no CUDA device" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_pyproject_allows_python_3_11_and_3_12_only() -> None:
    allowed = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert all(v in allowed for v in ("3.11.0", "3.11.7", "3.12.0", "3.12.9"))
    assert "3.13.0" not in allowed and "3.10.12" not in allowed
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_gpu_extras_cover_cuda_12_and_13_with_one_cupy_version() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    cu12, cu13 = (Requirement(extras[name][0]) for name in ("gpu-cu12", "gpu-cu13"))
    assert (cu12.name, cu13.name) == ("cupy-cuda12x", "cupy-cuda13x")
    assert str(cu12.specifier) == str(cu13.specifier)
    assert extras["gpu"] == ["fastswitch[gpu-cu12]"]
    # The cuda image installs the gpu-cu12 extra's requirements, read from pyproject.toml.
    assert "['optional-dependencies']['gpu-cu12']" in (REPO / "docker" / "Dockerfile").read_text()


def test_carried_wheels_are_pinned_to_what_pyproject_allows() -> None:
    carried = _carried()
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in carried)
    names = {_canonical(r.name) for r in carried}
    assert {"grpcio-health-checking", "grpcio-reflection", "redis", "pytest",
            "pytest-asyncio"} <= names
    pyproject = _pyproject_requirements()
    shared = [r for r in carried if _canonical(r.name) in pyproject]
    assert len(shared) >= 5
    for req in shared:
        pinned = next(iter(req.specifier)).version
        assert pyproject[_canonical(req.name)].specifier.contains(pinned), req
        if str(pyproject[_canonical(req.name)].specifier).startswith("=="):
            assert req.specifier == pyproject[_canonical(req.name)].specifier, req


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_the_wheels_target_downloads_the_list_as_pure_python_for_3_12() -> None:
    dry = subprocess.run(["make", "-n", "gpu-wheels"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "--platform any",
                 "--abi none", "-r tools/gpu_wheels.txt"):
        assert flag in dry
    check = subprocess.run(["make", "-n", "gpu-check", "OUT=x", "SMOLLM2=/m"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "tools/gpu_check.py --wheels gpu/wheels --smollm2 /m x" in check


def test_only_missing_or_older_distributions_are_installed(tmp_path: Path) -> None:
    wheels = [
        tmp_path / "surely_not_installed_dist-1.0-py3-none-any.whl",
        tmp_path / "pytest-0.1-py3-none-any.whl",
        tmp_path / f"pytest-{Version(pytest.__version__).major + 1}.0-py3-none-any.whl",
        tmp_path / f"pytest-{pytest.__version__}-py3-none-any.whl",
    ]
    assert wheels_to_install(wheels) == [wheels[0], wheels[2]]


def test_a_skipped_cuda_test_fails_the_tests_step(tmp_path: Path) -> None:
    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="0" errors="0" skipped="2">'
        '<testcase name="test_round_trip"><skipped message="no CUDA"/></testcase>'
        '<testcase name="test_cupy_backend_fails_fast_without_cuda"><skipped/></testcase>'
        '<testcase name="test_other"/></testsuite></testsuites>'
    )
    report = junit_report(xml)
    assert report["tests"] == 3 and report["skipped"] == 2
    step = Step("tests", [], 1, rc=0)
    check_skips(step, report)
    assert not step.passed and step.state == "skipped test_round_trip"


def test_goals_are_read_per_direction_and_model() -> None:
    copy = Step("swap_copy", [], 1, rc=0, result={"directions": {
        "out": {"group_over_memcpy": 0.9, "group_over_per_block": 2.0},
        "in": {"group_over_memcpy": 0.5, "group_over_per_block": 4.0},
    }})
    overlap = Step("swap_overlap_tiny", [], 1, rc=0, result={"busy_over_quiet": 1.05})
    rows = goals({"swap_copy": copy, "swap_overlap_tiny": overlap})
    assert [(r["goal"], r["where"], r["met"]) for r in rows] == [
        ("group_over_memcpy", "swap-out", True),
        ("group_over_per_block", "swap-out", False),
        ("group_over_memcpy", "swap-in", False),
        ("group_over_per_block", "swap-in", True),
        ("busy_over_quiet", "tiny", True),
    ]
