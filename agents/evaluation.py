"""Evaluate shipped agents against the rule-based controllers and the oracle.

The job users run most: each trained checkpoint, inside the safety shield by default (and
unshielded, for reference), runs beside the baselines of its task on held-out trace windows
(the `test` window of `agents.config`, never seen in training or model selection), several
seeds, on the request-level model. Every policy/seed is one `envs.rollout.run_measured`
cell, the same measurement `scripts.compare` and the Ray sweep make; the first `warmup`
intervals (start-up reconfiguration and model loads) are left out for every policy alike.

The report gives mean and spread per metric, ratios against static and (energy task) against
the hindsight oracle, the energy and SLO attainment over time per policy, and the Pareto view
of energy against SLO attainment.
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.agents.config import WINDOWS
from llm_cluster_gym.envs.episode import COMPARISON_COLUMNS, EpisodeResult
from llm_cluster_gym.envs.outputs import safe_name, staged_folder
from llm_cluster_gym.envs.rollout import run_measured
from llm_cluster_gym.envs.sim.scenario import Scenario, load_scenario

AGENT = "agent"
SHIELDED_AGENT = "shield:agent"

@dataclass(frozen=True)
class TaskPlan:
    """What one task's evaluation runs.

    Attributes:
        task: Env task of the checkpoint.
        checkpoint: Checkpoint directory.
        scenario: Scenario evaluated on (may differ from the training one when spaces match,
            e.g. the TAPAS datacenter at higher oversubscription).
        baselines: Rule-based controller names of `controllers.registry`.
        reference: The baseline ratios are taken against (static / unaware).
        oracle: Name of the hindsight reference policy (not a bound: `controllers.oracle`), or None.
    """

    task: str
    checkpoint: Path
    scenario: str
    baselines: tuple[str, ...]
    reference: str
    oracle: str | None = None


DEFAULT_PLANS = (
    TaskPlan("energy", Path("checkpoints/residual_energy"), "small", ("static", "dynamo"), "static",
             "oracle"),
    TaskPlan("thermal", Path("checkpoints/residual_thermal"), "small_tapas_high",
             ("unaware", "tapas", "shield:unaware"), "unaware"),
    TaskPlan("thermal", Path("checkpoints/residual_thermal"), "small_faults", ("unaware", "tapas"),
             "unaware"),
)
"""The main job's plans: the DynamoLLM task (the residual energy agent over the DynamoLLM-style
manager, `agents/residual.py`: layout-free, trained on the 1,024-GPU week, judged here on `small`)
against static, the DynamoLLM-style manager and the oracle; the TAPAS task at 1.6x power/cooling
oversubscription (power capping) and under the scheduled cooling failure, power-feed failure and
load spike of `small_faults` (thermal throttling), against the unaware and TAPAS-style baselines.
The thermal agent (`agents/residual_thermal.py`: over the TAPAS-style controller, layout-free,
trained with the shield in the loop on `small_tapas`, `small_tapas_high` and `tapas_dc` windows)
never saw `small_faults`' scheduled failures."""


@dataclass
class PolicyRuns:
    """Every seed of one policy: summaries and the measured episodes."""

    name: str
    summaries: list[dict[str, float]] = field(default_factory=list)
    episodes: list[EpisodeResult] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float]:
        """Mean and standard deviation of a summary metric over seeds."""
        values = np.array([s.get(key, np.nan) for s in self.summaries], dtype=float)
        return float(np.nanmean(values)), float(np.nanstd(values))


