"""Compiled power, thermal, latency and cohort loops against the numpy formulations they replaced.

`power_kernels` (GPU power under clock ceilings, servers, rows, aisles, the row-capping
bisection), `thermal_kernels` (aisle inlet and GPU temperature steps), `latency_kernels` (an
interval's percentiles and histograms) and the aggregate model's cohort loops
(`serving_aggregate_kernels.cohort_misses`, `cohort_totals`) promise the numpy formulation's
figures bit for bit on the tests' CPU paths (numpy's baseline loops, whose ``pow``, ``exp``,
``expm1`` and ``log10`` are the C library's, as the compiled loops' are:
`golden/canonical_cpu.py`). The references below are that numpy formulation, written out here
(the library no longer has it); hypothesis draws the inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_cluster_gym.envs.latency import BINS_PER_DECADE, LATENCY_EDGES_S, N_LATENCY_BINS
from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim import thermal
from llm_cluster_gym.envs.sim.latency_kernels import latency_summary
from llm_cluster_gym.envs.sim.scenario import ServerSpec
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator, weighted_percentiles

GPUS = 4
F_MAX, F_MIN, GAMMA, LIMIT_W = 1980.0, 800.0, 1.7, 700.0
SPEC = ServerSpec(gpus=GPUS, gpu_tdp_w=700.0, overhead_idle_w=800.0, overhead_max_w=2200.0,
                  standby_w=40.0, max_power_w=10200.0)
MODEL = pw.GpuPowerModel(idle_power_w=122.0, idle_no_context_w=72.0, power_freq_exponent=GAMMA,
                         gpu_power_limit_w=LIMIT_W, min_freq_mhz=F_MIN, max_freq_mhz=F_MAX)


def ref_dynamic(load: pw.GpuLoad) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = load.phase_power
    idle = c.idle_w

    def phase(x, max_w, k, busy):
        dyn = np.where(x > 0.0, busy, 0.0) + (max_w - idle - busy) * (x / (x + k))
        return idle + dyn * (np.asarray(F_MAX) / F_MAX) ** GAMMA

    p_pre = phase(load.prefill_tokens, c.prefill_max_w, c.prefill_k_tokens, c.prefill_busy_w)
    p_dec = phase(load.decode_batch, c.decode_max_w, c.decode_k_batch, c.decode_busy_w)
    return (load.prefill_frac * (p_pre - idle) * load.power_factor,
            load.decode_frac * (p_dec - idle) * load.power_factor,
            np.maximum(load.vm_power_w - idle, 0.0))


def ref_gpu_power(dyn, load: pw.GpuLoad, ceiling) -> np.ndarray:
    pre, dec, vm = dyn
    inv = 1.0 / F_MAX
    c = np.minimum(ceiling, F_MAX)
    p = (load.phase_power.idle_w + pre * (np.minimum(load.prefill_freq_mhz, c) * inv) ** GAMMA
         + dec * (np.minimum(load.freq_mhz, c) * inv) ** GAMMA + vm * (c * inv) ** GAMMA)
    return np.minimum(p, LIMIT_W)


def ref_server_power(gpu_w, server_off) -> np.ndarray:
    g = gpu_w.reshape(-1, GPUS).sum(axis=1)
    idle = MODEL.idle_power_w
    load = np.clip((g - GPUS * idle) / (GPUS * (SPEC.gpu_tdp_w - idle)), 0.0, 1.0)
    srv = g + SPEC.overhead_idle_w + (SPEC.overhead_max_w - SPEC.overhead_idle_w) * load
    return srv if server_off is None else np.where(server_off, SPEC.standby_w, srv)


def ref_row_cap(dyn, load, gpu_row, other, rows, limit, n_rows) -> np.ndarray:
    lo, hi = np.full(n_rows, F_MIN), np.full(n_rows, F_MAX)
    target = np.full(n_rows, np.inf)
    target[rows] = limit[rows]
    server_row = gpu_row[::GPUS]
    for _ in range(8):
        mid = 0.5 * (lo + hi)
        p = ref_gpu_power(dyn, load, np.minimum(other, mid[gpu_row]))
        row_w = np.bincount(server_row, weights=ref_server_power(p, load.server_off),
                            minlength=n_rows)
        fits = row_w <= target
        lo, hi = np.where(fits, mid, lo), np.where(fits, hi, mid)
    out = np.full(n_rows, F_MAX)
    out[rows] = lo[rows]
    return out


@st.composite
def gpu_loads(draw):
    servers = draw(st.integers(1, 6))
    n = servers * GPUS
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    busy = rng.random(n) < 0.7  # some GPUs idle: zero load, the x > 0 branch
    phase = pw.GpuPhasePower(
        idle_w=rng.choice([0.0, 72.0, 122.0], n), prefill_max_w=rng.uniform(400, 900, n),
        prefill_k_tokens=rng.uniform(50, 3000, n), decode_max_w=rng.uniform(300, 800, n),
        decode_k_batch=rng.uniform(1, 200, n), prefill_busy_w=rng.uniform(0, 150, n),
        decode_busy_w=rng.uniform(0, 150, n))
    off = rng.random(servers) < 0.3 if draw(st.booleans()) else None
    load = pw.GpuLoad(
        prefill_frac=rng.random(n) * busy, decode_frac=rng.random(n) * busy,
        prefill_tokens=np.round(rng.uniform(0, 8192, n)) * busy,
        decode_batch=np.round(rng.uniform(0, 512, n)) * busy,
        freq_mhz=rng.choice([800.0, 1200.0, 1605.0, 1980.0], n),
        prefill_freq_mhz=rng.uniform(F_MIN, F_MAX, n),
        power_factor=draw(st.sampled_from([1.0, 0.8])) * np.ones(n),
        vm_power_w=rng.uniform(0, 600, n) * (rng.random(n) < 0.2), phase_power=phase,
        server_off=off)
    ceiling = np.where(rng.random(n) < 0.5, rng.uniform(F_MIN, 2 * F_MAX, n), F_MAX)
    return load, ceiling, rng


@given(gpu_loads())
@settings(max_examples=60, deadline=None)
def test_power_chain_matches_its_numpy_formulation_bit_for_bit(case):
    load, ceiling, rng = case
    n = load.freq_mhz.size
    dyn = MODEL.dynamic_at_max_clock_w(load)
    ref = ref_dynamic(load)
    for got, want in zip(dyn, ref, strict=True):
        np.testing.assert_array_equal(got, want)
    gpu_w = MODEL.power_under_ceiling_w(dyn, load, ceiling)
    np.testing.assert_array_equal(gpu_w, ref_gpu_power(ref, load, ceiling))
    srv_w = pw.server_power_w(gpu_w, SPEC, MODEL.idle_power_w, load.server_off)
    np.testing.assert_array_equal(srv_w, ref_server_power(gpu_w, load.server_off))
    # Rows of whole servers, one aisle per two rows; the capping bisection on some rows.
    servers = n // GPUS
    n_rows = max(servers // 2, 1)
    server_row = np.minimum(np.arange(servers) // 2, n_rows - 1)
    gpu_row = np.repeat(server_row, GPUS)
    limit = rng.uniform(0.3, 1.0, n_rows) * np.bincount(server_row, weights=srv_w,
                                                        minlength=n_rows)
    rows = np.flatnonzero(rng.random(n_rows) < 0.7)
    got = pw.row_cap_ceiling_mhz(MODEL, load, gpu_row, ceiling, rows, limit, SPEC, n_rows,
                                 dyn=dyn)
    np.testing.assert_array_equal(got, ref_row_cap(ref, load, gpu_row, ceiling, rows, limit,
                                                   n_rows))


def test_power_chain_takes_scalar_inputs_and_rejects_partial_servers():
    n = 2 * GPUS
    phase = pw.GpuPhasePower(*(np.full(n, v) for v in (122.0, 700.0, 500.0, 600.0, 40.0, 50.0,
                                                       60.0)))
    load = pw.GpuLoad(0.5, 0.5, np.full(n, 1000.0), np.full(n, 64.0), 1800.0, 1980.0, 1.0, 0.0,
                      phase)
    full = pw.GpuLoad(*(np.full(n, v) for v in (0.5, 0.5, 1000.0, 64.0, 1800.0, 1980.0, 1.0,
                                                0.0)), phase)
    np.testing.assert_array_equal(MODEL.gpu_power_w(load, 1700.0),
                                  MODEL.gpu_power_w(full, np.full(n, 1700.0)))
    with pytest.raises(ValueError, match="do not fill servers"):
        pw.server_power_w(np.ones(n + 1), SPEC, 122.0)


@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
@settings(max_examples=40, deadline=None)
def test_thermal_steps_match_their_numpy_formulation_bit_for_bit(seed, n):
    rng = np.random.default_rng(seed)
    params = thermal.ThermalParams.load()
    cooling = thermal.AisleCoolingParams.load()
    state = thermal.GpuThermalState(rng.uniform(0, 30, n), rng.uniform(0, 20, n))
    x_die, x_sink = state.x_die_c.copy(), state.x_sink_c.copy()
    power, inlet, dt = rng.uniform(60, 700, n), rng.uniform(18, 35, n), float(rng.uniform(0, 60))
    got = thermal.step_gpu_temperature(state, power, inlet, dt, params)
    a_die, a_sink = math.exp(-dt / params.tau_die_s), math.exp(-dt / params.tau_sink_s)
    ss_die, ss_sink = params.r_die_c_per_w * power, params.r_sink_c_per_w * power
    want_die = ss_die + (x_die - ss_die) * a_die
    want_sink = ss_sink + (x_sink - ss_sink) * a_sink
    np.testing.assert_array_equal(state.x_die_c, want_die)
    np.testing.assert_array_equal(state.x_sink_c, want_sink)
    np.testing.assert_array_equal(got, inlet + want_die + want_sink)
    aisles = max(n // 4, 1)
    inlet_c, load_w = rng.uniform(18, 30, aisles), rng.uniform(0, 2e5, aisles)
    cap_w, outside = rng.uniform(5e4, 2e5, aisles), float(rng.uniform(-10, 40))
    got = thermal.step_inlet_temperature(inlet_c, load_w, cap_w, outside, dt, cooling)
    ss = (cooling.supply_temp_c
          + cooling.outside_temp_coeff * np.maximum(0.0, outside - cooling.supply_temp_c)
          + cooling.overload_c_per_frac * (np.maximum(0.0, load_w - cap_w) / cap_w))
    np.testing.assert_array_equal(got, ss + (inlet_c - ss) * math.exp(-dt / cooling.tau_inlet_s))


def test_inlet_step_still_names_a_capacity_that_is_not_positive():
    cooling = thermal.AisleCoolingParams.load()
    with pytest.raises(thermal.ThermalError, match="capacity_w must be > 0"):
        thermal.step_inlet_temperature(np.full(2, 22.0), np.full(2, 1e5), np.array([1e5, 0.0]),
                                       20.0, 60.0, cooling)


def ref_histogram(v, w) -> np.ndarray:
    ok = np.isfinite(v)
    v, w = v[ok], w[ok]
    first = float(LATENCY_EDGES_S[0])
    pos = (np.log10(np.maximum(v, first)) - math.log10(first)) * BINS_PER_DECADE
    idx = np.minimum(pos.astype(np.int64), N_LATENCY_BINS - 1)
    return np.bincount(idx, weights=w, minlength=N_LATENCY_BINS)


@given(st.integers(0, 2**32 - 1), st.integers(1, 300), st.booleans())
@settings(max_examples=60, deadline=None)
def test_latency_summary_matches_percentiles_and_histograms_bit_for_bit(seed, n, ties):
    rng = np.random.default_rng(seed)
    ttft = np.exp(rng.uniform(-10, 8, n))
    tbt = np.round(rng.uniform(0, 0.3, n), 2) if ties else rng.uniform(0, 0.3, n)
    tbt[rng.random(n) < 0.05] = np.inf  # left out of the histogram only
    weight = rng.uniform(0, 5, n) * (rng.random(n) < 0.9)  # zero weights too
    fractions = np.array([0.5, 0.99]) - 1e-12
    pct, h_ttft, h_tbt = latency_summary(ttft, tbt, weight, fractions)
    assert tuple(pct.tolist()) == (weighted_percentiles(ttft, weight, fractions)
                                   + weighted_percentiles(tbt, weight, fractions))
    np.testing.assert_array_equal(h_ttft, ref_histogram(ttft, weight))
    np.testing.assert_array_equal(h_tbt, ref_histogram(tbt, weight))


def test_interval_latency_stats_are_the_same_either_side_of_the_compiled_size():
    """Small intervals go through the compiled loop, large ones through numpy: the same figures."""
    from llm_cluster_gym.envs.sim import latency_kernels

    rng = np.random.default_rng(7)
    n = latency_kernels.COMPILED_MAX_SAMPLES
    acc = ServiceAccumulator(1)
    acc.ttft_s.append(rng.exponential(0.5, n))
    acc.tbt_s.append(rng.exponential(0.03, n))
    acc.weight.append(rng.uniform(0.5, 2.0, n))
    small = acc.latency_stats()
    acc.ttft_s.append(np.array([np.nan]))  # one more sample: past the compiled size
    acc.tbt_s.append(np.array([0.01]))
    acc.weight.append(np.array([0.0]))
    large = acc.latency_stats()
    assert small[:4] == large[:4]
    np.testing.assert_array_equal(small[4], large[4])
    np.testing.assert_array_equal(small[5], large[5])


def ref_ttft_ok(slo_t, base, wait, span, overloaded) -> np.ndarray:
    """The aggregate model's TTFT share meeting the SLO, as its numpy formulation computed it."""
    over = slo_t - base
    ttft_ok = np.where(over > 0, -np.expm1(-np.minimum(np.maximum(
        over / np.maximum(wait, 1e-6), 0.0), 50.0)), 0.0)
    if span is not None:
        ok_seq = np.minimum(np.maximum(over / np.maximum(span, 1e-9), 0.0), 1.0)
        ttft_ok = np.where(overloaded, ok_seq, ttft_ok)
    return ttft_ok


