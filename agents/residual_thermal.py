"""A thermal agent over the TAPAS-style controller, trained with the shield in the loop (issue 20).

The thermal agent trained from scratch (`checkpoints/thermal`) was the shield's puppet: the shield
replaced its action in 68-86% of intervals. Around the TAPAS-style controller the shield does the
same (72% on `small_tapas_high`, 93% on `tapas_dc`): TAPAS places VMs wherever the most room is
left, even where its row would pass the shield's power margin, and keeps a row's clock ceiling high
until the row *is* tight, where the shield predicts the next interval with a burst allowance. Here
the agent starts from TAPAS and learns the two things the shield keeps doing for it, so that it
does them itself and the shield stays a safety net:

* per rank group of rows (`LayoutFreeSpaces`: tightest, middle, loosest third by slack), a clock
  ceiling the rows' SaaS GPUs may not exceed, as a position among the fixed `FREQ_LEVELS`
  (the top one leaves TAPAS's own ceiling; the row's ceiling is the lower of the two);
* a placement gate over TAPAS's placements for the waiting VMs: hold them all, place the head of
  the queue only, or place as TAPAS proposes.

Routing, quantization and (with pool actions) the pools are TAPAS's.

Observation: the 87 layout-free values plus, per rank group, TAPAS's ceiling as a position in
[0, 1], the share of placement slots TAPAS fills, and TAPAS's own estimate of the highest row load
(power over limit) its placements leave (the row's power now plus each VM's expected power from its
type's history and the server overhead it drags): ``Box(-10, 10, (92,))``. The shield's prediction
is *not* shown: the agent must learn when the shield would object from what an operator sees.

Constrained learning, as for the energy agent (`agents.residual`): the reward is the thermal
task's reward, minus `vm_wait_weight` per VM waiting for a placement per interval (holding VMs is
not free: their service is deferred), minus ``lagrange`` x [the shield overrode the action for a
reason the action could have avoided], the multiplier learned by `LagrangeUpdate` on the
constraint "avoidable override rate <= 1 - target" (`lagrange_callback` with
``key="shield_override_avoidable"``). While a fault is declared the shield replaces every action
(its emergency fallback), whatever the agent does: those intervals are reported
(``shield_override``) but not charged, or the multiplier would grow without bound on any episode
with a cooling failure. In training the executed action is the shield's, as in
deployment.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_cluster_gym.agents.residual import ResidualWrapper
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.shield import Shield
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.envs.backend import ClusterAction
from llm_cluster_gym.envs.fixed_spaces import (
    FIXED_OBSERVATION_NAMES,
    FREQ_LEVELS,
    ROW_GROUPS,
)
from llm_cluster_gym.envs.observation import OBS_CLIP

GATE_LEVELS = ("hold", "head", "all")
"""Placement gate, in action index order: no VM placed, the head of the queue only, all TAPAS places."""

RESIDUAL_THERMAL_KIND = "residual_over_tapas"
"""`metadata.json` field `kind` of this agent's checkpoint (`agents.policy.load_policy` reads it)."""

RESIDUAL_THERMAL_OBSERVATION_NAMES = FIXED_OBSERVATION_NAMES + tuple(
    f"tapas.freq_cap_position[{g}]" for g in range(ROW_GROUPS)) + (
    "tapas.placement_share", "tapas.placed_row_load_max")
"""Every index of the observation."""

VM_WAIT_WEIGHT = 0.01
"""Reward cost per VM waiting per interval (a VM held 100 intervals costs 2 power-capping events)."""


class _Proposed:
    """The shield's wrapped controller during training: returns the vector it is given."""

    name = "residual_tapas"

    def __init__(self) -> None:
        self.vector: np.ndarray | None = None

    def reset(self) -> None:
        """Nothing to forget."""

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        return self.vector


