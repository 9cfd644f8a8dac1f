"""What a sweep reports: per-mode metrics, FastSwitch/baseline ratios, the comparison with the
paper's headline numbers, the JSON document and the plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.sim.simulate import ModeResult
from common.latency import percentile
from services.scheduler.core.config import Mode

# Ratios are FastSwitch / baseline; these are the metrics worth a ratio.
RATIO_KEYS = (
    "p95_ttft_s",
    "p99_tbt_s",
    "p999_tbt_s",
    "throughput_tok_s",
    "swap_out_bytes",
    "swap_out_bytes_preempted",
    "swap_in_bytes",
    "copies",
    "preemptions",
    "context_switch_s_p99",
    "gpu_idle_frac",
)


def mode_metrics(result: ModeResult) -> dict[str, float | int]:
    r, s = result.report, result.stats
    return {
        "turns_finished": len(r.finished),
        "iterations": s.iterations,
        "makespan_s": r.makespan_s,
        "p50_ttft_s": percentile(r.ttfts, 50),
        "p95_ttft_s": percentile(r.ttfts, 95),
        "p99_tbt_s": percentile(r.tbts, 99),
        "p999_tbt_s": percentile(r.tbts, 99.9),
        "throughput_tok_s": r.throughput_tok_s,
        "swap_out_bytes": result.swaps.bytes_out,
        "swap_out_bytes_preempted": result.swaps.bytes_out_preempted,
        "swap_in_bytes": result.swaps.bytes_in,
        "copies": result.swaps.copies,
        "preemptions": s.preempted_by_swap + s.preempted_by_recompute,
        "preemptions_by_recompute": s.preempted_by_recompute,
        "context_switch_s_p99": percentile(r.context_switch_s, 99),
        "gpu_idle_frac": r.gpu_idle_frac,
        "barrier_stall_s": r.stall_s,
        "reuse_saved_bytes": s.reuse_saved_blocks * result.deployment.block_bytes,
        "prefix_hit_tokens": s.prefix_hit_tokens,
        "device_blocks": result.num_device_blocks,
        **result.fairness.to_json(
            r.times, result.num_device_blocks * result.deployment.block_size),
    }


CLASS_KEYS = ("top_p95_ttft_s", "bottom_p95_ttft_s", "top_p99_tbt_s", "bottom_p99_tbt_s",
              "top_p999_tbt_s", "bottom_p999_tbt_s")

# What each mode pays for context switches: metric / the same at zero switch cost - 1.
OVERHEAD_KEYS = ("p95_ttft_s", "p999_tbt_s", "top_p95_ttft_s", "top_p99_tbt_s",
                 "top_p999_tbt_s", "throughput_tok_s", "makespan_s")


def overhead(metrics: dict[str, Any], limit: dict[str, Any]) -> dict[str, float | None]:
    """Each `OVERHEAD_KEYS` metric over the limit's, minus 1 (None when the limit is 0)."""
    return {k: metrics[k] / limit[k] - 1 if limit[k] else None for k in OVERHEAD_KEYS}


@dataclass(frozen=True)
class Goal:
    """One of issue 27's goals for fastswitch at a point. Against a mode: the factor by which
    fastswitch is better (the other's latency over fastswitch's, fastswitch's throughput over
    the other's) must be at least `bound`. Against the limit (`against` None): fastswitch's
    overhead over its own zero-switch-cost run must be at most `bound`."""

    name: str
    key: str
    against: str | None
    bound: float
    higher_is_better: bool = False

    def figure(self, point: dict[str, Any]) -> float | None:
        fs = point["modes"][Mode.FASTSWITCH.value][self.key]
        if self.against is None:
            return point["overhead_over_limit"].get(Mode.FASTSWITCH.value, {}).get(self.key)
        other = point["modes"][self.against][self.key]
        num, den = (fs, other) if self.higher_is_better else (other, fs)
        return num / den if den else None

    def to_json(self, point: dict[str, Any]) -> dict[str, Any]:
        value = self.figure(point)
        met = None if value is None else (
            value <= self.bound if self.against is None else value >= self.bound)
        return {"goal": self.name, "key": self.key, "against": self.against or "limit",
                "bound": self.bound, "figure": value, "met": met}


