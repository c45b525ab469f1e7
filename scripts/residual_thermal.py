"""`llm-cluster train-thermal` and `llm-cluster thermal-eval` (issue 20).

``train-thermal`` trains PPO on `agents.residual_thermal.ResidualOverTapas` (the
TAPAS-style controller with a learned clock ceiling per rank group of rows and a placement gate,
projected onto its own forecast's safe set) with the shield in the loop and the rate of unsafe
proposals as a learned constraint per scenario family, over the small TAPAS scenarios and windows
of `tapas_dc`'s training days (`agents.train_residual_thermal.train`).
``thermal-eval`` runs the checkpoint inside the shield, TAPAS heeding the forecast inside the
shield, the TAPAS-style controller inside the shield and TAPAS alone on the same units
(`small_tapas_high` request-level, `tapas_dc` on the test days and seeds) and prints each unit,
the means with 95% intervals and each policy's paired difference from TAPAS alone; its last line
is one JSON object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llm_cluster_gym.agents.residual import multiplier_text
from llm_cluster_gym.agents.train_residual_thermal import (
    TrainResidualThermalArgs,
    evaluate_residual_thermal,
    train,
)
from llm_cluster_gym.scripts.host import float_paths
from llm_cluster_gym.scripts.usage import UsageError, check_number, check_seeds

__all__ = ["ResidualThermalEvalArgs", "TrainResidualThermalArgs", "run_eval", "run_train"]


def run_train(args: TrainResidualThermalArgs, command: str = "llm-cluster train-thermal") -> int:
    """Validate the options, train, print where the checkpoint is."""
    if args.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {args.steps}")
    if args.n_envs <= 0:
        raise UsageError(f"--n-envs must be > 0, got {args.n_envs}")
    check_number("--dc-share", args.dc_share, at_least=0.0, at_most=1.0)
    check_number("--dc-window-h", args.dc_window_h, above=0.0, at_most=24.0)
    check_number("--request-share", args.request_share, at_least=0.0, at_most=1.0)
    check_number("--override-target", args.override_target, above=0.0, at_most=1.0)
    check_number("--lagrange-lr", args.lagrange_lr, above=0.0)
    if args.lagrange_init is not None:
        check_number("--lagrange-init", args.lagrange_init, at_least=0.0)
    check_number("--max-minutes", args.max_minutes, above=0.0)
    check_seeds("--seed", [args.seed])
    if args.init is not None and not (Path(args.init) / "metadata.json").is_file():
        raise FileNotFoundError(f"--init {args.init}: no metadata.json there (a checkpoint of "
                                "llm-cluster train-thermal)")
    path = train(args)
    meta = json.loads((path / "metadata.json").read_text())
    print(f"checkpoint: {path} ({meta['steps']} steps in {meta['train_wall_s']:.0f} s; "
          f"multipliers {multiplier_text(meta['lagrange'])})")
    return 0


@dataclass
class ResidualThermalEvalArgs:
    """The thermal agent (shielded) against the TAPAS-style controller with and without the shield."""

    checkpoint: str = "checkpoints/residual_thermal"
    """Checkpoint directory written by `llm-cluster train-thermal`."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of `small_tapas_high` (request-level); the first also runs the `tapas_dc` days."""
    dc_days: tuple[int, ...] = (0, 2, 5)
    """Days of the week of the `tapas_dc` windows (the week protocol's test days)."""
    dc_seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of each `tapas_dc` day (a seed draws the day's cooling failures and VM arrivals)."""
    jobs: int = 1
    """Processes running the units (each unit is one episode per contender; results do not
    depend on it)."""
    dc_hours: float = 24.0
    """Hours of each `tapas_dc` window (the whole day by default, as `llm-cluster tapas-scale`)."""
    dc_from_hour: float = 0.0
    """Hour of the day each `tapas_dc` window starts."""
    out: str = "reports/residual-thermal"
    """Folder for results.json."""


def plot_units(rows: list[dict], path: Path) -> None:
    """Per unit and contender: throttled plus capped GPU-seconds and VM-hours waiting (grouped bars).

    One look shows what the means hide: whether a policy wins on every unit or on one, and how
    far apart the units are (the datacenter days differ by an order of magnitude).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from llm_cluster_gym.agents.train_residual_thermal import CONTENDERS

    labels = [f"{r['unit'].replace('tapas_dc ', '')}\nseed {r['seed']}" for r in rows]
    x = np.arange(len(rows))
    width = 0.8 / len(CONTENDERS)
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(7.0, 1.1 * len(rows)), 6.5), sharex=True)
    for k, name in enumerate(CONTENDERS):
        off = x - 0.4 + (k + 0.5) * width
        a.bar(off, [r[name]["harm_gpu_s"] for r in rows], width, label=name)
        b.bar(off, [r[name]["vm_wait_h"] for r in rows], width, label=name)
    a.set_ylabel("throttled + capped GPU-s")
    a.set_yscale("symlog", linthresh=100.0)
    b.set_ylabel("VM-hours waiting")
    b.set_xticks(x, labels, fontsize=8)
    a.legend(fontsize=8, ncol=len(CONTENDERS))
    a.set_title("thermal-eval: each unit, every contender (agent and rules inside the shield; "
                "TAPAS, unaware alone)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval(args: ResidualThermalEvalArgs, command: str = "llm-cluster thermal-eval") -> int:
    """Evaluate, print each unit and the summary, write results.json."""
    if not (Path(args.checkpoint) / "metadata.json").is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no metadata.json there "
                                "(train one with llm-cluster train-thermal)")
    if not args.dc_days or any(not 0 <= d < 7 for d in args.dc_days):
        raise UsageError(f"--dc-days must be days of the week (0..6), got {list(args.dc_days)}")
    check_seeds("--seeds", args.seeds)
    check_seeds("--dc-seeds", args.dc_seeds)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    check_number("--dc-hours", args.dc_hours, above=0.0, at_most=24.0)
    check_number("--dc-from-hour", args.dc_from_hour, at_least=0.0, at_most=24.0 - args.dc_hours)
    from llm_cluster_gym.agents.policy import verified_residual_metadata
    from llm_cluster_gym.agents.residual_thermal import RESIDUAL_THERMAL_KIND

    verified_residual_metadata(args.checkpoint, RESIDUAL_THERMAL_KIND)  # before hours of evaluation
    res = evaluate_residual_thermal(args.checkpoint, tuple(args.seeds), tuple(args.dc_days),
                                    args.dc_hours, args.dc_from_hour, tuple(args.dc_seeds), args.jobs,
                                    log=print)
    for group, by_policy in res["summary"].items():
        for policy, figures in by_policy.items():
            cells = ", ".join(f"{k} {m:.4g} ± {h:.2g}" for k, (m, h) in figures.items())
            print(f"{group} {policy}: {cells}")
    for group, by_policy in res["paired_vs_tapas"].items():
        for policy, figures in by_policy.items():
            cells = ", ".join(f"{k} {m:+.4g} ± {h:.2g}" for k, (m, h) in figures.items())
            print(f"{group} {policy} minus TAPAS, paired per unit: {cells}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, "host": float_paths(), **res},
                                                  indent=1) + "\n")
    plot_units(res["rows"], out / "units.png")
    print(f"wrote {out / 'results.json'} and {out / 'units.png'}")
    s = res["summary"]
    print(json.dumps({f"{g}_{p}_{k}": s[g][p][k][0] for g in s for p in ("agent", "tapas_forecast", "tapas")
                      for k in ("override_rate", "power_capped_gpu_s", "thermal_throttled_gpu_s")}))
    return 0