class ResidualOverTapas(ResidualWrapper):
    """A thermal-task `ClusterEnv` whose actions gate and cap the TAPAS-style controller.

    Args:
        env: A `ClusterEnv` with row actions (thermal or combined task), or a wrapper of one.
        lagrange: Initial multiplier of a shield override in the reward.
        shielded: Run the shield in the loop (training); False steps the corrected action as is
            (deployment, where the evaluation harness wraps its own shield around the policy).
        vm_wait_weight: Reward cost per waiting VM per interval.
    """

    def __init__(self, env: gym.Env, lagrange: float = 0.0, shielded: bool = True,
                 vm_wait_weight: float = VM_WAIT_WEIGHT) -> None:
        super().__init__(env, lagrange)
        if not self.inner.codec.has_rows:
            raise ValueError(f"ResidualOverTapas needs row actions; task is {self.inner.task!r}")
        self.vm_wait_weight = float(vm_wait_weight)
        self.ctx = ControllerContext.from_env(self.inner)
        self.tapas = TapasController(self.ctx)
        self._proposed = _Proposed()
        self.shield = (Shield(self._proposed, self.ctx, self.inner.backend.telemetry)
                       if shielded else None)
        lay = self.inner.layout
        self.freqs = np.asarray(lay.freq_choices_mhz, dtype=float)
        self.n_slots = max(self.inner.codec.placement_slots, 1)
        gpus = lay.gpus_per_server
        self._idle_w = self.ctx.profiles[lay.tp_choices[0]].idle_power_w
        self._w_per_vm_gpu_w = gpus * (1.0 + self.tapas.overhead_per_gpu_w)
        self.action_space = spaces.MultiDiscrete([FREQ_LEVELS] * ROW_GROUPS + [len(GATE_LEVELS)])
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP,
                                            (len(RESIDUAL_THERMAL_OBSERVATION_NAMES),), np.float32)
        self.observation_names = RESIDUAL_THERMAL_OBSERVATION_NAMES
        self._base: ClusterAction | None = None
        self._groups: np.ndarray | None = None

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset the env, TAPAS and the shield; TAPAS proposes for the first interval."""
        self.tapas.reset()
        if self.shield is not None:
            self.shield.reset()
        fixed_obs, info = self.fixed.reset(seed=seed, options=options)
        self._raw = self.fixed._inner_obs
        return self._observe(fixed_obs), info

    def step(self, action):
        """Apply TAPAS's proposal under the agent's ceilings and gate (through the shield in training).

        Raises:
            ValueError: An action outside the space.
        """
        if self._raw is None:
            raise gym.error.ResetNeeded("ResidualOverTapas: call reset() before acting")
        mask = self.inner.action_masks()
        vec = self.inner.codec.encode_action(self.corrected_action(action))
        overridden = avoidable = False
        if self.shield is not None:
            self._proposed.vector = vec
            vec = self.shield.act(self._raw, mask)
            overridden = bool(self.shield.last_override)
            avoidable = any(not r.startswith("emergency") for r in self.shield.last_override)
        obs, reward, terminated, truncated, info = self.inner.step(vec)
        fixed_obs = self._fixed_observation(obs)
        waiting = float(info.get("vm_wait_s", 0.0)) / self.inner.layout.control_interval_s
        shaped = float(reward) - self.vm_wait_weight * waiting - self.lagrange * float(avoidable)
        info = {**info, "shield_override": float(overridden), "shield_override_avoidable": float(avoidable),
                "lagrange": self.lagrange, "env_reward": reward}
        return self._observe(fixed_obs), shaped, terminated, truncated, info

    # ------------------------------------------------------------------ as a controller
    def reset_base(self) -> None:
        """Start a new episode of the base controller (TAPAS forgets its history)."""
        self.tapas.reset()

    def corrected_action(self, action: np.ndarray) -> ClusterAction:
        """TAPAS's latest proposal under the agent's per-group ceilings and placement gate.

        Raises:
            ValueError: An action outside the space.
        """
        a = np.asarray(action, dtype=np.int64).reshape(-1)
        if a.shape != (ROW_GROUPS + 1,) or a.min() < 0 or a[:ROW_GROUPS].max() >= FREQ_LEVELS \
                or a[-1] >= len(GATE_LEVELS):
            raise ValueError(f"action must be {ROW_GROUPS} indices < {FREQ_LEVELS} and a gate < "
                             f"{len(GATE_LEVELS)}, got {action!r}")
        base = self._base
        ceiling = self.freqs[self.fixed.freq_map[a[:ROW_GROUPS]]][self._groups]
        cap = np.minimum(np.asarray(base.row_freq_cap_mhz, dtype=float), ceiling)
        servers = tuple(base.vm_servers or ())
        gate = GATE_LEVELS[a[-1]]
        if gate == "hold":
            servers = (None,) * len(servers)
        elif gate == "head":
            first = next((i for i, s in enumerate(servers) if s is not None), None)
            servers = tuple(s if i == first else None for i, s in enumerate(servers))
        return replace(base, row_freq_cap_mhz=cap, vm_servers=servers or base.vm_servers)

    # ------------------------------------------------------------------ pieces
    def _placed_row_load(self, base: ClusterAction) -> float:
        """TAPAS's estimate of the highest row load (power / limit) its placements leave (0: none)."""
        view, lay = self.ctx.view, self.inner.layout
        power = np.asarray(view.row_power_w(self._raw), dtype=float).copy()
        limit = np.maximum(np.asarray(view.row_limit_w(self._raw), dtype=float), 1.0)
        vm_w = view.pending_vms_expected_gpu_w(self._raw)
        rows = []
        for slot, server in enumerate(base.vm_servers or ()):
            if server is None or slot >= len(vm_w):
                continue
            r = int(lay.server_row[server])
            power[r] += self._w_per_vm_gpu_w * max(float(vm_w[slot]) - self._idle_w, 0.0)
            rows.append(r)
        return float(np.max(power[rows] / limit[rows])) if rows else 0.0

    def _observe(self, fixed_obs: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """The fixed observation plus TAPAS's proposal for the coming interval."""
        mask = self.inner.action_masks() if action_mask is None else action_mask
        self._base = self.tapas.decide(self._raw, mask)
        self._groups = self.fixed.row_groups(self._raw)
        span = max(len(self.freqs) - 1, 1)
        cap_idx = np.abs(np.asarray(self._base.row_freq_cap_mhz, dtype=float)[:, None]
                         - self.freqs[None, :]).argmin(axis=1) / span
        cap_pos = np.array([cap_idx[self._groups == g].mean() if np.any(self._groups == g) else 1.0
                            for g in range(ROW_GROUPS)])
        placed = sum(s is not None for s in (self._base.vm_servers or ())) / self.n_slots
        extra = np.concatenate([cap_pos, [placed, self._placed_row_load(self._base)]])
        return np.clip(np.concatenate([fixed_obs, extra]), -OBS_CLIP, OBS_CLIP).astype(np.float32)
