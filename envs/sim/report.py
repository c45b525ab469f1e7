"""Run a whole episode on any cluster backend and write a report (table, JSON, plots).

`run_episode` drives a `ClusterBackend` (simulated or real) from `reset` to `done`, optionally
under a controller, and keeps per-interval service metrics and telemetry summaries in numpy
arrays (`EpisodeResult`). `EpisodeResult.summary` reduces them to the headline table: DynamoLLM's
three metrics (energy, operational carbon, GPU-hour cost), latency percentiles, SLO attainment,
throttling events and the peaks of row power and GPU temperature. `write_report` turns a result
into ``report.md``, ``summary.json`` and PNG plots, writing nothing until everything has been
computed, and each file through a temporary name renamed into place.

Only what crosses the `envs.backend` seam is read (telemetry and metrics), plus optional
attributes a backend may have for nicer reports: ``scenario`` (name, GPU-hour price),
``n_intervals`` (progress-bar length), ``thermal.slowdown_temp_c`` (threshold line) and, when
``record_ticks`` is true, the per-tick ``record`` of `SimCluster` (row power within each interval:
mean and peak instead of a single end-of-interval reading).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from llm_cluster_gym.envs.backend import ClusterAction, ClusterBackend, ServiceMetrics, Telemetry
from llm_cluster_gym.envs.latency import histogram_percentile
from tqdm import tqdm


class ReportError(ValueError):
    """Bad input to the episode runner or the report writer; the message names field and value."""


class Controller(Protocol):
    """Anything that picks the next interval's action from what an operator can see."""

    def act(self, telemetry: Telemetry, metrics: ServiceMetrics | None) -> ClusterAction | None:
        """Return an action for the next interval, or None to keep the current configuration.

        Args:
            telemetry: Hardware state at the end of the last interval (after `reset` at first).
            metrics: Service metrics of the last interval; None before the first interval.
        """
        ...


# Headline table: key -> (label, unit). The order is the order of the printed table.
SUMMARY_FIELDS: dict[str, tuple[str, str]] = {
    "duration_s": ("simulated time", "s"),
    "energy_kwh": ("energy (servers, incl. overhead)", "kWh"),
    "energy_per_token_j": ("energy per output token", "J"),
    "carbon_kg": ("operational carbon", "kg CO2"),
    "gpu_hours": ("GPU-hours (serving instances)", "GPU h"),
    "cost_usd": ("GPU-hour cost", "USD"),
    "ttft_p50_s": ("TTFT P50", "s"),
    "ttft_p99_s": ("TTFT P99", "s"),
    "ttft_p99_worst_interval_s": ("TTFT P99 of the worst interval", "s"),
    "tbt_p50_s": ("TBT P50", "s"),
    "tbt_p99_s": ("TBT P99", "s"),
    "tbt_p99_worst_interval_s": ("TBT P99 of the worst interval", "s"),
    "slo_attainment": ("SLO attainment (finished requests)", "fraction"),
    "thermal_throttle_events": ("thermal throttling events (GPU onsets)", "count"),
    "power_throttle_events": ("power capping events (row onsets)", "count"),
    "peak_row_power_kw": ("peak row power", "kW"),
    "max_gpu_temp_c": ("max GPU temperature", "C"),
    "tokens_generated": ("output tokens generated", "tokens"),
    "requests_arrived": ("requests arrived", "count"),
    "requests_finished": ("requests finished", "count"),
    "requests_dropped": ("requests dropped", "count"),
}

PLOT_FILES = {
    "row_power": "row_power.png",
    "temperature": "temperature.png",
    "latency": "latency.png",
    "energy": "energy.png",
}


