"""Hyperparameter search for an agent with Ray Tune (ASHA early stopping).

Usage::

    python -m scripts.tune --task energy [--space agents/tune_space.yaml] [--out checkpoints/energy-tuned]
        [--num-samples 8] [--trial-steps 60000] [--address auto]

Trials train on the aggregate env (train window) in chunks and report the validation reward;
ASHA stops the weak ones. The best checkpoint (+ `last/`), the tuned `hyperparams.yaml` and a
trial table go to `--out`; continue with
`python -m scripts.train --task energy --hyperparams <out>/hyperparams.yaml --out <out> --resume`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_cluster_gym.scripts.simulate import dataclass_parser  # noqa: E402


@dataclass
class TuneArgs:
    """Arguments of `python -m scripts.tune`."""

    task: str = "energy"
    """Task: energy, thermal or combined."""
    space: str | None = None
    """Search-space YAML (default: agents/tune_space.yaml)."""
    hyperparams: str | None = None
    """Base hyperparameter file; fields not searched come from it (default: agents/hyperparams.yaml)."""
    out: str | None = None
    """Where the best checkpoint and hyperparams.yaml go (default: checkpoints/<task>-tuned)."""
    num_samples: int | None = None
    """Trials (default: from the search-space file)."""
    trial_steps: int | None = None
    """Steps a trial may train at most (default: from the search-space file)."""
    seed: int = 0
    """Seed of every trial and of the random search."""
    n_envs: int = 1
    """Training envs per trial."""
    max_concurrent: int | None = None
    """Trials at once (default: as many as fit the CPUs)."""
    address: str | None = None
    """Existing Ray cluster (auto, <head-ip>:6379, ray://<head-ip>:10001); default: a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (default: all)."""
    ship_code: bool = False
    """Upload this repository to the cluster as the job's working directory."""
    no_dashboard: bool = False
    """Do not start the Ray dashboard (local Ray only)."""


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one option per `TuneArgs` field, help from its docstring."""
    return dataclass_parser(
        TuneArgs, "python -m scripts.tune", __doc__.split("\n")[0],
        {"num_samples": int, "trial_steps": int, "seed": int, "n_envs": int,
         "max_concurrent": int, "num_cpus": int},
        {"task": ("energy", "thermal", "combined")})


def main(argv: list[str] | None = None) -> int:
    """Run the search and print the best configuration and where it was written."""
    from llm_cluster_gym.agents.config import HYPERPARAMS_PATH, HyperparamsError
    from llm_cluster_gym.agents.sweep import init_ray
    from llm_cluster_gym.agents.tune import TUNE_SPACE_PATH, TuneSpaceError, load_search_space, tune_agent

    parser = build_parser()
    args = TuneArgs(**vars(parser.parse_args(argv)))
    space = args.space or TUNE_SPACE_PATH
    try:
        settings = load_search_space(args.task, space)
    except TuneSpaceError as exc:
        parser.error(str(exc))
    changes = {k: v for k, v in (("num_samples", args.num_samples), ("trial_steps", args.trial_steps))
               if v is not None}
    if any(v <= 0 for v in changes.values()):
        parser.error(f"--num-samples and --trial-steps must be positive, got {changes}")
    settings = dataclasses.replace(settings, **changes)
    init_ray(args.address, args.num_cpus, include_dashboard=False if args.no_dashboard else None,
             ship_code=args.ship_code)
    out = Path(args.out or f"checkpoints/{args.task}-tuned")
    try:
        outcome = tune_agent(args.task, out, settings, seed=args.seed, n_envs=args.n_envs,
                             max_concurrent=args.max_concurrent,
                             hyperparams=args.hyperparams or HYPERPARAMS_PATH, space_path=space)
    except HyperparamsError as exc:
        parser.error(str(exc))
    print(json.dumps({"best_validation_reward": outcome.best_reward, "best_params": outcome.best_params}))
    print(f"best checkpoint: {outcome.out} (resumable: {outcome.out}/last)")
    print(f"train it further: python -m scripts.train --task {args.task} --hyperparams "
          f"{outcome.out}/hyperparams.yaml --out {outcome.out} --resume --steps <total>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
