"""Compare controllers on a scenario over several seeds: one table, ratios, report plots.

Usage::

    python -m scripts.compare [--task energy] [--scenario small] [--serving request]
        [--controllers static,dynamo,oracle] [--seeds 0,1,2] [--warmup 12]
        [--out reports/compare-<task>-<scenario>] [--no-plots]

For each controller and seed the env runs a whole episode (`envs.rollout`); the first
`warmup` intervals (start-up reconfiguration, model loads) are left out of the figures. The
table gives means over seeds of energy, energy per token, SLO attainment, TTFT/TBT P99,
thermal and power throttling events, peak row power, max GPU temperature and shield
overrides. Then the ratios the issue asks for: DynamoLLM-style energy over static (with both
attainments), TAPAS-style throttling events over unaware. Plots per controller (first seed)
come from `envs.sim.report.write_report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_cluster_gym.controllers.registry import make_controller  # noqa: E402
from llm_cluster_gym.envs.episode import COMPARISON_COLUMNS  # noqa: E402
from llm_cluster_gym.envs.rollout import run_measured  # noqa: E402
from llm_cluster_gym.envs.sim.report import write_report  # noqa: E402

COLUMNS = COMPARISON_COLUMNS
"""(summary key, column label) of the table: `envs.episode`'s comparison columns."""


def run_compare(task: str, scenario: str, serving: str, controllers: list[str],
                seeds: list[int], warmup: int, out: Path | None) -> dict[str, dict[str, float]]:
    """Run every controller on every seed; mean summary per controller (plots if `out`)."""
    table: dict[str, dict[str, float]] = {}
    for name in controllers:
        rows = []
        for k, seed in enumerate(seeds):
            measured, summary = run_measured(
                task, scenario, serving, lambda env, n=name, s=seed: make_controller(n, env, seed=s),
                seed, warmup)
            rows.append(summary)
            if out is not None and k == 0:
                write_report(measured, out / name.replace(":", "_"),
                             f"{name} on {scenario} ({task}, seed {seed})",
                             command="python -m scripts.compare")
        table[name] = {key: float(np.nanmean([r[key] for r in rows])) for key in rows[0]}
    return table


def format_compare(table: dict[str, dict[str, float]]) -> str:
    """The comparison as a Markdown table."""
    head = "| controller | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for name, s in table.items():
        cells = [f"{s[k]:.4g}" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Headline ratios (present when both controllers of a pair were run)."""
    out: dict[str, float] = {}
    if "dynamo" in table and "static" in table:
        out["dynamo_energy_over_static"] = (table["dynamo"]["energy_kwh"]
                                            / table["static"]["energy_kwh"])
        out["dynamo_slo_attainment"] = table["dynamo"]["slo_attainment"]
        out["static_slo_attainment"] = table["static"]["slo_attainment"]
    if "oracle" in table and "static" in table:
        out["oracle_energy_over_static"] = (table["oracle"]["energy_kwh"]
                                            / table["static"]["energy_kwh"])
    if "tapas" in table and "unaware" in table:
        for kind in ("thermal", "power"):
            a = table["tapas"][f"{kind}_throttle_events"]
            b = table["unaware"][f"{kind}_throttle_events"]
            out[f"tapas_{kind}_events_over_unaware"] = a / b if b > 0 else float("nan")
        a = sum(table["tapas"][f"{k}_throttle_events"] for k in ("thermal", "power"))
        b = sum(table["unaware"][f"{k}_throttle_events"] for k in ("thermal", "power"))
        out["tapas_all_events_over_unaware"] = a / b if b > 0 else float("nan")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m scripts.compare", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="energy", choices=("energy", "thermal", "combined"),
                   help="env task (default: energy)")
    p.add_argument("--scenario", default="small", help="scenario name or YAML path")
    p.add_argument("--serving", default="request", choices=("request", "aggregate"),
                   help="serving model (default: request)")
    p.add_argument("--controllers", default=None,
                   help="comma-separated names (default: static,dynamo,oracle for energy; "
                        "unaware,tapas,shield:unaware otherwise)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--warmup", type=int, default=12, help="intervals left out at the start")
    p.add_argument("--out", default=None, help="report folder (default reports/compare-...)")
    p.add_argument("--no-plots", action="store_true", help="skip the per-controller reports")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table and ratios."""
    args = build_parser().parse_args(argv)
    names = (args.controllers.split(",") if args.controllers else
             (["static", "dynamo", "oracle"] if args.task == "energy"
              else ["unaware", "tapas", "shield:unaware"]))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = None if args.no_plots else Path(args.out or f"reports/compare-{args.task}-{args.scenario}")
    table = run_compare(args.task, args.scenario, args.serving, names, seeds, args.warmup, out)
    print(f"# {args.task} on {args.scenario} ({args.serving} serving), seeds {seeds}, "
          f"first {args.warmup} intervals left out\n")
    print(format_compare(table))
    r = ratios(table)
    if r:
        print("\nratios: " + json.dumps({k: round(v, 4) for k, v in r.items()}))
    if out is not None:
        print(f"\nreports: {out}/<controller>/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
