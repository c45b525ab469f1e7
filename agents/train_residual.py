"""Train the residual energy agent on the DynamoLLM week and judge it on held-out days (issue 20).

Training (`train`): PPO (stable-baselines3) on `ResidualOverManager` over windows of the week's
*training* days (Mon, Wed, Sat of `scripts.dynamo_week.TRAIN_DAYS`): each episode is a window of
`TrainResidualArgs.window_h` hours starting at a random whole hour of a random training day, with
the protocol's 30-minute burn-in, a fresh seed each time, aggregate serving. Observations are
normalized (VecNormalize, statistics frozen afterwards); the reward is the energy task's reward
minus the learned SLO multiplier times the violation (`LagrangeUpdate`), logged to TensorBoard
(``constraint/lagrange``). The checkpoint (`agents.checkpoint.save_checkpoint`) records the
wall time it took, the commit and the steps.

Evaluation (`evaluate_residual`): the *test* days (Sun, Tue, Fri) x seeds, each a whole day
after the burn-in, exactly as `bench/dynamo_week.py` runs the manager, paired per (day, seed)
with the manager: energy ratio (agent / manager) and SLO attainment, day means with a 95%
t-interval over days.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llm_cluster_gym.agents.checkpoint import RESIDUAL_KINDS
from llm_cluster_gym.agents.residual import (
    GroupedEpisodes,
    LagrangeUpdate,
    Objective,
    ResidualController,
    ResidualOverManager,
    group_start_multipliers,
    train_constrained_ppo,
)
from llm_cluster_gym.agents.units import map_units
from llm_cluster_gym.scripts.dynamo_week import WeekArgs

Constraint = Literal["mean", "per-day"]
"""How `TrainResidualArgs.constraint` keeps the SLO: one multiplier, or one per training day."""

RESIDUAL_KIND = RESIDUAL_KINDS[0]
"""`metadata.json` field `kind` of a residual agent's checkpoint (`agents.policy.load_policy` reads it)."""
BURN_IN_S = WeekArgs.burn_in_s
"""The week protocol's burn-in before the measured span (`bench/dynamo_week.py`)."""

MANAGER_KWARGS = {"slo_margin": WeekArgs.slo_margin, "peak_headroom": WeekArgs.peak_headroom}
"""The manager as the week benchmark runs it (its defaults, chosen on the validation day)."""


@dataclass
class TrainResidualArgs:
    """Train the residual energy agent over the DynamoLLM week's training days."""

    steps: int = 400_000
    """Environment steps (control intervals) to train for."""
    window_h: float = 6.0
    """Hours of one training episode (after the burn-in)."""
    n_envs: int = 2
    """Environments stepped together (one process)."""
    slo_target: float = 0.995
    """SLO attainment per interval the multiplier enforces on average."""
    lagrange_lr: float = 20.0
    """Multiplier step per unit of violation above the budget, per rollout."""
    max_minutes: float = 120.0
    """Stop training after this much wall time even if `steps` are not done (issue 20: at most
    two hours on 2 cores); the checkpoint records the steps reached."""
    seed: int = 0
    """Seed of the windows, the episodes and PPO."""
    out: str = "checkpoints/residual_energy"
    """Checkpoint directory."""
    tensorboard: str | None = "reports/tensorboard/residual_energy"
    """TensorBoard log directory (None: no logging)."""
    serving_model: Literal["aggregate", "request"] = "aggregate"
    """Serving model of the training windows: aggregate (fast), or request (per-request TTFT and
    TBT: what the aggregate model misjudges, for fine-tuning with --init)."""
    init: str | None = None
    """Continue from this residual energy checkpoint (its policy, observation statistics and
    multiplier); the new checkpoint's metadata lists both stages and their wall time."""
    objective: Objective = "task"
    """What the reward keeps of the env's reward besides the multiplier's SLO term
    (`agents.residual.Objective`): "task", the energy task's reward with its fixed SLO weight
    (stage 1 of the shipped agent), or "energy", its energy term only (the SLO priced by the
    multiplier alone)."""
    lagrange_init: float | None = None
    """Multiplier(s) to start from (None: the `init` checkpoint's final one(s), or 0 from
    scratch). With ``--objective energy`` after a stage trained on the task's reward, the task's
    fixed SLO weight (4) starts the SLO at the price the policy learnt under."""
    constraint: Constraint = "mean"
    """How the SLO constraint is kept: "mean", one multiplier on the mean violation over all
    training windows (stage 1 of the shipped agent, the earlier lineage's stages 2-3), or
    "per-day", one multiplier per training day (Mon, Wed, Sat), each on its own day's mean
    violation, so that a day whose SLO is cheap to buy (the weekend trough) cannot pay for
    another's (single envs only: a batched episode runs one window)."""
    batched: int = 0
    """Copies on the batched simulator (`agents.batched_residual.BatchedResidualVecEnv`: every copy
    of an episode runs the same window with its own seed; aggregate serving only); 0: ``n_envs``
    single envs, each with its own window."""


