"""Train the thermal agent over the TAPAS-style controller, the shield in the loop (issue 20).

Training (`train`): PPO (stable-baselines3) on `ResidualOverTapas`, each episode drawn at reset
from the TAPAS scenarios of every size: `small_tapas` and `small_tapas_high` (10 minutes each) and
a window of `tapas_dc` (`TrainResidualThermalArgs.dc_window_h` hours of the datacenter, from a
random whole hour of one of the week's *training* days, `scripts.dynamo_week.TRAIN_DAYS`), with a
fresh seed each time, thermal task, aggregate serving (a `request_share` of the small-scenario
episodes at request level). The executed action is the shield's; the
reward carries the learned override multiplier (`LagrangeUpdate` with target
`override_target`), logged to TensorBoard (``constraint/lagrange``,
``constraint/unsafe_proposal``: the projection or the shield had to correct the proposal).
Observations are normalized (VecNormalize, frozen afterwards).
The checkpoint records the wall time, steps, commit and package versions.

Evaluation (`evaluate_residual_thermal`): `small_tapas_high` on the request-level model (where
`bench/control_quality.py` measures the override rate) and `tapas_dc` on the test days and seeds,
each unit (scenario or day, seed) run by the agent inside the shield, by TAPAS heeding the shield's
forecast (`controllers.tapas_forecast`, the rule the agent must beat) inside the shield, by the
TAPAS-style controller with and without the shield and by the unaware baseline: override and
projection rates, throttled and capped GPU-seconds, VM-hours waiting and hosted, energy and SLO
attainment, means with 95% t-intervals over units, and each policy's paired difference from TAPAS.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.agents.residual import (
    GroupedEpisodes,
    LagrangeUpdate,
    ResidualController,
    group_start_multipliers,
    train_constrained_ppo,
)
from llm_cluster_gym.agents.residual_thermal import (
    RESIDUAL_THERMAL_KIND,
    SERVICE_WEIGHT,
    ResidualOverTapas,
    RewardTotals,
)
from llm_cluster_gym.agents.units import map_units

CONTENDERS = ("agent", "tapas_forecast", "shield(tapas)", "tapas", "unaware")
"""What the evaluation runs per unit: the agent and TAPAS heeding the forecast, each inside the
shield; TAPAS inside the shield; TAPAS alone; the thermal- and power-unaware baseline alone (first
fit, no ceilings: the baseline of the TAPAS paper's reductions)."""

SMALL_SCENARIOS = ("small_tapas", "small_tapas_high")
"""Small TAPAS scenarios drawn in training (the datacenter windows are the rest)."""

CONSTRAINT_GROUPS = (*SMALL_SCENARIOS, "tapas_dc")
"""Scenario families each keeping its own multiplier: the constraint holds per scenario, so the
datacenter's long windows (most of the steps) cannot let the small scenarios' constraint lapse."""


@dataclass
class TrainResidualThermalArgs:
    """Train the thermal agent over the TAPAS-style controller with the shield in the loop."""

    steps: int = 400_000
    """Environment steps (control intervals) to train for."""
    dc_share: float = 0.3
    """Share of episodes drawn from `tapas_dc` windows (the rest: the small TAPAS scenarios)."""
    dc_window_h: float = 1.0
    """Hours of one `tapas_dc` training episode."""
    request_share: float = 0.25
    """Share of the small-scenario episodes served by the request-level model (the rest, and every
    datacenter window, by the aggregate one): the shield's power bound follows the burstier
    request-level power, and the override rate is measured there."""
    n_envs: int = 2
    """Environments stepped together (one process)."""
    override_target: float = 0.98
    """Share of intervals whose proposal must need neither the projection nor the shield, on
    average, emergencies aside (the multiplier's constraint)."""
    lagrange_lr: float = 10.0
    """Multiplier step per unit of unsafe-proposal rate above the budget, per rollout."""
    max_minutes: float = 120.0
    """Stop after this much wall time even if `steps` are not done (issue 20: two hours on 2 cores)."""
    seed: int = 0
    """Seed of the episode draws and PPO."""
    init: str | None = None
    """Checkpoint to fine-tune (continue training from its policy, observation statistics and
    multiplier); None trains from scratch."""
    no_project: bool = False
    """Train (and deploy) without projecting the agent's actions onto its forecast's safe set
    (`ResidualOverTapas.project`, on by default); recorded in the checkpoint's metadata."""
    no_scale_reward: bool = False
    """Train without dividing the constrained reward by 1 + the multiplier (by default it is:
    `agents.residual.lagrangian_reward`, the PPO-Lagrangian form; without it a multiplier in the
    hundreds stalled PPO; the shipped checkpoint's stages trained without). Recorded per stage."""
    no_normalize_reward: bool = False
    """Train without scaling rewards by the running standard deviation of the discounted return (by
    default they are: `train_constrained_ppo`'s ``normalize_reward``; a fine-tune so normalized
    starts the return statistics and the optimizer afresh; without it the fine-tune of 2026-12-02
    did not move its policy, approx-KL 1e-5 to 1e-4). Recorded per stage."""
    lagrange_init: float | None = None
    """Multiplier to start from (None: the `init` checkpoint's final one, or 0 from scratch)."""
    out: str = "checkpoints/residual_thermal"
    """Checkpoint directory."""
    tensorboard: str | None = "reports/tensorboard/residual_thermal"
    """TensorBoard log directory (None: no logging)."""


def _env_factory(rng: np.random.Generator, dc_share: float, dc_window_h: float,
                 request_share: float = 0.0, project: bool = True, scale_reward: bool = False):
    """A `ResidualOverTapas` over a freshly drawn scenario at every episode."""
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.scenario import load_scenario
    from llm_cluster_gym.scripts.dynamo_week import DAY_S, TRAIN_DAYS, window_scenario

    dc = load_scenario("tapas_dc")
    small = {name: load_scenario(name) for name in SMALL_SCENARIOS}

    def draw() -> tuple[str, ResidualOverTapas]:
        serving = "aggregate"
        if rng.random() < dc_share:
            group = "tapas_dc"
            day = int(rng.choice(TRAIN_DAYS))
            hour = int(rng.integers(0, 24 - int(math.ceil(dc_window_h)) + 1))
            s = window_scenario(dc, day * DAY_S + hour * 3600.0, 0.0, dc_window_h * 3600.0)
        else:
            group = str(rng.choice(SMALL_SCENARIOS))
            s = small[group]
            serving = "request" if rng.random() < request_share else "aggregate"
        return group, ResidualOverTapas(ClusterEnv(task="thermal", backend=SimCluster(
            s, serving_model=serving, auto_place_vms=False)),  # the policy places the VMs
            project=project, scale_reward=scale_reward)

    class RandomScenario(GroupedEpisodes):
        """Draws a new scenario and seed at every reset; each scenario family has its multiplier."""

        def __init__(self) -> None:
            super().__init__(draw, rng)

    return RandomScenario


def train(args: TrainResidualThermalArgs) -> Path:
    """Train and save the thermal agent; returns the checkpoint directory."""
    from llm_cluster_gym.agents.checkpoint import git_commit, package_versions, save_checkpoint

    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    from llm_cluster_gym.agents.policy import init_metadata

    before = init_metadata(args.init, RESIDUAL_THERMAL_KIND)
    start = group_start_multipliers(before, CONSTRAINT_GROUPS, args.lagrange_init)
    update = {g: LagrangeUpdate(slo_target=args.override_target, lr=args.lagrange_lr, value=start[g])
              for g in CONSTRAINT_GROUPS}
    model, vec = train_constrained_ppo(
        _env_factory(rng, args.dc_share, args.dc_window_h, args.request_share, not args.no_project,
                     not args.no_scale_reward),
        n_envs=args.n_envs,
        update=update, key="unsafe_proposal", steps=args.steps,
        max_minutes=args.max_minutes, seed=args.seed, tensorboard=args.tensorboard, init=args.init,
        normalize_reward=not args.no_normalize_reward)
    stages = [*before.get("stages", [{k: before[k] for k in ("steps", "train_wall_s", "scenarios")
                                      if k in before}] if before else []),
              {"steps": int(model.num_timesteps) - int(before.get("steps", 0)),
               "train_wall_s": round(time.time() - t0, 1), "dc_window_h": args.dc_window_h,
               "dc_share": args.dc_share, "request_share": args.request_share,
               "projects_onto_forecast": not args.no_project,
               "reward_scaled_by_multiplier": not args.no_scale_reward,
               "reward_normalized": not args.no_normalize_reward, "lagrange_start": start,
               "lagrange_end": {g: u.value for g, u in update.items()}}]
    meta = {
        "kind": RESIDUAL_THERMAL_KIND, "algo": "PPO", "task": "thermal",
        "scenarios": [*SMALL_SCENARIOS, f"tapas_dc ({args.dc_window_h:g} h windows of Mon, Wed, Sat; "
                                         f"{args.dc_share:.0%} of episodes)"],
        "request_share": args.request_share, "service_weight": SERVICE_WEIGHT,
        "projects_onto_forecast": not args.no_project,
        "steps": int(model.num_timesteps),
        "train_wall_s": round(sum(float(st["train_wall_s"]) for st in stages), 1),
        "stages": stages,
        "max_minutes": args.max_minutes, "lagrange": {g: u.value for g, u in update.items()},
        "override_target": args.override_target, "seed": args.seed,
        "commit": git_commit(), "versions": package_versions(),
        "trained_on": "2-core machine (the project's CI kind), one process",
    }
    return save_checkpoint(args.out, model, vec, meta)


class ResidualThermalPolicy(ResidualController):
    """The thermal agent as a controller.

    TAPAS corrected by the trained policy, on the layout-free observation of the env it is built
    on, projected onto its forecast's safe set when the checkpoint was trained so (metadata
    ``projects_onto_forecast``; checkpoints from before it were not); the shield, if any, is the
    harness's (``shield:ckpt:<dir>``).
    """

    name = "residual_thermal"
    kind = RESIDUAL_THERMAL_KIND

    def __init__(self, directory: str | Path, env: Any) -> None:
        from llm_cluster_gym.agents.policy import verified_residual_metadata

        meta = verified_residual_metadata(directory, self.kind)
        super().__init__(directory, ResidualOverTapas(
            env, shielded=False, project=bool(meta.get("projects_onto_forecast", False))), meta)

    @property
    def projection_rate(self) -> float:
        """Share of this controller's decisions its projection onto the forecast changed."""
        return self.res.projection_rate


def _mean_ci(values: list[float]) -> tuple[float, float]:
    from llm_cluster_gym.scripts.dynamo_week import mean_ci95

    return mean_ci95([float(v) for v in values])


THERMAL_KEYS = ("thermal_throttled_gpu_s", "power_capped_gpu_s", "iaas_throttled_gpu_s", "iaas_capped_gpu_s",
                "vm_wait_h", "vm_hours", "energy_kwh", "slo_attainment")
"""Episode summary figures the evaluation keeps per contender (the harm's IaaS part beside the
whole: on `tapas_dc` it is the part no SaaS action reaches, the VMs' GPUs in an aisle whose cooling
failed)."""


def _evaluate_unit(directory: str, label: str, scenario: Any, serving: str, seed: int) -> dict[str, Any]:
    """One unit (scenario or day, seed): every contender of `CONTENDERS` on the same episode."""
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.controllers.shield import Shield
    from llm_cluster_gym.controllers.tapas import TapasController
    from llm_cluster_gym.controllers.tapas_forecast import TapasForecastController
    from llm_cluster_gym.controllers.unaware import UnawareController
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.rollout import run_episode
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    row: dict[str, Any] = {"unit": label, "seed": seed}
    for name in CONTENDERS:
        env = ClusterEnv(task="thermal", backend=SimCluster(scenario, serving_model=serving,
                                                            auto_place_vms=False))
        totals = RewardTotals(env)
        ctx = ControllerContext.from_env(env)
        if name == "agent":
            inner = ResidualThermalPolicy(directory, env)
        elif name == "tapas_forecast":
            inner = TapasForecastController(ctx, env.backend.telemetry)
        elif name == "unaware":
            inner = UnawareController(ctx)
        else:
            inner = TapasController(ctx)
        policy = inner if name in ("tapas", "unaware") else Shield(inner, ctx, env.backend.telemetry)
        s = run_episode(totals, policy, seed).summary()
        row[name] = {k: float(s[k]) for k in THERMAL_KEYS}
        row[name]["reward_terms"] = dict(totals.totals)  # what the agent's reward says of this run
        row[name]["harm_gpu_s"] = row[name]["thermal_throttled_gpu_s"] + row[name]["power_capped_gpu_s"]
        row[name]["override_rate"] = float(getattr(policy, "override_rate", 0.0))
        row[name]["avoidable_override_rate"] = float(getattr(policy, "avoidable_override_rate", 0.0))
        row[name]["projection_rate"] = float(getattr(inner, "projection_rate", 0.0))
    return row


def evaluate_residual_thermal(directory: str | Path, seeds: tuple[int, ...] = (0, 1, 2),
                              dc_days: tuple[int, ...] = (0, 2, 5), dc_hours: float = 24.0,
                              dc_from_hour: float = 0.0, dc_seeds: tuple[int, ...] = (0, 1, 2),
                              jobs: int = 1, log: Any = None) -> dict[str, Any]:
    """The agent (shielded) against TAPAS with and without the shield, paired per unit.

    Units: `small_tapas_high` at request level per seed of `seeds`; whole `tapas_dc` days (aggregate
    model) per day of `dc_days` and seed of `dc_seeds` (a seed draws the day's cooling failures
    and VM arrivals). `jobs` processes run the units (the results do not depend on it). Besides
    each group's means, ``paired`` gives per contender its difference from TAPAS alone per unit
    (mean and 95% t-interval): the days differ by an order of magnitude, so the paired difference
    is the figure that can separate two policies. Each contender's row also holds
    ``reward_terms``: the reward the agent trains on, summed term by term over the run
    (`RewardTotals`), so that a reader can see whether that reward ranks the contenders as the
    figures do.
    """
    from llm_cluster_gym.envs.sim.scenario import load_scenario
    from llm_cluster_gym.scripts.dynamo_week import DAY_S, window_scenario

    units: list[tuple[str, Any, str, int]] = [
        ("small_tapas_high", load_scenario("small_tapas_high"), "request", seed) for seed in seeds]
    dc = load_scenario("tapas_dc")
    units += [(f"tapas_dc day {day}", window_scenario(dc, day * DAY_S + dc_from_hour * 3600.0, 0.0,
                                                       dc_hours * 3600.0), "aggregate", seed)
              for day in dc_days for seed in dc_seeds]
    args = [(str(directory), *unit) for unit in units]
    rows: list[dict[str, Any]] = map_units(_evaluate_unit, args, jobs,
                                           (lambda row: log(json.dumps(row))) if log else None)
    figures = (*THERMAL_KEYS, "harm_gpu_s", "override_rate", "avoidable_override_rate", "projection_rate")
    summary: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    for group in ("small_tapas_high", "tapas_dc"):
        sel = [r for r in rows if r["unit"].startswith(group)]
        summary[group] = {name: {k: _mean_ci([r[name][k] for r in sel]) for k in figures}
                          for name in CONTENDERS}
        paired[group] = {name: {k: _mean_ci([r[name][k] - r["tapas"][k] for r in sel])
                                for k in ("harm_gpu_s", "vm_wait_h", "vm_hours", "energy_kwh")}
                         for name in CONTENDERS if name != "tapas"}
    return {"rows": rows, "summary": summary, "paired_vs_tapas": paired}
