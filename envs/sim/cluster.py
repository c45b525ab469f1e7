"""SimCluster: the simulated datacenter behind the ClusterBackend protocol.

Each control interval runs a whole number of ticks. A tick: faults and VMs change, servers move
between power states (off, waking, idle, serving), requests arrive and are served
(request-level or aggregate model), GPU power follows the serving state at each GPU's effective
clock, servers add their overhead (a server that is off draws its standby power alone), rows and
aisles sum it, aisle inlet and GPU temperatures move, and the row power-capping and GPU
thermal-slowdown controllers set the clock ceilings for the next tick.

`SimCluster` runs that tick and the protocol methods; the pieces live in modules of their own:
``layout`` (what the cluster is built of, what a controller may set, per-slot tables),
``server_power`` (server power states and their timers),
``clocks`` (slot clocks, speeds and the GPU load of a tick), ``throttle`` (row power capping,
thermal slowdown), ``accounting`` (interval totals and `ServiceMetrics`), ``sim_telemetry``
(the `Telemetry` record) and ``description`` (`describe`, `tick_history`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from llm_cluster_gym.envs.backend import (
    BackendDescription,
    ClusterAction,
    PoolConfig,
    ServiceMetrics,
    Telemetry,
    TickHistory,
)
from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim.accounting import IntervalStats, carbon_g_per_kwh, service_metrics
from llm_cluster_gym.envs.sim.clocks import (
    SlotModelCache,
    SlotSettingsCache,
    effective_clocks,
    gpu_load,
    serial_prefill,
    serial_slot_model,
)
from llm_cluster_gym.envs.sim.demand import episode_trace, pools_for
from llm_cluster_gym.envs.sim.description import describe_sim, tick_history
from llm_cluster_gym.envs.sim.faults import FaultSchedule
from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.layout import (
    RowSettingChecker,
    SlotTablesCache,
    aisle_cooling,
    cluster_layout,
    gpu_power_model,
    row_array,
    validate_pools,
)
from llm_cluster_gym.envs.sim.profiles import ProfileArrays, ProfileLibrary
from llm_cluster_gym.envs.sim.scenario import Scenario, ScenarioError, load_scenario
from llm_cluster_gym.envs.sim.server_power import WAKING, ServerPowerStates
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator, TickLoad
from llm_cluster_gym.envs.sim.serving_aggregate import AggregateServing
from llm_cluster_gym.envs.sim.serving_request import RequestLevelServing
from llm_cluster_gym.envs.sim.sim_telemetry import assemble_telemetry
from llm_cluster_gym.envs.sim.slo_classes import SloClasses
from llm_cluster_gym.envs.sim.thermal import (
    GpuThermalState,
    ThermalParams,
    step_gpu_temperature,
    step_inlet_temperature,
)
from llm_cluster_gym.envs.sim.throttle import (
    CAP_TARGET_FRACTION,
    CAP_WINDOW_S,
    THERMAL_RELEASE_C,
    RowPowerCapping,
    ThermalSlowdown,
    read_only,
)
from llm_cluster_gym.envs.sim.topology import build_topology
from llm_cluster_gym.envs.sim.vms import VmPool
from llm_cluster_gym.envs.sim.weather import outside_air

__all__ = ["CAP_TARGET_FRACTION", "CAP_WINDOW_S", "THERMAL_RELEASE_C", "SimCluster", "TickRecord"]


@dataclass
class TickRecord:
    """Optional per-tick history (for reports, plots and the shield's tests)."""

    time_s: list[float] = field(default_factory=list)
    row_power_w: list[np.ndarray] = field(default_factory=list)
    row_power_avg_w: list[np.ndarray] = field(default_factory=list)
    row_limit_w: list[np.ndarray] = field(default_factory=list)
    aisle_inlet_c: list[np.ndarray] = field(default_factory=list)
    max_gpu_temp_c: list[float] = field(default_factory=list)


class SimCluster:
    """A simulated datacenter serving LLM requests; implements `envs.backend.ClusterBackend`.

    Args:
        scenario: A `Scenario` or the name/path of a scenario file.
        serving_model: "request" (per-request TTFT/TBT) or "aggregate" (fluid, for training).
        profiles: Profile library (defaults to the shipped tables).
        thermal: GPU thermal parameters (defaults to the shipped H100 fit).
        auto_place_vms: Place waiting VMs first-fit when the controller does not place them.
        record_ticks: Keep a per-tick history in `self.record`.
    """

    def __init__(
        self,
        scenario: Scenario | str,
        serving_model: str = "request",
        profiles: ProfileLibrary | None = None,
        thermal: ThermalParams | None = None,
        auto_place_vms: bool = True,
        record_ticks: bool = False,
    ) -> None:
        self.scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
        s = self.scenario
        if serving_model not in ("request", "aggregate"):
            raise ValueError(f"serving_model must be 'request' or 'aggregate', got {serving_model!r}")
        if serving_model == "aggregate" and s.serving.prefill_mode == "serial":
            raise ScenarioError(f"{s.source or s.name}: field 'serving.prefill_mode' = 'serial' needs "
                                "the request-level serving model (the aggregate one runs chunked only)")
        self.serving_model = serving_model
        self._serial = s.serving.prefill_mode == "serial"
        self.topo = build_topology(s)
        self.library = profiles or ProfileLibrary.load()
        self.thermal = thermal or ThermalParams.load()
        self.cooling = aisle_cooling(s)
        sv = s.serving
        self.pools = pools_for(s.workload.pools)
        if len(sv.pools) != self.pools.n_pools:
            raise ValueError(
                f"{s.source}: serving.pools lists {len(sv.pools)} pools but workload.pools "
                f"{s.workload.pools!r} has {self.pools.n_pools}"
            )
        self.tp_profiles = {tp: self.library.get(sv.model, sv.gpu, tp) for tp in sv.tp_choices}
        self.gpu_model = gpu_power_model(self.tp_profiles[sv.tp_choices[0]])
        self._tp_index = {tp: i for i, tp in enumerate(sv.tp_choices)}
        self._tp_arrays = ProfileArrays.stack([self.tp_profiles[tp] for tp in sv.tp_choices])
        self.slo_ttft_s = np.array([p.slo_ttft_s for p in sv.pools])
        self.slo_tbt_s = np.array([p.slo_tbt_s for p in sv.pools])
        self.auto_place_vms = auto_place_vms
        self.record_ticks = record_ticks
        # The aggregate model takes one tick per control interval (its fluid state needs no
        # finer steps; power and thermal updates are exact for piecewise-constant power).
        self.tick_s = s.tick_s if serving_model == "request" else s.control_interval_s
        self.ticks_per_interval = int(round(s.control_interval_s / self.tick_s))
        self.n_intervals = int(np.ceil(s.duration_s / s.control_interval_s))
        self.layout = cluster_layout(s, self.topo, self.pools, self.gpu_model, self.slo_ttft_s,
                                     self.slo_tbt_s, self.thermal.slowdown_temp_c)
        gm = self.gpu_model
        self.capping = RowPowerCapping(gm, s.datacenter.server, self.topo, self.tick_s)
        self.slowdown = ThermalSlowdown(gm, self.thermal, self.topo.gpu_aisle,
                                        self.topo.gpu_inlet_offset_c)
        self.outside = outside_air(s)
        self._row_checker = RowSettingChecker(self.topo.n_rows, gm.min_freq_mhz, gm.max_freq_mhz)
        self._settings_cache = SlotSettingsCache(sv, gm.max_freq_mhz)
        self._model_cache = SlotModelCache()
        self._tables_cache = SlotTablesCache()
        self._validated_pools: tuple[PoolConfig, ...] | None = None
        self.power = ServerPowerStates(self.topo.n_servers, s.datacenter.server.wake_latency_s,
                                       s.datacenter.idle_to_off_s)
        self._is_saas = self.topo.server_is_saas
        self._gpu_is_saas = self.topo.server_is_saas[self.topo.gpu_server]
        self._down_cache: tuple[object, int, pw.GpuPhasePower] | None = None
        self._paid_cache: tuple[int, float, float] = (-1, 0.0, 0.0)
        self._rng = np.random.default_rng(0)
        self.reset(seed=None)

    # ------------------------------------------------------------------ protocol
    def reset(self, seed: int | None = None) -> Telemetry:
        """Start a new episode: fresh workload, faults, VMs, temperatures and configuration."""
        s, topo = self.scenario, self.topo
        self._rng = np.random.default_rng(seed)
        rng = self._rng
        self.time_s = 0.0
        self.interval = 0
        self.faults = FaultSchedule.build(s, rng)
        saas_gpus = len(topo.saas_servers) * topo.gpus_per_server
        self.trace = episode_trace(s, saas_gpus, self.faults.spikes(), rng)
        self.trace_pool = self.pools.assign(self.trace.input_tokens, self.trace.output_tokens)
        self._trace_pos = 0
        self.mean_input_tokens = float(self.trace.input_tokens.mean()) if len(self.trace) else 1.0
        self.inst = InstanceTable.empty(topo.saas_servers, topo.gpus_per_server)
        n_slots = self.inst.n_slots
        classes = SloClasses.from_serving(s.serving)  # None: requests judged by their pool's SLOs
        if self.serving_model == "request":
            self.serving: RequestLevelServing | AggregateServing = RequestLevelServing(
                n_slots, self.pools.n_pools, s.serving.max_prefill_tokens, s.serving.drop_after_s,
                s.serving.prefill_mode, classes)
        else:
            self.serving = AggregateServing(
                n_slots, self.pools.n_pools, s.serving.max_prefill_tokens, s.serving.drop_after_s, classes)
        self.vms = VmPool(s.vms, np.flatnonzero(~topo.server_is_saas), topo.n_servers,
                          gpu_idle_w=self.gpu_model.idle_power_w,
                          gpu_limit_w=self.gpu_model.gpu_power_limit_w,
                          clock_offset_s=s.workload.start_s)
        self.vms.reset(rng, s.duration_s)
        n_gpu = topo.n_gpus
        self.thermal_state = GpuThermalState(np.zeros(n_gpu), np.zeros(n_gpu))
        self.inlet_c = np.full(topo.n_aisles, s.datacenter.cooling.supply_temp_c)
        self.capping.reset()
        self.slowdown.reset()
        self.row_freq_cap_mhz = np.full(topo.n_rows, self.gpu_model.max_freq_mhz)
        self.row_quantized = np.zeros(topo.n_rows, dtype=bool)
        self.row_route_weight = np.ones(topo.n_rows)
        # Per server (SaaS entries set by the controller); None without serving.route_per_server.
        self.server_route_weight = np.ones(topo.n_servers) if self.layout.route_per_server else None
        self.admit_fraction = 1.0
        self.record = TickRecord()
        self.arrived_total = 0
        self.finished_total = 0.0
        self.dropped_total = 0.0
        pools = self.layout.initial_pools
        self.pool_configs = pools
        self.reconfigurations = 0
        self.inst.reconfigure(pools, now_s=0.0, load_time_s={})
        self._refresh_slots()
        self.power.reset(self._saas_occupied | self.vms.occupied())
        self._gpu_power_w = self.slots.gpu_phase_power.idle_w.copy()
        self._gpu_temp_c = topo.gpu_inlet_c(self.inlet_c)
        self._row_power_w = np.zeros(topo.n_rows)
        self._aisle_heat_w = np.zeros(topo.n_aisles)
        self._row_limit_w = topo.row_limit_w.copy()
        self._aisle_cap_w = topo.aisle_capacity_w.copy()
        self._settle_idle()
        return self.telemetry()

    def apply(self, action: ClusterAction) -> None:
        """Apply a controller's decision; reconfigured instances pay their load downtime."""
        if action.pools is not None:
            self._apply_pools(action.pools)
        check = self._row_checker.check
        if action.row_freq_cap_mhz is not None:
            self.row_freq_cap_mhz = check("row_freq_cap_mhz", action.row_freq_cap_mhz)
        if action.row_quantized is not None:
            self.row_quantized = check("row_quantized", action.row_quantized)
        if action.row_route_weight is not None:
            self.row_route_weight = check("row_route_weight", action.row_route_weight)
        if action.server_route_weight is not None:
            self.server_route_weight = self._server_weights(action.server_route_weight)
        if action.admit_fraction is not None:
            a = float(action.admit_fraction)
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"admit_fraction must be in [0, 1], got {a}")
            self.admit_fraction = a
        if action.vm_servers:
            self._place_vms(action.vm_servers)

    def _server_weights(self, value: np.ndarray) -> np.ndarray:
        """Per-server routing weights (1 on IaaS servers) from the per-SaaS-server action field.

        Raises:
            ValueError: The scenario does not route per server, or a wrong shape, a weight
                that is not finite or a negative one.
        """
        saas = self.layout.saas_servers
        if not self.layout.route_per_server:
            raise ValueError("server_route_weight: the scenario does not set serving.route_per_server")
        w = row_array(value, len(saas), "server_route_weight")
        if np.count_nonzero(w < 0):
            raise ValueError(f"server_route_weight must be >= 0, got {w}")
        out = np.ones(self.topo.n_servers)
        out[saas] = w
        return out

    def _place_vms(self, servers: tuple[int | None, ...]) -> None:
        """Place the waiting VMs slot by slot: slot i holds the i-th VM waiting now (None: it waits).

        Raises:
            ValueError: More slots than `vms.placements_per_interval`, or an illegal server
                (occupied, by a VM placed earlier in the same action too, or not an IaaS host).
        """
        most = self.layout.vm_placements_per_interval
        if len(servers) > most:
            raise ValueError(f"vm_servers has {len(servers)} placements; the scenario allows at most "
                             f"{most} per interval (vms.placements_per_interval)")
        placed = 0
        for i, server in enumerate(servers):
            if server is None:
                continue
            if i - placed >= self.vms.n_pending:
                break
            self.vms.place(int(server), self.time_s, queue_index=i - placed)
            placed += 1

    def advance(self) -> ServiceMetrics:
        """Simulate one control interval."""
        acc = ServiceAccumulator(self.pools.n_pools)
        stats = IntervalStats(pue=self.scenario.datacenter.pue)
        dt = self.tick_s
        for _ in range(self.ticks_per_interval):
            self._tick(self.time_s, dt, acc, stats)
            self.time_s += dt
        self.interval += 1
        self.vms.observe()  # the VMs' readings of this interval join their types' history
        if self.auto_place_vms:
            while self.vms.pending and (server := self.vms.first_fit()) is not None:
                self.vms.place(server, self.time_s)
        waiting, running = self.serving.per_pool_counts()
        self.arrived_total += acc.arrived
        self.finished_total += acc.finished
        self.dropped_total += acc.dropped
        reconf, self.reconfigurations = self.reconfigurations, 0
        return service_metrics(acc, stats, self.scenario.control_interval_s,
                               self.serving.in_flight, waiting, running, reconf)

    def telemetry(self) -> Telemetry:
        """Hardware state at the end of the last tick."""
        return assemble_telemetry(
            time_s=self.time_s, topo=self.topo, faults=self.faults, vms=self.vms,
            slowdown=self.slowdown, capping=self.capping, gpu_power_w=self._gpu_power_w,
            gpu_temp_c=self._gpu_temp_c, row_power_w=self._row_power_w, inlet_c=self.inlet_c,
            aisle_heat_w=self._aisle_heat_w, outside=self.outside,
            server_power_state=self.power.state)

    @property
    def done(self) -> bool:
        """True when the scenario's duration has been simulated."""
        return self.interval >= self.n_intervals

    def describe(self) -> BackendDescription:
        """What a controller may know: scenario, models, request history (`envs.sim.description`)."""
        return describe_sim(self)

    def tick_history(self) -> TickHistory | None:
        """This episode's per-tick history (None unless built with ``record_ticks=True``)."""
        if not self.record_ticks:
            return None
        return tick_history(self.record, self.topo.n_rows, self.topo.n_aisles)

    def close(self) -> None:
        """Nothing to release: the simulator holds no process, device or file."""

    # ------------------------------------------------------------------ configuration
    def _apply_pools(self, pools: tuple[PoolConfig, ...]) -> None:
        if pools is not self._validated_pools:  # a tuple of frozen configs: check it once
            validate_pools(pools, self.pools.n_pools, self.scenario.serving.tp_choices)
            self._validated_pools = pools
        if pools == self.pool_configs:
            return
        self.pool_configs = tuple(pools)
        load_time = {tp: prof.load_time_s for tp, prof in self.tp_profiles.items()}
        now = self.time_s
        stopped = self.inst.reconfigure(pools, now, load_time)
        self._refresh_slots()
        # Servers the new layout needs wake now; their instances load once they are up.
        self.power.wake(self._saas_occupied, now)
        if self.power.any_down:
            self.inst.defer_start(self.power.up_at_s(now)[self.topo.saas_servers], now, load_time)
        self.reconfigurations = int((self.inst.active & (self.inst.ready_at_s > now)).sum())
        self.serving.requeue(stopped)

    def _refresh_slots(self) -> None:
        """Recompute the per-slot tables after a layout change (invalidates the slot settings)."""
        self.slots = self._tables_cache.get(self.inst, self.topo, self._tp_index, self._tp_arrays,
                                            self.gpu_model.max_freq_mhz, self.mean_input_tokens,
                                            self.gpu_model.idle_no_context_w)
        occupied = np.zeros(self.topo.n_servers, dtype=bool)
        occupied[self.topo.saas_servers[self.inst.occupied_servers()]] = True
        self._saas_occupied = occupied

    # ------------------------------------------------------------------ server power states
    def _phase_power(self) -> pw.GpuPhasePower:
        """Per-GPU phase power under the power states: nothing where off, bare idle while booting.

        With every server powered it is the layout's own (`SlotTables.gpu_phase_power`).
        """
        base = self.slots.gpu_phase_power
        if not self.power.any_down:
            return base
        key = (self.slots, self.power.version)
        if self._down_cache is not None and self._down_cache[:2] == key:
            return self._down_cache[2]
        g = self.topo.gpus_per_server
        idle = base.idle_w.copy()
        idle[np.repeat(self.power.waking, g)] = self.gpu_model.idle_no_context_w
        idle[np.repeat(self.power.off, g)] = 0.0
        pp = replace(base, idle_w=read_only(idle))
        self._down_cache = (*key, pp)
        return pp

    def _vm_gpu_power_w(self) -> np.ndarray:
        """Each GPU's VM draw at full clock (a VM on a server still booting draws nothing yet)."""
        vm_w = self.vms.gpu_power_w
        if self.power.any_down:
            vm_w = np.where(self.power.state <= WAKING, 0.0, vm_w)  # off or waking
        return vm_w.repeat(self.topo.gpus_per_server)

    def _paid(self) -> tuple[float, float]:
        """(GPUs of powered SaaS servers, powered servers): what the GPU-hour cost counts."""
        version, gpus, servers = self._paid_cache
        if version != self.power.version:
            powered = self.power.powered()
            gpus = float(np.count_nonzero(powered & self._is_saas) * self.topo.gpus_per_server)
            servers = float(np.count_nonzero(powered))
            self._paid_cache = (self.power.version, gpus, servers)
        return gpus, servers

    def _settle_idle(self) -> None:
        """Start temperatures at the idle steady state (a datacenter that was running)."""
        gm, th, topo = self.gpu_model, self.thermal, self.topo
        idle = self._phase_power().idle_w.copy()
        idle += np.maximum(self._vm_gpu_power_w() - idle, 0.0)
        self.thermal_state.x_die_c[:] = th.r_die_c_per_w * idle
        self.thermal_state.x_sink_c[:] = th.r_sink_c_per_w * idle
        self._gpu_temp_c = topo.gpu_inlet_c(self.inlet_c) + (th.r_die_c_per_w +
                                                             th.r_sink_c_per_w) * idle
        # The first telemetry reports the power of that state too (VMs included), not zeros.
        self._gpu_power_w = idle
        srv_w = pw.server_power_w(idle, self.scenario.datacenter.server, gm.idle_power_w,
                                  self.power.off if self.power.any_down else None)
        self._row_power_w = topo.row_sum(srv_w)
        self._aisle_heat_w = topo.aisle_sum(srv_w)

    # ------------------------------------------------------------------ one tick
    def _tick(self, t0: float, dt: float, acc: ServiceAccumulator, stats: IntervalStats) -> None:
        topo, inst, gm, s = self.topo, self.inst, self.gpu_model, self.scenario
        slots, capping, slowdown = self.slots, self.capping, self.slowdown
        row_f, aisle_f = self.faults.factors(t0, topo.n_rows, topo.n_aisles)
        self._row_limit_w = topo.row_limit_w * row_f
        self._aisle_cap_w = topo.aisle_capacity_w * aisle_f
        self.vms.advance(t0, dt)
        self.power.update(t0, self._saas_occupied | self.vms.occupied())
        # Arrivals in [t0, t0 + dt), admission control.
        lo = self._trace_pos
        hi = int(self.trace.arrival_s.searchsorted(t0 + dt, side="left"))
        self._trace_pos = hi
        if hi > lo:
            self._admit_arrivals(lo, hi, acc)
        # Clocks: the controller's settings under last tick's capping and slowdown ceilings.
        st = self._settings_cache.get(slots, inst, self.row_freq_cap_mhz, self.row_quantized,
                                      self.row_route_weight, self.server_route_weight)
        f_eff, f_pre, gpu_prefill_mhz, gpu_ceiling = effective_clocks(
            st, slots, inst, slowdown, capping, topo.gpu_row, gm.max_freq_mhz)
        serving = inst.serving(t0)
        model = self._model_cache.get(slots, f_pre, f_eff, st.speed)
        if self._serial:  # whole passes, each at its own prompt's clock
            model = serial_slot_model(model, slots, f_eff, st.speed)
        load: TickLoad = self.serving.tick(t0, dt, inst, serving, model, st.route_weight,
                                           self.slo_ttft_s, self.slo_tbt_s, st.qloss, acc)
        acc.tokens += load.tokens_generated
        if capping.any_capped or slowdown.any_throttled:  # ceilings in force during this tick
            stats.add_tokens_lost(load.decode_tokens, f_eff, st.f_set_mhz, slots.prof.decode_phi,
                                  slots.prof.max_freq_mhz)
        if self._serial:
            gpu_prefill_mhz, load.prefill_tokens = serial_prefill(load, slots, f_eff, st.f_set_mhz,
                                                                  gm.max_freq_mhz)
        # GPU power at this tick's ceilings.
        gl = gpu_load(load, st, slots, gpu_prefill_mhz, self._vm_gpu_power_w(), dt)
        if self.power.any_down:
            gl = replace(gl, phase_power=self._phase_power(), server_off=self.power.off)
        dyn, gpu_w, srv_w, row_w, aisle_w = pw.tick_power(gm, gl, gpu_ceiling, s.datacenter.server,
                                                          topo)
        # Heat and temperature.
        outside = self.outside.temp_c(t0)
        self.inlet_c = step_inlet_temperature(self.inlet_c, aisle_w, self._aisle_cap_w, outside,
                                              dt, self.cooling)
        temp = step_gpu_temperature(self.thermal_state, gpu_w, topo.gpu_inlet_c(self.inlet_c), dt,
                                    self.thermal)
        max_temp_c = float(temp.max())
        # Controllers for the next tick: row power capping, GPU thermal slowdown.
        stats.power_events += capping.update(dyn, gl, row_w, self._row_limit_w,
                                             slowdown.ceiling_mhz)
        stats.thermal_events += slowdown.update(temp, max_temp_c, gpu_w, gpu_ceiling, self.inlet_c,
                                               gl.phase_power.idle_w)
        # Accounting.
        paid_gpus, powered_servers = self._paid()
        stats.add_tick(srv_w, gpu_w, row_w, max_temp_c, dt, carbon_g_per_kwh(s, t0),
                       paid_gpus, powered_servers)
        stats.add_vms(self.vms.n_pending, self.vms.n_running, dt)
        stats.add_throttling(slowdown, capping, topo.gpu_row, self._gpu_is_saas, gl.freq_mhz,
                             slots.gpu_has, gl.vm_power_w, dt)
        self._gpu_power_w, self._gpu_temp_c = gpu_w, temp
        self._row_power_w, self._aisle_heat_w = row_w, aisle_w
        if self.record_ticks:
            r = self.record
            r.time_s.append(t0 + dt)
            r.row_power_w.append(row_w)
            r.row_power_avg_w.append(capping.row_avg_w.copy())
            r.row_limit_w.append(self._row_limit_w.copy())
            r.aisle_inlet_c.append(self.inlet_c.copy())
            r.max_gpu_temp_c.append(max_temp_c)

    def _admit_arrivals(self, lo: int, hi: int, acc: ServiceAccumulator) -> None:
        """Count the trace's requests lo..hi-1 and hand the admitted ones to the serving model."""
        tr = self.trace
        pool = self.trace_pool[lo:hi]
        arr, inp, out = tr.arrival_s[lo:hi], tr.input_tokens[lo:hi], tr.output_tokens[lo:hi]
        if self.admit_fraction < 1.0:
            keep = self._rng.random(hi - lo) < self.admit_fraction
            acc.dropped += int((~keep).sum())
            arr, inp, out, pool_kept = arr[keep], inp[keep], out[keep], pool[keep]
        else:
            pool_kept = pool
        acc.arrived += hi - lo
        acc.arrivals_per_pool += np.bincount(pool, minlength=self.pools.n_pools)
        self.serving.add_arrivals(arr, inp, out, pool_kept)
