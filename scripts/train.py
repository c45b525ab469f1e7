"""`llm-cluster train`: train an agent for one task and write its checkpoint directory.

Usage::

    llm-cluster train --task energy --steps 200000 --seed 0 --out checkpoints/energy
    llm-cluster train --task energy --steps 400000 --out checkpoints/energy --resume

Hyperparameters come from agents/hyperparams.yaml (`--hyperparams` for another file). The run
directory gets the shipped checkpoint (best on the validation window: model.zip,
vecnormalize.pkl, metadata.json), `last/` (resumable) and `tb/` (TensorBoard logs:
`tensorboard --logdir <out>/tb`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_cluster_gym.scripts.usage import UsageError


@dataclass
class TrainArgs:
    """Train a PPO/MaskablePPO agent on a cluster task and write its checkpoint."""

    task: Literal["energy", "thermal", "combined"] = "energy"
    """Task: energy (PPO), thermal or combined (MaskablePPO, VM placement is masked)."""
    steps: int | None = None
    """Total environment steps (default: the task's `steps` in the hyperparameter file)."""
    seed: int = 0
    """The run's one seed (torch, action sampling, env i gets seed + i)."""
    out: str | None = None
    """Run/checkpoint directory (default: checkpoints/<task>)."""
    n_envs: int | None = None
    """Parallel training envs; 1 uses DummyVecEnv (default: from the hyperparameter file)."""
    hyperparams: str | None = None
    """Hyperparameter YAML file (default: agents/hyperparams.yaml)."""
    resume: bool = False
    """Continue from <out>/last/ up to --steps in total."""
    no_eval: bool = False
    """Skip the periodic validation and the final comparison with the static baseline."""
    no_progress: bool = False
    """Hide the progress bar."""
    no_tensorboard: bool = False
    """Do not write TensorBoard logs."""

    def __post_init__(self) -> None:
        for name in ("steps", "n_envs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def run(args: TrainArgs, command: str = "llm-cluster train") -> int:
    """Train, and print where the checkpoint went and how it did.

    Raises:
        HyperparamsError: The hyperparameter file is missing or malformed (before training).
    """
    from llm_cluster_gym.agents.config import HYPERPARAMS_PATH, load_task_config
    from llm_cluster_gym.agents.train import train

    cfg = load_task_config(args.task, args.hyperparams or HYPERPARAMS_PATH)
    out = Path(args.out or f"checkpoints/{args.task}")
    result = train(cfg, out, seed=args.seed, steps=args.steps, n_envs=args.n_envs, resume=args.resume,
                   progress=not args.no_progress, tensorboard=not args.no_tensorboard,
                   evaluate=not args.no_eval)
    print(f"trained {cfg.algo} on {cfg.env_id}: {result.num_timesteps} steps in {result.wall_s:.0f} s")
    print(f"checkpoint: {out}")
    ev = result.metadata.get("evaluation")
    if ev:
        print(json.dumps({k: ev[k] for k in ("energy_ratio_vs_static", "reward_gain_vs_static",
                                              "beats_static_reward")}, indent=None))
    return 0
