"""Train an agent for one task and write its checkpoint directory.

Usage::

    python -m scripts.train --task energy --steps 200000 --seed 0 --out checkpoints/energy
    python -m scripts.train --task energy --steps 400000 --out checkpoints/energy --resume

Hyperparameters come from agents/hyperparams.yaml (`--hyperparams` for another file). The run
directory gets the shipped checkpoint (best on the validation window: model.zip,
vecnormalize.pkl, metadata.json), `last/` (resumable) and `tb/` (TensorBoard logs:
`tensorboard --logdir <out>/tb`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_cluster_gym.scripts.simulate import dataclass_parser  # noqa: E402

TASK_NAMES = ("energy", "thermal", "combined")


@dataclass
class TrainArgs:
    """Arguments of `python -m scripts.train`."""

    task: str = "energy"
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


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one option per `TrainArgs` field, help from its docstring."""
    return dataclass_parser(
        TrainArgs, "python -m scripts.train", "Train a PPO/MaskablePPO agent on a cluster task.",
        {"task": str, "steps": int, "seed": int, "out": str, "n_envs": int, "hyperparams": str},
        {"task": TASK_NAMES})


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, train, and print where the checkpoint went and how it did."""
    from llm_cluster_gym.agents.config import HYPERPARAMS_PATH, HyperparamsError, load_task_config
    from llm_cluster_gym.agents.train import train

    parser = build_parser()
    args = TrainArgs(**vars(parser.parse_args(argv)))
    try:
        cfg = load_task_config(args.task, args.hyperparams or HYPERPARAMS_PATH)
    except HyperparamsError as exc:
        parser.error(str(exc))
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


if __name__ == "__main__":
    sys.exit(main())