_V1, _ALL = Mode.VLLM_V1.value, Mode.VLLM_V1_OFFLOAD_ALL.value
GOALS = (
    Goal("top-class P95 TTFT >= 3x better than vllm-v1", "top_p95_ttft_s", _V1, 3.0),
    Goal("P99.9 TBT >= 1.5x better than vllm-v1", "p999_tbt_s", _V1, 1.5),
    Goal("throughput >= 1.0x vllm-v1", "throughput_tok_s", _V1, 1.0, higher_is_better=True),
    Goal("top-class P95 TTFT no worse than vllm-v1-offload-all", "top_p95_ttft_s", _ALL, 1.0),
    Goal("P99.9 TBT no worse than vllm-v1-offload-all", "p999_tbt_s", _ALL, 1.0),
    Goal("throughput no worse than vllm-v1-offload-all", "throughput_tok_s", _ALL, 1.0,
         higher_is_better=True),
    Goal("P99.9 TBT within 10% of the limit", "p999_tbt_s", None, 0.10),
)
"""Issue 27's "Done when" goals, as each point's `goals` block states them."""


def point_label(setting: str, rate: float | None, update_every: int | None) -> str:
    rate_part = "trace" if rate is None else f"rate={rate:g}"
    every_part = "" if update_every is None else f" every={update_every}"
    return f"{setting} {rate_part}{every_part}"


def ratio(fastswitch: float, baseline: float) -> float | None:
    """None when the baseline is 0: no ratio exists (both modes idle, or nothing swapped)."""
    return fastswitch / baseline if baseline else None


@dataclass
class Point:
    """One point of the sweep: every mode on the same workload, and each at zero switch
    cost (`limits`, possibly empty)."""

    setting: str
    rate: float | None
    update_every: int | None
    results: dict[Mode, ModeResult]
    limits: dict[Mode, ModeResult] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return point_label(self.setting, self.rate, self.update_every)

    def to_json(self) -> dict[str, Any]:
        modes = {m.value: mode_metrics(r) for m, r in self.results.items()}
        fs, base = modes[Mode.FASTSWITCH.value], modes[Mode.BASELINE.value]
        limits = {m.value: mode_metrics(r) for m, r in self.limits.items()}
        doc = {
            "setting": self.setting,
            "arrival_rate": self.rate,
            "update_every": self.update_every,
            "modes": modes,
            "ratios": {k: ratio(fs[k], base[k]) for k in RATIO_KEYS},
            # fastswitch / each other mode, as "ratios" is against the baseline
            "ratios_vs": {m: {k: ratio(fs[k], other[k]) for k in (*RATIO_KEYS, *CLASS_KEYS)}
                          for m, other in modes.items() if m != Mode.FASTSWITCH.value},
            "zero_switch_cost": limits,
            "overhead_over_limit": {m: overhead(modes[m], limit) for m, limit in limits.items()},
        }
        return {**doc, "goals": [g.to_json(doc) for g in GOALS]}


@dataclass(frozen=True)
class PaperClaim:
    """One headline number of the FastSwitch paper and how ours is derived from the ratios."""

    name: str
    paper: str
    key: str
    invert: bool  # the paper reports baseline / FastSwitch (a speedup)
    as_change: bool = False  # shown as a percentage change instead of a factor

    def values(self, points: Sequence[dict[str, Any]]) -> list[float]:
        out = []
        for p in points:
            value = p["ratios"][self.key]
            if value is None or (self.invert and value == 0):
                continue
            out.append(1 / value if self.invert else value)
        return out

    def ours(self, points: Sequence[dict[str, Any]]) -> str:
        values = self.values(points)
        if not values:
            return "n/a (no point had it)"
        if self.as_change:
            lo, hi = (100 * (v - 1) for v in (min(values), max(values)))
            return f"{lo:+.0f}% .. {hi:+.0f}%"
        return f"{min(values):.2f}x .. {max(values):.2f}x"


