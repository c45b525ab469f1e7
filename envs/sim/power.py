"""GPU and server power from the serving state, and row-level power capping.

A GPU's power over a tick is the time-weighted mix of its prefill, decode and idle power from
the profile of the instance it belongs to (its model and TP degree: a GPU of a TP 8 instance
draws differently from one of a TP 2 instance at the same batch) at its effective clock. A GPU
that holds no instance idles without a CUDA context, lower than one holding a loaded model
(71-73 W against about 122 W on an H100, measured for this project: ``envs/data/gpus.json``).
The GPUs of a server that is off draw nothing and the server its standby power; those of a
booting server idle without a context (``envs/sim/server_power.py``).

Power capping is what a row's capping controller does: when the row draws more than its limit,
the clocks of every GPU in the row are forced down to the highest common ceiling at which the
row fits, from the next tick on. Each capping episode (uncapped -> capped) is one
power-throttling event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.sim.profiles import phase_power_w
from llm_cluster_gym.envs.sim.scenario import ServerSpec
from llm_cluster_gym.envs.sim.topology import Topology


@dataclass(frozen=True)
class GpuPhasePower:
    """Per-GPU phase-power coefficients, from the profile of the instance each GPU belongs to.

    Attributes:
        idle_w: Idle power (with a CUDA context where an instance holds the GPU, without one
            where none does).
        prefill_max_w, prefill_k_tokens, prefill_busy_w: Prefill power curve
            (``phase_power_w``).
        decode_max_w, decode_k_batch, decode_busy_w: Decode power curve.
    """

    idle_w: np.ndarray
    prefill_max_w: np.ndarray
    prefill_k_tokens: np.ndarray
    decode_max_w: np.ndarray
    decode_k_batch: np.ndarray
    prefill_busy_w: np.ndarray
    decode_busy_w: np.ndarray


@dataclass(frozen=True)
class GpuLoad:
    """Per-GPU phase mix over one tick, gathered from the instance each GPU belongs to.

    Attributes:
        prefill_frac, decode_frac: Fraction of the tick in each phase (the rest is idle).
        prefill_tokens, decode_batch: Load level of each phase.
        freq_mhz: Clock the GPU wanted (before row capping) for decode.
        prefill_freq_mhz: Clock during prefill (already within the GPU's own power limit).
        power_factor: Multiplier on dynamic power (quantized variants draw less).
        vm_power_w: For IaaS GPUs, the VM's draw at full clock (0 for SaaS GPUs).
        phase_power: Each GPU's phase-power coefficients (its instance's profile).
        server_off: Per server, powered off (None: every server is powered).
    """

    prefill_frac: np.ndarray
    decode_frac: np.ndarray
    prefill_tokens: np.ndarray
    decode_batch: np.ndarray
    freq_mhz: np.ndarray
    prefill_freq_mhz: np.ndarray
    power_factor: np.ndarray
    vm_power_w: np.ndarray
    phase_power: GpuPhasePower
    server_off: np.ndarray | None = None


@dataclass(frozen=True)
class GpuPowerModel:
    """What every GPU of the cluster shares: the GPU type's clocks, limit and idle powers.

    The phase-power curves differ per instance (model, TP degree) and travel with the load
    (`GpuLoad.phase_power`). ``idle_power_w`` is the idle power with a CUDA context (a GPU
    holding a loaded model), ``idle_no_context_w`` without one.
    """

    idle_power_w: float
    idle_no_context_w: float
    power_freq_exponent: float
    gpu_power_limit_w: float
    min_freq_mhz: float
    max_freq_mhz: float

    def dynamic_at_max_clock_w(self, load: GpuLoad) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per GPU, the tick-averaged dynamic power of prefill, decode and VM load at max clock.

        Dynamic power scales as (f / f_max)**gamma, so these three terms give the GPU's power at
        any clock ceiling without re-evaluating the profile (`power_under_ceiling_w`).
        """
        f_max, c = self.max_freq_mhz, load.phase_power
        idle = c.idle_w
        p_pre = phase_power_w(load.prefill_tokens, f_max, idle, c.prefill_max_w,
                              c.prefill_k_tokens, self.power_freq_exponent, f_max, c.prefill_busy_w)
        p_dec = phase_power_w(load.decode_batch, f_max, idle, c.decode_max_w,
                              c.decode_k_batch, self.power_freq_exponent, f_max, c.decode_busy_w)
        pre = load.prefill_frac * (p_pre - idle) * load.power_factor
        dec = load.decode_frac * (p_dec - idle) * load.power_factor
        vm = np.maximum(load.vm_power_w - idle, 0.0)
        return pre, dec, vm

    def power_under_ceiling_w(self, dyn: tuple[np.ndarray, np.ndarray, np.ndarray],
                              load: GpuLoad, ceiling_mhz: np.ndarray) -> np.ndarray:
        """Mean power of each GPU over the tick under a clock ceiling (row cap, thermal)."""
        pre, dec, vm = dyn
        inv, g = 1.0 / self.max_freq_mhz, self.power_freq_exponent
        c = np.minimum(ceiling_mhz, self.max_freq_mhz)
        p = (load.phase_power.idle_w
             + pre * (np.minimum(load.prefill_freq_mhz, c) * inv) ** g
             + dec * (np.minimum(load.freq_mhz, c) * inv) ** g
             + vm * (c * inv) ** g)
        return np.minimum(p, self.gpu_power_limit_w)

    def gpu_power_w(self, load: GpuLoad, ceiling_mhz: np.ndarray) -> np.ndarray:
        """Mean power of each GPU over the tick under a clock ceiling (row cap, thermal)."""
        return self.power_under_ceiling_w(self.dynamic_at_max_clock_w(load), load, ceiling_mhz)


