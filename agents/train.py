"""Train PPO (energy) or MaskablePPO (tasks with VM placement) on the aggregate-serving envs.

One call, `train(...)`, does the whole run:

* vectorized training envs on the *train* trace window (SubprocVecEnv for n_envs > 1, DummyVecEnv
  for 1), wrapped in VecNormalize (observation and reward normalization);
* TensorBoard logs under `<out>/tb` (the scalars: `agents.train_logging`), a tqdm progress bar;
* every `eval_freq` steps, an evaluation of the current policy on the request-level variant of
  the task (the `eval_id`) on the *validation* trace window; the best one is kept as the shipped
  checkpoint in `<out>/` (model.zip, vecnormalize.pkl, metadata.json);
* every `checkpoint_freq` steps (and at the end), a resumable checkpoint in `<out>/last/` with
  the VecNormalize statistics beside the model;
* optionally (`finetune_steps`), a second stage on the request-level env (train window), with
  the same VecNormalize statistics carried over: the aggregate model underestimates the SLO cost
  of reconfiguration downtime, which the request-level model captures;
* `steps` is the total over both stages (`agents.config.training_plan` splits it); PPO collects
  whole rollouts (``n_steps x n_envs`` steps), so each stage runs its steps rounded up to whole
  rollouts, and the metadata records the steps asked and the steps run, per stage;
* at the end, the shipped policy against the static baseline on the held-out *test* window; the
  result goes into metadata.json.

Reproducibility: everything random is seeded from the one `seed` argument (torch, the policy's
action sampling, each env `seed + i`); with `n_envs=1` and one torch thread two runs give
identical parameters. A resumed run continues the step count and the optimizer state but not
the envs' internal state, so it is not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv, VecNormalize

import llm_cluster_gym  # noqa: F401  (registers the LLMCluster ids)
from llm_cluster_gym.agents.checkpoint import (
    MODEL_FILE,
    VECNORM_FILE,
    CheckpointError,
    env_signature,
    git_commit,
    load_metadata,
    package_versions,
    save_checkpoint,
    verify_files,
)
from llm_cluster_gym.agents.config import WINDOWS, TaskConfig, training_plan
from llm_cluster_gym.agents.evaluate import compare_with_static, make_env, run_episodes, summarize
from llm_cluster_gym.agents.policy import TrainedPolicy
from llm_cluster_gym.agents.train_logging import EpisodeScalars, log_evaluation
from llm_cluster_gym.envs.sim.scenario import load_scenario

VALIDATION_SEEDS = (1000, 1001, 1002, 1003, 1004)
"""Episode seeds of the periodic evaluation (validation window)."""

TEST_SEEDS = (2000, 2001, 2002)
"""Episode seeds of the final comparison with the static baseline (test window)."""


def _make_train_env(env_id: str, window: tuple[float, float],
                    reward_weights: dict[str, float] | None) -> gym.Env:
    """One monitored training env (module-level so SubprocVecEnv can pickle it)."""
    kwargs: dict[str, Any] = {"trace_window_s": window}
    if reward_weights:
        kwargs["reward_weights"] = reward_weights
    return Monitor(gym.make(env_id, disable_env_checker=True, **kwargs))


def make_vec_env(cfg: TaskConfig, n_envs: int, seed: int, env_id: str | None = None,
                 batched: bool = False) -> VecEnv:
    """Training envs on the train window: SubprocVecEnv for n_envs > 1, else DummyVecEnv.

    With `batched`, the id's batched copies in this process instead
    (`agents.batched_vec_env`: ``gymnasium.make_vec``'s vector entry point, the energy task's
    aggregate ids), with the same windows, reward weights and per-copy seeds.
    """
    if batched:
        from llm_cluster_gym.agents.batched_vec_env import make_batched_vec_env

        kwargs: dict[str, Any] = {"trace_window_s": WINDOWS["train"]}
        if cfg.reward_weights:
            kwargs["reward_weights"] = cfg.reward_weights
        return make_batched_vec_env(env_id or cfg.env_id, n_envs, seed, **kwargs)
    fn = functools.partial(_make_train_env, env_id or cfg.env_id, WINDOWS["train"], cfg.reward_weights)
    venv: VecEnv = SubprocVecEnv([fn] * n_envs) if n_envs > 1 else DummyVecEnv([fn])
    venv.seed(seed)
    return venv


class ProgressBar(BaseCallback):
    """A tqdm progress bar over environment steps (SB3's own bar needs `rich`, not installed)."""

    def __init__(self, total_steps: int, initial: int = 0) -> None:
        super().__init__()
        self.total_steps, self.initial = total_steps, initial
        self.bar: Any = None

    def _on_training_start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=self.initial, unit="step", dynamic_ncols=True)

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


