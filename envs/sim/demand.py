"""Turn a scenario's workload section into the request trace of one episode."""

from __future__ import annotations

import numpy as np

from llm_cluster_gym.envs.sim.scenario import Scenario, WorkloadSpec
from llm_cluster_gym.envs.sim.week_trace import week_trace
from llm_cluster_gym.envs.sim.workload import (
    DEFAULT_POOLS,
    LengthPools,
    Trace,
    add_spike,
    diurnal_trace,
    is_week_trace,
    resolve_trace,
    scale_to_rate,
)

POOL_SETS: dict[str, LengthPools] = {
    "default": DEFAULT_POOLS,
    "by_input": LengthPools(input_edges=DEFAULT_POOLS.input_edges, output_edges=(),
                            names=("S", "M", "L")),
    "single": LengthPools(input_edges=(), output_edges=(), names=("all",)),
}


def pools_for(name: str) -> LengthPools:
    """The named length-pool set (`default` 3x3, `by_input` 3, `single` 1)."""
    if name not in POOL_SETS:
        raise ValueError(f"unknown pool set {name!r}; known: {sorted(POOL_SETS)}")
    return POOL_SETS[name]


def episode_trace(
    scenario: Scenario,
    n_saas_gpus: int,
    spikes: list[tuple[float, float, float]],
    rng: np.random.Generator,
) -> Trace:
    """The arrivals of one episode: the scenario's trace at its target rate, shaped and spiked.

    A 2024 week trace (`workload.WEEK_TRACES`) is generated for the episode
    (`week_trace.week_trace`): the week's stretch from `workload.start_s`, or from a uniform
    random point of `[start_s, start_s + window_s - duration_s]` when a window is given, at a
    rate whose mean over the whole week is the target (so a busy day stays busier than a quiet
    one). Any other trace is replayed at the target rate (`scale_to_rate`) or made diurnal.
    """
    w = scenario.workload
    target_rps = w.rps_per_gpu * n_saas_gpus
    if target_rps > 0 and w.diurnal is None and is_week_trace(w.trace):
        start_s = w.start_s
        if w.window_s is not None and w.window_s > scenario.duration_s:
            start_s += float(rng.uniform(0.0, w.window_s - scenario.duration_s))
        return _spiked(week_trace(w.trace, start_s, scenario.duration_s, rng, mean_rps=target_rps),
                       w, spikes, rng)
    base = resolve_trace(w.trace)
    if w.start_s > 0 or w.window_s is not None:
        window_s = base.duration_s - w.start_s if w.window_s is None else w.window_s
        base = base.window(w.start_s, window_s)
    if target_rps <= 0:
        trace = Trace(np.zeros(0), np.zeros(0), np.zeros(0), scenario.duration_s, "empty",
                      "synthetic: no load")
    elif w.diurnal is not None:
        d = w.diurnal
        trace = diurnal_trace(scenario.duration_s, target_rps, d.peak_to_mean, d.period_s,
                              d.phase_s, base, rng)
    else:
        trace = scale_to_rate(base, target_rps, rng, duration_s=scenario.duration_s)
    return _spiked(trace, w, spikes, rng)


def _spiked(trace: Trace, w: WorkloadSpec, spikes: list[tuple[float, float, float]],
            rng: np.random.Generator) -> Trace:
    """`trace` with the scenario's load spikes and the extra `spikes` added (in that order)."""
    windows = [(sp.start_s, sp.duration_s, sp.multiplier) for sp in w.spikes] + list(spikes)
    for start_s, duration_s, multiplier in windows:
        if start_s >= trace.duration_s:
            continue  # the spike lies past this (shortened) episode
        duration_s = min(duration_s, trace.duration_s - start_s)
        trace = add_spike(trace, start_s, duration_s, multiplier, rng)
    return trace
