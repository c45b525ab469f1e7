"""N copies of one simulated cluster, stepped together as arrays (the aggregate model, for training).

`BatchedSimCluster` runs the tick of `SimCluster` with the aggregate serving model over N
independent copies of one scenario's datacenter laid end to end: copy ``e`` owns servers
``e*n .. (e+1)*n - 1`` (and their GPUs, rows, aisles and instance slots) of one stacked
topology (`stack_topology`). Everything per GPU, server, row or aisle (clocks, GPU and server
power, power states, aisle inlet and GPU temperatures, row power capping, thermal slowdown) is
the single cluster's code on the stacked arrays: rows and aisles never straddle copies, so each
copy's sums are its own. What couples a cluster's parts is kept per copy: request routing
(`serving_batched`), the interval's accounting (`BatchedIntervalStats`, `BatchedAccumulator`) and
throttling events. Each copy draws its own workload from its own seed at `reset`, exactly as a
`SimCluster` reset with that seed does.

The copies step in lockstep (one clock, the same number of intervals); a pool reconfiguration
(instance count, TP degree) looks up each changed copy's packed layout (memoized per
configuration) and replaces their instances as one array; a clock or batch-cap change is one
array operation for all copies. Scope: what the energy (DynamoLLM) task needs: scenarios whose servers all
serve the LLM (no IaaS hosts or VMs), without faults, per-request SLO classes, per-server
routing or serial prefill; the row settings stay at their defaults (no row clock cap,
quantization or routing preference). Any other scenario is refused with a `ScenarioError`
naming the field.

Each copy's figures equal those of a `SimCluster` with the same seed and pool decisions up to
the order of floating-point sums (`tests/test_batched.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from llm_cluster_gym.envs.backend import ClusterLayout
from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim.accounting import carbon_g_per_kwh
from llm_cluster_gym.envs.sim.clocks import SlotModelCache, effective_clocks, gpu_load, slot_settings
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.demand import episode_trace
from llm_cluster_gym.envs.sim.faults import FaultSchedule
from llm_cluster_gym.envs.sim.instances import InstanceTable, pool_layout, replace_instances
from llm_cluster_gym.envs.sim.layout import SlotTables, slot_tables
from llm_cluster_gym.envs.sim.profiles import ProfileArrays, ProfileLibrary, clock_slowdown
from llm_cluster_gym.envs.sim.scenario import Scenario, ScenarioError
from llm_cluster_gym.envs.sim.server_power import ServerPowerStates
from llm_cluster_gym.envs.sim.serving_batched import BatchedAccumulator, BatchedAggregateServing
from llm_cluster_gym.envs.sim.thermal import (
    GpuThermalState,
    ThermalParams,
    step_gpu_temperature,
    step_inlet_temperature,
)
from llm_cluster_gym.envs.sim.throttle import RowPowerCapping, ThermalSlowdown, read_only
from llm_cluster_gym.envs.sim.topology import Topology

__all__ = ["BatchedMetrics", "BatchedSimCluster", "batch_support_error", "stack_topology"]


def stack_topology(topo: Topology, n: int) -> Topology:
    """`n` copies of `topo` end to end: copy e's servers, GPUs, rows and aisles follow copy e-1's."""
    def offsets(per_copy: int, size: int) -> np.ndarray:
        return np.repeat(np.arange(n) * per_copy, size)

    def tiled(arr: np.ndarray, per_copy: int) -> np.ndarray:
        return np.tile(arr, n) + offsets(per_copy, len(arr))

    racks = int(topo.server_rack.max()) + 1
    inlet = None if topo.gpu_inlet_offset_c is None else read_only(np.tile(topo.gpu_inlet_offset_c, n))
    return Topology(
        n_rows=topo.n_rows * n,
        n_aisles=topo.n_aisles * n,
        n_servers=topo.n_servers * n,
        gpus_per_server=topo.gpus_per_server,
        server_row=tiled(topo.server_row, topo.n_rows),
        server_aisle=tiled(topo.server_aisle, topo.n_aisles),
        server_rack=tiled(topo.server_rack, racks),
        server_is_saas=np.tile(topo.server_is_saas, n),
        gpu_server=tiled(topo.gpu_server, topo.n_servers),
        gpu_row=tiled(topo.gpu_row, topo.n_rows),
        gpu_aisle=tiled(topo.gpu_aisle, topo.n_aisles),
        row_limit_w=np.tile(topo.row_limit_w, n),
        aisle_capacity_w=np.tile(topo.aisle_capacity_w, n),
        saas_servers=tiled(topo.saas_servers, topo.n_servers),
        gpu_inlet_offset_c=inlet,
    )


def batch_support_error(s: Scenario) -> str | None:
    """Why the batched simulator cannot run scenario `s` (a field and its value), or None."""
    where = s.source or s.name
    if s.serving.prefill_mode == "serial":
        return f"{where}: field 'serving.prefill_mode' = 'serial' (the batched model is chunked only)"
    if s.datacenter.saas_fraction < 1.0:
        return (f"{where}: field 'datacenter.saas_fraction' = {s.datacenter.saas_fraction} (the "
                "batched model has no IaaS hosts or VMs; it needs 1.0)")
    if s.faults:
        return f"{where}: field 'faults' lists {len(s.faults)} fault(s) (the batched model has none)"
    if s.random_faults.per_hour > 0 and s.random_faults.kinds:
        return (f"{where}: field 'random_faults.per_hour' = {s.random_faults.per_hour} (the batched "
                "model has no faults)")
    if s.serving.slo_classes:
        return f"{where}: field 'serving.slo_classes' is set (the batched model judges pool SLOs)"
    if s.serving.route_per_server:
        return f"{where}: field 'serving.route_per_server' is true (the batched model routes by row)"
    return None


@dataclass(frozen=True)
class BatchedMetrics:
    """One control interval's service metrics, one entry per copy (`ServiceMetrics`' fields).

    Every field is an array over copies ((copies, pools) for the per-pool ones). Latency
    histograms are not kept (the observation and the reward read the percentiles).
    """

    arrived: np.ndarray
    finished: np.ndarray
    dropped: np.ndarray
    in_flight: np.ndarray
    tokens_generated: np.ndarray
    energy_j: np.ndarray
    gpu_energy_j: np.ndarray
    facility_energy_j: np.ndarray
    ttft_p50_s: np.ndarray
    ttft_p99_s: np.ndarray
    tbt_p50_s: np.ndarray
    tbt_p99_s: np.ndarray
    slo_ttft_violations: np.ndarray
    slo_tbt_violations: np.ndarray
    slo_violations: np.ndarray
    thermal_throttle_events: np.ndarray
    power_throttle_events: np.ndarray
    thermal_throttled_gpu_s: np.ndarray
    power_capped_gpu_s: np.ndarray
    clock_lost_mhz_s: np.ndarray
    saas_tokens_lost: np.ndarray
    quality_loss: np.ndarray
    reconfigurations: np.ndarray
    peak_row_power_w: np.ndarray
    max_gpu_temp_c: np.ndarray
    carbon_g: np.ndarray
    gpu_hours: np.ndarray
    servers_powered: np.ndarray
    arrivals_per_pool: np.ndarray
    queued_per_pool: np.ndarray
    running_per_pool: np.ndarray

    @property
    def slo_attainment(self) -> np.ndarray:
        """`ServiceMetrics.slo_attainment` per copy: met / (finished + dropped), 1 where none."""
        judged = self.finished + self.dropped
        return np.where(judged > 0, (self.finished - self.slo_violations) / np.maximum(judged, 1e-300),
                        1.0)


class BatchedIntervalStats:
    """`accounting.IntervalStats` with one total per copy (arrays of length n_copies)."""

    def __init__(self, n_copies: int, pue: float) -> None:
        self.n, self.pue = n_copies, pue
        for name in ("energy_j", "gpu_energy_j", "facility_energy_j", "carbon_g", "gpu_hours",
                     "powered_server_s", "thermal_events", "power_events", "thermal_gpu_s",
                     "capped_gpu_s", "clock_lost_mhz_s", "tokens_lost", "peak_row_w", "max_temp_c"):
            setattr(self, name, np.zeros(n_copies))

    def per_copy(self, arr: np.ndarray) -> np.ndarray:
        """Sum of a stacked array's entries per copy (copies own equal, contiguous blocks)."""
        return arr.reshape(self.n, -1).sum(axis=1)

    def add_tick(self, srv_w, gpu_w, row_w, max_temp_c, dt, carbon_g_per_kwh, paid_gpus,
                 powered_servers) -> None:
        """`IntervalStats.add_tick`, per copy."""
        energy = self.per_copy(srv_w) * dt
        facility = energy * self.pue
        self.energy_j += energy
        self.gpu_energy_j += self.per_copy(gpu_w) * dt
        self.facility_energy_j += facility
        self.carbon_g += facility / 3.6e6 * carbon_g_per_kwh
        self.gpu_hours += paid_gpus * dt / 3600.0
        self.powered_server_s += powered_servers * dt
        self.peak_row_w = np.maximum(self.peak_row_w, row_w.reshape(self.n, -1).max(axis=1))
        self.max_temp_c = np.maximum(self.max_temp_c, max_temp_c)

    def add_throttling(self, slowdown: ThermalSlowdown, capping: RowPowerCapping,
                       gpu_row: np.ndarray, set_mhz: np.ndarray, has_instance: np.ndarray,
                       dt: float) -> None:
        """`IntervalStats.add_throttling`, per copy (every GPU serves the LLM: no IaaS split)."""
        if not (slowdown.any_throttled or capping.any_capped):
            return
        if slowdown.any_throttled:
            self.thermal_gpu_s += self.per_copy(slowdown.throttled.astype(float)) * dt
        if capping.any_capped:
            self.capped_gpu_s += self.per_copy(capping.capped[gpu_row].astype(float)) * dt
        ceiling = np.minimum(slowdown.ceiling_mhz, capping.ceiling_mhz[gpu_row])
        lost = np.where(has_instance, np.maximum(set_mhz - ceiling, 0.0), 0.0)
        self.clock_lost_mhz_s += self.per_copy(lost) * dt

    def add_tokens_lost(self, decode_tokens, f_eff_mhz, f_set_mhz, decode_phi, max_mhz) -> None:
        """`IntervalStats.add_tokens_lost`, per copy."""
        hit = f_eff_mhz < f_set_mhz
        if not np.count_nonzero(hit):
            return
        ratio = clock_slowdown(f_eff_mhz, max_mhz, decode_phi) / clock_slowdown(f_set_mhz, max_mhz,
                                                                                decode_phi)
        self.tokens_lost += self.per_copy(np.where(hit, decode_tokens * (ratio - 1.0), 0.0))


