"""Prometheus metrics and the JSON-lines decision log of the live control loop.

Metric names (all prefixed ``llmgym_``) carry their unit, as Prometheus' naming guide asks. The
Grafana dashboard ``grafana_dashboard.json`` and the alert rules ``alerts.yaml`` beside this file
use them (``tests/test_prometheus.py`` evaluates both on a real Prometheus server).

Cardinality is bounded by the cluster's rows, aisles and pools and the action's length, never
by its GPUs: by default a GPU appears only in its row's aggregates (total power, hottest and mean
temperature, mean clock, GPUs slowed for temperature or capped). Per-GPU series
(``llmgym_gpu_*{gpu,row}``) exist only when asked for (``per_gpu=True``; ``llm-cluster deploy
--metrics-per-gpu``).

Scraping costs the control loop nothing: the loop renders the exposition once per decision
(:meth:`MetricsExporter.publish`, after the action is applied, so outside the decision latency)
and hands it to the HTTP endpoint, a process of its own (``metrics_server.py``) that answers
every scrape with the last rendering. Every scrape is one
decision's consistent snapshot; ``llmgym_decisions_total`` says which (decision ``n - 1`` of
the log), so a scrape can be checked against the decision log line for line.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.backend import ClusterLayout, PoolConfig, ServiceMetrics, Telemetry

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)

FAULT_KINDS = ("cooling_failure", "power_failure", "load_spike")
OVERRIDE_REASONS = ("row_power", "gpu_temp", "placement", "capacity", "resharding",
                    *(f"emergency:{k}" for k in FAULT_KINDS))
"""The shield's override reasons (`controllers.shield.Shield.act`), exported at 0 from the start
so that rates over them exist before the first override; combined emergencies
(``emergency:a+b``) appear when they happen."""
WORKER_EVENT_KINDS = ("killed", "failed", "restarted", "restart_failed", "rerouted", "dropped")
"""Kinds of `controllers.live.supervise.WorkerEvent`."""
FALLBACK_CAUSES = ("policy_error", "telemetry_lost", "shield_override")
"""Why the applied action was not the policy's own (``llmgym_fallback_active{cause}``)."""
REQUEST_OUTCOMES = ("arrived", "finished", "dropped")
DEFAULT_SLO_TARGET = 0.95
"""SLO attainment below which the ``LLMGymSLOAttainmentLow`` alert fires (deploy --slo-target)."""


class MetricsPortError(OSError):
    """The metrics endpoint cannot listen where asked (port in use, address not on this host)."""


