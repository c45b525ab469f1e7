"""DynamoLLM's evaluation on the 2024 conversation week: held-out days, baselines, intervals.

The protocol (issue 18; Stojkovic et al., "DynamoLLM", HPCA 2025, sec. 6):

* **Days.** The conversation week starts on Sunday 2024-05-12 (`envs/data/traces/azure2024`).
  Training days (Mon, Wed, Sat) are where request statistics may be learned, the validation
  day (Thu) is where the best fixed configuration is searched, and the test days (Sun, Tue,
  Fri: the week's trough, its peak day and a lighter weekday, each with its own daily peak and
  trough) are where every policy is measured. The three sets never overlap. The controllers'
  request-length statistics come from the week's length sampler, which is the same every day
  (the 2023 rows reweighted to the 2024 prompt CDF; `envs/sim/week_trace.py`): nothing about a
  test day's arrivals reaches a controller before the day is simulated, except where a
  baseline's definition says so (SinglePool and MultiPool static are provisioned for the
  evaluated day's peak, as in DynamoLLM; the MILP plan knows the future by definition).
* **Burn-in.** Each run starts `burn_in_s` before the day from the scenario's static layout;
  the policy moves to its own steady layout during the burn-in, which is not measured. Only the
  day itself is reported. Requests still in flight at the end count as violations.
* **Baselines.** `single_pool`: one pool for every request (the scenario with pool set
  `single`), every instance TP 8 at the maximum clock, servers provisioned for the day's peak.
  As in DynamoLLM, every request is judged by its request type's SLOs whatever pool serves it:
  the SLO classes are the length pools' own (`serving.slo_classes`, from the scenario's by-input
  pools), so SinglePool is held to the SLOs the pooled policies meet, and is sized so that
  every class meets them. `static` (MultiPool static): the length pools, TP 8,
  maximum clock, each pool's servers provisioned for its own peak of the day. `best_fixed`:
  per pool the (TP, clock) and server count with the least predicted energy on the validation
  day that meets the SLO at that day's peak, then held fixed. `dynamo`: the DynamoLLM-style
  manager (`controllers/dynamo.py`). Provisioning uses the manager's planning model
  (`controllers/perfmodel.py`) at its SLO margin, rounded up to a server split the action
  codec can execute; servers a layout does not use power off.
* **Statistics.** One unit = one (test day, seed). Savings are paired per unit against
  `single_pool`. Seeds of one day share its load curve and differ only in the draws within
  minutes, so they are not independent samples: each figure is first averaged over a day's
  seeds, and tables give the mean and a 95% Student-t interval over the test days.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_cluster_gym.envs.sim.scenario import PoolSpec, Scenario, load_scenario

if TYPE_CHECKING:
    from llm_cluster_gym.controllers.perfmodel import PoolPrediction

DAY_S = 86_400.0
WEEK_S = 7 * DAY_S
DAY_NAMES = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
"""Weekday of each day of the conversation week (it starts Sunday 2024-05-12 00:00 UTC)."""
TRAIN_DAYS = (1, 3, 6)
VALIDATION_DAYS = (4,)
TEST_DAYS = (0, 2, 5)
PLAN_WINDOW_S = 300.0
"""Window over which arrival rates are averaged for provisioning (DynamoLLM plans on minutes)."""
MANAGER_CANDIDATES = ((0.4, 1.0), (0.4, 1.25), (0.6, 1.0), (0.6, 1.25), (0.8, 1.0), (0.8, 1.25))
"""(SLO margin, peak headroom) pairs of the manager tried on the validation day."""
MARGIN_TARGET_SLO = 0.995
"""Validation-day SLO attainment a candidate must keep to be chosen (half a point of headroom
over the 0.99 bar: test days have other peaks)."""
MANAGER_SELECTION = {(0.6, 1.25): (6918.0, 0.99927), (0.6, 1.1): (6587.0, 0.99726),
                     (0.6, 1.0): (6355.0, 0.99617), (0.8, 1.0): (5840.0, 0.9544)}
"""The selection behind the defaults `WeekArgs.slo_margin` 0.6 and `peak_headroom` 1.0: the
manager on the validation day (Thu), seed 0, 30-minute burn-in, (server energy kWh, SLO
attainment) per (margin, headroom); measured 2026-11-30 on this project's 2-core machine
(`python bench/dynamo_week.py --select-manager` re-runs the selection over
`MANAGER_CANDIDATES`). The least energy among the candidates keeping `MARGIN_TARGET_SLO` wins."""
POLICIES = ("single_pool", "static", "best_fixed", "dynamo")
BASELINE = "single_pool"
REPORTED = ("energy_kwh", "gpu_energy_kwh", "facility_energy_kwh", "carbon_kg", "cost_usd",
            "servers_powered_mean", "slo_attainment", "ttft_p99_s", "tbt_p99_s")
SAVED = ("energy_kwh", "cost_usd", "carbon_kg")


def available_policies() -> tuple[str, ...]:
    """The policies this installation can run (`milp` needs the MILP planner)."""
    try:
        import llm_cluster_gym.controllers.milp_plan  # noqa: F401
    except ImportError:
        return POLICIES
    return (*POLICIES, "milp")


class WeekEvalError(ValueError):
    """Bad input to the week evaluation; the message names the field and the value."""


@dataclass
class WeekArgs:
    """Compare energy policies on held-out days of the 2024 conversation week.

    Runs each policy over each test day and seed on the aggregate model, prints a table with
    95% confidence intervals and the savings against SinglePool, and writes
    `report.md`, `results.json` and a plot of power and powered servers over a day.
    """

    scenario: str = "dynamo_week"
    """Week scenario (a 2024 week trace; one episode = one day)."""
    days: tuple[int, ...] = TEST_DAYS
    """Days of the week to evaluate (0 = Sunday); must not be training or validation days."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds per day."""
    policies: tuple[str, ...] = POLICIES
    """Policies to run (`single_pool` is the baseline of the savings and must be included)."""
    burn_in_s: float = 1800.0
    """Unmeasured time before each day (the policy reaches its steady layout)."""
    hours: float = 24.0
    """Measured hours of each day from midnight UTC (less for a quick look)."""
    slo_margin: float = 0.6
    """SLO margin of the manager and of every provisioning rule (fraction of the SLO the
    planning model's predicted TTFT and TBT may use); chosen on the validation day, see
    `MANAGER_SELECTION`."""
    peak_headroom: float = 1.0
    """The manager's multiplier on its forecast peak; chosen with `slo_margin`."""
    cross_check_hours: float = 0.0
    """Also run this many hours of the first test day at request level for each policy and
    report the aggregate model's own error (0: skip; else in (0, 24], whole 5-minute windows; about 2
    minutes per policy and hour)."""
    select_manager: bool = False
    """Select `slo_margin` and `peak_headroom` again on the validation day before evaluating
    (one day run per candidate of `MANAGER_CANDIDATES`)."""
    out: str = "reports/dynamo-week"
    """Output folder."""
    no_progress: bool = False
    """Hide the progress messages."""


