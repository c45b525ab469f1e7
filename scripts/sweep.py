"""`llm-cluster sweep`: evaluation sweep on Ray, (policy or checkpoint) x scenario x seed x fault drill.

Usage::

    llm-cluster sweep --task energy --policies static dynamo ckpt:checkpoints/energy
        --scenarios small --seeds 0 1 2 --drills scenario load_spike [--address auto]

Each cell is one episode measured like one controller/seed of `llm-cluster compare`
(`agents.sweep.run_cell`); cells run as Ray tasks on a local Ray (default) or on an existing
cluster (`--address`). The output folder gets `sweep.md` (one table, means over seeds, failed
cells by name), `cells.csv`, `sweep.json` and the per-episode reports of the single-run
evaluation, written all at once when the sweep ends (`envs.outputs.staged_folder`); the
options, scenarios, drills, checkpoints and the output folder are checked before Ray starts.
Policies are policy specs (`controllers.policy_spec`): controller names (`static`, `dynamo`,
`tapas`, `shield:unaware`, ...) or `ckpt:<dir>` / `shield:ckpt:<dir>` for trained checkpoints.
Drills: scenario (the file's own faults), none, cooling_failure, power_failure, load_spike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llm_cluster_gym.controllers.policy_spec import parse_policy_spec
from llm_cluster_gym.envs.outputs import check_output_folder
from llm_cluster_gym.scripts.compare import check_checkpoints, default_policies
from llm_cluster_gym.scripts.usage import UsageError, check_seeds


@dataclass
class SweepArgs:
    """Run an evaluation grid (policy x scenario x seed x fault drill) as Ray tasks."""

    task: Literal["energy", "thermal", "combined"] = "energy"
    """Env task: energy, thermal or combined."""
    policies: list[str] | None = None
    """Policy specs (static, shield:dynamo, ckpt:<dir>, shield:ckpt:<dir>, ...); default: static dynamo
    oracle for the energy task, unaware tapas shield:unaware otherwise."""
    scenarios: list[str] = field(default_factory=lambda: ["small"])
    """Scenario names or YAML paths."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Episode seeds."""
    drills: list[Literal["scenario", "none", "cooling_failure", "power_failure", "load_spike"]] = field(
        default_factory=lambda: ["scenario"])
    """Fault drills: scenario (the file's own faults), none, cooling_failure, power_failure, load_spike."""
    serving: Literal["request", "aggregate"] = "request"
    """Serving model: request (evaluation) or aggregate (fast)."""
    warmup: int = 12
    """Intervals left out at the start of each episode."""
    window: Literal["train", "validation", "test"] | None = None
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
    reports: Literal["all", "first-seed", "none"] = "first-seed"
    """Episode reports: all, first-seed or none."""
    ship_code: bool = False
    """Upload this repository to the cluster as the job's working directory."""
    no_dashboard: bool = False
    """Do not start the Ray dashboard (local Ray only)."""
    no_progress: bool = False
    """Hide the progress bar."""

    def __post_init__(self) -> None:
        for name in self.policies or []:
            parse_policy_spec(name)
        for name in ("policies", "scenarios", "seeds", "drills"):
            value = getattr(self, name)
            if value is not None and not value:
                raise UsageError(f"--{name} needs at least one value")
        check_seeds("--seeds", self.seeds)
        if self.out is not None:
            check_output_folder(self.out)
        if self.warmup < 0 or self.retries < 0:
            raise UsageError(f"--warmup and --retries must be >= 0, got {self.warmup} and {self.retries}")
        for name in ("num_cpus", "max_in_flight"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")

    def policy_specs(self) -> list[str]:
        """The policy specs to run (the task's defaults when none were given)."""
        return list(self.policies) if self.policies else default_policies(self.task)


def run(args: SweepArgs, command: str = "llm-cluster sweep") -> int:
    """Run the sweep; print the table, failures and where the reports are. Exit 1 if a cell failed.

    Raises:
        SweepError: A malformed grid or a checkpoint lacking files (before Ray starts).
        ScenarioError: An unknown scenario, or a drill that does not fit one (before Ray starts).
        OutputFolderError: The output folder cannot be replaced (before Ray starts).
        RayMissingError: Ray is not installed.
    """
    from llm_cluster_gym.agents.sweep import (
        SweepSpec,
        checkpoint_dir,
        drill_scenario,
        expand_grid,
        format_table,
        init_ray,
        read_checkpoint_files,
        run_sweep,
        write_sweep,
    )
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    policies = args.policy_specs()
    spec = SweepSpec(task=args.task, serving=args.serving, warmup=args.warmup, window=args.window)
    cells = expand_grid(policies, args.scenarios, args.seeds, args.drills)
    names = [load_scenario(scenario).name for scenario in dict.fromkeys(args.scenarios)]
    for scenario, drill in dict.fromkeys((c.scenario, c.drill) for c in cells):
        drill_scenario(scenario, drill, args.window)
    for ckpt in dict.fromkeys(d for d in map(checkpoint_dir, policies) if d is not None):
        read_checkpoint_files(ckpt)
    check_checkpoints(policies, args.task, names)
    out = check_output_folder(args.out or f"reports/sweep-{args.task}")
    ray = init_ray(args.address, args.num_cpus, include_dashboard=False if args.no_dashboard else None,
                   ship_code=args.ship_code)
    ctx = ray.get_runtime_context()
    print(f"Ray: {int(ray.cluster_resources().get('CPU', 0))} CPUs, "
          f"{len(ray.nodes())} node(s), gcs {ctx.gcs_address}; {len(cells)} cells")
    sweep = run_sweep(cells, spec, retries=args.retries, max_in_flight=args.max_in_flight,
                      progress=not args.no_progress)
    path = write_sweep(sweep, out, reports=args.reports, command=command)
    print(f"\n# {args.task}, {args.serving} serving, first {args.warmup} intervals left out; "
          f"{len(sweep.results)}/{len(cells)} cells in {sweep.wall_s:.1f} s\n")
    print(format_table(sweep))
    for f in sweep.failures:
        print(f"FAILED: {f.cell.name} ({f.attempts} attempts): {f.error}")
    print(f"\ntable and reports: {path}")
    return 1 if sweep.failures else 0