class CheckpointAndEval(BaseCallback):
    """Periodic resumable checkpoints and validation evaluation keeping the best model.

    Args:
        out: Run directory (`<out>/last/` resumable, `<out>/` best on validation).
        cfg: The task configuration.
        metadata_fn: Builds the metadata dict for the current state of the run.
        best_reward: Best validation reward so far (from a resumed run), or -inf.
        eval_steps: Environment steps between evaluations (0: never).
        checkpoint_steps: Environment steps between resumable checkpoints.
    """

    def __init__(self, out: Path, cfg: TaskConfig, metadata_fn: Any, best_reward: float,
                 eval_steps: int, checkpoint_steps: int) -> None:
        super().__init__()
        self.out, self.cfg, self.metadata_fn = out, cfg, metadata_fn
        self.best_reward = best_reward
        self.eval_steps, self.checkpoint_steps = eval_steps, checkpoint_steps
        self.next_eval = self.next_ckpt = 0
        self.eval_env: gym.Env | None = None
        self.history: list[dict[str, float]] = []

    def _on_training_start(self) -> None:
        n = self.model.num_timesteps
        self.next_eval = n + self.eval_steps if self.eval_steps else np.inf
        self.next_ckpt = n + self.checkpoint_steps
        if self.eval_steps:
            self.eval_env = make_env(self.cfg.eval_id, "validation", self.cfg.reward_weights)

    def _on_step(self) -> bool:
        n = self.model.num_timesteps
        if n >= self.next_eval:
            self.next_eval += self.eval_steps
            self.evaluate()
        if n >= self.next_ckpt:
            self.next_ckpt += self.checkpoint_steps
            self.save_last()
        return True

    def _on_training_end(self) -> None:
        if self.eval_env is not None:
            self.evaluate()
            self.logger.dump(self.model.num_timesteps)  # after SB3's last dump of this stage
            self.eval_env.close()
        self.save_last()

    def save_last(self) -> None:
        """Resumable checkpoint of the current model."""
        save_checkpoint(self.out / "last", self.model, self.training_env, self.metadata_fn(self.model))

    def evaluate(self) -> None:
        """Validation episodes on the request-level env; the best model becomes `<out>/`."""
        if self.history and self.history[-1]["steps"] == self.model.num_timesteps:
            return
        policy = TrainedPolicy(self.model, self.training_env)
        s = summarize(run_episodes(policy, self.eval_env, VALIDATION_SEEDS[: self.cfg.eval_episodes]))
        reward = s["reward"]["mean"]
        row = {"steps": int(self.model.num_timesteps), "reward": reward,
               "energy_j": s["energy_j"]["mean"], "slo_attainment": s["slo_attainment"]["mean"]}
        self.history.append(row)
        for k in ("reward", "energy_j", "slo_attainment"):
            self.logger.record(f"validation/{k}", row[k])
        if reward > self.best_reward:
            self.best_reward = reward
            meta = self.metadata_fn(self.model)
            meta["validation"] = {"best": row, "seeds": list(VALIDATION_SEEDS[: self.cfg.eval_episodes])}
            save_checkpoint(self.out, self.model, self.training_env, meta)


@dataclass
class TrainResult:
    """What `train` produced."""

    out: Path
    model: Any
    num_timesteps: int
    wall_s: float
    metadata: dict[str, Any]


def _build_model(cfg: TaskConfig, venv: VecEnv, seed: int, tb_dir: str | None) -> Any:
    p = cfg.algo_params
    kwargs = dict(learning_rate=p.learning_rate, n_steps=p.n_steps, batch_size=p.batch_size,
                  n_epochs=p.n_epochs, gamma=p.gamma, gae_lambda=p.gae_lambda, clip_range=p.clip_range,
                  ent_coef=p.ent_coef, vf_coef=p.vf_coef, max_grad_norm=p.max_grad_norm,
                  policy_kwargs={"net_arch": list(p.net_arch)}, seed=seed, device="cpu",
                  tensorboard_log=tb_dir, verbose=0)
    if cfg.algo == "MaskablePPO":
        from sb3_contrib import MaskablePPO

        return MaskablePPO("MlpPolicy", venv, **kwargs)
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", venv, **kwargs)


