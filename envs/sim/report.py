"""Write an episode's report: headline table, JSON summary and plots.

`write_report` turns an `envs.episode.EpisodeResult` (recorded by the runner of
`envs.rollout` or by the live loop) into ``report.md``, ``summary.json`` and PNG plots, writing
nothing until everything has been computed, and each file through a temporary name renamed
into place (`envs.outputs.write_file_atomic`; the commands write the whole folder at once with
`envs.outputs.staged_folder`). The table's figures and labels are `EpisodeResult.summary` and
`envs.episode.SUMMARY_FIELDS`. With a per-tick history (a simulator built with
``record_ticks``) the row power plot shows the mean and peak within each interval instead of a
single end-of-interval reading.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.episode import SUMMARY_FIELDS, EpisodeResult, ReportError
from llm_cluster_gym.envs.outputs import write_file_atomic

__all__ = ["PLOT_FILES", "ReportError", "format_table", "row_power_series", "write_report"]


PLOT_FILES = {
    "row_power": "row_power.png",
    "temperature": "temperature.png",
    "latency": "latency.png",
    "energy": "energy.png",
}


# ---------------------------------------------------------------------------------- tables
def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if value == int(value) and abs(value) < 1e12:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def format_table(summary: dict[str, float]) -> str:
    """The headline table as Markdown (metric, value, unit); readable as plain text too."""
    lines = ["| metric | value | unit |", "|---|---:|---|"]
    for key, (label, unit) in SUMMARY_FIELDS.items():
        if key in summary:
            lines.append(f"| {label} (`{key}`) | {_fmt(summary[key])} | {unit} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plots
def _fault_spans(result: EpisodeResult) -> list[tuple[float, float, str]]:
    """Contiguous runs of intervals with the same non-empty set of active faults."""
    spans: list[tuple[float, float, str]] = []
    for i, names in enumerate(result.active_faults):
        if not names:
            continue
        t1 = float(result.time_s[i])
        label = ", ".join(sorted(set(names)))
        if spans and spans[-1][2] == label and abs(spans[-1][1] - (t1 - result.interval_s)) < 1e-9:
            spans[-1] = (spans[-1][0], t1, label)
        else:
            spans.append((t1 - result.interval_s, t1, label))
    return spans


def _shade_faults(ax: Any, spans: list[tuple[float, float, str]]) -> None:
    for k, (t0, t1, label) in enumerate(spans):
        ax.axvspan(t0, t1, color="0.5", alpha=0.12, lw=0,
                   label="fault active" if k == 0 else None)
        ax.text(t0, 0.99, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7,
                va="top", color="0.25")


MAX_ROW_PANELS = 8
"""Up to this many rows (aisles) get a panel (line) each in the plots; more get a summary."""


def row_power_series(result: EpisodeResult) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Per-interval row power for plotting: mean, peak and limit (W), each shape (n, rows).

    With a per-tick record the mean and peak are over the ticks of each interval and the limit is
    the lowest limit seen in it; without one all three come from the end-of-interval telemetry.

    Returns:
        (mean_w, peak_w, limit_w, what) where `what` says which of the two it is.
    """
    if result.tick_row_power_w is not None and result.tick_row_limit_w is not None:
        m, n = len(result.tick_row_power_w), result.n_intervals
        if n and m % n == 0:
            shape = (n, m // n, result.tick_row_power_w.shape[1])
            w = result.tick_row_power_w.reshape(shape)
            lim = result.tick_row_limit_w.reshape(shape)
            return w.mean(axis=1), w.max(axis=1), lim.min(axis=1), "interval mean and peak"
    return result.row_power_w, result.row_power_w, result.row_limit_w, "end of interval"


def _render_plots(result: EpisodeResult, title: str) -> dict[str, bytes]:
    """Render every figure to PNG bytes (nothing is written to disk here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result.time_s
    spans = _fault_spans(result)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    out: dict[str, bytes] = {}

    def save(fig: Any, key: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[key] = buf.getvalue()

    # Row power vs limit: one panel per row, or a summary over rows for big datacenters.
    mean_w, peak_w, limit_w, what = row_power_series(result)
    n_rows = mean_w.shape[1]
    if n_rows <= MAX_ROW_PANELS:
        ncols = 1 if n_rows == 1 else 2
        nrows = math.ceil(n_rows / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(10, 1.2 + 2.3 * nrows), sharex=True,
                                 sharey=True, squeeze=False)
        for r, ax in enumerate(axes.flat):
            if r >= n_rows:
                ax.set_visible(False)
                continue
            ax.fill_between(t, mean_w[:, r] / 1e3, peak_w[:, r] / 1e3, color="tab:blue",
                            alpha=0.2, lw=0, label="mean to peak")
            ax.plot(t, mean_w[:, r] / 1e3, color="tab:blue", lw=1.3, label="mean power")
            ax.plot(t, limit_w[:, r] / 1e3, color="tab:red", lw=1.2, ls="--", label="limit")
            _shade_faults(ax, spans)
            ax.set_title(f"row {r}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if r % ncols == 0:
                ax.set_ylabel("row power (kW)")
            if r >= n_rows - ncols:
                ax.set_xlabel("time (s)")
        axes.flat[0].legend(fontsize=7, loc="lower right")
    else:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ratio_peak = 100.0 * peak_w / limit_w
        ratio_mean = 100.0 * mean_w / limit_w
        ax.plot(t, ratio_peak.max(axis=1), color="tab:red", lw=1.2, label="highest row, peak")
        ax.plot(t, ratio_mean.max(axis=1), color="tab:orange", lw=1.2, label="highest row, mean")
        ax.plot(t, np.median(ratio_mean, axis=1), color="tab:blue", lw=1.2,
                label="median row, mean")
        ax.axhline(100.0, color="k", ls="--", lw=1.0, label="limit")
        _shade_faults(ax, spans)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("row power / row limit (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}: row power ({what}) vs limit", fontsize=11)
    save(fig, "row_power")

    # Aisle inlet and hottest GPU per aisle.
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    n_aisles = result.aisle_inlet_c.shape[1]
    if n_aisles <= MAX_ROW_PANELS:
        for a in range(n_aisles):
            c = colors[a % len(colors)]
            ax1.plot(t, result.aisle_inlet_c[:, a], color=c, lw=1.4, label=f"aisle {a}")
            ax2.plot(t, result.aisle_max_gpu_temp_c[:, a], color=c, lw=1.4,
                     label=f"aisle {a} hottest GPU")
    else:
        for ax, data, what in ((ax1, result.aisle_inlet_c, "inlet"),
                               (ax2, result.aisle_max_gpu_temp_c, "hottest GPU")):
            ax.plot(t, data.max(axis=1), color="tab:red", lw=1.4, label=f"hottest aisle, {what}")
            ax.plot(t, np.median(data, axis=1), color="tab:blue", lw=1.4,
                    label=f"median aisle, {what}")
            ax.plot(t, data.min(axis=1), color="tab:cyan", lw=1.4, label=f"coolest aisle, {what}")
    ax2.plot(t, result.metrics["max_gpu_temp_c"], color="0.4", lw=0.8, ls=":",
             label="hottest GPU within interval")
    if result.slowdown_temp_c is not None:
        ax2.axhline(result.slowdown_temp_c, color="tab:red", ls="--", lw=1.2,
                    label=f"slowdown threshold {result.slowdown_temp_c:g} C")
    for ax in (ax1, ax2):
        _shade_faults(ax, spans)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax1.set_ylabel("aisle inlet (C)")
    ax1.set_title(f"{title}: aisle inlet and GPU temperature")
    ax2.set_ylabel("GPU temperature (C)")
    ax2.set_xlabel("time (s)")
    save(fig, "temperature")

    # Latency percentiles with SLOs.
    served = result.metrics["finished"] > 0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for ax, name, slos in ((ax1, "ttft", result.slo_ttft_s), (ax2, "tbt", result.slo_tbt_s)):
        p99 = np.where(served, result.metrics[f"{name}_p99_s"], np.nan)
        p50 = np.where(served, result.metrics[f"{name}_p50_s"], np.nan)
        ax.plot(t, p99, color="tab:blue", lw=1.4, marker=".", ms=3, label="P99")
        ax.plot(t, p50, color="tab:green", lw=1.0, marker=".", ms=3, label="P50")
        for k, slo in enumerate(sorted(set(np.round(slos, 9).tolist()))):
            pools = [result.pool_names[i] if i < len(result.pool_names) else str(i)
                     for i in np.flatnonzero(np.isclose(slos, slo))]
            ax.axhline(slo, color="tab:red", ls="--", lw=1.0, alpha=0.5 + 0.5 / (k + 1),
                       label=f"SLO {slo:g} s ({', '.join(pools)})")
        finite = np.concatenate([p99[np.isfinite(p99)], p50[np.isfinite(p50)], slos])
        finite = finite[finite > 0]
        if finite.size and finite.max() / finite.min() > 50:
            ax.set_yscale("log")
        _shade_faults(ax, spans)
        ax.set_ylabel(f"{name.upper()} (s)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    ax1.set_title(f"{title}: latency per interval (finished requests, all pools)")
    ax2.set_xlabel("time (s)")
    save(fig, "latency")

    # Energy per interval.
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.step(t, result.metrics["energy_j"] / 1e3, where="pre", color="tab:orange", lw=1.4,
            label="all servers")
    ax.step(t, result.metrics["gpu_energy_j"] / 1e3, where="pre", color="tab:purple", lw=1.0,
            ls="--", label="GPUs only")
    _shade_faults(ax, spans)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"energy per {result.interval_s:g} s interval (kJ)")
    ax.set_title(f"{title}: energy per interval")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save(fig, "energy")
    return out


# ---------------------------------------------------------------------------------- files
def _json_safe(summary: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in summary.items()}


def write_report(
    result: EpisodeResult, out_dir: Path | str, title: str, command: str = ""
) -> Path:
    """Write ``report.md``, ``summary.json`` and the PNG plots for `result` into `out_dir`.

    Everything (summary, Markdown, every figure) is computed in memory first; only then are the
    files written, each to a temporary name renamed into place, so a failure leaves no
    half-written report. Other files in `out_dir` are left alone.

    Args:
        result: The episode to report.
        out_dir: Folder to write into (created if missing).
        title: Report title (also used in the figure titles).
        command: The command line that produced the run, recorded in the report.

    Returns:
        Path of the written ``report.md``.

    Raises:
        ReportError: `result` has no intervals, or `out_dir` exists and is not a folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"write_report: field 'out_dir' is {str(out_dir)!r}, which is not a folder")
    summary = result.summary()
    pngs = _render_plots(result, title)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    payload = {
        "title": title,
        "scenario": result.scenario_name,
        "seed": result.seed,
        "controller": result.controller_name,
        "command": command,
        "date": now,
        "n_intervals": result.n_intervals,
        "interval_s": result.interval_s,
        "gpu_hour_usd": result.gpu_hour_usd,
        "wall_s": result.wall_s,
        "summary": _json_safe(summary),
        "units": {k: unit for k, (_, unit) in SUMMARY_FIELDS.items()},
    }
    summary_json = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    md = [
        f"# {title}",
        "",
        f"- scenario: `{result.scenario_name}`",
        f"- seed: {result.seed}",
        f"- controller: {result.controller_name}",
        f"- command: `{command or '(not recorded)'}`",
        f"- date: {now}",
        f"- simulated: {result.n_intervals} intervals of {result.interval_s:g} s "
        f"(wall time {result.wall_s:.1f} s)",
        f"- GPU-hour price: {result.gpu_hour_usd:g} USD",
        "",
        "## Summary",
        "",
        format_table(summary),
        "",
        "Latency: per-interval percentiles are all the backend reports, so P50 is the "
        "finished-weighted mean of the interval medians and P99 the maximum of the interval "
        "P99s (an upper bound of the episode P99). Throttling events count onsets: a GPU "
        "entering thermal slowdown, a row entering power capping.",
        "",
        "## Plots",
        "",
        f"![row power vs limit]({PLOT_FILES['row_power']})",
        "",
        f"![aisle inlet and GPU temperature]({PLOT_FILES['temperature']})",
        "",
        f"![TTFT and TBT over time]({PLOT_FILES['latency']})",
        "",
        f"![energy per interval]({PLOT_FILES['energy']})",
        "",
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, data in pngs.items():
        write_file_atomic(out_dir / PLOT_FILES[key], data)
    write_file_atomic(out_dir / "summary.json", summary_json.encode())
    report = out_dir / "report.md"
    write_file_atomic(report, "\n".join(md).encode())
    return report
