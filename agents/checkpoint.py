"""Checkpoint I/O: a directory with the SB3 model, the VecNormalize statistics and metadata.json.

Layout of a checkpoint directory:

| file | content |
|---|---|
| `model.zip` | the stable-baselines3 / sb3-contrib model (`model.save`) |
| `vecnormalize.pkl` | the training envs' VecNormalize statistics (SB3's pickle, `VecNormalize.save`) |
| `metadata.json` | how it was made (task, ids, scenario, trace windows, seed, steps, wall time, |
| | git commit, package versions, spaces, evaluation results, SHA-256 of the files above) |

Loading validates before it trusts: the files exist, their SHA-256 matches the metadata (a
truncated or replaced file is caught before unpickling), a policy trained on normalized
observations lists its statistics file (without it the policy would run on raw observations),
the metadata has every required field, and, when an environment is given, its task, scenario,
observation names and action space match. Resuming training (`agents.train`) verifies the files
the same way (`verify_files`).
Every failure raises `CheckpointError` naming the directory, the file or field, and the values.
The statistics file is a pickle: load checkpoints only from sources you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.zip"
VECNORM_FILE = "vecnormalize.pkl"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1

REQUIRED_FIELDS = (
    "format_version", "task", "algo", "env_id", "eval_id", "scenario", "trace", "trace_windows_s",
    "seed", "steps", "train_wall_s", "git_commit", "versions", "observation_names",
    "action_nvec", "files_sha256",
)
"""Fields every checkpoint of an agent trained from scratch (`agents.train`) must carry."""

RESIDUAL_KINDS = ("residual_over_manager", "residual_over_tapas")
"""Metadata ``kind`` of the residual agents (`agents.residual`, `agents.residual_thermal`): a
correction over a rule-based controller, on layout-free spaces, so bound to a task, not a scenario."""

RESIDUAL_REQUIRED_FIELDS = (
    "format_version", "kind", "task", "seed", "steps", "train_wall_s", "versions", "files_sha256",
)
"""Fields a residual agent's checkpoint must carry (its spaces are the task's, not the layout's)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the environment it is asked to run on."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: The PPO or MaskablePPO model (on CPU).
        vecnormalize: VecNormalize holding the observation statistics (no venv attached), or None.
        metadata: The parsed metadata.json.
        path: The checkpoint directory.
    """

    model: Any
    vecnormalize: Any
    metadata: dict[str, Any]
    path: Path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(repo: Path | None = None) -> str:
    """The repository's HEAD commit, suffixed "+dirty" when tracked files differ; "unknown" outside git."""
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    """Versions of python, numpy, torch, gymnasium, stable-baselines3 and sb3-contrib."""
    import gymnasium
    import sb3_contrib
    import stable_baselines3
    import torch

    return {
        "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
        "gymnasium": gymnasium.__version__, "stable_baselines3": stable_baselines3.__version__,
        "sb3_contrib": sb3_contrib.__version__,
    }


def env_signature(env: Any) -> dict[str, Any]:
    """What a checkpoint must agree with: task, scenario, observation names, action space."""
    base = env.unwrapped
    return {
        "task": base.task,
        "scenario": base.backend.describe().scenario_name,
        "observation_names": list(base.observation_names),
        "action_nvec": [int(v) for v in base.action_space.nvec],
    }


