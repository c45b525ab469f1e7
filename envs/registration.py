"""The registered Gymnasium ids and their registration (called by `llm_cluster_gym/__init__.py`).

Each id is registered with `max_episode_steps` = the scenario's duration over its control
interval, read from the shipped scenario file, so that third-party trainers reading the spec
see the real horizon. Passing another `scenario=` to `gymnasium.make` keeps the id's limit
unless `max_episode_steps=` is passed too. ``LLMCluster/Energy-small-v0`` also has a
``vector_entry_point``: `gymnasium.make_vec` builds N batched copies (`envs.vector_env`); pass
``vectorization_mode="sync"`` or ``"async"`` for N separate envs.
"""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium
import yaml

ENTRY_POINT = "llm_cluster_gym.envs.cluster_env:ClusterEnv"
VECTOR_ENTRY_POINT = "llm_cluster_gym.envs.vector_env:BatchedClusterEnv"
"""`gymnasium.make_vec`'s batched copies (`envs.vector_env`), for the ids whose task and serving
model it runs (the energy task under the aggregate model)."""
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

TASK_IDS: dict[str, dict[str, object]] = {
    "LLMCluster/Energy-small-v0": {"task": "energy", "scenario": "small", "serving_model": "aggregate"},
    "LLMCluster/Energy-v0": {"task": "energy", "scenario": "small", "serving_model": "request"},
    "LLMCluster/Thermal-small-v0": {"task": "thermal", "scenario": "small_tapas",
                                    "serving_model": "aggregate"},
    "LLMCluster/Thermal-v0": {"task": "thermal", "scenario": "small_tapas", "serving_model": "request"},
    "LLMCluster/Combined-small-v0": {"task": "combined", "scenario": "small_tapas",
                                     "serving_model": "aggregate"},
    "LLMCluster/Combined-v0": {"task": "combined", "scenario": "small_tapas",
                               "serving_model": "request"},
}
"""Every registered id and the `ClusterEnv` keyword arguments it stands for."""


def episode_steps(scenario: str) -> int:
    """Control intervals in one episode of a shipped scenario (duration over interval, rounded up)."""
    data = yaml.safe_load((SCENARIO_DIR / f"{scenario}.yaml").read_text())
    return math.ceil(float(data["duration_s"]) / float(data["control_interval_s"]) - 1e-9)


def register_envs() -> None:
    """Register every id of `TASK_IDS` once (a second call is a no-op)."""
    for env_id, kwargs in TASK_IDS.items():
        if env_id not in gymnasium.registry:
            batched = kwargs["task"] == "energy" and kwargs["serving_model"] == "aggregate"
            gymnasium.register(id=env_id, entry_point=ENTRY_POINT, kwargs=dict(kwargs),
                               max_episode_steps=episode_steps(str(kwargs["scenario"])),
                               vector_entry_point=VECTOR_ENTRY_POINT if batched else None)
