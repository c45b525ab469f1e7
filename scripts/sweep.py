"""Evaluation sweep on Ray: (policy or checkpoint) x scenario x seed x fault drill.

Usage::

    python -m scripts.sweep --task energy --policies static,dynamo,ckpt:checkpoints/energy
        --scenarios small --seeds 0,1,2 --drills scenario,load_spike [--address auto]

Each cell is one episode measured like one controller/seed of `python -m scripts.compare`
(`agents.sweep.run_cell`); cells run as Ray tasks on a local Ray (default) or on an existing
cluster (`--address`). The output folder gets `sweep.md` (one table, means over seeds, failed
cells by name), `cells.csv`, `sweep.json` and the per-episode reports of the single-run
evaluation. Policies: controller names (`static`, `dynamo`, `tapas`, `shield:unaware`, ...) or
`ckpt:<dir>` / `shield:ckpt:<dir>` for trained checkpoints. Drills: scenario (the file's own
faults), none, cooling_failure, power_failure, load_spike.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_cluster_gym.scripts.simulate import dataclass_parser  # noqa: E402


@dataclass
class SweepArgs:
    """Arguments of `python -m scripts.sweep`."""

    task: str = "energy"
    """Env task: energy, thermal or combined."""
    policies: str | None = None
    """Comma-separated policies (default: static,dynamo,oracle for energy; unaware,tapas,shield:unaware
    otherwise); `ckpt:<dir>` for a checkpoint."""
    scenarios: str = "small"
    """Comma-separated scenario names or YAML paths."""
    seeds: str = "0,1,2"
    """Comma-separated episode seeds."""
    drills: str = "scenario"
    """Comma-separated fault drills: scenario, none, cooling_failure, power_failure, load_spike."""
    serving: str = "request"
    """Serving model: request (evaluation) or aggregate (fast)."""
    warmup: int = 12
    """Intervals left out at the start of each episode."""
    window: str | None = None
    """Trace window: train, validation or test (default: the scenario's own)."""
    address: str | None = None
    """Existing Ray cluster (auto, <head-ip>:6379 or ray://<head-ip>:10001); default: a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (default: all of this machine)."""
    max_in_flight: int | None = None
    """Cells running at once (default: as many as Ray has CPUs for)."""
    retries: int = 1
    """Extra attempts of a failed cell."""
    out: str | None = None
    """Output folder (default: reports/sweep-<task>)."""
    reports: str = "first-seed"
    """Episode reports: all, first-seed or none."""
    ship_code: bool = False
    """Upload this repository to the cluster as the job's working directory."""
    no_dashboard: bool = False
    """Do not start the Ray dashboard (local Ray only)."""
    no_progress: bool = False
    """Hide the progress bar."""


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one option per `SweepArgs` field, help from its docstring."""
    return dataclass_parser(
        SweepArgs, "python -m scripts.sweep", __doc__.split("\n")[0],
        {"warmup": int, "num_cpus": int, "max_in_flight": int, "retries": int},
        {"task": ("energy", "thermal", "combined"), "serving": ("request", "aggregate"),
         "window": ("train", "validation", "test"), "reports": ("all", "first-seed", "none")})


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; print the table, failures and where the reports are. Exit 1 if a cell failed."""
    from llm_cluster_gym.agents.sweep import (
        SweepError,
        SweepSpec,
        expand_grid,
        format_table,
        init_ray,
        run_sweep,
        write_sweep,
    )

    parser = build_parser()
    args = SweepArgs(**vars(parser.parse_args(argv)))
    policies = _split(args.policies) if args.policies else (
        ["static", "dynamo", "oracle"] if args.task == "energy" else ["unaware", "tapas", "shield:unaware"])
    try:
        spec = SweepSpec(task=args.task, serving=args.serving, warmup=args.warmup, window=args.window)
        seeds = [int(s) for s in _split(args.seeds)]
        cells = expand_grid(policies, _split(args.scenarios), seeds, _split(args.drills))
    except (SweepError, ValueError) as exc:
        parser.error(str(exc))
    ray = init_ray(args.address, args.num_cpus, include_dashboard=False if args.no_dashboard else None,
                   ship_code=args.ship_code)
    ctx = ray.get_runtime_context()
    print(f"Ray: {int(ray.cluster_resources().get('CPU', 0))} CPUs, "
          f"{len(ray.nodes())} node(s), gcs {ctx.gcs_address}; {len(cells)} cells")
    sweep = run_sweep(cells, spec, retries=args.retries, max_in_flight=args.max_in_flight,
                      progress=not args.no_progress)
    out = Path(args.out or f"reports/sweep-{args.task}")
    command = "python -m scripts.sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_sweep(sweep, out, reports=args.reports, command=command)
    print(f"\n# {args.task}, {args.serving} serving, first {args.warmup} intervals left out; "
          f"{len(sweep.results)}/{len(cells)} cells in {sweep.wall_s:.1f} s\n")
    print(format_table(sweep))
    for f in sweep.failures:
        print(f"FAILED: {f.cell.name} ({f.attempts} attempts): {f.error}")
    print(f"\ntable and reports: {path}")
    return 1 if sweep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
