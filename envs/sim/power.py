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
from functools import cached_property, lru_cache

import numpy as np

from llm_cluster_gym.envs.sim import power_kernels as kernels
from llm_cluster_gym.envs.sim.compiled import per_element
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

    @cached_property
    def stacked(self) -> np.ndarray:
        """The seven coefficients as one (7, GPUs) float64 array, in `power_kernels.COEF_FIELDS` order.

        What the compiled power chain takes (one argument, not seven); built once per object
        (the layout's, or its powered-down variant's: both are cached by the cluster).
        """
        idle = np.asarray(self.idle_w, dtype=np.float64)
        return np.stack([per_element(getattr(self, name), idle.shape)
                         for name in kernels.COEF_FIELDS])


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
        any clock ceiling without re-evaluating the profile (`power_under_ceiling_w`). Each
        phase's term is its `profiles.phase_power_w` at the maximum clock less idle, times the
        phase's share of the tick and the power factor (compiled: `power_kernels`).
        """
        coef = load.phase_power.stacked
        return kernels.dynamic_at_max_clock(*_load_args(load, coef), coef)

    def power_under_ceiling_w(self, dyn: tuple[np.ndarray, np.ndarray, np.ndarray],
                              load: GpuLoad, ceiling_mhz: np.ndarray) -> np.ndarray:
        """Mean power of each GPU over the tick under a clock ceiling (row cap, thermal).

        ``idle + pre (min(f_prefill, c) / f_max)**g + dec (min(f, c) / f_max)**g
        + vm (c / f_max)**g`` with ``c = min(ceiling, f_max)``, at most the power limit.
        """
        pre, dec, vm = dyn
        idle = load.phase_power.stacked[kernels.C_IDLE]
        return kernels.gpu_power_under_ceiling(
            pre, dec, vm, idle, _per_gpu(load.prefill_freq_mhz, idle), _per_gpu(load.freq_mhz, idle),
            _per_gpu(ceiling_mhz, idle), _params(self))

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
    gpu_w = _f64(gpu_power_w)
    if gpu_w.ndim != 1 or gpu_w.size % spec.gpus:
        raise ValueError(f"server_power_w: {gpu_w.shape} GPU powers do not fill servers of "
                         f"{spec.gpus} GPUs")
    off, any_off = _server_off(server_off, gpu_w.size // spec.gpus)
    return kernels.server_power(gpu_w, _server_params(spec, idle_gpu_w), off, any_off)


def tick_power(model: GpuPowerModel, load: GpuLoad, ceiling_mhz: np.ndarray, spec: ServerSpec,
               topo: Topology) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray,
                                        np.ndarray, np.ndarray, np.ndarray]:
    """One tick's power at its clock ceilings, from the GPUs up to the rows and aisles.

    Returns:
        (the dynamic terms at the maximum clock (`GpuPowerModel.dynamic_at_max_clock_w`, which
        capping reuses), GPU power, server power, row power, aisle heat), W.
    """
    coef = load.phase_power.stacked
    idle = coef[kernels.C_IDLE]
    off, any_off = _server_off(load.server_off, topo.n_servers)
    pre, dec, vm, gpu_w, srv_w, row_w, aisle_w = kernels.tick_power(
        *_load_args(load, coef), coef, _per_gpu(load.prefill_freq_mhz, idle),
        _per_gpu(load.freq_mhz, idle), _per_gpu(ceiling_mhz, idle), _params(model),
        _server_params(spec, model.idle_power_w), off, any_off, topo.server_row, topo.n_rows,
        topo.server_aisle, topo.n_aisles)
    return (pre, dec, vm), gpu_w, srv_w, row_w, aisle_w


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
    if dyn is None:  # the profile is evaluated once, not per halving
        dyn = model.dynamic_at_max_clock_w(load)
    idle = load.phase_power.stacked[kernels.C_IDLE]
    off, any_off = _server_off(load.server_off, idle.size // server_spec.gpus)
    return kernels.row_cap_ceiling(
        *dyn, idle, _per_gpu(load.prefill_freq_mhz, idle), _per_gpu(load.freq_mhz, idle),
        _per_gpu(other_ceiling_mhz, idle), np.asarray(gpu_row, dtype=np.int64),
        np.asarray(rows, dtype=np.int64), _f64(row_limit_w), n_rows, iterations, _params(model),
        _server_params(server_spec, model.idle_power_w), off, any_off)


def _load_args(load: GpuLoad, coef: np.ndarray) -> tuple[np.ndarray, ...]:
    """The load's six per-GPU arrays as the compiled loops take them (float64, one per GPU)."""
    shape = coef.shape[1:]
    return (per_element(load.prefill_frac, shape), per_element(load.decode_frac, shape),
            per_element(load.prefill_tokens, shape), per_element(load.decode_batch, shape),
            per_element(load.power_factor, shape), per_element(load.vm_power_w, shape))


@lru_cache(maxsize=64)
def _params(model: GpuPowerModel) -> np.ndarray:
    """The GPU model's scalars in `power_kernels.P_*` order (built once per model)."""
    out = np.array([model.min_freq_mhz, model.max_freq_mhz, model.power_freq_exponent,
                    model.gpu_power_limit_w], dtype=np.float64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=64)
def _server_params(spec: ServerSpec, idle_gpu_w: float) -> np.ndarray:
    """The server model's scalars in `power_kernels.S_*` order (built once per server type)."""
    out = np.array([spec.gpus, idle_gpu_w, spec.gpu_tdp_w, spec.overhead_idle_w,
                    spec.overhead_max_w, spec.standby_w], dtype=np.float64)
    out.flags.writeable = False
    return out


def _f64(a: np.ndarray) -> np.ndarray:
    """A float64 array as the compiled loops take it (no copy when it is one already)."""
    return np.asarray(a, dtype=np.float64)


def _per_gpu(value: np.ndarray | float, like: np.ndarray) -> np.ndarray:
    """A per-GPU quantity given per GPU or as one scalar, as a float64 array like `like`."""
    return per_element(value, like.shape)


_NO_SERVER_OFF = np.zeros(0, dtype=bool)


def _server_off(server_off: np.ndarray | None, n_servers: int) -> tuple[np.ndarray, bool]:
    """Which servers are off, as the compiled loops take it (an empty array: none is)."""
    if server_off is None:
        return _NO_SERVER_OFF, False
    off = np.asarray(server_off, dtype=bool)
    if off.shape != (n_servers,):
        raise ValueError(f"server_off has shape {off.shape}, want ({n_servers},)")
    return off, True
