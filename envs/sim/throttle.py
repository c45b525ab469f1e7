"""The hardware's own clock controllers: row power capping and GPU thermal slowdown.

Both act from the next tick on, as the real ones do: :class:`RowPowerCapping` caps the clocks
of every GPU in a row whose power demand (a moving average over :data:`CAP_WINDOW_S`) exceeds
the row's limit, :class:`ThermalSlowdown` slows down each GPU hotter than the slowdown point.
Each keeps its clock ceilings, its engaged flags and an ``any_*`` summary, so that a tick with
nothing engaged (the common case) skips the per-GPU work. Each ``update`` returns the number of
new events (an uncapped row capped, a GPU newly throttled).
"""

from __future__ import annotations

import math

import numpy as np

from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim import power_kernels as pk
from llm_cluster_gym.envs.sim.scenario import ServerSpec
from llm_cluster_gym.envs.sim.thermal import ThermalParams
from llm_cluster_gym.envs.sim.topology import Topology

CAP_WINDOW_S = 2.0
"""Time constant of the row-power average that power capping acts on."""

CAP_TARGET_FRACTION = 0.95
"""Row power capping aims this fraction of the limit and releases once demand falls below it."""

THERMAL_RELEASE_C = 3.0
"""Hysteresis: a slowed-down GPU recovers its clock once this far below the slowdown point."""


def read_only(arr: np.ndarray) -> np.ndarray:
    """`arr`, marked read-only (for arrays shared between ticks and telemetry)."""
    arr.flags.writeable = False
    return arr


class RowPowerCapping:
    """Row power capping: a common clock ceiling for the GPUs of each over-limit row.

    Capping engages when demand exceeds the limit and holds (aiming a margin below the limit)
    until demand falls below that margin: hysteresis, as real capping controllers. Demand is
    read as a moving average over CAP_WINDOW_S (PDU meters and breaker trip curves work on
    seconds, not on single prefill bursts).

    Attributes:
        ceiling_mhz: Per-row clock ceiling for the next tick (the maximum clock: none).
        capped: Per-row flag, capping engaged.
        any_capped: Some row is capped.
        row_avg_w: Moving average of each row's power (NaN before the first tick).
        demand_avg_w: Moving average of each row's uncapped power demand.
    """

    def __init__(self, gpu_model: pw.GpuPowerModel, server: ServerSpec, topo: Topology,
                 tick_s: float) -> None:
        self.gpu_model, self.server, self.topo = gpu_model, server, topo
        # Weight of one tick in the row-power moving average (the tick length is fixed).
        self.alpha = 1.0 - np.exp(-tick_s / CAP_WINDOW_S)
        # "No clock ceiling" per row, shared read-only (an update replaces, never writes into,
        # the ceiling array).
        self.no_ceiling_mhz = read_only(np.full(topo.n_rows, gpu_model.max_freq_mhz))
        self.reset()

    def reset(self) -> None:
        """Nothing capped, no power history (the start of an episode)."""
        n_rows = self.topo.n_rows
        self.ceiling_mhz = np.full(n_rows, self.gpu_model.max_freq_mhz)
        self.capped = np.zeros(n_rows, dtype=bool)
        self.any_capped = False
        self.row_avg_w = np.full(n_rows, np.nan)
        self.demand_avg_w = np.full(n_rows, np.nan)

    def update(self, dyn: tuple[np.ndarray, np.ndarray, np.ndarray], gl: pw.GpuLoad,
               row_w: np.ndarray, row_limit_w: np.ndarray, thermal_ceiling_mhz: np.ndarray) -> int:
        """Set the row ceilings for the next tick from this tick's power; returns new cap events.

        Args:
            dyn: This tick's dynamic power terms at the maximum clock (`GpuPowerModel`).
            gl: This tick's GPU load.
            row_w: Power each row drew this tick (under this tick's ceilings).
            row_limit_w: Each row's limit now (faults included).
            thermal_ceiling_mhz: The thermal ceilings of this tick (capping comes on top).
        """
        topo, gm, server = self.topo, self.gpu_model, self.server
        if self.any_capped:
            uncapped = gm.power_under_ceiling_w(dyn, gl, thermal_ceiling_mhz)
            demand_w = topo.row_sum(pw.server_power_w(uncapped, server, gm.idle_power_w,
                                                      gl.server_off))
        else:  # no row ceiling in force this tick: the demand is what the rows drew
            demand_w = row_w
        alpha = self.alpha
        if math.isnan(self.row_avg_w[0]):  # first tick of the episode
            self.demand_avg_w, self.row_avg_w = demand_w.copy(), row_w.copy()
        # Compiled (`power_kernels.capping_state`): the averages move in place; a row is over
        # when its averaged demand exceeds its limit, or, capped, the target below it.
        over, target_w, events = pk.capping_state(
            np.asarray(demand_w, dtype=np.float64), np.asarray(row_w, dtype=np.float64),
            self.demand_avg_w, self.row_avg_w, alpha, np.asarray(row_limit_w, dtype=np.float64),
            self.capped, CAP_TARGET_FRACTION)
        self.any_capped = bool(np.count_nonzero(over))
        if self.any_capped:
            self.ceiling_mhz = pw.row_cap_ceiling_mhz(
                gm, gl, topo.gpu_row, thermal_ceiling_mhz, np.flatnonzero(over),
                target_w, server, topo.n_rows, dyn=dyn)
        else:
            self.ceiling_mhz = self.no_ceiling_mhz
        self.capped = over
        return events


