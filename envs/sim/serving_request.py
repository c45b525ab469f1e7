"""Request-level serving: continuous batching with per-request TTFT and TBT.

Every live request is a row in a struct of numpy arrays; each tick routes new arrivals, admits
waiting requests into batches (FIFO, bounded by the batch cap and KV-cache memory), runs their
prefill passes one after another, then spends the rest of the tick in decode iterations whose
duration comes from the profile tables. Nothing in the hot path loops over requests in Python.

Timing conventions: a request's TTFT is from its arrival to the end of its prefill (its first
token); its TBT is the wall time between its first and last token divided by the tokens in
between, so prefill stalls of its instance show up in its TBT, as they do on a real server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.routing import integer_split, water_fill
from llm_cluster_gym.envs.sim.serving import ServiceAccumulator, TickLoad

_FIELDS = {
    "arrival_s": np.float64,
    "input_tokens": np.int64,
    "output_tokens": np.int64,
    "pool": np.int64,
    "slot": np.int64,
    "first_token_s": np.float64,
    "done_tokens": np.float64,
    "decode_wall_s": np.float64,
}


@dataclass
class SlotModel:
    """Per-slot timing inputs for one tick, gathered by the cluster from the profile tables."""

    prefill_time_s: object  # callable(tokens, slot_idx) -> seconds per request prefill
    decode_iter_time_s: object  # callable(batch, ctx, slot_idx) -> seconds per iteration
    kv_capacity_tokens: np.ndarray


class RequestLevelServing:
    """Continuous-batching serving of individual requests across the instance table."""

    def __init__(self, n_slots: int, n_pools: int, max_prefill_tokens: int, drop_after_s: float):
        self.n_slots = n_slots
        self.n_pools = n_pools
        self.max_prefill_tokens = max_prefill_tokens
        self.drop_after_s = drop_after_s
        self.reset()

    def reset(self) -> None:
        """Forget every request and backlog."""
        self.req = {k: np.zeros(0, dtype=t) for k, t in _FIELDS.items()}
        self.busy_until_s = np.zeros(self.n_slots)
        self.burst_prompt_tokens = np.zeros(self.n_slots)

    @property
    def in_flight(self) -> int:
        """Requests arrived and neither finished nor dropped."""
        return len(self.req["arrival_s"])

    def per_pool_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Waiting and running request counts per pool."""
        running = np.isfinite(self.req["first_token_s"])
        pool = self.req["pool"]
        waiting = np.bincount(pool[~running], minlength=self.n_pools)
        run = np.bincount(pool[running], minlength=self.n_pools)
        return waiting.astype(float), run.astype(float)

    def requeue(self, stopped_slots: np.ndarray) -> None:
        """Send the requests of stopped instances back to the router; their progress is lost."""
        if not stopped_slots.any() or self.in_flight == 0:
            return
        slot = self.req["slot"]
        hit = (slot >= 0) & stopped_slots[np.maximum(slot, 0)]
        self.req["slot"][hit] = -1
        self.req["first_token_s"][hit] = np.nan
        self.req["done_tokens"][hit] = 0.0
        self.req["decode_wall_s"][hit] = 0.0
        self.busy_until_s[stopped_slots] = 0.0
        self.burst_prompt_tokens[stopped_slots] = 0.0

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
            "decode_wall_s": np.zeros(n),
        }
        for k, t in _FIELDS.items():
            self.req[k] = np.concatenate([self.req[k], np.asarray(new[k], dtype=t)])

    def _route(self, serving: np.ndarray, inst: InstanceTable, route_weight: np.ndarray) -> None:
        slot = self.req["slot"]
        unrouted = np.flatnonzero(slot < 0)
        if len(unrouted) == 0 or not serving.any():
            return
        outstanding = np.bincount(slot[slot >= 0], minlength=self.n_slots).astype(float)
        weight = np.where(serving, route_weight * inst.max_batch, 0.0)
        pools = self.req["pool"][unrouted]
        capacity = np.where(serving, inst.max_batch, 0).astype(float)
        for p in np.unique(pools):
            members = unrouted[pools == p]
            cand = _first_nonempty(
                weight * (inst.pool == p),  # the pool's instances, by routing preference
                weight,  # no instance serves this pool: any preferred live instance takes it
                capacity * (inst.pool == p),  # every preferred row is empty: weights yield
                capacity,
            )
            share = water_fill(outstanding, cand, float(len(members)))
            counts = integer_split(share, len(members))
            target = np.repeat(np.arange(self.n_slots), counts)
            # Round-robin order across instances, so consecutive arrivals spread out.
            slot[members] = target[np.argsort(_interleave_key(counts), kind="stable")]
            outstanding += counts

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
        t1 = t0_s + dt_s
        n = self.n_slots
        load = TickLoad(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n))
        self._drop_stale(t0_s, acc)
        if self.in_flight == 0:
            return load
        self._route(serving, inst, route_weight)
        r = self.req
        slot = r["slot"]
        routed = slot >= 0
        live_slot = np.where(routed, slot, 0)
        on_serving = routed & serving[live_slot]
        running = np.isfinite(r["first_token_s"])
        # ---- admission: FIFO per instance under batch cap and KV memory -----------------
        waiting = np.flatnonzero(on_serving & ~running & (r["arrival_s"] < t1))
        if len(waiting):
            self._admit(waiting, t0_s, inst, model, running, load)
            running = np.isfinite(r["first_token_s"])
        prefill_end = np.clip(self.busy_until_s, t0_s, t1)
        load.prefill_busy_s = np.where(serving, prefill_end - t0_s, 0.0)
        # A burst of prefill passes can outlast the tick that admitted it; its later ticks
        # draw the power of the same prompts (not idle power).
        load.prefill_tokens = np.where(load.prefill_busy_s > 1e-9, self.burst_prompt_tokens, 0.0)
        # ---- decode: the rest of the tick, in iterations of profile-table length ----------
        eligible = np.flatnonzero(running & on_serving & (r["first_token_s"] < t1))
        if len(eligible):
            self._decode(eligible, t0_s, t1, prefill_end, model, load, slo_ttft_s, slo_tbt_s,
                         quality_loss_per_slot, acc)
        return load

    def _admit(self, waiting, t0_s, inst, model, running, load) -> None:
        r = self.req
        slot = r["slot"]
        s = slot[waiting]
        order = np.lexsort((r["arrival_s"][waiting], s))
        w = waiting[order]
        s = s[order]
        starts, group_len = _runs(s)
        group_start = np.repeat(starts, group_len)
        rank = np.arange(len(s)) - group_start
        run_idx = np.flatnonzero(running & (slot >= 0))
        run_slot = slot[run_idx]
        n_running = np.bincount(run_slot, minlength=self.n_slots)
        kv_used = np.bincount(
            run_slot,
            weights=r["input_tokens"][run_idx] + r["output_tokens"][run_idx],
            minlength=self.n_slots,
        )
        need = (r["input_tokens"][w] + r["output_tokens"][w]).astype(float)
        cum_need = np.cumsum(need)
        cum_need -= np.repeat(cum_need[starts] - need[starts], group_len)
        free_batch = inst.max_batch[s] - n_running[s]
        free_kv = model.kv_capacity_tokens[s] - kv_used[s]
        admit = (rank < free_batch) & (cum_need <= free_kv)
        # A request larger than a whole instance's KV memory can never be admitted; it waits
        # until `drop_after_s` and is counted as dropped.
        if not admit.any():
            return
        a = w[admit]
        a_slot = s[admit]
        tau = model.prefill_time_s(r["input_tokens"][a].astype(float), a_slot)
        cum_tau = np.cumsum(tau)
        a_starts, lens = _runs(a_slot)
        cum_tau -= np.repeat(cum_tau[a_starts] - tau[a_starts], lens)
        begin = np.maximum(self.busy_until_s[a_slot], t0_s)
        ready = begin + cum_tau
        r["first_token_s"][a] = np.maximum(ready, r["arrival_s"][a] + tau)
        r["done_tokens"][a] = 1.0
        last = a_starts + lens - 1
        self.busy_until_s[a_slot[last]] = ready[last]
        tok = np.bincount(a_slot, weights=r["input_tokens"][a], minlength=self.n_slots)
        cnt = np.bincount(a_slot, minlength=self.n_slots)
        self.burst_prompt_tokens = np.where(cnt > 0, tok / np.maximum(cnt, 1),
                                            self.burst_prompt_tokens)
        load.tokens_generated += float(len(a))

    def _decode(self, eligible, t0_s, t1, prefill_end, model, load, slo_ttft_s, slo_tbt_s,
                quality_loss_per_slot, acc) -> None:
        r = self.req
        s = r["slot"][eligible]
        ctx = r["input_tokens"][eligible] + r["done_tokens"][eligible]
        batch = np.bincount(s, minlength=self.n_slots).astype(float)
        ctx_mean = np.bincount(s, weights=ctx, minlength=self.n_slots) / np.maximum(batch, 1.0)
        active = batch > 0
        idx = np.flatnonzero(active)
        iter_s = np.zeros(self.n_slots)
        iter_s[idx] = model.decode_iter_time_s(batch[idx], ctx_mean[idx], idx)
        window_start = prefill_end
        window = t1 - window_start
        n_iter = np.where(active, window / np.maximum(iter_s, 1e-9), 0.0)
        # Wall time counts from the tick start (or the first token if later): a request that
        # already had its first token waited through this tick's prefill passes, as on a server.
        remaining = r["output_tokens"][eligible] - r["done_tokens"][eligible]
        gen = np.minimum(remaining, n_iter[s])
        finish = remaining <= n_iter[s] + 1e-9
        start_wall = np.maximum(r["first_token_s"][eligible], t0_s)
        end_wall = np.where(finish, window_start[s] + remaining * iter_s[s], t1)
        r["decode_wall_s"][eligible] += np.maximum(end_wall - start_wall, 0.0)
        r["done_tokens"][eligible] += gen
        busy = np.zeros(self.n_slots)
        np.maximum.at(busy, s, np.minimum(remaining * iter_s[s], window[s]))
        load.decode_busy_s = busy
        load.decode_batch = batch
        load.tokens_generated += float(gen.sum())
        if finish.any():
            done = eligible[finish]
            out = r["output_tokens"][done]
            ttft = r["first_token_s"][done] - r["arrival_s"][done]
            tbt = np.where(out > 1, r["decode_wall_s"][done] / np.maximum(out - 1, 1), 0.0)
            pool = r["pool"][done]
            acc.record_finished(
                ttft, tbt, slo_ttft_s[pool], slo_tbt_s[pool],
                quality_loss=quality_loss_per_slot[r["slot"][done]],
            )
            self._remove(done)

    def _drop_stale(self, now_s: float, acc: ServiceAccumulator) -> None:
        r = self.req
        if self.in_flight == 0:
            return
        stale = ~np.isfinite(r["first_token_s"]) & (now_s - r["arrival_s"] > self.drop_after_s)
        if stale.any():
            acc.dropped += int(stale.sum())
            self._remove(np.flatnonzero(stale))

    def _remove(self, idx: np.ndarray) -> None:
        keep = np.ones(self.in_flight, dtype=bool)
        keep[idx] = False
        for k in self.req:
            self.req[k] = self.req[k][keep]


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal adjacent keys (keys non-empty)."""
    change = np.empty(len(keys), dtype=bool)
    change[0] = True
    np.not_equal(keys[1:], keys[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    return starts, np.diff(starts, append=len(keys))


def _first_nonempty(*weights: np.ndarray) -> np.ndarray:
    """The first weight vector with a positive entry (routing falls back in this order)."""
    for w in weights:
        if (w > 0).any():
            return w
    return weights[-1]


def _interleave_key(counts: np.ndarray) -> np.ndarray:
    """Position of each assignment within its instance, so targets alternate across instances."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total) - np.repeat(starts, counts)
