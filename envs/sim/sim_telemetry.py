"""The `Telemetry` record of the simulated datacenter: its hardware state after the last tick.

Per-GPU, per-row and per-aisle arrays that the tick replaces (never writes into) are shared
read-only with the record instead of copied (a write through the record raises).
"""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.envs.backend import Telemetry
from llm_cluster_gym.envs.sim.faults import FaultSchedule
from llm_cluster_gym.envs.sim.thermal import OutsideAir
from llm_cluster_gym.envs.sim.throttle import RowPowerCapping, ThermalSlowdown, read_only
from llm_cluster_gym.envs.sim.topology import Topology
from llm_cluster_gym.envs.sim.vms import VmPool
from llm_cluster_gym.envs.sim.weather import WeatherAir


def assemble_telemetry(*, time_s: float, topo: Topology, faults: FaultSchedule, vms: VmPool,
                       slowdown: ThermalSlowdown, capping: RowPowerCapping,
                       gpu_power_w: np.ndarray, gpu_temp_c: np.ndarray, row_power_w: np.ndarray,
                       inlet_c: np.ndarray, aisle_heat_w: np.ndarray,
                       outside: OutsideAir | WeatherAir, server_power_state: np.ndarray) -> Telemetry:
    """The telemetry at ``time_s``: the last tick's readings and the limits in force now.

    Row limits and aisle capacities are those in force now (for the next tick), consistent
    with ``active_faults``; the last tick's own limits are in the tick record. Server power
    states are those of the last tick (a copy: the states move in place).
    """
    legal = vms.legal_servers() if vms.pending else np.zeros(topo.n_servers, dtype=bool)
    row_f, aisle_f = faults.factors(time_s, topo.n_rows, topo.n_aisles)
    for arr in (gpu_power_w, gpu_temp_c, slowdown.throttled, row_power_w, inlet_c, aisle_heat_w):
        arr.setflags(write=False)
    return Telemetry(
        time_s=time_s,
        gpu_power_w=gpu_power_w,
        gpu_temp_c=gpu_temp_c,
        gpu_freq_mhz=np.minimum(slowdown.ceiling_mhz, capping.ceiling_mhz[topo.gpu_row]),
        gpu_thermal_throttled=slowdown.throttled,
        gpu_power_capped=capping.capped[topo.gpu_row],
        row_power_w=row_power_w,
        row_limit_w=topo.row_limit_w * row_f,
        aisle_inlet_c=inlet_c,
        aisle_heat_w=aisle_heat_w,
        aisle_capacity_w=topo.aisle_capacity_w * aisle_f,
        outside_temp_c=outside.temp_c(time_s),
        active_faults=faults.active_names(time_s),
        pending_vm_expected_gpu_w=vms.pending_expected_gpu_w,
        legal_vm_servers=legal,
        server_power_state=read_only(server_power_state.copy()),
        pending_vms_expected_gpu_w=vms.pending_expected_queue_gpu_w(vms.spec.placements_per_interval),
    )
