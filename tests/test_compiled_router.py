"""The compiled request router (`envs.sim.routing`, numba) against the numpy formulation it replaced.

The router water-fills each pool's new requests over its instances by weight, rounds the shares
to whole requests by largest remainder and deals them round robin. It was whole-array numpy; it
is now compiled loops that promise the same bits. The reference below is that numpy formulation
(written out here, not imported: the library no longer has it), and hypothesis draws the inputs.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_cluster_gym.envs.sim.compiled import pairwise_sum
from llm_cluster_gym.envs.sim.routing import integer_split, route_arrivals, water_fill


def ref_water_fill(outstanding: np.ndarray, weight: np.ndarray, n_new: float) -> np.ndarray:
    share = np.zeros(len(outstanding))
    ok = weight > 0
    if n_new <= 0 or not ok.any():
        return share
    o, w = outstanding[ok], weight[ok]
    level_at = o / w
    order = np.argsort(level_at, kind="stable")
    lv, ws, os_ = level_at[order], w[order], o[order]
    cum_w, cum_o = np.cumsum(ws), np.cumsum(os_)
    placed_at = cum_w * lv - cum_o
    j = max(int(np.searchsorted(placed_at, n_new, side="right")) - 1, 0)
    level = (n_new + cum_o[j]) / cum_w[j]
    s = np.maximum(level * w - o, 0.0)
    s *= n_new / s.sum()
    share[np.flatnonzero(ok)] = s
    return share


def ref_integer_split(share: np.ndarray, n: int) -> np.ndarray:
    base = np.floor(share).astype(np.int64)
    rest = n - int(base.sum())
    if rest > 0:
        frac = share - base
        pos = np.flatnonzero(frac > 0)
        if rest <= len(pos):
            base[pos[np.argsort(-frac[pos], kind="stable")[:rest]]] += 1
        else:
            base[np.argsort(-frac, kind="stable")[:rest]] += 1
    elif rest < 0:
        base[np.argsort(-base, kind="stable")[: -rest]] -= 1
    return base


def ref_route(slot, pool, unrouted, outstanding, weight, capacity, inst_pool) -> None:
    pools = pool[unrouted]
    for p in np.unique(pools):
        members = unrouted[pools == p]
        in_pool = inst_pool == p
        cand = weight * in_pool
        if not (cand > 0).any():
            cand = weight
            if not (cand > 0).any():
                cand = capacity * in_pool
                if not (cand > 0).any():
                    cand = capacity
        counts = ref_integer_split(ref_water_fill(outstanding, cand, float(len(members))),
                                   len(members))
        took = np.flatnonzero(counts)
        counts = counts[took]
        target = np.repeat(took, counts)
        position = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        slot[members] = target[np.argsort(position, kind="stable")]
        outstanding[took] += counts


# Outstanding work is whole requests; weights are a routing level (0-1) x a batch cap.
counts_st = st.lists(st.integers(0, 300), min_size=1, max_size=300)
levels = st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=0, max_size=700))
def test_sum_follows_numpys_order_bit_for_bit(values):
    a = np.asarray(values, dtype=float)
    assert pairwise_sum(a) == a.sum()


@settings(max_examples=300, deadline=None)
@given(st.data(), counts_st, st.integers(0, 2000))
def test_water_fill_and_rounding_match_the_numpy_formulation(data, outstanding, n_new):
    o = np.asarray(outstanding, dtype=float)
    level = np.asarray(data.draw(st.lists(levels, min_size=len(o), max_size=len(o))))
    w = level * data.draw(st.sampled_from([64.0, 128.0, 256.0]))
    share = water_fill(o, w, float(n_new))
    np.testing.assert_array_equal(share, ref_water_fill(o, w, float(n_new)))
    counts = integer_split(share, n_new)
    np.testing.assert_array_equal(counts, ref_integer_split(share, n_new))
    if (w > 0).any():
        assert counts.sum() == n_new and (counts >= 0).all()
        assert (counts[w == 0] == 0).all()
        assert np.all(np.abs(counts - share) < 1.0)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.integers(1, 40), st.integers(1, 4), st.integers(0, 600))
def test_routing_matches_the_numpy_formulation(data, n_slots, n_pools, n_requests):
    inst_pool = np.asarray(data.draw(st.lists(st.integers(-1, n_pools - 1), min_size=n_slots,
                                              max_size=n_slots)), dtype=np.int64)
    serving = np.asarray(data.draw(st.lists(st.booleans(), min_size=n_slots, max_size=n_slots)))
    serving &= inst_pool >= 0
    if not serving.any():
        serving[0], inst_pool[0] = True, 0
    max_batch = np.asarray(data.draw(st.lists(st.sampled_from([64, 128, 256]), min_size=n_slots,
                                              max_size=n_slots)), dtype=np.int64)
    route_weight = np.asarray(data.draw(st.lists(levels, min_size=n_slots, max_size=n_slots)))
    weight = np.where(serving, route_weight * max_batch, 0.0)
    capacity = np.where(serving, max_batch, 0).astype(float)
    pool = np.asarray(data.draw(st.lists(st.integers(0, n_pools - 1), min_size=n_requests,
                                         max_size=n_requests)), dtype=np.int64)
    routed_before = np.asarray(data.draw(st.lists(st.booleans(), min_size=n_requests,
                                                  max_size=n_requests)), dtype=bool)
    live = np.flatnonzero(serving)
    slot0 = np.where(routed_before, live[np.arange(n_requests) % len(live)], -1).astype(np.int64)
    unrouted = np.flatnonzero(slot0 < 0)
    if len(unrouted) == 0:
        return
    outstanding = np.bincount(slot0[slot0 >= 0], minlength=n_slots).astype(float)
    got, want = slot0.copy(), slot0.copy()
    out_got, out_want = outstanding.copy(), outstanding.copy()
    route_arrivals(got, pool, unrouted, out_got, weight, capacity, inst_pool)
    ref_route(want, pool, unrouted, out_want, weight, capacity, inst_pool)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(out_got, out_want)
    # Every request lands on a live instance, of its own pool wherever that pool has one.
    assert (got >= 0).all() and serving[got].all()
    for p in np.unique(pool[unrouted]):
        own = serving & (inst_pool == p) & (weight > 0)
        if own.any():
            assert own[got[unrouted[pool[unrouted] == p]]].all()


@given(st.integers(0, 2**32 - 1), st.integers(0, 400), st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_request_table_scans_match_their_numpy_formulation(seed, n, n_slots):
    """The request-level tick's scans of its request table: routing, waiting, engine, stale."""
    from llm_cluster_gym.envs.sim import serving_request_kernels as rk

    rng = np.random.default_rng(seed)
    slot = rng.integers(-1, n_slots, n)
    admit_seq = np.where(rng.random(n) < 0.5, -1.0, rng.integers(0, 99, n).astype(float))
    left = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0, 900, n))
    wait_since = rng.uniform(0, 100, n)
    outstanding, unrouted = rk.route_scan(slot, n_slots)
    np.testing.assert_array_equal(
        outstanding, np.bincount(slot[slot >= 0], minlength=n_slots).astype(float))
    np.testing.assert_array_equal(unrouted, np.flatnonzero(slot < 0))
    np.testing.assert_array_equal(rk.waiting_requests(admit_seq, slot),
                                  np.flatnonzero((admit_seq < 0) & (slot >= 0)))
    pf, dec = rk.engine_split(left, admit_seq)
    np.testing.assert_array_equal(pf, np.flatnonzero(left > 0))
    np.testing.assert_array_equal(dec, np.flatnonzero((left == 0) & (admit_seq >= 0)))
    np.testing.assert_array_equal(rk.stale_requests(wait_since, admit_seq, 50.0),
                                  np.flatnonzero((wait_since < 50.0) & (admit_seq < 0)))
