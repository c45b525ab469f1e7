"""The power chain of a tick, compiled: GPU power under clock ceilings, servers, rows, aisles.

The formulas are `power.py`'s (its docstrings say what they model); here they run as numba
loops over the GPUs, with the operations in the order the numpy formulation evaluated them, so
that every figure is the same to the last bit where the transcendental functions agree: ``**``
here is the C library's ``pow``, which numpy also uses on its baseline loops (the test suite's
CPU paths, `tests/golden/canonical_cpu.py`); numpy's AVX-512 loops differ from it in the last
bit for about 5% of arguments. Sums run in numpy's orders: a server's GPUs pairwise
(`compiled.pairwise_sum`, what ``sum(axis=1)`` does), rows and aisles in server order (what
``np.bincount`` does).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_cluster_gym.envs.sim.compiled import JIT_OPTIONS, pairwise_sum
from llm_cluster_gym.envs.sim.compiled import np_maximum as _maximum
from llm_cluster_gym.envs.sim.compiled import np_minimum as _minimum

COEF_FIELDS = ("idle_w", "prefill_max_w", "prefill_k_tokens", "prefill_busy_w", "decode_max_w",
               "decode_k_batch", "decode_busy_w")
"""The rows of `power.GpuPhasePower.stacked`."""
C_IDLE, C_PRE_MAX, C_PRE_K, C_PRE_BUSY, C_DEC_MAX, C_DEC_K, C_DEC_BUSY = range(7)
P_MIN_F, P_MAX_F, P_GAMMA, P_LIMIT = range(4)  # the GPU model's scalars (`power._params`)
S_GPUS, S_IDLE, S_TDP, S_OVERHEAD_IDLE, S_OVERHEAD_MAX, S_STANDBY = range(6)  # the server's


@njit(**JIT_OPTIONS)
def _phase_dynamic_w(x: float, idle: float, max_w: float, k: float, busy: float) -> float:
    """`profiles.phase_power_w` at the maximum clock, less idle: ``(idle + dyn * 1.0) - idle``."""
    util = x / (x + k)
    dyn = (busy if x > 0.0 else 0.0) + (max_w - idle - busy) * util
    return (idle + dyn) - idle  # (f_max / f_max) ** gamma is exactly 1.0


@njit(**JIT_OPTIONS)
def dynamic_at_max_clock(prefill_frac, decode_frac, prefill_tokens, decode_batch, power_factor,
                         vm_power_w, coef):
    """Per GPU, the prefill, decode and VM dynamic power at the maximum clock (W).

    `coef` is `power.GpuPhasePower.stacked` (rows `C_*`).
    """
    n = coef.shape[1]
    pre, dec, vm = np.empty(n), np.empty(n), np.empty(n)
    for i in range(n):
        idle = coef[C_IDLE, i]
        p = _phase_dynamic_w(prefill_tokens[i], idle, coef[C_PRE_MAX, i], coef[C_PRE_K, i],
                             coef[C_PRE_BUSY, i])
        pre[i] = prefill_frac[i] * p * power_factor[i]
        d = _phase_dynamic_w(decode_batch[i], idle, coef[C_DEC_MAX, i], coef[C_DEC_K, i],
                             coef[C_DEC_BUSY, i])
        dec[i] = decode_frac[i] * d * power_factor[i]
        vm[i] = _maximum(vm_power_w[i] - idle, 0.0)
    return pre, dec, vm


@njit(**JIT_OPTIONS)
def _scaled(weight, base, gamma, memo):
    """``weight * base ** gamma``, without calling ``pow`` where its value is already known.

    `memo` holds the last (base, base ** gamma): neighbouring GPUs (one instance, one pool) run
    the same clocks. A zero weight gives itself (``0 * x`` is that zero for the finite, positive
    powers of a clock ratio). The same bits as computing it, ``pow`` being a function.
    """
    if weight == 0.0:
        return weight
    if base != memo[0]:
        memo[0] = base
        memo[1] = base ** gamma
    return weight * memo[1]


@njit(**JIT_OPTIONS)
def _gpu_powers(pre, dec, vm, idle, prefill_freq, freq, ceiling, params, memo, out):
    """Each GPU's power under its clock ceiling into `out` (`power_under_ceiling_w`)."""
    f_max, gamma, limit_w = params[P_MAX_F], params[P_GAMMA], params[P_LIMIT]
    inv = 1.0 / f_max
    for i in range(len(idle)):
        c = _minimum(ceiling[i], f_max)
        p = (idle[i] + _scaled(pre[i], _minimum(prefill_freq[i], c) * inv, gamma, memo[0])
             + _scaled(dec[i], _minimum(freq[i], c) * inv, gamma, memo[1])
             + _scaled(vm[i], c * inv, gamma, memo[2]))
        out[i] = _minimum(p, limit_w)


