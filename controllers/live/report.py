"""Budget-drill analysis: how fast measured power went under a lowered budget.

Reads a recording written by ``scripts/deploy.py --record`` (telemetry samples with the
hardware energy counter, RealCluster's per-interval metrics and the budget schedule) and
measures, on 1 s windows of counter-based power, when the node first went under the new
budget after the drop and how much of the drill it stayed there. SLO attainment, of a window
and of each interval, is the per-interval rule of `envs.backend.slo_attainment` (requests
finished within SLO over those finished or dropped in the window), recomputed from the
recorded counts so that recordings of any version read the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.backend import slo_attainment
from llm_cluster_gym.envs.real.fidelity import power_windows
from llm_cluster_gym.envs.real.telemetry import TelemetryRecording, load_recording


class DrillReportError(ValueError):
    """The recording lacks what the analysis needs (names file and field)."""


@dataclass(frozen=True)
class DrillResult:
    """Figures of one budget drill (times relative to the drill start, s)."""

    budget_before_w: float
    budget_drill_w: float
    drill_start_s: float
    drill_duration_s: float
    power_before_w: float
    time_to_under_budget_s: float
    fraction_windows_under_budget: float
    mean_power_in_drill_w: float
    slo_attainment_before: float
    slo_attainment_in_drill: float
    dropped_fraction_in_drill: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict (rounded)."""
        return {k: round(float(v), 4) for k, v in asdict(self).items()}


def node_power(rec: TelemetryRecording, t0_s: float, t1_s: float,
               window_s: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Node power (sum over GPUs, energy counter) on ``window_s`` windows after ``t0_s``."""
    total = None
    starts = None
    for g in sorted(rec.samples):
        s, p, _ = power_windows(rec, t0_s, t1_s, window_s, gpu=g)
        if total is None:
            total, starts = p, s
        else:
            n = min(len(total), len(p))
            total, starts = total[:n] + p[:n], starts[:n]
    if total is None:
        raise DrillReportError(f"{rec.path}: no samples")
    return starts, total


def analyse(path: str | Path | TelemetryRecording) -> tuple[DrillResult, dict[str, Any]]:
    """Drill figures and the series to plot.

    Raises:
        DrillReportError: No ``drill`` section (episode start, budget schedule) or intervals.
    """
    rec = path if isinstance(path, TelemetryRecording) else load_recording(path)
    d = rec.extra.get("drill")
    iv = rec.extra.get("intervals")
    if not isinstance(d, dict) or not isinstance(iv, list) or not iv:
        raise DrillReportError(f"{rec.path}: fields 'drill' and 'intervals' are required")
    t0 = float(d["t0_s"])
    start, dur, budget = (float(x) for x in d["budget_drills"][0])
    before = float(d["power_budget_w"])
    end_rel = float(d["duration_s"])
    rel, power = node_power(rec, t0, t0 + end_rel)
    in_drill = (rel >= start) & (rel + 1.0 <= start + dur)
    under = in_drill & (power <= budget)
    first = rel[under][0] + 1.0 - start if under.any() else float("nan")
    after = in_drill & (rel + 1.0 - start >= first) if under.any() else in_drill
    pre = (rel >= start - 30.0) & (rel < start)
    t_iv = np.array([r["t_rel_s"] for r in iv])

    def attain(sel: np.ndarray) -> tuple[float, float]:
        """SLO attainment (drops are misses; NaN if nothing finished or dropped) and drop rate."""
        fin = sum(iv[i]["finished"] for i in np.flatnonzero(sel))
        bad = sum(iv[i]["slo_violations"] for i in np.flatnonzero(sel))
        arr = sum(iv[i]["arrived"] for i in np.flatnonzero(sel))
        drop = sum(iv[i]["dropped"] for i in np.flatnonzero(sel))
        return slo_attainment(fin, bad, drop), (drop / arr if arr else float("nan"))

    a_before, _ = attain((t_iv >= start - 30.0) & (t_iv < start))
    a_drill, drop_drill = attain((t_iv >= start) & (t_iv < start + dur))
    res = DrillResult(
        budget_before_w=before, budget_drill_w=budget, drill_start_s=start,
        drill_duration_s=dur,
        power_before_w=float(power[pre].mean()) if pre.any() else float("nan"),
        time_to_under_budget_s=float(first),
        fraction_windows_under_budget=float(under[after].mean()) if after.any() else float("nan"),
        mean_power_in_drill_w=float(power[in_drill].mean()) if in_drill.any() else float("nan"),
        slo_attainment_before=a_before, slo_attainment_in_drill=a_drill,
        dropped_fraction_in_drill=drop_drill)
    budget_series = np.where((rel >= start) & (rel < start + dur), budget, before)
    series = {"t_s": rel, "power_w": power, "budget_w": budget_series,
              "interval_t_s": t_iv,
              "admit_fraction": np.array([r.get("admit_fraction", np.nan) for r in iv]),
              "slo_attainment": np.array([slo_attainment(r["finished"], r["slo_violations"],
                                                         r["dropped"]) for r in iv])}
    return res, series


def plot(res: DrillResult, series: dict[str, Any], out: str | Path, title: str = "") -> Path:
    """Power vs budget (top), admitted fraction and SLO attainment (bottom), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                 gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(series["t_s"] + 0.5, series["power_w"], lw=1.2, label="measured GPU power (1 s, counter)")
    ax.step(series["t_s"], series["budget_w"], where="post", color="r", label="virtual budget")
    ax.axvline(res.drill_start_s, color="gray", ls=":")
    if np.isfinite(res.time_to_under_budget_s):
        ax.axvline(res.drill_start_s + res.time_to_under_budget_s, color="g", ls="--",
                   label=f"under budget after {res.time_to_under_budget_s:.0f} s")
    ax.set_ylabel("W")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "Budget drill")
    bx.step(series["interval_t_s"], series["admit_fraction"], where="post", label="admitted fraction")
    bx.plot(series["interval_t_s"], series["slo_attainment"], ".", label="SLO attainment")
    bx.set_ylim(-0.05, 1.05)
    bx.set_xlabel("s since start")
    bx.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
