"""`llm-cluster compare`: controllers on a scenario over several seeds; one table, ratios, plots.

Usage::

    llm-cluster compare [--task energy] [--scenario small] [--serving request]
        [--controllers static dynamo oracle] [--seeds 0 1 2] [--warmup 12]
        [--out reports/compare-<task>-<scenario>] [--no-plots]

Controllers are policy specs (`controllers.policy_spec`: ``dynamo``, ``shield:dynamo``,
``ckpt:<dir>``, ...). For each controller and seed the env runs a whole episode
(`envs.rollout`); the first `warmup` intervals (start-up reconfiguration, model loads)
are left out of the figures. The table gives means over seeds of energy, energy per token,
SLO attainment, TTFT/TBT P99, thermal and power throttling events, peak row power, max GPU
temperature and shield overrides. Then the ratios the issue asks for: DynamoLLM-style energy
over static (with both attainments), TAPAS-style throttling events over unaware. Plots per
controller (first seed) come from `envs.sim.report.write_report`, into a folder written all at
once (`envs.outputs.staged_folder`). Scenario, policies and checkpoints are checked before the
first episode.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from llm_cluster_gym.controllers.policy_spec import make_policy, parse_policy_spec
from llm_cluster_gym.envs.episode import COMPARISON_COLUMNS
from llm_cluster_gym.envs.outputs import check_output_folder, safe_name, staged_folder
from llm_cluster_gym.envs.rollout import run_measured
from llm_cluster_gym.envs.sim.report import write_report
from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.scripts.usage import UsageError, check_seeds

COLUMNS = COMPARISON_COLUMNS
"""(summary key, column label) of the table: `envs.episode`'s comparison columns."""


def default_policies(task: str) -> list[str]:
    """The policies compared when none are named: the task's baselines (and the oracle for energy)."""
    if task == "energy":
        return ["static", "dynamo", "oracle"]
    return ["unaware", "tapas", "shield:unaware"]


@dataclass
class CompareArgs:
    """Compare controllers on a scenario over several seeds: one table, ratios, report plots."""

    task: Literal["energy", "thermal", "combined"] = "energy"
    """Env task (its action space and reward)."""
    scenario: str = "small"
    """Scenario name or YAML path."""
    serving: Literal["request", "aggregate"] = "request"
    """Serving model: request (per-request batching) or aggregate (fluid, fast)."""
    controllers: list[str] | None = None
    """Policy specs (static, dynamo, shield:dynamo, ckpt:<dir>, ...); default: static dynamo oracle
    for the energy task, unaware tapas shield:unaware otherwise."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Episode seeds (every controller runs every seed)."""
    warmup: int = 12
    """Control intervals left out at the start of every episode (start-up reconfiguration)."""
    out: str | None = None
    """Report folder (default: reports/compare-<task>-<scenario>)."""
    no_plots: bool = False
    """Skip the per-controller reports (table only)."""

    def __post_init__(self) -> None:
        for name in self.controllers or []:
            parse_policy_spec(name)
        check_seeds("--seeds", self.seeds)
        if self.controllers is not None and not self.controllers:
            raise UsageError("--controllers needs at least one policy")
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        if self.out is not None:
            check_output_folder(self.out)

    def policies(self) -> list[str]:
        """The policy specs to run (the task's defaults when none were given)."""
        return list(self.controllers) if self.controllers else default_policies(self.task)


def report_folders(policies: list[str]) -> dict[str, str]:
    """The subfolder of each policy's report: its spec as one safe path component, made unique."""
    out: dict[str, str] = {}
    for name in policies:
        base = folder = safe_name(name.replace(":", "_"))
        k = 2
        while folder in out.values():
            folder, k = f"{base}-{k}", k + 1
        out[name] = folder
    return out


def run_compare(task: str, scenario: str, serving: str, controllers: list[str],
                seeds: list[int], warmup: int, out: Path | None,
                command: str = "llm-cluster compare") -> dict[str, dict[str, float]]:
    """Run every controller (policy spec) on every seed; mean summary per controller.

    With `out`, the first seed's report of each controller goes to ``out/<controller>/``; the
    folder is written all at once (`envs.outputs.staged_folder`): a run that fails leaves the
    previous folder as it was, and a finished one replaces it whole.
    """
    with staged_folder(out, command) if out is not None else contextlib.nullcontext() as stage:
        table: dict[str, dict[str, float]] = {}
        folders = report_folders(controllers)
        for name in controllers:
            rows = []
            for k, seed in enumerate(seeds):
                measured, summary = run_measured(
                    task, scenario, serving, lambda env, n=name, s=seed: make_policy(n, env, seed=s),
                    seed, warmup)
                rows.append(summary)
                if stage is not None and k == 0:
                    write_report(measured, stage / folders[name],
                                 f"{name} on {scenario} ({task}, seed {seed})", command=command)
            table[name] = {key: float(np.nanmean([r[key] for r in rows])) for key in rows[0]}
    return table


def default_out(task: str, scenario_name: str) -> Path:
    """``reports/compare-<task>-<scenario>`` (the scenario's name as one safe path component)."""
    return Path("reports") / f"compare-{task}-{safe_name(scenario_name)}"


def check_checkpoints(policies: list[str], task: str, scenarios: list[str]) -> None:
    """Every checkpoint a policy spec names exists, reads, and was trained for `task` and `scenarios`.

    The checks the checkpoint loader makes when the episode starts, made before any episode. A
    residual agent runs on every scenario of its task (`agents.policy.checkpoint_scope`).

    Args:
        policies: Policy specs (controller names are skipped).
        task: The env task.
        scenarios: Names (not paths) of the scenarios the policies will run on.

    Raises:
        CheckpointError: A checkpoint is missing or its metadata unreadable.
        UsageError: A checkpoint of another task or scenario.
    """
    from llm_cluster_gym.agents.policy import checkpoint_scope

    for name in policies:
        directory = parse_policy_spec(name).checkpoint
        if directory is None:
            continue
        trained_task, trained_scenario = checkpoint_scope(directory)
        if trained_task != task:
            raise UsageError(f"policy {name!r}: the checkpoint was trained for task {trained_task!r}, "
                             f"not {task!r}")
        other = [s for s in scenarios if trained_scenario is not None and s != trained_scenario]
        if other:
            raise UsageError(f"policy {name!r}: the checkpoint was trained on scenario "
                             f"{trained_scenario!r}, not {other[0]!r}")


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


def run(args: CompareArgs, command: str = "llm-cluster compare") -> int:
    """Run the comparison and print the table and ratios.

    Raises:
        ScenarioError: Unknown scenario (before anything runs).
        CheckpointError: A checkpoint policy's folder is missing or unreadable (before anything runs).
        OutputFolderError: The output folder cannot be replaced (before anything runs).
    """
    names = args.policies()
    scenario = load_scenario(args.scenario)
    check_checkpoints(names, args.task, [scenario.name])
    out = None if args.no_plots else check_output_folder(args.out or default_out(args.task, scenario.name))
    table = run_compare(args.task, args.scenario, args.serving, names, args.seeds, args.warmup, out,
                        command=command)
    print(f"# {args.task} on {args.scenario} ({args.serving} serving), seeds {args.seeds}, "
          f"first {args.warmup} intervals left out\n")
    print(format_compare(table))
    r = ratios(table)
    if r:
        print("\nratios: " + json.dumps({k: round(v, 4) for k, v in r.items()}))
    if out is not None:
        print(f"\nreports: {out}/<controller>/report.md")
    return 0