@dataclass
class TaskEvaluation:
    """One task's evaluation: the plan, the seeds, and the runs per policy (in report order)."""

    plan: TaskPlan
    seeds: tuple[int, ...]
    window: str
    warmup: int
    runs: dict[str, PolicyRuns]
    wall_s: float

    def ratios(self) -> dict[str, dict[str, float]]:
        """Energy, J/token and event ratios of each policy against the reference and the oracle."""
        out: dict[str, dict[str, float]] = {}
        ref = self.runs[self.plan.reference]
        oracle = self.runs.get(self.plan.oracle) if self.plan.oracle else None
        for name, runs in self.runs.items():
            r: dict[str, float] = {}
            for key in ("energy_kwh", "energy_per_token_j", "thermal_throttle_events",
                        "power_throttle_events"):
                base = ref.stat(key)[0]
                r[f"{key}_vs_{self.plan.reference}"] = _ratio(runs.stat(key)[0], base)
            if oracle is not None:
                r["energy_kwh_vs_oracle"] = _ratio(runs.stat("energy_kwh")[0],
                                                   oracle.stat("energy_kwh")[0])
            out[name] = r
        return out


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else float("inf")
    return a / b


def windowed(scenario: str | Scenario, window: str) -> Scenario:
    """The scenario with its workload drawn from the named trace window of `agents.config`."""
    sc = load_scenario(scenario) if not isinstance(scenario, Scenario) else scenario
    start_s, length_s = WINDOWS[window]
    return sc.with_overrides(workload=dataclasses.replace(sc.workload, start_s=start_s,
                                                          window_s=length_s))


def policy_factory(name: str, plan: TaskPlan, seed: int) -> Callable[[Any], Any]:
    """Build the controller for a policy name of the report (agent names map to the checkpoint)."""
    from llm_cluster_gym.agents.policy import load_policy
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.controllers.registry import make_controller
    from llm_cluster_gym.controllers.shield import Shield

    def make(env: Any) -> Any:
        if name in (AGENT, SHIELDED_AGENT):
            learned = load_policy(plan.checkpoint, env, name=name, same_scenario=False)
            if name == AGENT:
                return learned
            base = env.unwrapped
            return Shield(learned, ControllerContext.from_env(base), base.backend.telemetry)
        return make_controller(name, env, seed=seed)

    return make


