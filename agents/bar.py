"""The figures of issue 20's bar, measured on today's agents (`bench/control_quality.py` prints them).

* `energy_agent_bar`: the residual energy agent, inside the safety shield, on the held-out days of
  the 2024 week (`dynamo_week`, aggregate model, the DynamoLLM week protocol of
  `scripts.dynamo_week`), against every rule-based and fixed policy that protocol runs
  (SinglePool, MultiPool static, the best fixed layout, the DynamoLLM-style manager). Per
  (day, seed) unit the best rule is the one with the least energy among those meeting the SLO
  attainment target; the ratio agent / best rule and the agent's SLO attainment are averaged over
  a day's seeds, then given as mean and 95% t-interval over days.
* `override_rate`: the share of intervals in which the shield replaced the shipped thermal
  agent's action (`Shield.override_rate`), per seed on the thermal evaluation scenario;
  `thermal_agent_bar` adds its throttled and capped GPU-seconds, VM-hours waiting and hosted,
  energy and SLO attainment against the TAPAS-style controller with and without the shield
  (`agents.train_residual_thermal.evaluate_residual_thermal`).
* `transfers`: whether each shipped checkpoint builds and acts on every scenario size of its task.
* `vector_env_steps_per_s`: env steps per second of `gymnasium.make_vec` over 64 copies of the
  energy env (its batched copies, `envs.vector_env`: what `train --batched` rolls out on).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SLO_TARGET = 0.99
"""SLO attainment a policy must reach to count as a baseline the agent is held against."""

TRANSFER_SCENARIOS = {"energy": ("small", "medium", "large", "dynamo_week"),
                      "thermal": ("small_tapas", "small_tapas_high", "medium", "large", "tapas_dc")}
"""Scenario sizes each task's checkpoints must run on (the small ones stay for the tests)."""

SHIPPED = {"checkpoints/residual_energy": "energy", "checkpoints/residual_thermal": "thermal"}
"""The shipped agents and their task (what the main job, the evaluation plans and this bar judge)."""
EARLIER = {"checkpoints/energy": "energy", "checkpoints/thermal": "thermal"}
"""The agents trained from scratch on one layout before issue 20 (kept for comparison; their
spaces depend on the layout, so they do not transfer)."""


