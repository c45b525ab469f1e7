"""Per-request SLO classes by prompt length (`serving.slo_classes`).

DynamoLLM judges every scheme by per-request-type SLOs: a short prompt must meet a short
prompt's TTFT whichever pool serves it. A scenario without classes judges each request by its
pool's SLOs (`serving.pools[i].slo_ttft_s`); with classes, both serving models judge each
request by its class's SLOs. Classes split prompts by the rule of the length pools
(`workload.LengthPools.assign`): class i holds ``bound[i-1] <= input tokens < bound[i]``, the
last class everything longer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from llm_cluster_gym.envs.sim.scenario import ScenarioError, ServingSpec, SloClassSpec


@dataclass(frozen=True)
class SloClasses:
    """The classes of a scenario, as arrays the serving models index.

    Attributes:
        input_edges: Each class's exclusive upper prompt bound but the last's, increasing (tokens).
        slo_ttft_s: Time-to-first-token SLO per class (s).
        slo_tbt_s: Time-between-tokens SLO per class (s).
    """

    input_edges: tuple[int, ...]
    slo_ttft_s: np.ndarray
    slo_tbt_s: np.ndarray

    @classmethod
    def from_serving(cls, serving: ServingSpec) -> SloClasses | None:
        """The scenario's classes, or None when it lists none (requests judged by their pool)."""
        specs = serving.slo_classes
        if not specs:
            return None
        return cls(tuple(int(c.input_tokens_below) for c in specs[:-1]),
                   np.array([c.slo_ttft_s for c in specs]), np.array([c.slo_tbt_s for c in specs]))

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.slo_ttft_s)

    def assign(self, input_tokens: np.ndarray) -> np.ndarray:
        """The class (int64) of each prompt length: `LengthPools.assign`'s rule on the input edges."""
        return np.searchsorted(np.asarray(self.input_edges), input_tokens, side="right").astype(np.int64)


def classes_of_input_pools(serving: ServingSpec, pool_set: str) -> tuple[SloClassSpec, ...]:
    """The SLO classes a pool set split by input length defines: its edges, its pools' SLOs.

    DynamoLLM's request types are its pools: judged by these classes, a scenario that pools
    requests by input length (`by_input`) scores exactly as with its pools' SLOs, and a
    scenario that serves the same requests in fewer pools is held to the same per-type SLOs.
    The edges are the pool set's own (`demand.POOL_SETS`), never restated.

    Raises:
        ScenarioError: The pool set also splits by output length, or `serving.pools` does not
            list one entry per pool of the set.
    """
    from llm_cluster_gym.envs.sim.demand import pools_for

    pools = pools_for(pool_set)
    if pools.output_edges:
        raise ScenarioError(f"pool set {pool_set!r} splits by output length too "
                            f"({list(pools.output_edges)}); SLO classes are by prompt length only")
    if len(serving.pools) != pools.n_pools:
        raise ScenarioError(f"field 'serving.pools' lists {len(serving.pools)} pools; pool set "
                            f"{pool_set!r} has {pools.n_pools}")
    bounds = [*pools.input_edges, None]
    return tuple(SloClassSpec(b, p.slo_ttft_s, p.slo_tbt_s)
                 for b, p in zip(bounds, serving.pools, strict=True))


def with_input_pool_classes(serving: ServingSpec, pool_set: str) -> ServingSpec:
    """`serving` judging every request by `classes_of_input_pools(serving, pool_set)`."""
    return dataclasses.replace(serving, slo_classes=classes_of_input_pools(serving, pool_set))


@dataclass(frozen=True)
class ClassMix:
    """How each pool's requests split into SLO classes (what a pool's finishing cohort mixes).

    Attributes:
        share: (pools, classes) share of each pool's requests in each class (rows sum to 1; a
            pool without requests is all zeros).
        mean_input_tokens: (pools, classes) mean prompt of each class within each pool (1 where
            the class is empty).
        p90_input_tokens: (pools, classes) 90th-percentile prompt, likewise.
    """

    share: np.ndarray
    mean_input_tokens: np.ndarray
    p90_input_tokens: np.ndarray


def class_mix(input_tokens: np.ndarray, pool: np.ndarray, n_pools: int, classes: SloClasses) -> ClassMix:
    """The `ClassMix` of requests with these prompt lengths and pools."""
    k = classes.n_classes
    cls = classes.assign(input_tokens)
    share, mean_in, p90_in = np.zeros((n_pools, k)), np.ones((n_pools, k)), np.ones((n_pools, k))
    for p in range(n_pools):
        in_pool = pool == p
        n = np.count_nonzero(in_pool)
        for c in range(k):
            sel = in_pool & (cls == c)
            if n and sel.any():
                share[p, c] = np.count_nonzero(sel) / n
                mean_in[p, c] = input_tokens[sel].mean()
                p90_in[p, c] = np.percentile(input_tokens[sel], 90)
    return ClassMix(share, mean_in, p90_in)


@lru_cache(maxsize=16)
def trace_class_mix(trace_name: str, pool_set: str, input_edges: tuple[int, ...]) -> ClassMix:
    """`class_mix` of a whole source trace split into the named pool set (cached).

    The statistics a controller may know from the operator's request history, as
    `description.trace_pool_stats` gives them per pool.
    """
    from llm_cluster_gym.envs.sim.demand import pools_for
    from llm_cluster_gym.envs.sim.workload import resolve_trace

    pools = pools_for(pool_set)
    trace = resolve_trace(trace_name)
    pid = pools.assign(trace.input_tokens, trace.output_tokens)
    k = len(input_edges) + 1
    classes = SloClasses(input_edges, np.zeros(k), np.zeros(k))
    return class_mix(trace.input_tokens, pid, pools.n_pools, classes)
