"""A residual policy over the DynamoLLM-style manager, with the SLO as a learned constraint (issue 20).

The energy agent trained from scratch (`agents/train.py`) had to rediscover what the manager
already knows (how many servers each pool needs, at which clock its SLO holds) and missed the
SLO during its start-up transient. Here the agent starts from the manager and learns only a
correction: every interval the manager proposes its pool configurations, and the agent moves
each pool's clock by at most one step of the scenario's clock choices (down: less energy, up:
more SLO headroom). With every offset 0 the env *is* the manager, step for step.

Spaces that do not depend on the layout (as `envs.fixed_spaces`, whose observation it reuses):

* observation: the 87 layout-free values of `LayoutFreeSpaces` plus, per pool slot
  (`MAX_POOLS`), the manager's proposed clock as a position in [0, 1] among the scenario's
  choices (0 where the slot has no pool): ``Box(-10, 10, (90,))``;
* action: ``MultiDiscrete([3] * MAX_POOLS)``, per pool slot an offset of -1, 0 or +1 clock
  choice (index 1 is "as the manager says"; a slot without a pool ignores its entry).

Constrained learning: the reward the policy maximizes is an objective minus
``lagrange * violation``, where ``violation`` is the interval's share of resolved requests that
missed their SLO (``1 - info["slo_attainment"]``). The objective (`OBJECTIVES`) is either the
energy task's whole reward (``"task"``: its energy term *and* its fixed SLO weight, so the
effective price of a violation is that weight plus the multiplier, and the policy buys SLO
margin even where the constraint already holds) or its energy term alone (``"energy"``: the SLO
enters only through the multiplier, the constrained problem "least energy subject to mean
violation <= 1 - slo_target"). `LagrangeUpdate` is the multiplier's
projected gradient step (ascent on the constraint "mean violation <= 1 - slo_target"):
``lagrange <- max(0, lagrange + lr (mean violation - (1 - slo_target)))`` once per rollout, so
the penalty rises while the policy misses the target and decays once it meets it (the
Lagrangian relaxation of constrained RL, as in Tessler et al., "Reward Constrained Policy
Optimization", ICLR 2019). `LagrangeCallback` applies it to every env of a stable-baselines3
vector env.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.dynamo import DynamoController
from llm_cluster_gym.envs.backend import ClusterAction
from llm_cluster_gym.envs.fixed_spaces import FIXED_OBSERVATION_NAMES, MAX_POOLS, LayoutFreeSpaces
from llm_cluster_gym.envs.observation import OBS_CLIP

OFFSETS = (-1, 0, 1)
"""Clock offsets per pool slot, in action index order (index 1: the manager's clock)."""

Objective = Literal["task", "energy"]
"""What the shaped reward keeps of the env's reward besides ``-lagrange * violation``:
``"task"`` all of it (energy and the task's fixed SLO weight), ``"energy"`` its energy term only."""

OBJECTIVES: tuple[str, ...] = get_args(Objective)
"""The `Objective` names, for checks and messages."""


def check_objective(objective: str) -> str:
    """``objective`` itself, if it is one of `OBJECTIVES`.

    Raises:
        ValueError: An objective outside `OBJECTIVES`.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective


def objective_reward(objective: str, reward: Any, info: dict[str, Any]) -> Any:
    """The objective part of the shaped reward (a float, or one value per batched copy)."""
    return reward if objective == "task" else info["reward_energy"]


RESIDUAL_OBSERVATION_NAMES = FIXED_OBSERVATION_NAMES + tuple(
    f"manager.freq_position[{s}]" for s in range(MAX_POOLS))
"""Every index of the residual env's observation."""


@dataclass
class LagrangeUpdate:
    """Projected gradient ascent on the multiplier of "mean SLO violation <= 1 - slo_target".

    Attributes:
        slo_target: SLO attainment the policy must keep (0.99: the issue's bar).
        lr: Step per unit of violation above the budget, per update.
        value: The current multiplier (>= 0).
    """

    slo_target: float = 0.99
    lr: float = 50.0
    value: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.slo_target <= 1.0:
            raise ValueError(f"slo_target must be in (0, 1], got {self.slo_target}")
        if not self.lr > 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.value >= 0.0:
            raise ValueError(f"value must be >= 0, got {self.value}")

    def step(self, mean_violation: float) -> float:
        """One update from a rollout's mean violation; returns the new multiplier."""
        budget = 1.0 - self.slo_target
        self.value = max(0.0, self.value + self.lr * (float(mean_violation) - budget))
        return self.value


def lagrangian_reward(objective: float, violation: float, lagrange: float, scaled: bool) -> float:
    """The constrained reward ``objective - lagrange * violation``, over ``1 + lagrange`` if `scaled`.

    Scaled is the PPO-Lagrangian form (Ray et al., "Benchmarking Safe Exploration in Deep RL",
    2019; Stooke et al., "Responsive Safety in RL by PID Lagrangian Methods", 2020): the reward's
    scale stays bounded however far the multiplier climbs. Unscaled, a multiplier in the hundreds
    makes returns of thousands, and the thermal agent's policy stopped moving (measured here:
    approx-KL 1e-6 and clip fraction 0 per update at a multiplier of 66-211, the unsafe-proposal
    rate flat; PPO's value loss is not normalized and shares one clipped gradient norm and one
    optimizer with the policy). Scaling alone did not restart it from a checkpoint trained on the
    other scale; `train_constrained_ppo`'s ``normalize_reward`` did (which part of the mechanism
    each change removes was not isolated).
    The scaled reward ranks policies as the unscaled one does for a given multiplier.
    """
    return (float(objective) - lagrange * float(violation)) / ((1.0 + lagrange) if scaled else 1.0)


class ResidualWrapper(gym.Wrapper):
    """What both residual agents' envs share.

    The layout-free spaces of the wrapped `ClusterEnv`, the constraint's multiplier, and the
    mapping of a raw observation to the fixed one. Subclasses propose with their base controller
    in ``_observe(fixed_obs, action_mask)``.

    Args:
        env: A `ClusterEnv`, or a wrapper of one.
        lagrange: Initial multiplier of the constraint in the reward (>= 0).
    """

    def __init__(self, env: gym.Env, lagrange: float = 0.0) -> None:
        fixed = LayoutFreeSpaces(env)
        super().__init__(fixed)
        self.fixed = fixed
        self.inner = env.unwrapped
        if not lagrange >= 0.0:
            raise ValueError(f"lagrange must be >= 0, got {lagrange}")
        self.lagrange = float(lagrange)
        self._raw: np.ndarray | None = None

    def set_lagrange(self, value: float) -> None:
        """Set the multiplier (`lagrange_callback` calls it through the vector env)."""
        if not value >= 0.0:
            raise ValueError(f"lagrange must be >= 0, got {value}")
        self.lagrange = float(value)

    def observe(self, raw_obs: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """The agent's observation of a raw env observation; the base controller proposes for it.

        What a deployed policy calls with each observation the env returns (the base controller
        counts its calls: one per interval). ``action_mask``: the env's mask for it (None: read now).
        """
        return self._observe(self._fixed_observation(raw_obs), action_mask)

    def _observe(self, fixed_obs: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def _fixed_observation(self, raw_obs: np.ndarray) -> np.ndarray:
        self._raw = np.asarray(raw_obs)
        self.fixed._inner_obs = self._raw
        self.fixed._legal = None
        return self.fixed.observation(self._raw)


class ResidualOverManager(ResidualWrapper):
    """An energy-task `ClusterEnv` whose actions correct the DynamoLLM-style manager's clocks.

    Args:
        env: A `ClusterEnv` with pool actions (energy or combined task), or a wrapper of one.
        lagrange: Initial multiplier of the SLO violation in the reward (see the module docstring).
        manager_kwargs: Arguments of `DynamoController` (its defaults otherwise).
        objective: What the reward keeps of the env's reward (`OBJECTIVES`).
    """

    def __init__(self, env: gym.Env, lagrange: float = 0.0,
                 manager_kwargs: dict[str, Any] | None = None, objective: str = "task") -> None:
        super().__init__(env, lagrange)
        self.objective = check_objective(objective)
        if not self.inner.codec.has_pools:
            raise ValueError(f"ResidualOverManager needs pool actions; task is {self.inner.task!r}")
        self.manager = DynamoController(ControllerContext.from_env(self.inner), **(manager_kwargs or {}))
        self.freqs = np.asarray(self.inner.layout.freq_choices_mhz, dtype=float)
        self.action_space = spaces.MultiDiscrete([len(OFFSETS)] * MAX_POOLS)
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, (len(RESIDUAL_OBSERVATION_NAMES),),
                                            np.float32)
        self.observation_names = RESIDUAL_OBSERVATION_NAMES
        self._base_action: ClusterAction | None = None
        self.clock_moves = ClockMoves(MAX_POOLS)

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset the env and the manager; the manager proposes its first configuration."""
        self.manager.reset()
        fixed_obs, info = self.fixed.reset(seed=seed, options=options)
        self._raw = self.fixed._inner_obs
        return self._observe(fixed_obs), info

    def step(self, action):
        """Apply the manager's proposal with the agent's clock offsets; shaped reward.

        Raises:
            ValueError: An action outside the space.
        """
        if self._raw is None:
            raise gym.error.ResetNeeded("ResidualOverManager: call reset() before acting")
        vec = self.inner.codec.encode_action(self.corrected_action(action))
        obs, reward, terminated, truncated, info = self.inner.step(vec)
        fixed_obs = self._fixed_observation(obs)
        violation = 1.0 - float(info["slo_attainment"])
        info = {**info, "slo_violation": violation, "lagrange": self.lagrange, "env_reward": reward}
        shaped = lagrangian_reward(objective_reward(self.objective, reward, info), violation, self.lagrange,
                                   scaled=False)
        return self._observe(fixed_obs), shaped, terminated, truncated, info

    # ------------------------------------------------------------------ as a controller
    def reset_base(self) -> None:
        """Start a new episode of the base controller (the manager forgets its history)."""
        self.manager.reset()

    def corrected_action(self, action: np.ndarray) -> ClusterAction:
        """The manager's latest proposal with the agent's clock offset per pool slot.

        Raises:
            ValueError: An action outside the space.
        """
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        if a.shape != (MAX_POOLS,) or a.min() < 0 or a.max() >= len(OFFSETS):
            raise ValueError(f"action must be {MAX_POOLS} indices in [0, {len(OFFSETS) - 1}], got {action!r}")
        proposed = [self._freq_index(cfg.freq_mhz) for cfg in self._base_action.pools]
        applied = [int(np.clip(i + OFFSETS[a[p]], 0, len(self.freqs) - 1)) for p, i in enumerate(proposed)]
        pools = tuple(replace(cfg, freq_mhz=float(self.freqs[i]))
                      for cfg, i in zip(self._base_action.pools, applied, strict=True))
        self.clock_moves.add(proposed, applied)
        return replace(self._base_action, pools=pools)

    # ------------------------------------------------------------------ pieces
    def _freq_index(self, freq_mhz: float) -> int:
        return int(np.argmin(np.abs(self.freqs - freq_mhz)))

    def _observe(self, fixed_obs: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """The fixed observation plus the manager's proposal for the coming interval."""
        mask = self.inner.action_masks() if action_mask is None else action_mask
        self._base_action = self.manager.decide(self._raw, mask)
        pos = np.zeros(MAX_POOLS)
        span = max(len(self.freqs) - 1, 1)
        for p, cfg in enumerate(self._base_action.pools):
            pos[p] = self._freq_index(cfg.freq_mhz) / span
        return np.concatenate([fixed_obs, pos]).astype(np.float32)


class ClockMoves:
    """How often the agent moved each pool's clock off the manager's, and which way.

    Counted per pool slot over the corrected actions: the manager's clock choice against the
    one applied (a step down at the lowest choice is no move), and apart, the intervals in which
    the manager proposed the lowest choice, where the agent's only lever is up. What
    `evaluate_residual` reports per unit, so that a difference in energy from the manager can be
    read as what the agent did.
    """

    def __init__(self, n_slots: int) -> None:
        self.counts = np.zeros((n_slots, 3), dtype=np.int64)  # down, same, up
        self.at_floor = np.zeros((n_slots, 3), dtype=np.int64)  # the same, manager at the floor

    def add(self, manager_idx: list[int], applied_idx: list[int]) -> None:
        """One interval: per pool, the manager's and the applied clock choice (indices)."""
        for p, (m, a) in enumerate(zip(manager_idx, applied_idx, strict=True)):
            move = int(np.sign(a - m)) + 1
            self.counts[p, move] += 1
            if m == 0:
                self.at_floor[p, move] += 1

    def shares(self, names: list[str]) -> dict[str, dict[str, float | None]]:
        """Per named pool, the shares of intervals moved down, kept and moved up.

        Besides: the share in which the manager proposed its lowest clock, and of those the
        share the agent raised. None where there is nothing to share (JSON null).
        """
        out = {}
        for p, name in enumerate(names):
            n = int(self.counts[p].sum())
            floor = int(self.at_floor[p].sum())
            down, same, up = (float(c) / n if n else None for c in self.counts[p])
            out[name] = {"down": down, "same": same, "up": up,
                         "manager_at_lowest_clock": floor / n if n else None,
                         "up_when_manager_at_lowest": float(self.at_floor[p, 2]) / floor if floor else None}
        return out


class ResidualController:
    """A trained residual agent as a controller (`decide`, `act`) for the episode runner.

    The wrapper (`ResidualOverManager`, `agents.residual_thermal.ResidualOverTapas`) holds the
    base controller and the layout-free observation over the env it was built on; every interval
    the base proposes, the PPO policy (observations normalized with the training statistics,
    frozen) picks the correction.

    Subclasses name the checkpoint `kind` they load (`agents.checkpoint.RESIDUAL_KINDS`).

    Args:
        directory: Checkpoint directory (``model.zip``, optional ``vecnormalize.pkl``).
        wrapper: The residual wrapper over the env the controller acts on.
        meta: The checkpoint's metadata when the subclass has verified it already (it read a
            field to build `wrapper`); None verifies it here.

    Raises:
        CheckpointError: The metadata's fields, version, kind or task, a listed file's SHA-256,
            the model or its spaces are not what this controller loads.
    """

    name = "residual"
    kind: str = ""
    """The checkpoint kind this controller loads."""

    def __init__(self, directory: str | Path, wrapper: Any, meta: dict[str, Any] | None = None) -> None:
        from stable_baselines3 import PPO
        from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

        from llm_cluster_gym.agents.checkpoint import (
            METADATA_FILE,
            MODEL_FILE,
            VECNORM_FILE,
            CheckpointError,
            check_field_matches,
        )
        from llm_cluster_gym.agents.policy import verified_residual_metadata

        d = Path(directory)
        if meta is None:  # fields, version, kind; then every listed file's SHA-256
            meta = verified_residual_metadata(d, self.kind)
        check_field_matches(meta, "task", wrapper.inner.task, d / METADATA_FILE)
        try:
            self.model = PPO.load(d / MODEL_FILE, device="cpu")
        except Exception as exc:  # zipfile, torch and pickle errors all mean "unreadable model"
            raise CheckpointError(f"{d / MODEL_FILE}: cannot load the PPO model "
                                  f"({type(exc).__name__}: {exc})") from exc
        for space, theirs, ours in (("observation", self.model.observation_space, wrapper.observation_space),
                                    ("action", self.model.action_space, wrapper.action_space)):
            if theirs != ours:
                raise CheckpointError(f"{d / MODEL_FILE}: the model's {space} space {theirs} is not "
                                      f"the {meta['kind']} agent's {ours}")
        self.res = wrapper
        self.vecnorm = None
        if VECNORM_FILE in meta["files_sha256"]:  # only verified statistics are unpickled
            try:
                self.vecnorm = VecNormalize.load(str(d / VECNORM_FILE), DummyVecEnv([lambda: self.res]))
            except Exception as exc:  # any unpickling failure or a shape mismatch
                raise CheckpointError(f"{d / VECNORM_FILE}: cannot read the VecNormalize statistics "
                                      f"({type(exc).__name__}: {exc})") from exc
            self.vecnorm.training = False

    def reset(self) -> None:
        """Start a new episode: the base controller forgets its history."""
        self.res.reset_base()

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> ClusterAction:
        """The base controller's action for this observation with the agent's correction."""
        obs = self.res.observe(observation, action_mask)
        if self.vecnorm is not None:
            obs = self.vecnorm.normalize_obs(obs)
        a, _ = self.model.predict(obs, deterministic=True)
        return self.res.corrected_action(a)

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """`decide`, as the env's action vector."""
        return self.res.inner.codec.encode_action(self.decide(observation, action_mask))


GROUP_KEY = "constraint_group"
"""``info`` entry naming the scenario family an interval belongs to, when the constraint is kept
per family (`lagrange_callback` with one `LagrangeUpdate` per group)."""


class GroupedEpisodes(gym.Wrapper):
    """A residual env drawn afresh at every reset, each step's ``info`` naming its constraint group.

    `draw` returns ``(group, env)``: the trainers' episode sources (a training window of the week
    named by its day, a scenario family). The group goes into every step's ``info`` under
    `GROUP_KEY`, so that a constraint kept per group (`lagrange_callback` with one update per
    group) counts each violation toward its own group; the env of each episode gets its group's
    multiplier (`set_lagrange`: one value for every group, or a dict by group name, 0 for a group
    it lacks). Each reset seeds the new env from `rng`.
    """

    def __init__(self, draw: Callable[[], tuple[str, Any]], rng: np.random.Generator) -> None:
        self._draw, self._rng = draw, rng
        self.group, env = draw()
        super().__init__(env)
        self.lagranges: float | dict[str, float] = 0.0

    def _group_value(self) -> float:
        if isinstance(self.lagranges, dict):
            return float(self.lagranges.get(self.group, 0.0))
        return float(self.lagranges)

    def reset(self, *, seed=None, options=None):
        """A new env from `draw`, with its group's multiplier, seeded from `rng` (`seed` unused)."""
        self.group, self.env = self._draw()
        self.env.set_lagrange(self._group_value())
        return self.env.reset(seed=int(self._rng.integers(0, 2**31 - 1)), options=options)

    def step(self, action):
        """The env's step, its ``info`` naming the group."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, {**info, GROUP_KEY: self.group}

    def set_lagrange(self, value: float | dict[str, float]) -> None:
        """One multiplier for every group, or each group's (a dict by group name)."""
        self.lagranges = dict(value) if isinstance(value, dict) else float(value)
        self.env.set_lagrange(self._group_value())


def group_start_multipliers(before: dict[str, Any], groups: tuple[str, ...],
                            lagrange_init: float | None = None) -> dict[str, float]:
    """Each constraint group's first multiplier.

    `lagrange_init`, else the `init` checkpoint's ``lagrange`` (each group's where it was kept per
    group, its one value for all where it was not), else 0.
    """
    old = before.get("lagrange", 0.0) if lagrange_init is None else float(lagrange_init)
    if isinstance(old, dict):
        return {g: float(old.get(g, 0.0)) for g in groups}
    return dict.fromkeys(groups, float(old))


def multiplier_text(value: float | dict[str, float]) -> str:
    """A checkpoint's ``lagrange`` for a one-line message: one value, or ``group value`` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{g} {v:.3g}" for g, v in value.items())
    return f"{value:.3g}"


def lagrange_callback(update: LagrangeUpdate | dict[str, LagrangeUpdate], key: str = "slo_violation") -> Any:
    """A stable-baselines3 callback applying `update` after every rollout to all envs.

    The rollout's mean violation is taken from the `key` entry of every step's ``info``
    (``slo_violation`` here; the thermal agent's ``unsafe_proposal``); the new multiplier reaches
    each env through ``env_method("set_lagrange", value)`` and is logged as
    ``constraint/lagrange`` and ``constraint/<key>`` (TensorBoard).

    With one update per group (a dict), the constraint holds per scenario family: each step's
    violation counts toward the group its ``info[GROUP_KEY]`` names, each group's multiplier
    follows that group's own mean, and the envs receive the dict of multipliers (each applies its
    group's). A family whose episodes are long cannot then outvote one whose episodes are short.
    A group with no step in a rollout keeps its multiplier.
    """
    from stable_baselines3.common.callbacks import BaseCallback

    grouped = isinstance(update, dict)
    updates = update if grouped else {"": update}  # one constraint: one unnamed group

    class LagrangeCallback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.update = update
            self._violations: dict[str, list[float]] = {}

        def _value(self) -> float | dict[str, float]:
            return {g: u.value for g, u in updates.items()} if grouped else update.value

        def _on_training_start(self) -> None:
            self.training_env.env_method("set_lagrange", self._value())

        def _on_step(self) -> bool:
            for i in self.locals["infos"]:
                if key in i:
                    group = str(i.get(GROUP_KEY, "")) if grouped else ""
                    self._violations.setdefault(group, []).append(float(i[key]))
            return True

        def _on_rollout_end(self) -> None:
            if not self._violations:
                return
            for group, values in self._violations.items():
                if group not in updates:
                    continue
                mean = float(np.mean(values))
                suffix = f"/{group}" if grouped else ""
                self.logger.record(f"constraint/{key}{suffix}", mean)
                self.logger.record(f"constraint/lagrange{suffix}", updates[group].step(mean))
            self.training_env.env_method("set_lagrange", self._value())
            self._violations = {}

    return LagrangeCallback()


def train_constrained_ppo(factory: Any, *, n_envs: int, update: LagrangeUpdate | dict[str, LagrangeUpdate],
                          key: str, steps: int,
                          max_minutes: float, seed: int, tensorboard: str | None,
                          init: str | Path | None = None, vec_env: Any = None,
                          n_steps: int = 1024, normalize_reward: bool = False) -> tuple[Any, Any]:
    """PPO on a residual env with a learned constraint multiplier; both residual agents train so.

    ``factory`` builds one env (a `ResidualWrapper`, or a wrapper forwarding ``set_lagrange``);
    `n_envs` copies step in one process under `VecNormalize` (observations only). The
    multiplier follows `update` on the ``key`` entry of ``info`` (`lagrange_callback`; one update
    per scenario family keeps the constraint per family, and the env must then take a dict in
    ``set_lagrange``). Training
    stops after `steps` env steps or `max_minutes` of wall time, whichever comes first (the
    issue's two-hour budget on 2 cores). With ``init`` (a checkpoint directory of the same kind)
    training continues from its policy and observation statistics (fine-tuning; the caller
    starts `update` from its multiplier). ``vec_env`` replaces the ``n_envs`` copies of ``factory``
    by a ready SB3 vector env (the batched one, `agents.batched_residual`); ``n_steps`` is PPO's
    rollout length per copy. ``normalize_reward`` also scales rewards by the running standard
    deviation of the discounted return (VecNormalize's reward normalization); a fine-tune so
    normalized starts those statistics and Adam's moments afresh, since the reward's definition
    may have changed (the thermal stage of 2026-12-02 from a checkpoint trained on another reward
    scale did not move its policy until both were: approx-KL 1e-5 to 1e-4, clip fraction 0).
    Returns ``(model, vec)`` with `vec` frozen
    (``training`` False), ready for `agents.checkpoint.save_checkpoint`.
    """
    import time

    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from stable_baselines3.common.running_mean_std import RunningMeanStd
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor, VecNormalize

    t0 = time.time()
    venv = VecMonitor(DummyVecEnv([factory for _ in range(n_envs)]) if vec_env is None else vec_env)
    if init is None:
        vec = VecNormalize(venv, norm_obs=True, norm_reward=normalize_reward, gamma=0.99)
        model = PPO("MlpPolicy", vec, n_steps=n_steps, batch_size=256, n_epochs=5, learning_rate=3e-4,
                    gamma=0.99, gae_lambda=0.95, ent_coef=0.0, seed=seed, device="cpu",
                    tensorboard_log=tensorboard, policy_kwargs={"net_arch": [64, 64]})
    else:
        vec = VecNormalize.load(str(Path(init) / "vecnormalize.pkl"), venv)
        vec.training, vec.norm_reward = True, normalize_reward
        model = PPO.load(Path(init) / "model.zip", env=vec, device="cpu", seed=seed,
                         tensorboard_log=tensorboard,
                         custom_objects=None if vec_env is None else {"n_steps": n_steps})
        if normalize_reward:
            vec.ret_rms, vec.gamma = RunningMeanStd(shape=()), 0.99
            # Adam's moments were gathered on the old reward's scale: start them afresh too.
            model.policy.optimizer = model.policy.optimizer_class(
                model.policy.parameters(), lr=model.lr_schedule(1.0), **model.policy.optimizer_kwargs)

    class WallClockLimit(BaseCallback):
        def _on_step(self) -> bool:
            return time.time() - t0 < max_minutes * 60.0

    model.learn(total_timesteps=steps, progress_bar=False, reset_num_timesteps=init is None,
                callback=CallbackList([lagrange_callback(update, key=key), WallClockLimit()]))
    vec.training = False
    return model, vec