@njit(**JIT_OPTIONS)
def gpu_power_under_ceiling(pre, dec, vm, idle, prefill_freq, freq, ceiling, params):
    """Each GPU's mean power over the tick under its clock ceiling (W)."""
    out = np.empty(len(idle))
    _gpu_powers(pre, dec, vm, idle, prefill_freq, freq, ceiling, params,
                np.full((3, 2), np.nan), out)
    return out


@njit(**JIT_OPTIONS)
def _server_powers(gpu_w, server, server_off, any_off, out):
    """Each server's power from its GPUs' into `out` (`power.server_power_w`), W."""
    gpus = int(server[S_GPUS])
    idle_gpu_w, tdp_w = server[S_IDLE], server[S_TDP]
    overhead_idle_w, standby_w = server[S_OVERHEAD_IDLE], server[S_STANDBY]
    span = gpus * (tdp_w - idle_gpu_w)
    floor = gpus * idle_gpu_w
    rise = server[S_OVERHEAD_MAX] - overhead_idle_w
    for s in range(len(out)):
        g_w = pairwise_sum(gpu_w[s * gpus:(s + 1) * gpus])
        load = _minimum(_maximum((g_w - floor) / span, 0.0), 1.0)
        out[s] = g_w + overhead_idle_w + rise * load
        if any_off and server_off[s]:
            out[s] = standby_w


