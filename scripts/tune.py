"""`llm-cluster tune`: hyperparameter search for an agent with Ray Tune (ASHA early stopping).

Usage::

    llm-cluster tune --task energy [--space agents/tune_space.yaml] [--out checkpoints/energy-tuned]
        [--num-samples 8] [--trial-steps 60000] [--address auto]

Trials train on the aggregate env (train window) in chunks and report the validation reward;
ASHA stops the weak ones. The best checkpoint (+ `last/`), the tuned `hyperparams.yaml` and a
trial table go to `--out`; continue with
`llm-cluster train --task energy --hyperparams <out>/hyperparams.yaml --out <out> --resume`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_cluster_gym.scripts.usage import UsageError, check_seed


@dataclass
class TuneArgs:
    """Search an agent's hyperparameters with Ray Tune (ASHA early stopping)."""

    task: Literal["energy", "thermal", "combined"] = "energy"
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

    def __post_init__(self) -> None:
        check_seed("--seed", self.seed)
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise UsageError(f"--out {self.out!r} is a file, not a folder")
        for name in ("num_samples", "trial_steps", "n_envs", "max_concurrent", "num_cpus"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run(args: TuneArgs, command: str = "llm-cluster tune") -> int:
    """Run the search and print the best configuration and where it was written.

    Raises:
        TuneSpaceError: The search-space file is missing or malformed (before Ray starts).
        HyperparamsError: The base hyperparameter file is missing or malformed.
        RayMissingError: Ray is not installed.
    """
    from llm_cluster_gym.agents.config import HYPERPARAMS_PATH, load_task_config
    from llm_cluster_gym.agents.sweep import init_ray
    from llm_cluster_gym.agents.tune import TUNE_SPACE_PATH, load_search_space, tune_agent

    space = args.space or TUNE_SPACE_PATH
    settings = load_search_space(args.task, space)
    load_task_config(args.task, args.hyperparams or HYPERPARAMS_PATH)
    changes = {k: v for k, v in (("num_samples", args.num_samples), ("trial_steps", args.trial_steps))
               if v is not None}
    settings = dataclasses.replace(settings, **changes)
    init_ray(args.address, args.num_cpus, include_dashboard=False if args.no_dashboard else None,
             ship_code=args.ship_code)
    out = Path(args.out or f"checkpoints/{args.task}-tuned")
    outcome = tune_agent(args.task, out, settings, seed=args.seed, n_envs=args.n_envs,
                         max_concurrent=args.max_concurrent,
                         hyperparams=args.hyperparams or HYPERPARAMS_PATH, space_path=space)
    print(json.dumps({"best_validation_reward": outcome.best_reward, "best_params": outcome.best_params}))
    print(f"best checkpoint: {outcome.out} (resumable: {outcome.out}/last)")
    print(f"train it further: llm-cluster train --task {args.task} --hyperparams "
          f"{outcome.out}/hyperparams.yaml --out {outcome.out} --resume --steps <total>")
    return 0
