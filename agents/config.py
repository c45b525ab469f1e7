"""Training configuration: per-task hyperparameters (agents/hyperparams.yaml) and trace windows.

The hyperparameter file is the one readable place that says how each shipped agent was trained.
Loading is strict, like scenario files: an unknown task, an unknown key or a value of the wrong
type raises `HyperparamsError` naming the file, the field and the value.

Trace windows keep training and held-out evaluation apart. Each episode draws its arrivals from
a stretch of the scenario's source trace (`ClusterEnv(trace_window_s=(start_s, window_s))`):

| window | Azure 2023 conv/code trace stretch | used for |
|---|---|---|
| train | [0 s, 2250 s) (first 37.5 min) | PPO rollouts |
| validation | [2250 s, 2850 s) (10 min) | periodic evaluation that picks the best model |
| test | [2850 s, end) (about 10.9 min conv, 9.8 min code) | held-out evaluation and reports |

The windows never overlap. The split (most for training, one episode's length for validation,
the rest held out) is a modelling choice, not a measured figure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HYPERPARAMS_PATH = Path(__file__).resolve().parent / "hyperparams.yaml"

TRAIN_WINDOW_S = (0.0, 2250.0)
"""(start_s, window_s) of the source trace used for training rollouts."""

VALIDATION_WINDOW_S = (2250.0, 600.0)
"""(start_s, window_s) used by the periodic evaluation that keeps the best model."""

TEST_WINDOW_S = (2850.0, 1e9)
"""(start_s, window_s) held out for evaluation; the window is clipped at the trace's end."""

WINDOWS = {"train": TRAIN_WINDOW_S, "validation": VALIDATION_WINDOW_S, "test": TEST_WINDOW_S}


class HyperparamsError(ValueError):
    """The hyperparameter file is malformed; the message names the file, field and value."""


class TrainingPlanError(ValueError):
    """Training options that cannot run (the message names the option and the value)."""