# ----------------------------------------------------------------------------- scenarios
def window_scenario(base: Scenario, measured_from_s: float, burn_in_s: float,
                    measured_s: float) -> Scenario:
    """`base` over `measured_s` from `measured_from_s` of the week, started `burn_in_s` earlier.

    The week repeats, so a burn-in before Sunday midnight is the end of Saturday.
    """
    start = (measured_from_s - burn_in_s) % WEEK_S
    return dataclasses.replace(base, duration_s=measured_s + burn_in_s,
                               workload=dataclasses.replace(base.workload, start_s=start))


def day_scenario(base: Scenario, day: int, burn_in_s: float, measured_s: float = DAY_S) -> Scenario:
    """`base` over `measured_s` of one day from midnight, started `burn_in_s` earlier."""
    if not 0 <= day < 7:
        raise WeekEvalError(f"days: {day!r} is not a day of the week (0..6)")
    return window_scenario(base, day * DAY_S, burn_in_s, measured_s)


def with_pools(s: Scenario, pools: Sequence[PoolSpec], pool_set: str | None = None) -> Scenario:
    """`s` starting in (and, run without a policy, holding) the given pool configurations."""
    workload = s.workload if pool_set is None else dataclasses.replace(s.workload, pools=pool_set)
    return dataclasses.replace(s, workload=workload,
                               serving=dataclasses.replace(s.serving, pools=tuple(pools)))


