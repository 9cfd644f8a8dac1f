"""`make gpu-check` without a GPU: the dry run of every step on the CPU, the exit-2 path, the
metadata the accelerator machine needs (Python 3.12, CUDA 12 and 13 extras), the carried
wheels' pins against pyproject's and what travels, and the script's pure parts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from services.executor.model import KVCacheGeometry, ModelConfig
from services.executor.model.tiny_checkpoint import tiny_checkpoint
from tools.gpu_check import (
    DEFAULT_BUDGET_S,
    NO_CUDA_EXIT,
    STEPS,
    TINY_BLOCK_BYTES,
    Runner,
    Sizes,
    Step,
    check_skips,
    goals,
    junit_report,
    unpack_wheels,
    wheels_to_install,
)

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
WHEEL_LISTS = [REPO / "tools" / "gpu_wheels.txt", REPO / "tools" / "gpu_wheels_cp312.txt"]
CARRY_LIMIT = 64 * 2**20  # what travels to the accelerator machine: the tree and gpu/wheels
WHEELS_ROOM = 16 * 2**20  # left for gpu/wheels (9.7 MiB at the pins of 2025-12)
STARTUP_S = 5  # the CUDA check's torch import and unpacking, before the first step
DECODE_GOALS = {"roofline_batch1", "roofline_batch64", "over_hf_batch32"}
DECODE_ROW = {"batch", "context", "ms_per_step", "ops_per_step", "host_syncs_per_step",
              "roofline_fraction", "hf_ms_per_step", "over_hf"}
GOAL_ROWS = [
    *((g, "decode") for g in ("roofline_batch1", "roofline_batch64", "over_hf_batch32")),
    *((g, f"swap-{way} group_16") for way in ("out", "in", "both")
      for g in ("group_over_memcpy", "group_over_per_block")),
    ("busy_over_quiet", "overlap"),
]


def _carried() -> list[Requirement]:
    lines = [line.split("#")[0].strip() for path in WHEEL_LISTS
             for line in path.read_text().splitlines()]
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


@pytest.mark.slow
@pytest.mark.process
def test_the_dry_run_runs_every_step_on_the_cpu_and_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--dry-run", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "summary.txt"]
    record = json.loads((out / "gpu_check.json").read_text())
    assert set(record) == {"dry_run", "device", "python", "budget_s", "seconds", "load", "shm",
                           "steps", "results", "passed", "notes", "goals"}
    assert record["dry_run"] is True and record["load"]["unpacked"] == []
    assert list(record["steps"]) == list(STEPS)
    broken = {name: f"{step['state']}\n{step['output_tail']}"
              for name, step in record["steps"].items() if step["state"] != "ok"}
    assert not broken, broken
    assert run.returncode == 0 and record["passed"]
    results = record["results"]
    assert results["imports"]["protobuf_backend"] == "python"
    assert results["correctness"]["passed"] is True
    for check in results["correctness"]["checks"]:
        assert {"name", "passed", "max_abs_diff"} <= set(check)
    assert set(results["decode"]["goals"]) == DECODE_GOALS
    assert results["decode"]["results"]
    assert all(set(row) >= DECODE_ROW for row in results["decode"]["results"])
    copies = results["copies"]
    assert set(copies["directions"]) == {"out", "in", "both"} and copies["headline_group"] == 16
    for report in copies["directions"].values():
        assert set(report["group_gbps"]) == {"1", "2", "4", "8", "16", "32"}
    assert copies["context_switch_ratio"] > 0
    overlap = results["overlap"]
    assert overlap["busy_over_quiet"] > 0
    assert all(r["gbps"] for phase in ("copies_while_decoding", "copies_alone")
               for r in overlap[phase].values())
    assert results["stack"]["identical_tokens"] is True and "tokens/s" in results["stack"]["table"]
    assert results["tests"]["tests"] >= 1 and not results["tests"]["failures"]
    assert [(row["goal"], row["where"]) for row in record["goals"]] == GOAL_ROWS
    assert all(row["value"] is not None for row in record["goals"] if row["where"] != "decode")
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary.splitlines()[0] and "context switch" in summary


def test_steps_run_most_important_first_and_their_bounds_fit_the_budget() -> None:
    assert list(STEPS) == ["imports", "correctness", "decode", "copies", "overlap", "stack",
                           "tests"]
    assert STARTUP_S + sum(STEPS.values()) <= DEFAULT_BUDGET_S == 240


def _sleeper(bound_s: float) -> Step:
    return Step("sleeper", [sys.executable, "-c", "import time; time.sleep(30)"], bound_s)


def test_a_step_the_budget_cuts_short_is_skipped_but_one_over_its_bound_fails() -> None:
    now = time.monotonic()
    cut = _sleeper(bound_s=30)
    Runner(dict(os.environ), now, now + 1.0, min_step_s=0.1).run(cut)
    assert cut.skipped.startswith("the budget ran out") and not cut.failed
    slow = _sleeper(bound_s=0.5)
    Runner(dict(os.environ), now, now + 60, min_step_s=0.1).run(slow)
    assert slow.failed and slow.state == "failed: over its 0.5s bound"
    late = _sleeper(bound_s=30)
    Runner(dict(os.environ), now, now, min_step_s=0.1).run(late)
    assert late.rc is None and late.skipped and not late.failed


def test_arenas_shrink_to_fit_a_small_dev_shm() -> None:
    roomy = Sizes.fit(8 * 2**30, dry_run=False)
    assert (roomy.overlap_swap_mib, roomy.stack_host_blocks, roomy.reduced) == (128, 2048, False)
    small = Sizes.fit(64 * 2**20, dry_run=False)  # Docker's default shm_size
    assert small.reduced
    assert 2 * small.overlap_swap_mib * 2**20 <= 0.8 * 64 * 2**20
    assert small.stack_host_blocks * TINY_BLOCK_BYTES <= 0.8 * 64 * 2**20


def test_the_stack_arena_size_assumes_the_tiny_model_s_block() -> None:
    config = ModelConfig.from_file(tiny_checkpoint() / "config.json")
    geometry = KVCacheGeometry.for_model(config, num_blocks=1, block_size=16)  # float32
    assert geometry.block_bytes == TINY_BLOCK_BYTES


def test_what_travels_fits_the_limit() -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    tree = sum((REPO / name).stat().st_size for name in tracked if (REPO / name).is_file())
    assert tree + WHEELS_ROOM <= CARRY_LIMIT
    wheels = sorted((REPO / "gpu" / "wheels").glob("*.whl"))
    if not wheels:
        pytest.skip("no gpu/wheels here (make gpu-wheels)")
    assert len(wheels) == len(_carried())
    assert sum(w.stat().st_size for w in wheels) <= WHEELS_ROOM


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
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "redis",
            "pytest", "pytest-asyncio"} <= names
    pyproject = _pyproject_requirements()
    shared = [r for r in carried if _canonical(r.name) in pyproject]
    assert len(shared) >= 6
    for req in shared:
        pinned = next(iter(req.specifier)).version
        assert pyproject[_canonical(req.name)].specifier.contains(pinned), req
        if str(pyproject[_canonical(req.name)].specifier).startswith("=="):
            assert req.specifier == pyproject[_canonical(req.name)].specifier, req


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_the_wheels_target_downloads_pure_python_and_cp312_wheels() -> None:
    dry = subprocess.run(["make", "-n", "gpu-wheels"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    pure, binary = (line for line in dry.splitlines() if "pip download" in line)
    for line in (pure, binary):
        for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12"):
            assert flag in line
    for flag in ("--implementation py", "--platform any", "--abi none",
                 "-r tools/gpu_wheels.txt"):
        assert flag in pure
    assert "--implementation cp --abi cp312 --platform manylinux_2_17_x86_64" in binary
    assert "-r tools/gpu_wheels_cp312.txt" in dry
    check = subprocess.run(["make", "-n", "gpu-check", "OUT=x"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "tools/gpu_check.py --wheels gpu/wheels x" in check


def test_only_missing_or_older_distributions_for_this_python_are_installed(
    tmp_path: Path,
) -> None:
    other = "cp311" if sys.version_info[:2] == (3, 12) else "cp312"
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = [
        tmp_path / "surely_not_installed_dist-1.0-py3-none-any.whl",
        tmp_path / "pytest-0.1-py3-none-any.whl",
        tmp_path / f"pytest-{Version(pytest.__version__).major + 1}.0-py3-none-any.whl",
        tmp_path / f"pytest-{pytest.__version__}-py3-none-any.whl",
        tmp_path / f"surely_not_installed_dist-1.0-{other}-{other}-manylinux2014_x86_64.whl",
        tmp_path / f"surely_not_installed_dist-1.0-{ours}-{ours}-manylinux2014_x86_64.whl",
    ]
    assert wheels_to_install(wheels) == [wheels[0], wheels[2], wheels[5]]


def test_unpacked_wheels_import_with_their_metadata(tmp_path: Path) -> None:
    wheel = tmp_path / "carried_demo-1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("carried_demo/__init__.py", "VALUE = 7\n")
        archive.writestr("carried_demo-1.2.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: carried-demo\nVersion: 1.2\n")
    site = tmp_path / "site"
    unpack_wheels([wheel], site)
    probe = ("import importlib.metadata, carried_demo; "
             "print(carried_demo.VALUE, importlib.metadata.version('carried-demo'))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert run.stdout.split() == ["7", "1.2"]


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
    assert step.failed and step.state == "failed: skipped test_round_trip"


def test_goals_are_read_per_way_at_the_headline_group_and_unmeasured_ones_say_so() -> None:
    def way(memcpy: float, per_block: float) -> dict[str, object]:
        return {"group_over_memcpy": {"4": 0.1, "16": memcpy},
                "group_over_per_block": {"4": 9.0, "16": per_block}}

    rows = goals({
        "decode": {"goals": {"roofline_batch1": 0.75, "roofline_batch64": 0.4,
                             "over_hf_batch32": None}},
        "copies": {"headline_group": 16, "directions": {
            "out": way(0.9, 2.0), "in": way(0.5, 4.0), "both": way(0.8, 3.0)}},
        "overlap": {"busy_over_quiet": 1.05},
    })
    assert [(r["goal"], r["where"]) for r in rows] == GOAL_ROWS
    assert [r["met"] for r in rows] == [True, False, None, True, False, False, True, True, True,
                                        True]
    assert goals({})[0]["value"] is None and all(r["met"] is None for r in goals({}))