@dataclass
class EpisodeResult:
    """Per-interval history of one episode (arrays indexed by control interval).

    Attributes:
        scenario_name: Name of the scenario (or "unknown" for a backend without one).
        seed: Seed passed to `reset`.
        controller_name: Class name of the controller, or "fixed" for the scenario's configuration.
        interval_s: Control interval length (s).
        time_s: End time of each interval (s), shape (n,).
        metrics: Every scalar field of `ServiceMetrics` (plus ``slo_attainment``) as an array of
            shape (n,), keyed by field name (``energy_j``, ``ttft_p99_s``, ...).
        row_power_w: Row power at the end of each interval (W), shape (n, rows).
        row_limit_w: Row power limit at the end of each interval (W), shape (n, rows).
        aisle_inlet_c: Aisle inlet temperature at the end of each interval (C), shape (n, aisles).
        aisle_max_gpu_temp_c: Hottest GPU of each aisle at the end of each interval (C),
            shape (n, aisles).
        active_faults: Names of the faults active at the end of each interval.
        slo_ttft_s: TTFT SLO of each pool (s).
        slo_tbt_s: TBT SLO of each pool (s).
        pool_names: Name of each pool (labels of the SLO lines).
        slowdown_temp_c: GPU thermal slowdown threshold (C), if the backend exposes it.
        gpu_hour_usd: Price of one GPU-hour (USD) used for the cost line.
        wall_s: Wall-clock time the episode took (s).
        tick_time_s: End time of each simulator tick (s), shape (m,), or None when the backend
            kept no per-tick record.
        tick_row_power_w: Row power at each tick (W), shape (m, rows), or None.
        tick_row_limit_w: Row power limit at each tick (W), shape (m, rows), or None.
        ttft_hist: Finished requests per TTFT bin (`envs.latency`) of each interval, shape
            (n, bins), or None when the backend reports no histograms.
        tbt_hist: The same for TBT.
    """

    scenario_name: str
    seed: int | None
    controller_name: str
    interval_s: float
    time_s: np.ndarray
    metrics: dict[str, np.ndarray]
    row_power_w: np.ndarray
    row_limit_w: np.ndarray
    aisle_inlet_c: np.ndarray
    aisle_max_gpu_temp_c: np.ndarray
    active_faults: list[tuple[str, ...]] = field(default_factory=list)
    slo_ttft_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    slo_tbt_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pool_names: tuple[str, ...] = ()
    slowdown_temp_c: float | None = None
    gpu_hour_usd: float = 0.0
    wall_s: float = 0.0
    tick_time_s: np.ndarray | None = None
    tick_row_power_w: np.ndarray | None = None
    tick_row_limit_w: np.ndarray | None = None
    ttft_hist: np.ndarray | None = None
    tbt_hist: np.ndarray | None = None

    @property
    def n_intervals(self) -> int:
        """Number of control intervals recorded."""
        return len(self.time_s)

    def summary(self) -> dict[str, float]:
        """The headline table as plain floats (see `SUMMARY_FIELDS` for labels and units).

        Energy, carbon, GPU-hours, tokens, requests and throttling events are sums over the
        intervals. SLO attainment is over all finished requests (1 - violations / finished, the
        finished-weighted mean of the interval attainments).

        Latency: percentiles do not combine over intervals, counts do. ``*_p50_s`` and
        ``*_p99_s`` are the episode's percentiles over every finished request, read from the
        sum of the intervals' latency histograms (`envs.latency`: within one 12%-wide bin of
        the exact value). ``*_p99_worst_interval_s`` is the largest interval P99: the worst
        interval, which an SLO report also wants. Intervals that finished nothing are left
        out. Without histograms (a backend that reports none), P50 is the finished-weighted
        mean of the interval medians and P99 the worst interval's (an upper bound of the
        episode P99).

        Returns:
            Mapping from the keys of `SUMMARY_FIELDS` to values; ``energy_per_token_j`` is NaN
            when no token was generated, latencies are NaN when no request finished.
        """
        if self.n_intervals == 0:
            raise ReportError("EpisodeResult.summary: field 'time_s' is empty (no interval was run)")
        m = self.metrics
        finished = m["finished"]
        served = finished > 0
        energy_j = float(m["energy_j"].sum())
        tokens = float(m["tokens_generated"].sum())
        n_finished = float(finished.sum())
        gpu_hours = float(m["gpu_hours"].sum())

        def worst(key: str) -> float:
            return float(m[key][served].max()) if served.any() else math.nan

        def percentile(hist: np.ndarray | None, q: float, key: str) -> float:
            if not served.any():
                return math.nan
            if hist is not None and hist.sum() > 0:
                return histogram_percentile(hist.sum(axis=0, dtype=float), q)
            if q == 50.0:
                return float(np.average(m[key][served], weights=finished[served]))
            return worst(key)

        return {
            "duration_s": float(self.n_intervals * self.interval_s),
            "energy_kwh": energy_j / 3.6e6,
            "energy_per_token_j": energy_j / tokens if tokens > 0 else math.nan,
            "carbon_kg": float(m["carbon_g"].sum()) / 1000.0,
            "gpu_hours": gpu_hours,
            "cost_usd": gpu_hours * self.gpu_hour_usd,
            "ttft_p50_s": percentile(self.ttft_hist, 50.0, "ttft_p50_s"),
            "ttft_p99_s": percentile(self.ttft_hist, 99.0, "ttft_p99_s"),
            "ttft_p99_worst_interval_s": worst("ttft_p99_s"),
            "tbt_p50_s": percentile(self.tbt_hist, 50.0, "tbt_p50_s"),
            "tbt_p99_s": percentile(self.tbt_hist, 99.0, "tbt_p99_s"),
            "tbt_p99_worst_interval_s": worst("tbt_p99_s"),
            "slo_attainment": (1.0 - float(m["slo_violations"].sum()) / n_finished
                               if n_finished > 0 else 1.0),
            "thermal_throttle_events": float(m["thermal_throttle_events"].sum()),
            "power_throttle_events": float(m["power_throttle_events"].sum()),
            "peak_row_power_kw": float(m["peak_row_power_w"].max()) / 1000.0,
            "max_gpu_temp_c": float(m["max_gpu_temp_c"].max()),
            "tokens_generated": tokens,
            "requests_arrived": float(m["arrived"].sum()),
            "requests_finished": n_finished,
            "requests_dropped": float(m["dropped"].sum()),
        }