def energy_agent_bar(directory: str | Path = "checkpoints/residual_energy", days: Sequence[int] = (0, 2, 5),
                     seeds: Sequence[int] = (0, 1), hours: float = 24.0,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The residual agent (shielded) against the best rule-based or fixed policy meeting the SLO."""
    from llm_cluster_gym.agents.train_residual import BURN_IN_S, ResidualPolicy
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.controllers.shield import Shield
    from llm_cluster_gym.envs.sim.scenario import load_scenario
    from llm_cluster_gym.scripts.dynamo_week import (
        POLICIES,
        WeekArgs,
        _measure,
        day_scenario,
        evaluate_week,
        mean_ci95,
    )

    args = WeekArgs(days=tuple(days), seeds=tuple(seeds), policies=POLICIES, hours=hours)
    rule_runs, _ = evaluate_week(args, log)
    base = load_scenario(args.scenario)
    shields: list[Shield] = []

    def shielded(env: Any) -> Shield:
        shield = Shield(ResidualPolicy(directory, env), ControllerContext.from_env(env),
                        env.backend.telemetry)
        shields.append(shield)
        return shield

    rows = []
    for day in days:
        for seed in seeds:
            s = day_scenario(base, day, BURN_IN_S, hours * 3600.0)
            agent = _measure("residual", day, seed, s, shielded, BURN_IN_S, "shield(residual)")
            unit = [r for r in rule_runs if r.day == day and r.seed == seed]
            ok = [r for r in unit if r.summary["slo_attainment"] >= SLO_TARGET]
            best = min(ok, key=lambda r: r.summary["energy_kwh"]) if ok else None
            rows.append({
                "day": day, "seed": seed, "best_rule": None if best is None else best.policy,
                "rules": {r.policy: {"energy_kwh": r.summary["energy_kwh"],
                                     "slo_attainment": r.summary["slo_attainment"]} for r in unit},
                "agent_kwh": agent.summary["energy_kwh"],
                "agent_vs_best_rule_energy": (agent.summary["energy_kwh"] / best.summary["energy_kwh"]
                                              if best is not None else float("nan")),
                "agent_slo_attainment": agent.summary["slo_attainment"],
                "shield_override_rate": shields[-1].override_rate,
            })
            if log:
                log(f"day {day} seed {seed}: {rows[-1]}")
    summary = {}
    for key in ("agent_vs_best_rule_energy", "agent_slo_attainment", "shield_override_rate"):
        per_day = [float(np.mean([r[key] for r in rows if r["day"] == d])) for d in days]
        summary[key] = mean_ci95(per_day)
    return {"rows": rows, "summary": summary}


def override_rate(policy: str = "ckpt:checkpoints/residual_thermal", scenario: str = "small_tapas_high",
                  task: str = "thermal", seeds: Sequence[int] = (0, 1, 2)) -> list[float]:
    """Per seed, the share of intervals in which the shield replaced the policy's action."""
    from llm_cluster_gym.controllers.policy_spec import make_policy
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.rollout import run_episode

    rates = []
    for seed in seeds:
        env = ClusterEnv(task=task, scenario=scenario, serving_model="request")
        shield = make_policy(f"shield:{policy}", env, seed, same_scenario=False)
        run_episode(env, shield, seed)
        rates.append(float(shield.override_rate))
    return rates


def thermal_agent_bar(directory: str | Path = "checkpoints/residual_thermal",
                      log: Callable[[str], None] | None = None, jobs: int = 1) -> dict[str, Any]:
    """The shipped thermal agent (shielded) against TAPAS with and without the shield, paired.

    `jobs` processes run the evaluation's units (`evaluate_residual_thermal`).
    """
    from llm_cluster_gym.agents.train_residual_thermal import evaluate_residual_thermal

    return evaluate_residual_thermal(directory, jobs=jobs, log=log)


def _acts_on(directory: str, task: str, scenario: str, steps: int = 3) -> str:
    """'ok' when the checkpoint builds and acts `steps` intervals on the scenario, else the error."""
    from llm_cluster_gym.controllers.policy_spec import make_policy
    from llm_cluster_gym.envs.cluster_env import ClusterEnv

    try:
        env = ClusterEnv(task=task, scenario=scenario, serving_model="aggregate")
        policy = make_policy(f"ckpt:{directory}", env, same_scenario=False)
        obs, _ = env.reset(seed=0)
        for _ in range(steps):
            mask = env.action_masks() if hasattr(env, "action_masks") else None
            obs, *_ = env.step(policy.act(obs, mask))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the error is the answer: why it does not transfer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def transfers(checkpoints: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Per checkpoint and scenario size of its task: 'ok' or why it did not run.

    ``checkpoints`` maps a directory to its task (default: the shipped ones).
    """
    out = {}
    for directory, task in (checkpoints or SHIPPED).items():
        if not Path(directory).exists():
            continue
        out[directory] = {sc: _acts_on(directory, task, sc) for sc in TRANSFER_SCENARIOS[task]}
    return out


def vector_env_steps_per_s(env_id: str = "LLMCluster/Energy-small-v0", num_envs: int = 64,
                           seconds: float = 5.0, vectorization_mode: str | None = None) -> float:
    """Env steps per second (all copies counted) of `gymnasium.make_vec` under random actions.

    The default mode is the id's own: its batched copies where it has a vector entry point
    (`envs.vector_env`), else Gymnasium's sync vector env.
    """
    import gymnasium as gym

    import llm_cluster_gym  # noqa: F401 - registers the env ids

    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=vectorization_mode)
    try:
        envs.reset(seed=0)
        rng = np.random.default_rng(0)
        nvec = envs.single_action_space.nvec
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            actions = (rng.random((num_envs, len(nvec))) * nvec).astype(np.int64)
            envs.step(actions)
            steps += num_envs
        return steps / (time.perf_counter() - start)
    finally:
        envs.close()
