"""Hyperparameter search for the agents with Ray Tune (ASHA early stopping).

The search space lives in a readable YAML file (`agents/tune_space.yaml`: per task, the PPO
fields to draw and how, the step budgets and the ASHA settings). Each trial is the ordinary
training of `agents.train.train` on the aggregate env and the *train* trace window, run in
chunks of `report_steps`: after each chunk the policy is evaluated on the *validation* window
(mean episode reward over `eval_seeds`) and the result is reported to Tune with the run folder as
a checkpoint. ASHA stops the trials in the bottom of each rung, so the budget goes to promising
configurations. Trials skip the request-level fine-tuning stage (its cost is the same for all
configurations); train the winner fully with `scripts.train` afterwards.

What is written where `scripts.train` expects it (`tune` -> `out`, default checkpoints/<task>-tuned):

* ``<out>/model.zip``, ``vecnormalize.pkl``, ``metadata.json`` - the best checkpoint (best
  validation report over all trials), its metadata extended with a ``tune`` block;
* ``<out>/last/`` - the same run, resumable (`scripts.train --resume`);
* ``<out>/hyperparams.yaml`` - the hyperparameter file with this task's ``algo_params`` replaced
  by the best configuration (`scripts.train --hyperparams <out>/hyperparams.yaml`);
* ``<out>/tune_trials.csv`` - every trial's configuration, last and best reward, iterations;
* ``<out>/tune/`` - Ray Tune's own experiment folder (results, checkpoints; resumable by Tune).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llm_cluster_gym.agents.config import HYPERPARAMS_PATH, AlgoParams, TaskConfig

TUNE_SPACE_PATH = Path(__file__).resolve().parent / "tune_space.yaml"
"""The shipped search-space file."""

METRIC = "reward"
"""The metric Tune maximizes: mean validation-window episode reward."""

DISTRIBUTIONS = ("loguniform", "uniform", "choice")
_SETTINGS_KEYS = ("trial_steps", "report_steps", "grace_steps", "reduction_factor", "num_samples",
                  "eval_seeds", "eval_env", "space")


class TuneSpaceError(ValueError):
    """The search-space file is malformed; the message names the file, field and value."""


@dataclass(frozen=True)
class TuneSettings:
    """One task's search: budgets, ASHA settings and the space (see `agents/tune_space.yaml`)."""

    task: str
    trial_steps: int
    report_steps: int
    grace_steps: int
    reduction_factor: int
    num_samples: int
    eval_seeds: tuple[int, ...]
    eval_env: str
    space: dict[str, tuple[str, tuple[Any, ...]]]

    @property
    def max_iterations(self) -> int:
        """Reports of a trial that runs its whole budget (ASHA's max_t)."""
        return math.ceil(self.trial_steps / self.report_steps)

    @property
    def grace_iterations(self) -> int:
        """Reports every trial gets before it can be stopped (ASHA's grace_period)."""
        return max(1, math.ceil(self.grace_steps / self.report_steps))


