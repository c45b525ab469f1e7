"""The residual energy agent's training env on the batched simulator (issue 20).

`agents.residual.ResidualOverManager` steps one `ClusterEnv` and asks its own
`DynamoController` for a proposal every interval; its rollouts run at the manager's speed. Here N
copies of the same week window run as arrays: `envs.vector_env.BatchedClusterEnv` simulates them,
`controllers.dynamo_batched.BatchedDynamoManager` proposes for all of them at once, and the agent's
clock offsets are applied to every copy's proposal as arrays. Copy i is, step for step, the
`ResidualOverManager` of that window reset with copy i's seed (`tests/test_batched_residual.py`):
the same observation (float32 bits), the same shaped reward.

`BatchedResidualVecEnv` is a Stable-Baselines3 `VecEnv` (same-step autoreset, ``terminal_observation``,
``set_lagrange`` through ``env_method`` for the constraint's callback). Every copy of an episode runs
the same window (a new one, from ``windows``, at each episode) with its own seed: the batched
simulator needs one scenario for all its copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from llm_cluster_gym.agents.batched_vec_env import sb3_infos
from llm_cluster_gym.agents.residual import (
    OFFSETS,
    RESIDUAL_OBSERVATION_NAMES,
    check_objective,
    objective_reward,
)
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.dynamo_batched import BatchedDynamoManager
from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.fixed_spaces import MAX_POOLS, LayoutFreeSpaces
from llm_cluster_gym.envs.observation import OBS_CLIP
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import Scenario
from llm_cluster_gym.envs.vector_env import BatchedClusterEnv


class BatchedResidualVecEnv(VecEnv):
    """N copies of `ResidualOverManager` (aggregate serving) as one SB3 vector env.

    Args:
        n_envs: Copies N.
        windows: Called at every episode's start; returns the scenario every copy runs then (a
            week window, `scripts.dynamo_week.window_scenario`).
        seed: Seed of the copies' episode seeds (each episode draws N new ones).
        manager_kwargs: Arguments of the manager (`DynamoController`'s).
        lagrange: Initial multiplier of the SLO violation in the reward.
        objective: What the reward keeps of the env's reward (`agents.residual.OBJECTIVES`).
    """

    def __init__(self, n_envs: int, windows: Callable[[], Scenario], seed: int = 0,
                 manager_kwargs: dict[str, Any] | None = None, lagrange: float = 0.0,
                 objective: str = "task") -> None:
        if not lagrange >= 0.0:
            raise ValueError(f"lagrange must be >= 0, got {lagrange}")
        self.objective = check_objective(objective)
        self.render_mode = None  # nothing is rendered (SB3 reads it from the env)
        super().__init__(int(n_envs),
                         spaces.Box(-OBS_CLIP, OBS_CLIP, (len(RESIDUAL_OBSERVATION_NAMES),), np.float32),
                         spaces.MultiDiscrete([len(OFFSETS)] * MAX_POOLS))
        self.windows = windows
        self.manager_kwargs = dict(manager_kwargs or {})
        self.lagrange = float(lagrange)
        self._rng = np.random.default_rng(seed)
        self._actions: np.ndarray | None = None
        self.env: BatchedClusterEnv | None = None

    # ------------------------------------------------------------------ episodes
    def start(self, scenario: Scenario, seeds: list[int]) -> np.ndarray:
        """Start an episode of ``scenario`` in every copy, copy i as `ClusterEnv.reset(seed=seeds[i])`.

        Returns the copies' first observations (the manager has proposed for them).
        """
        self.env = BatchedClusterEnv(num_envs=self.num_envs, scenario=scenario)
        single = ClusterEnv(task="energy", backend=SimCluster(scenario, serving_model="aggregate",
                                                              auto_place_vms=True))
        self.fixed = LayoutFreeSpaces(single)
        self.manager = BatchedDynamoManager(ControllerContext.from_env(single), self.num_envs,
                                            **self.manager_kwargs)
        lay = self.env.layout
        self.freqs = np.asarray(lay.freq_choices_mhz, dtype=float)
        self.codec = self.env.codec
        self._block_cache: dict[bytes, np.ndarray] = {}
        raw, _ = self.env.reset(seed=list(seeds))
        return self._observe(raw)

    def reset(self) -> np.ndarray:
        """A new window in every copy (the seed set by `seed()` seeds the episode seeds once)."""
        if self._seeds and self._seeds[0] is not None:
            self._rng = np.random.default_rng(self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        return self.start(self.windows(), self._episode_seeds())

    def _episode_seeds(self) -> list[int]:
        return [int(s) for s in self._rng.integers(0, 2**31 - 1, self.num_envs)]

    # ------------------------------------------------------------------ stepping
    def step_async(self, actions: np.ndarray) -> None:
        """Hold the actions for `step_wait`."""
        self._actions = np.asarray(actions)

    def step_wait(self):
        """Every copy applies the manager's proposal with its offsets; shaped rewards.

        Raises:
            ValueError: Actions of the wrong shape or outside the space.
        """
        if self.env is None:
            raise gym.error.ResetNeeded("BatchedResidualVecEnv: call reset() before step()")
        raw, reward, terminated, truncated, info = self.env.step(self.corrected_actions(self._actions))
        violation = 1.0 - np.asarray(info["slo_attainment"], dtype=float)
        shaped = (objective_reward(self.objective, reward, info)
                  - self.lagrange * violation).astype(np.float32)
        obs = self._observe(raw)
        infos = sb3_infos(info, obs, terminated, truncated)
        for i, extra in enumerate(infos):
            extra.update(slo_violation=float(violation[i]), lagrange=self.lagrange,
                         env_reward=float(reward[i]))
        done = terminated | truncated
        if done.any():  # every copy ends together (one window, one length)
            obs = self.start(self.windows(), self._episode_seeds())
        return obs, shaped, done, infos

    def corrected_actions(self, actions: np.ndarray) -> np.ndarray:
        """The env's action vectors: the manager's latest proposals with each copy's offsets.

        Raises:
            ValueError: Actions of the wrong shape or outside [0, len(OFFSETS) - 1].
        """
        a = np.asarray(actions)
        if a.shape != (self.num_envs, MAX_POOLS) or a.min() < 0 or a.max() >= len(OFFSETS):
            raise ValueError(f"actions must be ({self.num_envs}, {MAX_POOLS}) indices in "
                             f"[0, {len(OFFSETS) - 1}], got shape {a.shape}")
        inst, tp, _, _ = self._proposal
        p = inst.shape[1]
        offsets = np.asarray(OFFSETS)[a[:, :p].astype(np.int64)]
        f_idx = np.clip(self._proposal_f_idx + offsets, 0, len(self.freqs) - 1)
        out = np.empty((self.num_envs, len(self.codec.nvec())), dtype=np.int64)
        for i in range(self.num_envs):
            out[i] = self._layout_vector(inst[i], tp[i])
        out[:, 2:4 * p:4] = f_idx
        return out

    def _layout_vector(self, inst: np.ndarray, tp: np.ndarray) -> np.ndarray:
        """A copy's action vector for these instances and TP degrees (clock and batch filled later)."""
        key = inst.tobytes() + tp.tobytes()
        vec = self._block_cache.get(key)
        if vec is None:
            batch = self._proposal[3]
            pools = tuple(PoolConfig(n_instances=int(n), tp=int(t), freq_mhz=float(self.freqs[-1]),
                                     max_batch=int(batch[0, 0])) for n, t in zip(inst, tp, strict=True))
            vec = self.codec.encode_action(ClusterAction(pools=pools))
            self._block_cache[key] = vec
        return vec

    def _observe(self, raw: np.ndarray) -> np.ndarray:
        """Fixed observations plus the manager's proposed clock positions, per copy."""
        self._proposal = self.manager.next_pools(raw)
        freq = self._proposal[2]
        self._proposal_f_idx = np.argmin(np.abs(self.freqs[None, None, :] - freq[:, :, None]), axis=2)
        pos = np.zeros((self.num_envs, MAX_POOLS))
        pos[:, :freq.shape[1]] = self._proposal_f_idx / max(len(self.freqs) - 1, 1)
        fixed = self.fixed.observations(raw)
        return np.concatenate([fixed, pos], axis=1).astype(np.float32)

    # ------------------------------------------------------------------ SB3 plumbing
    def set_lagrange(self, value: float) -> None:
        """Set the SLO multiplier of every copy."""
        if not value >= 0.0:
            raise ValueError(f"lagrange must be >= 0, got {value}")
        self.lagrange = float(value)

    def close(self) -> None:
        """Nothing to release."""

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        """This env's attribute, once per copy asked for (the copies share it)."""
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        """Set this env's attribute (every copy shares it)."""
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        """``set_lagrange`` applies to every copy; no other per-copy method exists."""
        if method_name != "set_lagrange":
            raise AttributeError(f"BatchedResidualVecEnv: no per-copy method {method_name!r}")
        self.set_lagrange(*method_args, **method_kwargs)
        return [None for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices=None) -> list[bool]:
        """No copy is wrapped."""
        return [False for _ in self._get_indices(indices)]