@given(st.integers(0, 2**32 - 1), st.integers(1, 200), st.booleans())
@settings(max_examples=60, deadline=None)
def test_cohort_outcomes_and_totals_match_their_numpy_formulation_bit_for_bit(seed, k, overload):
    """The aggregate model's finishing cohorts: SLO shares missed, mean TTFT, weighted totals."""
    from llm_cluster_gym.envs.sim.serving_aggregate_kernels import cohort_misses, cohort_totals

    rng = np.random.default_rng(seed)
    base, wait, span = rng.uniform(0, 3, k), rng.uniform(0, 2, k), rng.uniform(0, 5, k)
    wait[rng.random(k) < 0.1] = 0.0  # the 1e-6 guard
    overloaded = (rng.random(k) < 0.3) & overload
    any_over = bool(overloaded.any())
    slo_ttft, slo_tbt = rng.uniform(0.2, 2.5, k), rng.uniform(0.02, 0.1, k)
    tbt = rng.uniform(0.01, 0.12, k)
    miss, tbt_bad, bad, mean = cohort_misses(base, wait, span, overloaded, any_over, slo_ttft,
                                             tbt, slo_tbt)
    want_miss = 1.0 - ref_ttft_ok(slo_ttft, base, wait, span if any_over else None, overloaded)
    want_tbt = (tbt > slo_tbt).astype(float)
    np.testing.assert_array_equal(miss, want_miss)
    np.testing.assert_array_equal(tbt_bad, want_tbt)
    np.testing.assert_array_equal(bad, np.maximum(want_miss, want_tbt))
    np.testing.assert_array_equal(
        mean, base + np.where(overloaded, span / 2, wait) if any_over else base + wait)
    finished = rng.uniform(0, 4, k) * (rng.random(k) < 0.8)
    qloss = rng.uniform(0, 0.1, k)
    totals, ttft_s, tbt_s, w = cohort_totals(finished, miss, tbt_bad, bad, qloss, mean, tbt)
    weighted = np.stack([finished, finished * miss, finished * tbt_bad, finished * bad,
                         finished * qloss])
    assert totals.tolist() == weighted.sum(axis=1).tolist()
    keep = finished > 0
    np.testing.assert_array_equal(ttft_s, mean[keep])
    np.testing.assert_array_equal(tbt_s, tbt[keep])
    np.testing.assert_array_equal(w, finished[keep])