def save_checkpoint(directory: str | Path, model: Any, vecnormalize: Any,
                    metadata: dict[str, Any]) -> Path:
    """Write model, VecNormalize statistics and metadata (with the files' SHA-256) to a directory.

    Crash-safe: the model and the statistics are first written under temporary names beside
    their targets (the previous checkpoint stays whole and loadable meanwhile); then the old
    metadata is removed, the new files are renamed into place, and the metadata is written last
    through a temporary file. A save that dies therefore leaves either the previous checkpoint,
    or files without ``metadata.json``, which `load_metadata` refuses: never a half checkpoint
    that looks complete.

    Args:
        directory: Checkpoint directory (created; existing files are replaced).
        model: An SB3 model with `.save(path)`.
        vecnormalize: The training VecNormalize wrapper (its `.save(path)` pickles the statistics
            without the wrapped envs), or None when observations are not normalized.
        metadata: Fields describing the run; `format_version` and `files_sha256` are filled here.

    Returns:
        The directory.
    """
    from llm_cluster_gym.envs.outputs import write_file_atomic

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged = {MODEL_FILE: d / f".incomplete-{tag}-{MODEL_FILE}"}
    if vecnormalize is not None:
        staged[VECNORM_FILE] = d / f".incomplete-{tag}-{VECNORM_FILE}"
    try:
        model.save(staged[MODEL_FILE])
        if vecnormalize is not None:
            vecnormalize.save(str(staged[VECNORM_FILE]))
        files = {name: sha256_file(path) for name, path in staged.items()}
        meta = dict(metadata)
        meta["format_version"] = FORMAT_VERSION
        meta["files_sha256"] = files
        text = json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n"
        (d / METADATA_FILE).unlink(missing_ok=True)  # from here until the end: no checkpoint
        for name, path in staged.items():
            os.replace(path, d / name)
        if vecnormalize is None:
            (d / VECNORM_FILE).unlink(missing_ok=True)
        write_file_atomic(d / METADATA_FILE, text.encode())
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return d


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def load_metadata(directory: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's metadata.json (presence, JSON, required fields, version)."""
    d = Path(directory)
    path = d / METADATA_FILE
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing metadata file (is {d} a checkpoint directory?)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: metadata is not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    residual = is_residual(meta)
    missing = [k for k in (RESIDUAL_REQUIRED_FIELDS if residual else REQUIRED_FIELDS) if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks field(s) {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: field 'format_version' is {meta['format_version']!r}; this code reads {FORMAT_VERSION}")
    # A residual agent is PPO (checkpoints written before the field existed do not name it).
    algos = ("PPO",) if residual else ("PPO", "MaskablePPO")
    if meta.get("algo", "PPO" if residual else None) not in algos:
        raise CheckpointError(f"{path}: field 'algo' is {meta.get('algo')!r}, not "
                              f"{' or '.join(algos)}")
    if not isinstance(meta["task"], str):
        raise CheckpointError(f"{path}: field 'task' is {meta['task']!r}, not a task name")
    if not isinstance(meta["files_sha256"], dict) or MODEL_FILE not in meta["files_sha256"]:
        raise CheckpointError(
            f"{path}: field 'files_sha256' must list {MODEL_FILE}, got {meta['files_sha256']!r}")
    return meta


def is_residual(meta: dict[str, Any]) -> bool:
    """Whether the metadata is a residual agent's (its ``kind`` one of `RESIDUAL_KINDS`)."""
    return meta.get("kind") in RESIDUAL_KINDS


def normalizes_observations(meta: dict[str, Any]) -> bool:
    """Whether the metadata says the policy was trained on normalized observations.

    That is ``hyperparams.normalize.norm_obs`` (what `agents.train` records); a checkpoint
    without it (written by hand) is taken as not normalized. A residual agent always is
    (`agents.residual.train_constrained_ppo`).
    """
    if is_residual(meta):
        return True
    hp = meta.get("hyperparams")
    norm = hp.get("normalize") if isinstance(hp, dict) else None
    return isinstance(norm, dict) and bool(norm.get("norm_obs", False))


def verify_files(directory: str | Path, meta: dict[str, Any]) -> None:
    """Check the checkpoint's files against its metadata before anything is unpickled.

    Every file in ``files_sha256`` must exist with that SHA-256, and a policy trained on
    normalized observations must list its statistics file (`VECNORM_FILE`): one that is
    missing, or present but unlisted (so unverified), is refused.

    Raises:
        CheckpointError: Naming the file and what is wrong with it.
    """
    d = Path(directory)
    if normalizes_observations(meta) and VECNORM_FILE not in meta["files_sha256"]:
        path = d / VECNORM_FILE
        state = "present but unverified" if path.exists() else "missing"
        why = (f"field 'kind' is {meta['kind']!r}, trained on normalized observations" if is_residual(meta)
               else "'hyperparams.normalize.norm_obs' is true")
        raise CheckpointError(
            f"{path}: the metadata says observations are normalized ({why}) but 'files_sha256' "
            f"does not list this statistics file ({state}); the policy cannot run without it")
    for name, digest in meta["files_sha256"].items():
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"{path}: file listed in metadata 'files_sha256' is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise CheckpointError(
                f"{path}: SHA-256 {actual[:12]}... differs from metadata 'files_sha256' {digest[:12]}... "
                "(file truncated, corrupted or replaced)")


def check_field_matches(meta: dict[str, Any], key: str, env_value: Any, where: str | Path) -> None:
    """Raise CheckpointError unless the metadata's `key` is the environment's `env_value`."""
    if meta.get(key) != env_value:
        raise CheckpointError(
            f"{where}: field '{key}' is {meta.get(key)!r} but the environment's {key} is {env_value!r}")


def check_compatible(meta: dict[str, Any], env: Any, where: str | Path = "checkpoint",
                     same_scenario: bool = True) -> None:
    """Raise CheckpointError if the checkpoint was not trained for this environment's task/spaces.

    `same_scenario=False` allows another scenario with identical spaces and observation names
    (e.g. the same datacenter at a higher oversubscription): a deliberate transfer evaluation.
    """
    sig = env_signature(env)
    for key in ("task", "scenario") if same_scenario else ("task",):
        if sig[key] is not None:
            check_field_matches(meta, key, sig[key], where)
    if list(meta["action_nvec"]) != sig["action_nvec"]:
        raise CheckpointError(
            f"{where}: field 'action_nvec' is {meta['action_nvec']} but the environment's action space "
            f"is MultiDiscrete({sig['action_nvec']})")
    names = list(meta["observation_names"])
    if names != sig["observation_names"]:
        if len(names) != len(sig["observation_names"]):
            detail = f"{len(names)} entries vs the environment's {len(sig['observation_names'])}"
        else:
            pairs = zip(names, sig["observation_names"], strict=True)
            i = next(i for i, (a, b) in enumerate(pairs) if a != b)
            detail = f"index {i} is {names[i]!r} vs the environment's {sig['observation_names'][i]!r}"
        raise CheckpointError(f"{where}: field 'observation_names' does not match the environment ({detail})")


def load_checkpoint(directory: str | Path, env: Any = None, same_scenario: bool = True) -> Checkpoint:
    """Load and validate a checkpoint; with `env`, also check it fits that environment.

    Args:
        directory: A directory written by `save_checkpoint`.
        env: Optional environment (ClusterEnv, possibly wrapped) the policy will run on.
        same_scenario: Require the env's scenario to be the training scenario (see
            `check_compatible`).

    Raises:
        CheckpointError: Missing or corrupt file, normalization statistics missing from a policy
            trained on normalized observations, bad metadata, or a mismatch with `env`.
    """
    d = Path(directory)
    meta = load_metadata(d)
    if env is not None:
        check_compatible(meta, env, d / METADATA_FILE, same_scenario=same_scenario)
    verify_files(d, meta)
    if meta["algo"] == "MaskablePPO":
        from sb3_contrib import MaskablePPO as algo_cls
    else:
        from stable_baselines3 import PPO as algo_cls
    try:
        model = algo_cls.load(d / MODEL_FILE, device="cpu")
    except Exception as exc:  # zipfile, torch and pickle errors all mean "unreadable model"
        raise CheckpointError(
            f"{d / MODEL_FILE}: cannot load {meta['algo']} model ({type(exc).__name__}: {exc})") from exc
    vecnorm = None
    if VECNORM_FILE in meta["files_sha256"]:
        import pickle

        try:
            with open(d / VECNORM_FILE, "rb") as f:
                vecnorm = pickle.load(f)
        except Exception as exc:  # any unpickling failure
            raise CheckpointError(f"{d / VECNORM_FILE}: cannot read VecNormalize statistics ({exc})") from exc
        if vecnorm.obs_rms.mean.shape != tuple(model.observation_space.shape):
            raise CheckpointError(
                f"{d / VECNORM_FILE}: observation statistics have shape {vecnorm.obs_rms.mean.shape}, "
                f"model expects {model.observation_space.shape}")
    if list(model.action_space.nvec) != list(meta["action_nvec"]):
        raise CheckpointError(f"{d / MODEL_FILE}: model action space {model.action_space} disagrees with "
                              f"metadata 'action_nvec' {meta['action_nvec']}")
    return Checkpoint(model=model, vecnormalize=vecnorm, metadata=meta, path=d)
