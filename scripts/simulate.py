"""`llm-cluster simulate`: simulate a scenario under its fixed configuration and write a report.

Usage::

    llm-cluster simulate [--scenario small] [--seed 0] [--serving request|aggregate]
                         [--out reports/sim-<scenario>] [--duration-s 120] [--no-progress]

Prints the headline table (energy, energy per token, carbon, GPU-hour cost, TTFT/TBT, SLO
attainment, throttling events, peak row power, max GPU temperature) and writes ``report.md``,
``summary.json`` and plots into the output folder (see `envs.sim.report`), all at once: the
folder appears complete or not at all, replacing the previous run's (`envs.outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_cluster_gym.envs.outputs import check_output_folder, safe_name, staged_folder
from llm_cluster_gym.envs.rollout import run_episode
from llm_cluster_gym.envs.sim.report import format_table, write_report
from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.scripts.usage import check_number, check_seed


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
        check_seed("--seed", self.seed)
        check_number("--duration-s", self.duration_s, above=0)
        if self.out is not None:
            check_output_folder(self.out)


def default_out(scenario_name: str) -> Path:
    """``reports/sim-<scenario>``, the name made one safe path component (stays under reports/)."""
    return Path("reports") / f"sim-{safe_name(scenario_name)}"


def run(args: SimulateArgs, command: str = "llm-cluster simulate") -> int:
    """Run the simulation, print the table and write the report; returns the exit status.

    Raises:
        ScenarioError: Unknown scenario or a bad override (before anything runs).
        OutputFolderError: The output folder is a file or holds files no run wrote (before
            anything runs).
    """
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    scenario = load_scenario(args.scenario)
    if args.duration_s is not None:
        scenario = scenario.with_overrides(duration_s=args.duration_s)
    out = check_output_folder(args.out if args.out is not None else default_out(scenario.name))
    env = ClusterEnv(task="energy", backend=SimCluster(scenario, serving_model=args.serving,
                                                        record_ticks=True))
    result = run_episode(env, None, args.seed, progress=not args.no_progress, seed_backend=True)
    title = f"Simulation of '{scenario.name}' ({args.serving} serving, seed {args.seed})"
    with staged_folder(out, command) as stage:
        write_report(result, stage, title, command=command)
    report = out / "report.md"
    print(f"# {title}\n")
    print(format_table(result.summary()))
    print(f"\nreport: {report}")
    return 0
