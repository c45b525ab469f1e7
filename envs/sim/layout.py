"""The simulated datacenter's layout, what a controller may set, and the instances' slot tables.

* :func:`gpu_power_model`, :func:`aisle_cooling` and :func:`cluster_layout` build the static
  description from the scenario (once, when the cluster is built);
* :func:`validate_pools` and :class:`RowSettingChecker` check a controller's pool
  configuration and per-row settings;
* :class:`SlotTables` (:func:`slot_tables`) holds the per-slot and per-GPU arrays of one
  instance layout, rebuilt only when the layout changes (reset, reconfiguration).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from llm_cluster_gym.envs.backend import ClusterLayout, PoolConfig
from llm_cluster_gym.envs.perf.hardware import load_gpus
from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.profiles import Profile, ProfileArrays, freq_at_power_limit_mhz
from llm_cluster_gym.envs.sim.scenario import Scenario
from llm_cluster_gym.envs.sim.thermal import AisleCoolingParams
from llm_cluster_gym.envs.sim.throttle import read_only
from llm_cluster_gym.envs.sim.topology import Topology
from llm_cluster_gym.envs.sim.workload import LengthPools


def idle_no_context_w(ref: Profile) -> float:
    """Idle power of a GPU of ``ref``'s type that holds no process (``envs/data/gpus.json``).

    A GPU type the specification file does not list keeps the profile's idle power (no lower
    figure is known for it).
    """
    gpus = load_gpus()
    if ref.gpu in gpus:
        return min(gpus[ref.gpu].idle_power_w, ref.idle_power_w)
    return ref.idle_power_w


def gpu_power_model(ref: Profile) -> pw.GpuPowerModel:
    """What every GPU of the cluster shares (clocks, limit, idle powers), from a profile."""
    return pw.GpuPowerModel(
        idle_power_w=ref.idle_power_w,
        idle_no_context_w=idle_no_context_w(ref),
        power_freq_exponent=ref.power_freq_exponent,
        gpu_power_limit_w=ref.gpu_power_limit_w,
        min_freq_mhz=ref.min_freq_mhz,
        max_freq_mhz=ref.max_freq_mhz,
    )


def aisle_cooling(s: Scenario) -> AisleCoolingParams:
    """The aisle cooling parameters of a scenario."""
    c = s.datacenter.cooling
    return AisleCoolingParams(
        supply_temp_c=c.supply_temp_c,
        outside_temp_coeff=c.outside_temp_coeff,
        overload_c_per_frac=c.overload_c_per_frac,
        tau_inlet_s=c.tau_inlet_s,
        source=s.source,
    )


def cluster_layout(s: Scenario, topo: Topology, pools: LengthPools, gpu_model: pw.GpuPowerModel,
                   slo_ttft_s: np.ndarray, slo_tbt_s: np.ndarray,
                   slowdown_temp_c: float) -> ClusterLayout:
    """The static description a controller is built from (`ClusterBackend.layout`)."""
    sv = s.serving
    return ClusterLayout(
        n_rows=topo.n_rows,
        n_aisles=topo.n_aisles,
        n_servers=topo.n_servers,
        gpus_per_server=topo.gpus_per_server,
        server_row=topo.server_row,
        server_aisle=topo.server_aisle,
        server_is_saas=topo.server_is_saas,
        pool_names=pools.names,
        tp_choices=sv.tp_choices,
        freq_choices_mhz=sv.freq_choices_mhz,
        batch_choices=sv.batch_choices,
        model=sv.model,
        gpu=sv.gpu,
        control_interval_s=s.control_interval_s,
        slo_ttft_s=slo_ttft_s,
        slo_tbt_s=slo_tbt_s,
        row_limit_w=topo.row_limit_w,
        aisle_capacity_w=topo.aisle_capacity_w,
        initial_pools=tuple(
            PoolConfig(p.n_instances, p.tp, p.freq_mhz, p.max_batch) for p in sv.pools),
        nominal_rps=max(s.workload.rps_per_gpu * len(topo.saas_servers)
                        * topo.gpus_per_server, 1e-9),
        max_freq_mhz=gpu_model.max_freq_mhz,
        gpu_power_limit_w=gpu_model.gpu_power_limit_w,
        slowdown_temp_c=slowdown_temp_c,
        vm_placements_per_interval=s.vms.placements_per_interval,
        route_per_server=sv.route_per_server,
    )


def validate_pools(pools: tuple[PoolConfig, ...], n_pools: int, tp_choices: tuple[int, ...]) -> None:
    """Raise ValueError unless `pools` is a valid configuration for this scenario."""
    if len(pools) != n_pools:
        raise ValueError(f"expected {n_pools} pool configs, got {len(pools)}")
    for i, p in enumerate(pools):
        if p.tp not in tp_choices:
            raise ValueError(f"pool {i}: tp={p.tp} not in tp_choices {tp_choices}")
        if not (p.freq_mhz > 0 and p.max_batch > 0 and p.n_instances >= 0):
            raise ValueError(f"pool {i}: invalid configuration {p}")


def row_array(value: np.ndarray, n: int, name: str) -> np.ndarray:
    """`value` as a finite float array of shape (n,), or ValueError naming `name`."""
    arr = np.asarray(value, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr}")
    return arr


class RowSettingChecker:
    """Checks and converts an action's per-row settings (clipped clocks, bool flags, weights).

    Decoded actions repeat the same read-only arrays (`envs.actions` memoizes them), so the
    result for the last read-only input of each setting is reused; writeable input is always
    checked again (it may have changed in place).
    """

    def __init__(self, n_rows: int, min_freq_mhz: float, max_freq_mhz: float) -> None:
        self.n_rows, self.min_freq_mhz, self.max_freq_mhz = n_rows, min_freq_mhz, max_freq_mhz
        self._last: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def check(self, name: str, value: np.ndarray) -> np.ndarray:
        """The setting ``name`` ("row_freq_cap_mhz", "row_quantized", "row_route_weight").

        Raises:
            ValueError: Wrong shape, not finite, or a negative routing weight.
        """
        last = self._last.get(name)
        if last is not None and last[0] is value and not value.flags.writeable:
            return last[1]
        arr = row_array(value, self.n_rows, name)
        if name == "row_freq_cap_mhz":
            out = arr.clip(self.min_freq_mhz, self.max_freq_mhz)
        elif name == "row_quantized":
            out = arr.astype(bool)
        else:
            if np.count_nonzero(arr < 0):
                raise ValueError(f"{name} must be >= 0, got {arr}")
            out = arr
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            self._last[name] = (value, read_only(out))
        return out


@dataclass(frozen=True, eq=False)
class SlotTables:
    """Per-slot and per-GPU arrays of one instance layout (constants of the tick's hot path).

    Compared by identity: a new layout is a new object (the slot-settings cache keys on it).

    Attributes:
        prof: Profile coefficients of each slot's instance (its TP degree).
        owner: Instance slot that owns each slot's GPU group (-1: no instance).
        row: Row of each slot.
        gpu_has: GPU belongs to an instance.
        gpu_has_f: ``gpu_has`` as 0.0/1.0.
        gpu_o: Each GPU's owning slot (0 where none: mask with ``gpu_has``).
        freq_mhz: Each slot's pool clock (the maximum where no instance runs).
        kv_tokens: Each slot's KV-cache capacity in tokens.
        any_quantized: Some instance runs a quantized model.
        prefill_limit_mhz: Clock at which a prefill of the episode's mean prompt fits the GPU
            power limit (it depends only on the slot's profile).
        gpu_phase_power: Each GPU's phase-power coefficients (its instance's profile; idle
            without a CUDA context where no instance holds it).
    """

    prof: ProfileArrays
    owner: np.ndarray
    row: np.ndarray
    gpu_has: np.ndarray
    gpu_has_f: np.ndarray
    gpu_o: np.ndarray
    freq_mhz: np.ndarray
    kv_tokens: np.ndarray
    any_quantized: bool
    prefill_limit_mhz: np.ndarray
    gpu_phase_power: pw.GpuPhasePower


def gpu_phase_power(sp: ProfileArrays, gpu_has: np.ndarray, gpu_o: np.ndarray,
                    idle_no_context_w: float) -> pw.GpuPhasePower:
    """Per-GPU phase-power coefficients: the owning instance's profile, or bare idle."""
    return pw.GpuPhasePower(
        idle_w=read_only(np.where(gpu_has, sp.idle_power_w[gpu_o], idle_no_context_w)),
        prefill_max_w=read_only(sp.prefill_max_power_w[gpu_o]),
        prefill_k_tokens=read_only(sp.prefill_k_tokens[gpu_o]),
        decode_max_w=read_only(sp.decode_max_power_w[gpu_o]),
        decode_k_batch=read_only(sp.decode_k_batch[gpu_o]),
        prefill_busy_w=read_only(sp.prefill_busy_power_w[gpu_o]),
        decode_busy_w=read_only(sp.decode_busy_power_w[gpu_o]),
    )


def slot_tables(inst: InstanceTable, topo: Topology, tp_index: dict[int, int],
                tp_arrays: ProfileArrays, max_freq_mhz: float,
                mean_input_tokens: float, idle_no_context_w: float) -> SlotTables:
    """The per-slot coefficient arrays and the GPU -> instance map of ``inst``'s layout."""
    # tp_index.get(int(t), 0) per slot, vectorized (a layout change of 1,024 slots no longer
    # pays a Python loop over them).
    tp = np.asarray(inst.tp).astype(np.int64)
    tp_idx = np.zeros(len(tp), dtype=np.int64)
    for t, i in tp_index.items():
        tp_idx[tp == int(t)] = i
    sp = tp_arrays.take(tp_idx)
    owner = inst.slot_owner()
    gpu_owner = np.full(topo.n_gpus, -1, dtype=np.int64)
    gpu_owner[inst.slot_gpu] = owner
    gpu_has = gpu_owner >= 0
    gpu_o = np.where(gpu_has, gpu_owner, 0)
    return SlotTables(
        prof=sp,
        owner=owner,
        row=topo.gpu_row[inst.slot_gpu],
        gpu_has=gpu_has,
        gpu_has_f=gpu_has.astype(float),
        gpu_o=gpu_o,
        freq_mhz=np.where(inst.active, inst.freq_mhz, max_freq_mhz),
        kv_tokens=sp.kv_capacity_tokens.astype(float),
        any_quantized=bool(inst.quantized.any()),
        prefill_limit_mhz=freq_at_power_limit_mhz(
            mean_input_tokens, sp.gpu_power_limit_w, sp.idle_power_w,
            sp.prefill_max_power_w, sp.prefill_k_tokens, sp.power_freq_exponent,
            sp.min_freq_mhz, sp.max_freq_mhz, sp.prefill_busy_power_w),
        gpu_phase_power=gpu_phase_power(sp, gpu_has, gpu_o, idle_no_context_w),
    )


class SlotTablesCache:
    """`slot_tables` of the current layout, reusing the last one's tables when only clocks changed.

    A controller that retunes its pools' clocks every interval (the DynamoLLM manager) changes
    nothing else of the layout: the same instances (TP, quantization) on the same GPUs, so every
    per-slot and per-GPU table but the clock (`SlotTables.freq_mhz`) is the same, and is reused
    instead of gathered again. The result is always a new `SlotTables` (caches keyed on it by
    identity see a new layout); its values are those `slot_tables` gives.
    """

    def __init__(self) -> None:
        self._key: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None
        self._tables: SlotTables | None = None

    def get(self, inst: InstanceTable, topo: Topology, tp_index: dict[int, int],
            tp_arrays: ProfileArrays, max_freq_mhz: float, mean_input_tokens: float,
            idle_no_context_w: float) -> SlotTables:
        """The tables of ``inst``'s layout (the other arguments are fixed per cluster)."""
        key = (inst.tp.copy(), inst.active.copy(), inst.quantized.copy(), mean_input_tokens)
        last, prev = self._key, self._tables
        if (prev is not None and last[3] == mean_input_tokens and np.array_equal(last[0], key[0])
                and np.array_equal(last[1], key[1]) and np.array_equal(last[2], key[2])):
            tables = replace(prev, freq_mhz=np.where(inst.active, inst.freq_mhz, max_freq_mhz))
        else:
            tables = slot_tables(inst, topo, tp_index, tp_arrays, max_freq_mhz, mean_input_tokens,
                                 idle_no_context_w)
        self._key, self._tables = key, tables
        return tables