def train(
    cfg: TaskConfig,
    out: str | Path,
    seed: int = 0,
    steps: int | None = None,
    n_envs: int | None = None,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    evaluate: bool = True,
    torch_threads: int = 1,
    finetune_steps: int | None = None,
    batched: bool = False,
) -> TrainResult:
    """Train one agent and write its checkpoints.

    Args:
        cfg: Task configuration (`agents.config.load_task_config`).
        out: Run directory; the shipped (best-on-validation) checkpoint is written there.
        seed: The one seed of the run.
        steps: Total environment steps over both stages (default ``cfg.steps +
            cfg.finetune_steps``); with `resume`, the total to reach.
        n_envs: Parallel envs (default `cfg.n_envs`).
        resume: Continue from `<out>/last/` (model, optimizer, VecNormalize statistics, step count),
            after checking its files against their SHA-256 as loading a checkpoint does.
        progress: Show a tqdm progress bar.
        tensorboard: Write TensorBoard logs under `<out>/tb`.
        evaluate: Run the periodic validation and the final test comparison (off in quick tests;
            then `<out>/` receives the last model).
        torch_threads: torch CPU threads (1 keeps runs reproducible and leaves a core to the envs).
        finetune_steps: Of `steps`, the steps of the fine-tuning stage on the request-level env
            (default: the configuration's share, `agents.config.training_plan`).
        batched: Run the first stage's envs as batched copies in this process
            (`make_vec_env`); the fine-tuning stage (request level) is never batched.

    Returns:
        The run's result; `model` is the model at the end of training (not necessarily the best).

    Raises:
        TrainingPlanError: Steps or envs not positive, fine-tuning steps outside [0, steps]
            (before any work).
        CheckpointError: With `resume`: `<out>/last/` is missing, corrupt, lacks its statistics
            or belongs to another task or algorithm (before any work).
    """
    out = Path(out)
    plan = training_plan(cfg, steps, finetune_steps, n_envs)
    stage1, finetune = plan.first_steps, plan.finetune_steps
    finetune_id = cfg.finetune_env_id or cfg.eval_id
    n_envs = plan.n_envs
    torch.set_num_threads(torch_threads)
    prev: dict[str, Any] | None = None
    # Where the first stage ended (in environment steps): None while it runs.
    stage1_end: int | None = 0 if stage1 == 0 else None
    if resume:
        last = out / "last"
        prev = load_metadata(last)
        if prev["task"] != cfg.task or prev["algo"] != cfg.algo:
            raise CheckpointError(
                f"{last}: cannot resume a {prev['algo']}/{prev['task']} run as {cfg.algo}/{cfg.task}")
        verify_files(last, prev)  # as loading does: nothing unverified is unpickled
        if VECNORM_FILE not in prev["files_sha256"]:
            raise CheckpointError(f"{last / VECNORM_FILE}: cannot resume without the training "
                                  "envs' statistics (not listed in 'files_sha256')")
        if finetune > 0 and int(prev["steps"]) >= stage1:
            stages = prev.get("stages") or []
            stage1_end = int(stages[0].get("steps_run", stage1)) if stages else stage1
    in_stage2 = stage1_end is not None and finetune > 0
    venv = make_vec_env(cfg, n_envs, seed, finetune_id if in_stage2 else None,
                        batched=batched and not in_stage2)
    prior_wall_s, best_reward = 0.0, -np.inf
    tb_dir = str(out / "tb") if tensorboard else None
    if prev is not None:
        last = out / "last"
        venv = VecNormalize.load(str(last / VECNORM_FILE), venv)
        venv.training = True
        algo_cls = _algo_class(cfg.algo)
        model = algo_cls.load(last / MODEL_FILE, env=venv, device="cpu", tensorboard_log=tb_dir)
        model.set_random_seed(seed + int(model.num_timesteps))
        prior_wall_s = float(prev["train_wall_s"])
        if (out / "metadata.json").exists():
            best = load_metadata(out).get("validation", {}).get("best", {})
            best_reward = float(best.get("reward", -np.inf))
    else:
        n = cfg.normalize
        venv = VecNormalize(venv, norm_obs=n.norm_obs, norm_reward=n.norm_reward, clip_obs=n.clip_obs,
                            gamma=n.gamma)
        model = _build_model(cfg, venv, seed, tb_dir)
    start_steps = int(model.num_timesteps)
    t0 = time.perf_counter()
    probe = make_env(cfg.env_id, "train")
    signature = env_signature(probe)
    probe.close()
    # The id's scenario file (the training window changes where the trace is read, not which).
    scenario = load_scenario(gym.spec(cfg.env_id).kwargs["scenario"])

    def metadata(m: Any) -> dict[str, Any]:
        ran = int(m.num_timesteps)
        ran1 = ran if stage1_end is None else stage1_end
        stages = [{"env_id": cfg.env_id, "window": "train", "steps_asked": stage1, "steps_run": ran1}]
        if finetune:
            stages.append({"env_id": finetune_id, "window": "train", "steps_asked": finetune,
                           "steps_run": ran - ran1})
        return {
            "task": cfg.task, "algo": cfg.algo, "env_id": cfg.env_id, "eval_id": cfg.eval_id,
            "scenario": signature["scenario"], "trace": scenario.workload.trace,
            "trace_windows_s": {k: list(v) for k, v in WINDOWS.items()},
            "episode_duration_s": scenario.duration_s,
            "seed": seed, "steps": ran, "steps_asked": plan.steps, "n_envs": int(venv.num_envs),
            "batched_envs": bool(batched),
            "rollout_steps": cfg.algo_params.n_steps * int(venv.num_envs), "stages": stages,
            "train_wall_s": prior_wall_s + time.perf_counter() - t0,
            "git_commit": git_commit(), "versions": package_versions(),
            "observation_names": signature["observation_names"], "action_nvec": signature["action_nvec"],
            "hyperparams": cfg.as_dict(), "reward_weights": _weights(cfg),
            "created_unix_s": time.time(),
        }

    cb = CheckpointAndEval(out, cfg, metadata, best_reward, cfg.eval_freq if evaluate else 0,
                           cfg.checkpoint_freq)
    callbacks: list[BaseCallback] = [cb, EpisodeScalars()]
    if stage1_end is None:  # what the progress bar expects: whole rollouts per stage
        total = (start_steps + plan.whole_rollouts(max(0, stage1 - start_steps))
                 + plan.whole_rollouts(finetune))
    else:
        total = start_steps + plan.whole_rollouts(max(0, stage1_end + finetune - start_steps))
    if progress:
        callbacks.append(ProgressBar(total, start_steps))
    remaining = 0 if stage1_end is not None else max(0, stage1 - start_steps)
    if remaining:
        model.learn(total_timesteps=remaining, callback=CallbackList(callbacks), tb_log_name=cfg.task,
                    reset_num_timesteps=not resume)
    if stage1_end is None:
        stage1_end = int(model.num_timesteps)
    remaining = max(0, stage1_end + finetune - int(model.num_timesteps)) if finetune else 0
    if remaining:
        if not in_stage2:  # switch to the request-level envs, keeping the statistics
            stats = venv
            venv = VecNormalize(make_vec_env(cfg, n_envs, seed + 10_000, finetune_id),
                                norm_obs=stats.norm_obs, norm_reward=stats.norm_reward,
                                clip_obs=stats.clip_obs, gamma=stats.gamma)
            venv.obs_rms, venv.ret_rms = stats.obs_rms, stats.ret_rms
            stats.close()
            model.set_env(venv)
        callbacks = [cb, EpisodeScalars()] + ([ProgressBar(total, int(model.num_timesteps))]
                                              if progress else [])
        model.learn(total_timesteps=remaining, callback=CallbackList(callbacks),
                    tb_log_name=f"{cfg.task}_finetune", reset_num_timesteps=False)
    wall_s = prior_wall_s + time.perf_counter() - t0
    if not evaluate:
        meta = metadata(model)
        save_checkpoint(out, model, venv, meta)
    else:
        meta = finalize(out, cfg)
        if tensorboard:
            log_evaluation(model, meta["evaluation"])
    venv.close()
    return TrainResult(out=out, model=model, num_timesteps=int(model.num_timesteps), wall_s=wall_s,
                       metadata=meta)


