"""TrainedPolicy: a trained SB3 agent behind the `controllers.base.Controller` interface.

Evaluation, the shield and the live control loop call `act(observation, action_mask)` on every
policy; this adapter makes a checkpoint interchangeable with the rule-based controllers. It
applies the training-time VecNormalize observation normalization (statistics frozen), predicts
deterministically, and passes the action mask to MaskablePPO so a masked choice is never chosen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.agents.checkpoint import RESIDUAL_KINDS, Checkpoint, is_residual, load_checkpoint


def load_policy(directory: str | Path, env: Any, name: str | None = None,
                same_scenario: bool = True) -> Any:
    """A checkpoint as a controller: a residual agent, or a `TrainedPolicy`.

    A residual agent (its metadata's ``kind``: over the DynamoLLM-style manager,
    `agents.residual`, or over the TAPAS-style controller, `agents.residual_thermal`) brings its
    own base controller and layout-free spaces, so it runs on any scenario size of its task.
    """
    meta = residual_metadata(directory)
    if meta is not None:
        from llm_cluster_gym.agents.checkpoint import METADATA_FILE, check_field_matches

        base = getattr(env, "unwrapped", env)
        # Before its base controller is built on the env (which would fail on another task).
        check_field_matches(meta, "task", base.task, Path(directory) / METADATA_FILE)
        policy = _RESIDUAL_POLICIES[meta["kind"]]()(directory, base)
        if name:
            policy.name = name
        return policy
    return TrainedPolicy.from_checkpoint(directory, env, name=name, same_scenario=same_scenario)


def _residual_over_manager() -> Any:
    from llm_cluster_gym.agents.train_residual import ResidualPolicy

    return ResidualPolicy


def _residual_over_tapas() -> Any:
    from llm_cluster_gym.agents.train_residual_thermal import ResidualThermalPolicy

    return ResidualThermalPolicy


_RESIDUAL_POLICIES = dict(zip(RESIDUAL_KINDS, (_residual_over_manager, _residual_over_tapas),
                              strict=True))
"""Checkpoint ``kind`` -> the controller class that loads it (imported on use)."""


def checkpoint_task(directory: str | Path) -> str:
    """The task a checkpoint was trained for (its metadata checked as its kind requires)."""
    return checkpoint_scope(directory)[0]


def checkpoint_scope(directory: str | Path) -> tuple[str, str | None]:
    """The task a checkpoint runs on and the scenario it is bound to.

    The scenario is None for a residual agent: its spaces do not depend on the layout, so it
    runs on every scenario size of its task. An agent trained from scratch is bound to the
    scenario it was trained on.

    Raises:
        CheckpointError: The metadata is missing, unreadable or lacks a field its kind requires.
    """
    from llm_cluster_gym.agents.checkpoint import load_metadata

    meta = load_metadata(directory)
    return str(meta["task"]), None if is_residual(meta) else str(meta["scenario"])


def residual_metadata(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint's metadata if it says it holds a residual agent, else None."""
    try:
        meta = json.loads((Path(directory) / "metadata.json").read_text())
    except (OSError, ValueError):
        return None  # load_checkpoint / load_metadata say what is wrong with it
    return meta if isinstance(meta, dict) and is_residual(meta) else None


def init_metadata(directory: str | Path | None, kind: str) -> dict[str, Any]:
    """The metadata of a residual checkpoint to continue training from ({} without one).

    Raises:
        CheckpointError: `directory` does not hold a whole residual agent of `kind` (naming the
            file and the field).
    """
    return verified_residual_metadata(directory, kind) if directory else {}


def verified_residual_metadata(directory: str | Path, kind: str) -> dict[str, Any]:
    """The metadata of the residual agent of `kind` in `directory`, its files checked.

    What a command that runs or continues one checks before any work: the metadata's fields and
    version (`load_metadata`), its kind, and every listed file's SHA-256 (`verify_files`).

    Raises:
        CheckpointError: Naming the file and the field or the file that is wrong.
    """
    from llm_cluster_gym.agents.checkpoint import METADATA_FILE, CheckpointError, load_metadata, verify_files

    found = residual_metadata(directory)
    if found is None or found.get("kind") != kind:
        what = "no residual agent's metadata" if found is None else repr(found.get("kind"))
        raise CheckpointError(f"{Path(directory) / METADATA_FILE}: field 'kind' must be "
                              f"{kind!r}, found {what}")
    meta = load_metadata(directory)
    verify_files(directory, meta)
    return meta


class TrainedPolicy:
    """A trained PPO / MaskablePPO policy as a Controller.

    Args:
        model: The SB3 model.
        vecnormalize: VecNormalize carrying the observation statistics, or None.
        name: Controller name used in reports.
        metadata: The checkpoint's metadata (empty for a live model during training).
    """

    def __init__(self, model: Any, vecnormalize: Any = None, name: str = "ppo",
                 metadata: dict[str, Any] | None = None) -> None:
        self.model = model
        self.vecnormalize = vecnormalize
        self.name = name
        self.metadata = metadata or {}
        self.maskable = type(model).__name__ == "MaskablePPO"

    @classmethod
    def from_checkpoint(cls, directory: str | Path, env: Any = None,
                        name: str | None = None, same_scenario: bool = True) -> TrainedPolicy:
        """Load a checkpoint (validated against `env` when given) as a controller."""
        ck: Checkpoint = load_checkpoint(directory, env, same_scenario=same_scenario)
        return cls(ck.model, ck.vecnormalize, name or f"{ck.metadata['algo'].lower()}:{ck.metadata['task']}",
                   ck.metadata)

    def reset(self) -> None:
        """No episode state: the policy is a feed-forward network."""

    def normalize(self, observation: np.ndarray) -> np.ndarray:
        """The observation as the network saw it in training (VecNormalize, frozen statistics)."""
        obs = np.asarray(observation, dtype=np.float32)
        vn = self.vecnormalize
        if vn is None or not getattr(vn, "norm_obs", True):
            return obs
        return np.clip((obs - vn.obs_rms.mean) / np.sqrt(vn.obs_rms.var + vn.epsilon),
                       -vn.clip_obs, vn.clip_obs).astype(np.float32)

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """Deterministic action for one observation; the mask is honoured by MaskablePPO."""
        obs = self.normalize(observation)
        if self.maskable:
            action, _ = self.model.predict(obs, deterministic=True, action_masks=action_mask)
        else:
            action, _ = self.model.predict(obs, deterministic=True)
        return np.asarray(action, dtype=np.int64)
