"""Aggregate (fluid) serving for fast training: per-instance counts, no per-request state.

The same physics as the request-level model (`serving_request`: vLLM V1's default scheduler),
in fluid form. Each instance slot keeps the number of waiting and running requests and their
mean lengths. Per tick:

* arrivals are routed by the same water-filling rule as the request-level model;
* admission under the batch cap and the prompt's KV (prompt plus one block) against the KV the
  running requests hold now;
* chunked prefill: the admitted prompts form a chain in which each costs its share of the step
  overheads (``o * tokens / m``: ``o`` the decode iteration, or the pass's p0 on an instance
  with nothing decoding; ``m`` the prompt tokens a step carries) plus its marginal time; decode
  continues throughout, its steps stretched by the marginal prefill time; a chain longer than
  the tick carries over;
* paged KV: the running requests' KV grows with their tokens; what exceeds the memory at the
  end of the tick is preempted (the newest requests: their prompt and about one token each)
  and goes back to the head of the queue, to be recomputed when admitted again;
* completions follow Little's law; the finishing cohort carries the TTFT of this tick's
  admitted cohort: a deterministic part (queue age, carried chain, half a step, its own service
  and step) plus an M/D/1 queueing wait spread exponentially (sequential when the chain is
  overloaded), so SLO attainment degrades smoothly as queues grow, as in the request-level model.

With per-request SLO classes (`serving.slo_classes`), a pool's finishing cohort mixes classes.
Its attainment is the share-weighted sum over classes of each class's own: the class's TTFT
base swaps the cohort's prompt service (its share of step overheads, its marginal prefill
time and the rest of its last step) for that of the class's mean prompt, and keeps the same
queue age, carried chain and waiting-time law (the cohort's M/D/1 wait, or its sequential span
when overloaded); TBT is the cohort's, held against each class's TBT SLO. Approximated: the
class shares and class mean prompts of a pool are those of every request that arrived in it so
far in the episode (a queue's own mix is not tracked, so requests spilled over from a pool
without instances and preempted ones count with their new pool's mix), and the spread of
prompts inside a class is left to the exponential wait, as it is for a pool without classes. A
pool whose requests all fall in one class gives exactly the figure of that class's SLOs
without classes.

It shares the power, thermal and profile models with the request-level model; only the
bookkeeping of requests differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llm_cluster_gym.envs.sim import serving_aggregate_kernels as kernels
from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator, TickLoad
from llm_cluster_gym.envs.sim.serving_request import BLOCK_TOKENS

if TYPE_CHECKING:
    from llm_cluster_gym.envs.sim.slo_classes import SloClasses


class AggregateServing:
    """Fluid continuous-batching model over the instance table.

    Finishing cohorts are judged against their pool's SLOs (the arrays `tick` is given), or,
    when `slo_classes` is given, against each class's SLOs weighted by the pool's class shares
    (the module docstring says what is approximated).
    """

    def __init__(self, n_slots: int, n_pools: int, max_prefill_tokens: int, drop_after_s: float,
                 slo_classes: SloClasses | None = None):
        self.slo_classes = slo_classes
        self.n_slots = n_slots
        self.n_pools = n_pools
        self.max_prefill_tokens = max_prefill_tokens
        self.drop_after_s = drop_after_s
        self.reset()

    def reset(self) -> None:
        """Empty every queue."""
        n, p = self.n_slots, self.n_pools
        self.q = np.zeros(n)
        self.q_in = np.zeros(n)
        self.q_out = np.zeros(n)
        self.q_age_s = np.zeros(n)
        self.run = np.zeros(n)
        self.run_ctx = np.zeros(n)
        self.run_out = np.zeros(n)
        self.slot_pool = np.full(n, -1, dtype=np.int64)
        self.busy_until_s = np.zeros(n)
        self.last_iter_s = np.zeros(n)
        self.buf = np.zeros(p)
        self.buf_in = np.zeros(p)
        self.buf_out = np.zeros(p)
        self.buf_age_s = np.zeros(p)
        self.rate_rps = np.zeros(n)
        self.routed = np.zeros(n)  # requests routed to each slot in the current tick
        self._preemptions = 0.0
        if self.slo_classes is not None:  # arrivals so far per (pool, class): count, prompt tokens
            k = self.slo_classes.n_classes
            self.class_arrived = np.zeros((p, k))
            self.class_input_tokens = np.zeros((p, k))

    @property
    def in_flight(self) -> float:
        """Requests arrived and neither finished nor dropped."""
        return float(kernels.in_flight(self.q, self.run, self.buf))

    @property
    def preemptions(self) -> float:
        """Running requests preempted (KV cache full) since the last reset (fluid count)."""
        return self._preemptions

    def per_pool_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Waiting and running request counts per pool."""
        return kernels.pool_counts(self.slot_pool, self.q, self.run, self.buf, self.n_pools)

    def add_arrivals(self, arrival_s, input_tokens, output_tokens, pool) -> None:
        """Fold new requests into the per-pool router buffer."""
        if len(arrival_s) == 0:
            return
        # Compiled (`kernels.fold_arrivals`): counts and token totals per pool, then the
        # buffer's new means (new arrivals have age 0).
        self.buf, self.buf_in, self.buf_out, self.buf_age_s = kernels.fold_arrivals(
            np.asarray(pool, dtype=np.int64), input_tokens, output_tokens, self.buf, self.buf_in,
            self.buf_out, self.buf_age_s, self.n_pools)
        if self.slo_classes is not None:
            k = self.slo_classes.n_classes
            key = np.asarray(pool) * k + self.slo_classes.assign(input_tokens)
            size = self.n_pools * k
            self.class_arrived += np.bincount(key, minlength=size).reshape(self.n_pools, k)
            self.class_input_tokens += np.bincount(key, weights=input_tokens,
                                                   minlength=size).reshape(self.n_pools, k)

    def class_shares(self) -> tuple[np.ndarray, np.ndarray]:
        """Each pool's class shares and class mean prompts, from its arrivals so far.

        Returns (pools, classes) arrays: the share of the pool's arrivals in each class, and the
        class's mean prompt there (tokens; 1 where none arrived). A pool with no arrival yet
        takes the mix of all pools (it can only finish requests spilled over from another pool).
        """
        n = self.class_arrived
        total = n.sum(axis=1, keepdims=True)
        overall = n.sum(axis=0) / max(n.sum(), 1e-12)
        share = np.where(total > 0, n / np.maximum(total, 1e-12), overall[None, :])
        mean_in = np.where(n > 0, self.class_input_tokens / np.maximum(n, 1e-12), 1.0)
        return share, mean_in

    def requeue(self, stopped_slots: np.ndarray) -> None:
        """Requests of stopped instances go back to the router buffer (progress lost)."""
        idx = np.flatnonzero(stopped_slots & (self.slot_pool >= 0))
        for i in idx:
            p = self.slot_pool[i]
            n = self.q[i] + self.run[i]
            if n <= 0:
                continue
            # A running request's prompt: its mean context less its mean output (with the
            # fluid's memoryless completions, survivors have generated about that much).
            inp = (self.q[i] * self.q_in[i] + self.run[i] * np.maximum(
                self.run_ctx[i] - self.run_out[i], 1.0)) / n
            out = (self.q[i] * self.q_out[i] + self.run[i] * self.run_out[i]) / n
            tot = self.buf[p] + n
            self.buf_in[p] = (self.buf_in[p] * self.buf[p] + inp * n) / tot
            self.buf_out[p] = (self.buf_out[p] * self.buf[p] + out * n) / tot
            self.buf_age_s[p] = (self.buf_age_s[p] * self.buf[p] + self.q_age_s[i] * self.q[i]) / tot
            self.buf[p] = tot
        self.q[stopped_slots] = 0.0
        self.run[stopped_slots] = 0.0
        self.busy_until_s[stopped_slots] = 0.0

    def _route(self, dt_s, inst: InstanceTable, serving, route_weight) -> None:
        """Split each pool's new requests over its live instances in proportion to weight.

        In the fluid model the instances of a pool are interchangeable, so the proportional
        split is what join-shortest-queue converges to; a pool with no live instance spills
        over all live instances, as in the request-level router.
        """
        # Only active slots hold an instance, and every active slot has a pool (>= 0). The
        # weights, the split, the spill of pools without a live instance and the queues' new
        # means run compiled (`serving_aggregate_kernels.route_tick`), in place.
        self.slot_pool = inst.pool
        self.routed, moved = kernels.route_tick(
            self.buf, self.buf_in, self.buf_out, serving, route_weight, inst.max_batch, inst.pool,
            self.q, self.q_in, self.q_out, self.q_age_s, self.rate_rps, dt_s)
        if moved:
            self.buf = np.zeros(self.n_pools)
            self.buf_age_s = np.zeros(self.n_pools)

    def _drop_stale_buffer(self, dt_s: float, acc: ServiceAccumulator) -> None:
        """Age the router buffer held while no instance serves, and drop its oldest requests.

        The buffer is held only while no instance is live at all. Its requests arrived
        about evenly since the oldest one, 2 x their mean age ago: the part older than
        drop_after_s is dropped, and the rest (ages spread over drop_after_s) keeps a mean
        age of half of it. So an unserved request is dropped `drop_after_s` after arrival, as
        in the request-level model, instead of waiting forever.
        """
        held = self.buf > 0
        self.buf_age_s = np.where(held, self.buf_age_s + dt_s, 0.0)
        span = 2.0 * self.buf_age_s
        stale = held & (span > self.drop_after_s)
        if not np.count_nonzero(stale):
            return
        excess = np.where(stale, self.buf * (1.0 - self.drop_after_s / np.maximum(span, 1e-12)),
                          0.0)
        self._count_dropped(acc, excess, per_slot=False)
        self.buf = self.buf - excess
        self.buf_age_s = np.where(stale, 0.5 * self.drop_after_s, self.buf_age_s)

    def _drop_stale(self, acc: ServiceAccumulator) -> None:
        """Drop requests older than drop_after_s, in FIFO order.

        They are the queue beyond what the recent arrival rate could have brought in within
        drop_after_s; nothing is dropped while no queue is that old (the common case).
        """
        stale = self.q_age_s > self.drop_after_s
        if not np.count_nonzero(stale):
            acc.dropped += 0.0
            return
        excess = np.maximum(self.q - self.rate_rps * self.drop_after_s - 1.0, 0.0)
        excess = np.where(stale, excess, 0.0)
        self._count_dropped(acc, excess, per_slot=True)
        self.q -= excess

    def tick(self, t0_s, dt_s, inst: InstanceTable, serving, model, route_weight, slo_ttft_s,
             slo_tbt_s, quality_loss_per_slot, acc: ServiceAccumulator) -> TickLoad:
        """Advance the fluid state by one tick and return how busy each slot was."""
        n = self.n_slots
        load = TickLoad(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n))
        self._route(dt_s, inst, serving, route_weight)
        if np.count_nonzero(self.buf):  # no live instance took the router's buffer
            self._drop_stale_buffer(dt_s, acc)
        self._drop_stale(acc)
        idx = (serving & ((self.q > 1e-9) | (self.run > 1e-9))).nonzero()[0]
        if len(idx) == 0:
            self.q_age_s += dt_s
            return load
        # The per-slot arithmetic runs compiled (`serving_aggregate_kernels`, the same
        # expressions slot by slot); the comments here say what each pass computes.
        q_in = self.q_in[idx]
        # The prefill formula T: a pass's fixed cost T(0), a prompt's marginal time T(x) - T(0).
        t = model.prefill_time_s(np.concatenate([np.maximum(q_in, 1.0), np.zeros(len(idx))]),
                                 np.concatenate([idx, idx]))
        p0 = t[len(idx):]
        # ---- admission: batch cap, and the prompt's KV against what running requests hold.
        # ---- chunked prefill: the admitted prompts' chain (each costs its share of the step
        # overheads, o * tokens / m, plus its marginal time), mixed into decode steps; an
        # instance with nothing decoding runs pure prefill passes (p0 each) until its first
        # prompt completes. Prompt tokens per prefill-carrying step: a chain busy period
        # carries the prompts that queue in it (1 / (1 - rho) on average), up to a step's
        # budget. TTFT of the admitted cohort: queue age, the carried chain, half a step (a
        # prompt joins the next step), its own service and the rest of its last step; plus an
        # M/D/1 wait (rho s / 2(1 - rho)) as the exponential part; an overloaded chain works
        # through its cohort one prompt after another (`span`). Admitted requests decode from
        # their first token: arrivals of this tick come half a tick late on average, and every
        # admitted prompt waits for its chain (`share` of the window).
        (adm, o, m, s, base, quantum, wait, span, overloaded, new_run, ctx, out, window, share,
         batch, age) = kernels.admit_and_prefill(
            idx, self.q, self.run, self.q_in, self.q_out, self.run_ctx, self.run_out,
            self.q_age_s, self.last_iter_s, self.busy_until_s, self.routed, inst.max_batch,
            model.kv_capacity_tokens, t, t0_s, dt_s, float(self.max_prefill_tokens),
            float(BLOCK_TOKENS), load.prefill_busy_s, load.prefill_tokens)
        # ---- decode: every running request one token per iteration through the window.
        # Decode steps run while any request decodes. With N decoding on average (tokens per
        # step of the whole window), requests are taken to overlap only when they must: steps
        # run min(N, 1) of the window, at a batch of tokens per step that ran. (Independent
        # arrivals would give 1 - exp(-N), M/G/inf; the router spreads arrivals evenly over
        # instances, and the request-level model's decode time lies between the two, closer
        # to this one on `small`.) TBT: per-token interval, decode steps stretched by the
        # prefill work mixed into them.
        iter_s = model.decode_iter_time_s(batch, np.maximum(ctx, 1.0), idx)
        dec_tokens, finished, tbt = kernels.decode(
            idx, self.run, adm, new_run, ctx, out, window, share, iter_s, dt_s,
            load.decode_busy_s, load.decode_batch, load.decode_ctx_tokens, load.decode_tokens)
        load.tokens_generated = self._tokens_generated(dec_tokens, adm, idx)
        # ---- SLO accounting for the finishing cohort (it carries the TTFT of its admission)
        if finished.sum() > 0:
            pool = inst.pool[idx]  # serving slots always have a pool
            any_overloaded = np.count_nonzero(overloaded) > 0
            if self.slo_classes is None:  # compiled: the waiting law and the TBT test per cohort
                ttft_miss, tbt_bad, bad, ttft_mean = kernels.cohort_misses(
                    base, wait, span, overloaded, any_overloaded, slo_ttft_s[pool], tbt,
                    slo_tbt_s[pool])
            else:
                ttft_mean = (base + np.where(overloaded, span / 2, wait) if any_overloaded
                             else base + wait)
                ttft_miss, tbt_bad, bad = self._class_misses(
                    pool, idx, model, base, base - s - quantum, o, m, p0, wait, span,
                    any_overloaded, overloaded, tbt)
            self._record(acc, idx, finished, ttft_miss, tbt_bad, bad, tbt, ttft_mean,
                         quality_loss_per_slot[idx])
        # ---- state update. Completions are memoryless in the fluid (a share of the running
        # requests finishes every tick, as with exponential output lengths), so finishers leave
        # with the mean context and the survivors' mean grows by the tokens generated per
        # request. Paged KV: what outgrew the memory is preempted, newest first (about a queued
        # prompt and one token each); those requests go back to the head of the queue, to be
        # recomputed.
        pre, any_preempted = kernels.settle(
            idx, self.q, self.q_in, self.q_out, self.q_age_s, self.run, self.run_ctx,
            self.run_out, self.last_iter_s, model.kv_capacity_tokens, adm, new_run, finished,
            ctx, out, dec_tokens, age, iter_s, dt_s, float(BLOCK_TOKENS))
        if any_preempted:
            self._preemptions += float(pre.sum())
        rest = self.q > 0  # queues this tick did not serve grow older
        rest[idx] = False
        if np.count_nonzero(rest):
            self.q_age_s[rest] += dt_s
        self._age_idle(idx, dt_s)
        return load

    # Hooks where the batched model (`serving_batched`) keeps one figure per copy.
    def _count_dropped(self, acc: ServiceAccumulator, excess: np.ndarray, per_slot: bool) -> None:
        """Add the requests dropped (`excess`, per slot or per pool) to the interval's count."""
        acc.dropped += float(excess.sum())

    def _tokens_generated(self, dec_tokens: np.ndarray, adm: np.ndarray, idx: np.ndarray):
        """Output tokens of the tick: decode tokens plus each admitted prompt's first token."""
        return float(dec_tokens.sum() + adm.sum())

    def _age_idle(self, idx: np.ndarray, dt_s: float) -> None:
        """After a tick that served `idx`: nothing more (one cluster; see the batched model)."""

    def _class_misses(self, pool, idx, model, base, rest, o, m, p0, wait, span, any_overloaded,
                      overloaded, tbt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per slot, the share of its finishing cohort missing TTFT, TBT and either, over classes.

        Each class's TTFT base is `rest` (queue age, carried chain, half a step) plus the service
        and last-step remainder of the class's mean prompt; a slot whose pool's arrivals all fall
        in one class keeps the cohort's own `base` (exactly the figure without classes).
        """
        c = self.slo_classes
        share_all, mean_all = self.class_shares()
        share, mean_in = share_all[pool], mean_all[pool]  # (slots, classes)
        pure = share.max(axis=1) == 1.0
        k, n = c.n_classes, len(idx)
        # The prefill formula T at each class's mean prompt: its marginal time T(x) - T(0).
        marginal = model.prefill_time_s(mean_in.T.ravel(), np.tile(idx, k)).reshape(k, n) - p0
        ttft_miss, tbt_bad, bad = np.zeros(n), np.zeros(n), np.zeros(n)
        for j in range(k):
            x = mean_in[:, j]
            s_j = o * x / m + marginal[j]
            base_j = np.where(pure, base, rest + s_j + o * np.maximum(1.0 - x / m, 0.0))
            # The cohort's waiting law and TBT against the class's SLOs (`kernels.cohort_misses`).
            miss_j, tbt_j, bad_j, _ = kernels.cohort_misses(
                base_j, wait, span, overloaded, any_overloaded, np.full(n, c.slo_ttft_s[j]), tbt,
                np.full(n, c.slo_tbt_s[j]))
            ttft_miss += share[:, j] * miss_j
            tbt_bad += share[:, j] * tbt_j
            bad += share[:, j] * bad_j
        return ttft_miss, tbt_bad, bad

    def _record(self, acc, idx, finished, ttft_miss, tbt_bad, bad, tbt, ttft_mid, qloss) -> None:
        """Add the finishing cohort's weighted counts and its latency samples to `acc`.

        The arrays are aligned with the slots `idx`; `ttft_miss`, `tbt_bad` and `bad` are each
        slot's share of its cohort missing the TTFT SLO, the TBT SLO and either.
        """
        # One weighted sum per counter (pairwise, as numpy sums), the cohorts that finished
        # anyone kept as the interval's latency samples.
        totals, ttft_s, tbt_s, weight = kernels.cohort_totals(finished, ttft_miss, tbt_bad, bad,
                                                              qloss, ttft_mid, tbt)
        n_fin, n_ttft, n_tbt, n_bad, qsum = totals.tolist()
        acc.finished += n_fin
        acc.ttft_violations += n_ttft
        acc.tbt_violations += n_tbt
        acc.violations += n_bad
        acc.quality_loss += qsum
        acc.ttft_s.append(ttft_s)
        acc.tbt_s.append(tbt_s)
        acc.weight.append(weight)