class ThermalSlowdown:
    """GPU thermal slowdown: engages above the slowdown point, releases well below it.

    Attributes:
        ceiling_mhz: Per-GPU clock ceiling for the next tick (the maximum clock: none).
        throttled: Per-GPU flag, slowdown engaged.
        any_throttled: Some GPU is throttled.
        no_ceiling_mhz: The shared read-only "no ceiling" array (per GPU).
    """

    def __init__(self, gpu_model: pw.GpuPowerModel, thermal: ThermalParams,
                 gpu_aisle: np.ndarray, gpu_inlet_offset_c: np.ndarray | None = None) -> None:
        self.gpu_model, self.thermal, self.gpu_aisle = gpu_model, thermal, gpu_aisle
        # Each GPU's air above its aisle's inlet (rack and in-server position); None: none.
        self.gpu_inlet_offset_c = gpu_inlet_offset_c
        self.no_ceiling_mhz = read_only(np.full(gpu_aisle.size, gpu_model.max_freq_mhz))
        self.reset()

    def reset(self) -> None:
        """No GPU throttled (the start of an episode)."""
        n_gpus = self.gpu_aisle.size
        self.ceiling_mhz = np.full(n_gpus, self.gpu_model.max_freq_mhz)
        self.throttled = np.zeros(n_gpus, dtype=bool)
        self.any_throttled = False

    def update(self, temp: np.ndarray, max_temp_c: float, gpu_w: np.ndarray,
               gpu_ceiling: np.ndarray, inlet_c: np.ndarray, idle_w: np.ndarray) -> int:
        """Set the GPU ceilings for the next tick; returns the GPUs newly throttled.

        Args:
            temp: Each GPU's temperature at the end of this tick.
            max_temp_c: ``temp.max()``.
            gpu_w: Each GPU's power this tick.
            gpu_ceiling: Each GPU's clock ceiling this tick (capping and slowdown).
            inlet_c: Each aisle's inlet temperature at the end of this tick.
            idle_w: Each GPU's idle power (with or without a CUDA context), the part of its
                power the clock does not move.
        """
        slowdown_c = self.thermal.slowdown_temp_c
        if not (self.any_throttled or max_temp_c > slowdown_c):
            return 0  # nothing throttled and nothing hot: every flag stays off
        hot = temp > slowdown_c
        release = temp < slowdown_c - THERMAL_RELEASE_C
        events = int(np.count_nonzero(hot & ~self.throttled))
        self.throttled = (self.throttled | hot) & ~release
        self.any_throttled = bool(np.count_nonzero(self.throttled))
        if self.any_throttled:
            self._update_ceiling(gpu_w, gpu_ceiling, inlet_c, idle_w)
        else:
            self.ceiling_mhz = self.no_ceiling_mhz
        return events

    def _update_ceiling(self, gpu_w: np.ndarray, ceiling: np.ndarray, inlet_c: np.ndarray,
                        idle_w: np.ndarray) -> None:
        """Clock at which each throttled GPU's steady state sits just below the slowdown point."""
        th, gm = self.thermal, self.gpu_model
        r_total = th.r_die_c_per_w + th.r_sink_c_per_w
        inlet = inlet_c[self.gpu_aisle]
        if self.gpu_inlet_offset_c is not None:
            inlet = inlet + self.gpu_inlet_offset_c
        target_w = (th.slowdown_temp_c - THERMAL_RELEASE_C - inlet) / r_total
        dyn = np.maximum(gpu_w - idle_w, 1e-6)
        f_now = np.minimum(ceiling, gm.max_freq_mhz)
        ratio = np.clip((target_w - idle_w) / dyn, 0.0, None)
        f = f_now * ratio ** (1.0 / gm.power_freq_exponent)
        f = np.clip(f, gm.min_freq_mhz, gm.max_freq_mhz)
        self.ceiling_mhz = np.where(self.throttled, np.minimum(f, f_now), gm.max_freq_mhz)
