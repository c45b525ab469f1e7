"""Evaluate shipped checkpoints against the rule-based controllers and the oracle.

`python -m scripts.evaluate` runs the default plans of `agents.evaluation.DEFAULT_PLANS` (energy
agent vs static, DynamoLLM-style and the oracle on `small`; thermal agent vs unaware and
TAPAS-style on `small_tapas_high` and `small_faults`) on the held-out test window, prints the
tables and writes `reports/evaluation/report.md` with plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llm_cluster_gym.agents.evaluation import DEFAULT_PLANS, evaluate_task, format_table, write_evaluation


@dataclass
class EvaluateArgs:
    """Arguments of `python -m scripts.evaluate`."""

    tasks: list[str] = field(default_factory=lambda: sorted({p.task for p in DEFAULT_PLANS}))
    """Tasks to evaluate (each with its shipped checkpoint and baselines)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Episode seeds (each policy runs every seed)."""
    window: str = "test"
    """Trace window: test (held out), validation or train."""
    warmup: int = 12
    """Control intervals left out at the start of every episode (start-up reconfiguration)."""
    checkpoint_dir: str = "checkpoints"
    """Folder holding <task>/ checkpoints."""
    out: str = "reports/evaluation"
    """Where the Markdown report and its PNGs go."""


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser whose help comes from the EvaluateArgs field docstrings."""
    p = argparse.ArgumentParser(prog="python -m scripts.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=EvaluateArgs().tasks,
                   help="Tasks to evaluate (each with its shipped checkpoint and baselines).")
    p.add_argument("--seeds", nargs="+", type=int, default=EvaluateArgs().seeds,
                   help="Episode seeds (each policy runs every seed).")
    p.add_argument("--window", default="test", choices=["test", "validation", "train"],
                   help="Trace window: test (held out), validation or train.")
    p.add_argument("--warmup", type=int, default=12,
                   help="Control intervals left out at the start of every episode.")
    p.add_argument("--checkpoint-dir", default="checkpoints", help="Folder holding <task>/ checkpoints.")
    p.add_argument("--out", default="reports/evaluation", help="Where the report and its PNGs go.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and write the report."""
    ns = build_parser().parse_args(argv)
    args = EvaluateArgs(tasks=ns.tasks, seeds=ns.seeds, window=ns.window, warmup=ns.warmup,
                        checkpoint_dir=ns.checkpoint_dir, out=ns.out)
    known = sorted({p.task for p in DEFAULT_PLANS})
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        print(f"unknown task(s) {unknown}; evaluable: {known}", file=sys.stderr)
        return 2
    evals = []
    for default in (p for p in DEFAULT_PLANS if p.task in args.tasks):
        task = default.task
        plan = dataclasses.replace(default, checkpoint=Path(args.checkpoint_dir) / task)
        ev = evaluate_task(plan, args.seeds, args.window, args.warmup,
                           progress=lambda msg: print(f"  running {msg}", file=sys.stderr, flush=True))
        print(f"\n## {task} task on {plan.scenario} ({args.window} window, seeds {args.seeds})\n")
        print(format_table(ev))
        evals.append(ev)
    command = "python -m scripts.evaluate " + " ".join(argv or [])
    path = write_evaluation(evals, Path(args.out), command=command.strip())
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
