"""`benchmarks.stack`'s JSON ratios: each mode over fastswitch, for comparable metrics only."""

from __future__ import annotations

from benchmarks import stack


def row(**values: float | None) -> dict[str, float | None]:
    return dict.fromkeys(stack.METRICS, 1.0) | values


def test_ratios_cover_comparable_metrics_and_leave_out_labels_and_zeros() -> None:
    rows = {"fastswitch": row(p95_ttft_s=0.5, top_class=3, preemptions=0.0),
            "vllm-v1": row(p95_ttft_s=2.0, top_class=3, preemptions=4.0, top_p95_ttft_s=None)}
    ratios = stack.over_fastswitch(rows)["vllm-v1_over_fastswitch"]
    assert ratios["p95_ttft_s"] == 4.0
    assert ratios["preemptions"] is None and ratios["top_p95_ttft_s"] is None
    assert "top_class" not in ratios and "vtc_bound_2u" not in ratios
    assert set(ratios) == {k for k, (_, _, higher) in stack.METRICS.items() if higher is not None}
    assert stack.over_fastswitch({"vllm-v1": rows["vllm-v1"]}) == {}