PAPER_CLAIMS = (
    PaperClaim("P95 TTFT speedup", "4.3-5.8x", "p95_ttft_s", invert=True),
    PaperClaim("P99.9 TBT speedup", "3.6-11.2x", "p999_tbt_s", invert=True),
    PaperClaim("throughput gain", "up to 1.44x", "throughput_tok_s", invert=False),
    PaperClaim("swap-out volume, all", "-53%", "swap_out_bytes", invert=False, as_change=True),
    PaperClaim("swap-out volume, preemptions only", "-53%", "swap_out_bytes_preempted",
               invert=False, as_change=True),
    PaperClaim("context-switch latency speedup (P99)", "3.11x", "context_switch_s_p99",
               invert=True),
)


def claims_json(points: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        c.key: {
            "name": c.name, "paper": c.paper, "ours": c.ours(points), "values": c.values(points)
        }
        for c in PAPER_CLAIMS
    }


def paper_table(points: Sequence[dict[str, Any]]) -> str:
    rows = [("", "paper", "this simulation (min .. max over the sweep)")]
    rows += [(c.name, c.paper, c.ours(points)) for c in PAPER_CLAIMS]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)


def points_table(points: Sequence[dict[str, Any]]) -> str:
    """Per-point speedups (baseline / FastSwitch) and the raw latencies behind them."""
    header = (
        f"{'point':<38} {'P95 TTFT fs/base (s)':>22} {'TTFT x':>7} {'P99.9 TBT x':>11} "
        f"{'tput x':>7} {'swap-out':>9} {'ctx-sw x':>8} {'preempt fs/base':>16}"
    )
    lines = [header]
    for p in points:
        fs, base, r = p["modes"]["fastswitch"], p["modes"]["baseline"], p["ratios"]
        label = point_label(p["setting"], p["arrival_rate"], p["update_every"])
        lines.append(
            f"{label:<38} {fs['p95_ttft_s']:>10.3f}/{base['p95_ttft_s']:<11.3f} "
            f"{_speedup(r['p95_ttft_s']):>7} {_speedup(r['p999_tbt_s']):>11} "
            f"{_factor(r['throughput_tok_s']):>7} {_change(r['swap_out_bytes']):>9} "
            f"{_speedup(r['context_switch_s_p99']):>8} "
            f"{fs['preemptions']:>7}/{base['preemptions']:<8}"
        )
    return "\n".join(lines)


def modes_table(points: Sequence[dict[str, Any]]) -> str:
    """Per point and mode: the top and bottom classes' latencies, fairness, and the overhead
    over the mode's own run at zero switch cost."""
    header = (f"{'point':<34} {'mode':<19} {'top P95 TTFT':>12} {'bot P95 TTFT':>12} "
              f"{'P99.9 TBT':>9} {'top P99.9 TBT':>13} {'bot P99.9 TBT':>13} {'tok/s':>6} "
              f"{'preempt':>7} {'inversions (s)':>16} {'VTC gap/2U':>10} {'Jain':>5} "
              f"{'top TTFT ovh':>12} {'TBT ovh':>8}")
    lines = [header]
    for p in points:
        label = point_label(p["setting"], p["arrival_rate"], p["update_every"])
        for mode, m in p["modes"].items():
            over = p["overhead_over_limit"].get(mode, {})
            lines.append(
                f"{label:<34} {mode:<19} {m['top_p95_ttft_s']:>12.3f} "
                f"{m['bottom_p95_ttft_s']:>12.3f} {m['p999_tbt_s']:>9.3f} "
                f"{m['top_p999_tbt_s']:>13.3f} {m['bottom_p999_tbt_s']:>13.3f} "
                f"{m['throughput_tok_s']:>6.0f} {m['preemptions']:>7} "
                f"{m['priority_inversions']:>7} ({m['priority_inversion_s']:>6.1f}) "
                f"{m['vtc_max_gap'] / m['vtc_bound_2u']:>10.2f} {m['jain_index'] or 0:>5.2f} "
                f"{_change(_plus_one(over.get('top_p95_ttft_s'))):>12} "
                f"{_change(_plus_one(over.get('p999_tbt_s'))):>8}"
            )
    return "\n".join(lines)