@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.integers(1, 5))
@settings(max_examples=50, deadline=None)
def test_tick_bookkeeping_loops_match_their_numpy_formulation_bit_for_bit(seed, n, n_pools):
    """GPU phase mix, row-capping state, arrivals folded into the buffer, per-pool counts."""
    from llm_cluster_gym.envs.sim import power_kernels as pk
    from llm_cluster_gym.envs.sim import serving_aggregate_kernels as ak

    rng = np.random.default_rng(seed)
    slots = max(n // 2, 1)
    gpu_slot, has_f = rng.integers(0, slots, n), (rng.random(n) < 0.8).astype(float)
    dt = float(rng.uniform(0.1, 60))
    busy_p, busy_d = rng.uniform(0, dt, slots), rng.uniform(0, dt, slots)
    tok, batch, ctx = rng.uniform(0, 9000, slots), rng.uniform(0, 512, slots), rng.uniform(0, 9e3, slots)
    beta = rng.uniform(0, 1, slots)
    got = pk.gpu_phase_mix(gpu_slot, has_f, dt, busy_p, busy_d, tok, batch, ctx, beta)
    want = (busy_p[gpu_slot] * has_f / dt, busy_d[gpu_slot] * has_f / dt, tok[gpu_slot] * has_f,
            (batch * (1.0 + beta * ctx / 1000.0))[gpu_slot] * has_f)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    rows = max(n // 8, 1)
    demand, row_w, limit = (rng.uniform(1e4, 1e5, rows) for _ in range(3))
    d_avg, r_avg = rng.uniform(1e4, 1e5, rows), rng.uniform(1e4, 1e5, rows)
    capped, alpha = rng.random(rows) < 0.5, float(rng.uniform(0, 1))
    want_d, want_r = d_avg + alpha * (demand - d_avg), r_avg + alpha * (row_w - r_avg)
    over, target, events = pk.capping_state(demand, row_w, d_avg, r_avg, alpha, limit, capped, 0.95)
    np.testing.assert_array_equal(d_avg, want_d)
    np.testing.assert_array_equal(r_avg, want_r)
    np.testing.assert_array_equal(target, limit * 0.95)
    want_over = (want_d > limit) | (capped & (want_d > limit * 0.95))
    np.testing.assert_array_equal(over, want_over)
    assert events == np.count_nonzero(want_over & ~capped)
    pool = rng.integers(0, n_pools, n)
    inp, out = rng.integers(1, 8000, n), rng.integers(1, 2000, n)
    buf = rng.uniform(0, 5, n_pools) * (rng.random(n_pools) < 0.5)
    buf_in, buf_out, age = (rng.uniform(0, 3000, n_pools) for _ in range(3))
    new = buf + np.bincount(pool, minlength=n_pools)
    safe = np.maximum(new, 1e-12)
    want = (new, (buf_in * buf + np.bincount(pool, weights=inp, minlength=n_pools)) / safe,
            (buf_out * buf + np.bincount(pool, weights=out, minlength=n_pools)) / safe,
            age * buf / safe)
    got = ak.fold_arrivals(pool, inp, out, buf, buf_in, buf_out, age, n_pools)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    slot_pool = rng.integers(-1, n_pools, n)
    q, run = rng.uniform(0, 9, n), rng.uniform(0, 9, n)
    has = slot_pool >= 0
    sp = np.where(has, slot_pool, 0)
    waiting, running = ak.pool_counts(slot_pool, q, run, buf, n_pools)
    np.testing.assert_array_equal(waiting, np.bincount(sp, weights=q * has, minlength=n_pools) + buf)
    np.testing.assert_array_equal(running, np.bincount(sp, weights=run * has, minlength=n_pools))
    assert ak.in_flight(q, run, buf) == q.sum() + run.sum() + buf.sum()


def ref_weighted_percentiles(values, weight, fractions) -> tuple[float, ...]:
    """`serving.weighted_percentiles`' general path: a stable sort and a left search."""
    order = values.argsort(kind="stable")
    cum = weight[order].cumsum()
    idx = cum.searchsorted(fractions * cum[-1])
    return tuple(values[order[np.minimum(idx, len(values) - 1)]].tolist())


@given(st.integers(0, 2**32 - 1), st.integers(1, 3000), st.booleans(), st.booleans())
@settings(max_examples=80, deadline=None)
def test_unit_weight_percentiles_by_partition_equal_the_sorted_search(seed, n, ties, nans):
    """The request level's one-weight-per-request percentiles skip the sort: the same values."""
    rng = np.random.default_rng(seed)
    values = np.round(rng.exponential(0.5, n), 2) if ties else rng.exponential(0.5, n)
    if nans:
        values[rng.random(n) < 0.05] = np.nan
    fractions = np.concatenate([np.array([0.5, 0.99]) - 1e-12, rng.uniform(0, 1, 3), [0.0, 1.0]])
    ones = np.ones(n)
    got = weighted_percentiles(values, ones, fractions)
    assert np.array_equal(got, ref_weighted_percentiles(values, ones, fractions), equal_nan=True)
    assert weighted_percentiles(values, ones, (50.0, 99.0)) == pytest.approx(
        ref_weighted_percentiles(values, ones, np.array([0.5, 0.99]) - 1e-12), nan_ok=True)


@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 4),
       st.sampled_from(["weights", "caps only", "none serving", "empty buffer"]))
