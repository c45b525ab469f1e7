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

Throttling is counted as harm as well as events: GPU-seconds under thermal slowdown and under row
power capping, and the clock lost to them (MHz x s), each split by the GPU's server role (SaaS: an
LLM server; IaaS: a VM host). The clock lost is the set clock (the pool's clock under the
controller's row cap on SaaS GPUs; the maximum under a VM) minus the ceiling, on the GPUs at work
(holding an instance or running a VM): an idle GPU under a ceiling loses nothing. The tokens lost
are not reported: what an instance would have generated at its set clock depends on the queue and
batch it would then have had (a second, unthrottled simulation), which the tick cannot know; the
SaaS clock lost is the honest proxy.

GPU-hours count the GPUs the service pays for: those of its powered SaaS servers (serving, idle or
waking), whether or not an instance holds them; a server that is off is released. Servers that
never power off (`datacenter.idle_to_off_s` null) are paid for all the time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.backend import ServiceMetrics
from llm_cluster_gym.envs.sim.carbon import region_g_per_kwh
from llm_cluster_gym.envs.sim.profiles import clock_slowdown
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
    saas_thermal_gpu_s: float = 0.0
    iaas_thermal_gpu_s: float = 0.0
    saas_capped_gpu_s: float = 0.0
    iaas_capped_gpu_s: float = 0.0
    saas_clock_lost_mhz_s: float = 0.0
    iaas_clock_lost_mhz_s: float = 0.0
    saas_tokens_lost: float = 0.0
    peak_row_w: float = 0.0
    max_temp_c: float = 0.0
    vm_wait_s: float = 0.0
    vm_running_s: float = 0.0

    def add_tick(self, srv_w: np.ndarray, gpu_w: np.ndarray, row_w: np.ndarray,
                 max_temp_c: float, dt: float, carbon_g_per_kwh: float, paid_gpus: float,
                 powered_servers: float) -> None:
        """Add one tick's energy, carbon, GPU-hours and peaks.

        ``paid_gpus`` are the GPUs of the powered SaaS servers (what GPU-hours count),
        ``powered_servers`` every powered server's count.
        Carbon is the tick's facility energy times the grid intensity at the tick's start.
        """
        energy = float(srv_w.sum()) * dt
        facility = energy * self.pue
        self.energy_j += energy
        self.gpu_energy_j += float(gpu_w.sum()) * dt
        self.facility_energy_j += facility
        self.carbon_g += facility / 3.6e6 * carbon_g_per_kwh
        self.gpu_hours += paid_gpus * dt / 3600.0
        self.powered_server_s += powered_servers * dt
        self.peak_row_w = max(self.peak_row_w, float(row_w.max()))
        self.max_temp_c = max(self.max_temp_c, max_temp_c)

    def add_vms(self, n_waiting: int, n_running: int, dt: float) -> None:
        """Add one tick's VM-seconds waiting for placement and VM-seconds hosted."""
        self.vm_wait_s += float(n_waiting) * dt
        self.vm_running_s += float(n_running) * dt

    def add_throttling(self, slowdown: ThermalSlowdown, capping: RowPowerCapping,
                       gpu_row: np.ndarray, gpu_is_saas: np.ndarray, set_mhz: np.ndarray,
                       has_instance: np.ndarray, vm_power_w: np.ndarray, dt: float) -> None:
        """Add one tick's throttled and capped GPU-seconds and clock lost, split SaaS / IaaS.

        The throttling counted is the one in force for the next tick (the controllers have
        already been updated), as the simulator always counted it; the clock lost is this tick's
        set clock against those ceilings, so that it is positive only where a GPU is counted
        throttled or capped.

        Args:
            slowdown: Thermal slowdown after this tick's update.
            capping: Row power capping after this tick's update.
            gpu_row: Row of each GPU.
            gpu_is_saas: Each GPU's server serves the LLM (else it hosts IaaS VMs).
            set_mhz: Each GPU's set clock (no ceiling): the pool's clock under the row cap, the
                maximum elsewhere.
            has_instance: Each GPU holds an LLM instance.
            vm_power_w: Each GPU's VM draw (0 where no VM runs).
            dt: Tick length (s).
        """
        if not (slowdown.any_throttled or capping.any_capped):
            return
        if slowdown.any_throttled:
            thr = slowdown.throttled
            n, n_saas = np.count_nonzero(thr), np.count_nonzero(thr & gpu_is_saas)
            self.thermal_gpu_s += float(n) * dt
            self.saas_thermal_gpu_s += float(n_saas) * dt
            self.iaas_thermal_gpu_s += float(n - n_saas) * dt
        if capping.any_capped:
            cap = capping.capped[gpu_row]
            n, n_saas = np.count_nonzero(cap), np.count_nonzero(cap & gpu_is_saas)
            self.capped_gpu_s += float(n) * dt
            self.saas_capped_gpu_s += float(n_saas) * dt
            self.iaas_capped_gpu_s += float(n - n_saas) * dt
        ceiling = np.minimum(slowdown.ceiling_mhz, capping.ceiling_mhz[gpu_row])
        working = has_instance | (vm_power_w > 0.0)
        lost = np.where(working, np.maximum(set_mhz - ceiling, 0.0), 0.0)
        self.saas_clock_lost_mhz_s += float(lost[gpu_is_saas].sum()) * dt
        self.iaas_clock_lost_mhz_s += float(lost[~gpu_is_saas].sum()) * dt


    def add_tokens_lost(self, decode_tokens: np.ndarray, f_eff_mhz: np.ndarray,
                        f_set_mhz: np.ndarray, decode_phi: np.ndarray, max_mhz: np.ndarray) -> None:
        """Add the output tokens this tick's throttling cost the SaaS instances.

        A slot whose effective clock (under the capping and slowdown ceilings in force during
        the tick) is below its set clock decoded its ``decode_tokens`` at iterations that took
        ``sd(f_eff) / sd(f_set)`` times as long, ``sd`` the profile's decode slowdown
        (`profiles.clock_slowdown`). At the same batch, the set clock would
        have produced that many times the tokens; the difference is counted. First order: it
        keeps the batch the instance had, where unthrottled it would have drained its queue
        faster (see the module docstring).
        """
        hit = f_eff_mhz < f_set_mhz
        if not np.count_nonzero(hit):
            return
        phi, fm = decode_phi[hit], max_mhz[hit]
        ratio = clock_slowdown(f_eff_mhz[hit], fm, phi) / clock_slowdown(f_set_mhz[hit], fm, phi)
        self.saas_tokens_lost += float((decode_tokens[hit] * (ratio - 1.0)).sum())


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
        saas_throttled_gpu_s=st.saas_thermal_gpu_s,
        iaas_throttled_gpu_s=st.iaas_thermal_gpu_s,
        saas_capped_gpu_s=st.saas_capped_gpu_s,
        iaas_capped_gpu_s=st.iaas_capped_gpu_s,
        clock_lost_mhz_s=st.saas_clock_lost_mhz_s + st.iaas_clock_lost_mhz_s,
        saas_clock_lost_mhz_s=st.saas_clock_lost_mhz_s,
        saas_tokens_lost=st.saas_tokens_lost,
        iaas_clock_lost_mhz_s=st.iaas_clock_lost_mhz_s,
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
        vm_wait_s=st.vm_wait_s,
        vm_running_s=st.vm_running_s,
    )
