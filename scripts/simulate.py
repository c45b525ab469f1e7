"""`llm-cluster simulate`: simulate a scenario under its fixed configuration and write a report.

Usage::

    llm-cluster simulate [--scenario small] [--seed 0] [--serving request|aggregate]
                         [--out reports/sim-<scenario>] [--duration-s 120] [--no-progress]

Prints the headline table (energy, energy per token, carbon, GPU-hour cost, TTFT/TBT, SLO
attainment, throttling events, peak row power, max GPU temperature) and writes ``report.md``,
``summary.json`` and plots into the output folder (see `envs.sim.report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_cluster_gym.envs.rollout import run_episode
from llm_cluster_gym.envs.sim.report import format_table, write_report
from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.scripts.usage import UsageError


@dataclass
class SimulateArgs:
    """Simulate a scenario under its fixed configuration and write a report."""

    scenario: str = "small"
    """Shipped scenario name (small, small_tapas, small_faults, medium, large) or a YAML path."""
    seed: int = 0
    """Seed of the episode (workload sampling, random faults, VMs)."""
    serving: Literal["request", "aggregate"] = "request"
    """Serving model: 'request' (per-request continuous batching) or 'aggregate' (fluid, fast)."""
    out: str | None = None
    """Output folder for report.md, summary.json and plots (default: reports/sim-<scenario>)."""
    duration_s: float | None = None
    """Override the scenario's duration (s), e.g. for a quick look."""
    no_progress: bool = False
    """Hide the progress bar."""

    def __post_init__(self) -> None:
        if self.duration_s is not None and not self.duration_s > 0:
            raise UsageError(f"--duration-s must be > 0, got {self.duration_s}")


def run(args: SimulateArgs, command: str = "llm-cluster simulate") -> int:
    """Run the simulation, print the table and write the report; returns the exit status.

    Raises:
        ScenarioError: Unknown scenario or a bad override (before anything runs).
    """
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    scenario = load_scenario(args.scenario)
    if args.duration_s is not None:
        scenario = scenario.with_overrides(duration_s=args.duration_s)
    out = Path(args.out) if args.out is not None else Path("reports") / f"sim-{scenario.name}"
    env = ClusterEnv(task="energy", backend=SimCluster(scenario, serving_model=args.serving,
                                                        record_ticks=True))
    result = run_episode(env, None, args.seed, progress=not args.no_progress, seed_backend=True)
    title = f"Simulation of '{scenario.name}' ({args.serving} serving, seed {args.seed})"
    report = write_report(result, out, title, command=command)
    print(f"# {title}\n")
    print(format_table(result.summary()))
    print(f"\nreport: {report}")
    return 0
