"""`llm-cluster derive-slos`: a scenario's latency SLOs derived from the simulator's physics.

Usage::

    llm-cluster derive-slos --scenario small

Prints the derivation (`llm_cluster_gym.envs.sim.slo_derivation`: 5x the uncontended latency of
the scenario's fastest TP choice at the maximum clock; TTFT from the pool's P90 prompt, TBT from a
lone request's decode iteration) as the comment block that heads the ``serving:`` section of the
shipped scenarios, the pool lines' SLO values, whether the file's values agree, and as its last
line a JSON object ``{"scenario": ..., "pools": [{"pool", "slo_ttft_s", "slo_tbt_s", ...}],
"file_agrees": ...}``. A scenario that cannot be loaded exits 2 with one line naming it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass
class DeriveSlosArgs:
    """Derive a scenario's TTFT and TBT SLOs from the physics (the rule its files cite)."""

    scenario: str = "small"
    """Shipped scenario name or path to a scenario YAML file."""


def run(args: DeriveSlosArgs, command: str = "llm-cluster derive-slos") -> int:
    """Print the derivation; returns 0 (the file's agreement is reported, not enforced)."""
    from llm_cluster_gym.envs.sim.scenario import load_scenario
    from llm_cluster_gym.envs.sim.slo_derivation import derivation_comment, derive_slos

    s = load_scenario(args.scenario)
    slos = derive_slos(s)
    print(derivation_comment(s, slos))
    agrees = True
    for x, pool in zip(slos, s.serving.pools, strict=True):
        ok = (pool.slo_ttft_s, pool.slo_tbt_s) == (x.slo_ttft_s, x.slo_tbt_s)
        agrees &= ok
        print(f"pool {x.pool}: slo_ttft_s: {x.slo_ttft_s:g}, slo_tbt_s: {x.slo_tbt_s:g}"
              f"{'' if ok else f'  (file: {pool.slo_ttft_s:g}, {pool.slo_tbt_s:g})'}")
    print(json.dumps({"scenario": s.name, "pools": [asdict(x) for x in slos], "file_agrees": agrees}))
    return 0
