"""Decision latency of the live loop: telemetry read to action applied, and the policy alone.

Runs the live control loop (``controllers/live``) against the simulated backend as fast as
possible (the simulation's interval is not counted: only the time from the telemetry
snapshot to the backend's ``apply`` returning), with a shielded rule-based policy and the
power governor, for ``--steps`` decisions after ``--warmup``. Prints P50/P99 of the decision
latency, of the policy's ``act`` (shield included) and the loop's overhead per interval. The
last line is one JSON object; ``p50_ms``/``p99_ms`` are the decision latency.

Usage: ``python bench/decision_latency.py [--scenario small] [--policy dynamo] [--steps 300]``
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np


def main() -> None:
    """Run and print the figures."""
    from llm_cluster_gym.controllers.live import (
        DecisionLog,
        LiveLoop,
        PowerGovernor,
        build_policy,
        guarded_env,
    )
    from llm_cluster_gym.envs.cluster_env import ClusterEnv

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="small")
    p.add_argument("--task", default="energy")
    p.add_argument("--policy", default="dynamo")
    p.add_argument("--serving-model", default="aggregate")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    a = p.parse_args()
    env = guarded_env(ClusterEnv(task=a.task, scenario=a.scenario, serving_model=a.serving_model))
    policy, fallback = build_policy(a.policy, env, shield=True)
    dec_s: list[float] = []
    pol_s: list[float] = []
    t = time.perf_counter()
    seed = 0
    while len(dec_s) < a.steps + a.warmup:  # episodes until enough decisions
        loop = LiveLoop(env, policy, fallback, governor=PowerGovernor(), log=DecisionLog(None),
                        speed=math.inf)
        s = loop.run(seed=seed, max_steps=a.steps + a.warmup - len(dec_s))
        dec_s += s.decision_latency_s
        pol_s += s.policy_latency_s
        seed += 1
    wall = time.perf_counter() - t
    dec = np.array(dec_s[a.warmup:]) * 1e3
    pol = np.array(pol_s[a.warmup:]) * 1e3
    print(f"{a.scenario}/{a.task}, shield({a.policy}) + governor, {len(dec)} decisions, "
          f"{platform.processor() or platform.machine()}; wall {wall:.1f} s incl. simulation")
    out = {"policy_p50_ms": round(float(np.percentile(pol, 50)), 3),
           "policy_p99_ms": round(float(np.percentile(pol, 99)), 3),
           "p50_ms": round(float(np.percentile(dec, 50)), 3),
           "p99_ms": round(float(np.percentile(dec, 99)), 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
