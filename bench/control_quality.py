"""Control quality of the shipped agents on held-out trace windows, beside the rule-based ones.

Runs the default evaluation plans of `agents.evaluation` (request-level model, test window,
three seeds, the first 12 intervals left out) and prints, for the shipped agents (inside the
safety shield, as deployed) and for the rule-based controllers of the same task:

* energy saving vs static and SLO attainment (DynamoLLM reports 53% at its SLOs),
* gap to the hindsight oracle (agent energy / oracle energy - 1; the oracle is a hindsight
  search around the DynamoLLM optimizer's plan, not a bound, so the gap can be negative),
* reduction of thermal throttling events (under the cooling failure of `small_faults`) and of
  power throttling events (at the 1.6x oversubscription of `small_tapas_high`) vs the
  thermal/power-unaware baseline (TAPAS reports 97% and 99%).

A reduction is 1 - events(policy) / events(unaware); it is reported as null when the unaware
baseline itself had no such event (nothing to reduce).

Then issue 20's bar, measured on today's agents (`agents/bar.py`): the residual energy agent inside
the shield on the held-out days of the 2024 week against every rule-based and fixed policy of the
DynamoLLM week protocol, the shipped thermal agent (over the TAPAS-style controller, inside the
shield) against TAPAS with and without the shield (override rates, throttled plus capped
GPU-seconds, VM-hours waiting), whether each
shipped checkpoint runs on every scenario size, and `gymnasium.make_vec`'s steps per second.

Last line: one JSON object with `energy_saving_vs_static`, `slo_attainment`, `gap_to_oracle`,
`thermal_throttle_reduction`, `power_throttle_reduction` for the shipped agents, and issue 20's
`agent_vs_best_rule_energy` (with `_ci95`), `agent_slo_attainment`, `override_rate`,
`thermal_<scenario>_<agent|tapas_forecast|tapas>_<harm_gpu_s|vm_wait_h|avoidable_override_rate>`,
`thermal_<scenario>_<agent|tapas_forecast>_harm_minus_tapas_gpu_s` (paired per unit: mean, 95%
half-width), `thermal_agent_projection_rate` (share of the agent's decisions on `small_tapas_high`
its own projection onto the forecast changed), `transfers`,
`vector_env_steps_per_s`. Bar (issue 20): SLO attainment >= 0.99 with `agent_vs_best_rule_energy`
< 1.0; `override_rate` <= 0.05 (with fewer throttled GPU-seconds than the TAPAS-style controller);
`transfers` true; >= 20,000 batched env steps per second.

Usage::

    python bench/control_quality.py [--hours 24] [--no-small-scenarios] [--jobs 2]

On the 2-core machine (2026-12-01): the small scenarios and the energy agent's six week-day units
take about 25 minutes in one process; the thermal evaluation (3 small units, 9 whole datacenter
days, 5 contenders each) about 20 minutes more with ``--jobs 2``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import tyro

from llm_cluster_gym.agents import bar
from llm_cluster_gym.agents.evaluation import DEFAULT_PLANS, SHIELDED_AGENT, evaluate_task


@dataclass(frozen=True)
class QualityArgs:
    """Control quality of the shipped agents."""

    hours: float = 24.0
    """Measured hours of each held-out week day for the energy agent's bar (less for a quick look)."""
    small_scenarios: bool = True
    """Also evaluate the shipped agents on the small scenarios (request level, test window)."""
    jobs: int = 2
    """Processes running the thermal evaluation's units (the results do not depend on it)."""


def reduction(events: float, base: float) -> float | None:
    """1 - events/base, or None when the baseline had none."""
    return None if base == 0 else 1.0 - events / base


