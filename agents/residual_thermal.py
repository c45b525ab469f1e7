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
* a placement gate over TAPAS's placements for the waiting VMs (`GATE_LEVELS`): hold them all,
  place the head of the queue only, move each where the forecast says it fits, or place as TAPAS
  proposes.

Routing, quantization and (with pool actions) the pools are TAPAS's.

Observation: the 87 layout-free values; per rank group, TAPAS's ceiling as a position in [0, 1];
the share of placement slots TAPAS fills and TAPAS's own estimate of the highest row load (power
over limit) its placements leave; and the **forecast**: per rank group, the highest ceiling
position the power and temperature prediction allows every row of the group (1 where TAPAS's
ceilings already keep it safe), and the share of TAPAS's placements it accepts:
``Box(-10, 10, (96,))``. The forecast is the shield's prediction (`Shield.forecast`, kept by a
forecaster of the wrapper's own, so that it is there in deployment too): what an operator's
capacity planner would show. An agent that ignores it is overridden in most intervals (the first
version of this agent, without it, in 27% at request level); one that heeds it is never
overridden (tested), so the agent can do the work itself and leave the shield a safety net.
What heeding alone buys is measured by `controllers.tapas_forecast` (TAPAS that always heeds
the forecast), the rule the agent is compared with.

Projection onto the forecast's safe set (`project`, on for checkpoints trained with it): the
corrected action leaves the agent only after `controllers.tapas_forecast.heed_forecast` (each row's
ceiling at most the highest one the forecast allows where a lower clock helps, each placed VM
moved where the forecast says it fits, or held). It is the agent's own safety layer (the
safety-layer idea of Dalal et al., "Safe Exploration in Continuous Action Spaces", 2018): it uses
the agent's forecaster, not the shield, so the shield stays an independent net (its own power
history, emergencies). `projection_rate` counts the decisions it changed, and the evaluation
reports it beside the shield's override rate, so that what the projection did is not credited to
the learned policy. Under projection the "forecast" gate is the same as "all".

Constrained learning, as for the energy agent (`agents.residual`): the reward is the thermal
task's reward, minus `SERVICE_WEIGHT` x the interval's service harm share (GPU-seconds not run as
their owner asked: every GPU of a waiting VM, thermally throttled and power-capped GPUs, over the
cluster's GPU-seconds; holding a VM is not free, and throttling is charged by its duration, not
only its onsets), minus ``lagrange`` x [the agent's proposal was unsafe: the projection changed
it, or the shield overrode it for a reason the action could have avoided] (``unsafe_proposal``),
the multiplier learned by `LagrangeUpdate` on the constraint "unsafe proposal rate <= 1 -
target" (`lagrange_callback` with ``key="unsafe_proposal"``): the policy is pushed to propose
safe actions itself, and the projection and the shield catch what it still gets wrong.
With ``scale_reward`` (how `train-thermal` trains now) the whole is divided by ``1 + lagrange``
(`agents.residual.lagrangian_reward`), so that PPO keeps learning when the multiplier climbs.
While a fault is declared the shield replaces every action (its emergency fallback), whatever
the agent does: those intervals are reported (``shield_override``) but not charged, or the
multiplier would grow without bound on any episode with a cooling failure. In training the
executed action is the shield's, as in deployment.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_cluster_gym.agents.checkpoint import RESIDUAL_KINDS
from llm_cluster_gym.agents.residual import ResidualWrapper, lagrangian_reward
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.shield import (
    HeldProposal,
    Shield,
    ShieldForecast,
    heed_forecast_placements,
)
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.controllers.tapas_forecast import heed_forecast
from llm_cluster_gym.envs.backend import ClusterAction
from llm_cluster_gym.envs.fixed_spaces import (
    FIXED_OBSERVATION_NAMES,
    FREQ_LEVELS,
    ROW_GROUPS,
)
from llm_cluster_gym.envs.observation import OBS_CLIP

GATE_LEVELS = ("hold", "head", "forecast", "all")
"""Placement gate, in action index order: no VM placed; the head of TAPAS's queue only; each of
TAPAS's placements moved where the power and temperature forecast says it fits (its own server if
it fits there, else the first legal one that fits, else it waits); all as TAPAS places them."""

RESIDUAL_THERMAL_KIND = RESIDUAL_KINDS[1]
"""`metadata.json` field `kind` of this agent's checkpoint (`agents.policy.load_policy` reads it)."""

