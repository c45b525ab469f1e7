"""SimCluster: the simulated datacenter behind the ClusterBackend protocol.

Each control interval runs a whole number of ticks. A tick: faults and VMs change, requests
arrive and are served (request-level or aggregate model), GPU power follows the serving state
at each GPU's effective clock, servers add their overhead, rows and aisles sum it, aisle inlet
and GPU temperatures move, and the row power-capping and GPU thermal-slowdown controllers set
the clock ceilings for the next tick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from llm_cluster_gym.envs.backend import (
    BackendDescription,
    ClusterAction,
    ClusterLayout,
    PoolConfig,
    ServiceMetrics,
    Telemetry,
    TickHistory,
)
from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim.demand import episode_trace, pools_for
from llm_cluster_gym.envs.sim.description import describe_sim, tick_history
from llm_cluster_gym.envs.sim.faults import FaultSchedule
from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.profiles import (
    ProfileArrays,
    ProfileLibrary,
    decode_iter_time_s,
    freq_at_power_limit_mhz,
    prefill_time_s,
)
from llm_cluster_gym.envs.sim.scenario import Scenario, load_scenario
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator, TickLoad
from llm_cluster_gym.envs.sim.serving_aggregate import AggregateServing
from llm_cluster_gym.envs.sim.serving_request import RequestLevelServing, SlotModel
from llm_cluster_gym.envs.sim.thermal import (
    AisleCoolingParams,
    GpuThermalState,
    ThermalParams,
    step_gpu_temperature,
    step_inlet_temperature,
)
from llm_cluster_gym.envs.sim.topology import build_topology
from llm_cluster_gym.envs.sim.vms import VmPool

CAP_WINDOW_S = 2.0
"""Time constant of the row-power average that power capping acts on."""

CAP_TARGET_FRACTION = 0.95
"""Row power capping aims this fraction of the limit and releases once demand falls below it."""

THERMAL_RELEASE_C = 3.0
"""Hysteresis: a slowed-down GPU recovers its clock once this far below the slowdown point."""


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
        self.serving_model = serving_model
        self.topo = build_topology(s)
        self.library = profiles or ProfileLibrary.load()
        self.thermal = thermal or ThermalParams.load()
        c = s.datacenter.cooling
        self.cooling = AisleCoolingParams(
            supply_temp_c=c.supply_temp_c,
            outside_temp_coeff=c.outside_temp_coeff,
            overload_c_per_frac=c.overload_c_per_frac,
            tau_inlet_s=c.tau_inlet_s,
            source=s.source,
        )
        sv = s.serving
        self.pools = pools_for(s.workload.pools)
        if len(sv.pools) != self.pools.n_pools:
            raise ValueError(
                f"{s.source}: serving.pools lists {len(sv.pools)} pools but workload.pools "
                f"{s.workload.pools!r} has {self.pools.n_pools}"
            )
        self.tp_profiles = {tp: self.library.get(sv.model, sv.gpu, tp) for tp in sv.tp_choices}
        ref = self.tp_profiles[sv.tp_choices[0]]
        self.gpu_model = pw.GpuPowerModel(
            idle_power_w=ref.idle_power_w,
            prefill_max_power_w=ref.prefill_max_power_w,
            prefill_k_tokens=ref.prefill_k_tokens,
            decode_max_power_w=ref.decode_max_power_w,
            decode_k_batch=ref.decode_k_batch,
            power_freq_exponent=ref.power_freq_exponent,
            gpu_power_limit_w=ref.gpu_power_limit_w,
            min_freq_mhz=ref.min_freq_mhz,
            max_freq_mhz=ref.max_freq_mhz,
        )
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
        # Weight of one tick in the row-power moving average (the tick length is fixed).
        self._cap_alpha = 1.0 - np.exp(-self.tick_s / CAP_WINDOW_S)
        self.layout = ClusterLayout(
            n_rows=self.topo.n_rows,
            n_aisles=self.topo.n_aisles,
            n_servers=self.topo.n_servers,
            gpus_per_server=self.topo.gpus_per_server,
            server_row=self.topo.server_row,
            server_aisle=self.topo.server_aisle,
            server_is_saas=self.topo.server_is_saas,
            pool_names=self.pools.names,
            tp_choices=sv.tp_choices,
            freq_choices_mhz=sv.freq_choices_mhz,
            batch_choices=sv.batch_choices,
            model=sv.model,
            gpu=sv.gpu,
            control_interval_s=s.control_interval_s,
            slo_ttft_s=self.slo_ttft_s,
            slo_tbt_s=self.slo_tbt_s,
            row_limit_w=self.topo.row_limit_w,
            aisle_capacity_w=self.topo.aisle_capacity_w,
            initial_pools=tuple(
                PoolConfig(p.n_instances, p.tp, p.freq_mhz, p.max_batch) for p in sv.pools),
            nominal_rps=max(s.workload.rps_per_gpu * len(self.topo.saas_servers)
                            * self.topo.gpus_per_server, 1e-9),
            max_freq_mhz=self.gpu_model.max_freq_mhz,
            gpu_power_limit_w=self.gpu_model.gpu_power_limit_w,
            slowdown_temp_c=self.thermal.slowdown_temp_c,
        )
        # "No clock ceiling" per GPU and per row, shared read-only (the tick replaces, never
        # writes into, its ceiling arrays).
        self._no_ceiling_mhz = _read_only(np.full(self.topo.n_gpus, self.gpu_model.max_freq_mhz))
        self._no_row_ceiling_mhz = _read_only(np.full(self.topo.n_rows, self.gpu_model.max_freq_mhz))
        self._validated_pools: tuple[PoolConfig, ...] | None = None
        self._row_inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._layout_version = 0
        self._settings_key: tuple | None = None
        self._outside_memo = (math.nan, 0.0)
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
        if self.serving_model == "request":
            self.serving: RequestLevelServing | AggregateServing = RequestLevelServing(
                n_slots, self.pools.n_pools, s.serving.max_prefill_tokens, s.serving.drop_after_s)
        else:
            self.serving = AggregateServing(
                n_slots, self.pools.n_pools, s.serving.max_prefill_tokens, s.serving.drop_after_s)
        self.vms = VmPool(s.vms, np.flatnonzero(~topo.server_is_saas), topo.n_servers)
        self.vms.reset(rng, s.duration_s)
        n_gpu = topo.n_gpus
        self.thermal_state = GpuThermalState(np.zeros(n_gpu), np.zeros(n_gpu))
        self.inlet_c = np.full(topo.n_aisles, s.datacenter.cooling.supply_temp_c)
        self.row_ceiling_mhz = np.full(topo.n_rows, self.gpu_model.max_freq_mhz)
        self.row_capped = np.zeros(topo.n_rows, dtype=bool)
        self.thermal_ceiling_mhz = np.full(n_gpu, self.gpu_model.max_freq_mhz)
        self.thermal_throttled = np.zeros(n_gpu, dtype=bool)
        self._any_throttled = False  # thermal_throttled.any() and row_capped.any(), kept in step
        self._any_capped = False
        self.row_freq_cap_mhz = np.full(topo.n_rows, self.gpu_model.max_freq_mhz)
        self.row_quantized = np.zeros(topo.n_rows, dtype=bool)
        self.row_route_weight = np.ones(topo.n_rows)
        self.admit_fraction = 1.0
        self.record = TickRecord()
        self.arrived_total = 0
        self.finished_total = 0.0
        self.dropped_total = 0.0
        self._stats_total: dict[str, float] = {}
        pools = self.layout.initial_pools
        self.pool_configs = pools
        self.reconfigurations = 0
        self.inst.reconfigure(pools, now_s=0.0, load_time_s={})
        self._refresh_slots()
        self._gpu_power_w = np.full(n_gpu, self.gpu_model.idle_power_w)
        self._gpu_temp_c = self.inlet_c[topo.gpu_aisle].copy()
        self._row_power_w = np.zeros(topo.n_rows)
        self._row_avg_w = np.full(topo.n_rows, np.nan)
        self._demand_avg_w = np.full(topo.n_rows, np.nan)
        self._aisle_heat_w = np.zeros(topo.n_aisles)
        self._row_limit_w = topo.row_limit_w.copy()
        self._aisle_cap_w = topo.aisle_capacity_w.copy()
        self._settle_idle()
        return self.telemetry()

    def apply(self, action: ClusterAction) -> None:
        """Apply a controller's decision; reconfigured instances pay their load downtime."""
        if action.pools is not None:
            self._apply_pools(action.pools)
        if action.row_freq_cap_mhz is not None:
            self.row_freq_cap_mhz = self._row_setting("row_freq_cap_mhz", action.row_freq_cap_mhz)
        if action.row_quantized is not None:
            self.row_quantized = self._row_setting("row_quantized", action.row_quantized)
        if action.row_route_weight is not None:
            self.row_route_weight = self._row_setting("row_route_weight", action.row_route_weight)
        if action.admit_fraction is not None:
            a = float(action.admit_fraction)
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"admit_fraction must be in [0, 1], got {a}")
            self.admit_fraction = a
        if action.vm_server is not None and self.vms.pending:
            self.vms.place(int(action.vm_server), self.time_s)

    def advance(self) -> ServiceMetrics:
        """Simulate one control interval."""
        acc = ServiceAccumulator(self.pools.n_pools)
        stats = _IntervalStats()
        dt = self.tick_s
        for _ in range(self.ticks_per_interval):
            self._tick(self.time_s, dt, acc, stats)
            self.time_s += dt
        self.interval += 1
        if self.auto_place_vms:
            while self.vms.pending and (server := self.vms.first_fit()) is not None:
                self.vms.place(server, self.time_s)
        return self._metrics(acc, stats)

    def telemetry(self) -> Telemetry:
        """Hardware state at the end of the last tick."""
        legal = self.vms.legal_servers() if self.vms.pending else np.zeros(self.topo.n_servers,
                                                                           dtype=bool)
        # Limits in force now (for the next tick), consistent with `active_faults`; the last
        # tick's own limits are in `record.row_limit_w`.
        row_f, aisle_f = self.faults.factors(self.time_s, self.topo.n_rows, self.topo.n_aisles)
        # The tick replaces these arrays rather than writing into them, so the record shares
        # them read-only instead of copying (a write through the record raises).
        shared = (self._gpu_power_w, self._gpu_temp_c, self.thermal_throttled, self._row_power_w,
                  self.inlet_c, self._aisle_heat_w)
        for arr in shared:
            arr.setflags(write=False)
        return Telemetry(
            time_s=self.time_s,
            gpu_power_w=self._gpu_power_w,
            gpu_temp_c=self._gpu_temp_c,
            gpu_freq_mhz=np.minimum(self.thermal_ceiling_mhz,
                                    self.row_ceiling_mhz[self.topo.gpu_row]),
            gpu_thermal_throttled=self.thermal_throttled,
            gpu_power_capped=self.row_capped[self.topo.gpu_row],
            row_power_w=self._row_power_w,
            row_limit_w=self.topo.row_limit_w * row_f,
            aisle_inlet_c=self.inlet_c,
            aisle_heat_w=self._aisle_heat_w,
            aisle_capacity_w=self.topo.aisle_capacity_w * aisle_f,
            outside_temp_c=self._outside_c(self.time_s),
            active_faults=self.faults.active_names(self.time_s),
            pending_vm_power_w=self.vms.pending_power_w[0] if self.vms.pending else 0.0,
            legal_vm_servers=legal,
        )

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
            self._validate_pools(pools)
            self._validated_pools = pools
        if pools == self.pool_configs:
            return
        self.pool_configs = tuple(pools)
        load_time = {tp: prof.load_time_s for tp, prof in self.tp_profiles.items()}
        stopped = self.inst.reconfigure(pools, self.time_s, load_time)
        self.reconfigurations = int((self.inst.active & (self.inst.ready_at_s > self.time_s)).sum())
        self.serving.requeue(stopped)
        self._refresh_slots()

    def _row_setting(self, name: str, value: np.ndarray) -> np.ndarray:
        """A per-row setting of an action, checked and converted (clipped clocks, bool flags).

        Decoded actions repeat the same read-only arrays (`envs.actions` memoizes them), so the
        result for the last read-only input of each setting is reused; writeable input is
        always checked again (it may have changed in place).
        """
        last = self._row_inputs.get(name)
        if last is not None and last[0] is value and not value.flags.writeable:
            return last[1]
        arr = _row_array(value, self.topo.n_rows, name)
        if name == "row_freq_cap_mhz":
            out = arr.clip(self.gpu_model.min_freq_mhz, self.gpu_model.max_freq_mhz)
        elif name == "row_quantized":
            out = arr.astype(bool)
        else:
            if np.count_nonzero(arr < 0):
                raise ValueError(f"{name} must be >= 0, got {arr}")
            out = arr
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            self._row_inputs[name] = (value, _read_only(out))
        return out

    def _validate_pools(self, pools: tuple[PoolConfig, ...]) -> None:
        """Raise ValueError unless `pools` is a valid configuration for this scenario."""
        sv = self.scenario.serving
        if len(pools) != self.pools.n_pools:
            raise ValueError(f"expected {self.pools.n_pools} pool configs, got {len(pools)}")
        for i, p in enumerate(pools):
            if p.tp not in self._tp_index:
                raise ValueError(f"pool {i}: tp={p.tp} not in tp_choices {sv.tp_choices}")
            if not (p.freq_mhz > 0 and p.max_batch > 0 and p.n_instances >= 0):
                raise ValueError(f"pool {i}: invalid configuration {p}")

    def _refresh_slots(self) -> None:
        """Recompute per-slot coefficient arrays and the GPU->instance map after a change."""
        inst = self.inst
        tp_idx = np.array([self._tp_index.get(int(t), 0) for t in inst.tp])
        self._slot_prof = self._tp_arrays.take(tp_idx)
        owner = inst.slot_owner()
        self._slot_owner = owner
        gpu_owner = np.full(self.topo.n_gpus, -1, dtype=np.int64)
        gpu_owner[inst.slot_gpu] = owner
        self._gpu_owner = gpu_owner
        self._slot_row = self.topo.gpu_row[inst.slot_gpu]
        # Per-layout constants of the hot path (they change only when the layout does).
        self._gpu_has = gpu_owner >= 0
        self._gpu_has_f = self._gpu_has.astype(float)
        self._gpu_o = np.where(self._gpu_has, gpu_owner, 0)
        self._slot_freq_mhz = np.where(inst.active, inst.freq_mhz, self.gpu_model.max_freq_mhz)
        self._slot_kv_tokens = self._slot_prof.kv_capacity_tokens.astype(float)
        self._any_quantized = bool(inst.quantized.any())
        self._instance_gpus = float(inst.tp[inst.active].sum())
        self._layout_version += 1  # invalidates the cached slot settings
        # The clock at which a prefill of the episode's mean prompt fits the GPU power limit
        # depends only on the slot's profile: computed here, not every tick.
        sp = self._slot_prof
        self._slot_prefill_limit_mhz = freq_at_power_limit_mhz(
            self.mean_input_tokens, sp.gpu_power_limit_w, sp.idle_power_w,
            sp.prefill_max_power_w, sp.prefill_k_tokens, sp.power_freq_exponent,
            sp.min_freq_mhz, sp.max_freq_mhz)

    # ------------------------------------------------------------------ one tick
    def _tick(self, t0: float, dt: float, acc: ServiceAccumulator, stats: _IntervalStats) -> None:
        topo, inst, gm, s = self.topo, self.inst, self.gpu_model, self.scenario
        row_f, aisle_f = self.faults.factors(t0, topo.n_rows, topo.n_aisles)
        self._row_limit_w = topo.row_limit_w * row_f
        self._aisle_cap_w = topo.aisle_capacity_w * aisle_f
        self.vms.advance(t0, dt)
        # Arrivals in [t0, t0 + dt), admission control.
        lo = self._trace_pos
        hi = int(self.trace.arrival_s.searchsorted(t0 + dt, side="left"))
        self._trace_pos = hi
        if hi > lo:
            self._admit_arrivals(lo, hi, acc)
        st = self._settings()
        f_eff, f_pre, gpu_prefill_mhz, gpu_ceiling = self._effective_clocks(st)
        serving = inst.serving(t0)
        model = self._slot_model(f_pre, f_eff, st.speed)
        load: TickLoad = self.serving.tick(t0, dt, inst, serving, model, st.route_weight,
                                           self.slo_ttft_s, self.slo_tbt_s, st.qloss, acc)
        acc.tokens += load.tokens_generated
        # GPU power at this tick's ceilings.
        gl = self._gpu_load(load, st, gpu_prefill_mhz, dt)
        dyn = gm.dynamic_at_max_clock_w(gl)
        gpu_w = gm.power_under_ceiling_w(dyn, gl, gpu_ceiling)
        srv_w = pw.server_power_w(gpu_w, s.datacenter.server, gm.idle_power_w)
        row_w = topo.row_sum(srv_w)
        aisle_w = topo.aisle_sum(srv_w)
        # Heat and temperature.
        outside = self._outside_c(t0)
        self.inlet_c = step_inlet_temperature(self.inlet_c, aisle_w, self._aisle_cap_w, outside,
                                              dt, self.cooling)
        temp = step_gpu_temperature(self.thermal_state, gpu_w, self.inlet_c[topo.gpu_aisle], dt,
                                    self.thermal)
        max_temp_c = float(temp.max())
        # Controllers for the next tick: row power capping, GPU thermal slowdown.
        self._update_power_capping(dyn, gl, row_w, stats)
        self._update_thermal_slowdown(temp, max_temp_c, gpu_w, gpu_ceiling, stats)
        # Accounting.
        energy = float(srv_w.sum()) * dt
        stats.energy_j += energy
        stats.gpu_energy_j += float(gpu_w.sum()) * dt
        stats.carbon_g += energy / 3.6e6 * self._carbon_g_per_kwh(t0)
        stats.gpu_hours += self._instance_gpus * dt / 3600.0
        if self._any_throttled:
            stats.thermal_gpu_s += float(np.count_nonzero(self.thermal_throttled)) * dt
        if self._any_capped:
            stats.capped_gpu_s += float(np.count_nonzero(self.row_capped[topo.gpu_row])) * dt
        stats.peak_row_w = max(stats.peak_row_w, float(row_w.max()))
        stats.max_temp_c = max(stats.max_temp_c, max_temp_c)
        self._gpu_power_w, self._gpu_temp_c = gpu_w, temp
        self._row_power_w, self._aisle_heat_w = row_w, aisle_w
        if self.record_ticks:
            r = self.record
            r.time_s.append(t0 + dt)
            r.row_power_w.append(row_w)
            r.row_power_avg_w.append(self._row_avg_w.copy())
            r.row_limit_w.append(self._row_limit_w.copy())
            r.aisle_inlet_c.append(self.inlet_c.copy())
            r.max_gpu_temp_c.append(max_temp_c)

    def _settings(self) -> _SlotSettings:
        """The slot settings of the current layout and row settings (recomputed on a change).

        The row settings are compared by value: a controller that repeats its decision every
        interval costs one comparison per tick, not the per-slot recomputation.
        """
        key = (self._layout_version, self.row_freq_cap_mhz.tobytes(), self.row_quantized.tobytes(),
               self.row_route_weight.tobytes())
        if key != self._settings_key:
            self._slot_settings = self._compute_settings()
            self._settings_key = key
        return self._slot_settings

    def _compute_settings(self) -> _SlotSettings:
        """Clocks, quantization and routing weight per slot (and GPU) from the current settings."""
        has, o = self._gpu_has, self._gpu_o
        max_mhz = self.gpu_model.max_freq_mhz
        # Set clock: the pool's frequency under the row's clock cap (action).
        f_set = np.minimum(self._slot_freq_mhz, self.row_freq_cap_mhz[self._slot_row])
        f_pre = np.minimum(f_set, self._slot_prefill_limit_mhz)
        speed, qloss, power_factor = self._quantization()
        return _SlotSettings(
            f_set_mhz=f_set,
            f_pre_mhz=f_pre,
            gpu_freq_mhz=_read_only(np.where(has, f_set[o], max_mhz)),
            gpu_prefill_freq_mhz=_read_only(np.where(has, np.minimum(f_pre[o], f_set[o]), max_mhz)),
            speed=speed,
            qloss=qloss,
            power_factor=power_factor,
            route_weight=self.row_route_weight[self._slot_row],
        )

    def _effective_clocks(self, st: _SlotSettings) -> tuple[np.ndarray, ...]:
        """Per-slot effective and prefill clocks, per-GPU prefill clock and clock ceiling.

        The effective clock is the set clock under the power-capping and thermal-slowdown
        ceilings of the slot's GPUs; prefill also stays within the GPU power limit.
        """
        if not (self._any_throttled or self._any_capped):
            # No clock ceiling anywhere (the common case): skip the per-GPU reduction.
            return st.f_set_mhz, st.f_pre_mhz, st.gpu_prefill_freq_mhz, self._no_ceiling_mhz
        inst, o = self.inst, self._gpu_o
        gpu_ceiling = np.minimum(self.thermal_ceiling_mhz, self.row_ceiling_mhz[self.topo.gpu_row])
        slot_ceiling = np.full(inst.n_slots, self.gpu_model.max_freq_mhz)
        valid = self._slot_owner >= 0
        np.minimum.at(slot_ceiling, self._slot_owner[valid], gpu_ceiling[inst.slot_gpu[valid]])
        f_eff = np.minimum(st.f_set_mhz, slot_ceiling)
        f_pre = np.minimum(f_eff, self._slot_prefill_limit_mhz)
        gpu_prefill_mhz = np.where(self._gpu_has, np.minimum(f_pre[o], st.f_set_mhz[o]),
                                   self.gpu_model.max_freq_mhz)
        return f_eff, f_pre, gpu_prefill_mhz, gpu_ceiling

    def _quantization(self) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | float]:
        """Per-slot speedup (None: no slot quantized), quality loss, and per-GPU power factor."""
        if not (self._any_quantized or np.count_nonzero(self.row_quantized)):
            return None, np.zeros(self.inst.n_slots), 1.0
        inst, sv = self.inst, self.scenario.serving
        quant = (self.row_quantized[self._slot_row] & inst.active) | inst.quantized
        speed = np.where(quant, sv.quantized_speedup, 1.0)
        qloss = np.where(quant, sv.quantized_quality_loss, 0.0)
        power_factor = np.where(self._gpu_has & quant[self._gpu_o], sv.quantized_power_factor, 1.0)
        return speed, qloss, power_factor

    def _slot_model(self, f_pre: np.ndarray, f_eff: np.ndarray, speed: np.ndarray | None) -> SlotModel:
        """Prefill and decode timing of the slots at this tick's clocks (and quantized speedup)."""
        sp = self._slot_prof

        def prefill(tok: np.ndarray, i: np.ndarray) -> np.ndarray:
            return prefill_time_s(tok, f_pre[i], sp.prefill_p0_s[i], sp.prefill_p1_s_per_token[i],
                                  sp.prefill_p2_s_per_token2[i], sp.prefill_phi[i], sp.max_freq_mhz[i])

        def decode(b: np.ndarray, c: np.ndarray, i: np.ndarray) -> np.ndarray:
            return decode_iter_time_s(b, c, f_eff[i], sp.decode_d0_s[i], sp.decode_d1_s_per_seq[i],
                                      sp.decode_d2_s_per_seq_token[i], sp.decode_phi[i],
                                      sp.max_freq_mhz[i])

        if speed is None:  # no slot runs quantized: every speedup is 1
            return SlotModel(prefill, decode, self._slot_kv_tokens)
        return SlotModel(lambda tok, i: prefill(tok, i) / speed[i],
                         lambda b, c, i: decode(b, c, i) / speed[i], self._slot_kv_tokens)

    def _gpu_load(self, load: TickLoad, st: _SlotSettings, gpu_prefill_mhz: np.ndarray,
                  dt: float) -> pw.GpuLoad:
        """Each GPU's phase mix and clocks over the tick, from the instance it belongs to."""
        o, has_f = self._gpu_o, self._gpu_has_f
        return pw.GpuLoad(
            prefill_frac=load.prefill_busy_s[o] * has_f / dt,
            decode_frac=load.decode_busy_s[o] * has_f / dt,
            prefill_tokens=load.prefill_tokens[o] * has_f,
            decode_batch=load.decode_batch[o] * has_f,
            freq_mhz=st.gpu_freq_mhz,
            prefill_freq_mhz=gpu_prefill_mhz,
            power_factor=st.power_factor,
            vm_power_w=self.vms.gpu_power_w.repeat(self.topo.gpus_per_server),
        )

    def _update_power_capping(self, dyn: tuple[np.ndarray, np.ndarray, np.ndarray],
                              gl: pw.GpuLoad, row_w: np.ndarray, stats: _IntervalStats) -> None:
        """Row power capping for the next tick.

        Capping engages when demand exceeds the limit and holds (aiming a margin below the
        limit) until demand falls below that margin: hysteresis, as real capping controllers.
        Demand is read as a moving average over CAP_WINDOW_S (PDU meters and breaker trip
        curves work on seconds, not on single prefill bursts).
        """
        topo, gm, server = self.topo, self.gpu_model, self.scenario.datacenter.server
        if self._any_capped:
            uncapped = gm.power_under_ceiling_w(dyn, gl, self.thermal_ceiling_mhz)
            demand_w = topo.row_sum(pw.server_power_w(uncapped, server, gm.idle_power_w))
        else:  # no row ceiling in force this tick: the demand is what the rows drew
            demand_w = row_w
        alpha = self._cap_alpha
        if math.isnan(self._row_avg_w[0]):  # first tick of the episode
            self._demand_avg_w, self._row_avg_w = demand_w.copy(), row_w.copy()
        self._demand_avg_w += alpha * (demand_w - self._demand_avg_w)
        self._row_avg_w += alpha * (row_w - self._row_avg_w)
        demand_w = self._demand_avg_w
        target_w = self._row_limit_w * CAP_TARGET_FRACTION
        over = (demand_w > self._row_limit_w) | (self.row_capped & (demand_w > target_w))
        stats.power_events += int(np.count_nonzero(over & ~self.row_capped))
        self._any_capped = bool(np.count_nonzero(over))
        if self._any_capped:
            self.row_ceiling_mhz = pw.row_cap_ceiling_mhz(
                gm, gl, topo.gpu_row, self.thermal_ceiling_mhz, np.flatnonzero(over),
                target_w, server, topo.n_rows, dyn=dyn)
        else:
            self.row_ceiling_mhz = self._no_row_ceiling_mhz
        self.row_capped = over

    def _update_thermal_slowdown(self, temp: np.ndarray, max_temp_c: float, gpu_w: np.ndarray,
                                 gpu_ceiling: np.ndarray, stats: _IntervalStats) -> None:
        """GPU thermal slowdown for the next tick (engages above, releases well below the limit)."""
        slowdown_c = self.thermal.slowdown_temp_c
        if not (self._any_throttled or max_temp_c > slowdown_c):
            return  # nothing throttled and nothing hot: every flag stays off
        hot = temp > slowdown_c
        release = temp < slowdown_c - THERMAL_RELEASE_C
        stats.thermal_events += int(np.count_nonzero(hot & ~self.thermal_throttled))
        self.thermal_throttled = (self.thermal_throttled | hot) & ~release
        self._any_throttled = bool(np.count_nonzero(self.thermal_throttled))
        if self._any_throttled:
            self._update_thermal_ceiling(gpu_w, gpu_ceiling)
        else:
            self.thermal_ceiling_mhz = self._no_ceiling_mhz

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

    def _update_thermal_ceiling(self, gpu_w: np.ndarray, ceiling: np.ndarray) -> None:
        """Clock at which each throttled GPU's steady state sits just below the slowdown point."""
        th, gm = self.thermal, self.gpu_model
        r_total = th.r_die_c_per_w + th.r_sink_c_per_w
        inlet = self.inlet_c[self.topo.gpu_aisle]
        target_w = (th.slowdown_temp_c - THERMAL_RELEASE_C - inlet) / r_total
        dyn = np.maximum(gpu_w - gm.idle_power_w, 1e-6)
        f_now = np.minimum(ceiling, gm.max_freq_mhz)
        ratio = np.clip((target_w - gm.idle_power_w) / dyn, 0.0, None)
        f = f_now * ratio ** (1.0 / gm.power_freq_exponent)
        f = np.clip(f, gm.min_freq_mhz, gm.max_freq_mhz)
        self.thermal_ceiling_mhz = np.where(self.thermal_throttled, np.minimum(f, f_now),
                                            gm.max_freq_mhz)

    def _settle_idle(self) -> None:
        """Start temperatures at the idle steady state (a datacenter that was running)."""
        gm, th, topo = self.gpu_model, self.thermal, self.topo
        idle = np.full(topo.n_gpus, gm.idle_power_w)
        idle += np.maximum(np.repeat(self.vms.gpu_power_w, topo.gpus_per_server) - idle, 0.0)
        self.thermal_state.x_die_c[:] = th.r_die_c_per_w * idle
        self.thermal_state.x_sink_c[:] = th.r_sink_c_per_w * idle
        self._gpu_temp_c = self.inlet_c[topo.gpu_aisle] + (th.r_die_c_per_w +
                                                           th.r_sink_c_per_w) * idle
        # The first telemetry reports the power of that state too (VMs included), not zeros.
        self._gpu_power_w = idle
        srv_w = pw.server_power_w(idle, self.scenario.datacenter.server, gm.idle_power_w)
        self._row_power_w = topo.row_sum(srv_w)
        self._aisle_heat_w = topo.aisle_sum(srv_w)

    def _outside_c(self, t_s: float) -> float:
        """Outside air temperature (memoized for the last time asked: telemetry, then the tick)."""
        last_t, last_c = self._outside_memo
        if t_s == last_t:
            return last_c
        d = self.scenario.datacenter
        c = d.outside_temp_mean_c + d.outside_temp_amplitude_c * np.sin(
            2 * np.pi * (t_s / 86400.0 - 0.25))
        self._outside_memo = (t_s, c)
        return c

    def _carbon_g_per_kwh(self, t_s: float) -> float:
        series = self.scenario.carbon_g_per_kwh
        return series[int(t_s // self.scenario.carbon_step_s) % len(series)]

    def _metrics(self, acc: ServiceAccumulator, st: _IntervalStats) -> ServiceMetrics:
        waiting, running = self.serving.per_pool_counts()
        t50, t99, b50, b99, ttft_hist, tbt_hist = acc.latency_stats()
        self.arrived_total += acc.arrived
        self.finished_total += acc.finished
        self.dropped_total += acc.dropped
        reconf, self.reconfigurations = self.reconfigurations, 0
        return ServiceMetrics(
            interval_s=self.scenario.control_interval_s,
            arrived=acc.arrived,
            finished=acc.finished,
            dropped=acc.dropped,
            in_flight=self.serving.in_flight,
            tokens_generated=acc.tokens,
            energy_j=st.energy_j,
            gpu_energy_j=st.gpu_energy_j,
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
            reconfigurations=reconf,
            arrivals_per_pool=acc.arrivals_per_pool,
            queued_per_pool=waiting,
            running_per_pool=running,
            peak_row_power_w=st.peak_row_w,
            max_gpu_temp_c=st.max_temp_c,
            carbon_g=st.carbon_g,
            gpu_hours=st.gpu_hours,
            ttft_hist=ttft_hist,
            tbt_hist=tbt_hist,
        )


@dataclass(frozen=True)
class _SlotSettings:
    """Per-slot and per-GPU quantities that change only with the layout or the row settings.

    Attributes:
        f_set_mhz: Slot clock: the pool's frequency under the row's clock cap.
        f_pre_mhz: Slot prefill clock (also within the GPU power limit) with no ceiling in force.
        gpu_freq_mhz: Each GPU's set clock (the maximum where no instance runs).
        gpu_prefill_freq_mhz: Each GPU's prefill clock with no ceiling in force.
        speed: Per-slot quantized speedup, or None when no slot runs quantized.
        qloss: Per-slot quality loss of quantized serving.
        power_factor: Per-GPU dynamic power factor (1.0 when nothing is quantized).
        route_weight: Per-slot routing weight of the slot's row.
    """

    f_set_mhz: np.ndarray
    f_pre_mhz: np.ndarray
    gpu_freq_mhz: np.ndarray
    gpu_prefill_freq_mhz: np.ndarray
    speed: np.ndarray | None
    qloss: np.ndarray
    power_factor: np.ndarray | float
    route_weight: np.ndarray


@dataclass
class _IntervalStats:
    energy_j: float = 0.0
    gpu_energy_j: float = 0.0
    carbon_g: float = 0.0
    gpu_hours: float = 0.0
    thermal_events: int = 0
    power_events: int = 0
    thermal_gpu_s: float = 0.0
    capped_gpu_s: float = 0.0
    peak_row_w: float = 0.0
    max_temp_c: float = 0.0


def _read_only(arr: np.ndarray) -> np.ndarray:
    """`arr`, marked read-only (for arrays shared between ticks and telemetry)."""
    arr.flags.writeable = False
    return arr


def _row_array(value: np.ndarray, n: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr}")
    return arr
