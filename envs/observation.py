"""The observation vector: what a real operator could read, normalized for learning.

Built only from `Telemetry`, `ServiceMetrics` and the configuration the controller itself set,
so the same policy runs against the simulated and the real backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.backend import ClusterLayout, PoolConfig, ServiceMetrics, Telemetry

OBS_CLIP = 10.0


@dataclass(frozen=True)
class ObservationSpec:
    """Names, units and normalizations of every observation index (for docs and debugging)."""

    names: tuple[str, ...]
    units: tuple[str, ...]

    @property
    def size(self) -> int:
        """Length of the observation vector."""
        return len(self.names)


def observation_spec(layout: ClusterLayout) -> ObservationSpec:
    """Describe each index of the observation vector for this layout."""
    names: list[str] = []
    units: list[str] = []

    def add(name: str, unit: str) -> None:
        names.append(name)
        units.append(unit)

    for p in layout.pool_names:
        add(f"pool[{p}].arrival_rate", "req/s / nominal cluster rate")
        add(f"pool[{p}].trend", "change of arrival_rate since last interval")
        add(f"pool[{p}].queued", "waiting requests / (nominal rate x interval)")
        add(f"pool[{p}].running", "running requests / (nominal rate x interval)")
        add(f"pool[{p}].server_share", "servers of the pool / SaaS servers")
        add(f"pool[{p}].tp", "TP degree / 8")
        add(f"pool[{p}].freq", "SM clock / max clock")
        add(f"pool[{p}].max_batch", "batch cap / largest batch choice")
    for r in range(layout.n_rows):
        add(f"row[{r}].power", "row power / nominal row limit")
        add(f"row[{r}].headroom", "(limit - power) / nominal row limit")
        add(f"row[{r}].capped", "1 if power-capped")
        add(f"row[{r}].route_weight", "routing weight set by the controller (0..1)")
        add(f"row[{r}].freq_cap", "row clock ceiling / max clock")
        add(f"row[{r}].quantized", "1 if serving quantized")
    for a in range(layout.n_aisles):
        add(f"aisle[{a}].inlet", "(inlet C - 20) / 20")
        add(f"aisle[{a}].max_gpu_temp", "(max GPU C - 40) / (slowdown C - 40)")
        add(f"aisle[{a}].heat_over_capacity", "aisle heat / cooling capacity")
        add(f"aisle[{a}].capacity", "cooling capacity / nominal capacity")
    add("time_of_day.sin", "sin(2 pi t / 86400 s)")
    add("time_of_day.cos", "cos(2 pi t / 86400 s)")
    add("fault.cooling", "1 if a cooling failure is active")
    add("fault.power", "1 if a power-feed failure is active")
    add("fault.load_spike", "1 if a load spike is active")
    add("vm.pending_power", "waiting VM's expected GPU power (P95 of its type's past readings) / GPU power "
        "limit (0 if none)")
    add("slo.attainment", "fraction of last interval's finished or dropped requests that finished "
        "within SLO (1 if none)")
    add("slo.ttft_p99", "TTFT P99 / largest TTFT SLO")
    add("slo.tbt_p99", "TBT P99 / largest TBT SLO")
    add("gpu.throttled", "fraction of GPUs thermally throttled")
    for i in range(1, layout.vm_placements_per_interval):  # none unless vms.placements_per_interval > 1
        add(f"vm.pending_power[{i}]", f"expected GPU power of waiting VM {i + 1} in queue order (P95 of "
            "its type's past readings) / GPU power limit (0 if fewer wait)")
    if layout.route_per_server:  # serving.route_per_server: the per-SaaS-server routing block
        for s in layout.saas_servers:
            add(f"server[{s}].max_gpu_temp", "(hottest GPU of the SaaS server C - 40) / (slowdown C - 40)")
            add(f"server[{s}].route_weight", "the server's routing weight set by the controller (0..1)")
    return ObservationSpec(tuple(names), tuple(units))


@dataclass
class ObservationBuilder:
    """Turns the latest telemetry, metrics and settings into the normalized vector."""

    layout: ClusterLayout
    nominal_row_limit_w: np.ndarray
    nominal_aisle_capacity_w: np.ndarray
    n_saas_servers: int

    def __post_init__(self) -> None:
        lay = self.layout
        self.spec = observation_spec(lay)
        self.gpu_aisle = np.repeat(lay.server_aisle, lay.gpus_per_server)
        self.prev_rate = np.zeros(lay.n_pools)
        # Capping is row-wide: the row's capped flag is that of any of its GPUs (the first).
        first_server = np.array([np.flatnonzero(lay.server_row == r)[0] for r in range(lay.n_rows)])
        self._first_gpu_of_row = first_server * lay.gpus_per_server
        aisle = np.asarray(lay.server_aisle)
        contiguous = bool(np.all(np.diff(aisle) >= 0)) and len(np.unique(aisle)) == lay.n_aisles
        # Servers laid out aisle by aisle (and GPUs server by server): one reduceat per GPU vector.
        self._aisle_gpu_starts = (np.searchsorted(aisle, np.arange(lay.n_aisles)) * lay.gpus_per_server
                                  if contiguous else None)
        self._max_ttft_slo = float(np.max(lay.slo_ttft_s))
        self._max_tbt_slo = float(np.max(lay.slo_tbt_s))
        # Block offsets of the vector (pools, rows, aisles, then the scalar tail).
        self._rows_at = 8 * lay.n_pools
        self._aisles_at = self._rows_at + 6 * lay.n_rows
        self._tail_at = self._aisles_at + 4 * lay.n_aisles
        self._saas = lay.saas_servers
        self._servers_at = self.spec.size - (2 * len(self._saas) if lay.route_per_server else 0)
        self._rate_scale = lay.nominal_rps * lay.control_interval_s
        self._temp_span_c = lay.slowdown_temp_c - 40.0

    def reset(self) -> None:
        """Forget the load trend."""
        self.prev_rate = np.zeros(self.layout.n_pools)

    def build(
        self,
        tel: Telemetry,
        m: ServiceMetrics | None,
        pools: tuple[PoolConfig, ...],
        route_weight: np.ndarray,
        freq_cap_mhz: np.ndarray,
        quantized: np.ndarray,
        active_kinds: np.ndarray,
        server_route_weight: np.ndarray | None = None,
    ) -> np.ndarray:
        """The observation vector (float32, clipped to +-OBS_CLIP).

        `server_route_weight` (per SaaS server) is read only with `route_per_server` (1 where None).
        """
        lay = self.layout
        obs = np.empty(self.spec.size, dtype=np.float32)
        self._fill_pools(obs[: self._rows_at].reshape(lay.n_pools, 8), m, pools)
        rows = obs[self._rows_at: self._aisles_at].reshape(lay.n_rows, 6)
        limit = self.nominal_row_limit_w
        rows[:, 0] = tel.row_power_w / limit
        rows[:, 1] = (tel.row_limit_w - tel.row_power_w) / limit
        rows[:, 2] = tel.gpu_power_capped[self._first_gpu_of_row]
        rows[:, 3] = route_weight
        rows[:, 4] = freq_cap_mhz / lay.max_freq_mhz
        rows[:, 5] = quantized
        aisles = obs[self._aisles_at: self._tail_at].reshape(lay.n_aisles, 4)
        aisles[:, 0] = (tel.aisle_inlet_c - 20.0) / 20.0
        aisles[:, 1] = (self._max_per_aisle(tel.gpu_temp_c) - 40.0) / self._temp_span_c
        aisles[:, 2] = tel.aisle_heat_w / np.maximum(tel.aisle_capacity_w, 1.0)
        aisles[:, 3] = tel.aisle_capacity_w / self.nominal_aisle_capacity_w
        self._fill_tail(obs[self._tail_at: self._servers_at], tel, m, active_kinds)
        if self._servers_at < len(obs):
            servers = obs[self._servers_at:].reshape(-1, 2)
            hottest = tel.gpu_temp_c.reshape(lay.n_servers, lay.gpus_per_server)[self._saas].max(axis=1)
            servers[:, 0] = (hottest - 40.0) / self._temp_span_c
            servers[:, 1] = 1.0 if server_route_weight is None else server_route_weight
        # Clip, then zero NaNs (what nan_to_num + clip did, in three cheap passes).
        np.minimum(obs, OBS_CLIP, out=obs)
        np.maximum(obs, -OBS_CLIP, out=obs)
        obs[np.isnan(obs)] = 0.0
        return obs

    def _fill_pools(self, pool: np.ndarray, m: ServiceMetrics | None,
                    pools: tuple[PoolConfig, ...]) -> None:
        """Per-pool load (rate, trend, queued, running) and configuration, one row per pool."""
        if m is not None:
            scale = self._rate_scale
            rate = m.arrivals_per_pool / scale
            pool[:, 2] = m.queued_per_pool / scale
            pool[:, 3] = m.running_per_pool / scale
        else:
            rate = np.zeros(self.layout.n_pools)
            pool[:, 2:4] = 0.0
        pool[:, 0] = rate
        pool[:, 1] = rate - self.prev_rate
        self.prev_rate = rate
        pool[:, 4:8] = self._config_block(pools)

    def _fill_tail(self, tail: np.ndarray, tel: Telemetry, m: ServiceMetrics | None,
                   active_kinds: np.ndarray) -> None:
        """Time of day, fault flags, the waiting VM, SLO summary and the throttled fraction."""
        phase = 2 * np.pi * tel.time_s / 86400.0
        tail[0] = np.sin(phase)
        tail[1] = np.cos(phase)
        tail[2:5] = active_kinds
        tail[5] = tel.pending_vm_expected_gpu_w / self.layout.gpu_power_limit_w
        if m is not None:
            tail[6] = m.slo_attainment
            tail[7] = m.ttft_p99_s / self._max_ttft_slo
            tail[8] = m.tbt_p99_s / self._max_tbt_slo
        else:
            tail[6:9] = (1.0, 0.0, 0.0)
        throttled = tel.gpu_thermal_throttled
        tail[9] = int(np.count_nonzero(throttled)) / throttled.size  # the mean of a bool array
        if len(tail) > 10:  # vms.placements_per_interval > 1: waiting VMs 2..P
            queue = tel.pending_vms_expected_gpu_w[1:len(tail) - 9]
            tail[10:] = 0.0
            tail[10:10 + len(queue)] = np.asarray(queue, dtype=float) / self.layout.gpu_power_limit_w

    def _config_block(self, pools: tuple[PoolConfig, ...]) -> np.ndarray:
        """Normalized pool configuration (cached: it changes only when the controller acts)."""
        if getattr(self, "_cfg_key", None) is not pools:
            lay = self.layout
            self._cfg = np.array([
                [p.n_instances * p.tp / lay.gpus_per_server / max(self.n_saas_servers, 1),
                 p.tp / 8.0, p.freq_mhz / lay.max_freq_mhz, p.max_batch / max(lay.batch_choices)]
                for p in pools
            ])
            self._cfg_key = pools
        return self._cfg

    def _max_per_aisle(self, gpu_temp_c: np.ndarray) -> np.ndarray:
        if self._aisle_gpu_starts is not None:  # servers are laid out aisle by aisle
            return np.maximum.reduceat(gpu_temp_c, self._aisle_gpu_starts)
        lay = self.layout
        per_server = gpu_temp_c.reshape(lay.n_servers, lay.gpus_per_server).max(axis=1)
        out = np.full(lay.n_aisles, -np.inf)
        np.maximum.at(out, lay.server_aisle, per_server)
        return out
