"""The thermal steps of a tick, compiled: aisle inlet temperatures and GPU temperatures.

`thermal.step_inlet_temperature` and `thermal.step_gpu_temperature` (their docstrings say what
they model) on a few aisles and a few dozen GPUs are a dozen numpy calls each per tick; these
loops give the same figures bit for bit (the operations in the same order; the decay factors
``exp(-dt / tau)`` come in from the caller).
"""

from __future__ import annotations

from numba import njit

from llm_cluster_gym.envs.sim.compiled import JIT_OPTIONS, np_maximum


@njit(**JIT_OPTIONS)
def step_inlet(inlet_c, load_w, capacity_w, outside_c, supply_c, outside_coeff, overload_coeff,
               decay, out):
    """Each aisle's new inlet temperature into `out`; False if a capacity is not > 0."""
    for j in range(len(inlet_c)):
        cap = capacity_w[j]
        if not cap > 0:
            return False
        overload = np_maximum(0.0, load_w[j] - cap) / cap
        warm = np_maximum(0.0, outside_c[j] - supply_c)
        ss = supply_c + outside_coeff * warm + overload_coeff * overload
        out[j] = ss + (inlet_c[j] - ss) * decay
    return True


@njit(**JIT_OPTIONS)
def step_gpu(x_die, x_sink, power_w, inlet_c, r_die, r_sink, a_die, a_sink, out):
    """Advance the two nodes' rises in place; each GPU's die temperature into `out`."""
    for i in range(len(power_w)):
        ss_die = r_die * power_w[i]
        ss_sink = r_sink * power_w[i]
        x_die[i] = ss_die + (x_die[i] - ss_die) * a_die
        x_sink[i] = ss_sink + (x_sink[i] - ss_sink) * a_sink
        out[i] = inlet_c[i] + x_die[i] + x_sink[i]