def main() -> None:
    args = tyro.cli(QualityArgs, description=__doc__.split("\n\n")[0])
    if args.jobs < 1:
        print(f"control_quality: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        raise SystemExit(2)
    log = lambda m: print(f"  {m}", file=sys.stderr)  # noqa: E731
    out = small_scenario_figures(log) if args.small_scenarios else {}
    out.update(issue20_figures(args.hours, log, args.jobs))
    print(json.dumps(out))


def issue20_figures(hours: float, log, jobs: int = 1) -> dict:
    """Issue 20's bar on today's agents (see the module docstring)."""
    energy = bar.energy_agent_bar(hours=hours, log=log)
    print("issue 20: residual energy agent (shielded) on held-out week days vs the best rule or fixed "
          "policy meeting SLO 0.99, per (day, seed):")
    for r in energy["rows"]:
        print(f"  day {r['day']} seed {r['seed']}: best rule {r['best_rule']}, energy ratio "
              f"{r['agent_vs_best_rule_energy']:.4f}, SLO {r['agent_slo_attainment']:.4f}, "
              f"shield overrides {r['shield_override_rate']:.3f}")
    ratio, ratio_ci = energy["summary"]["agent_vs_best_rule_energy"]
    slo, _ = energy["summary"]["agent_slo_attainment"]
    thermal = bar.thermal_agent_bar(log=log, jobs=jobs)
    print("issue 20: thermal agent over TAPAS (shielded) vs TAPAS heeding the forecast (shielded) and "
          "TAPAS with and without the shield, "
          "mean ± 95% half-width over units (small_tapas_high request level, seeds 0-2; tapas_dc "
          "aggregate, the whole test days Sun, Tue, Fri, seed 0):")
    for group, by_policy in thermal["summary"].items():
        for policy, f in by_policy.items():
            print(f"  {group:16s} {policy:14s} " + ", ".join(
                f"{k} {m:.4g} ± {h:.2g}" for k, (m, h) in f.items()))
    for group, by_policy in thermal["paired_vs_tapas"].items():
        for policy, f in by_policy.items():
            print(f"  {group:16s} {policy:14s} minus TAPAS (paired): " + ", ".join(
                f"{k} {m:+.4g} ± {h:.2g}" for k, (m, h) in f.items()))
    rates = [r["agent"]["override_rate"] for r in thermal["rows"] if r["unit"] == "small_tapas_high"]
    moved = bar.transfers()
    earlier = bar.transfers(bar.EARLIER)
    for ckpt, per in {**moved, **earlier}.items():
        tag = "shipped" if ckpt in moved else "earlier, not shipped"
        print(f"issue 20: {ckpt} ({tag}): " + "; ".join(f"{sc} {v}" for sc, v in per.items()))
    steps = bar.vector_env_steps_per_s()
    print(f"issue 20: gymnasium.make_vec (64 batched copies of LLMCluster/Energy-small-v0, random "
          f"actions): {steps:,.0f} env steps/s")
    return {
        "agent_vs_best_rule_energy": round(ratio, 4),
        "agent_vs_best_rule_energy_ci95": round(ratio_ci, 4),
        "agent_slo_attainment": round(slo, 4),
        "override_rate": round(float(np.mean(rates)), 4),
        **{f"thermal_{group}_{who}_{key}": round(by[who][key][0], 4)
           for group, by in thermal["summary"].items() for who in ("agent", "tapas_forecast", "tapas")
           for key in ("harm_gpu_s", "vm_wait_h", "avoidable_override_rate")},
        **{f"thermal_{group}_{who}_harm_minus_tapas_gpu_s": [round(v, 1) for v in by[who]["harm_gpu_s"]]
           for group, by in thermal["paired_vs_tapas"].items() for who in ("agent", "tapas_forecast")},
        "thermal_agent_projection_rate": round(
            thermal["summary"]["small_tapas_high"]["agent"]["projection_rate"][0], 4),
        "transfers": all(v == "ok" for per in moved.values() for v in per.values()),
        "transfers_by_checkpoint": {c: all(v == "ok" for v in per.values()) for c, per in moved.items()},
        "vector_env_steps_per_s": round(steps, 1),
    }


def small_scenario_figures(log) -> dict:
    """The shipped agents on the small scenarios (request level), beside the rules."""
    plans = {(p.task, p.scenario): p for p in DEFAULT_PLANS}
    energy = evaluate_task(plans["energy", "small"], progress=log)
    thermal = evaluate_task(plans["thermal", "small_tapas_high"], progress=log)
    faults = evaluate_task(plans["thermal", "small_faults"], progress=log)
    static_kwh = energy.runs["static"].stat("energy_kwh")[0]
    oracle_kwh = energy.runs["oracle"].stat("energy_kwh")[0]
    print("energy task (small, test window):")
    print(f"  {'policy':14s} {'saving vs static':>17s} {'SLO att.':>9s} {'gap to oracle':>14s}")
    for name, runs in energy.runs.items():
        kwh = runs.stat("energy_kwh")[0]
        print(f"  {name:14s} {1 - kwh / static_kwh:17.3f} {runs.stat('slo_attainment')[0]:9.4f} "
              f"{kwh / oracle_kwh - 1:14.3f}")
    for ev in (thermal, faults):
        unaware = ev.runs["unaware"]
        th0 = unaware.stat("thermal_throttle_events")[0]
        pw0 = unaware.stat("power_throttle_events")[0]
        print(f"thermal task ({ev.plan.scenario}, test window); unaware: {th0:.2f} thermal, "
              f"{pw0:.2f} power events per episode:")
        for name, runs in ev.runs.items():
            th = reduction(runs.stat("thermal_throttle_events")[0], th0)
            pw = reduction(runs.stat("power_throttle_events")[0], pw0)
            print(f"  {name:14s} thermal reduction {th if th is None else round(th, 3)!s:>6s}  "
                  f"power reduction {pw if pw is None else round(pw, 3)!s:>6s}  "
                  f"SLO att. {runs.stat('slo_attainment')[0]:.4f}")

    def agent_reduction(ev, key: str) -> float | None:
        r = reduction(ev.runs[SHIELDED_AGENT].stat(key)[0], ev.runs["unaware"].stat(key)[0])
        return None if r is None else round(r, 4)

    agent_e = energy.runs[SHIELDED_AGENT]
    out = {
        "energy_saving_vs_static": round(1 - agent_e.stat("energy_kwh")[0] / static_kwh, 4),
        "slo_attainment": round(agent_e.stat("slo_attainment")[0], 4),
        "gap_to_oracle": round(agent_e.stat("energy_kwh")[0] / oracle_kwh - 1, 4),
        # thermal throttling happens under the cooling failure of small_faults; power capping
        # under the 1.6x oversubscription of small_tapas_high.
        "thermal_throttle_reduction": agent_reduction(faults, "thermal_throttle_events"),
        "power_throttle_reduction": agent_reduction(thermal, "power_throttle_events"),
    }
    return out


if __name__ == "__main__":
    main()