@njit(**JIT_OPTIONS)
def server_power(gpu_w, server, server_off, any_off):
    """Each server's power from its GPUs' (`power.server_power_w`), W."""
    out = np.empty(len(gpu_w) // int(server[S_GPUS]))
    _server_powers(gpu_w, server, server_off, any_off, out)
    return out


@njit(**JIT_OPTIONS)
def index_sum(index, values, n):
    """``np.bincount(index, weights=values, minlength=n)``: in index order."""
    out = np.zeros(n)
    for i in range(len(index)):
        out[index[i]] += values[i]
    return out


@njit(**JIT_OPTIONS)
def tick_power(prefill_frac, decode_frac, prefill_tokens, decode_batch, power_factor, vm_power_w,
               coef, prefill_freq, freq, ceiling, params, server, server_off, any_off,
               server_row, n_rows, server_aisle, n_aisles):
    """A tick's dynamic terms and GPU, server, row and aisle power (`power.tick_power`)."""
    pre, dec, vm = dynamic_at_max_clock(prefill_frac, decode_frac, prefill_tokens, decode_batch,
                                        power_factor, vm_power_w, coef)
    gpu_w = gpu_power_under_ceiling(pre, dec, vm, coef[C_IDLE], prefill_freq, freq, ceiling,
                                    params)
    srv_w = server_power(gpu_w, server, server_off, any_off)
    return (pre, dec, vm, gpu_w, srv_w, index_sum(server_row, srv_w, n_rows),
            index_sum(server_aisle, srv_w, n_aisles))


@njit(**JIT_OPTIONS)
def row_cap_ceiling(pre, dec, vm, idle, prefill_freq, freq, other_ceiling, gpu_row, rows,
                    row_limit_w, n_rows, iterations, params, server, server_off, any_off):
    """Highest common clock ceiling per listed row at which it fits (`power.row_cap_ceiling_mhz`).

    Bisection on the clock, all rows at once; the other rows get the maximum clock.
    """
    f_max = params[P_MAX_F]
    lo = np.full(n_rows, params[P_MIN_F])
    hi = np.full(n_rows, f_max)
    target = np.full(n_rows, np.inf)
    for r in rows:
        target[r] = row_limit_w[r]
    n_gpus = len(idle)
    gpus = int(server[S_GPUS])
    server_row = gpu_row[::gpus]
    ceiling = np.empty(n_gpus)
    gpu_w = np.empty(n_gpus)
    srv_w = np.empty(n_gpus // gpus)
    mid = np.empty(n_rows)
    memo = np.full((3, 2), np.nan)
    for _ in range(iterations):
        for r in range(n_rows):
            mid[r] = 0.5 * (lo[r] + hi[r])
        for i in range(n_gpus):
            ceiling[i] = _minimum(other_ceiling[i], mid[gpu_row[i]])
        _gpu_powers(pre, dec, vm, idle, prefill_freq, freq, ceiling, params, memo, gpu_w)
        _server_powers(gpu_w, server, server_off, any_off, srv_w)
        row_w = index_sum(server_row, srv_w, n_rows)
        for r in range(n_rows):
            if row_w[r] <= target[r]:
                lo[r] = mid[r]
            else:
                hi[r] = mid[r]
    out = np.full(n_rows, f_max)
    for r in rows:
        out[r] = lo[r]
    return out


@njit(**JIT_OPTIONS)
def gpu_phase_mix(gpu_slot, has_f, dt_s, prefill_busy_s, decode_busy_s, prefill_tokens,
                  decode_batch, decode_ctx_tokens, ctx_per_ktok):
    """Each GPU's prefill and decode shares of the tick and their loads (`clocks.gpu_load`).

    Gathered from the slot each GPU belongs to (`gpu_slot`; `has_f` 0.0 where none): the decode
    load is `Profile.decode_power_load`, ``batch * (1 + beta * ctx / 1000)``.
    """
    n = len(gpu_slot)
    pre_frac, dec_frac = np.empty(n), np.empty(n)
    pre_tok, dec_load = np.empty(n), np.empty(n)
    for g in range(n):
        o, h = gpu_slot[g], has_f[g]
        pre_frac[g] = prefill_busy_s[o] * h / dt_s
        dec_frac[g] = decode_busy_s[o] * h / dt_s
        pre_tok[g] = prefill_tokens[o] * h
        dec_load[g] = decode_batch[o] * (1.0 + ctx_per_ktok[o] * decode_ctx_tokens[o] / 1000.0) * h
    return pre_frac, dec_frac, pre_tok, dec_load


@njit(**JIT_OPTIONS)
def capping_state(demand_w, row_w, demand_avg_w, row_avg_w, alpha, row_limit_w, capped,
                  target_fraction):
    """The row-capping controller's averages and decision (`throttle.RowPowerCapping.update`).

    Moves the two exponential averages (in place) and returns, per row, whether it is over
    (its averaged demand above its limit, or a capped row's above the target), the target
    (``limit * target_fraction``) and the number of rows newly over.
    """
    n = len(row_w)
    over = np.empty(n, dtype=np.bool_)
    target = np.empty(n)
    events = 0
    for r in range(n):
        demand_avg_w[r] += alpha * (demand_w[r] - demand_avg_w[r])
        row_avg_w[r] += alpha * (row_w[r] - row_avg_w[r])
        target[r] = row_limit_w[r] * target_fraction
        d = demand_avg_w[r]
        over[r] = (d > row_limit_w[r]) or (capped[r] and d > target[r])
        if over[r] and not capped[r]:
            events += 1
    return over, target, events
