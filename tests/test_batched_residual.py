"""The residual energy agent's batched training env: copy i is `ResidualOverManager` step for step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llm_cluster_gym.agents.batched_residual import BatchedResidualVecEnv
from llm_cluster_gym.agents.residual import ResidualOverManager
from llm_cluster_gym.agents.train_residual import MANAGER_KWARGS
from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.scripts.dynamo_week import DAY_S, make_env, window_scenario


def _window(minutes: float, day: int = 2, hour: float = 14.0):
    return window_scenario(load_scenario("dynamo_week"), day * DAY_S + hour * 3600.0, 0.0, minutes * 60.0)


@pytest.mark.parametrize("objective", ["task", "energy"])
def test_each_copy_is_the_residual_env_over_its_own_manager(objective):
    """Three copies of a 5-minute Tuesday-afternoon window, random offsets, a multiplier of 3:
    observations bit for bit, shaped rewards (float32, under either objective) and SLO
    violations (to 1e-12: the batched simulator sums in another order) equal to each copy's
    `ResidualOverManager`, through the episode's end (terminal observation) into the next episode."""
    s = _window(5.0)
    seeds = [11, 12, 13]
    venv = BatchedResidualVecEnv(3, lambda: s, manager_kwargs=MANAGER_KWARGS, objective=objective)
    obs = venv.start(s, seeds)
    singles = [ResidualOverManager(make_env(s), manager_kwargs=MANAGER_KWARGS, objective=objective)
               for _ in seeds]
    for i, (r, seed) in enumerate(zip(singles, seeds, strict=True)):
        np.testing.assert_array_equal(obs[i], r.reset(seed=seed)[0])
    venv.env_method("set_lagrange", 3.0)
    for r in singles:
        r.set_lagrange(3.0)
    rng = np.random.default_rng(0)
    offsets_used, ended = set(), False
    for _ in range(70):
        a = rng.integers(0, 3, (3, 3))
        venv.step_async(a)
        obs, reward, done, infos = venv.step_wait()
        for i, r in enumerate(singles):
            o, rew, _, truncated, info = r.step(a[i])
            assert reward[i] == np.float32(rew)
            assert infos[i]["slo_violation"] == pytest.approx(info["slo_violation"], abs=1e-12)
            assert infos[i]["lagrange"] == 3.0
            if done[i]:
                assert truncated and infos[i]["TimeLimit.truncated"]
                np.testing.assert_array_equal(infos[i]["terminal_observation"], o)
            else:
                np.testing.assert_array_equal(obs[i], o)
        offsets_used.update(a.ravel().tolist())
        if done.any():
            ended = True
            break
    assert ended and offsets_used == {0, 1, 2}
    assert obs.shape == (3, len(singles[0].observation_names))  # the next episode's first observations


def test_actions_outside_the_space_are_refused():
    s = _window(5.0)
    venv = BatchedResidualVecEnv(2, lambda: s)
    venv.start(s, [1, 2])
    with pytest.raises(ValueError, match="actions must be"):
        venv.corrected_actions(np.full((2, 3), 3))
    with pytest.raises(ValueError, match="actions must be"):
        venv.corrected_actions(np.zeros((3, 3), dtype=int))
    with pytest.raises(AttributeError, match="no per-copy method"):
        venv.env_method("reset")


def test_train_residual_runs_on_batched_copies(tmp_path):
    """`llm-cluster train-residual --batched 4`: PPO over the batched copies writes a checkpoint whose
    metadata records the copies; the policy then acts as a controller on a single env."""
    from llm_cluster_gym.agents.train_residual import ResidualPolicy, TrainResidualArgs, train

    out = tmp_path / "ckpt"
    path = train(TrainResidualArgs(steps=600, window_h=0.1, batched=4, out=str(out), tensorboard=None))
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["stages"][-1]["batched_copies"] == 4 and meta["steps"] >= 600
    s = _window(5.0)
    env = make_env(s)
    policy = ResidualPolicy(path, env)
    obs, _ = env.reset(seed=0)
    action = policy.decide(obs, env.unwrapped.action_masks())
    assert len(action.pools) == env.unwrapped.layout.n_pools


def test_batched_training_refuses_the_request_level_model():
    from llm_cluster_gym.agents.train_residual import TrainResidualArgs
    from llm_cluster_gym.scripts.residual import run_train
    from llm_cluster_gym.scripts.usage import UsageError

    with pytest.raises(UsageError, match="--batched runs the aggregate model only"):
        run_train(TrainResidualArgs(batched=4, serving_model="request"))
    with pytest.raises(UsageError, match="--batched must be >= 0"):
        run_train(TrainResidualArgs(batched=-1))
