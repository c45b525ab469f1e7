"""PPO training throughput on the energy task: batched copies in one process vs one process per env.

Both runs train the shipped energy configuration (`agents/hyperparams.yaml`: PPO, 10 epochs of
minibatches of 256, a [64, 64] network, VecNormalize) through `agents.train.make_vec_env`, with
the same rollout of 1,024 steps: the configuration's 2 envs x 512 steps as two
`SubprocVecEnv` processes (how `llm-cluster train` ran before `--batched`), and 64 batched copies
x 16 steps in this process (`--batched`). Each learns `ROLLOUTS` rollouts after one warm-up
rollout; the figure is environment steps per wall-clock second, rollout collection and PPO
updates together, one torch thread (the training default), on the 2-core machine.

The batched run's rollout holds 64 short trajectory pieces where the other holds 2 long ones:
the same number of samples per update, not the same learning dynamics (advantages are estimated
over 16 steps before bootstrapping). This bench measures speed only.

Last line: ``{"ppo_steps_per_s_batched": ..., "ppo_steps_per_s_subproc": ...,
"batched_over_subproc": ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.vec_env import VecNormalize  # noqa: E402

from llm_cluster_gym.agents.config import load_task_config  # noqa: E402
from llm_cluster_gym.agents.train import make_vec_env  # noqa: E402

ROLLOUT_STEPS = 1024
ROLLOUTS = 6


def steps_per_s(batched: bool, n_envs: int) -> float:
    """Environment steps per second of PPO learning `ROLLOUTS` rollouts (after one warm-up)."""
    cfg = load_task_config("energy")
    params = dataclasses.replace(cfg.algo_params, n_steps=ROLLOUT_STEPS // n_envs)
    venv = VecNormalize(make_vec_env(cfg, n_envs, seed=0, batched=batched), gamma=params.gamma)
    model = PPO("MlpPolicy", venv, learning_rate=params.learning_rate, n_steps=params.n_steps,
                batch_size=params.batch_size, n_epochs=params.n_epochs, gamma=params.gamma,
                gae_lambda=params.gae_lambda, clip_range=params.clip_range,
                ent_coef=params.ent_coef, vf_coef=params.vf_coef,
                max_grad_norm=params.max_grad_norm,
                policy_kwargs={"net_arch": list(params.net_arch)}, seed=0, device="cpu", verbose=0)
    try:
        model.learn(ROLLOUT_STEPS)
        t0 = time.perf_counter()
        model.learn(ROLLOUTS * ROLLOUT_STEPS, reset_num_timesteps=False)
        return ROLLOUTS * ROLLOUT_STEPS / (time.perf_counter() - t0)
    finally:
        venv.close()


def main() -> None:
    torch.set_num_threads(1)
    batched = steps_per_s(True, 64)
    print(f"PPO on 64 batched copies (one process):  {batched:8.0f} env steps/s")
    subproc = steps_per_s(False, 2)
    print(f"PPO on 2 SubprocVecEnv processes:        {subproc:8.0f} env steps/s")
    print(json.dumps({"ppo_steps_per_s_batched": round(batched, 1),
                      "ppo_steps_per_s_subproc": round(subproc, 1),
                      "batched_over_subproc": round(batched / subproc, 2)}))


if __name__ == "__main__":
    main()