RESIDUAL_THERMAL_OBSERVATION_NAMES = FIXED_OBSERVATION_NAMES + tuple(
    f"tapas.freq_cap_position[{g}]" for g in range(ROW_GROUPS)) + (
    "tapas.placement_share", "tapas.placed_row_load_max") + tuple(
    f"forecast.safe_ceiling_position[{g}]" for g in range(ROW_GROUPS)) + (
    "forecast.safe_placement_share",)
"""Every index of the observation."""

SERVICE_WEIGHT = 10.0
"""Reward cost of the interval's service harm share: the GPU-seconds that did not run as their
owner asked (a waiting VM's GPUs, thermally throttled and power-capped GPUs) over the cluster's
GPU-seconds. A waiting VM counts all its GPUs: a customer whose VM is held gets none of them."""


def service_harm_share(info: dict[str, Any], layout: Any) -> float:
    """An interval's GPU-seconds not run as their owner asked, over the cluster's GPU-seconds.

    Every GPU of a waiting VM (a server's GPUs per VM), thermally throttled GPUs and power-capped
    GPUs (from the env's ``info``), over every GPU of `layout` for one control interval.
    """
    harmed = (float(layout.gpus_per_server) * float(info.get("vm_wait_s", 0.0))
              + float(info.get("thermal_throttled_gpu_s", 0.0))
              + float(info.get("power_capped_gpu_s", 0.0)))
    return harmed / float(layout.n_servers * layout.gpus_per_server * layout.control_interval_s)


