"""DynamoLLM on the 2024 conversation week: savings against SinglePool on held-out days.

Runs `llm_cluster_gym.scripts.dynamo_week` (the protocol is in its docstring: training,
validation and test days that never overlap, a burn-in that is not measured, baselines
provisioned as DynamoLLM's, 95% intervals over (day, seed) units) on the 1,024-GPU
`dynamo_week` scenario with the aggregate model: every test day (Sun, Tue, Fri), two seeds,
SinglePool, MultiPool static, the best fixed per-pool configuration, the DynamoLLM-style
manager and, where the MILP planner is available, the plan of the planning-model optimum.

Earlier lines are for people; the last line is one JSON object: the manager against
SinglePool (`energy_saving`, `cost_saving`, `carbon_saving`, `slo_attainment`, `days`) and
`bound_gap`, the manager's energy over the planning-model optimum's minus one (absent without
the planner). DynamoLLM (HPCA 2025) reports 53% energy, 61% cost and 38% carbon saved.

Usage::

    python bench/dynamo_week.py [--days 0 2 5] [--seeds 0 1] [--out reports/dynamo-week]

About 30 s per fixed policy and day and 60 s for the manager on one core.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tyro  # noqa: E402

from llm_cluster_gym.scripts import dynamo_week as week  # noqa: E402


def main() -> int:
    args = tyro.cli(week.WeekArgs, description=__doc__.split("\n\n")[0])
    policies = tuple(p for p in week.available_policies() if p in args.policies or p == "milp")
    args = dataclasses.replace(args, policies=policies)
    start = time.perf_counter()
    log = None if args.no_progress else (lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    runs, table = week.evaluate_week(args, log)
    print(week.format_table(table))
    checked = week.run_cross_check(args, log)
    path = week.write_report(args, runs, table, Path(args.out), "python bench/dynamo_week.py", checked)
    print(f"\nreport: {path}; {time.perf_counter() - start:.0f} s")
    line = week.headline(table, runs)
    if checked:
        line["aggregate_vs_request_energy_err"] = max(abs(c["energy_rel_err"]) for c in checked.values())
        line["aggregate_vs_request_slo_points"] = max(abs(c["slo_diff_points"]) for c in checked.values())
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
