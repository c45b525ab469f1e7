"""What the simulated datacenter tells a controller about itself (`SimCluster.describe`).

The description is built from the scenario: server power constants, the thermal fit, the
served model's profiles per TP degree, the request-length statistics of the scenario's source
trace (the operator's request history) and, as an explicit cheat for the hindsight oracle, the
true future arrival rates of the episode's trace.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from llm_cluster_gym.envs.backend import BackendDescription, PoolStats, ServerPowerSpec, TickHistory

if TYPE_CHECKING:
    from llm_cluster_gym.envs.sim.cluster import SimCluster, TickRecord


def describe_sim(cluster: SimCluster) -> BackendDescription:
    """The static description of `cluster` (its scenario, models and request history)."""
    s = cluster.scenario
    spec = s.datacenter.server
    return BackendDescription(
        layout=cluster.layout,
        server=ServerPowerSpec(spec.gpus, spec.max_power_w, spec.gpu_tdp_w, spec.overhead_idle_w,
                               spec.standby_w, spec.wake_latency_s, s.datacenter.idle_to_off_s,
                               spec.overhead_max_w),
        thermal=cluster.thermal,
        pool_stats=trace_pool_stats(s.workload.trace, s.workload.pools),
        profiles_by_tp=dict(cluster.tp_profiles),
        scenario_name=str(s.name),
        gpu_hour_usd=float(s.gpu_hour_usd or 0.0),
        episode_intervals=int(cluster.n_intervals),
        slowdown_temp_c=float(cluster.thermal.slowdown_temp_c),
        arrival_oracle=lambda t0_s, horizon, interval_s: future_arrival_rates(
            cluster, t0_s, horizon, interval_s),
    )


@lru_cache(maxsize=16)
def trace_pool_stats(trace_name: str, pool_set: str) -> PoolStats:
    """Pool statistics of a whole source trace split into the named pool set (cached)."""
    from llm_cluster_gym.envs.sim.demand import pools_for
    from llm_cluster_gym.envs.sim.workload import resolve_trace

    pools = pools_for(pool_set)
    trace = resolve_trace(trace_name)
    pid = pools.assign(trace.input_tokens, trace.output_tokens)
    n = pools.n_pools
    frac, mean_in, p90_in, mean_out = (np.zeros(n) for _ in range(4))
    for p in range(n):
        sel = pid == p
        if not sel.any():
            frac[p], mean_in[p], p90_in[p], mean_out[p] = 0.0, 1.0, 1.0, 1.0
            continue
        frac[p] = sel.mean()
        mean_in[p] = trace.input_tokens[sel].mean()
        p90_in[p] = np.percentile(trace.input_tokens[sel], 90)
        mean_out[p] = trace.output_tokens[sel].mean()
    for arr in (frac, mean_in, p90_in, mean_out):
        arr.flags.writeable = False  # shared by every description of the same trace
    return PoolStats(frac, mean_in, p90_in, mean_out, float(trace.input_tokens.mean()))


def future_arrival_rates(cluster: SimCluster, t0_s: float, horizon: int,
                         interval_s: float) -> np.ndarray:
    """True arrival rate per pool (req/s) of `horizon` intervals from `t0_s` in this episode."""
    n_pools = cluster.pools.n_pools
    edges = t0_s + interval_s * np.arange(horizon + 1)
    pos = np.searchsorted(cluster.trace.arrival_s, edges, side="left")
    rates = np.zeros((horizon, n_pools))
    for h in range(horizon):
        pool = cluster.trace_pool[pos[h]:pos[h + 1]]
        rates[h] = np.bincount(pool, minlength=n_pools) / interval_s
    return rates


def tick_history(record: TickRecord, n_rows: int, n_aisles: int) -> TickHistory | None:
    """The per-tick record as arrays (None when no tick was recorded)."""
    if not record.time_s:
        return None

    def stack(xs: list[np.ndarray], width: int) -> np.ndarray:
        return np.vstack(xs) if xs else np.zeros((0, width))

    return TickHistory(
        time_s=np.asarray(record.time_s, dtype=float),
        row_power_w=stack(record.row_power_w, n_rows),
        row_power_avg_w=stack(record.row_power_avg_w, n_rows),
        row_limit_w=stack(record.row_limit_w, n_rows),
        aisle_inlet_c=stack(record.aisle_inlet_c, n_aisles),
        max_gpu_temp_c=np.asarray(record.max_gpu_temp_c, dtype=float),
    )
