"""Prometheus metrics and the JSON-lines decision log of the live control loop.

Metric names (all prefixed ``llmgym_``; the Grafana dashboard ``grafana_dashboard.json``
beside this file plots them) carry their unit, as Prometheus' naming guide asks.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from llm_cluster_gym.envs.backend import ServiceMetrics, Telemetry

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class MetricsExporter:
    """Prometheus gauges and counters for one loop (own registry, optional HTTP server).

    Args:
        port: Port of the HTTP endpoint (None: no server, the registry is still filled; 0:
            any free port, see :attr:`port`).
        addr: Address to bind (localhost by default: the endpoint is not for the network).
    """

    def __init__(self, port: int | None = 9108, addr: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        p = "llmgym_"
        self.gpu_power = Gauge(p + "gpu_power_watts", "GPU power (1 s mean)", ["gpu"], registry=reg)
        self.gpu_temp = Gauge(p + "gpu_temperature_celsius", "GPU temperature", ["gpu"],
                              registry=reg)
        self.gpu_clock = Gauge(p + "gpu_sm_clock_mhz", "GPU SM clock", ["gpu"], registry=reg)
        self.gpu_thermal = Gauge(p + "gpu_thermal_throttled", "GPU slowed for temperature (0/1)",
                                 ["gpu"], registry=reg)
        self.row_power = Gauge(p + "row_power_watts", "Row power", ["row"], registry=reg)
        self.row_limit = Gauge(p + "row_power_limit_watts", "Row power limit in force", ["row"],
                               registry=reg)
        self.inlet = Gauge(p + "aisle_inlet_celsius", "Aisle inlet temperature", ["aisle"],
                           registry=reg)
        self.fault = Gauge(p + "active_fault", "Active fault or drill (0/1)", ["kind"], registry=reg)
        self.thermal_events = Counter(p + "thermal_throttle_events", "Thermal throttling events",
                                      registry=reg)
        self.power_events = Counter(p + "power_throttle_events", "Power throttling / budget "
                                    "exceedance events", registry=reg)
        self.requests = Counter(p + "requests", "Requests by outcome", ["outcome"], registry=reg)
        self.slo_violations = Counter(p + "slo_violations", "Finished requests missing an SLO",
                                      registry=reg)
        self.energy = Counter(p + "energy_joules", "Energy", registry=reg)
        self.slo_attainment = Gauge(p + "slo_attainment_ratio", "SLO attainment of the last "
                                    "interval", registry=reg)
        self.ttft_p99 = Gauge(p + "ttft_p99_seconds", "TTFT P99 of the last interval",
                              registry=reg)
        self.tbt_p99 = Gauge(p + "tbt_p99_seconds", "TBT P99 of the last interval", registry=reg)
        self.decisions = Counter(p + "decisions", "Control decisions applied", registry=reg)
        self.action = Gauge(p + "action_value", "Action vector entry", ["dim"], registry=reg)
        self.pool_freq = Gauge(p + "pool_freq_mhz", "Pool clock requested", ["pool"], registry=reg)
        self.pool_batch = Gauge(p + "pool_max_batch", "Pool batch cap", ["pool"], registry=reg)
        self.pool_inst = Gauge(p + "pool_instances", "Pool instances", ["pool"], registry=reg)
        self.admit = Gauge(p + "admit_fraction", "Admitted fraction (power governor)",
                           registry=reg)
        self.overrides = Counter(p + "shield_overrides", "Shield overrides by reason", ["reason"],
                                 registry=reg)
        self.policy_errors = Counter(p + "policy_errors", "Policy exceptions (fallback used)",
                                     registry=reg)
        self.telemetry_errors = Counter(p + "telemetry_errors", "Failed telemetry reads",
                                        registry=reg)
        self.worker_events = Counter(p + "worker_events", "Worker supervision events", ["kind"],
                                     registry=reg)
        self.latency = Histogram(p + "decision_latency_seconds", "Telemetry read to action "
                                 "applied", buckets=LATENCY_BUCKETS_S, registry=reg)
        self.policy_latency = Histogram(p + "policy_latency_seconds", "Policy (with shield) act()",
                                        buckets=LATENCY_BUCKETS_S, registry=reg)
        self._server: Any = None
        self.port: int | None = None
        if port is not None:
            from prometheus_client import start_http_server

            self._server, _thread = start_http_server(port, addr=addr, registry=reg)
            self.port = int(self._server.server_port)

    def observe_telemetry(self, tel: Telemetry) -> None:
        """Per-GPU, per-row and per-aisle gauges."""
        for i, (pw, tc, f, th) in enumerate(zip(tel.gpu_power_w, tel.gpu_temp_c, tel.gpu_freq_mhz,
                                                tel.gpu_thermal_throttled, strict=True)):
            g = str(i)
            self.gpu_power.labels(g).set(_num(pw))
            self.gpu_temp.labels(g).set(_num(tc))
            self.gpu_clock.labels(g).set(_num(f))
            self.gpu_thermal.labels(g).set(float(bool(th)))
        for r, (pw, lim) in enumerate(zip(tel.row_power_w, tel.row_limit_w, strict=True)):
            self.row_power.labels(str(r)).set(_num(pw))
            self.row_limit.labels(str(r)).set(_num(lim))
        for a, c in enumerate(tel.aisle_inlet_c):
            self.inlet.labels(str(a)).set(_num(c))
        for kind in ("cooling_failure", "power_failure", "load_spike"):
            self.fault.labels(kind).set(float(any(f.startswith(kind) for f in tel.active_faults)))

    def observe_metrics(self, m: ServiceMetrics) -> None:
        """Counters and gauges of one interval's service metrics."""
        self.thermal_events.inc(max(0, m.thermal_throttle_events))
        self.power_events.inc(max(0, m.power_throttle_events))
        for k in ("arrived", "finished", "dropped"):
            self.requests.labels(k).inc(max(0, getattr(m, k)))
        self.slo_violations.inc(max(0, m.slo_violations))
        self.energy.inc(max(0.0, _num(m.energy_j)))
        self.slo_attainment.set(m.slo_attainment)
        self.ttft_p99.set(_num(m.ttft_p99_s))
        self.tbt_p99.set(_num(m.tbt_p99_s))

    def close(self) -> None:
        """Stop the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


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