def windows_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two (start_s, window_s) trace windows share any time."""
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@dataclass(frozen=True)
class AlgoParams:
    """PPO / MaskablePPO constructor arguments (stable-baselines3 names and meanings)."""

    learning_rate: float = 3e-4
    n_steps: int = 512
    batch_size: int = 256
    n_epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    net_arch: tuple[int, ...] = (64, 64)


@dataclass(frozen=True)
class NormParams:
    """VecNormalize settings (observation and reward normalization of the training envs)."""

    norm_obs: bool = True
    norm_reward: bool = True
    clip_obs: float = 10.0
    gamma: float = 0.99


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines one training run except the seed and the step budget.

    Attributes:
        task: "energy" | "thermal" | "combined".
        algo: "PPO" (stable-baselines3) or "MaskablePPO" (sb3-contrib; needed with placement).
        env_id: Registered training id (aggregate serving model).
        eval_id: Registered evaluation id of the same task (request-level serving model).
        steps: Environment steps of the first stage (aggregate env) of the default run.
        n_envs: Parallel training environments (SubprocVecEnv when > 1).
        eval_freq: Evaluate on the validation window every this many environment steps.
        eval_episodes: Episodes (seeds) per periodic evaluation.
        checkpoint_freq: Save a resumable checkpoint every this many environment steps.
        reward_weights: Overrides of the task's default reward weights (None: the defaults).
        finetune_steps: Steps of a second stage on the request-level env (`finetune_env_id`,
            train window) after `steps` on the aggregate env: the fluid model underestimates the
            SLO cost of reconfiguration downtime, so a short stage on the request-level model
            corrects the policy (sim-to-sim gap). 0: no second stage. A run asked for another
            total keeps this share of it (`training_plan`).
        finetune_env_id: Env id of the second stage (default: `eval_id`).
        algo_params: PPO hyperparameters.
        normalize: VecNormalize settings.
    """

    task: str
    algo: str
    env_id: str
    eval_id: str
    steps: int = 200_000
    n_envs: int = 2
    eval_freq: int = 20_000
    eval_episodes: int = 3
    checkpoint_freq: int = 20_000
    reward_weights: dict[str, float] | None = None
    finetune_steps: int = 0
    finetune_env_id: str | None = None
    algo_params: AlgoParams = field(default_factory=AlgoParams)
    normalize: NormParams = field(default_factory=NormParams)

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form (for metadata.json)."""
        out = dataclasses.asdict(self)
        out["algo_params"]["net_arch"] = list(self.algo_params.net_arch)
        return out


@dataclass(frozen=True)
class TrainingPlan:
    """The environment steps a training run asks for, per stage.

    Attributes:
        steps: Total steps asked, over both stages.
        finetune_steps: Of them, the steps of the second stage (request-level env); 0: none.
        n_envs: Parallel training envs.
        rollout_steps: Steps of one PPO rollout (``n_steps x n_envs``). PPO collects whole
            rollouts, so each stage runs its steps rounded up to whole rollouts.
    """

    steps: int
    finetune_steps: int
    n_envs: int
    rollout_steps: int

    @property
    def first_steps(self) -> int:
        """Steps asked of the first stage (aggregate env)."""
        return self.steps - self.finetune_steps

    def whole_rollouts(self, steps: int) -> int:
        """`steps` rounded up to whole rollouts (what PPO runs for them)."""
        return -(-steps // self.rollout_steps) * self.rollout_steps

    @property
    def expected_steps(self) -> int:
        """Steps a fresh run will take: each stage rounded up to whole rollouts."""
        return self.whole_rollouts(self.first_steps) + self.whole_rollouts(self.finetune_steps)

    def describe(self) -> str:
        """One line: the steps asked per stage and what will run."""
        return (f"{self.steps:,} steps asked: {self.first_steps:,} on the aggregate env, "
                f"{self.finetune_steps:,} fine-tuning on the request-level env; "
                f"{self.expected_steps:,} will run (whole rollouts of {self.rollout_steps:,} = "
                f"n_steps x {self.n_envs} envs)")


def training_plan(cfg: TaskConfig, steps: int | None = None, finetune_steps: int | None = None,
                  n_envs: int | None = None) -> TrainingPlan:
    """The steps of each stage of a run of `steps` in total.

    Args:
        cfg: The task configuration (its `steps` and `finetune_steps` are the two stages of the
            default run).
        steps: Total steps over both stages (default: ``cfg.steps + cfg.finetune_steps``).
        finetune_steps: Of them, the steps of the fine-tuning stage (request-level env). Default:
            ``cfg.finetune_steps`` when `steps` is not given; otherwise the configuration's share
            of `steps` (``finetune_steps / (steps + finetune_steps)``), rounded down to whole
            rollouts, so that the stage split adds no rounding (a run shorter than two rollouts
            may have no fine-tuning stage).
        n_envs: Parallel envs (default ``cfg.n_envs``).

    Raises:
        TrainingPlanError: `steps` or `n_envs` not a positive integer, `finetune_steps` not an
            integer in ``[0, steps]``.
    """

    def integer(value: Any, option: str, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            want = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise TrainingPlanError(f"{option} must be {want}, got {value!r}")
        return int(value)

    n = integer(cfg.n_envs if n_envs is None else n_envs, "n_envs (--n-envs)", 1)
    rollout = cfg.algo_params.n_steps * n
    if steps is None:
        total = cfg.steps + cfg.finetune_steps
        tune = cfg.finetune_steps if finetune_steps is None else finetune_steps
    else:
        total = integer(steps, "steps (--steps)", 1)
        if finetune_steps is None:
            share = cfg.finetune_steps / (cfg.steps + cfg.finetune_steps)
            tune = int(total * share // rollout) * rollout
        else:
            tune = finetune_steps
    tune = integer(tune, "finetune_steps (--finetune-steps)", 0)
    if tune > total:
        raise TrainingPlanError(f"finetune_steps (--finetune-steps) must be at most the total steps "
                                f"(--steps, {total:,}), got {tune:,}")
    return TrainingPlan(steps=total, finetune_steps=tune, n_envs=n, rollout_steps=rollout)


ALGOS = ("PPO", "MaskablePPO")


def _typed(cls: type, data: Any, where: str, path: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong scalar types."""
    if not isinstance(data, dict):
        raise HyperparamsError(f"{where}: field '{path}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise HyperparamsError(
                f"{where}: unknown key '{path}.{key}' (value {value!r}); known: {sorted(fields)}")
        default = getattr(cls, key, None) if key not in ("algo_params", "normalize") else None
        if key == "finetune_env_id" and value is None:
            kwargs[key] = None
            continue
        sub = f"{path}.{key}"
        if key == "algo_params":
            value = _typed(AlgoParams, value, where, sub)
        elif key == "normalize":
            value = _typed(NormParams, value, where, sub)
        elif key == "net_arch":
            if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value):
                raise HyperparamsError(
                    f"{where}: field '{sub}' must be a list of positive ints, got {value!r}")
            value = tuple(value)
        elif key == "reward_weights":
            if value is not None and (not isinstance(value, dict) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in value.values())):
                raise HyperparamsError(
                    f"{where}: field '{sub}' must map term names to numbers, got {value!r}")
            value = None if value is None else {k: float(v) for k, v in value.items()}
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise HyperparamsError(f"{where}: field '{sub}' must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise HyperparamsError(f"{where}: field '{sub}' must be a positive integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise HyperparamsError(f"{where}: field '{sub}' must be a non-negative number, got {value!r}")
            value = float(value)
        elif key == "finetune_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HyperparamsError(f"{where}: field '{sub}' must be an integer >= 0, got {value!r}")
        elif isinstance(default, str) or key in ("task", "algo", "env_id", "eval_id", "finetune_env_id"):
            if not isinstance(value, str):
                raise HyperparamsError(f"{where}: field '{sub}' must be a string, got {value!r}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise HyperparamsError(f"{where}: field '{path}' is incomplete ({exc})") from exc


def load_task_config(task: str, path: str | Path = HYPERPARAMS_PATH) -> TaskConfig:
    """Read one task's training configuration from the hyperparameter file.

    Args:
        task: Task name ("energy", "thermal", "combined"), a top-level key of the file.
        path: YAML file; defaults to the shipped `agents/hyperparams.yaml`.

    Raises:
        HyperparamsError: Unreadable file, unknown task, unknown key or bad value.
    """
    where = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise HyperparamsError(f"{where}: cannot read hyperparameter file ({exc})") from exc
    except yaml.YAMLError as exc:
        raise HyperparamsError(f"{where}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or task not in data:
        known = sorted(data) if isinstance(data, dict) else []
        raise HyperparamsError(f"{where}: no entry for task {task!r}; tasks in the file: {known}")
    entry = dict(data[task])
    entry.setdefault("task", task)
    cfg = _typed(TaskConfig, entry, where, task)
    if cfg.task != task:
        raise HyperparamsError(f"{where}: field '{task}.task' is {cfg.task!r}, expected {task!r}")
    if cfg.algo not in ALGOS:
        raise HyperparamsError(f"{where}: field '{task}.algo' is {cfg.algo!r}, not one of {ALGOS}")
    if cfg.algo_params.batch_size > cfg.algo_params.n_steps * cfg.n_envs:
        raise HyperparamsError(
            f"{where}: field '{task}.algo_params.batch_size' ({cfg.algo_params.batch_size}) exceeds "
            f"n_steps x n_envs ({cfg.algo_params.n_steps * cfg.n_envs})")
    return cfg