def draw_window(rng: np.random.Generator, window_h: float) -> tuple[str, Any]:
    """A training window and its day's name (``DAY_NAMES``: the group of the "per-day" constraint).

    The window is `window_h` hours at a random whole hour of a random training day, after the burn-in.
    """
    from llm_cluster_gym.envs.sim.scenario import load_scenario
    from llm_cluster_gym.scripts.dynamo_week import DAY_NAMES, DAY_S, TRAIN_DAYS, window_scenario

    day = int(rng.choice(TRAIN_DAYS))
    hour = int(rng.integers(0, 24 - int(math.ceil(window_h)) + 1))
    return DAY_NAMES[day], window_scenario(load_scenario("dynamo_week"), day * DAY_S + hour * 3600.0,
                                           BURN_IN_S, window_h * 3600.0)


def random_window(rng: np.random.Generator, window_h: float) -> Any:
    """`draw_window`'s scenario alone (the batched env's ``windows``)."""
    return draw_window(rng, window_h)[1]


def train_day_names() -> tuple[str, ...]:
    """The training days' names, the groups of the "per-day" constraint."""
    from llm_cluster_gym.scripts.dynamo_week import DAY_NAMES, TRAIN_DAYS

    return tuple(DAY_NAMES[d] for d in TRAIN_DAYS)


def start_multipliers(before: dict[str, Any], constraint: str,
                      lagrange_init: float | None = None) -> float | dict[str, float]:
    """The multiplier(s) a stage starts from.

    `lagrange_init`, else the `init` checkpoint's ``lagrange`` (0 without one). A single value
    starts every day of a "per-day" stage; per-day values continuing as "mean"
    start from their mean (a checkpoint records which it was).
    """
    if constraint == "per-day":
        return group_start_multipliers(before, train_day_names(), lagrange_init)
    value = before.get("lagrange", 0.0) if lagrange_init is None else float(lagrange_init)
    return float(np.mean(list(value.values()))) if isinstance(value, dict) else float(value)


BATCHED_N_STEPS = 128
"""PPO steps per copy per rollout on the batched env (64 copies: 8,192 steps per update, the
order of the single envs' 2 x 1,024)."""


def _window_env_factory(rng: np.random.Generator, window_h: float, serving: str = "aggregate",
                        objective: str = "task"):
    """A `ResidualOverManager` over a random training window; a new one at every episode."""
    from llm_cluster_gym.scripts.dynamo_week import make_env

    def draw() -> tuple[str, ResidualOverManager]:
        day, scenario = draw_window(rng, window_h)
        return day, ResidualOverManager(make_env(scenario, serving), manager_kwargs=MANAGER_KWARGS,
                                        objective=objective)

    class RandomWindow(GroupedEpisodes):
        """Draws a new window (day, start hour) and seed at every reset; its group is the day.

        With one multiplier for all days the group is ignored; a "per-day" constraint (one
        update per day) counts each violation toward its day.
        """

        def __init__(self) -> None:
            super().__init__(draw, rng)

    return RandomWindow


def train(args: TrainResidualArgs) -> Path:
    """Train (or, with ``args.init``, fine-tune) and save the residual agent; returns its directory.

    Raises:
        CheckpointError: ``args.init`` is not a residual energy checkpoint (before any work).
    """
    from llm_cluster_gym.agents.checkpoint import git_commit, package_versions, save_checkpoint
    from llm_cluster_gym.agents.policy import init_metadata

    before = init_metadata(args.init, RESIDUAL_KIND)
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    if args.batched and args.constraint == "per-day":
        raise ValueError("constraint 'per-day' needs single envs (batched 0): a batched episode "
                         "runs one window")
    start = start_multipliers(before, args.constraint, args.lagrange_init)
    if isinstance(start, dict):
        update: LagrangeUpdate | dict[str, LagrangeUpdate] = {
            day: LagrangeUpdate(slo_target=args.slo_target, lr=args.lagrange_lr, value=v)
            for day, v in start.items()}
    else:
        update = LagrangeUpdate(slo_target=args.slo_target, lr=args.lagrange_lr, value=start)
    if args.batched:
        from llm_cluster_gym.agents.batched_residual import BatchedResidualVecEnv

        venv = BatchedResidualVecEnv(args.batched, lambda: random_window(rng, args.window_h),
                                     seed=args.seed, manager_kwargs=MANAGER_KWARGS,
                                     objective=args.objective)
        model, vec = train_constrained_ppo(
            None, n_envs=args.batched, update=update, key="slo_violation", steps=args.steps,
            max_minutes=args.max_minutes, seed=args.seed, tensorboard=args.tensorboard,
            init=args.init, vec_env=venv, n_steps=BATCHED_N_STEPS)
    else:
        model, vec = train_constrained_ppo(
            _window_env_factory(rng, args.window_h, args.serving_model, args.objective),
            n_envs=args.n_envs, update=update, key="slo_violation", steps=args.steps,
            max_minutes=args.max_minutes, seed=args.seed, tensorboard=args.tensorboard, init=args.init)
    wall_s = round(time.time() - t0, 1)
    end = ({day: u.value for day, u in update.items()} if isinstance(update, dict)
           else update.value)
    steps_before = int(before.get("steps", 0))
    stage = {"serving_model": args.serving_model, "window_h": args.window_h, "seed": args.seed,
             "batched_copies": args.batched,
             "steps": int(model.num_timesteps) - steps_before, "train_wall_s": wall_s,
             "lagrange_start": start, "lagrange_end": end, "slo_target": args.slo_target,
             "objective": args.objective, "constraint": args.constraint, "init": args.init}
    earlier = before.get("stages") or ([{
        "serving_model": "aggregate", "window_h": before.get("window_h"), "seed": before.get("seed"),
        "steps": steps_before, "train_wall_s": before.get("train_wall_s"), "lagrange_start": 0.0,
        "lagrange_end": before.get("lagrange"), "slo_target": before.get("slo_target"),
        "init": None}] if before else [])
    meta = {
        "kind": RESIDUAL_KIND, "algo": "PPO", "task": "energy", "scenario": "dynamo_week",
        "train_days": "Mon, Wed, Sat", "window_h": args.window_h, "steps": int(model.num_timesteps),
        "train_wall_s": round(float(before.get("train_wall_s", 0.0)) + wall_s, 1),
        "max_minutes": args.max_minutes, "lagrange": end,
        "slo_target": args.slo_target, "objective": args.objective, "constraint": args.constraint,
        "manager_kwargs": MANAGER_KWARGS, "seed": args.seed,
        "serving_model": args.serving_model, "stages": [*earlier, stage],
        "commit": git_commit(), "versions": package_versions(),
        "trained_on": "2-core machine (the project's CI kind), one process",
    }
    return save_checkpoint(args.out, model, vec, meta)