class RewardTotals(gym.Wrapper):
    """Sums, over an episode of any controller, the reward the thermal agent trains on, term by term.

    The thermal task's weighted terms (``info["reward_<term>"]``, `envs.reward.TERMS`) and the
    agent's service term (``-SERVICE_WEIGHT x service_harm_share``), the multiplier's term aside
    (it prices the agent's own proposals, which a rule does not make). Judging every contender by
    these totals says whether the reward ranks policies as the evaluation's figures do.
    """

    def __init__(self, env: gym.Env, service_weight: float = SERVICE_WEIGHT) -> None:
        from llm_cluster_gym.envs.reward import TERMS

        super().__init__(env)
        self._layout = env.unwrapped.layout
        self.service_weight = float(service_weight)
        self._keys = tuple(f"reward_{t}" for t in TERMS)
        self.totals: dict[str, float] = {}

    def reset(self, **kwargs):
        """Reset the env and the totals."""
        self.totals = dict.fromkeys((*self._keys, "reward_service", "reward_total"), 0.0)
        return self.env.reset(**kwargs)

    def step(self, action):
        """Step the env and add the interval's terms."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        service = -self.service_weight * service_harm_share(info, self._layout)
        for k in self._keys:
            self.totals[k] += float(info[k])
        self.totals["reward_service"] += service
        self.totals["reward_total"] += float(reward) + service
        return obs, reward, terminated, truncated, info


class ResidualOverTapas(ResidualWrapper):
    """A thermal-task `ClusterEnv` whose actions gate and cap the TAPAS-style controller.

    Args:
        env: A `ClusterEnv` with row actions (thermal or combined task), or a wrapper of one.
        lagrange: Initial multiplier of a shield override in the reward.
        shielded: Run the shield in the loop (training); False steps the corrected action as is
            (deployment, where the evaluation harness wraps its own shield around the policy).
        service_weight: Reward cost of the interval's service harm share (`SERVICE_WEIGHT`).
        project: Project every corrected action onto the forecast's safe set (`heed_forecast`:
            row ceilings at most the forecast's safe ones, placements where it says the VMs fit)
            before it leaves the agent; False executes the correction as the policy chose it.
        scale_reward: Divide the constrained reward by ``1 + lagrange`` (`lagrangian_reward`: the
            PPO-Lagrangian form, which keeps PPO learning when the multiplier climbs); False is
            the form the checkpoints before it trained on.
    """

    def __init__(self, env: gym.Env, lagrange: float = 0.0, shielded: bool = True,
                 service_weight: float = SERVICE_WEIGHT, project: bool = True,
                 scale_reward: bool = False) -> None:
        super().__init__(env, lagrange)
        if not self.inner.codec.has_rows:
            raise ValueError(f"ResidualOverTapas needs row actions; task is {self.inner.task!r}")
        if not service_weight >= 0.0:
            raise ValueError(f"service_weight must be >= 0, got {service_weight}")
        self.service_weight = float(service_weight)
        self.project = bool(project)
        self.scale_reward = bool(scale_reward)
        self.last_projected = False
        """Whether the projection changed the last corrected action (always False unprojected)."""
        self.decisions = 0
        self.projected = 0
        self.ctx = ControllerContext.from_env(self.inner)
        self.tapas = TapasController(self.ctx)
        self._proposed = HeldProposal("residual_tapas")
        telemetry = self.inner.backend.telemetry
        self.shield = Shield(self._proposed, self.ctx, telemetry) if shielded else None
        # The forecast the agent reads: the shield's prediction, kept by a shield of its own (one
        # reading per interval) so that it is there in deployment too, where no shield runs here.
        self.forecaster = Shield.forecaster(self.ctx, telemetry)
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
        self._forecast: ShieldForecast | None = None
        # Per agent ceiling level, its clock (the levels' mapping onto this layout's choices).
        self._level_mhz = self.freqs[self.fixed.freq_map[np.arange(FREQ_LEVELS)]]

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset the env, TAPAS and the shield; TAPAS proposes for the first interval."""
        self.tapas.reset()
        self.forecaster.reset()
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
        harm = self.service_harm_share(info)
        # The constraint: the agent's own proposal should need neither its projection nor the shield.
        unsafe = float(avoidable or self.last_projected)
        shaped = lagrangian_reward(float(reward) - self.service_weight * harm, unsafe, self.lagrange,
                                   self.scale_reward)
        info = {**info, "shield_override": float(overridden), "shield_override_avoidable": float(avoidable),
                "projected": float(self.last_projected), "unsafe_proposal": unsafe,
                "service_harm_share": harm, "lagrange": self.lagrange, "env_reward": reward}
        return self._observe(fixed_obs), shaped, terminated, truncated, info

    def service_harm_share(self, info: dict[str, Any]) -> float:
        """GPU-seconds of the interval not run as their owner asked, over the cluster's GPU-seconds.

        A waiting VM's GPUs (all of them), thermally throttled GPUs and power-capped GPUs.
        """
        return service_harm_share(info, self.inner.layout)

    # ------------------------------------------------------------------ as a controller
    def reset_base(self) -> None:
        """Start a new episode of the base controller and the forecast (both forget their history)."""
        self.tapas.reset()
        self.forecaster.reset()

    @property
    def projection_rate(self) -> float:
        """Share of corrected actions the projection onto the forecast's safe set changed."""
        return self.projected / self.decisions if self.decisions else 0.0

    def corrected_action(self, action: np.ndarray) -> ClusterAction:
        """TAPAS's latest proposal under the agent's per-group ceilings and placement gate.

        With `project`, the result is then projected onto the forecast's safe set
        (`controllers.tapas_forecast.heed_forecast`); `last_projected` says whether that changed it.

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
        elif gate == "forecast":
            servers = heed_forecast_placements(servers, self._forecast)
        out = replace(base, row_freq_cap_mhz=cap, vm_servers=servers or base.vm_servers)
        self.decisions += 1
        self.last_projected = False
        if self.project:
            safe = heed_forecast(out, self._forecast)
            self.last_projected = (not np.array_equal(safe.row_freq_cap_mhz, out.row_freq_cap_mhz)
                                   or tuple(safe.vm_servers or ()) != tuple(out.vm_servers or ()))
            self.projected += self.last_projected
            out = safe
        return out

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

    def _safe_ceiling_positions(self, fc: ShieldForecast) -> np.ndarray:
        """Per rank group, the highest ceiling level the forecast allows its rows, in [0, 1].

        1 where TAPAS's own ceilings already keep every row of the group safe.
        """
        lower = fc.rows_to_lower
        span = FREQ_LEVELS - 1
        out = np.ones(ROW_GROUPS)
        for g in range(ROW_GROUPS):
            rows = lower & (self._groups == g)
            if rows.any():
                allowed = float(np.min(fc.safe_row_freq_mhz[rows]))
                fits = np.flatnonzero(self._level_mhz <= allowed + 1e-9)
                out[g] = (fits.max() if fits.size else 0) / span
        return out

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
        self._forecast = fc = self.forecaster.forecast(self._raw, self._base, mask)
        extra = np.concatenate([cap_pos, [placed, self._placed_row_load(self._base)],
                                self._safe_ceiling_positions(fc),
                                [fc.safe_placements / fc.placements if fc.placements else 1.0]])
        return np.clip(np.concatenate([fixed_obs, extra]), -OBS_CLIP, OBS_CLIP).astype(np.float32)