def load_search_space(task: str, path: str | Path = TUNE_SPACE_PATH) -> TuneSettings:
    """Read and check one task's search settings.

    Raises:
        TuneSpaceError: Unreadable file, unknown task, unknown key or field, bad distribution.
    """
    where = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise TuneSpaceError(f"{where}: cannot read search-space file ({exc})") from exc
    except yaml.YAMLError as exc:
        raise TuneSpaceError(f"{where}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or task not in data or not isinstance(data[task], dict):
        known = sorted(data) if isinstance(data, dict) else []
        raise TuneSpaceError(f"{where}: no entry for task {task!r}; tasks in the file: {known}")
    entry = data[task]
    for key in entry:
        if key not in _SETTINGS_KEYS:
            raise TuneSpaceError(f"{where}: unknown key '{task}.{key}'; known: {list(_SETTINGS_KEYS)}")
    ints = {}
    for key in ("trial_steps", "report_steps", "grace_steps", "reduction_factor", "num_samples"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TuneSpaceError(f"{where}: field '{task}.{key}' must be a positive integer, got {value!r}")
        ints[key] = value
    if ints["reduction_factor"] < 2:
        raise TuneSpaceError(f"{where}: field '{task}.reduction_factor' must be >= 2, got "
                             f"{ints['reduction_factor']}")
    seeds = entry.get("eval_seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise TuneSpaceError(f"{where}: field '{task}.eval_seeds' must be a list of ints, got {seeds!r}")
    eval_env = entry.get("eval_env", "env_id")
    if eval_env not in ("env_id", "eval_id"):
        raise TuneSpaceError(f"{where}: field '{task}.eval_env' is {eval_env!r}, not 'env_id' or 'eval_id'")
    raw = entry.get("space")
    if not isinstance(raw, dict) or not raw:
        raise TuneSpaceError(f"{where}: field '{task}.space' must be a non-empty mapping, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(AlgoParams)}
    space: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for name, dist in raw.items():
        sub = f"{task}.space.{name}"
        if name not in fields:
            raise TuneSpaceError(f"{where}: field '{sub}' is not a PPO parameter; known: {sorted(fields)}")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise TuneSpaceError(
                f"{where}: field '{sub}' must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
        kind, values = next(iter(dist.items()))
        if not isinstance(values, list) or not values:
            raise TuneSpaceError(f"{where}: field '{sub}.{kind}' must be a non-empty list, got {values!r}")
        if kind != "choice":
            ok = len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                          for v in values) and values[0] < values[1]
            if not ok or (kind == "loguniform" and values[0] <= 0):
                raise TuneSpaceError(f"{where}: field '{sub}.{kind}' must be [low, high] with "
                                     f"0 {'<' if kind == 'loguniform' else '<='} low < high, got {values!r}")
        space[name] = (kind, tuple(tuple(v) if isinstance(v, list) else v for v in values))
    return TuneSettings(task=task, eval_seeds=tuple(seeds), eval_env=eval_env, space=space, **ints)


def to_param_space(settings: TuneSettings) -> dict[str, Any]:
    """The search space as Ray Tune sampling objects."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, (kind, values) in settings.space.items():
        if kind == "loguniform":
            out[name] = tune.loguniform(*values)
        elif kind == "uniform":
            out[name] = tune.uniform(*values)
        else:
            out[name] = tune.choice([list(v) if isinstance(v, tuple) else v for v in values])
    return out


def trial_config(cfg: TaskConfig, params: dict[str, Any], n_envs: int) -> TaskConfig:
    """The task configuration of one trial: drawn PPO fields, no fine-tuning stage.

    ``batch_size`` is capped at ``n_steps x n_envs`` (PPO cannot draw a larger minibatch from
    one rollout); the cap is visible in the returned configuration.
    """
    p = dict(params)
    if "net_arch" in p:
        p["net_arch"] = tuple(int(v) for v in p["net_arch"])
    algo = dataclasses.replace(cfg.algo_params, **p)
    if algo.batch_size > algo.n_steps * n_envs:
        algo = dataclasses.replace(algo, batch_size=algo.n_steps * n_envs)
    return dataclasses.replace(cfg, algo_params=algo, n_envs=n_envs, finetune_steps=0)


def _trainable(params: dict[str, Any], cfg: TaskConfig, settings: TuneSettings, seed: int,
               n_envs: int) -> None:
    """One Tune trial: train in chunks, report the validation reward with the run as checkpoint."""
    from ray import tune

    from llm_cluster_gym.agents.checkpoint import load_metadata
    from llm_cluster_gym.agents.evaluate import make_env, run_episodes, summarize
    from llm_cluster_gym.agents.policy import TrainedPolicy
    from llm_cluster_gym.agents.train import train

    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    tcfg = trial_config(cfg, params, n_envs)
    steps = 0
    restored = tune.get_checkpoint()
    if restored is not None:  # Tune restarts a failed trial from its last report
        restored.to_directory(str(run_dir))
        steps = int(load_metadata(run_dir / "last")["steps"])
    env = make_env(getattr(cfg, settings.eval_env), "validation", cfg.reward_weights)
    try:
        while steps < settings.trial_steps:
            target = min(steps + settings.report_steps, settings.trial_steps)
            res = train(tcfg, run_dir, seed=seed, steps=target, n_envs=n_envs, resume=steps > 0,
                        progress=False, tensorboard=False, evaluate=False)
            steps = max(target, res.num_timesteps)
            policy = TrainedPolicy.from_checkpoint(run_dir)
            s = summarize(run_episodes(policy, env, settings.eval_seeds))
            tune.report({METRIC: s["reward"]["mean"], "energy_j": s["energy_j"]["mean"],
                         "slo_attainment": s["slo_attainment"]["mean"], "steps": steps,
                         "batch_size": tcfg.algo_params.batch_size},
                        checkpoint=tune.Checkpoint.from_directory(str(run_dir)))
    finally:
        env.close()


@dataclass
class TuneOutcome:
    """What `tune_agent` found and wrote."""

    out: Path
    best_params: dict[str, Any]
    best_reward: float
    trials: list[dict[str, Any]]


def tune_agent(task: str, out: str | Path, settings: TuneSettings | None = None, seed: int = 0,
               n_envs: int = 1, cpus_per_trial: float = 1.0, max_concurrent: int | None = None,
               hyperparams: str | Path = HYPERPARAMS_PATH, space_path: str | Path = TUNE_SPACE_PATH,
               verbose: int = 1) -> TuneOutcome:
    """Search `task`'s PPO hyperparameters with Ray Tune + ASHA and write the winner to `out`.

    Ray must be initialized (`agents.sweep.init_ray`); otherwise a local Ray is started.

    Args:
        task: "energy", "thermal" or "combined".
        out: Where the best checkpoint, `last/` and `hyperparams.yaml` go (see module docstring).
        settings: Search settings (default: `load_search_space(task, space_path)`).
        seed: Seed of every trial's training and of the random search.
        n_envs: Training envs per trial (1: DummyVecEnv, no extra processes).
        cpus_per_trial: CPUs Ray reserves per trial.
        max_concurrent: Trials at once (default: as many as fit the CPUs).
        hyperparams: Base hyperparameter file (fields not searched come from it).
        space_path: Search-space file (used when `settings` is None; recorded in metadata).
        verbose: Ray Tune's console verbosity (0 silent, 1 status table).

    Raises:
        RuntimeError: No trial reported a result (every trial failed).
    """
    from llm_cluster_gym.agents.config import load_task_config
    from llm_cluster_gym.agents.sweep import init_ray

    init_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    cfg = load_task_config(task, hyperparams)
    settings = settings or load_search_space(task, space_path)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, cfg=cfg, settings=settings, seed=seed, n_envs=n_envs),
        {"cpu": cpus_per_trial})
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=settings.max_iterations,
                              grace_period=min(settings.grace_iterations, settings.max_iterations),
                              reduction_factor=settings.reduction_factor)
    tuner = tune.Tuner(
        trainable, param_space=to_param_space(settings),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                    num_samples=settings.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=seed),
                                    max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=task, storage_path=str(out / "tune"), verbose=verbose,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order="max")))
    grid = tuner.fit()
    trials = []
    for r in grid:
        if r.metrics_dataframe is None or METRIC not in (r.metrics or {}):
            trials.append({**_plain(r.config), "error": str(r.error) if r.error else "no report"})
            continue
        df = r.metrics_dataframe
        trials.append({**_plain(r.config), "last_reward": float(df[METRIC].iloc[-1]),
                       "best_reward": float(df[METRIC].max()), "iterations": len(df),
                       "steps": int(df["steps"].iloc[-1]), "error": ""})
    scored = [t for t in trials if "best_reward" in t]
    if not scored:
        raise RuntimeError(f"tune {task}: no trial reported a result; errors: "
                           f"{[t['error'] for t in trials]}")
    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    ckpt = best.get_best_checkpoint(METRIC, "max") or best.checkpoint
    best_reward = float(best.metrics_dataframe[METRIC].max())
    params = _plain(best.config)
    _write_outputs(out, ckpt, cfg, params, best_reward, trials, settings, seed, n_envs, hyperparams,
                   space_path)
    return TuneOutcome(out=out, best_params=params, best_reward=best_reward, trials=trials)


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple | list) else v) for k, v in config.items()}


def _write_outputs(out: Path, ckpt: Any, cfg: TaskConfig, params: dict[str, Any], best_reward: float,
                   trials: list[dict[str, Any]], settings: TuneSettings, seed: int, n_envs: int,
                   hyperparams: str | Path, space_path: str | Path) -> None:
    """Best checkpoint (+ last/), tuned hyperparameter file and trial table into `out`.

    Everything is prepared first (files copied under temporary names beside their targets, the
    texts in memory); then the old ``metadata.json`` is removed, the files are renamed into
    place, and the new metadata is written last, so a crash never leaves a checkpoint that looks
    complete but mixes two runs (`agents.checkpoint.save_checkpoint` does the same).
    """
    from llm_cluster_gym.agents.checkpoint import METADATA_FILE, MODEL_FILE, VECNORM_FILE
    from llm_cluster_gym.envs.outputs import swap_folder, write_file_atomic

    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged: dict[Path, Path] = {}  # staging path -> final path
    last_stage = out / f".last.incomplete-{tag}"
    try:
        with tempfile.TemporaryDirectory(prefix="tune-best-") as tmp:
            src = Path(ckpt.to_directory(tmp))
            for name in (MODEL_FILE, VECNORM_FILE):
                staged[out / f".incomplete-{tag}-{name}"] = out / name
                shutil.copy2(src / name, out / f".incomplete-{tag}-{name}")
            shutil.copytree(src / "last", last_stage)
            meta = json.loads((src / METADATA_FILE).read_text())
        tcfg = trial_config(cfg, params, n_envs)
        seeds = list(settings.eval_seeds)
        meta["tune"] = {"best_params": params, "best_validation_reward": best_reward,
                        "metric": f"mean episode reward, validation window, seeds {seeds}",
                        "space_file": str(space_path), "settings": dataclasses.asdict(settings),
                        "n_trials": len(trials), "seed": seed}
        meta["hyperparams"] = tcfg.as_dict()
        data = yaml.safe_load(Path(hyperparams).read_text())
        entry = data[cfg.task]
        algo = dict(entry.get("algo_params") or {})
        algo.update(dataclasses.asdict(tcfg.algo_params))
        algo["net_arch"] = list(tcfg.algo_params.net_arch)
        entry["algo_params"] = algo
        header = (f"# Written by agents.tune: task {cfg.task!r} algo_params = the best of {len(trials)} Ray "
                  f"Tune trials\n# (ASHA; space {space_path}; validation reward {best_reward:.4g}); other "
                  f"entries copied from\n# {hyperparams}.\n")
        tuned_text = header + yaml.safe_dump(data, sort_keys=False)
        keys = sorted({k for t in trials for k in t})
        table = io.StringIO(newline="")
        w = csv.DictWriter(table, fieldnames=keys)
        w.writeheader()
        for t in trials:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in t.items()})
        meta_text = json.dumps(meta, indent=1, sort_keys=True, default=str)
        # Commit: from the removal of the old metadata until the new one, `out` holds no checkpoint.
        (out / METADATA_FILE).unlink(missing_ok=True)
        for path, final in staged.items():
            os.replace(path, final)
        swap_folder(last_stage, out / "last")
        write_file_atomic(out / "hyperparams.yaml", tuned_text.encode())
        write_file_atomic(out / "tune_trials.csv", table.getvalue().encode())
        write_file_atomic(out / METADATA_FILE, meta_text.encode())
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
        shutil.rmtree(last_stage, ignore_errors=True)
