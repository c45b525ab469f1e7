"""Digests of reference trajectories: every registered env id and every rule-based controller.

Shared by `record.py` (writes them) and `tests/test_golden.py` (compares them). A digest is a
SHA-256 over the exact bytes of the float64 arrays, so any change of behaviour, however small,
changes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

ENV_STEPS = 40
CONTROLLER_CELLS = (
    ("energy", "small", ("static", "dynamo", "oracle", "shield:dynamo", "random")),
    ("thermal", "small_tapas", ("unaware", "tapas", "shield:unaware", "shield:tapas")),
    ("thermal", "small_faults", ("unaware", "shield:tapas")),
    ("combined", "small_tapas", ("tapas", "shield:tapas")),
)
CONTROLLER_DURATION_S = 150.0


class _Digest:
    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                self._h.update(str(key).encode())
                self.add(value[key])
        elif isinstance(value, str):
            self._h.update(value.encode())
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (str, tuple)):
            self._h.update(repr(value).encode())
        else:
            self._h.update(np.ascontiguousarray(np.asarray(value, dtype=np.float64)).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def env_digest(env_id: str, seed: int = 0) -> str:
    """Digest of `ENV_STEPS` seeded random steps of a registered id (obs, reward, info scalars)."""
    import gymnasium as gym

    import llm_cluster_gym  # noqa: F401  (registers the ids: the digest must not rely on another test's import)

    env = gym.make(env_id)
    digest = _Digest()
    obs, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    digest.add(obs)
    digest.add({k: v for k, v in info.items() if np.isscalar(v)})
    for _ in range(ENV_STEPS):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        digest.add(obs)
        digest.add(reward)
        digest.add({k: v for k, v in info.items() if np.isscalar(v)})
        if terminated or truncated:
            break
    env.close()
    return digest.hexdigest()


def controller_digest(task: str, scenario_name: str, controller: str, seed: int = 0) -> str:
    """Digest of one short simulated episode of a rule-based controller (every interval metric)."""
    from llm_cluster_gym.controllers.registry import policy_maker
    from llm_cluster_gym.envs.rollout import run_measured
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    scenario = load_scenario(scenario_name).with_overrides(duration_s=CONTROLLER_DURATION_S)
    result, summary = run_measured(task, scenario, "request", policy_maker(controller, seed), seed, 0)
    digest = _Digest()
    digest.add(result.metrics)
    digest.add(result.row_power_w)
    digest.add(result.aisle_max_gpu_temp_c)
    digest.add(summary)
    return digest.hexdigest()


FIXED_CELLS = (("small", "request"), ("small_faults", "request"), ("small_tapas", "aggregate"))


def fixed_digest(scenario_name: str, serving: str, seed: int = 0) -> str:
    """Digest of a short episode under the scenario's fixed configuration (`llm-cluster simulate`)."""
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.rollout import run_episode
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    scenario = load_scenario(scenario_name).with_overrides(duration_s=CONTROLLER_DURATION_S)
    env = ClusterEnv(task="energy", backend=SimCluster(scenario, serving_model=serving,
                                                        record_ticks=True))
    result = run_episode(env, None, seed, seed_backend=True)
    digest = _Digest()
    digest.add(result.metrics)
    digest.add(result.row_power_w)
    digest.add(result.aisle_inlet_c)
    digest.add(result.aisle_max_gpu_temp_c)
    digest.add(result.tick_row_power_w)
    digest.add(result.summary())
    return digest.hexdigest()


def all_digests() -> dict[str, str]:
    """Every digest, keyed by what was rolled out.

    Keys: `env:<id>`, `controller:<task>:<scenario>:<name>` or `fixed:<scenario>:<serving>`.
    The values are SHA-256 digests (see `_Digest`).
    """
    import llm_cluster_gym

    out = {f"env:{env_id}": env_digest(env_id) for env_id in llm_cluster_gym.TASK_IDS}
    for task, scenario, names in CONTROLLER_CELLS:
        for name in names:
            out[f"controller:{task}:{scenario}:{name}"] = controller_digest(task, scenario, name)
    for scenario, serving in FIXED_CELLS:
        out[f"fixed:{scenario}:{serving}"] = fixed_digest(scenario, serving)
    return out
