"""Control quality of the shipped agents on held-out trace windows, beside the rule-based ones.

Runs the default evaluation plans of `agents.evaluation` (request-level model, test window,
three seeds, the first 12 intervals left out) and prints, for the shipped agents (inside the
safety shield, as deployed) and for the rule-based controllers of the same task:

* energy saving vs static and SLO attainment (DynamoLLM reports 53% at its SLOs),
* gap to the hindsight oracle (agent energy / oracle energy - 1),
* reduction of thermal throttling events (under the cooling failure of `small_faults`) and of
  power throttling events (at the 1.6x oversubscription of `small_tapas_high`) vs the
  thermal/power-unaware baseline (TAPAS reports 97% and 99%).

A reduction is 1 - events(policy) / events(unaware); it is reported as null when the unaware
baseline itself had no such event (nothing to reduce).

Last line: one JSON object with `energy_saving_vs_static`, `slo_attainment`, `gap_to_oracle`,
`thermal_throttle_reduction`, `power_throttle_reduction` for the shipped agents.
"""

from __future__ import annotations

import json
import sys

from llm_cluster_gym.agents.evaluation import DEFAULT_PLANS, SHIELDED_AGENT, evaluate_task


def reduction(events: float, base: float) -> float | None:
    """1 - events/base, or None when the baseline had none."""
    return None if base == 0 else 1.0 - events / base


def main() -> None:
    plans = {(p.task, p.scenario): p for p in DEFAULT_PLANS}
    log = lambda m: print(f"  {m}", file=sys.stderr)  # noqa: E731
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
