"""Compiled per-slot loops of the aggregate serving model's tick (`serving_aggregate`).

`AggregateServing.tick` works on the few dozen to few thousand slots that hold work; written
as whole-array numpy it was about 130 array operations of a microsecond or two each, most of
the simulator's time on the training scenarios. These loops do the same arithmetic slot by
slot, compiled by numba: the router (`route_buffers`), then three passes split where the tick
calls the profile model (the prefill formula before the first, the decode iteration time
between the first and second).

Each pass computes exactly the expressions the numpy version computed, in the same order (and
whole-array sums in numpy's pairwise order), so the figures are the same to the last bit
(numba's `error_model="numpy"`: a division by zero gives inf or nan as numpy does, where the
formulas guard against it anyway).
The physics and its explanation stay in `serving_aggregate`; this module is only arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from llm_cluster_gym.envs.sim.compiled import (
    JIT_OPTIONS,
    flatnonzero,
    np_maximum,
    np_minimum,
    pairwise_sum,
)


@njit(**JIT_OPTIONS)
def admit_and_prefill(idx, q_all, run_all, q_in_all, q_out_all, run_ctx_all, run_out_all,
                      q_age_all, last_iter_all, busy_until_all, routed_all, max_batch_all,
                      cap_all, prefill_t, t0_s, dt_s, max_prefill_tokens, block_tokens,
                      prefill_busy_out, prefill_tokens_out):
    """Admission, the prefill chain and the decode batch of each slot in `idx`.

    Writes each slot's chain end into `busy_until_all` and its prefill load into the two
    `*_out` arrays (full per-slot arrays). `prefill_t` is the prefill formula at the slots'
    mean prompts (first half) and at zero tokens (second half). Returns, per `idx` entry, the
    arrays the rest of the tick reads (see `AggregateServing.tick`).
    """
    k = len(idx)
    t1 = t0_s + dt_s
    adm = np.empty(k)
    o = np.empty(k)
    m = np.empty(k)
    s = np.empty(k)
    base = np.empty(k)
    quantum = np.empty(k)
    wait = np.empty(k)
    span = np.empty(k)
    overloaded = np.empty(k, dtype=np.bool_)
    new_run = np.empty(k)
    ctx = np.empty(k)
    out = np.empty(k)
    window = np.empty(k)
    share_new = np.empty(k)
    batch = np.empty(k)
    age = np.empty(k)
    for j in range(k):
        i = idx[j]
        q = q_all[i]
        run = run_all[i]
        q_in = q_in_all[i]
        cap = cap_all[i]
        # admission: batch cap, and the prompt's KV against what running requests hold
        need = q_in + block_tokens
        kv_free = cap - run * (run_ctx_all[i] + block_tokens)
        room = max(min(max_batch_all[i] - run, kv_free / need), 0.0)
        a = min(q, np.floor(room + 1e-9))
        if run < 0.5 and q > 0 and a < 1 and need <= cap:
            a = min(q, 1.0)
        adm[j] = a
        # chunked prefill chain, mixed into decode steps
        last_iter = last_iter_all[i]
        mixed = run > 0 and last_iter > 0
        p0 = prefill_t[k + j]
        w = prefill_t[j] - p0
        oj = last_iter if mixed else p0
        mj = max(max_prefill_tokens - run, 1.0)
        sj = oj * q_in / mj + w
        backlog = max(busy_until_all[i] - t0_s, 0.0)
        busy_end = t0_s + backlog + a * sj
        busy_until_all[i] = busy_end
        chain_busy = min(busy_end, t1) - t0_s
        work = chain_busy * w / max(sj, 1e-12)
        pure = p0 * max(1.0, q_in / mj) if (not mixed and a > 0) else 0.0
        pre_busy = min(work + pure, dt_s)
        prefill_busy_out[i] = pre_busy
        rho = a * sj / dt_s
        stable = rho < 0.95
        slack = max(1.0 - rho, 0.05)
        chunk = min(mj, q_in / slack) if stable else mj
        prefill_tokens_out[i] = chunk if chain_busy > 0 else 0.0
        # TTFT of the admitted cohort (deterministic part and M/D/1 wait)
        ag = q_age_all[i]
        qu = oj * max(1.0 - q_in / mj, 0.0)
        half = 0.5 * oj if mixed else 0.0
        b = ag + backlog + sj + qu + half
        wj = rho * sj / (2 * slack) if stable else 0.0
        over = rho >= 0.95
        span[j] = max(busy_end - t1, 0.0) + 0.5 * dt_s if over else 0.0
        # decode batch
        nr = run + a
        inv_run = max(nr, 1e-12)
        cj = (run * run_ctx_all[i] + a * (q_in + 1.0)) / inv_run
        outj = (run * run_out_all[i] + a * q_out_all[i]) / inv_run
        win = max(dt_s - pre_busy, 0.0)
        fresh = routed_all[i] / max(q, 1e-12)
        share = max(1.0 - 0.5 * fresh - (b - ag + wj) / dt_s, 0.0)
        o[j] = oj
        m[j] = mj
        s[j] = sj
        base[j] = b
        quantum[j] = qu
        wait[j] = wj
        overloaded[j] = over
        new_run[j] = nr
        ctx[j] = cj
        out[j] = outj
        window[j] = win
        share_new[j] = share
        batch[j] = max(run + a * share, 1.0)
        age[j] = ag
    return (adm, o, m, s, base, quantum, wait, span, overloaded, new_run, ctx, out, window,
            share_new, batch, age)


@njit(**JIT_OPTIONS)
def decode(idx, run_all, adm, new_run, ctx, out, window, share_new, iter_s, dt_s,
           decode_busy_out, decode_batch_out, decode_ctx_out, decode_tokens_out):
    """Decode of each slot in `idx` over the tick's window at its iteration time `iter_s`.

    Writes the decode load into the four `*_out` arrays (full per-slot arrays); returns the
    tokens decoded, the requests finished and the time between tokens, per `idx` entry.
    """
    k = len(idx)
    dec_tokens = np.empty(k)
    finished = np.empty(k)
    tbt = np.empty(k)
    for j in range(k):
        i = idx[j]
        run = run_all[i]
        a = adm[j]
        win = window[j]
        it = iter_s[j]
        n_iter = win / max(it, 1e-9)
        n_new = n_iter * share_new[j]
        per_req = max(out[j] - 1.0, 0.0)
        dt_ = min(run * n_iter + a * n_new, new_run[j] * per_req)
        if per_req > 0:
            fin = min(dt_ / max(per_req, 1e-9), new_run[j])
        else:
            fin = new_run[j]
        n_mean = dt_ / max(n_iter, 1e-12)
        busy = win * min(n_mean, 1.0)
        decode_busy_out[i] = busy
        decode_batch_out[i] = n_mean * win / max(busy, 1e-12) if busy > 0 else 0.0
        decode_ctx_out[i] = ctx[j]
        decode_tokens_out[i] = dt_
        tbt[j] = it * dt_s / max(win, it)
        dec_tokens[j] = dt_
        finished[j] = fin
    return dec_tokens, finished, tbt


@njit(**JIT_OPTIONS)
def settle(idx, q_all, q_in_all, q_out_all, q_age_all, run_all, run_ctx_all, run_out_all,
           last_iter_all, cap_all, adm, new_run, finished, ctx, out, dec_tokens, age, iter_s,
           dt_s, block_tokens):
    """The end-of-tick state of each slot in `idx`: survivors' context, then KV preemption.

    Writes the queue, its mean prompt, output and age, the running count, context and output,
    and the last decode iteration into the per-slot state arrays. Returns the requests
    preempted per `idx` entry and whether any slot outgrew its KV memory (when none did, as in
    the numpy version, the survivors' context is not re-divided).
    """
    k = len(idx)
    left = np.empty(k)
    run_end = np.empty(k)
    ctx_end = np.empty(k)
    excess = np.empty(k)
    any_excess = False
    for j in range(k):
        i = idx[j]
        left[j] = q_all[i] - adm[j]
        re = new_run[j] - finished[j]
        run_end[j] = re
        ce = ctx[j] + dec_tokens[j] / max(new_run[j], 1e-12) if re > 1e-9 else 0.0
        ctx_end[j] = ce
        ex = re * (ce + block_tokens) - cap_all[i]
        excess[j] = ex
        if ex > 0:
            any_excess = True
    pre = np.zeros(k)
    if any_excess:
        for j in range(k):
            i = idx[j]
            q_in = q_in_all[i]
            ctx_new = q_in + 1.0
            re = run_end[j]
            ex = excess[j]
            p = min(max(ex, 0.0) / (ctx_new + block_tokens), re) if (re > 1e-9 and ex > 0) else 0.0
            pre[j] = p
            kept = re - p
            ctx_end[j] = (re * ctx_end[j] - p * ctx_new) / max(kept, 1e-12) if kept > 1e-9 else 0.0
            lf = left[j]
            tot = lf + p
            safe = max(tot, 1e-12)
            if tot > 0:
                q_in_all[i] = (lf * q_in + p * ctx_new) / safe
                q_out_all[i] = (lf * q_out_all[i] + p * out[j]) / safe
            age[j] = age[j] * lf / safe
            left[j] = tot
            run_end[j] = kept
    for j in range(k):
        i = idx[j]
        lf = left[j]
        q_all[i] = lf
        q_age_all[i] = age[j] + dt_s if lf > 1e-9 else 0.0
        re = run_end[j]
        run_all[i] = re
        running = re > 1e-9
        run_ctx_all[i] = ctx_end[j] if running else 0.0
        run_out_all[i] = out[j] if running else 0.0
        last_iter_all[i] = iter_s[j]
    return pre, any_excess


@njit(**JIT_OPTIONS)
def route_buffers(buf, buf_in, buf_out, weight, pool, q, q_in, q_out, q_age_s, rate_rps,
                  routed, dt_s):
    """Split each pool's router buffer over its slots in proportion to `weight`, in place.

    A pool none of whose slots has weight spills over every slot with weight (as the
    request-level router does). The slots' queues take their share with its mean prompt and
    output (new arrivals have age 0); `routed` gets each slot's share and `rate_rps` its
    smoothed arrival rate. Call only with some weight and a non-empty buffer; the caller then
    empties the buffer.
    """
    n = len(weight)
    p_count = len(buf)
    # Weights are >= 0 and zero off the serving slots, so a slot of an unserved pool or
    # without an instance gets weight 0 / (w_pool or 1) = 0.
    w_pool = np.zeros(p_count)
    for i in range(n):
        w_pool[max(pool[i], 0)] += weight[i]
    in_sum = np.empty(n)
    out_sum = np.empty(n)
    for i in range(n):
        p = max(pool[i], 0)
        frac = weight[i] / (w_pool[p] if w_pool[p] > 0 else 1.0)
        share = buf[p] * frac
        routed[i] = share
        in_sum[i] = share * buf_in[p]
        out_sum[i] = share * buf_out[p]
    n_orphan_pools = 0
    for p in range(p_count):
        if not w_pool[p] > 0 and buf[p] > 0:
            n_orphan_pools += 1
    if n_orphan_pools:
        orphan = np.empty(n_orphan_pools)
        orphan_in = np.empty(n_orphan_pools)
        orphan_out = np.empty(n_orphan_pools)
        k = 0
        for p in range(p_count):
            if not w_pool[p] > 0 and buf[p] > 0:
                orphan[k] = buf[p]
                orphan_in[k] = buf[p] * buf_in[p]
                orphan_out[k] = buf[p] * buf_out[p]
                k += 1
        n_orphan = pairwise_sum(orphan)
        in_orphan = pairwise_sum(orphan_in)
        out_orphan = pairwise_sum(orphan_out)
        w_total = pairwise_sum(weight)
        for i in range(n):
            spill = weight[i] / w_total
            routed[i] = routed[i] + n_orphan * spill
            in_sum[i] = in_sum[i] + in_orphan * spill
            out_sum[i] = out_sum[i] + out_orphan * spill
    for i in range(n):
        qi = q[i]
        share = routed[i]
        tot = qi + share
        safe = max(tot, 1e-12)
        q_in[i] = (q_in[i] * qi + in_sum[i]) / safe
        q_out[i] = (q_out[i] * qi + out_sum[i]) / safe
        q_age_s[i] = q_age_s[i] * qi / safe  # new arrivals have age 0
        q[i] = tot
        rate_rps[i] = 0.8 * rate_rps[i] + 0.2 * share / dt_s


@njit(**JIT_OPTIONS)
def cohort_misses(base, wait, span, overloaded, any_overloaded, slo_ttft, tbt, slo_tbt):
    """Per finishing cohort: the shares missing TTFT, TBT and either, and its mean TTFT.

    A cohort's TTFT is its deterministic `base` plus a wait: exponential with mean `wait`, or,
    for an overloaded chain (`overloaded`, when `any_overloaded`), spread evenly over `span` as
    it serves its cohort one prompt after another. TBT is met or missed by the whole cohort.
    `slo_ttft` and `slo_tbt` hold one value per cohort (its pool's, or one class's).
    """
    k = len(base)
    ttft_miss, tbt_bad, bad, ttft_mean = np.empty(k), np.empty(k), np.empty(k), np.empty(k)
    for j in range(k):
        over = slo_ttft[j] - base[j]
        if over > 0:
            ok = -math.expm1(-np_minimum(np_maximum(over / np_maximum(wait[j], 1e-6), 0.0), 50.0))
        else:
            ok = 0.0
        if any_overloaded and overloaded[j]:
            ok = np_minimum(np_maximum(over / np_maximum(span[j], 1e-9), 0.0), 1.0)
        ttft_miss[j] = 1.0 - ok
        tbt_bad[j] = 1.0 if tbt[j] > slo_tbt[j] else 0.0
        bad[j] = np_maximum(ttft_miss[j], tbt_bad[j])
        if any_overloaded:
            ttft_mean[j] = base[j] + (span[j] / 2 if overloaded[j] else wait[j])
        else:
            ttft_mean[j] = base[j] + wait[j]
    return ttft_miss, tbt_bad, bad, ttft_mean


@njit(**JIT_OPTIONS)
def cohort_totals(finished, ttft_miss, tbt_bad, bad, qloss, ttft_mid, tbt):
    """The interval's weighted counts of the finishing cohorts, and their latency samples.

    Returns (finished, TTFT violations, TBT violations, either, quality loss), each summed in
    numpy's pairwise order, and the TTFT, TBT and weight of the cohorts that finished anyone.
    """
    k = len(finished)
    rows = np.empty((5, k))
    for j in range(k):
        w = finished[j]
        rows[0, j] = w
        rows[1, j] = w * ttft_miss[j]
        rows[2, j] = w * tbt_bad[j]
        rows[3, j] = w * bad[j]
        rows[4, j] = w * qloss[j]
    totals = np.empty(5)
    for r in range(5):
        totals[r] = pairwise_sum(rows[r])
    keep = flatnonzero(finished > 0)
    ttft_out, tbt_out, w_out = ttft_mid[keep], tbt[keep], finished[keep]
    return totals, ttft_out, tbt_out, w_out


@njit(**JIT_OPTIONS)
def pool_counts(slot_pool, q, run, buf, n_pools):
    """Waiting and running requests per pool (`AggregateServing.per_pool_counts`).

    Slots without a pool (-1) count nothing; each pool's sums run in slot order (as
    ``np.bincount``), then the router buffer joins the waiting.
    """
    waiting, running = np.zeros(n_pools), np.zeros(n_pools)
    for i in range(len(slot_pool)):
        has = 1.0 if slot_pool[i] >= 0 else 0.0
        p = slot_pool[i] if slot_pool[i] >= 0 else 0
        waiting[p] += q[i] * has
        running[p] += run[i] * has
    for p in range(n_pools):
        waiting[p] = waiting[p] + buf[p]
    return waiting, running


@njit(**JIT_OPTIONS)
def in_flight(q, run, buf):
    """Requests queued, running and in the router buffer (each array summed as numpy sums)."""
    return pairwise_sum(q) + pairwise_sum(run) + pairwise_sum(buf)


@njit(**JIT_OPTIONS)
def fold_arrivals(pool, input_tokens, output_tokens, buf, buf_in, buf_out, buf_age_s, n_pools):
    """New requests folded into each pool's router buffer (`AggregateServing.add_arrivals`).

    Returns the new buffer count, mean prompt, mean output and mean age per pool (new arrivals
    have age 0); counts and token totals are summed in arrival order, as ``np.bincount`` does.
    """
    cnt, tot_in, tot_out = np.zeros(n_pools), np.zeros(n_pools), np.zeros(n_pools)
    for i in range(len(pool)):
        p = pool[i]
        cnt[p] += 1.0
        tot_in[p] += input_tokens[i]
        tot_out[p] += output_tokens[i]
    new_buf, new_in = np.empty(n_pools), np.empty(n_pools)
    new_out, new_age = np.empty(n_pools), np.empty(n_pools)
    for p in range(n_pools):
        new = buf[p] + cnt[p]
        safe = np_maximum(new, 1e-12)
        new_in[p] = (buf_in[p] * buf[p] + tot_in[p]) / safe
        new_out[p] = (buf_out[p] * buf[p] + tot_out[p]) / safe
        new_age[p] = buf_age_s[p] * buf[p] / safe
        new_buf[p] = new
    return new_buf, new_in, new_out, new_age


@njit(**JIT_OPTIONS)
def route_tick(buf, buf_in, buf_out, serving, route_weight, max_batch, pool, q, q_in, q_out,
               q_age_s, rate_rps, dt_s):
    """The aggregate router's tick (`AggregateServing._route`): weights, then `route_buffers`.

    A slot's weight is its routing weight times its batch cap where it serves (the batch cap
    alone if no serving slot has routing weight). Returns (each slot's share of the buffer,
    whether the buffer was routed); with no weight or an empty buffer nothing is routed and
    the smoothed arrival rates decay (x 0.8).
    """
    n = len(serving)
    routed = np.zeros(n)
    weight = np.empty(n)
    any_weight = False
    for i in range(n):
        weight[i] = route_weight[i] * max_batch[i] if serving[i] else 0.0
        any_weight = any_weight or weight[i] != 0.0
    if not any_weight:  # every preferred row is empty: routing weights yield
        for i in range(n):
            weight[i] = float(max_batch[i]) if serving[i] else 0.0
            any_weight = any_weight or weight[i] != 0.0
    if not any_weight or pairwise_sum(buf) <= 0:
        for i in range(n):
            rate_rps[i] *= 0.8
        return routed, False
    route_buffers(buf, buf_in, buf_out, weight, pool, q, q_in, q_out, q_age_s, rate_rps,
                  routed, dt_s)
    return routed, True
