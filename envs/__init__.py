"""Gymnasium environments and cluster backends for LLM inference clusters.

Registered ids (`gymnasium.make(id)` after `import envs`):

| id | task | scenario | serving model |
|---|---|---|---|
| `LLMCluster/Energy-small-v0` | energy (DynamoLLM) | small | aggregate (training) |
| `LLMCluster/Energy-v0` | energy | small | request-level (evaluation) |
| `LLMCluster/Thermal-small-v0` | thermal/power (TAPAS) | small_tapas | aggregate |
| `LLMCluster/Thermal-v0` | thermal/power | small_tapas | request-level |
| `LLMCluster/Combined-small-v0` | both | small_tapas | aggregate |
| `LLMCluster/Combined-v0` | both | small_tapas | request-level |
"""

from __future__ import annotations

import gymnasium

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

for _id, _kwargs in TASK_IDS.items():
    if _id not in gymnasium.registry:
        gymnasium.register(id=_id, entry_point="envs.cluster_env:ClusterEnv", kwargs=_kwargs)
