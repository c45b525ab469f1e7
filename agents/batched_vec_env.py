"""Stable-Baselines3's `VecEnv` over the batched simulator: N training copies in one process.

`BatchedVecEnv` adapts `envs.vector_env.BatchedClusterEnv` (Gymnasium's vector API, next-step
autoreset) to SB3's (same-step autoreset): on the step that ends the episodes it returns the
first observation of the next ones, puts the last one in ``info["terminal_observation"]`` and
marks ``info["TimeLimit.truncated"]``, as SB3's own vector envs do. Wrap it in `VecMonitor` for
episode statistics (what `Monitor` gives a single env). `make_batched_vec_env` builds it for a
registered id that has a ``vector_entry_point``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecMonitor

from llm_cluster_gym.envs.vector_env import BatchedClusterEnv


class BatchedVecEnv(VecEnv):
    """SB3 `VecEnv` over one `BatchedClusterEnv` (see the module docstring)."""

    def __init__(self, env: BatchedClusterEnv) -> None:
        self.env = env
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self):
        """Reset every copy (the seeds `seed()` set, once; then each copy's generator goes on)."""
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        obs, _ = self.env.reset(seed=seeds)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Hold the actions for `step_wait` (the copies step together there)."""
        self._actions = np.asarray(actions)

    def step_wait(self):
        """One step of every copy; at the episodes' end, the next episodes' first observations."""
        obs, reward, terminated, truncated, info = self.env.step(self._actions)
        infos = sb3_infos(info, obs, terminated, truncated)
        done = terminated | truncated
        if done.any():
            obs, _ = self.env.reset()  # every copy ends together (one episode length)
        return obs, reward.astype(np.float32), done, infos

    def close(self) -> None:
        """Close the batched env."""
        self.env.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        """The batched env's attribute, once per copy asked for (the copies share it)."""
        return [getattr(self.env, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        """Set the batched env's attribute (for every copy: they share it)."""
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        """Refused: the copies are arrays, not env objects with methods (no task here masks)."""
        raise AttributeError(f"BatchedVecEnv: the batched copies have no per-copy method "
                             f"{method_name!r}")

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices=None) -> list[bool]:
        """No copy is wrapped (use vector wrappers such as `VecMonitor`)."""
        return [False for _ in self._get_indices(indices)]


def sb3_infos(info: dict[str, np.ndarray], obs: np.ndarray, terminated: np.ndarray,
              truncated: np.ndarray) -> list[dict[str, Any]]:
    """SB3's per-copy info dicts from a Gymnasium vector info (arrays, ``_key`` masks left out).

    A copy whose episode ended gets ``terminal_observation`` (its last observation, ``obs[i]``)
    and ``TimeLimit.truncated``, as SB3's own vector envs give them.
    """
    n = len(obs)
    infos: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in info.items():
        if not key.startswith("_"):
            for i in range(n):
                infos[i][key] = values[i]
    for i in np.flatnonzero(terminated | truncated):
        infos[i]["terminal_observation"] = obs[i]
        infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
    return infos


def make_batched_vec_env(env_id: str, n_envs: int, seed: int, monitor: bool = True,
                         **kwargs: Any) -> VecEnv:
    """`n_envs` batched copies of `env_id` as an SB3 vector env, seeded ``seed + i`` per copy.

    Raises:
        gymnasium.error.Error: The id has no ``vector_entry_point``.
    """
    env = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", **kwargs)
    venv: VecEnv = BatchedVecEnv(env)
    venv.seed(seed)
    return VecMonitor(venv) if monitor else venv
