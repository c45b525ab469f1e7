"""`llm-cluster train-residual` and `llm-cluster residual-eval`: the residual energy agent (issue 20).

``train-residual`` trains PPO on `agents.residual.ResidualOverManager` over windows of the
DynamoLLM week's training days, with the SLO as a learned constraint, and writes a checkpoint
whose metadata says how long it trained (`agents.train_residual.train`). ``residual-eval`` runs
that checkpoint and the DynamoLLM-style manager on the held-out days, paired per (day, seed), and
prints the agent's energy over the manager's and both SLO attainments with 95% intervals over
days; its last line is one JSON object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_cluster_gym.agents.residual import multiplier_text
from llm_cluster_gym.agents.train_residual import TrainResidualArgs, evaluate_residual, train
from llm_cluster_gym.scripts.host import float_paths
from llm_cluster_gym.scripts.usage import UsageError, check_number, check_seeds

__all__ = ["ResidualEvalArgs", "TrainResidualArgs", "run_eval", "run_train"]


def run_train(args: TrainResidualArgs, command: str = "llm-cluster train-residual") -> int:
    """Validate the options, train, print where the checkpoint is."""
    if args.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {args.steps}")
    if args.n_envs <= 0:
        raise UsageError(f"--n-envs must be > 0, got {args.n_envs}")
    if args.batched < 0:
        raise UsageError(f"--batched must be >= 0 (copies; 0: single envs), got {args.batched}")
    if args.batched and args.serving_model != "aggregate":
        raise UsageError(f"--batched runs the aggregate model only, got --serving-model "
                         f"{args.serving_model}")
    if args.batched and args.constraint == "per-day":
        raise UsageError("--constraint per-day needs single envs (--batched 0): every batched copy "
                         "of an episode runs one window, one day")
    check_number("--window-h", args.window_h, above=0.0, at_most=18.0)
    check_number("--slo-target", args.slo_target, above=0.0, at_most=1.0)
    check_number("--lagrange-lr", args.lagrange_lr, above=0.0)
    if args.lagrange_init is not None:
        check_number("--lagrange-init", args.lagrange_init, at_least=0.0)
    check_number("--max-minutes", args.max_minutes, above=0.0)
    check_seeds("--seed", [args.seed])
    if args.init is not None and not (Path(args.init) / "metadata.json").is_file():
        raise FileNotFoundError(f"--init {args.init}: no metadata.json there (a checkpoint of "
                                "llm-cluster train-residual)")
    path = train(args)
    meta = json.loads((path / "metadata.json").read_text())
    print(f"checkpoint: {path} ({meta['steps']} steps in {meta['train_wall_s']:.0f} s, "
          f"multiplier {multiplier_text(meta['lagrange'])})")
    return 0


@dataclass
class ResidualEvalArgs:
    """The residual energy agent against the DynamoLLM-style manager on held-out days."""

    checkpoint: str = "checkpoints/residual_energy"
    """Checkpoint directory written by `llm-cluster train-residual`."""
    days: tuple[int, ...] = (0, 2, 5)
    """Days of the week (0 = Sunday 2024-05-12); the default is the week protocol's test days."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds per day (each runs the agent and the manager on the same requests)."""
    hours: float = 24.0
    """Measured hours of each day, from --start-h (after the 30-minute burn-in)."""
    start_h: float = 0.0
    """Hour of the day the measured span starts (0: midnight)."""
    serving_model: Literal["aggregate", "request"] = "aggregate"
    """Serving model: aggregate (the week protocol's), or request (per-request TTFT and TBT)."""
    out: str = "reports/residual"
    """Folder for results.json."""
    jobs: int = 1
    """Worker processes running the (day, seed) units (the results do not depend on it)."""


def run_eval(args: ResidualEvalArgs, command: str = "llm-cluster residual-eval") -> int:
    """Evaluate, print each (day, seed) and the summary, write results.json."""
    if not (Path(args.checkpoint) / "metadata.json").is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no metadata.json there "
                                "(train one with llm-cluster train-residual)")
    if not args.days or any(not 0 <= d < 7 for d in args.days):
        raise UsageError(f"--days must be days of the week (0..6), got {list(args.days)}")
    check_seeds("--seeds", args.seeds)
    check_number("--hours", args.hours, above=0.0, at_most=24.0)
    check_number("--start-h", args.start_h, at_least=0.0, at_most=24.0 - args.hours)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    from llm_cluster_gym.agents.policy import verified_residual_metadata
    from llm_cluster_gym.agents.train_residual import RESIDUAL_KIND

    verified_residual_metadata(args.checkpoint, RESIDUAL_KIND)  # before hours of evaluation
    res = evaluate_residual(args.checkpoint, tuple(args.days), tuple(args.seeds), args.hours,
                            args.start_h, args.serving_model, args.jobs)
    s = res["summary"]
    for key, (mean, half) in s.items():
        print(f"{key}: {mean:.4f} ± {half:.4f} (95% over {len(args.days)} days)")
    def pct(share: float | None) -> str:
        return "-" if share is None else f"{share:.0%}"

    print("clock moves against the manager's (share of intervals, burn-in included):")
    for row in res["rows"]:
        cells = "; ".join(
            f"{pool} down {pct(m['down'])} up {pct(m['up'])} (manager at its lowest clock "
            f"{pct(m['manager_at_lowest_clock'])}, raised there {pct(m['up_when_manager_at_lowest'])})"
            for pool, m in row["clock_moves"].items())
        print(f"  day {row['day']} seed {row['seed']}: {cells}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, "host": float_paths(), **res},
                                                  indent=1) + "\n")
    print(json.dumps({"agent_vs_manager_energy": s["energy_ratio"][0],
                      "agent_vs_manager_energy_ci95": s["energy_ratio"][1],
                      "agent_slo_attainment": s["agent_slo"][0],
                      "manager_slo_attainment": s["manager_slo"][0], "days": len(args.days),
                      "seeds": len(args.seeds), "start_h": args.start_h, "hours": args.hours,
                      "serving_model": args.serving_model}))
    return 0
