"""One episode's record: the metric table, `EpisodeResult` and its summary, the recorder.

`EpisodeRecorder` turns what crosses the backend seam after each control interval (the
interval's `ServiceMetrics`, the end-of-interval `Telemetry`, the reward and the shield's
overrides) into per-interval numpy arrays, and builds an `EpisodeResult` at the end. Every
episode is recorded by it: the runner of `envs.rollout` (evaluation, comparison and sweep
cells, the fixed-configuration simulation) and the live loop of `controllers.live`.

`EpisodeResult.summary` reduces an episode to the headline figures: DynamoLLM's three metrics
(energy, operational carbon, GPU-hour cost), latency percentiles, SLO attainment, throttling
events and the peaks of row power and GPU temperature. `METRICS` is the one table of those
figures (key, label, unit, column label): the report table (`SUMMARY_FIELDS`) and the
comparison tables of `scripts.compare`, the sweep and the evaluation job
(`COMPARISON_COLUMNS`) are read from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from llm_cluster_gym.envs.backend import (
    BackendDescription,
    ServiceMetrics,
    Telemetry,
    TickHistory,
    slo_attainment,
)
from llm_cluster_gym.envs.latency import histogram_percentile


class ReportError(ValueError):
    """Bad input to the episode runner or the report writer; the message names field and value."""


@dataclass(frozen=True)
class Metric:
    """One headline figure of an episode.

    Attributes:
        key: Key in `EpisodeResult.summary` (or in a measured cell's summary).
        label: Long label (report tables).
        unit: Unit of the value.
        column: Short label (comparison table columns).
        in_summary: True when `EpisodeResult.summary` gives it; False for figures a measured
            cell adds (the shield's overrides).
    """

    key: str
    label: str
    unit: str
    column: str
    in_summary: bool = True


METRICS: tuple[Metric, ...] = (
    Metric("duration_s", "simulated time", "s", "time s"),
    Metric("energy_kwh", "energy (servers, incl. overhead)", "kWh", "energy kWh"),
    Metric("gpu_energy_kwh", "energy (GPUs only)", "kWh", "GPU kWh"),
    Metric("facility_energy_kwh", "energy (facility: servers x PUE)", "kWh", "facility kWh"),
    Metric("energy_per_token_j", "energy per output token", "J", "J/token"),
    Metric("carbon_kg", "operational carbon (facility energy x grid intensity)", "kg CO2", "carbon kg"),
    Metric("gpu_hours", "GPU-hours (GPUs of powered SaaS servers)", "GPU h", "GPU h"),
    Metric("servers_powered_mean", "powered servers (time mean; off servers excluded)", "servers",
           "powered srv"),
    Metric("cost_usd", "GPU-hour cost", "USD", "cost USD"),
    Metric("ttft_p50_s", "TTFT P50", "s", "TTFT P50 s"),
    Metric("ttft_p99_s", "TTFT P99", "s", "TTFT P99 s"),
    Metric("ttft_p99_worst_interval_s", "TTFT P99 of the worst interval", "s", "worst TTFT P99 s"),
    Metric("tbt_p50_s", "TBT P50", "s", "TBT P50 s"),
    Metric("tbt_p99_s", "TBT P99", "s", "TBT P99 s"),
    Metric("tbt_p99_worst_interval_s", "TBT P99 of the worst interval", "s", "worst TBT P99 s"),
    Metric("slo_attainment", "SLO attainment (all arrivals)", "fraction", "SLO att."),
    Metric("thermal_throttle_events", "thermal throttling events (GPU onsets)", "count",
           "thermal ev."),
    Metric("power_throttle_events", "power capping events (row onsets)", "count", "power ev."),
    Metric("thermal_throttled_gpu_s", "GPU time under thermal slowdown", "GPU s", "throttled GPU s"),
    Metric("saas_throttled_gpu_s", "GPU time under thermal slowdown, SaaS servers", "GPU s",
           "SaaS throttled GPU s"),
    Metric("iaas_throttled_gpu_s", "GPU time under thermal slowdown, IaaS servers", "GPU s",
           "IaaS throttled GPU s"),
    Metric("power_capped_gpu_s", "GPU time under row power capping", "GPU s", "capped GPU s"),
    Metric("saas_capped_gpu_s", "GPU time under row power capping, SaaS servers", "GPU s",
           "SaaS capped GPU s"),
    Metric("iaas_capped_gpu_s", "GPU time under row power capping, IaaS servers", "GPU s",
           "IaaS capped GPU s"),
    Metric("clock_lost_mhz_s", "clock lost to throttling and capping (GPUs at work)", "MHz s",
           "clock lost MHz s"),
    Metric("saas_clock_lost_mhz_s", "clock lost to throttling and capping, SaaS GPUs", "MHz s",
           "SaaS clock lost MHz s"),
    Metric("iaas_clock_lost_mhz_s", "clock lost to throttling and capping, IaaS GPUs", "MHz s",
           "IaaS clock lost MHz s"),
    Metric("saas_tokens_lost", "output tokens lost to throttling and capping, SaaS instances (first "
           "order: same batch at the set clock)", "tokens", "SaaS tokens lost"),
    Metric("peak_row_power_kw", "peak row power", "kW", "peak row kW"),
    Metric("max_gpu_temp_c", "max GPU temperature", "C", "max temp C"),
    Metric("vm_wait_h", "VM-hours waiting for placement (IaaS; tick resolution)", "VM h",
           "VM wait h"),
    Metric("vm_hours", "VM-hours hosted (IaaS)", "VM h", "VM h"),
    Metric("tokens_generated", "output tokens generated", "tokens", "tokens"),
    Metric("requests_arrived", "requests arrived", "count", "arrived"),
    Metric("requests_finished", "requests finished", "count", "finished"),
    Metric("requests_dropped", "requests dropped", "count", "dropped"),
    Metric("shield_overrides", "intervals the shield overrode the policy", "count", "overrides",
           in_summary=False),
    Metric("shield_overrides_avoidable",
           "intervals the shield overrode the policy outside declared emergencies", "count",
           "avoidable overrides", in_summary=False),
)
"""Every headline figure, in the order of the report table."""

METRIC_BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}

HARM_KEYS: tuple[str, ...] = (
    "thermal_throttled_gpu_s", "saas_throttled_gpu_s", "iaas_throttled_gpu_s",
    "power_capped_gpu_s", "saas_capped_gpu_s", "iaas_capped_gpu_s",
    "clock_lost_mhz_s", "saas_clock_lost_mhz_s", "iaas_clock_lost_mhz_s", "saas_tokens_lost")
"""Throttling harm summed over an episode (GPU-seconds, MHz x s), beside the event counts."""

SUMMARY_FIELDS: dict[str, tuple[str, str]] = {m.key: (m.label, m.unit) for m in METRICS
                                              if m.in_summary}
"""Keys of `EpisodeResult.summary` -> (label, unit), in table order."""

COMPARISON_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (k, METRIC_BY_KEY[k].column) for k in (
        "energy_kwh", "energy_per_token_j", "slo_attainment", "ttft_p99_s", "tbt_p99_s",
        "thermal_throttle_events", "power_throttle_events", "peak_row_power_kw",
        "max_gpu_temp_c", "vm_wait_h", "shield_overrides", "shield_overrides_avoidable"))
"""(key, column label) of the tables comparing policies (compare, sweep, evaluation job)."""


@dataclass
class EpisodeResult:
    """Per-interval history of one episode (arrays indexed by control interval).

    Attributes:
        scenario_name: Name of the scenario (or "unknown" for a backend without one).
        seed: Seed of the episode.
        controller_name: Name of the policy, or "fixed" for the configuration held throughout.
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
        slowdown_temp_c: GPU thermal slowdown threshold (C), if the backend knows it.
        gpu_hour_usd: Price of one GPU-hour (USD) used for the cost line.
        wall_s: Wall-clock time the episode took (s).
        tick_time_s: End time of each simulator tick (s), shape (m,), or None when the backend
            kept no per-tick record.
        tick_row_power_w: Row power at each tick (W), shape (m, rows), or None.
        tick_row_limit_w: Row power limit at each tick (W), shape (m, rows), or None.
        ttft_hist: Finished requests per TTFT bin (`envs.latency`) of each interval, shape
            (n, bins), or None when the backend reports no histograms.
        tbt_hist: The same for TBT.
        reward: The env's reward of each interval, shape (n,) (empty when not recorded).
        shield_overrides: Reasons the shield overrode the policy in each interval (() when it
            did not, or there is no shield).
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
    reward: np.ndarray = field(default_factory=lambda: np.zeros(0))
    shield_overrides: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def n_intervals(self) -> int:
        """Number of control intervals recorded."""
        return len(self.time_s)

    def override_count(self) -> int:
        """Intervals in which the shield overrode the policy."""
        return sum(bool(o) for o in self.shield_overrides)

    def avoidable_override_count(self) -> int:
        """Intervals the shield overrode the policy for a reason besides a declared emergency.

        While a fault is declared the shield applies its emergency fallback whatever the policy
        proposed (`controllers.shield`), so those intervals say nothing about the policy; the
        others (a row, a temperature, a placement, capacity, pacing) are the policy's own.
        """
        return sum(any(not r.startswith("emergency") for r in o) for o in self.shield_overrides)

    def summary(self) -> dict[str, float]:
        """The headline table as plain floats (see `SUMMARY_FIELDS` for labels and units).

        Energy, carbon, GPU-hours, tokens, requests and throttling events are sums over the
        intervals. SLO attainment counts every arrival (`envs.backend.slo_attainment`): the
        requests that finished within both SLOs over every request of the episode, where
        dropped requests and the requests still in flight after the last interval are
        violations; NaN when there was no request at all. It is never above the served fraction
        (``requests_finished / requests_arrived``), and serving nothing gives 0.

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
            when no token was generated, latencies are NaN when no request finished,
            ``slo_attainment`` is NaN when there was no request at all.

        Raises:
            ReportError: No interval was recorded.
        """
        if self.n_intervals == 0:
            raise ReportError("EpisodeResult.summary: field 'time_s' is empty (no interval was run)")
        m = self.metrics
        finished = m["finished"]
        served = finished > 0
        energy_j = float(m["energy_j"].sum())
        tokens = float(m["tokens_generated"].sum())
        n_finished = float(finished.sum())
        n_arrived = float(m["arrived"].sum())
        n_dropped = float(m["dropped"].sum())
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
            "gpu_energy_kwh": float(m["gpu_energy_j"].sum()) / 3.6e6,
            "facility_energy_kwh": float(m["facility_energy_j"].sum()) / 3.6e6,
            "energy_per_token_j": energy_j / tokens if tokens > 0 else math.nan,
            "carbon_kg": float(m["carbon_g"].sum()) / 1000.0,
            "gpu_hours": gpu_hours,
            "cost_usd": gpu_hours * self.gpu_hour_usd,
            "servers_powered_mean": (float(np.mean(m["servers_powered"])) if "servers_powered" in m
                                     else math.nan),
            "ttft_p50_s": percentile(self.ttft_hist, 50.0, "ttft_p50_s"),
            "ttft_p99_s": percentile(self.ttft_hist, 99.0, "ttft_p99_s"),
            "ttft_p99_worst_interval_s": worst("ttft_p99_s"),
            "tbt_p50_s": percentile(self.tbt_hist, 50.0, "tbt_p50_s"),
            "tbt_p99_s": percentile(self.tbt_hist, 99.0, "tbt_p99_s"),
            "tbt_p99_worst_interval_s": worst("tbt_p99_s"),
            "slo_attainment": slo_attainment(
                n_finished, float(m["slo_violations"].sum()), n_dropped,
                unserved=max(float(m["in_flight"][-1]), 0.0), arrived=n_arrived),
            "thermal_throttle_events": float(m["thermal_throttle_events"].sum()),
            "power_throttle_events": float(m["power_throttle_events"].sum()),
            **{k: float(m[k].sum()) if k in m else math.nan for k in HARM_KEYS},
            "peak_row_power_kw": float(m["peak_row_power_w"].max()) / 1000.0,
            "max_gpu_temp_c": float(m["max_gpu_temp_c"].max()),
            "vm_wait_h": float(m["vm_wait_s"].sum()) / 3600.0 if "vm_wait_s" in m else math.nan,
            "vm_hours": float(m["vm_running_s"].sum()) / 3600.0 if "vm_running_s" in m else math.nan,
            "tokens_generated": tokens,
            "requests_arrived": n_arrived,
            "requests_finished": n_finished,
            "requests_dropped": n_dropped,
        }


def skip_warmup(result: EpisodeResult, n: int) -> EpisodeResult:
    """The result without its first `n` intervals (start-up reconfiguration and queues).

    Raises:
        ValueError: `n` leaves no interval.
    """
    if n <= 0:
        return result
    if n >= result.n_intervals:
        raise ValueError(f"warm-up of {n} intervals leaves nothing of {result.n_intervals}")
    tick = {}
    if result.tick_time_s is not None:
        per = len(result.tick_time_s) // result.n_intervals
        for k in ("tick_time_s", "tick_row_power_w", "tick_row_limit_w"):
            tick[k] = getattr(result, k)[n * per:]
    return dataclasses.replace(
        result, time_s=result.time_s[n:], metrics={k: v[n:] for k, v in result.metrics.items()},
        row_power_w=result.row_power_w[n:], row_limit_w=result.row_limit_w[n:],
        aisle_inlet_c=result.aisle_inlet_c[n:],
        aisle_max_gpu_temp_c=result.aisle_max_gpu_temp_c[n:],
        active_faults=result.active_faults[n:],
        ttft_hist=None if result.ttft_hist is None else result.ttft_hist[n:],
        tbt_hist=None if result.tbt_hist is None else result.tbt_hist[n:],
        reward=result.reward[n:], shield_overrides=result.shield_overrides[n:], **tick)


class EpisodeRecorder:
    """Collects an episode interval by interval and builds its `EpisodeResult`.

    Args:
        description: The backend's description (layout, scenario name, price, slowdown).
        seed: Seed of the episode (recorded as is).
        controller_name: Name of the policy ("fixed" when none).
    """

    def __init__(self, description: BackendDescription, seed: int | None,
                 controller_name: str) -> None:
        self.description = description
        self.seed = seed
        self.controller_name = controller_name
        lay = description.layout
        self._gpu_aisle = np.repeat(np.asarray(lay.server_aisle), lay.gpus_per_server)
        self._rows: list[dict[str, float]] = []
        self._times: list[float] = []
        self._row_w: list[np.ndarray] = []
        self._row_lim: list[np.ndarray] = []
        self._inlet: list[np.ndarray] = []
        self._aisle_temp: list[np.ndarray] = []
        self._faults: list[tuple[str, ...]] = []
        self._ttft_hist: list[np.ndarray] = []
        self._tbt_hist: list[np.ndarray] = []
        self._reward: list[float] = []
        self._overrides: list[tuple[str, ...]] = []

    @property
    def n_intervals(self) -> int:
        """Intervals recorded so far."""
        return len(self._rows)

    def record(self, metrics: ServiceMetrics, telemetry: Telemetry, reward: float = math.nan,
               overrides: tuple[str, ...] = ()) -> None:
        """Add one interval: its metrics, the telemetry at its end, its reward and overrides."""
        self._rows.append(metrics.as_dict())
        self._ttft_hist.append(metrics.ttft_hist)
        self._tbt_hist.append(metrics.tbt_hist)
        tel = telemetry
        self._times.append(tel.time_s)
        self._row_w.append(np.asarray(tel.row_power_w, dtype=float))
        self._row_lim.append(np.asarray(tel.row_limit_w, dtype=float))
        self._inlet.append(np.asarray(tel.aisle_inlet_c, dtype=float))
        hottest = np.full(self.description.layout.n_aisles, -np.inf)
        np.maximum.at(hottest, self._gpu_aisle, np.asarray(tel.gpu_temp_c, dtype=float))
        self._aisle_temp.append(hottest)
        self._faults.append(tuple(tel.active_faults))
        self._reward.append(float(reward))
        self._overrides.append(tuple(overrides))

    def totals(self, keys: tuple[str, ...]) -> dict[str, float]:
        """Sums over the intervals recorded so far of the named metrics."""
        return {k: float(sum(r[k] for r in self._rows)) for k in keys}

    def result(self, ticks: TickHistory | None = None, wall_s: float = 0.0) -> EpisodeResult:
        """The episode so far as an `EpisodeResult` (with the backend's per-tick history, if any)."""
        desc, lay = self.description, self.description.layout
        rows = self._rows
        keys = list(rows[0]) if rows else list(ServiceMetrics.__dataclass_fields__) + ["slo_attainment"]
        return EpisodeResult(
            scenario_name=desc.scenario_name or "unknown",
            seed=self.seed,
            controller_name=self.controller_name,
            interval_s=float(lay.control_interval_s),
            time_s=np.asarray(self._times, dtype=float),
            metrics={k: np.array([r.get(k, math.nan) for r in rows], dtype=float) for k in keys},
            row_power_w=_stack(self._row_w, lay.n_rows),
            row_limit_w=_stack(self._row_lim, lay.n_rows),
            aisle_inlet_c=_stack(self._inlet, lay.n_aisles),
            aisle_max_gpu_temp_c=_stack(self._aisle_temp, lay.n_aisles),
            active_faults=list(self._faults),
            slo_ttft_s=np.asarray(lay.slo_ttft_s, dtype=float),
            slo_tbt_s=np.asarray(lay.slo_tbt_s, dtype=float),
            pool_names=tuple(lay.pool_names),
            slowdown_temp_c=None if desc.slowdown_temp_c is None else float(desc.slowdown_temp_c),
            gpu_hour_usd=float(desc.gpu_hour_usd or 0.0),
            wall_s=wall_s,
            tick_time_s=None if ticks is None else ticks.time_s,
            tick_row_power_w=None if ticks is None else ticks.row_power_w,
            tick_row_limit_w=None if ticks is None else ticks.row_limit_w,
            ttft_hist=_stack_hist(self._ttft_hist),
            tbt_hist=_stack_hist(self._tbt_hist),
            reward=np.asarray(self._reward, dtype=float),
            shield_overrides=list(self._overrides),
        )


def _stack_hist(hists: list[np.ndarray]) -> np.ndarray | None:
    """Per-interval histograms as one float32 array (n, bins); None if none was reported."""
    if not hists or all(h.sum() == 0 for h in hists):
        return None
    return np.stack(hists).astype(np.float32)


def _stack(arrays: list[np.ndarray], width: int) -> np.ndarray:
    return np.vstack(arrays) if arrays else np.zeros((0, width))
