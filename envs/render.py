"""Rendering: a compact text status and a picture of the datacenter's rows and aisles."""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.envs.backend import ClusterLayout, ServiceMetrics, Telemetry

_CELL = 12


def render_ansi(layout: ClusterLayout, tel: Telemetry, m: ServiceMetrics | None) -> str:
    """A few lines: time, faults, row power vs limit, aisle temperatures, service."""
    lines = [f"t={tel.time_s:7.1f}s  faults: {', '.join(tel.active_faults) or 'none'}"]
    rows = "  ".join(
        f"r{i}:{p / 1e3:6.1f}/{lim / 1e3:.1f}kW" for i, (p, lim) in
        enumerate(zip(tel.row_power_w, tel.row_limit_w, strict=True))
    )
    lines.append("rows  " + rows)
    gpu_aisle = np.repeat(layout.server_aisle, layout.gpus_per_server)
    hot = np.full(layout.n_aisles, -np.inf)
    np.maximum.at(hot, gpu_aisle, tel.gpu_temp_c)
    aisles = "  ".join(
        f"a{i}: inlet {t:4.1f}C gpu<= {h:4.1f}C" for i, (t, h) in enumerate(zip(tel.aisle_inlet_c, hot,
                                                                                strict=True))
    )
    lines.append("aisles " + aisles)
    if m is not None:
        lines.append(
            f"served {m.finished:.0f} dropped {m.dropped:.0f} SLO {m.slo_attainment:.3f} "
            f"TTFT p99 {m.ttft_p99_s:.3f}s TBT p99 {m.tbt_p99_s * 1e3:.0f}ms "
            f"energy {m.energy_j / 3.6e6:.3f}kWh throttle th/pw {m.thermal_throttle_events}/"
            f"{m.power_throttle_events}"
        )
    return "\n".join(lines)


def _ramp(x: np.ndarray) -> np.ndarray:
    """Green (0) -> yellow (0.5) -> red (1) colors, uint8 RGB."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    green = np.array([40, 180, 60])
    yellow = np.array([240, 200, 40])
    red = np.array([220, 40, 40])
    lo = green + (yellow - green) * np.clip(x * 2, 0, 1)
    return np.where(x < 0.5, lo, yellow + (red - yellow) * np.clip(x * 2 - 1, 0, 1)).astype(np.uint8)


def render_rgb(layout: ClusterLayout, tel: Telemetry) -> np.ndarray:
    """A picture of the datacenter: one band per row, one cell per server.

    Servers are colored by their hottest GPU (green cool -> red at the slowdown point; IaaS
    servers carry a grey stripe); the left bar is the row's power against its limit and the
    right bar its aisle's inlet temperature (18 -> 35 C).
    """
    n_rows = layout.n_rows
    per_row = np.bincount(layout.server_row, minlength=n_rows).max()
    h = n_rows * (_CELL + 4) + 4
    w = (per_row + 4) * _CELL
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    srv_temp = tel.gpu_temp_c.reshape(layout.n_servers, layout.gpus_per_server).max(axis=1)
    temp_x = (srv_temp - 30.0) / (layout.slowdown_temp_c - 30.0)
    power_x = tel.row_power_w / np.maximum(tel.row_limit_w, 1.0)
    inlet_x = (tel.aisle_inlet_c - 18.0) / (35.0 - 18.0)
    for r in range(n_rows):
        y0 = 4 + r * (_CELL + 4)
        img[y0:y0 + _CELL, 2:_CELL * 2 - 2] = _ramp(np.array(power_x[r]))
        servers = np.flatnonzero(layout.server_row == r)
        for j, s in enumerate(servers):
            x0 = (j + 2) * _CELL
            img[y0:y0 + _CELL, x0 + 1:x0 + _CELL - 1] = _ramp(np.array(temp_x[s]))
            if not layout.server_is_saas[s]:
                img[y0 + _CELL // 2 - 1:y0 + _CELL // 2 + 1, x0 + 1:x0 + _CELL - 1] = 90
        aisle = layout.server_aisle[servers[0]] if len(servers) else 0
        img[y0:y0 + _CELL, w - 2 * _CELL + 2:w - 2] = _ramp(np.array(inlet_x[aisle]))
    return img