def _algo_class(algo: str) -> Any:
    if algo == "MaskablePPO":
        from sb3_contrib import MaskablePPO

        return MaskablePPO
    from stable_baselines3 import PPO

    return PPO


def _weights(cfg: TaskConfig) -> dict[str, float]:
    from llm_cluster_gym.envs.reward import TASK_WEIGHTS

    w = TASK_WEIGHTS[cfg.task].as_dict()
    w.update(cfg.reward_weights or {})
    return w


def finalize(out: Path, cfg: TaskConfig, seeds: tuple[int, ...] = TEST_SEEDS) -> dict[str, Any]:
    """Compare the shipped policy with the static baseline on the test window; store it in metadata."""
    import json

    from llm_cluster_gym.agents.checkpoint import METADATA_FILE, sha256_file
    from llm_cluster_gym.envs.outputs import write_file_atomic

    policy = TrainedPolicy.from_checkpoint(out)
    result = compare_with_static(policy, lambda: make_env(cfg.eval_id, "test", cfg.reward_weights), seeds)
    meta = dict(policy.metadata)
    meta["evaluation"] = {"window": "test", "env_id": cfg.eval_id, **result}
    last = out / "last" / METADATA_FILE
    if last.exists():  # the whole run, beside the shipped (best-on-validation) snapshot's own figures
        run = json.loads(last.read_text())
        meta["run"] = {"steps": run["steps"], "train_wall_s": run["train_wall_s"],
                       "stages": run.get("stages")}
    # Re-check the files are the ones the metadata describes before rewriting it.
    for name, digest in meta["files_sha256"].items():
        assert sha256_file(out / name) == digest, f"{out / name} changed during finalize"
    write_file_atomic(out / METADATA_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return meta