def server_power_w(gpu_power_w: np.ndarray, spec: ServerSpec, idle_gpu_w: float,
                   server_off: np.ndarray | None = None) -> np.ndarray:
    """Server power: its GPUs plus CPUs, fans, NICs and PSU losses that follow GPU load.

    The non-GPU part rises linearly from `overhead_idle_w` (GPUs idle) to `overhead_max_w`
    (GPUs at TDP; measured, below the nameplate's remainder `max_power_w - gpus * gpu_tdp_w`). A
    server that is off (``server_off``) draws its `standby_w` alone.
    """
    per_server = gpu_power_w.reshape(-1, spec.gpus)
    gpu_w = per_server.sum(axis=1)
    load = np.clip((gpu_w - spec.gpus * idle_gpu_w) / (spec.gpus * (spec.gpu_tdp_w - idle_gpu_w)),
                   0.0, 1.0)
    srv_w = gpu_w + spec.overhead_idle_w + (spec.overhead_max_w - spec.overhead_idle_w) * load
    if server_off is not None:
        srv_w = np.where(server_off, spec.standby_w, srv_w)
    return srv_w


def tick_power(model: GpuPowerModel, load: GpuLoad, ceiling_mhz: np.ndarray, spec: ServerSpec,
               topo: Topology) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray,
                                        np.ndarray, np.ndarray, np.ndarray]:
    """One tick's power at its clock ceilings, from the GPUs up to the rows and aisles.

    Returns:
        (the dynamic terms at the maximum clock (`GpuPowerModel.dynamic_at_max_clock_w`, which
        capping reuses), GPU power, server power, row power, aisle heat), W.
    """
    dyn = model.dynamic_at_max_clock_w(load)
    gpu_w = model.power_under_ceiling_w(dyn, load, ceiling_mhz)
    srv_w = server_power_w(gpu_w, spec, model.idle_power_w, load.server_off)
    return dyn, gpu_w, srv_w, topo.row_sum(srv_w), topo.aisle_sum(srv_w)


def row_cap_ceiling_mhz(
    model: GpuPowerModel,
    load: GpuLoad,
    gpu_row: np.ndarray,
    other_ceiling_mhz: np.ndarray,
    rows: np.ndarray,
    row_limit_w: np.ndarray,
    server_spec: ServerSpec,
    n_rows: int,
    iterations: int = 8,
    dyn: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Highest common clock ceiling per row at which each listed row fits its limit.

    Bisection on the clock (row power is monotone in it; 8 halvings of 800-1980 MHz leave
    < 5 MHz), vectorized over rows. Rows not
    listed get the maximum clock. A row that does not fit even at the minimum clock gets the
    minimum clock (the capping controller can do no more). ``dyn`` is
    ``model.dynamic_at_max_clock_w(load)`` if the caller has it already.
    """
    lo = np.full(n_rows, model.min_freq_mhz)
    hi = np.full(n_rows, model.max_freq_mhz)
    target = np.full(n_rows, np.inf)
    target[rows] = row_limit_w[rows]
    server_row = gpu_row[:: server_spec.gpus]
    if dyn is None:  # the profile is evaluated once, not per halving
        dyn = model.dynamic_at_max_clock_w(load)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        p = model.power_under_ceiling_w(dyn, load, np.minimum(other_ceiling_mhz, mid[gpu_row]))
        srv = server_power_w(p, server_spec, model.idle_power_w, load.server_off)
        row_w = np.bincount(server_row, weights=srv, minlength=n_rows)
        fits = row_w <= target
        lo = np.where(fits, mid, lo)
        hi = np.where(fits, hi, mid)
    out = np.full(n_rows, model.max_freq_mhz)
    out[rows] = lo[rows]
    return out