class ResidualPolicy(ResidualController):
    """The residual energy agent as a controller.

    The manager (as the week benchmark runs it) corrected by the trained policy, on the
    layout-free observation of the env it is built on.
    """

    name = "residual"
    kind = RESIDUAL_KIND

    def __init__(self, directory: str | Path, env: Any) -> None:
        super().__init__(directory, ResidualOverManager(env, manager_kwargs=MANAGER_KWARGS))


def _evaluate_residual_unit(directory: str, day: int, seed: int, hours: float, start_h: float,
                            serving: str) -> dict[str, Any]:
    """One (day, seed) unit: the manager and the agent over the same requests."""
    from llm_cluster_gym.envs.sim.demand import pools_for
    from llm_cluster_gym.envs.sim.scenario import load_scenario
    from llm_cluster_gym.scripts.dynamo_week import DAY_S, _measure, manager, window_scenario

    s = window_scenario(load_scenario("dynamo_week"), day * DAY_S + start_h * 3600.0, BURN_IN_S,
                        hours * 3600.0)
    m = _measure("dynamo", day, seed, s, manager(**MANAGER_KWARGS), BURN_IN_S, "adaptive", serving)
    built: list[ResidualPolicy] = []

    def agent(env: Any) -> ResidualPolicy:
        built.append(ResidualPolicy(directory, env))
        return built[-1]

    a = _measure("residual", day, seed, s, agent, BURN_IN_S, "residual", serving)
    pools = list(pools_for(s.workload.pools).names)
    return {"day": day, "seed": seed, "start_h": start_h, "hours": hours, "serving": serving,
            "energy_ratio": a.summary["energy_kwh"] / m.summary["energy_kwh"],
            "agent_slo": a.summary["slo_attainment"], "manager_slo": m.summary["slo_attainment"],
            "agent_kwh": a.summary["energy_kwh"], "manager_kwh": m.summary["energy_kwh"],
            "clock_moves": built[-1].res.clock_moves.shares(pools)}


def evaluate_residual(directory: str | Path, days: tuple[int, ...] = (0, 2, 5),
                      seeds: tuple[int, ...] = (0, 1), hours: float = 24.0, start_h: float = 0.0,
                      serving: str = "aggregate", jobs: int = 1) -> dict[str, Any]:
    """The agent against the manager on held-out days, paired per (day, seed).

    Each unit measures `hours` from `start_h` of its day (after the protocol's burn-in) under
    the `serving` model ("request": per-request TTFT and TBT). `jobs` processes run the units
    (the results do not depend on it).
    """
    from llm_cluster_gym.scripts.dynamo_week import mean_ci95

    units = [(str(directory), day, seed, hours, start_h, serving) for day in days for seed in seeds]
    rows = map_units(_evaluate_residual_unit, units, jobs,
                     lambda row: print(json.dumps(row), flush=True))
    out = {}
    for key in ("energy_ratio", "agent_slo", "manager_slo"):
        per_day = [float(np.mean([r[key] for r in rows if r["day"] == d])) for d in days]
        out[key] = mean_ci95(per_day)  # seeds of a day averaged first: days are the samples
    return {"rows": rows, "summary": out}