class MetricsExporter:
    """Prometheus gauges and counters for one loop (own registry, optional HTTP endpoint).

    The loop calls :meth:`bind` once with the cluster's layout, then per decision
    :meth:`observe_decision` (and :meth:`observe_telemetry`, :meth:`observe_metrics` through
    it), which ends with :meth:`publish`.

    Args:
        port: Port of the HTTP endpoint (None: no server, the registry is still filled; 0:
            any free port, see :attr:`port`). A port that cannot be bound raises
            :class:`MetricsPortError`.
        addr: Address to bind (localhost by default: the endpoint is not for the network).
        per_gpu: Also export one series per GPU (``llmgym_gpu_*``); off by default, as their
            number grows with the cluster (1,024 GPUs x 4 series on ``medium``).
        slo_target: SLO attainment target exported as ``llmgym_slo_attainment_target_ratio``
            (the alert rules compare with it).
    """

    def __init__(self, port: int | None = 9108, addr: str = "127.0.0.1", per_gpu: bool = False,
                 slo_target: float = DEFAULT_SLO_TARGET) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        if not 0.0 <= slo_target <= 1.0:
            raise ValueError(f"MetricsExporter: field 'slo_target' must be in [0, 1], got {slo_target}")
        self.registry = reg = CollectorRegistry()
        self.per_gpu = bool(per_gpu)
        p = "llmgym_"

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return Gauge(p + name, doc, list(labels), registry=reg)

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            return Counter(p + name, doc, list(labels), registry=reg)

        # Rows and aisles (what the power and cooling limits are about).
        self.row_power = gauge("row_power_watts", "Row power (servers, GPUs and IaaS VMs)", ["row"])
        self.row_limit = gauge("row_power_limit_watts", "Row power limit in force", ["row"])
        self.row_gpu_power = gauge("row_gpu_power_watts", "Sum of the row's GPU power", ["row"])
        self.row_temp_max = gauge("row_gpu_temperature_max_celsius", "Hottest GPU of the row",
                                  ["row"])
        self.row_temp_mean = gauge("row_gpu_temperature_mean_celsius",
                                   "Mean GPU temperature of the row", ["row"])
        self.row_clock = gauge("row_gpu_sm_clock_mean_mhz", "Mean GPU SM clock of the row", ["row"])
        self.row_throttled = gauge("row_gpus_thermally_throttled",
                                   "GPUs of the row slowed for temperature", ["row"])
        self.row_capped = gauge("row_gpus_power_capped", "GPUs of the row under power capping",
                                ["row"])
        self.row_gpus = gauge("row_gpus", "GPUs in the row", ["row"])
        self.slowdown_temp = gauge("gpu_slowdown_temperature_celsius",
                                   "GPU thermal slowdown temperature (NaN when unknown)")
        self.inlet = gauge("aisle_inlet_celsius", "Aisle inlet temperature", ["aisle"])
        self.fault = gauge("active_fault", "Active fault or drill (0/1)", ["kind"])
        # Per GPU, on request only.
        if self.per_gpu:
            self.gpu_power = gauge("gpu_power_watts", "GPU power (1 s mean)", ["gpu", "row"])
            self.gpu_temp = gauge("gpu_temperature_celsius", "GPU temperature", ["gpu", "row"])
            self.gpu_clock = gauge("gpu_sm_clock_mhz", "GPU SM clock", ["gpu", "row"])
            self.gpu_thermal = gauge("gpu_thermal_throttled", "GPU slowed for temperature (0/1)",
                                     ["gpu", "row"])
        # Service.
        self.thermal_events = counter("thermal_throttle_events", "Thermal throttling events")
        self.power_events = counter("power_throttle_events",
                                    "Power throttling / budget exceedance events")
        self.requests = counter("requests", "Requests by outcome", ["outcome"])
        self.slo_violations = counter("slo_violations", "Finished requests missing an SLO")
        self.energy = counter("energy_joules", "Energy")
        self.slo_attainment = gauge("slo_attainment_ratio", "SLO attainment of the last interval")
        self.slo_target = gauge("slo_attainment_target_ratio", "SLO attainment target (alerts)")
        self.slo_target.set(float(slo_target))
        self.ttft_p99 = gauge("ttft_p99_seconds", "TTFT P99 of the last interval")
        self.tbt_p99 = gauge("tbt_p99_seconds", "TBT P99 of the last interval")
        # Pools.
        self.pool_freq = gauge("pool_freq_mhz", "Pool clock requested", ["pool"])
        self.pool_batch = gauge("pool_max_batch", "Pool batch cap", ["pool"])
        self.pool_inst = gauge("pool_instances", "Pool instances", ["pool"])
        self.pool_arrivals = counter("pool_arrivals", "Requests routed to the pool", ["pool"])
        self.pool_queued = gauge("pool_queued_requests", "Requests queued in the pool", ["pool"])
        self.pool_running = gauge("pool_running_requests", "Requests running in the pool",
                                  ["pool"])
        # Decisions.
        self.decisions = counter("decisions", "Control decisions applied")
        self.action = gauge("action_value", "Action vector entry", ["dim"])
        self.admit = gauge("admit_fraction", "Admitted fraction (power governor)")
        self.overrides = counter("shield_overrides", "Shield overrides by reason", ["reason"])
        self.fallback = gauge("fallback_active", "The last decision's action was not the policy's "
                              "own (0/1), by cause", ["cause"])
        self.policy_errors = counter("policy_errors", "Policy exceptions (fallback used)")
        self.telemetry_errors = counter("telemetry_errors", "Failed telemetry reads")
        self.worker_events = counter("worker_events", "Worker supervision events", ["kind"])
        self.latency = Histogram(p + "decision_latency_seconds", "Telemetry read to action "
                                 "applied", buckets=LATENCY_BUCKETS_S, registry=reg)
        self.policy_latency = Histogram(p + "policy_latency_seconds", "Policy (with shield) act()",
                                        buckets=LATENCY_BUCKETS_S, registry=reg)
        for k in REQUEST_OUTCOMES:
            self.requests.labels(k)
        for r in OVERRIDE_REASONS:
            self.overrides.labels(r)
        for k in WORKER_EVENT_KINDS:
            self.worker_events.labels(k)
        for k in FAULT_KINDS:
            self.fault.labels(k).set(0.0)
        for c in FALLBACK_CAUSES:
            self.fallback.labels(c).set(0.0)
        self.slowdown_temp.set(float("nan"))
        self._gpu_row = np.zeros(0, dtype=np.int64)
        self._row_gpus = np.zeros(0)
        self._gpu_children: list[tuple[Any, Any, Any, Any]] = []
        self._server: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        if port is not None:
            self._server, self.port = _start_server(addr, port)
        self.publish()

    # ------------------------------------------------------------------ observing
    def bind(self, layout: ClusterLayout, slowdown_temp_c: float | None = None) -> None:
        """Learn which row each GPU is in (and export the static per-row figures)."""
        self._gpu_row = np.repeat(np.asarray(layout.server_row, dtype=np.int64),
                                  layout.gpus_per_server)
        self._row_gpus = np.bincount(self._gpu_row, minlength=layout.n_rows).astype(float)
        for r, n in enumerate(self._row_gpus):
            self.row_gpus.labels(str(r)).set(float(n))
        self.slowdown_temp.set(float("nan") if slowdown_temp_c is None else float(slowdown_temp_c))
        if self.per_gpu:
            self._gpu_children = [
                tuple(g.labels(str(i), str(r)) for g in (self.gpu_power, self.gpu_temp,
                                                        self.gpu_clock, self.gpu_thermal))
                for i, r in enumerate(self._gpu_row)]

    def observe_telemetry(self, tel: Telemetry) -> None:
        """Row and aisle gauges (and per-GPU ones when asked for) from one snapshot."""
        n_rows = len(tel.row_power_w)
        for r, (pw, lim) in enumerate(zip(tel.row_power_w, tel.row_limit_w, strict=True)):
            self.row_power.labels(str(r)).set(_num(pw))
            self.row_limit.labels(str(r)).set(_num(lim))
        gpu_row = self._gpu_row
        if len(gpu_row) == len(tel.gpu_power_w) and len(gpu_row):
            count = np.maximum(self._row_gpus[:n_rows], 1.0)
            power = np.bincount(gpu_row, np.asarray(tel.gpu_power_w, float), n_rows)
            temp = np.asarray(tel.gpu_temp_c, float)
            temp_sum = np.bincount(gpu_row, temp, n_rows)
            temp_max = np.full(n_rows, -np.inf)
            np.maximum.at(temp_max, gpu_row, temp)
            clock = np.bincount(gpu_row, np.asarray(tel.gpu_freq_mhz, float), n_rows)
            thr = np.bincount(gpu_row, np.asarray(tel.gpu_thermal_throttled, float), n_rows)
            cap = np.bincount(gpu_row, np.asarray(tel.gpu_power_capped, float), n_rows)
            for r in range(n_rows):
                row = str(r)
                self.row_gpu_power.labels(row).set(_num(power[r]))
                self.row_temp_max.labels(row).set(_num(temp_max[r]))
                self.row_temp_mean.labels(row).set(_num(temp_sum[r] / count[r]))
                self.row_clock.labels(row).set(_num(clock[r] / count[r]))
                self.row_throttled.labels(row).set(float(thr[r]))
                self.row_capped.labels(row).set(float(cap[r]))
        if self._gpu_children:
            for (gp, gt, gc, gth), pw, tc, f, th in zip(
                    self._gpu_children, tel.gpu_power_w, tel.gpu_temp_c, tel.gpu_freq_mhz,
                    tel.gpu_thermal_throttled, strict=True):
                gp.set(_num(pw))
                gt.set(_num(tc))
                gc.set(_num(f))
                gth.set(float(bool(th)))
        for a, c in enumerate(tel.aisle_inlet_c):
            self.inlet.labels(str(a)).set(_num(c))
        for kind in FAULT_KINDS:
            self.fault.labels(kind).set(float(any(f.startswith(kind) for f in tel.active_faults)))

    def observe_metrics(self, m: ServiceMetrics, pool_names: Sequence[str] = ()) -> None:
        """Counters and gauges of one interval's service metrics (per pool when named)."""
        self.thermal_events.inc(max(0, m.thermal_throttle_events))
        self.power_events.inc(max(0, m.power_throttle_events))
        for k in REQUEST_OUTCOMES:
            self.requests.labels(k).inc(max(0, getattr(m, k)))
        self.slo_violations.inc(max(0, m.slo_violations))
        self.energy.inc(max(0.0, _num(m.energy_j)))
        self.slo_attainment.set(m.slo_attainment)
        self.ttft_p99.set(_num(m.ttft_p99_s))
        self.tbt_p99.set(_num(m.tbt_p99_s))
        for i, name in enumerate(pool_names):
            if i < len(m.arrivals_per_pool):
                self.pool_arrivals.labels(name).inc(max(0.0, _num(m.arrivals_per_pool[i])))
            if i < len(m.queued_per_pool):
                self.pool_queued.labels(name).set(_num(m.queued_per_pool[i]))
            if i < len(m.running_per_pool):
                self.pool_running.labels(name).set(_num(m.running_per_pool[i]))

    def observe_decision(self, *, telemetry: Telemetry, action: Sequence[float],
                         pool_names: Sequence[str], pools: Sequence[PoolConfig],
                         admit_fraction: float | None, override: Sequence[str],
                         policy_error: bool, telemetry_stale: bool,
                         worker_events: Sequence[dict[str, Any]], latency_s: float,
                         policy_latency_s: float, metrics: ServiceMetrics | None) -> None:
        """Everything about one decision, then :meth:`publish` (the loop calls this once per step).

        Args:
            telemetry: The snapshot the decision used.
            action: The applied action vector.
            pool_names: The layout's pool names.
            pools: The pools' configuration after the action.
            admit_fraction: The governor's admitted fraction (None: no governor).
            override: The shield's override reasons for the applied action.
            policy_error: The policy raised and the fallback acted.
            telemetry_stale: The telemetry read failed (last good snapshot used).
            worker_events: Worker supervision events since the last decision.
            latency_s: Decision latency (telemetry read to action applied).
            policy_latency_s: The policy's ``act`` (shield included).
            metrics: The interval's service metrics (None when the backend gave none).
        """
        self.observe_telemetry(telemetry)
        self.decisions.inc()
        self.latency.observe(latency_s)
        self.policy_latency.observe(policy_latency_s)
        for i, v in enumerate(action):
            self.action.labels(str(i)).set(float(v))
        for name, p in zip(pool_names, pools, strict=True):
            self.pool_freq.labels(name).set(p.freq_mhz)
            self.pool_batch.labels(name).set(p.max_batch)
            self.pool_inst.labels(name).set(p.n_instances)
        if admit_fraction is not None:
            self.admit.set(admit_fraction)
        for r in override:
            self.overrides.labels(r).inc()
        overridden = any(r != "resharding" for r in override)  # resharding only paces TP
        for cause, on in zip(FALLBACK_CAUSES, (policy_error, telemetry_stale, overridden),
                             strict=True):
            self.fallback.labels(cause).set(float(bool(on)))
        if policy_error:
            self.policy_errors.inc()
        if telemetry_stale:
            self.telemetry_errors.inc()
        for ev in worker_events:
            self.worker_events.labels(ev["kind"]).inc()
        if metrics is not None:
            self.observe_metrics(metrics, pool_names)
        self.publish()

    # ------------------------------------------------------------------ serving
    def publish(self) -> bytes:
        """Render the registry once; scrapes get these bytes until the next call."""
        from prometheus_client import generate_latest

        body = generate_latest(self.registry)
        server = self._server
        if server is not None and server.stdin is not None:
            try:
                server.stdin.write(struct.pack("!I", len(body)) + body)
                server.stdin.flush()
            except OSError as exc:  # the endpoint died: keep controlling, say so once
                warnings.warn(f"metrics endpoint on port {self.port} stopped ({exc}); the loop "
                              "goes on without it", RuntimeWarning, stacklevel=2)
                self._stop_server()
        return body

    def close(self) -> None:
        """Stop the HTTP endpoint (its process ends when its input closes)."""
        self._stop_server()

    def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        try:
            if server.stdin is not None:
                server.stdin.close()
        except OSError:
            pass
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _start_server(addr: str, port: int) -> tuple[subprocess.Popen[bytes], int]:
    """Bind ``addr:port`` here (errors surface in the caller) and serve it from a child process.

    The child (`controllers/live/metrics_server.py`, run as a script: standard library only)
    inherits the listening socket and answers scrapes with the last rendering written to its
    stdin, so that scrapes never take the control loop's interpreter lock.
    """
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        sock = socket.create_server((addr, port), family=family, backlog=64)
    except OSError as exc:
        raise MetricsPortError(f"metrics endpoint: cannot listen on {addr}:{port} "
                               f"({os.strerror(exc.errno) if exc.errno else exc}); "
                               "choose another port (0: any free one)") from None
    try:
        script = Path(__file__).with_name("metrics_server.py")
        proc = subprocess.Popen([sys.executable, "-I", str(script), str(sock.fileno())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                pass_fds=(sock.fileno(),), close_fds=True)
        return proc, int(sock.getsockname()[1])
    finally:
        sock.close()  # the child holds it now


def _num(v: Any) -> float:
    f = float(v)
    return f if math.isfinite(f) else float("nan")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.integer, bool, np.bool_)):
        return int(v) if not isinstance(v, (bool, np.bool_)) else bool(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return round(f, 6) if math.isfinite(f) else None
    return v


class DecisionLog:
    """Append-only JSON-lines file, one object per record, flushed after every line.

    Args:
        path: Output file (parents created). None keeps records in memory only.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.records: list[dict[str, Any]] = []
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (NaN/inf become null; numpy values become plain numbers)."""
        rec = _jsonable(record)
        self.records.append(rec)
        if self._fh is not None:
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._fh.flush()

    def close(self) -> None:
        """Flush to disk (fsync) and close."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