def goals_table(points: Sequence[dict[str, Any]]) -> str:
    """Per point, each goal's figure (a factor, or the overhead over the limit) and whether
    it was met."""
    lines = []
    for p in points:
        lines.append(point_label(p["setting"], p["arrival_rate"], p["update_every"]))
        for g in p["goals"]:
            value, met = g["figure"], {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
            shown = "n/a" if value is None else (
                f"{100 * value:+.1f}%" if g["against"] == "limit" else f"{value:.2f}x")
            lines.append(f"  {g['goal']:<56} {shown:>8}  {met}")
    return "\n".join(lines)


def _plus_one(value: float | None) -> float | None:
    return None if value is None else value + 1


def _speedup(value: float | None) -> str:
    return "n/a" if not value else f"{1 / value:.2f}"


def _factor(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _change(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * (value - 1):+.0f}%"


def write_json(path: Path, config: dict[str, Any], points: Sequence[dict[str, Any]]) -> None:
    document = {"config": config, "points": list(points), "paper_comparison": claims_json(points)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _cdf(values: list[float], max_points: int = 2000) -> tuple[list[float], list[float]]:
    """Sorted values against their cumulative fraction, thinned to at most `max_points`."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return [], []
    idx = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)}) if (
        n > max_points
    ) else range(n)
    return [ordered[i] for i in idx], [(i + 1) / n for i in idx]


def write_plots(directory: Path, points: Sequence[Point]) -> list[Path]:
    """Latency CDFs per point and mode, and speedups against arrival rate per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for point in points:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, name in zip(axes, ("TTFT", "TBT"), strict=True):
            for mode, result in point.results.items():
                samples = result.report.ttfts if name == "TTFT" else result.report.tbts
                ax.plot(*_cdf(samples), label=mode.value)
            ax.set_xscale("log")
            ax.set_xlabel(f"{name} (s, virtual)")
            ax.set_ylabel("fraction of samples")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"latency CDFs: {point.label}")
        fig.tight_layout()
        written.append(_save(fig, directory / f"cdf_{_slug(point.label)}.png"))
        plt.close(fig)

    by_setting: dict[str, list[tuple[Point, dict[str, Any]]]] = {}
    for point in points:
        if point.rate is not None:
            by_setting.setdefault(point.setting, []).append((point, point.to_json()))
    for setting, series in by_setting.items():
        fig, axes = plt.subplots(1, len(PAPER_CLAIMS), figsize=(4 * len(PAPER_CLAIMS), 3.6))
        everys = sorted({p.update_every for p, _ in series}, key=lambda e: (e is None, e or 0))
        for ax, claim in zip(axes, PAPER_CLAIMS, strict=True):
            for every in everys:
                line = sorted(
                    ((p, doc) for p, doc in series if p.update_every == every),
                    key=lambda pair: pair[0].rate,
                )
                xs, ys = [], []
                for p, doc in line:
                    values = claim.values([doc])
                    if values:
                        xs.append(p.rate)
                        ys.append(values[0])
                label = "no updates" if every is None else f"every {every}"
                ax.plot(xs, ys, marker="o", label=label)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_title(claim.name, fontsize=9)
            ax.set_xlabel("conversations / s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"FastSwitch vs baseline: {setting} (paper: see table)")
        fig.tight_layout()
        written.append(_save(fig, directory / f"ratios_{_slug(setting)}.png"))
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)
