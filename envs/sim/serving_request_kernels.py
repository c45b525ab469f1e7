"""Compiled loops of the request-level serving model's tick (`serving_request`).

`RequestLevelServing` keeps every live request as a row of a struct of arrays; a tick orders
each instance's prompts, runs its prefill chain and its decode steps. As whole-array numpy that
was a few hundred operations on a few thousand rows per tick, each paying numpy's call overhead;
these loops do the same arithmetic row by row, compiled by numba, in passes split where the tick
calls the profile model (the prefill formula, the decode iteration time).

Every pass computes exactly the expressions the numpy version computed, in the same order
(sequential per-slot sums as ``np.bincount`` adds, the grouped running maximum of the chain's
Lindley recursion as it was written, numpy's pairwise order for whole-array sums), so the
figures are the same to the last bit. The physics and its explanation stay in
`serving_request`; this module is only arithmetic.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from llm_cluster_gym.envs.sim.compiled import JIT_OPTIONS, flatnonzero, pairwise_sum


@njit(**JIT_OPTIONS)
def runs(keys):
    """Start index and length of each run of equal adjacent keys (keys non-empty)."""
    n = len(keys)
    g = 1
    for i in range(1, n):
        if keys[i] != keys[i - 1]:
            g += 1
    starts = np.empty(g, np.int64)
    lens = np.empty(g, np.int64)
    starts[0] = 0
    j = 0
    for i in range(1, n):
        if keys[i] != keys[i - 1]:
            lens[j] = i - starts[j]
            j += 1
            starts[j] = i
    lens[g - 1] = n - starts[g - 1]
    return starts, lens


@njit(**JIT_OPTIONS)
def chain_schedule(start, svc, starts, lens, t0_s, t1):
    """Each instance's prompt chain served in order within the tick (see `serving_request`).

    Prompts are grouped by instance (runs `starts`, `lens`); prompt k starts no earlier than
    `start[k]` and needs `svc[k]`. Returns (finish, begin, complete by `t1`, fraction of each
    service done by `t1`: the first unfinished prompt of a chain runs partly, later ones not).
    Lindley: c_k = max(c_{k-1}, start_k) + svc_k = S_k + max_{j<=k}(start_j - S_{j-1}), with S
    the chain's running sum of services, taken from one running sum and one running maximum
    over all chains, each chain lifted above the previous ones.
    """
    k = len(svc)
    cs = np.cumsum(svc)
    incl = np.empty(k)
    key = np.empty(k)
    for g in range(len(starts)):
        a = starts[g]
        off = cs[a] - svc[a]
        for i in range(a, a + lens[g]):
            incl[i] = cs[i] - off
            key[i] = (start[i] - t0_s) - (incl[i] - svc[i])
    span = (key.max() - key.min()) + 1.0
    fin = np.empty(k)
    begin = np.empty(k)
    complete = np.empty(k, dtype=np.bool_)
    frac = np.empty(k)
    run = 0.0
    for g in range(len(starts)):
        lift = g * span
        a = starts[g]
        for i in range(a, a + lens[g]):
            v = key[i] + lift
            run = v if i == 0 else max(run, v)
            fin[i] = t0_s + incl[i] + (run - lift)
            begin[i] = fin[i] - svc[i]
            complete[i] = fin[i] <= t1
    for g in range(len(starts)):
        a = starts[g]
        for i in range(a, a + lens[g]):
            prev_done = True if i == a else complete[i - 1]
            if complete[i]:
                frac[i] = 1.0
            elif prev_done and begin[i] < t1:
                frac[i] = (t1 - begin[i]) / max(svc[i], 1e-12)
            else:
                frac[i] = 0.0
    return fin, begin, complete, frac


@njit(**JIT_OPTIONS)
def order_prefill(pf, slot, admit_seq, input_tokens, done_tokens, prefill_left):
    """The prefilling requests `pf` in chain order (by slot, then admission), and their queries.

    The prefill formula's queries: each prompt's total and already computed tokens, and zero
    tokens per slot. Returns (pf, slots, run starts, run lengths, slots with prompts, total
    tokens, tokens left, query tokens, query slots).
    """
    k = len(pf)
    key = np.empty(k)
    for j in range(k):
        key[j] = slot[pf[j]] * 4294967296.0 + admit_seq[pf[j]]  # exact, unique per request
    order = np.argsort(key)
    pf = pf[order]
    ps = slot[pf]
    starts, lens = runs(ps)
    u = ps[starts]
    g = len(u)
    total = np.empty(k)
    x = np.empty(k)
    q_tok = np.zeros(2 * k + g)
    q_slot = np.empty(2 * k + g, np.int64)
    for j in range(k):
        r = pf[j]
        total[j] = input_tokens[r] + done_tokens[r]  # prompt (+ tokens to recompute)
        x[j] = prefill_left[r]
        q_tok[j] = total[j]
        q_tok[k + j] = total[j] - x[j]
        q_slot[j] = ps[j]
        q_slot[k + j] = ps[j]
    q_slot[2 * k:] = u
    return pf, ps, starts, lens, u, total, x, q_tok, q_slot


@njit(**JIT_OPTIONS)
def settle_prefill(pf, ps, starts, lens, x, prog, total, complete, work, work_slot, ready, n,
                   block_tokens, prefill_left, first_token_s, done_tokens):
    """The state update both prefill modes share (see `RequestLevelServing._prefill`).

    Prompts left in progress keep their KV reservation; completed ones get their first token at
    `ready` (unless a preempted request already had one) and the marginal work left after them on
    their instance. Returns (completed requests, their ready times, that work, and per slot the KV
    and count of the requests still prefilling).
    """
    k = len(pf)
    kv_pf = np.zeros(n)
    n_pf = np.zeros(n)
    n_comp = 0
    for j in range(k):
        r = pf[j]
        if complete[j]:
            prefill_left[r] = 0.0
            n_comp += 1
        else:
            prefill_left[r] = x[j] - prog[j]
            kv_pf[ps[j]] += total[j] + block_tokens
            n_pf[ps[j]] += 1.0
    comp = np.empty(n_comp, np.int64)
    ready_c = np.empty(n_comp)
    after = np.empty(n_comp)
    if n_comp == 0:
        return comp, ready_c, after, kv_pf, n_pf
    cw = np.cumsum(work)
    c = 0
    for g in range(len(starts)):
        a = starts[g]
        off = cw[a] - work[a]
        for j in range(a, a + lens[g]):
            if complete[j]:
                r = pf[j]
                comp[c] = r
                ready_c[c] = ready[j]
                if np.isnan(first_token_s[r]):
                    first_token_s[r] = ready[j]
                done_tokens[r] += 1.0
                after[c] = work_slot[ps[j]] - (cw[j] - off)
                c += 1
    return comp, ready_c, after, kv_pf, n_pf


@njit(**JIT_OPTIONS)
def chunked_prefill(pf, ps, starts, lens, u, total, x, t, n_dec, iter_s, arrival_s,
                    max_prefill_tokens, t0_s, dt_s, n, block_tokens, prefill_left,
                    first_token_s, done_tokens, prefill_tokens_out, prefill_busy_out):
    """Chunked prefill of the ordered prompts through the tick (`RequestLevelServing._prefill`).

    `t` is the prefill formula at each prompt's total tokens, at its computed tokens and at zero
    tokens per slot (`order_prefill`'s queries). Writes the prompts' progress and first tokens
    into the request arrays and the slots' prefill load into the two `*_out` arrays; returns
    `settle_prefill`'s figures and the marginal prefill seconds of every slot.
    """
    k = len(pf)
    g = len(u)
    t1 = t0_s + dt_s
    w = np.empty(k)
    for j in range(k):
        w[j] = t[j] - t[k + j]
    p0_u = t[2 * k:]
    o_u = np.empty(g)
    m_u = np.empty(g)
    mixed_u = np.empty(g, dtype=np.bool_)
    for h in range(g):
        mixed_u[h] = n_dec[u[h]] > 0 and iter_s[u[h]] > 0
        o_u[h] = iter_s[u[h]] if mixed_u[h] else p0_u[h]
        m_u[h] = max(max_prefill_tokens - n_dec[u[h]], 1.0)
    o = np.empty(k)
    m = np.empty(k)
    start = np.empty(k)
    svc = np.empty(k)
    for h in range(g):
        for j in range(starts[h], starts[h] + lens[h]):
            o[j] = o_u[h]
            m[j] = m_u[h]
            arrival = arrival_s[pf[j]]
            # A prompt arriving mid-tick joins the next step (half a step later on average).
            half = 0.5 * o[j] if mixed_u[h] else 0.0
            start[j] = arrival + half if arrival > t0_s else t0_s
            svc[j] = o[j] * x[j] / m[j] + w[j]
    fin, begin, complete, frac = chain_schedule(start, svc, starts, lens, t0_s, t1)
    prog = np.empty(k)
    work = np.empty(k)
    work_slot = np.zeros(n)
    tokens = np.zeros(n)
    for j in range(k):
        prog[j] = x[j] * frac[j]
        work[j] = w[j] * frac[j]
        work_slot[ps[j]] += work[j]
        tokens[ps[j]] += prog[j]
    # Chain busy periods (a period begins where the chain was idle when its prompt came, or at
    # the head of the tick's chain) pack their prompts into steps of up to m tokens.
    period = np.empty(k, np.int64)
    n_periods = 0
    for h in range(g):
        for j in range(starts[h], starts[h] + lens[h]):
            if j == starts[h] or start[j] >= fin[j - 1]:
                n_periods += 1
            period[j] = n_periods - 1
    chunk = np.zeros(n_periods)
    first_m = np.empty(n_periods)
    for j in range(k):
        chunk[period[j]] += total[j]
    for j in range(k):
        if j == 0 or period[j] != period[j - 1]:
            first_m[period[j]] = m[j]
    weighted = np.zeros(n)
    for j in range(k):
        weighted[ps[j]] += prog[j] * min(chunk[period[j]], first_m[period[j]])
    for i in range(n):
        prefill_tokens_out[i] = weighted[i] / max(tokens[i], 1e-12)
        prefill_busy_out[i] = work_slot[i]
    for h in range(g):  # pure passes until an idle instance's first prompt completes
        if not mixed_u[h]:
            passes = max(prog[starts[h]] / m_u[h], 1.0)
            prefill_busy_out[u[h]] += p0_u[h] * passes
    for i in range(n):
        prefill_busy_out[i] = min(prefill_busy_out[i], dt_s)
    # The step holding a prompt's last chunk ends after the rest of that step's overhead.
    ready = np.empty(k)
    for j in range(k):
        ready[j] = fin[j] + o[j] * max(1.0 - x[j] / m[j], 0.0)
    comp, ready_c, after, kv_pf, n_pf = settle_prefill(
        pf, ps, starts, lens, x, prog, total, complete, work, work_slot, ready, n, block_tokens,
        prefill_left, first_token_s, done_tokens)
    return comp, ready_c, after, work_slot, kv_pf, n_pf


@njit(**JIT_OPTIONS)
def decode_batches(e_idx, s, input_tokens, done_tokens, n):
    """Each decoding request's generated tokens and context; per slot the batch and its context.

    The per-slot sums add in row order, as `np.bincount` does.
    """
    k = len(e_idx)
    done_tok = np.empty(k)
    ctx = np.empty(k)
    batch = np.zeros(n)
    ctx_sum = np.zeros(n)
    for j in range(k):
        r = e_idx[j]
        done_tok[j] = done_tokens[r]
        ctx[j] = input_tokens[r] + done_tok[j]
        batch[s[j]] += 1.0
        ctx_sum[s[j]] += ctx[j]
    return done_tok, ctx, batch, ctx_sum


@njit(**JIT_OPTIONS)
def decode_advance(e_idx, s, start, after, t1, dt_s, iter_s, done_tok, ctx, batch, ctx_sum,
                   output_tokens, kv_pf, n_pf, block_tokens, done_tokens, prefill_busy,
                   decode_busy_out, decode_batch_out, decode_ctx_out, decode_tokens_out):
    """Decode steps of the tick (`RequestLevelServing._serve`): one token per step and request.

    Writes each request's tokens into `done_tokens` and the slots' decode load into the four
    `*_out` arrays. Returns the tokens generated (numpy's sum), the finishing requests' rows in
    `e_idx` and end times, and per slot the KV and running count at the end of the tick.
    """
    k = len(e_idx)
    n = len(iter_s)
    steps = np.empty(k)
    remaining = np.empty(k)
    gen = np.empty(k)
    finish = np.empty(k, dtype=np.bool_)
    busy = np.zeros(n)
    gen_slot = np.zeros(n)
    n_fin = 0
    for j in range(k):
        it = max(iter_s[s[j]], 1e-9)
        # Steps a request takes part in: its time in the tick less the marginal prefill work
        # mixed into the steps after it started decoding.
        st = max(t1 - start[j] - after[j], 0.0) / it
        rem = output_tokens[e_idx[j]] - done_tok[j]
        gj = min(rem, st)
        steps[j] = st
        remaining[j] = rem
        gen[j] = gj
        f = rem <= st + 1e-9
        finish[j] = f
        if f:
            n_fin += 1
        done_tokens[e_idx[j]] = done_tok[j] + gj
        busy[s[j]] = max(busy[s[j]], gj * it)
        gen_slot[s[j]] += gj
    kv = np.empty(n)
    n_run = np.empty(n)
    for i in range(n):
        decode_busy_out[i] = min(busy[i], dt_s - prefill_busy[i])
        decode_batch_out[i] = gen_slot[i] * iter_s[i] / max(busy[i], 1e-12) if busy[i] > 0 else 0.0
        if batch[i] != 0:
            decode_ctx_out[i] = ctx_sum[i] / batch[i]
        decode_tokens_out[i] = gen_slot[i]
        kv[i] = ctx_sum[i] + gen_slot[i] + block_tokens * batch[i] + kv_pf[i]
        n_run[i] = batch[i] + n_pf[i]
    rows = np.empty(n_fin, np.int64)
    end = np.empty(n_fin)
    if n_fin:
        kv_done = np.zeros(n)
        n_done = np.zeros(n)
        c = 0
        for j in range(k):
            if finish[j]:
                kv_done[s[j]] += (ctx[j] + gen[j]) + block_tokens
                n_done[s[j]] += 1.0
                st0 = start[j]
                rem = remaining[j]
                end[c] = st0 + (rem * (t1 - st0) / max(steps[j], 1e-12) if rem > 0 else 0.0)
                rows[c] = j
                c += 1
        for i in range(n):
            kv[i] -= kv_done[i]
            n_run[i] -= n_done[i]
    return pairwise_sum(gen), rows, end, kv, n_run


@njit(**JIT_OPTIONS)
def admit(waiting, slot, queue_key, input_tokens, done_tokens, serving, max_batch, n_running,
          kv_capacity, kv_used, next_seq, block_tokens, admit_seq, prefill_left):
    """Admit waiting requests FIFO per instance (`RequestLevelServing._admit`); returns how many.

    Each live instance's queue, in waiting order (`queue_key`: preempted requests first), is
    admitted as long as both the batch cap and the prompts' KV (prompt, tokens to recompute and
    one block each, cumulated) fit: a prefix of the queue, head-of-line blocking as in vLLM.
    Admitted requests get consecutive admission numbers from `next_seq`, instance by instance.
    """
    n_live = 0
    for j in range(len(waiting)):
        if serving[slot[waiting[j]]]:
            n_live += 1
    if n_live == 0:
        return 0
    live = np.empty(n_live, np.int64)
    k = 0
    for j in range(len(waiting)):
        if serving[slot[waiting[j]]]:
            live[k] = waiting[j]
            k += 1
    # By instance, then waiting order (np.lexsort's order): a stable sort on the key, then a
    # stable counting sort on the instance.
    by_key = live[np.argsort(queue_key[live], kind="mergesort")]
    n = len(serving)
    at = np.zeros(n + 1, np.int64)
    for r in by_key:
        at[slot[r] + 1] += 1
    for i in range(n):
        at[i + 1] += at[i]
    w = np.empty(n_live, np.int64)
    for r in by_key:
        w[at[slot[r]]] = r
        at[slot[r]] += 1
    need = np.empty(n_live)
    for j in range(n_live):
        need[j] = input_tokens[w[j]] + done_tokens[w[j]] + block_tokens
    cum = np.cumsum(need)
    admitted = 0
    head = 0
    off = 0.0
    for j in range(n_live):
        s = slot[w[j]]
        if j == 0 or s != slot[w[j - 1]]:
            head = j
            off = cum[j] - need[j]
        if j - head < max_batch[s] - n_running[s] and cum[j] - off <= kv_capacity[s] - kv_used[s]:
            r = w[j]
            admit_seq[r] = next_seq + admitted
            prefill_left[r] = input_tokens[r] + done_tokens[r]
            admitted += 1
    return admitted


@njit(**JIT_OPTIONS)
def route_scan(slot, n_slots):
    """Requests on each slot (as float counts) and the requests not yet routed (slot -1)."""
    outstanding = np.zeros(n_slots)
    unrouted = np.empty(len(slot), dtype=np.bool_)
    for i in range(len(slot)):
        unrouted[i] = slot[i] < 0
        if slot[i] >= 0:
            outstanding[slot[i]] += 1.0
    return outstanding, flatnonzero(unrouted)


@njit(**JIT_OPTIONS)
def waiting_requests(admit_seq, slot):
    """Requests routed to an instance and not admitted: ``(admit_seq < 0) & (slot >= 0)``."""
    mask = np.empty(len(slot), dtype=np.bool_)
    for i in range(len(slot)):
        mask[i] = admit_seq[i] < 0 and slot[i] >= 0
    return flatnonzero(mask)


@njit(**JIT_OPTIONS)
def engine_split(prefill_left, admit_seq):
    """Requests with prompt left to compute, and running requests decoding."""
    pf = np.empty(len(prefill_left), dtype=np.bool_)
    dec = np.empty(len(prefill_left), dtype=np.bool_)
    for i in range(len(prefill_left)):
        pf[i] = prefill_left[i] > 0
        dec[i] = prefill_left[i] == 0 and admit_seq[i] >= 0
    return flatnonzero(pf), flatnonzero(dec)


@njit(**JIT_OPTIONS)
def stale_requests(wait_since_s, admit_seq, cutoff_s):
    """Requests waiting since before `cutoff_s` and not admitted (to be dropped)."""
    mask = np.empty(len(admit_seq), dtype=np.bool_)
    for i in range(len(admit_seq)):
        mask[i] = wait_since_s[i] < cutoff_s and admit_seq[i] < 0
    return flatnonzero(mask)