class BatchedSimCluster:
    """N copies of a scenario's simulated cluster under the aggregate serving model (see module).

    Args:
        scenario: A `Scenario` or the name/path of a scenario file.
        n_copies: Copies N (>= 1).
        profiles, thermal: As `SimCluster`.

    Raises:
        ScenarioError: The scenario uses something the batched model does not run
            (`batch_support_error`).
    """

    def __init__(self, scenario: Scenario | str, n_copies: int,
                 profiles: ProfileLibrary | None = None, thermal: ThermalParams | None = None) -> None:
        if n_copies < 1:
            raise ValueError(f"n_copies must be >= 1, got {n_copies}")
        one = SimCluster(scenario, serving_model="aggregate", profiles=profiles, thermal=thermal)
        s = one.scenario
        why = batch_support_error(s)
        if why is not None:
            raise ScenarioError(why)
        self.one = one
        """A single `SimCluster` of the scenario: its layout, description and constants."""
        self.scenario = s
        self.n_copies = n = n_copies
        self.layout: ClusterLayout = one.layout
        self.topo = stack_topology(one.topo, n)
        self.gpu_model = gm = one.gpu_model
        self.thermal = one.thermal
        self.tick_s = one.tick_s
        self.n_intervals = one.n_intervals
        self.n_pools = one.pools.n_pools
        self.slots_per_copy = len(one.topo.saas_servers) * one.topo.gpus_per_server
        self.capping = RowPowerCapping(gm, s.datacenter.server, self.topo, self.tick_s)
        self.slowdown = ThermalSlowdown(gm, self.thermal, self.topo.gpu_aisle,
                                        self.topo.gpu_inlet_offset_c)
        self.power = ServerPowerStates(self.topo.n_servers, s.datacenter.server.wake_latency_s,
                                       s.datacenter.idle_to_off_s)
        self.slo_ttft_s = np.tile(one.slo_ttft_s, n)
        self.slo_tbt_s = np.tile(one.slo_tbt_s, n)
        self._load_time_s = {tp: prof.load_time_s for tp, prof in one.tp_profiles.items()}
        tps = s.serving.tp_choices
        self._tp_choices = np.asarray(tps, dtype=np.int64)
        self._tp_index = {tp: i for i, tp in enumerate(tps)}
        self._tp_arrays = ProfileArrays.stack([one.tp_profiles[tp] for tp in tps])
        self._model_cache = SlotModelCache()
        self._layouts: dict[bytes, tuple[np.ndarray, ...]] = {}
        self._n_rows = self.topo.n_rows
        self._local_slot_gpu = InstanceTable.empty(one.topo.saas_servers,
                                                   one.topo.gpus_per_server).slot_gpu
        self.time_s = 0.0
        self.interval = 0

    # ------------------------------------------------------------------ episode
    def reset(self, seeds: Sequence[int]) -> None:
        """Start an episode in every copy; copy e draws its workload from ``seeds[e]``.

        Copy e's workload is the one `SimCluster.reset(seed=seeds[e])` draws.
        """
        n, s, one = self.n_copies, self.scenario, self.one
        if len(seeds) != n:
            raise ValueError(f"reset needs {n} seeds (one per copy), got {len(seeds)}")
        topo = self.topo
        self.time_s, self.interval = 0.0, 0
        self._bin_arrivals(seeds)
        self.inst = InstanceTable.empty(topo.saas_servers, topo.gpus_per_server)
        self.serving = BatchedAggregateServing(n, self.slots_per_copy, self.n_pools,
                                               s.serving.max_prefill_tokens, s.serving.drop_after_s)
        self.thermal_state = GpuThermalState(np.zeros(topo.n_gpus), np.zeros(topo.n_gpus))
        self.inlet_c = np.full(topo.n_aisles, s.datacenter.cooling.supply_temp_c)
        self.capping.reset()
        self.slowdown.reset()
        self.row_freq_cap_mhz = np.full(self._n_rows, self.gpu_model.max_freq_mhz)
        self.row_quantized = np.zeros(self._n_rows, dtype=bool)
        self.row_route_weight = np.ones(self._n_rows)
        self.arrived_total = np.zeros(n)
        self.finished_total = np.zeros(n)
        self.dropped_total = np.zeros(n)
        initial = one.layout.initial_pools
        self._layout_key = np.array([[(p.n_instances, p.tp) for p in initial]] * n)
        self._freq = np.array([[p.freq_mhz for p in initial]] * n, dtype=float)
        self._batch = np.array([[p.max_batch for p in initial]] * n, dtype=np.int64)
        self._relayout(np.arange(n), self._layout_key, now_s=0.0, load_time_s={})
        self._set_pool_settings()
        self.reconfigurations = np.zeros(n)
        self._refresh_slots(layout_changed=True)
        self.power.reset(self._saas_occupied)
        self._settle_idle()

    def _bin_arrivals(self, seeds: Sequence[int]) -> None:
        """Each copy's trace, drawn as `SimCluster.reset` draws it, binned per interval and pool."""
        s, one = self.scenario, self.one
        n, k, p = self.n_copies, self.n_intervals, self.n_pools
        saas_gpus = len(one.topo.saas_servers) * one.topo.gpus_per_server
        # The interval ends as the single cluster's clock reaches them (time += dt per tick).
        ends, t = np.empty(k), 0.0
        for i in range(k):
            ends[i] = t + self.tick_s
            t += self.tick_s
        self._count = np.zeros((n, k, p), dtype=np.int64)
        self._in_sum = np.zeros((n, k, p))
        self._out_sum = np.zeros((n, k, p))
        self._mean_input_tokens = np.ones(n)
        for e, seed in enumerate(seeds):
            rng = np.random.default_rng(int(seed))
            faults = FaultSchedule.build(s, rng)
            trace = episode_trace(s, saas_gpus, faults.spikes(), rng)
            pool = one.pools.assign(trace.input_tokens, trace.output_tokens)
            if len(trace):
                self._mean_input_tokens[e] = float(trace.input_tokens.mean())
            interval = ends.searchsorted(trace.arrival_s, side="right")
            keep = interval < k
            key = interval[keep] * p + pool[keep]
            self._count[e] = np.bincount(key, minlength=k * p).reshape(k, p)
            self._in_sum[e] = np.bincount(key, weights=trace.input_tokens[keep],
                                          minlength=k * p).reshape(k, p)
            self._out_sum[e] = np.bincount(key, weights=trace.output_tokens[keep],
                                           minlength=k * p).reshape(k, p)

    @property
    def done(self) -> bool:
        """True when the scenario's duration has been simulated (every copy at once)."""
        return self.interval >= self.n_intervals

    # ------------------------------------------------------------------ decisions
    def apply_pools(self, n_instances: np.ndarray, tp: np.ndarray, freq_mhz: np.ndarray,
                    max_batch: np.ndarray) -> None:
        """Set every copy's pools: arrays (copies, pools) of instances, TP, clock and batch cap.

        A copy whose instance counts or TP degrees change is laid out again (its replaced
        instances pay their load downtime, their requests go back to the router); clocks and
        batch caps change in place. As `SimCluster.apply` with that copy's `PoolConfig`s.

        Raises:
            ValueError: A wrong shape, a TP degree the scenario does not offer, a negative
                instance count, or a clock or batch cap that is not positive.
        """
        # Copies: the caller may reuse its arrays; the settings in force are kept here.
        n_instances, tp = np.array(n_instances, dtype=np.int64), np.array(tp, dtype=np.int64)
        freq_mhz, max_batch = np.array(freq_mhz, dtype=float), np.array(max_batch, dtype=np.int64)
        shape = (self.n_copies, self.n_pools)
        for name, arr in (("n_instances", n_instances), ("tp", tp), ("freq_mhz", freq_mhz),
                          ("max_batch", max_batch)):
            if arr.shape != shape:
                raise ValueError(f"apply_pools: {name} must have shape {shape}, got {arr.shape}")
        if not (tp[..., None] == self._tp_choices).any(axis=-1).all():
            raise ValueError(f"apply_pools: tp must be one of {self.scenario.serving.tp_choices}, "
                             f"got {np.unique(tp).tolist()}")
        if (n_instances < 0).any() or not (freq_mhz > 0).all() or (max_batch <= 0).any():
            raise ValueError("apply_pools: n_instances must be >= 0, freq_mhz and max_batch > 0")
        key = np.stack([n_instances, tp], axis=-1)
        relaid = (key != self._layout_key).any(axis=(1, 2))
        retuned = ((freq_mhz != self._freq) | (max_batch != self._batch)).any(axis=1)
        changed = relaid | retuned
        if not changed.any():
            return
        now = self.time_s
        stopped = (self._relayout(np.flatnonzero(relaid), key, now, self._load_time_s)
                   if relaid.any() else None)
        self._layout_key = key
        self._freq, self._batch = freq_mhz, max_batch
        self._set_pool_settings()
        self._refresh_slots(layout_changed=bool(relaid.any()))
        inst = self.inst
        if relaid.any():
            self.power.wake(self._saas_occupied, now)
            if self.power.any_down:
                inst.defer_start(self.power.up_at_s(now)[self.topo.saas_servers], now,
                                 self._load_time_s)
        loading = (inst.active & (inst.ready_at_s > now)).astype(float)
        counts = loading.reshape(self.n_copies, -1).sum(axis=1)
        self.reconfigurations = np.where(changed, counts, self.reconfigurations)
        if stopped is not None and stopped.any():
            self.serving.requeue(stopped)

    def _relayout(self, copies: np.ndarray, layout_key: np.ndarray, now_s: float,
                  load_time_s: dict) -> np.ndarray:
        """Lay out again the pools of `copies` ((instances, TP) per pool in `layout_key`).

        `InstanceTable.reconfigure` for those copies at once: each copy's packed layout
        (`instances.pool_layout`, memoized), then which instances it keeps, stops and starts
        (`instances.replace_instances`) over all of them as one array. The table gets new arrays
        (the router keeps the pools its queues were routed by until its next tick). Clocks and
        batch caps are set by `_set_pool_settings`. Returns the stopped first slots, stacked.
        """
        inst, n, size, p = self.inst, self.n_copies, self.slots_per_copy, self.n_pools
        n_servers = size // inst.gpus_per_server
        cache = self._layouts
        layouts = []
        for e in copies:
            row = layout_key[e]
            key = row.tobytes()
            hit = cache.get(key)
            if hit is None:
                hit = pool_layout(tuple((int(tp), max(int(k), 0), False) for k, tp in row),
                                  inst.gpus_per_server, n_servers)
                cache[key] = hit
            layouts.append(hit)
        new_active, new_pool, new_tp, new_quant = (np.stack(parts) for parts in zip(*layouts,
                                                                                   strict=True))

        def rows(arr: np.ndarray) -> np.ndarray:
            return arr.reshape(n, size)[copies]

        stopped_rows, ready_rows = replace_instances(
            rows(inst.active), rows(inst.tp), rows(inst.quantized), rows(inst.ready_at_s),
            new_active, new_tp, new_quant, now_s, load_time_s)
        new_pool = np.where(new_pool >= 0, new_pool + (copies * p)[:, None], -1)
        for name, value in (("active", new_active), ("pool", new_pool), ("tp", new_tp),
                            ("quantized", new_quant), ("ready_at_s", ready_rows)):
            arr = getattr(inst, name).copy()
            arr.reshape(n, size)[copies] = value
            setattr(inst, name, arr)
        stopped = np.zeros((n, size), dtype=bool)
        stopped[copies] = stopped_rows
        return stopped.ravel()

    def _set_pool_settings(self) -> None:
        """Each instance's clock and batch cap: its pool's (`_freq`, `_batch`; 0 off instances)."""
        inst = self.inst
        of_pool = np.maximum(inst.pool, 0)
        inst.freq_mhz = np.where(inst.active, self._freq.ravel()[of_pool], 0.0)
        inst.max_batch = np.where(inst.active, self._batch.ravel()[of_pool], 0)

    def _refresh_slots(self, layout_changed: bool) -> None:
        """The stacked slot tables and slot settings after a layout or clock change."""
        inst, topo = self.inst, self.topo
        max_mhz = self.gpu_model.max_freq_mhz
        if layout_changed:
            mean_in = np.repeat(self._mean_input_tokens, self.slots_per_copy)
            self.slots: SlotTables = slot_tables(inst, topo, self._tp_index, self._tp_arrays, max_mhz,
                                                 mean_in, self.gpu_model.idle_no_context_w)
            occupied = np.zeros(topo.n_servers, dtype=bool)
            occupied[topo.saas_servers[inst.occupied_servers()]] = True
            self._saas_occupied = occupied
        else:
            self.slots = replace(self.slots, freq_mhz=np.where(inst.active, inst.freq_mhz, max_mhz))
        self.settings = slot_settings(self.slots, inst, self.row_freq_cap_mhz, self.row_quantized,
                                      self.row_route_weight, self.scenario.serving, max_mhz)
        self._down_key = None

    # ------------------------------------------------------------------ power states
    def _phase_power(self) -> pw.GpuPhasePower:
        """`SimCluster._phase_power` on the stacked arrays."""
        base = self.slots.gpu_phase_power
        if not self.power.any_down:
            return base
        key = (self.slots, self.power.version)
        if self._down_key == key:
            return self._down_value
        g = self.topo.gpus_per_server
        idle = base.idle_w.copy()
        idle[np.repeat(self.power.waking, g)] = self.gpu_model.idle_no_context_w
        idle[np.repeat(self.power.off, g)] = 0.0
        self._down_key, self._down_value = key, replace(base, idle_w=read_only(idle))
        return self._down_value

    def _paid(self) -> tuple[np.ndarray, np.ndarray]:
        """Per copy: GPUs of powered SaaS servers, and powered servers."""
        powered = self.power.powered().reshape(self.n_copies, -1)
        servers = powered.sum(axis=1).astype(float)
        return servers * self.topo.gpus_per_server, servers

    def _settle_idle(self) -> None:
        """`SimCluster._settle_idle`: temperatures at the idle steady state of the initial layout."""
        th, topo = self.thermal, self.topo
        idle = self._phase_power().idle_w.copy()
        self.thermal_state.x_die_c[:] = th.r_die_c_per_w * idle
        self.thermal_state.x_sink_c[:] = th.r_sink_c_per_w * idle
        self.gpu_temp_c = topo.gpu_inlet_c(self.inlet_c) + (th.r_die_c_per_w + th.r_sink_c_per_w) * idle
        self.gpu_power_w = idle
        srv_w = pw.server_power_w(idle, self.scenario.datacenter.server, self.gpu_model.idle_power_w,
                                  self.power.off if self.power.any_down else None)
        self.row_power_w = topo.row_sum(srv_w)
        self.aisle_heat_w = topo.aisle_sum(srv_w)

    # ------------------------------------------------------------------ one interval
    def advance(self) -> BatchedMetrics:
        """Simulate one control interval in every copy (one aggregate tick)."""
        if self.done:
            raise RuntimeError("BatchedSimCluster.advance: the episode is over; call reset()")
        n = self.n_copies
        acc = BatchedAccumulator(n, self.n_pools, self.slots_per_copy)
        stats = BatchedIntervalStats(n, self.scenario.datacenter.pue)
        self._tick(self.time_s, self.tick_s, acc, stats)
        self.time_s += self.tick_s
        self.interval += 1
        waiting, running = self.serving.per_pool_counts()
        self.arrived_total += acc.arrived
        self.finished_total += acc.finished
        self.dropped_total += acc.dropped
        reconf, self.reconfigurations = self.reconfigurations, np.zeros(n)
        t50, t99, b50, b99 = acc.latency_percentiles()
        return BatchedMetrics(
            arrived=acc.arrived, finished=acc.finished, dropped=acc.dropped,
            in_flight=self.serving.in_flight_per_copy, tokens_generated=acc.tokens,
            energy_j=stats.energy_j, gpu_energy_j=stats.gpu_energy_j,
            facility_energy_j=stats.facility_energy_j, ttft_p50_s=t50, ttft_p99_s=t99,
            tbt_p50_s=b50, tbt_p99_s=b99, slo_ttft_violations=acc.ttft_violations,
            slo_tbt_violations=acc.tbt_violations, slo_violations=acc.violations,
            thermal_throttle_events=stats.thermal_events, power_throttle_events=stats.power_events,
            thermal_throttled_gpu_s=stats.thermal_gpu_s, power_capped_gpu_s=stats.capped_gpu_s,
            clock_lost_mhz_s=stats.clock_lost_mhz_s, saas_tokens_lost=stats.tokens_lost,
            quality_loss=acc.quality_loss, reconfigurations=reconf,
            peak_row_power_w=stats.peak_row_w, max_gpu_temp_c=stats.max_temp_c,
            carbon_g=stats.carbon_g, gpu_hours=stats.gpu_hours,
            servers_powered=stats.powered_server_s / self.scenario.control_interval_s,
            arrivals_per_pool=acc.arrivals_per_pool, queued_per_pool=waiting.reshape(n, -1),
            running_per_pool=running.reshape(n, -1))

    def _tick(self, t0: float, dt: float, acc: BatchedAccumulator, stats: BatchedIntervalStats) -> None:
        """`SimCluster._tick` on the stacked copies (the parts the supported scenarios use)."""
        topo, inst, gm, s = self.topo, self.inst, self.gpu_model, self.scenario
        slots, capping, slowdown = self.slots, self.capping, self.slowdown
        self.power.update(t0, self._saas_occupied)
        k = self.interval
        count = self._count[:, k]
        acc.arrived += count.sum(axis=1)
        acc.arrivals_per_pool += count
        self.serving.add_interval_arrivals(count, self._in_sum[:, k], self._out_sum[:, k])
        st = self.settings
        f_eff, f_pre, gpu_prefill_mhz, gpu_ceiling = effective_clocks(
            st, slots, inst, slowdown, capping, topo.gpu_row, gm.max_freq_mhz)
        serving = inst.serving(t0)
        model = self._model_cache.get(slots, f_pre, f_eff, st.speed)
        load = self.serving.tick(t0, dt, inst, serving, model, st.route_weight, self.slo_ttft_s,
                                 self.slo_tbt_s, st.qloss, acc)
        acc.tokens += load.tokens_generated
        if capping.any_capped or slowdown.any_throttled:
            stats.add_tokens_lost(load.decode_tokens, f_eff, st.f_set_mhz, slots.prof.decode_phi,
                                  slots.prof.max_freq_mhz)
        gl = gpu_load(load, st, slots, gpu_prefill_mhz, np.zeros(topo.n_gpus), dt)
        if self.power.any_down:
            gl = replace(gl, phase_power=self._phase_power(), server_off=self.power.off)
        dyn, gpu_w, srv_w, row_w, aisle_w = pw.tick_power(gm, gl, gpu_ceiling, s.datacenter.server,
                                                          topo)
        self.inlet_c = step_inlet_temperature(self.inlet_c, aisle_w, topo.aisle_capacity_w,
                                              self.one.outside.temp_c(t0), dt, self.one.cooling)
        temp = step_gpu_temperature(self.thermal_state, gpu_w, topo.gpu_inlet_c(self.inlet_c), dt,
                                    self.thermal)
        max_temp_c = temp.reshape(self.n_copies, -1).max(axis=1)
        capped_before, throttled_before = capping.capped, slowdown.throttled
        capping.update(dyn, gl, row_w, topo.row_limit_w, slowdown.ceiling_mhz)
        slowdown.update(temp, float(max_temp_c.max()), gpu_w, gpu_ceiling, self.inlet_c,
                        gl.phase_power.idle_w)
        stats.power_events += stats.per_copy((capping.capped & ~capped_before).astype(float))
        hot = temp > self.thermal.slowdown_temp_c
        stats.thermal_events += stats.per_copy((hot & ~throttled_before).astype(float))
        paid_gpus, powered_servers = self._paid()
        stats.add_tick(srv_w, gpu_w, row_w, max_temp_c, dt, carbon_g_per_kwh(s, t0), paid_gpus,
                       powered_servers)
        stats.add_throttling(slowdown, capping, topo.gpu_row, gl.freq_mhz, slots.gpu_has, dt)
        self.gpu_power_w, self.gpu_temp_c = gpu_w, temp
        self.row_power_w, self.aisle_heat_w = row_w, aisle_w

    # ------------------------------------------------------------------ readings
    def per_copy(self, arr: np.ndarray) -> np.ndarray:
        """A stacked per-row, per-aisle, per-server or per-GPU array as (copies, per copy)."""
        return arr.reshape(self.n_copies, -1)

    def row_capped(self) -> np.ndarray:
        """Per copy and row: power capping engaged (what the telemetry's capped flags show)."""
        return self.per_copy(self.capping.capped)

    def throttled_fraction(self) -> np.ndarray:
        """Per copy: the fraction of its GPUs thermally throttled."""
        return self.per_copy(self.slowdown.throttled).mean(axis=1)

