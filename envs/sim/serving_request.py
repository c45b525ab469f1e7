"""Request-level serving: vLLM V1's default scheduler with per-request TTFT and TBT.

Every live request is a row in a struct of numpy arrays. Each tick routes new arrivals, admits
waiting requests, and runs every instance's engine steps for the tick; nothing in the hot path
loops over requests in Python: the loops over rows are compiled (`serving_request_kernels`,
`routing`), and the physics they compute is described here and where they are called. The
semantics follow vLLM V1's default scheduler (the reference is
`llm_cluster_gym.envs.perf.scheduler`, a step-exact model of it):

* Chunked prefill under a token budget (``max_prefill_tokens``, vLLM's
  ``max_num_batched_tokens``): every engine step carries one token of each decoding request
  plus chunks of the prompts being prefilled, in admission order, up to the budget. Decoding
  never stops for a prompt: a mixed step takes the decode iteration time (its fixed cost
  already pays the weight reads) plus the marginal time of its prompt tokens (the profile's
  prefill formula less its fixed cost: the p1 and p2 terms).
  A step with nothing decoding is a pure prefill pass and pays the pass's fixed cost p0 once
  for up to ``budget`` prompt tokens, not once per prompt.
* Paged KV cache: admission needs only the prompt's KV plus one block (16 tokens); the KV of a
  running request grows with its generated tokens. When an instance's KV exceeds its capacity
  at the end of a tick, its most recently admitted running requests are preempted until the
  rest fit (vLLM V1 preempts by recompute): they go back to the instance's waiting queue,
  ahead of new requests, and when admitted again recompute their prompt plus the tokens
  generated so far. A preempted request keeps the first-token time its client saw.
* Admission is FIFO per instance under the batch cap (``max_batch``: vLLM's ``max_num_seqs``,
  prefilling and decoding requests both count) and the KV rule above.

Inside a tick each instance's prefill work is a FIFO chain (Lindley recursion, vectorized with a
grouped running maximum): a prompt's service is its share of step overheads (``o * tokens /
m``, with ``o`` the step's fixed cost: the decode iteration on an instance with requests
decoding, p0 on one without; and ``m`` the prompt tokens a step carries: the budget less the
decoding requests) plus its marginal time; its first token comes when the step holding its
last chunk ends (``o * (1 - tokens / m)`` after its fluid completion when it fits one step).
So p0 is paid per step, amortized over the tokens of the step, with at least one whole pass
for the first prompt an idle instance takes. Decoding requests take one token per step; the
steps of a tick stretch by the marginal prefill time mixed into them.

Simplifications, at the tick's granularity (0.5 s by default): a tick's admissions happen at
its start (a prompt arriving later joins its instance's chain half a step after it arrives);
a tick's step fixed cost is the instance's decode iteration of the previous tick; a tick's
decode iteration uses every request that decodes in it; KV is checked for preemption at the
end of the tick (it can exceed the memory by one tick's growth in between).

Serial prefill (``serving.prefill_mode: serial``): how HF-style engines and this project's real
worker (``envs/real/engine.py``) serve. Each scheduler step admits waiting prompts (FIFO, batch cap,
up to ``max_prefill_tokens`` prompt tokens, at least one), runs each in its own prefill pass (its
first token comes out of the pass), then one decode iteration for every running request: decoding
stalls during the passes. The same chain carries it: a prompt's service is its whole pass
(``prefill_time_s(tokens)``, fixed cost p0 included, at the clock its own prompt allows: the
cluster's serial `SlotModel`) plus its share ``o * tokens / budget`` of the decode iterations
between passes (``o``: the decode iteration, 0 with nothing decoding); its first token comes when
its pass ends, before its step's decode iteration; decoding requests lose the whole pass time.
A tick's prefill load is its pass time (p0 included) and its mean prompt weighted by pass time.

Timing conventions: a request's TTFT is from its arrival to its first token; its TBT is the
wall time between its first and last token divided by the tokens in between, so prefill work
mixed into its steps and the stalls of preemption show up in its TBT, as they do on a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llm_cluster_gym.envs.sim import serving_request_kernels as kernels
from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.routing import route_arrivals
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator, TickLoad

if TYPE_CHECKING:
    from llm_cluster_gym.envs.sim.slo_classes import SloClasses

BLOCK_TOKENS = 16
"""vLLM's default KV-cache block size (tokens): admission reserves the prompt plus one block,
and each running request holds one block beyond its context (its partly filled last block)."""

_PREEMPTED_KEY_OFFSET = 2.0**52
"""Waiting order: preempted requests (key = admission order - this, negative and exact for any
admission count below 2**52) before new ones (key = arrival time)."""

_FIELDS = {
    "arrival_s": np.float64,
    "input_tokens": np.int64,
    "output_tokens": np.int64,
    "pool": np.int64,
    "slot": np.int64,
    "first_token_s": np.float64,  # NaN until the client has its first token
    "done_tokens": np.float64,  # output tokens generated so far (kept across preemptions)
    "prefill_left": np.float64,  # tokens to compute before the next token (0: decoding)
    "admit_seq": np.float64,  # admission order while running; -1 while waiting
    "queue_key": np.float64,  # waiting order within an instance
    "wait_since_s": np.float64,  # arrival, or the preemption that sent it back to waiting
}


@dataclass
class SlotModel:
    """Per-slot timing inputs for one tick, gathered by the cluster from the profile tables.

    Attributes:
        prefill_time_s: ``(tokens, slot_idx) -> s``, a prefill pass over ``tokens`` prompt
            tokens (the profile's formula, fixed cost p0 included). The fixed cost of a step
            is ``prefill_time_s(0)``; what a chunk of one prompt, from ``c`` to ``c + k``
            computed tokens, adds to a step is ``prefill_time_s(c + k) - prefill_time_s(c)``.
            Serial prefill calls it with whole prompts only (its pass, at that prompt's clock).
        decode_iter_time_s: ``(batch, mean_ctx, slot_idx) -> s``, one decode iteration.
        kv_capacity_tokens: Each slot's KV-cache capacity, tokens.
    """

    prefill_time_s: Callable[[np.ndarray, np.ndarray], np.ndarray]
    decode_iter_time_s: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    kv_capacity_tokens: np.ndarray


class RequestLevelServing:
    """Continuous-batching serving of individual requests across the instance table.

    Each finished request is judged against its pool's SLOs (the arrays `tick` is given), or,
    when `slo_classes` is given (`serving.slo_classes`), against the SLOs of its prompt's class
    whichever pool served it.
    """

    def __init__(self, n_slots: int, n_pools: int, max_prefill_tokens: int, drop_after_s: float,
                 prefill_mode: str = "chunked", slo_classes: SloClasses | None = None):
        if prefill_mode not in ("chunked", "serial"):
            raise ValueError(f"prefill_mode must be 'chunked' or 'serial', got {prefill_mode!r}")
        self.slo_classes = slo_classes
        self.n_slots = n_slots
        self.n_pools = n_pools
        self.max_prefill_tokens = max_prefill_tokens
        self.drop_after_s = drop_after_s
        self.serial = prefill_mode == "serial"
        self.reset()

    def reset(self) -> None:
        """Forget every request and backlog."""
        n = self.n_slots
        self.req = {k: np.zeros(0, dtype=t) for k, t in _FIELDS.items()}
        self.iter_s = np.zeros(n)  # each slot's decode iteration in its last tick
        self._kv_used = np.zeros(n)  # KV tokens held by each slot's running requests
        self._n_running = np.zeros(n)  # running (prefilling or decoding) requests per slot
        self._next_seq = 0.0
        self._preemptions = 0

    @property
    def in_flight(self) -> int:
        """Requests arrived and neither finished nor dropped."""
        return len(self.req["arrival_s"])

    @property
    def preemptions(self) -> int:
        """Running requests preempted (KV cache full) since the last reset."""
        return self._preemptions

    def per_pool_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Waiting and running request counts per pool."""
        running = self.req["admit_seq"] >= 0
        pool = self.req["pool"]
        waiting = np.bincount(pool[~running], minlength=self.n_pools)
        run = np.bincount(pool[running], minlength=self.n_pools)
        return waiting.astype(float), run.astype(float)

    def requeue(self, stopped_slots: np.ndarray) -> None:
        """Send the requests of stopped instances back to the router; their progress is lost."""
        if not stopped_slots.any() or self.in_flight == 0:
            return
        r = self.req
        slot = r["slot"]
        hit = (slot >= 0) & stopped_slots[np.maximum(slot, 0)]
        r["slot"][hit] = -1
        r["first_token_s"][hit] = np.nan
        r["done_tokens"][hit] = 0.0
        r["prefill_left"][hit] = 0.0
        r["admit_seq"][hit] = -1.0
        r["queue_key"][hit] = r["arrival_s"][hit]
        r["wait_since_s"][hit] = r["arrival_s"][hit]
        self.iter_s[stopped_slots] = 0.0
        self._kv_used[stopped_slots] = 0.0
        self._n_running[stopped_slots] = 0.0

    def add_arrivals(
        self, arrival_s: np.ndarray, input_tokens: np.ndarray, output_tokens: np.ndarray,
        pool: np.ndarray,
    ) -> None:
        """Append new requests (not yet routed)."""
        n = len(arrival_s)
        if n == 0:
            return
        new = {
            "arrival_s": arrival_s,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "pool": pool,
            "slot": np.full(n, -1),
            "first_token_s": np.full(n, np.nan),
            "done_tokens": np.zeros(n),
            "prefill_left": np.zeros(n),
            "admit_seq": np.full(n, -1.0),
            "queue_key": arrival_s,
            "wait_since_s": arrival_s,
        }
        for k, t in _FIELDS.items():
            self.req[k] = np.concatenate([self.req[k], np.asarray(new[k], dtype=t)])

    def _route(self, serving: np.ndarray, inst: InstanceTable, route_weight: np.ndarray) -> None:
        """Route every request not yet on an instance (`routing.route_arrivals`, compiled)."""
        slot = self.req["slot"]
        outstanding, unrouted = kernels.route_scan(slot, self.n_slots)  # one pass, compiled
        if len(unrouted) == 0 or not serving.any():
            return
        weight = np.where(serving, route_weight * inst.max_batch, 0.0)
        capacity = np.where(serving, inst.max_batch, 0).astype(float)
        route_arrivals(slot, self.req["pool"], unrouted, outstanding, weight, capacity, inst.pool)

    def tick(
        self,
        t0_s: float,
        dt_s: float,
        inst: InstanceTable,
        serving: np.ndarray,
        model: SlotModel,
        route_weight: np.ndarray,
        slo_ttft_s: np.ndarray,
        slo_tbt_s: np.ndarray,
        quality_loss_per_slot: np.ndarray,
        acc: ServiceAccumulator,
    ) -> TickLoad:
        """Advance all requests by one tick and return how busy each slot was."""
        n = self.n_slots
        load = TickLoad(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n))
        self._drop_stale(t0_s, acc)
        if self.in_flight == 0:
            return load
        self._route(serving, inst, route_weight)
        r = self.req
        waiting = kernels.waiting_requests(r["admit_seq"], r["slot"])
        if len(waiting):
            self._admit(waiting, inst, serving, model)
        # Running requests are always on serving slots: routing picks only those, and a stopped
        # instance's requests are requeued.
        pf, dec = kernels.engine_split(r["prefill_left"], r["admit_seq"])
        if len(pf) or len(dec):
            self._serve(pf, dec, t0_s, dt_s, model, load, slo_ttft_s, slo_tbt_s,
                        quality_loss_per_slot, acc)
            if (self._kv_used > model.kv_capacity_tokens).any():
                self._preempt(t0_s + dt_s, model)
        return load

    # ------------------------------------------------------------------ admission
    def _admit(self, waiting, inst, serving, model) -> None:
        """FIFO per instance (preempted first) under the batch cap and the prompt's KV."""
        r = self.req
        # Both conditions hold on a prefix of each instance's queue (head-of-line blocking, as
        # in vLLM). A request whose prompt alone exceeds an instance's KV memory is never
        # admitted; it waits until `drop_after_s` and is counted as dropped.
        self._next_seq += kernels.admit(
            waiting, r["slot"], r["queue_key"], r["input_tokens"], r["done_tokens"], serving,
            inst.max_batch, self._n_running, model.kv_capacity_tokens, self._kv_used,
            self._next_seq, float(BLOCK_TOKENS), r["admit_seq"], r["prefill_left"])

    # ------------------------------------------------------------------ engine steps
    def _serve(self, pf, dec, t0_s, dt_s, model, load, slo_ttft_s, slo_tbt_s,
               quality_loss_per_slot, acc) -> None:
        """Run the tick's engine steps: prefill chains mixed into decode iterations.

        Leaves each slot's running count and KV use at the end of the tick in
        ``_n_running`` and ``_kv_used``.
        """
        r = self.req
        n = self.n_slots
        t1 = t0_s + dt_s
        dec_slot = r["slot"][dec]
        n_dec = np.bincount(dec_slot, minlength=n)  # decoding at the tick start
        if len(pf):
            chain = self._prefill_serial if self.serial else self._prefill
            new, new_start, new_after, work, kv_pf, n_pf = chain(pf, n_dec, t0_s, dt_s, model, load)
            e_idx = np.concatenate([dec, new])
            start = np.concatenate([np.full(len(dec), t0_s), new_start])
            after = np.concatenate([work[dec_slot], new_after])
            s = r["slot"][e_idx]
        else:
            e_idx, start, after, s = dec, np.full(len(dec), t0_s), np.zeros(len(dec)), dec_slot
            kv_pf, n_pf = np.zeros(n), np.zeros(n)  # two arrays: they become two state arrays
        if len(e_idx) == 0:
            self._kv_used, self._n_running = kv_pf, n_pf
            return
        # ---- decode: one token per step for every decoding request (compiled loops:
        # `serving_request_kernels`). A request takes part in the steps of its time in the tick
        # less the marginal prefill work mixed into the steps after it started decoding; decode
        # steps run while any request decodes (as many as its longest run took), at a mean batch
        # of tokens per step; at the end of the tick every running request holds its context
        # plus one block of KV.
        done_tok, ctx, batch, ctx_sum = kernels.decode_batches(
            e_idx, s, r["input_tokens"], r["done_tokens"], n)
        idx = np.flatnonzero(batch)
        iter_s = np.zeros(n)
        iter_s[idx] = model.decode_iter_time_s(batch[idx], ctx_sum[idx] / batch[idx], idx)
        self.iter_s = iter_s
        gen_total, rows, end, kv, n_run = kernels.decode_advance(
            e_idx, s, start, after, t1, dt_s, iter_s, done_tok, ctx, batch, ctx_sum,
            r["output_tokens"], kv_pf, n_pf, float(BLOCK_TOKENS), r["done_tokens"],
            load.prefill_busy_s, load.decode_busy_s, load.decode_batch, load.decode_ctx_tokens,
            load.decode_tokens)
        load.tokens_generated += gen_total
        if len(rows):
            done = e_idx[rows]
            fs = s[rows]
            out = r["output_tokens"][done]
            first = r["first_token_s"][done]
            ttft = first - r["arrival_s"][done]
            tbt = np.where(out > 1, (end - first) / np.maximum(out - 1, 1), 0.0)
            if self.slo_classes is None:
                pool = r["pool"][done]
                slo_t, slo_b = slo_ttft_s[pool], slo_tbt_s[pool]
            else:
                cls = self.slo_classes.assign(r["input_tokens"][done])
                slo_t, slo_b = self.slo_classes.slo_ttft_s[cls], self.slo_classes.slo_tbt_s[cls]
            acc.record_finished(ttft, tbt, slo_t, slo_b, quality_loss=quality_loss_per_slot[fs])
            self._remove(done)
        self._kv_used, self._n_running = kv, n_run

    def _prefill(self, pf, n_dec, t0_s, dt_s, model, load):
        """Advance each instance's FIFO prefill chain through the tick (compiled loops).

        Each prompt's remaining chunk costs T(total) - T(computed) (its marginal time; T is the
        prefill formula, evaluated once for every prompt, and T(0) is a pure pass's fixed cost)
        plus its share of the step overheads: the decode iteration where requests decode
        (mixed steps), the pass's p0 where nothing does (pure prefill steps, until an idle
        instance's first prompt completes). A prompt arriving mid-tick joins the next step.

        Returns:
            The requests whose last chunk completed (they sampled a token), when they start
            decoding, the marginal prefill seconds mixed into their instance's steps after
            that, the marginal prefill seconds of every slot in the tick, and per slot the KV
            and count of the requests still prefilling.
        """
        r = self.req
        pf, ps, starts, lens, u, total, x, q_tok, q_slot = kernels.order_prefill(
            pf, r["slot"], r["admit_seq"], r["input_tokens"], r["done_tokens"], r["prefill_left"])
        t = model.prefill_time_s(q_tok, q_slot)
        comp, ready, after, work_slot, kv_pf, n_pf = kernels.chunked_prefill(
            pf, ps, starts, lens, u, total, x, t, n_dec, self.iter_s, r["arrival_s"],
            float(self.max_prefill_tokens), t0_s, dt_s, self.n_slots, float(BLOCK_TOKENS),
            r["prefill_left"], r["first_token_s"], r["done_tokens"], load.prefill_tokens,
            load.prefill_busy_s)
        load.tokens_generated += float(len(comp))
        return comp, ready, after, work_slot, kv_pf, n_pf

    def _prefill_serial(self, pf, n_dec, t0_s, dt_s, model, load):
        """`_prefill` for serial prefill: one whole pass per prompt, decoding stalled meanwhile.

        Same returns as `_prefill`.
        """
        r = self.req
        n = self.n_slots
        t1 = t0_s + dt_s
        # Chain order and each prompt's total and remaining tokens, as chunked prefill has them.
        pf, ps, starts, lens, u, total, x, _, _ = kernels.order_prefill(
            pf, r["slot"], r["admit_seq"], r["input_tokens"], r["done_tokens"], r["prefill_left"])
        # The rest of each prompt's pass (a pass straddling ticks left x of its total tokens).
        w = model.prefill_time_s(total, ps) * (x / np.maximum(total, 1.0))
        # Between passes of up to the budget, one decode iteration where requests decode.
        o_u = np.where(n_dec[u] > 0, self.iter_s[u], 0.0)
        o = np.repeat(o_u, lens)
        share = o * np.minimum(x / self.max_prefill_tokens, 1.0)
        # A prompt arriving mid-tick is admitted at its instance's next step (half an iteration).
        arrival = r["arrival_s"][pf]
        start = np.where(arrival > t0_s, arrival + 0.5 * o, t0_s)
        svc = share + w
        fin, begin, complete, frac = kernels.chain_schedule(start, svc, starts, lens, t0_s, t1)
        prog = x * frac
        work = w * frac  # pass time run in this tick: decoding stalls for all of it
        work_slot = np.bincount(ps, weights=work, minlength=n)
        # Prefill power: each pass at its own clock and draw (`clocks.serial_prefill` turns the
        # passes into the slot's mean); the mean prompt stands in until then.
        load.prefill_tokens = (np.bincount(ps, weights=work * total, minlength=n)
                               / np.maximum(work_slot, 1e-12))
        ran = work > 0
        load.prefill_passes = (ps[ran], total[ran].astype(np.float64), work[ran])
        load.prefill_busy_s = np.minimum(work_slot, dt_s)
        # The first token comes out of the pass, before the step's decode iteration. Prompts
        # left in progress keep their KV reservation.
        comp, ready, after, kv_pf, n_pf = kernels.settle_prefill(
            pf, ps, starts, lens, x, prog, total, complete, work, work_slot, begin + w, n,
            float(BLOCK_TOKENS), r["prefill_left"], r["first_token_s"], r["done_tokens"])
        load.tokens_generated += float(len(comp))
        return comp, ready, after, work_slot, kv_pf, n_pf

    # ------------------------------------------------------------------ KV cache
    def _preempt(self, now_s: float, model: SlotModel) -> None:
        """Preempt the newest running requests of every instance whose KV outgrew its memory."""
        r = self.req
        n = self.n_slots
        over = self._kv_used - model.kv_capacity_tokens
        seq = r["admit_seq"]
        slot = r["slot"]
        run = np.flatnonzero((seq >= 0) & (over[np.maximum(slot, 0)] > 0))
        c, cs = run, slot[run]
        ch = _held_kv(r, c)
        order = np.lexsort((-seq[c], cs))  # newest first within each instance
        c, cs, ch = c[order], cs[order], ch[order]
        starts, lens = kernels.runs(cs)
        cum = np.cumsum(ch)
        freed_before = cum - ch - np.repeat(cum[starts] - ch[starts], lens)
        hit = freed_before < over[cs]
        out = c[hit]
        self._kv_used = self._kv_used - np.bincount(cs[hit], weights=ch[hit], minlength=n)
        self._n_running = self._n_running - np.bincount(cs[hit], minlength=n)
        r["queue_key"][out] = seq[out] - _PREEMPTED_KEY_OFFSET
        r["admit_seq"][out] = -1.0
        r["prefill_left"][out] = 0.0
        r["wait_since_s"][out] = now_s
        self._preemptions += len(out)

    def _drop_stale(self, now_s: float, acc: ServiceAccumulator) -> None:
        r = self.req
        if self.in_flight == 0:
            return
        stale = kernels.stale_requests(r["wait_since_s"], r["admit_seq"],
                                       now_s - self.drop_after_s)
        if len(stale):
            acc.dropped += len(stale)
            self._remove(stale)

    def _remove(self, idx: np.ndarray) -> None:
        keep = np.ones(self.in_flight, dtype=bool)
        keep[idx] = False
        for k in self.req:
            self.req[k] = self.req[k][keep]


def _held_kv(r: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """KV tokens a running request holds (or needs to be admitted): context plus one block."""
    return r["input_tokens"][idx] + r["done_tokens"][idx] + float(BLOCK_TOKENS)