def single_pool_scenario(s: Scenario) -> Scenario:
    """`s` with one pool for every request, each request judged by its length pool's SLOs.

    The SLO classes are `s`'s own (`serving.slo_classes`), or else its by-input pools' edges and
    SLOs (`classes_of_input_pools`). The pool's own SLO, derived by the scenario rule from all
    prompts, judges nothing.
    """
    from llm_cluster_gym.envs.sim.slo_classes import classes_of_input_pools
    from llm_cluster_gym.envs.sim.slo_derivation import derive_slos

    sv = s.serving
    classes = sv.slo_classes or classes_of_input_pools(sv, s.workload.pools)
    first = sv.pools[0]
    draft = with_pools(s, [dataclasses.replace(first, n_instances=0)], "single")
    (slo,) = derive_slos(draft)
    one = with_pools(s, [dataclasses.replace(first, slo_ttft_s=slo.slo_ttft_s,
                                             slo_tbt_s=slo.slo_tbt_s)], "single")
    return dataclasses.replace(one, serving=dataclasses.replace(one.serving, slo_classes=classes))


def class_targets(s: Scenario) -> tuple[tuple[tuple[float, float, float], ...], ...]:
    """Per pool of `s`, its SLO classes' (P90 prompt tokens, TTFT SLO, TBT SLO) (none: no classes).

    Only the classes a pool's requests fall in (from the source trace, as the controllers'
    pool statistics are); the P90 prompts are those of the class inside the pool.
    """
    from llm_cluster_gym.envs.sim.slo_classes import SloClasses, trace_class_mix

    classes = SloClasses.from_serving(s.serving)
    if classes is None:
        return tuple(() for _ in s.serving.pools)
    mix = trace_class_mix(s.workload.trace, s.workload.pools, classes.input_edges)
    return tuple(tuple((float(mix.p90_input_tokens[p, c]), float(classes.slo_ttft_s[c]),
                        float(classes.slo_tbt_s[c]))
                       for c in range(classes.n_classes) if mix.share[p, c] > 0)
                 for p in range(len(s.serving.pools)))


# ----------------------------------------------------------------------------- environments
def make_env(s: Scenario, serving: str = "aggregate") -> Any:
    """A `ClusterEnv` (energy task) over a fresh `SimCluster` of `s` (aggregate model by default)."""
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    return ClusterEnv(task="energy", backend=SimCluster(s, serving_model=serving, auto_place_vms=True))


