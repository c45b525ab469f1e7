"""`gymnasium.make_vec`'s batched energy env against Gymnasium's sync vector of `ClusterEnv`s."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded

import llm_cluster_gym  # noqa: F401 - registers the ids
from llm_cluster_gym.envs.actions import InvalidActionError
from llm_cluster_gym.envs.sim.scenario import ScenarioError
from llm_cluster_gym.envs.vector_env import INFO_KEYS, BatchedClusterEnv

ENV_ID = "LLMCluster/Energy-small-v0"


def _pair(n, **kwargs):
    batched = gym.make_vec(ENV_ID, num_envs=n, **kwargs)
    sync = gym.make_vec(ENV_ID, num_envs=n, vectorization_mode="sync", **kwargs)
    return batched, sync


def test_make_vec_builds_the_batched_env():
    env = gym.make_vec(ENV_ID, num_envs=3)
    assert isinstance(env, BatchedClusterEnv)
    assert env.single_action_space == gym.make(ENV_ID).action_space
    assert env.single_observation_space == gym.make(ENV_ID).observation_space
    assert env.action_space.shape == (3, len(env.single_action_space.nvec))


def test_batched_copies_equal_sync_envs_through_autoreset():
    """Random actions (same for every copy now and then), two episodes and two autoresets."""
    batched, sync = _pair(3)
    ob, ib = batched.reset(seed=5)
    os_, _ = sync.reset(seed=5)
    np.testing.assert_array_equal(ob, os_)
    assert ib["_energy_j"].all() and set(INFO_KEYS) <= set(ib)
    rng = np.random.default_rng(0)
    nvec = batched.single_action_space.nvec
    truncations = 0
    for t in range(250):
        a = rng.integers(0, nvec, size=(3, len(nvec)))
        if t % 7 == 0:
            a[:] = a[0]
        ob, rb, tb, trb, ib = batched.step(a)
        os_, rs, ts, trs, is_ = sync.step(a)
        np.testing.assert_allclose(ob, os_, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rb, rs, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(tb, ts)
        np.testing.assert_array_equal(trb, trs)
        if trb.any():
            truncations += 1
            for key in ("energy_j", "slo_attainment", "cost_slo", "reward_energy"):
                np.testing.assert_allclose(ib[key], is_[key], rtol=1e-9, atol=1e-12)
    assert truncations == 2


def test_seed_lists_and_unseeded_resets_follow_each_copy():
    batched, sync = _pair(2)
    np.testing.assert_array_equal(batched.reset(seed=[7, None])[0][0], sync.reset(seed=[7, 3])[0][0])
    a, _ = batched.reset(seed=11)
    b, _ = BatchedClusterEnv(num_envs=2).reset(seed=11)
    np.testing.assert_array_equal(a, b)
    step = np.zeros((2, len(batched.single_action_space.nvec)), dtype=np.int64)
    # A copy's next unseeded episode draws from its own generator: reruns repeat it.
    first = [batched.step(step)[1] for _ in range(3)]
    batched.reset(seed=11)
    assert all(np.array_equal(x, batched.step(step)[1]) for x in first)
    with pytest.raises(ValueError, match="seeds"):
        batched.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="options"):
        batched.reset(options={"backend_seed": 1})


def test_episode_length_follows_max_episode_steps():
    env = BatchedClusterEnv(num_envs=2, max_episode_steps=5)
    env.reset(seed=0)
    a = np.zeros((2, len(env.single_action_space.nvec)), dtype=np.int64)
    truncated = [env.step(a)[3].all() for _ in range(5)]
    assert truncated == [False] * 4 + [True]
    obs, reward, term, trunc, info = env.step(a)  # the autoreset step
    assert not trunc.any() and not reward.any() and info["time_s"][0] == 0.0


def test_bad_use_is_refused():
    env = BatchedClusterEnv(num_envs=2)
    n_dims = len(env.single_action_space.nvec)
    with pytest.raises(ResetNeeded):
        env.step(np.zeros((2, n_dims), dtype=np.int64))
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match="shape"):
        env.step(np.zeros((3, n_dims), dtype=np.int64))
    bad = np.zeros((2, n_dims), dtype=np.int64)
    bad[1, 2] = 99
    with pytest.raises(InvalidActionError, match=r"actions\[1\]\[2\] = 99"):
        env.step(bad)
    with pytest.raises(InvalidActionError, match="integers"):
        env.step(np.full((2, n_dims), 0.5))
    with pytest.raises(ValueError, match="energy task"):
        BatchedClusterEnv(num_envs=2, task="thermal")
    with pytest.raises(ValueError, match="aggregate"):
        BatchedClusterEnv(num_envs=2, serving_model="request")
    with pytest.raises(ScenarioError, match="saas_fraction"):
        BatchedClusterEnv(num_envs=2, scenario="small_tapas")


def test_sb3_adapter_resets_on_the_last_step_and_reports_episodes():
    """SB3's same-step autoreset: the last observation in info, the next episode's first returned."""
    from llm_cluster_gym.agents.batched_vec_env import make_batched_vec_env

    venv = make_batched_vec_env(ENV_ID, 2, seed=4)
    obs = venv.reset()
    np.testing.assert_array_equal(obs, BatchedClusterEnv(num_envs=2).reset(seed=4)[0])
    a = np.zeros((2, len(venv.action_space.nvec)), dtype=np.int64)
    returns = np.zeros(2)
    for step in range(1, 121):
        obs, reward, done, infos = venv.step(a)
        returns += reward
        assert done.all() == (step == 120)
    assert infos[0]["TimeLimit.truncated"] and infos[1]["episode"]["l"] == 120
    assert not np.array_equal(infos[0]["terminal_observation"], obs[0])
    np.testing.assert_allclose(obs[:, -9], 1.0)  # time of day: the new episode's cos(0)
    assert [info["episode"]["r"] for info in infos] == pytest.approx(returns, rel=1e-5)


def test_training_runs_on_batched_copies(tmp_path):
    import dataclasses

    from llm_cluster_gym.agents.config import load_task_config
    from llm_cluster_gym.agents.train import train

    cfg = load_task_config("energy")
    cfg = dataclasses.replace(cfg, algo_params=dataclasses.replace(cfg.algo_params, n_steps=32,
                                                                   batch_size=128),
                              n_envs=8, checkpoint_freq=10**9, finetune_steps=0)
    result = train(cfg, tmp_path, seed=0, steps=512, n_envs=8, progress=False, tensorboard=False,
                   evaluate=False, finetune_steps=0, batched=True)
    assert result.num_timesteps == 512
    assert result.metadata["batched_envs"] is True and result.metadata["n_envs"] == 8