def run_episode(
    backend: ClusterBackend,
    controller: Controller | None = None,
    seed: int | None = 0,
    progress: bool = True,
    max_intervals: int | None = None,
) -> EpisodeResult:
    """Drive `backend` for a whole episode and collect per-interval metrics and telemetry.

    Each interval: the controller (if any) sees the latest telemetry and the last interval's
    metrics and may return an action, which is applied; then the backend advances one control
    interval. Without a controller the backend keeps the configuration `reset` gave it (the
    scenario's fixed configuration for `SimCluster`).

    Args:
        backend: Any `ClusterBackend` (e.g. `envs.sim.cluster.SimCluster`).
        controller: Object with ``act(telemetry, metrics) -> ClusterAction | None``, or None.
        seed: Seed for `backend.reset`.
        progress: Show a tqdm progress bar (on stderr).
        max_intervals: Stop after this many intervals even if the backend is not done (needed
            for backends whose `done` never becomes true, such as a live node).

    Returns:
        The episode's `EpisodeResult`.

    Raises:
        ReportError: ``max_intervals`` is not positive, or the controller returned something
            that is not a `ClusterAction` or None.
    """
    if max_intervals is not None and max_intervals <= 0:
        raise ReportError(f"run_episode: field 'max_intervals' must be > 0, got {max_intervals!r}")
    layout = backend.layout
    gpu_aisle = np.repeat(np.asarray(layout.server_aisle), layout.gpus_per_server)
    scenario = getattr(backend, "scenario", None)
    total = getattr(backend, "n_intervals", None)
    if max_intervals is not None:
        total = min(total, max_intervals) if total is not None else max_intervals
    name = str(getattr(scenario, "name", "unknown"))

    start = time.perf_counter()
    tel = backend.reset(seed=seed)
    metrics: ServiceMetrics | None = None
    rows: list[dict[str, float]] = []
    times, row_w, row_lim, inlet, aisle_temp, faults = [], [], [], [], [], []
    ttft_hist: list[np.ndarray] = []
    tbt_hist: list[np.ndarray] = []
    with tqdm(total=total, disable=not progress, desc=f"simulating {name}", unit="interval",
              leave=False) as bar:
        while not backend.done and (max_intervals is None or len(rows) < max_intervals):
            if controller is not None:
                action = controller.act(tel, metrics)
                if action is not None:
                    if not isinstance(action, ClusterAction):
                        raise ReportError(
                            f"run_episode: {type(controller).__name__}.act returned "
                            f"{type(action).__name__} ({action!r}); expected ClusterAction or None"
                        )
                    backend.apply(action)
            metrics = backend.advance()
            tel = backend.telemetry()
            rows.append(metrics.as_dict())
            ttft_hist.append(metrics.ttft_hist)
            tbt_hist.append(metrics.tbt_hist)
            times.append(tel.time_s)
            row_w.append(np.asarray(tel.row_power_w, dtype=float))
            row_lim.append(np.asarray(tel.row_limit_w, dtype=float))
            inlet.append(np.asarray(tel.aisle_inlet_c, dtype=float))
            hottest = np.full(layout.n_aisles, -np.inf)
            np.maximum.at(hottest, gpu_aisle, np.asarray(tel.gpu_temp_c, dtype=float))
            aisle_temp.append(hottest)
            faults.append(tuple(tel.active_faults))
            bar.update(1)
    tick_t, tick_w, tick_lim = _tick_record(backend, layout.n_rows)
    keys = list(rows[0]) if rows else list(ServiceMetrics.__dataclass_fields__) + ["slo_attainment"]
    thermal = getattr(backend, "thermal", None)
    slowdown = getattr(thermal, "slowdown_temp_c", None)
    return EpisodeResult(
        scenario_name=name,
        seed=seed,
        controller_name="fixed" if controller is None else type(controller).__name__,
        interval_s=float(layout.control_interval_s),
        time_s=np.asarray(times, dtype=float),
        metrics={k: np.array([r.get(k, math.nan) for r in rows], dtype=float) for k in keys},
        row_power_w=_stack(row_w, layout.n_rows),
        row_limit_w=_stack(row_lim, layout.n_rows),
        aisle_inlet_c=_stack(inlet, layout.n_aisles),
        aisle_max_gpu_temp_c=_stack(aisle_temp, layout.n_aisles),
        active_faults=faults,
        slo_ttft_s=np.asarray(layout.slo_ttft_s, dtype=float),
        slo_tbt_s=np.asarray(layout.slo_tbt_s, dtype=float),
        pool_names=tuple(layout.pool_names),
        slowdown_temp_c=None if slowdown is None else float(slowdown),
        gpu_hour_usd=float(getattr(scenario, "gpu_hour_usd", 0.0) or 0.0),
        wall_s=time.perf_counter() - start,
        tick_time_s=tick_t,
        tick_row_power_w=tick_w,
        tick_row_limit_w=tick_lim,
        ttft_hist=_stack_hist(ttft_hist),
        tbt_hist=_stack_hist(tbt_hist),
    )


def _stack_hist(hists: list[np.ndarray]) -> np.ndarray | None:
    """Per-interval histograms as one float32 array (n, bins); None if none was reported."""
    if not hists or all(h.sum() == 0 for h in hists):
        return None
    return np.stack(hists).astype(np.float32)


def _tick_record(
    backend: ClusterBackend, n_rows: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Per-tick row power and limits from a backend that recorded them (`SimCluster`), else None."""
    record = getattr(backend, "record", None)
    if not getattr(backend, "record_ticks", False) or record is None:
        return None, None, None
    t = getattr(record, "time_s", None)
    if not t:
        return None, None, None
    return (np.asarray(t, dtype=float), _stack(record.row_power_w, n_rows),
            _stack(record.row_limit_w, n_rows))


def _stack(arrays: list[np.ndarray], width: int) -> np.ndarray:
    return np.vstack(arrays) if arrays else np.zeros((0, width))


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


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    # open(..., "xb") honours the umask (mkstemp would make the file private).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        _write_atomic(out_dir / PLOT_FILES[key], data)
    _write_atomic(out_dir / "summary.json", summary_json.encode())
    report = out_dir / "report.md"
    _write_atomic(report, "\n".join(md).encode())
    return report
