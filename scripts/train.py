"""`llm-cluster train`: train an agent for one task and write its checkpoint directory.

Usage::

    llm-cluster train --task energy --steps 200000 --seed 0 --out checkpoints/energy
    llm-cluster train --task energy --steps 400000 --out checkpoints/energy --resume
    llm-cluster train --task energy --steps 100000 --finetune-steps 20000 --out runs/e

`--steps` is the total over both stages: the first on the aggregate env, then
`--finetune-steps` of them on the request-level env (default: the hyperparameter file's share).
PPO collects whole rollouts (n_steps x n_envs steps), so each stage runs its steps rounded up
to whole rollouts; the plan is printed before training and metadata.json records the steps
asked and the steps run, per stage.

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

from llm_cluster_gym.scripts.usage import UsageError, check_seed


@dataclass
class TrainArgs:
    """Train a PPO/MaskablePPO agent on a cluster task and write its checkpoint."""

    task: Literal["energy", "thermal", "combined"] = "energy"
    """Task: energy (PPO), thermal or combined (MaskablePPO, VM placement is masked)."""
    steps: int | None = None
    """Total environment steps over both stages (default: the hyperparameter file's steps +
    finetune_steps). Each stage runs its steps rounded up to whole PPO rollouts."""
    finetune_steps: int | None = None
    """Of --steps, the steps of the fine-tuning stage on the request-level env (0: none).
    Default: the file's finetune_steps without --steps, else the file's share of --steps in
    whole rollouts."""
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
    batched: bool = False
    """Step the first stage's --n-envs copies as arrays in this process (gymnasium.make_vec's
    batched env; the energy task) instead of one process per env."""

    def __post_init__(self) -> None:
        check_seed("--seed", self.seed)
        for name in ("steps", "n_envs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.batched and self.task != "energy":
            raise UsageError(f"--batched runs the energy task only (its batched simulator), got "
                             f"--task {self.task}")
        if self.finetune_steps is not None:
            if self.finetune_steps < 0:
                raise UsageError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
            if self.steps is not None and self.finetune_steps > self.steps:
                raise UsageError(f"--finetune-steps ({self.finetune_steps}) must be at most "
                                 f"--steps ({self.steps}): --steps is the total of both stages")


def run(args: TrainArgs, command: str = "llm-cluster train") -> int:
    """Train, and print where the checkpoint went and how it did.

    Raises:
        HyperparamsError: The hyperparameter file is missing or malformed (before training).
        TrainingPlanError: The steps asked cannot be split into the file's stages (before training).
    """
    from llm_cluster_gym.agents.config import HYPERPARAMS_PATH, load_task_config, training_plan

    cfg = load_task_config(args.task, args.hyperparams or HYPERPARAMS_PATH)
    plan = training_plan(cfg, args.steps, args.finetune_steps, args.n_envs)
    out = Path(args.out or f"checkpoints/{args.task}")
    print(f"{cfg.task}: {plan.describe()}", flush=True)
    from llm_cluster_gym.agents.train import train

    result = train(cfg, out, seed=args.seed, steps=plan.steps, finetune_steps=plan.finetune_steps,
                   n_envs=plan.n_envs, resume=args.resume, progress=not args.no_progress,
                   tensorboard=not args.no_tensorboard, evaluate=not args.no_eval,
                   batched=args.batched)
    print(f"trained {cfg.algo} on {cfg.env_id}: {result.num_timesteps} steps in {result.wall_s:.0f} s")
    print(f"checkpoint: {out}")
    ev = result.metadata.get("evaluation")
    if ev:
        print(json.dumps({k: ev[k] for k in ("energy_ratio_vs_static", "reward_gain_vs_static",
                                              "beats_static_reward")}, indent=None))
    return 0
