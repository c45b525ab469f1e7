"""llm-cluster-gym: Gymnasium environments, a simulated datacenter and controllers for LLM clusters.

Importing the package registers the environment ids (and imports nothing heavy: numpy and
gymnasium only; torch is needed by `llm_cluster_gym.agents` alone)::

    import gymnasium as gym
    env = gym.make("llm_cluster_gym:LLMCluster/Energy-small-v0")  # imports this package first

| id | task | scenario | serving model | max_episode_steps |
|---|---|---|---|---|
| `LLMCluster/Energy-small-v0` | energy (DynamoLLM) | small | aggregate (training) | 120 |
| `LLMCluster/Energy-v0` | energy | small | request-level (evaluation) | 120 |
| `LLMCluster/Thermal-small-v0` | thermal/power (TAPAS) | small_tapas | aggregate | 120 |
| `LLMCluster/Thermal-v0` | thermal/power | small_tapas | request-level | 120 |
| `LLMCluster/Combined-small-v0` | both | small_tapas | aggregate | 120 |
| `LLMCluster/Combined-v0` | both | small_tapas | request-level | 120 |

Subpackages: `llm_cluster_gym.envs` (environment, backends, simulator), `.controllers`
(rule-based policies, shield, live loop), `.agents` (training and evaluation, needs the
`[train]` extra), `.scripts` (the `llm-cluster` command).
"""

from __future__ import annotations

from llm_cluster_gym.envs.registration import TASK_IDS, register_envs

__all__ = ["TASK_IDS", "register_envs"]
__version__ = "0.2.0"

register_envs()
