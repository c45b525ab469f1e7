"""Environments and cluster backends: `ClusterEnv`, the backend protocol, the simulator, the real node.

The ids are registered by the top-level package (`llm_cluster_gym.envs.registration`).
"""