def window_rates(env: Any, seed: int, start_s: float, duration_s: float,
                 window_s: float = PLAN_WINDOW_S) -> np.ndarray:
    """True arrival rate per pool (req/s) of each `window_s` window of the episode's span.

    The episode of `seed` is drawn (a reset) and its arrivals read through the simulator's
    `arrival_oracle`; shape (windows, pools).
    """
    env.reset(seed=seed)
    oracle = env.unwrapped.backend.describe().arrival_oracle
    n = int(duration_s // window_s)
    return oracle(start_s, n, window_s)


# ----------------------------------------------------------------------------- provisioning
@dataclass(frozen=True)
class Provisioner:
    """Sizes pools with the DynamoLLM manager's planning model (`controllers/perfmodel.py`).

    Args:
        ctx: Controller context of the scenario the pools run in.
        slo_margin: Predicted TTFT and TBT must stay within this fraction of the SLO (the
            manager's default, so that every policy is sized by one rule).
        classes: Per pool, its SLO classes (`class_targets`); a pool with classes must meet
            each class's SLOs within the margin (TTFT from the class's P90 prompt plus the
            pool's wait) instead of its own.
    """

    ctx: Any
    slo_margin: float = 0.4
    classes: tuple[tuple[tuple[float, float, float], ...], ...] = ()

    def _predict(self, pool: int, tp: int, freq_mhz: float, servers: np.ndarray | int,
                 rate_rps: np.ndarray | float) -> tuple[np.ndarray, PoolPrediction]:
        """(within the margin?, prediction) of `servers` servers at TP `tp`, largest batch cap."""
        from llm_cluster_gym.controllers.perfmodel import PoolModel

        lay = self.ctx.layout
        n, batch = servers * (lay.gpus_per_server // tp), max(lay.batch_choices)
        targets = self.classes[pool] if self.classes else ()
        if not targets:
            return PoolModel(self.ctx, pool, tp, freq_mhz).within_slo(rate_rps, n, batch, self.slo_margin)
        ok = None
        for p90, ttft_s, tbt_s in targets:  # power does not depend on the class: any prediction
            ok_c, pred = PoolModel(self.ctx, pool, tp, freq_mhz, p90, (ttft_s, tbt_s)).within_slo(
                rate_rps, n, batch, self.slo_margin)
            ok = ok_c if ok is None else ok & ok_c
        return ok, pred

    def servers_needed(self, pool: int, tp: int, freq_mhz: float, rate_rps: float) -> int | None:
        """Fewest servers serving `rate_rps` within the margin, or None if even all cannot."""
        if rate_rps <= 0:
            return 0
        servers = np.arange(1, self.ctx.codec.n_saas_servers + 1)
        ok, _ = self._predict(pool, tp, freq_mhz, servers, rate_rps)
        return int(servers[np.argmax(ok)]) if ok.any() else None

    def server_power_w(self, pool: int, tp: int, freq_mhz: float, servers: int,
                       rate_rps: np.ndarray) -> np.ndarray:
        """Predicted power (W) of `servers` servers serving each rate of `rate_rps`."""
        _, pred = self._predict(pool, tp, freq_mhz, servers, np.asarray(rate_rps, dtype=float))
        return servers * self.ctx.server.server_power_w(self.ctx.layout.gpus_per_server * pred.gpu_power_w,
                                                        self.ctx.profiles[tp].idle_power_w)

    def executable(self, servers: Sequence[int]) -> np.ndarray:
        """The smallest split the action codec executes that gives each pool at least `servers`.

        Raises:
            WeekEvalError: No split holds that many (the load exceeds the cluster).
        """
        splits = self.ctx.codec.server_splits()
        ok = np.all(splits >= np.asarray(servers)[None, :], axis=1)
        if not ok.any():
            raise WeekEvalError(f"provisioning: {list(servers)} servers per pool exceed what the "
                                f"{self.ctx.codec.n_saas_servers} SaaS servers can hold")
        fit = splits[ok]
        return fit[np.argmin(fit.sum(axis=1))].copy()

    def pools(self, servers: np.ndarray, tps: Sequence[int], freqs: Sequence[float],
              template: Sequence[PoolSpec]) -> list[PoolSpec]:
        """Pool specs for this layout (SLOs from `template`), largest batch cap."""
        gpus, batch = self.ctx.layout.gpus_per_server, max(self.ctx.layout.batch_choices)
        return [dataclasses.replace(t, n_instances=int(n) * (gpus // int(tp)), tp=int(tp),
                                    freq_mhz=float(f), max_batch=int(batch))
                for t, n, tp, f in zip(template, servers, tps, freqs, strict=True)]

    def peak_layout(self, peak_rps: np.ndarray, template: Sequence[PoolSpec]) -> list[PoolSpec]:
        """Every pool at the largest TP and the maximum clock, sized for its peak rate."""
        lay = self.ctx.layout
        tp, f = max(lay.tp_choices), lay.max_freq_mhz
        need = []
        for p, r in enumerate(peak_rps):
            n = self.servers_needed(p, tp, f, float(r))
            need.append(self.ctx.codec.n_saas_servers if n is None else n)
        return self.pools(self.executable(need), [tp] * len(need), [f] * len(need), template)

    def best_fixed_layout(self, rates: np.ndarray, window_s: float,
                          template: Sequence[PoolSpec]) -> list[PoolSpec]:
        """Per pool, the (TP, clock, servers) with the least predicted energy over `rates`.

        Each candidate is sized for the peak of `rates` (windows x pools); its energy is the
        predicted power at every window's rate times the window.
        """
        lay = self.ctx.layout
        choice = []
        for p in range(rates.shape[1]):
            peak = float(rates[:, p].max())
            best = None
            for tp in lay.tp_choices:
                for f in lay.freq_choices_mhz:
                    n = self.servers_needed(p, tp, f, peak)
                    if n is None:
                        continue
                    power_w = self.server_power_w(p, tp, f, n, rates[:, p]) if n else np.zeros(1)
                    energy = float(power_w.sum() * window_s)
                    if best is None or energy < best[0]:
                        best = (energy, n, tp, f)
            if best is None:
                raise WeekEvalError(f"best_fixed: pool {p} peak {peak:.1f} req/s fits no configuration")
            choice.append(best)
        servers = self.executable([c[1] for c in choice])
        return self.pools(servers, [c[2] for c in choice], [c[3] for c in choice], template)


# ----------------------------------------------------------------------------- runs
@dataclass
class DayRun:
    """One policy on one (day, seed): its measured summary and its per-interval series."""

    policy: str
    day: int
    seed: int
    summary: dict[str, float]
    power_kw: np.ndarray
    servers_powered: np.ndarray
    layout: str
    wall_s: float
    bound_kwh: float | None = None
    """The planning-model optimum of the measured span (milp runs only; see `planning_bound`)."""


def _measure(policy: str, day: int, seed: int, s: Scenario, controller: Callable[[Any], Any] | None,
             burn_in_s: float, layout: str, serving: str = "aggregate") -> DayRun:
    from llm_cluster_gym.envs.rollout import run_episode, skip_warmup

    env = make_env(s, serving)
    start = time.perf_counter()
    result = run_episode(env, None if controller is None else controller(env), seed)
    measured = skip_warmup(result, int(round(burn_in_s / s.control_interval_s)))
    m = measured.metrics
    power_kw = m["energy_j"] / s.control_interval_s / 1e3
    servers = m["servers_powered"] if "servers_powered" in m else np.full(measured.n_intervals, np.nan)
    return DayRun(policy, day, seed, measured.summary(), np.asarray(power_kw), np.asarray(servers),
                  layout, time.perf_counter() - start)


def _describe_layout(pools: Sequence[PoolSpec], gpus: int) -> str:
    return " | ".join(f"{p.n_instances * p.tp // gpus} srv TP{p.tp} {p.freq_mhz:.0f} MHz" for p in pools)


def manager(slo_margin: float, peak_headroom: float = 1.0) -> Callable[[Any], Any]:
    """Builds the DynamoLLM-style manager at this SLO margin and peak headroom on an env."""
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.controllers.dynamo import DynamoController

    return lambda env: DynamoController(ControllerContext.from_env(env), slo_margin=slo_margin,
                                        peak_headroom=peak_headroom)


def run_day(policy: str, day: int, seed: int, base: Scenario, burn_in_s: float,
            validation_rates: np.ndarray | None, measured_s: float = DAY_S,
            slo_margin: float = 0.6, serving: str = "aggregate", peak_headroom: float = 1.0) -> DayRun:
    """Measure `policy` on `day` with `seed` (see the module docstring for the protocol)."""
    from llm_cluster_gym.controllers.context import ControllerContext

    s = day_scenario(base, day, burn_in_s, measured_s)
    gpus = s.datacenter.server.gpus
    if policy == "dynamo":
        return _measure(policy, day, seed, s, manager(slo_margin, peak_headroom), burn_in_s, "adaptive",
                        serving)
    if policy == "milp":
        from llm_cluster_gym.controllers.milp_plan import PlanController

        run = _measure(policy, day, seed, s, lambda env: PlanController(
            ControllerContext.from_env(env), env, period_s=PLAN_WINDOW_S, slo_margin=slo_margin),
            burn_in_s, "hindsight plan", serving)
        run.bound_kwh = planning_bound(s, seed, burn_in_s, measured_s)
        return run
    if policy == "single_pool":
        s = single_pool_scenario(s)
    env = make_env(s)
    prov = Provisioner(ControllerContext.from_env(env), slo_margin, class_targets(s))
    if policy in ("single_pool", "static"):
        rates = window_rates(env, seed, burn_in_s, measured_s)
        pools = prov.peak_layout(rates.max(axis=0), s.serving.pools)
    elif policy == "best_fixed":
        if validation_rates is None:
            raise WeekEvalError("best_fixed needs the validation day's rates")
        pools = prov.best_fixed_layout(validation_rates, PLAN_WINDOW_S, s.serving.pools)
    else:
        raise WeekEvalError(f"policies: unknown policy {policy!r}; known: {', '.join(available_policies())}")
    fixed = with_pools(s, pools)
    return _measure(policy, day, seed, fixed, None, burn_in_s, _describe_layout(pools, gpus), serving)


def planning_bound(s: Scenario, seed: int, burn_in_s: float, measured_s: float) -> float:
    """Server energy (kWh) of the planning-model optimum over the measured span of `s`.

    The relaxed MILP (`controllers/milp_plan.py`) at the SLOs themselves (margin 1.0, the most
    permissive) on the true mean rates of each 5-minute window: no plan that meets the SLOs in
    the planning model uses less energy. It is not a bound of the simulator (it ignores model
    loads, wake latency, queueing transients), so a simulated policy may fall below it.
    """
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.controllers.milp_plan import episode_rates, planning_tables, solve_plan

    env = make_env(s)
    env.reset(seed=seed)
    ctx = ControllerContext.from_env(env)
    dt = s.control_interval_s
    rates = episode_rates(env.unwrapped.backend.describe().arrival_oracle, burn_in_s,
                          int(round(measured_s / dt)), dt, int(round(PLAN_WINDOW_S / dt)))
    bound = solve_plan(planning_tables(ctx, 1.0), rates.mean_rps, rates.duration_s, form="relaxed")
    return bound.bound_server_energy_j / 3.6e6


# ----------------------------------------------------------------------------- statistics
def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% Student-t interval (NaN half-width for one value)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def fmt_ci(mean: float, half: float, digits: int = 3) -> str:
    """``mean ± half`` (or the mean alone when there is no interval)."""
    if math.isnan(half):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {half:.2g}"


def mean_ci95_over_days(runs: Sequence[DayRun], value: Callable[[DayRun], float]
                        ) -> tuple[float, float]:
    """`mean_ci95` over days of `value`, each day's value first averaged over its seeds.

    A day's seeds share its load curve, so they are replicates within one sample, not several
    samples: an interval over (day, seed) units would be too narrow.
    """
    per_day: dict[int, list[float]] = {}
    for r in runs:
        per_day.setdefault(r.day, []).append(value(r))
    return mean_ci95([float(np.mean(v)) for _, v in sorted(per_day.items())])


def summarize(runs: list[DayRun], policies: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per policy: each reported metric and each saving against the baseline, (mean, CI half)."""
    base = {(r.day, r.seed): r.summary for r in runs if r.policy == BASELINE}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for pol in policies:
        mine = [r for r in runs if r.policy == pol]
        row = {k: mean_ci95_over_days(mine, lambda r, k=k: r.summary[k]) for k in REPORTED}
        for k in SAVED:
            row[f"{k}_saving"] = mean_ci95_over_days(
                mine, lambda r, k=k: 1.0 - r.summary[k] / base[(r.day, r.seed)][k])
        out[pol] = row
    bounds = {(r.day, r.seed): r.bound_kwh for r in runs if r.bound_kwh is not None}
    for pol in policies:
        mine = [r for r in runs if r.policy == pol and (r.day, r.seed) in bounds]
        if mine:
            out[pol]["bound_gap"] = mean_ci95_over_days(
                mine, lambda r: r.summary["energy_kwh"] / bounds[(r.day, r.seed)] - 1.0)
    return out


def format_table(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Markdown table of `summarize`'s output."""
    cols = [("energy_kwh", "energy kWh"), ("energy_kwh_saving", "energy saved"),
            ("cost_usd_saving", "cost saved"), ("carbon_kg_saving", "carbon saved"),
            ("servers_powered_mean", "powered srv"), ("slo_attainment", "SLO att."),
            ("ttft_p99_s", "TTFT P99 s"), ("tbt_p99_s", "TBT P99 s"),
            ("bound_gap", "over the bound")]
    lines = ["| policy | " + " | ".join(c[1] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for pol, row in table.items():
        lines.append(f"| {pol} | " + " | ".join(fmt_ci(*row[k]) if k in row else "-" for k, _ in cols)
                     + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the job
def select_manager(base: Scenario, burn_in_s: float, measured_s: float = DAY_S,
                   log: Callable[[str], None] | None = None,
                   candidates: Sequence[tuple[float, float]] = MANAGER_CANDIDATES,
                   ) -> tuple[tuple[float, float], dict[tuple[float, float], tuple[float, float]]]:
    """The manager's (SLO margin, peak headroom) chosen on the validation day.

    Returns:
        (the candidate with the least energy among those whose SLO attainment reaches
        `MARGIN_TARGET_SLO`, or the most cautious one (smallest margin, largest headroom) when
        none does; per candidate (energy kWh, SLO attainment)).
    """
    (vday,) = VALIDATION_DAYS
    s = day_scenario(base, vday, burn_in_s, measured_s)
    tried = {}
    for m, h in candidates:
        r = _measure("dynamo", vday, 0, s, manager(m, h), burn_in_s, "adaptive")
        tried[(m, h)] = (round(r.summary["energy_kwh"], 1), round(r.summary["slo_attainment"], 5))
        if log:
            log(f"validation {DAY_NAMES[vday]} margin {m} headroom {h}: {tried[(m, h)]}")
    ok = [c for c in candidates if tried[c][1] >= MARGIN_TARGET_SLO]
    if ok:
        return min(ok, key=lambda c: tried[c][0]), tried
    return min(candidates, key=lambda c: (c[0], -c[1])), tried


def check_args(args: WeekArgs) -> None:
    """Reject bad `args` before any work starts.

    Raises:
        WeekEvalError: A field's value is out of range; the message names the field and the value.
    """
    bad = sorted(set(args.days) & set(TRAIN_DAYS + VALIDATION_DAYS))
    if bad:
        raise WeekEvalError(f"days: {bad} are training or validation days ({TRAIN_DAYS}, "
                            f"{VALIDATION_DAYS}); test days are {TEST_DAYS}")
    known = available_policies()
    unknown = [p for p in args.policies if p not in known]
    if unknown:
        raise WeekEvalError(f"policies: unknown {unknown}; known: {', '.join(known)}")
    if BASELINE not in args.policies:
        raise WeekEvalError(f"policies: {BASELINE!r} (the baseline of the savings) must be included")
    if not 0 < args.slo_margin <= 1:
        raise WeekEvalError(f"slo_margin: {args.slo_margin!r} must be in (0, 1]")
    if not 0.5 <= args.peak_headroom <= 3:
        raise WeekEvalError(f"peak_headroom: {args.peak_headroom!r} must be in [0.5, 3]")
    if args.burn_in_s < 0:
        raise WeekEvalError(f"burn_in_s: {args.burn_in_s!r} must be >= 0")
    if not 0 < args.hours <= 24 or (args.hours * 3600) % PLAN_WINDOW_S:
        raise WeekEvalError(f"hours: {args.hours!r} must be in (0, 24] and a whole number of "
                            f"{PLAN_WINDOW_S:.0f} s windows")
    negative = [s for s in args.seeds if s < 0]
    if negative:
        raise WeekEvalError(f"seeds: {negative[0]!r} must be >= 0")
    hours = args.cross_check_hours
    if hours != 0 and (not 0 < hours <= 24 or (hours * 3600) % PLAN_WINDOW_S):
        raise WeekEvalError(f"cross_check_hours: {hours!r} must be 0 (skip) or in (0, 24] and a whole "
                            f"number of {PLAN_WINDOW_S:.0f} s windows")


def evaluate_week(args: WeekArgs, log: Callable[[str], None] | None = None) -> tuple[list[DayRun], dict]:
    """Run every policy on every (day, seed) of `args` (checked first); return the runs and the table."""
    check_args(args)
    measured_s = args.hours * 3600.0
    base = load_scenario(args.scenario)
    if args.select_manager:
        (args.slo_margin, args.peak_headroom), tried = select_manager(base, args.burn_in_s, measured_s, log)
        if log:
            log(f"slo_margin {args.slo_margin}, peak_headroom {args.peak_headroom} chosen on the "
                f"validation day: {tried}")
    val_rates = None
    if "best_fixed" in args.policies:
        (vday,) = VALIDATION_DAYS
        vs = day_scenario(base, vday, 0.0, measured_s)
        val_rates = window_rates(make_env(vs), 0, 0.0, measured_s)
    runs = []
    for day in args.days:
        for seed in args.seeds:
            for pol in args.policies:
                run = run_day(pol, day, seed, base, args.burn_in_s, val_rates, measured_s,
                              args.slo_margin, "aggregate", args.peak_headroom)
                runs.append(run)
                if log:
                    log(f"{DAY_NAMES[day]} seed {seed} {pol}: energy {run.summary['energy_kwh']:.0f} kWh, "
                        f"SLO {run.summary['slo_attainment']:.4f}, {run.layout} ({run.wall_s:.0f} s)")
    return runs, summarize(runs, args.policies)


def cross_check(base: Scenario, day: int, hours: float, policies: Sequence[str], slo_margin: float,
                 peak_headroom: float = 1.0, burn_in_s: float = 600.0,
                 log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """The aggregate model against the request-level one on `hours` of `day` (seed 0).

    The week runs on the aggregate (fluid) model; this re-runs a stretch of a test day at
    request level for each policy and reports both models' energy and SLO attainment, so that
    the table's figures carry the fluid model's own error. The best fixed layout (it needs the
    validation day) and the hindsight plan are skipped.
    """
    out = {}
    for pol in policies:
        if pol in ("best_fixed", "milp"):
            continue
        row = {}
        for serving in ("aggregate", "request"):
            r = run_day(pol, day, 0, base, burn_in_s, None, hours * 3600.0, slo_margin, serving,
                        peak_headroom)
            row[serving] = {"energy_kwh": r.summary["energy_kwh"],
                            "slo_attainment": r.summary["slo_attainment"], "wall_s": r.wall_s}
        row["energy_rel_err"] = row["aggregate"]["energy_kwh"] / row["request"]["energy_kwh"] - 1.0
        row["slo_diff_points"] = 100 * (row["aggregate"]["slo_attainment"] - row["request"]["slo_attainment"])
        out[pol] = row
        if log:
            log(f"cross-check {DAY_NAMES[day]} {hours:g} h {pol}: aggregate/request energy "
                f"{row['energy_rel_err']:+.1%}, SLO {row['slo_diff_points']:+.2f} points "
                f"(request-level run {row['request']['wall_s']:.0f} s)")
    return out


def run_cross_check(args: WeekArgs, log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """`cross_check` as `args` asks for it (checked first; nothing when `cross_check_hours` is 0)."""
    check_args(args)
    if args.cross_check_hours == 0:
        return {}
    return cross_check(load_scenario(args.scenario), args.days[0], args.cross_check_hours, args.policies,
                       args.slo_margin, args.peak_headroom, log=log)


def plot_day(runs: list[DayRun], path: Path, interval_s: float) -> None:
    """Server power and powered servers over the first evaluated (day, seed), one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = (runs[0].day, runs[0].seed)
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in runs:
        if (r.day, r.seed) != first:
            continue
        hours = np.arange(len(r.power_kw)) * interval_s / 3600.0
        a.plot(hours, r.power_kw, label=r.policy, lw=0.8)
        b.plot(hours, r.servers_powered, label=r.policy, lw=0.8)
    a.set_ylabel("server power (kW)")
    b.set_ylabel("powered servers")
    b.set_xlabel(f"hour of {DAY_NAMES[first[0]]} (UTC), seed {first[1]}")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(table: dict, runs: list[DayRun]) -> dict[str, float]:
    """The bench's last line: the DynamoLLM-style manager against SinglePool."""
    row = table.get("dynamo")
    if row is None:
        return {}
    return {"energy_saving": row["energy_kwh_saving"][0], "cost_saving": row["cost_usd_saving"][0],
            "carbon_saving": row["carbon_kg_saving"][0], "slo_attainment": row["slo_attainment"][0],
            **({"bound_gap": row["bound_gap"][0]} if "bound_gap" in row else {}),
            "days": len({r.day for r in runs})}


def write_report(args: WeekArgs, runs: list[DayRun], table: dict, out: Path, command: str,
                 checked: dict | None = None) -> Path:
    """Write report.md, results.json and day.png into `out`, all at once (`staged_folder`)."""
    from llm_cluster_gym.envs.outputs import staged_folder

    interval_s = load_scenario(args.scenario).control_interval_s
    results = {"args": dataclasses.asdict(args), "table": table, "headline": headline(table, runs),
               "cross_check": checked or {},
               "runs": [{"policy": r.policy, "day": r.day, "seed": r.seed, "layout": r.layout,
                         "wall_s": r.wall_s, "summary": r.summary} for r in runs]}
    days = ", ".join(DAY_NAMES[d] for d in args.days)
    text = [f"# DynamoLLM week: {args.scenario}", "", f"Command: `{command}`", "",
            f"Test days {days}; seeds {list(args.seeds)}; burn-in {args.burn_in_s:.0f} s not measured; "
            f"savings paired against {BASELINE}; each day averaged over its seeds, then mean ± 95% "
            "t-interval over the days.", "",
            format_table(table), "", "Layouts (fixed policies):", ""]
    text += [f"- {DAY_NAMES[r.day]} seed {r.seed} {r.policy}: {r.layout}"
             for r in runs if r.layout != "adaptive"]
    if checked:
        text += ["", f"Aggregate model against request level ({args.cross_check_hours:g} h of "
                 f"{DAY_NAMES[args.days[0]]}, seed 0): the fluid model's own error.", "",
                 "| policy | energy agg./req. - 1 | SLO agg. - req. (points) |", "|---|---|---|"]
        text += [f"| {p} | {c['energy_rel_err']:+.1%} | {c['slo_diff_points']:+.2f} |"
                 for p, c in checked.items()]
    text += ["", "![power and powered servers](day.png)", ""]
    with staged_folder(out, command) as stage:
        plot_day(runs, stage / "day.png", interval_s)
        (stage / "results.json").write_text(json.dumps(results, indent=1, default=float))
        (stage / "report.md").write_text("\n".join(text))
    return out / "report.md"


def run(args: WeekArgs, command: str = "llm-cluster dynamo-week") -> int:
    """The `dynamo-week` job: evaluate, print the table, write the report."""
    log = None if args.no_progress else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    runs, table = evaluate_week(args, log)
    print(format_table(table))
    checked = run_cross_check(args, log)
    path = write_report(args, runs, table, Path(args.out), command, checked)
    print(f"\nreport: {path}")
    return 0