@settings(max_examples=60, deadline=None)
def test_aggregate_router_tick_matches_its_numpy_formulation_bit_for_bit(seed, n, n_pools, case):
    from llm_cluster_gym.envs.sim import serving_aggregate_kernels as ak

    rng = np.random.default_rng(seed)
    serving = rng.random(n) < (0.0 if case == "none serving" else 0.7)
    route_weight = rng.uniform(0, 1, n) * (case != "caps only")
    max_batch = rng.integers(1, 256, n)
    pool = rng.integers(0, n_pools, n)
    buf = rng.uniform(0, 50, n_pools) * (case != "empty buffer")
    state = [buf, rng.uniform(1, 4000, n_pools), rng.uniform(1, 900, n_pools),
             rng.uniform(0, 20, n), rng.uniform(1, 4000, n), rng.uniform(1, 900, n),
             rng.uniform(0, 5, n), rng.uniform(0, 30, n)]
    want = [a.copy() for a in state]
    weight = np.where(serving, route_weight * max_batch, 0.0)
    if np.count_nonzero(weight) == 0:
        weight = np.where(serving, max_batch, 0).astype(float)
    want_routed = np.zeros(n)
    want_moved = np.count_nonzero(weight) > 0 and want[0].sum() > 0
    if want_moved:
        ak.route_buffers(*want[:3], weight, pool, *want[3:], want_routed, 60.0)
    else:
        want[7] *= 0.8
    routed, moved = ak.route_tick(*state[:3], serving, route_weight, max_batch, pool, *state[3:],
                                  60.0)
    assert moved == want_moved
    np.testing.assert_array_equal(routed, want_routed)
    for got, exp in zip(state, want, strict=True):
        np.testing.assert_array_equal(got, exp)
