"""`tools/gpu_correctness.py` without a GPU: its dry run passes every check and writes every
key (so the device run's code has run here first), and its checks fail what they must."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.executor.model import DecoderModel
from tools.gpu_correctness import (
    check_invariance,
    compare_logits,
    reference_models,
    twin,
)

REPO = Path(__file__).resolve().parents[2]
CHECKS = [
    "logits_tiny_fp32", "logits_llama_fp32", "logits_llama_bf16",
    "invariant_tokens_tiny_fp32", "invariant_tokens_llama_bf16",
    "fake_cuda_tiny_fp32_fast", "fake_cuda_llama_fp32_fast", "fake_cuda_llama_bf16_fast",
    "fake_cuda_tiny_fp32_invariant", "fake_cuda_llama_bf16_invariant",
]


def test_the_dry_run_passes_every_check_and_writes_every_key(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "correctness.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.gpu_correctness", "--dry-run", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result) == {"passed", "device", "dry_run", "seconds", "checks"}
    assert result["passed"] is True and result["dry_run"] is True
    assert [c["name"] for c in result["checks"]] == CHECKS
    for check in result["checks"]:
        assert set(check) == {"name", "passed", "max_abs_diff", "bound", "error"}
        assert check["passed"] is True and check["error"] is None, check
        if check["name"].startswith("logits_"):
            assert 0 < check["max_abs_diff"] <= check["bound"]  # two paths, not one twice
        if check["name"].startswith("invariant_"):
            assert check["max_abs_diff"] == 0.0
    assert "10/10 checks passed" in done.stderr


class BatchSensitive:
    """A model whose logits shift with the number of sequences in the step: its tokens stay
    the same, its bits do not."""

    def __init__(self, model: DecoderModel) -> None:
        self.model = model
        self.config, self.dtype, self.device = model.config, model.dtype, model.device

    def forward_step(self, cache: torch.Tensor, batch: list[object]) -> torch.Tensor:
        return self.model.forward_step(cache, batch) + len(batch)  # type: ignore[arg-type]


def test_the_checks_fail_a_batch_dependent_model_and_a_wrong_one() -> None:
    reference = reference_models(dry_run=True)["llama"]
    invariant = twin(reference, dtype=torch.float32, batch_invariant=True,
                     device=torch.device("cpu"))
    invariance = check_invariance(BatchSensitive(invariant), "sensitive")  # type: ignore[arg-type]
    assert not invariance.passed
    assert invariance.max_abs_diff == pytest.approx(2.0)  # 3 in a batch against 1 alone
    assert invariance.error is None  # the same tokens: only the bits tell
    wrong = twin(reference, dtype=torch.float32, batch_invariant=False,
                 device=torch.device("cpu"))
    with torch.no_grad():
        wrong.model.layers[0].self_attn.k_proj.weight.mul_(1.01)
    logits = compare_logits(reference, wrong, "wrong")
    assert not logits.passed and logits.max_abs_diff > logits.bound  # type: ignore[operator]
