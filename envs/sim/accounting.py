"""What one control interval of the simulated datacenter cost and delivered.

:class:`IntervalStats` sums each tick's energy, carbon, GPU-hours, throttling and peaks;
:func:`service_metrics` assembles them with the serving model's request accounting
(`ServiceAccumulator`) into the `ServiceMetrics` record `ClusterBackend.advance` returns.

Energy is counted three ways: the GPUs alone, the servers (GPUs plus every other part of the
server: the IT energy) and the facility (the IT energy times the scenario's PUE: cooling and power
delivery). Operational carbon is the facility energy times the grid's intensity at each tick
(`carbon_g_per_kwh`): the grid supplies the whole facility. With a constant PUE, a policy's carbon
saving is the same whether it is counted on facility or IT energy; it differs from its energy
saving only when the intensity varies in time (`carbon:` a grid region).

GPU-hours count the GPUs the service pays for: those of its powered SaaS servers (serving, idle or
waking), whether or not an instance holds them; a server that is off is released. Servers that
never power off (`datacenter.idle_to_off_s` null) are paid for all the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.backend import ServiceMetrics
from llm_cluster_gym.envs.sim.carbon import region_g_per_kwh
from llm_cluster_gym.envs.sim.scenario import Scenario
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator
from llm_cluster_gym.envs.sim.throttle import RowPowerCapping, ThermalSlowdown


def carbon_g_per_kwh(s: Scenario, t_s: float) -> float:
    """Grid carbon intensity at episode time ``t_s`` (g/kWh).

    With `s.carbon` (a grid region): the region's hourly intensity at `start + workload.start_s +
    t_s`, stepwise (`envs.sim.carbon`). Otherwise the scenario's series, one value per
    `carbon_step_s`, repeated.
    """
    if s.carbon is not None:
        return region_g_per_kwh(s.carbon.region, s.carbon.start, s.workload.start_s + t_s)
    series = s.carbon_g_per_kwh
    return series[int(t_s // s.carbon_step_s) % len(series)]


@dataclass
class IntervalStats:
    """Hardware totals of one control interval, summed tick by tick.

    ``pue`` (the scenario's `datacenter.pue`) turns the servers' energy into the facility's.
    """

    pue: float = 1.0
    energy_j: float = 0.0
    gpu_energy_j: float = 0.0
    facility_energy_j: float = 0.0
    carbon_g: float = 0.0
    gpu_hours: float = 0.0
    powered_server_s: float = 0.0
    thermal_events: int = 0
    power_events: int = 0
    thermal_gpu_s: float = 0.0
    capped_gpu_s: float = 0.0
    peak_row_w: float = 0.0
    max_temp_c: float = 0.0

    def add_tick(self, srv_w: np.ndarray, gpu_w: np.ndarray, row_w: np.ndarray,
                 max_temp_c: float, dt: float, carbon_g_per_kwh: float, paid_gpus: float,
                 powered_servers: float, slowdown: ThermalSlowdown, capping: RowPowerCapping,
                 gpu_row: np.ndarray) -> None:
        """Add one tick's energy, carbon, GPU-hours, peaks and throttled GPU-seconds.

        ``paid_gpus`` are the GPUs of the powered SaaS servers (what GPU-hours count),
        ``powered_servers`` every powered server's count.
        Carbon is the tick's facility energy times the grid intensity at the tick's start. The
        throttling counted is the one in force for the next tick (the controllers have already
        been updated), as the simulator always counted it.
        """
        energy = float(srv_w.sum()) * dt
        facility = energy * self.pue
        self.energy_j += energy
        self.gpu_energy_j += float(gpu_w.sum()) * dt
        self.facility_energy_j += facility
        self.carbon_g += facility / 3.6e6 * carbon_g_per_kwh
        self.gpu_hours += paid_gpus * dt / 3600.0
        self.powered_server_s += powered_servers * dt
        if slowdown.any_throttled:
            self.thermal_gpu_s += float(np.count_nonzero(slowdown.throttled)) * dt
        if capping.any_capped:
            self.capped_gpu_s += float(np.count_nonzero(capping.capped[gpu_row])) * dt
        self.peak_row_w = max(self.peak_row_w, float(row_w.max()))
        self.max_temp_c = max(self.max_temp_c, max_temp_c)


def service_metrics(acc: ServiceAccumulator, st: IntervalStats, interval_s: float,
                    in_flight: float, queued_per_pool: np.ndarray, running_per_pool: np.ndarray,
                    reconfigurations: int) -> ServiceMetrics:
    """The interval's `ServiceMetrics` from the request accounting and the hardware totals."""
    t50, t99, b50, b99, ttft_hist, tbt_hist = acc.latency_stats()
    return ServiceMetrics(
        interval_s=interval_s,
        arrived=acc.arrived,
        finished=acc.finished,
        dropped=acc.dropped,
        in_flight=in_flight,
        tokens_generated=acc.tokens,
        energy_j=st.energy_j,
        gpu_energy_j=st.gpu_energy_j,
        facility_energy_j=st.facility_energy_j,
        ttft_p50_s=t50,
        ttft_p99_s=t99,
        tbt_p50_s=b50,
        tbt_p99_s=b99,
        slo_ttft_violations=acc.ttft_violations,
        slo_tbt_violations=acc.tbt_violations,
        slo_violations=acc.violations,
        thermal_throttle_events=st.thermal_events,
        power_throttle_events=st.power_events,
        thermal_throttled_gpu_s=st.thermal_gpu_s,
        power_capped_gpu_s=st.capped_gpu_s,
        quality_loss=acc.quality_loss,
        reconfigurations=reconfigurations,
        arrivals_per_pool=acc.arrivals_per_pool,
        queued_per_pool=queued_per_pool,
        running_per_pool=running_per_pool,
        peak_row_power_w=st.peak_row_w,
        max_gpu_temp_c=st.max_temp_c,
        carbon_g=st.carbon_g,
        gpu_hours=st.gpu_hours,
        ttft_hist=ttft_hist,
        tbt_hist=tbt_hist,
        servers_powered=st.powered_server_s / interval_s,
    )
