"""Speed of the residual energy agent's training env: batched copies vs single envs (issue 20).

The residual agent trains on windows of the DynamoLLM week (`agents.train_residual`). Its single
env (`agents.residual.ResidualOverManager`) steps one `ClusterEnv` and asks its own
`DynamoController` every interval; the batched one (`agents.batched_residual.BatchedResidualVecEnv`)
steps N copies of a window on the batched simulator with `BatchedDynamoManager`. Both run here
in one process on the same 6-hour window (Monday 10:00, a training day, after the 30-minute
burn-in), with random offsets; figures are CPU seconds of this process:

* stepping: env steps per CPU second once the episode has started;
* episode start: CPU seconds to draw and bin every copy's trace and build the env, per copy
  (each copy draws the requests `SimCluster.reset` draws: about 10 million for this window);
* overall: steps per CPU second over a whole episode, the start included.

Last line: ``{"residual_steps_per_s_batched": ..., "residual_steps_per_s_single": ...,
"batched_over_single": ..., "episode_start_s_per_copy": ...,
"overall_steps_per_s_batched": ..., "overall_steps_per_s_single": ...,
"overall_batched_over_single": ...}``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import tyro

from llm_cluster_gym.agents.batched_residual import BatchedResidualVecEnv
from llm_cluster_gym.agents.residual import ResidualOverManager
from llm_cluster_gym.agents.train_residual import BURN_IN_S, MANAGER_KWARGS
from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.scripts.dynamo_week import DAY_S, make_env, window_scenario


@dataclass
class Args:
    """Residual env speed: batched vs single."""

    copies: int = 64
    """Batched copies."""
    steps: int = 200
    """Steps timed per env (after the start)."""


def main(args: Args) -> None:
    s = window_scenario(load_scenario("dynamo_week"), 1 * DAY_S + 10 * 3600.0, BURN_IN_S, 6 * 3600.0)
    episode = int(round((6 * 3600.0 + BURN_IN_S) / s.control_interval_s))
    rng = np.random.default_rng(0)
    batched = BatchedResidualVecEnv(args.copies, lambda: s, manager_kwargs=MANAGER_KWARGS)
    t0 = time.process_time()
    batched.start(s, list(range(args.copies)))
    start_batched = time.process_time() - t0
    t0 = time.process_time()
    for _ in range(args.steps):
        batched.step_async(rng.integers(0, 3, (args.copies, 3)))
        batched.step_wait()
    step_batched = args.copies * args.steps / (time.process_time() - t0)

    single = ResidualOverManager(make_env(s), manager_kwargs=MANAGER_KWARGS)
    t0 = time.process_time()
    single.reset(seed=0)
    start_single = time.process_time() - t0
    t0 = time.process_time()
    for _ in range(args.steps):
        single.step(rng.integers(0, 3, 3))
    step_single = args.steps / (time.process_time() - t0)

    def overall(start_s: float, per_s: float, copies: int) -> float:
        return copies * episode / (start_s + copies * episode / per_s)

    out = {
        "residual_steps_per_s_batched": round(step_batched, 1),
        "residual_steps_per_s_single": round(step_single, 1),
        "batched_over_single": round(step_batched / step_single, 2),
        "episode_start_s_per_copy": round(start_batched / args.copies, 3),
        "episode_start_s_single": round(start_single, 3),
        "overall_steps_per_s_batched": round(overall(start_batched, step_batched, args.copies), 1),
        "overall_steps_per_s_single": round(overall(start_single, step_single, 1), 1),
    }
    out["overall_batched_over_single"] = round(out["overall_steps_per_s_batched"]
                                               / out["overall_steps_per_s_single"], 2)
    print(f"window: {episode} steps per episode; {args.copies} copies")
    print(json.dumps(out))


if __name__ == "__main__":
    main(tyro.cli(Args))
