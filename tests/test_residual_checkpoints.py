"""Residual agents' checkpoints: checked like every checkpoint, and bound to a task, not a layout.

A residual agent (`agents.residual`, `agents.residual_thermal`) runs on every scenario size of
its task, so the commands that run checkpoints (`compare`, `sweep`, `evaluate`) must take it on
any of them, and its files must be verified before anything is unpickled, as an agent trained
from scratch is (`agents.checkpoint.verify_files`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm_cluster_gym.agents.checkpoint import CheckpointError, load_metadata
from llm_cluster_gym.agents.policy import checkpoint_scope, load_policy, verified_residual_metadata
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.scripts.compare import check_checkpoints
from llm_cluster_gym.scripts.usage import UsageError

ROOT = Path(__file__).resolve().parents[1]
ENERGY = ROOT / "checkpoints" / "residual_energy"
THERMAL = ROOT / "checkpoints" / "residual_thermal"
FROM_SCRATCH = ROOT / "checkpoints" / "energy"


def _copy(tmp_path: Path, src: Path = ENERGY) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_metadata(directory: Path, **changes) -> None:
    path = directory / "metadata.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_a_residual_agent_is_bound_to_its_task_and_runs_on_every_scenario_of_it():
    assert checkpoint_scope(ENERGY) == ("energy", None)
    assert checkpoint_scope(THERMAL) == ("thermal", None)
    assert checkpoint_scope(FROM_SCRATCH) == ("energy", "small")  # trained from scratch: one layout
    check_checkpoints([f"ckpt:{ENERGY}", "dynamo"], "energy", ["small", "medium", "dynamo_week"])
    check_checkpoints([f"shield:ckpt:{THERMAL}"], "thermal", ["small_tapas_high", "tapas_dc"])
    with pytest.raises(UsageError, match="trained for task 'energy', not 'thermal'"):
        check_checkpoints([f"ckpt:{ENERGY}"], "thermal", ["small_tapas"])
    with pytest.raises(UsageError, match="trained on scenario 'small', not 'medium'"):
        check_checkpoints([f"ckpt:{FROM_SCRATCH}"], "energy", ["medium"])


def test_compare_runs_the_shipped_residual_agent_on_a_scenario_it_was_not_trained_on(tmp_path, capsys):
    from llm_cluster_gym.scripts import cli

    rc = cli.main(["compare", "--scenario", "small", "--serving", "aggregate", "--controllers",
                   f"ckpt:{ENERGY}", "--seeds", "0", "--no-plots", "--out", str(tmp_path / "cmp")])
    assert rc == 0
    assert f"| ckpt:{ENERGY} |" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("truncate_model", r"model\.zip: SHA-256 .* differs from metadata 'files_sha256'"),
    ("truncate_statistics", r"vecnormalize\.pkl: SHA-256 .* differs"),
    ("unlist_statistics", r"vecnormalize\.pkl: the metadata says observations are normalized \(field "
                          r"'kind' is 'residual_over_manager'.*present but unverified"),
    ("drop_field", r"metadata\.json: metadata lacks field\(s\) \['steps'\]"),
    ("maskable", r"metadata\.json: field 'algo' is 'MaskablePPO', not PPO"),
])
def test_a_damaged_residual_checkpoint_is_refused_naming_file_and_field(tmp_path, damage, message):
    ck = _copy(tmp_path)
    if damage.startswith("truncate"):
        name = "model.zip" if damage == "truncate_model" else "vecnormalize.pkl"
        data = (ck / name).read_bytes()
        (ck / name).write_bytes(data[: len(data) // 2])
    elif damage == "unlist_statistics":
        meta = json.loads((ck / "metadata.json").read_text())
        _edit_metadata(ck, files_sha256={"model.zip": meta["files_sha256"]["model.zip"]})
    elif damage == "drop_field":
        _edit_metadata(ck, steps=None)
    else:
        _edit_metadata(ck, algo="MaskablePPO")
    env = ClusterEnv("energy", scenario="small", serving_model="aggregate")
    with pytest.raises(CheckpointError, match=message):
        load_policy(ck, env)
    with pytest.raises(CheckpointError, match=message):
        verified_residual_metadata(ck, "residual_over_manager")


def test_a_residual_agent_on_another_task_is_refused_before_its_base_controller_is_built():
    env = ClusterEnv("thermal", scenario="small_tapas", serving_model="aggregate")
    with pytest.raises(CheckpointError, match=r"metadata\.json: field 'task' is 'energy' but the "
                                              r"environment's task is 'thermal'"):
        load_policy(ENERGY, env)
    with pytest.raises(CheckpointError, match="field 'kind' must be 'residual_over_tapas', found "
                                              "'residual_over_manager'"):
        verified_residual_metadata(ENERGY, "residual_over_tapas")


def test_a_model_whose_spaces_are_not_the_agents_is_refused(tmp_path):
    """The thermal agent's files under the energy agent's metadata: the SHA-256s match (the
    metadata lists them), but the network's spaces are not the energy agent's."""
    ck = _copy(tmp_path)
    for name in ("model.zip", "vecnormalize.pkl"):
        shutil.copy(THERMAL / name, ck / name)
    thermal = load_metadata(THERMAL)
    _edit_metadata(ck, files_sha256=thermal["files_sha256"])
    env = ClusterEnv("energy", scenario="small", serving_model="aggregate")
    with pytest.raises(CheckpointError, match=r"model\.zip: the model's observation space .* is not "
                                              r"the residual_over_manager agent's"):
        load_policy(ck, env)


def test_the_residual_eval_commands_check_the_checkpoint_before_evaluating(tmp_path, capsys):
    from llm_cluster_gym.scripts import cli

    ck = _copy(tmp_path)
    data = (ck / "model.zip").read_bytes()
    (ck / "model.zip").write_bytes(data[:-10])
    assert cli.main(["residual-eval", "--checkpoint", str(ck), "--days", "0", "--hours", "0.01"]) == 2
    assert cli.main(["thermal-eval", "--checkpoint", str(ENERGY), "--dc-hours", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert "model.zip: SHA-256" in err[0]
    assert "field 'kind' must be 'residual_over_tapas', found 'residual_over_manager'" in err[1]


def test_the_live_loop_runs_the_shipped_residual_agents_on_any_scenario_of_their_task(tmp_path):
    """`deploy --policy ckpt:<residual agent>` builds the agent (shielded) on a scenario size it
    was not trained on; a damaged one is a one-line policy error naming the file."""
    from llm_cluster_gym.controllers.live.policies import build_policy
    from llm_cluster_gym.controllers.policy_spec import PolicySpecError

    for task, scenario, ck in (("energy", "medium", ENERGY), ("thermal", "small_tapas", THERMAL)):
        env = ClusterEnv(task, scenario=scenario, serving_model="aggregate")
        policy, _ = build_policy(f"ckpt:{ck}", env)
        obs, _ = env.reset(seed=0)
        for _ in range(3):
            mask = env.action_masks() if hasattr(env, "action_masks") else None
            action = policy.act(obs, mask)
            assert env.action_space.contains(action)
            obs, *_ = env.step(action)
        expected = "ResidualPolicy" if task == "energy" else "ResidualThermalPolicy"
        assert type(policy.inner).__name__ == expected
    broken = _copy(tmp_path)
    (broken / "vecnormalize.pkl").write_bytes(b"")
    env = ClusterEnv("energy", scenario="small", serving_model="aggregate")
    with pytest.raises(PolicySpecError, match=r"cannot load checkpoint \(.*vecnormalize\.pkl: SHA-256"):
        build_policy(f"ckpt:{broken}", env)