def evaluate_task(plan: TaskPlan, seeds: Sequence[int] = (0, 1, 2), window: str = "test",
                  warmup: int = 12, progress: Callable[[str], None] | None = None) -> TaskEvaluation:
    """Run the shielded and raw agent, the baselines and the oracle on every seed."""
    from llm_cluster_gym.agents.policy import checkpoint_task

    task = checkpoint_task(plan.checkpoint)
    if task != plan.task:
        raise ValueError(f"{plan.checkpoint}: checkpoint task is {task!r}, plan says {plan.task!r}")
    scenario = windowed(plan.scenario, window)
    names = [SHIELDED_AGENT, AGENT, *plan.baselines] + ([plan.oracle] if plan.oracle else [])
    runs = {n: PolicyRuns(n) for n in names}
    t0 = time.perf_counter()
    for name in names:
        for seed in seeds:
            if progress is not None:
                progress(f"{plan.task}: {name} seed {seed}")
            episode, summary = run_measured(plan.task, scenario, "request",
                                            policy_factory(name, plan, seed), seed, warmup)
            runs[name].summaries.append(summary)
            runs[name].episodes.append(episode)
    return TaskEvaluation(plan, tuple(seeds), window, warmup, runs, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ report
def format_table(ev: TaskEvaluation) -> str:
    """Markdown table: mean ± std per metric and policy, then the ratios."""
    head = "| policy | " + " | ".join(label for _, label in COMPARISON_COLUMNS) + " |"
    lines = [head, "|---" * (len(COMPARISON_COLUMNS) + 1) + "|"]
    for name, runs in ev.runs.items():
        cells = []
        for key, _ in COMPARISON_COLUMNS:
            mean, std = runs.stat(key)
            cells.append(f"{_fmt(mean)} ± {_fmt(std)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratios = ev.ratios()
    keys = list(next(iter(ratios.values())))
    lines += ["", "| policy | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for name, r in ratios.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.4f}" if v else "0"


def _plots(ev: TaskEvaluation) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    fig, (ax_e, ax_s) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for name, runs in ev.runs.items():
        ep = runs.episodes[0]
        t = ep.time_s
        ax_e.plot(t, ep.metrics["energy_j"] / 1e3, label=name, lw=1.2)
        ax_s.plot(t, ep.metrics["slo_attainment"], label=name, lw=1.2)
    ax_e.set_ylabel("energy per interval (kJ)")
    ax_s.set_ylabel("SLO attainment per interval")
    ax_s.set_xlabel("time (s)")
    ax_e.set_title(f"{ev.plan.task} task on {ev.plan.scenario} ({ev.window} window, seed {ev.seeds[0]})")
    ax_e.legend(fontsize=8, ncol=3)
    for ax in (ax_e, ax_s):
        ax.grid(alpha=0.3)
    out["over_time"] = _png(fig, plt)
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, runs in ev.runs.items():
        e = [s["energy_kwh"] for s in runs.summaries]
        a = [s["slo_attainment"] for s in runs.summaries]
        pts = ax.scatter(e, a, alpha=0.35, s=18)
        ax.scatter([np.mean(e)], [np.mean(a)], color=pts.get_facecolor()[0], s=80, marker="D",
                   edgecolor="k", label=name)
    ax.set_xlabel("energy (kWh, measured part of the episode)")
    ax.set_ylabel("SLO attainment")
    ax.set_title(f"{ev.plan.task}: energy vs SLO attainment (dots: seeds, diamonds: means)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out["pareto"] = _png(fig, plt)
    return out


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_evaluation(evals: Sequence[TaskEvaluation], out_dir: Path, command: str = "") -> Path:
    """Write `report.md`, `summary.json` and the PNGs into `out_dir`, all at once.

    Everything is rendered in memory first, then written through `envs.outputs.staged_folder`:
    the folder appears complete, replacing the previous run's, or not at all.

    Raises:
        OutputFolderError: `out_dir` is a file or holds files no run wrote.
    """
    import json

    files: dict[str, bytes] = {}
    md = ["# Evaluation of the shipped agents against the baselines", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += [f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    summary: dict[str, Any] = {}
    for ev in evals:
        meta_scn = ev.plan.scenario
        md += [f"## {ev.plan.task} task on `{meta_scn}` — checkpoint `{ev.plan.checkpoint}`", "",
               f"Request-level model, trace window `{ev.window}` (held out from training), seeds "
               f"{list(ev.seeds)}, first {ev.warmup} intervals left out for every policy; "
               f"`{SHIELDED_AGENT}` is the trained policy inside the safety shield (the default "
               f"for deployment), `{AGENT}` the raw policy. {ev.wall_s:.0f} s wall.", "",
               format_table(ev), ""]
        shield = ev.runs[SHIELDED_AGENT]
        n_int = ev.runs[SHIELDED_AGENT].episodes[0].n_intervals
        md += [f"The shield stepped in on {shield.stat('shield_overrides')[0]:.1f} of {n_int} "
               f"intervals per episode on average, "
               f"{shield.stat('shield_overrides_avoidable')[0]:.1f} of them outside declared "
               "emergencies (during one the shield applies its emergency fallback, whatever the "
               "policy proposed).", ""]
        for key, png in _plots(ev).items():
            name = safe_name(f"{ev.plan.task}_{ev.plan.scenario}_{key}") + ".png"
            files[name] = png
            md += [f"![{ev.plan.task} {key}]({name})", ""]
        summary[f"{ev.plan.task}/{ev.plan.scenario}"] = {
            "scenario": ev.plan.scenario, "window": ev.window, "seeds": list(ev.seeds),
            "policies": {n: {k: r.stat(k)[0] for k, _ in COMPARISON_COLUMNS} for n, r in ev.runs.items()},
            "ratios": ev.ratios(),
        }
    files["report.md"] = "\n".join(md).encode()
    files["summary.json"] = json.dumps(summary, indent=1, default=float).encode()
    with staged_folder(out_dir, command) as stage:
        for name, data in files.items():
            (stage / name).write_bytes(data)
    return Path(out_dir) / "report.md"
