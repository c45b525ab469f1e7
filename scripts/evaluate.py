"""`llm-cluster evaluate`: the shipped checkpoints against the rule-based controllers and the oracle.

`llm-cluster evaluate` runs the default plans of `agents.evaluation.DEFAULT_PLANS` (the residual
energy agent vs static, DynamoLLM-style and the oracle on `small`; thermal agent vs unaware and
TAPAS-style on `small_tapas_high` and `small_faults`) on the held-out test window, prints the
tables and writes `reports/evaluation/report.md` with plots (the folder appears complete, or
the previous one stays: `envs.outputs.staged_folder`). `llm-cluster main` (the main job,
`./run-main.sh`) is the same command.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llm_cluster_gym.agents.evaluation import DEFAULT_PLANS, evaluate_task, format_table, write_evaluation
from llm_cluster_gym.envs.outputs import check_output_folder
from llm_cluster_gym.scripts.usage import UsageError, check_seeds

TASKS = tuple(sorted({p.task for p in DEFAULT_PLANS}))
"""Tasks with a shipped checkpoint and an evaluation plan."""


@dataclass
class EvaluateArgs:
    """Evaluate the shipped checkpoints against the rule-based controllers and the oracle."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Tasks to evaluate (each with its shipped checkpoint and baselines): energy, thermal."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Episode seeds (each policy runs every seed)."""
    window: Literal["test", "validation", "train"] = "test"
    """Trace window: test (held out), validation or train."""
    warmup: int = 12
    """Control intervals left out at the start of every episode (start-up reconfiguration)."""
    checkpoint_dir: str = "checkpoints"
    """Folder holding the plans' checkpoints (residual_energy/ for energy, residual_thermal/ for thermal)."""
    out: str = "reports/evaluation"
    """Where the Markdown report and its PNGs go."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise UsageError(f"--tasks: unknown task(s) {unknown}; evaluable: {list(TASKS)}")
        if not self.tasks:
            raise UsageError("--tasks needs at least one task")
        check_seeds("--seeds", self.seeds)
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {self.warmup}")
        check_output_folder(self.out)


@dataclass
class MainArgs(EvaluateArgs):
    """The main job (./run-main.sh): the DynamoLLM week comparison, then the shipped agents.

    First the energy policies on one held-out day of the 2024 conversation week on the
    1,024-GPU `dynamo_week` scenario (SinglePool, MultiPool static, the best fixed per-pool
    configuration and the DynamoLLM-style manager; `llm-cluster dynamo-week`, a few minutes on
    the aggregate model; `bench/dynamo_week.py` runs every test day and two seeds). Then the
    energy agent (DynamoLLM task) against static, the DynamoLLM-style manager and the
    hindsight oracle, and the thermal agent (TAPAS task, at 1.6x oversubscription) against the
    unaware and TAPAS-style baselines, each inside the safety shield and raw, on held-out trace
    windows, three seeds, request-level model; prints the tables and writes
    `reports/evaluation/report.md` with its plots. Between the two, the TAPAS-style controller
    against the unaware baseline on the same day of the 1,024-GPU `tapas_dc` scenario (one seed,
    no oversubscription sweep; `llm-cluster tapas-scale`, `bench/tapas_scale.py` runs three days,
    three seeds and the sweep). The other options are those of `evaluate`.
    """

    week_day: int = 2
    """Held-out day of the week comparison (0 = Sunday; a test day: 0, 2 or 5)."""
    week_out: str = "reports/dynamo-week"
    """Where the week comparison's report goes."""
    tapas_out: str = "reports/tapas-scale"
    """Where the TAPAS-scale comparison's report goes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from llm_cluster_gym.scripts.dynamo_week import TEST_DAYS

        if self.week_day not in TEST_DAYS:
            raise UsageError(f"--week-day: {self.week_day} is not a held-out test day {list(TEST_DAYS)}")
        check_output_folder(self.week_out)
        check_output_folder(self.tapas_out)


def run_main(args: MainArgs, command: str = "llm-cluster main") -> int:
    """The main job: the week comparison and the TAPAS-scale day, then the agents' evaluation."""
    from llm_cluster_gym.scripts import dynamo_week, tapas_scale

    day = dynamo_week.DAY_NAMES[args.week_day]
    print(f"## DynamoLLM week: held-out day {day}, seed 0, aggregate model (llm-cluster dynamo-week)\n")
    dynamo_week.run(dynamo_week.WeekArgs(days=(args.week_day,), seeds=(0,), out=args.week_out,
                                         policies=dynamo_week.available_policies()), command)
    print(f"\n## TAPAS at datacenter scale: {day}, seed 0, tapas_dc (llm-cluster tapas-scale)\n")
    tapas_scale.run(tapas_scale.TapasScaleArgs(days=(args.week_day,), seeds=(0,), oversubscriptions=(),
                                               out=args.tapas_out), command)
    evaluate_args = EvaluateArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvaluateArgs)})
    return run(evaluate_args, command)


def run(args: EvaluateArgs, command: str = "llm-cluster evaluate") -> int:
    """Run the evaluation and write the report.

    Raises:
        CheckpointError: A task's checkpoint is missing or unreadable (checked before any run).
        UsageError: A checkpoint was trained for another task.
    """
    from llm_cluster_gym.agents.policy import checkpoint_task

    plans = [dataclasses.replace(p, checkpoint=Path(args.checkpoint_dir) / p.checkpoint.name)
             for p in DEFAULT_PLANS if p.task in args.tasks]
    for plan in plans:
        task = checkpoint_task(plan.checkpoint)
        if task != plan.task:
            raise UsageError(f"--checkpoint-dir: {plan.checkpoint} holds a checkpoint of task "
                             f"{task!r}, not {plan.task!r}")
    evals = []
    for plan in plans:
        ev = evaluate_task(plan, args.seeds, args.window, args.warmup,
                           progress=lambda msg: print(f"  running {msg}", file=sys.stderr, flush=True))
        print(f"\n## {plan.task} task on {plan.scenario} ({args.window} window, seeds {args.seeds})\n")
        print(format_table(ev))
        evals.append(ev)
    path = write_evaluation(evals, Path(args.out), command=command)
    print(f"\nreport: {path}")
    return 0
