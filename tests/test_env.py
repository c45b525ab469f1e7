import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import llm_cluster_gym
from llm_cluster_gym.envs.actions import InvalidActionError
from llm_cluster_gym.envs.cluster_env import ClusterEnv

IDS = list(llm_cluster_gym.TASK_IDS)
TRAIN_IDS = [i for i in IDS if "-small-" in i]


def _legal_random_action(env: ClusterEnv, rng: np.random.Generator) -> np.ndarray:
    a = np.array([rng.integers(n) for n in env.action_space.nvec])
    if env.codec.has_rows:
        mask = env.action_masks()
        nv = env.action_space.nvec
        place = mask[-nv[-1]:]
        a[-1] = rng.choice(np.flatnonzero(place))
    return a


@pytest.mark.parametrize("env_id", IDS)
def test_check_env_clean(env_id):
    env = gym.make(env_id).unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)
        sb3_check_env(env)


@pytest.mark.parametrize("env_id", TRAIN_IDS)
def test_same_seed_same_rollout(env_id):
    def rollout():
        env = gym.make(env_id).unwrapped
        obs, _ = env.reset(seed=123)
        rng = np.random.default_rng(7)
        out = [obs]
        rewards = []
        for _ in range(40):
            obs, r, _, trunc, info = env.step(_legal_random_action(env, rng))
            out.append(obs)
            rewards.append((r, info["energy_j"], info["slo_violations"]))
            if trunc:
                break
        return np.array(out), rewards

    a_obs, a_r = rollout()
    b_obs, b_r = rollout()
    np.testing.assert_array_equal(a_obs, b_obs)
    assert a_r == b_r


def test_different_seeds_differ():
    env = gym.make("LLMCluster/Energy-small-v0").unwrapped
    a = env.codec.encode(env.layout.initial_pools)
    env.reset(seed=1)
    e1 = [env.step(a)[4]["energy_j"] for _ in range(5)]
    env.reset(seed=2)
    e2 = [env.step(a)[4]["energy_j"] for _ in range(5)]
    assert e1 != e2


@pytest.mark.parametrize("env_id", ["LLMCluster/Combined-small-v0", "LLMCluster/Energy-v0"])
def test_pickle_round_trip_continues_identically(env_id):
    env = gym.make(env_id).unwrapped
    env.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(3):
        env.step(_legal_random_action(env, rng))
    clone = pickle.loads(pickle.dumps(env))
    action = _legal_random_action(env, rng)
    o1, r1, *_ = env.step(action)
    o2, r2, *_ = clone.step(action)
    np.testing.assert_array_equal(o1, o2)
    assert r1 == r2


@pytest.mark.parametrize("env_id", TRAIN_IDS)
def test_info_keys_same_at_reset_and_step_and_terms_sum(env_id):
    env = gym.make(env_id).unwrapped
    _, info0 = env.reset(seed=0)
    _, reward, _, _, info1 = env.step(_legal_random_action(env, np.random.default_rng(0)))
    assert set(info0) == set(info1)
    for key in ("energy_j", "thermal_throttle_events", "power_throttle_events", "slo_violations",
                "ttft_p99_s", "tbt_p99_s", "cost_energy", "reward_slo"):
        assert key in info1
    terms = sum(v for k, v in info1.items() if k.startswith("reward_"))
    assert reward == pytest.approx(terms)
    assert info1["energy_j"] > 0


def test_trace_end_is_truncation_not_termination():
    env = gym.make("LLMCluster/Energy-small-v0").unwrapped
    env.reset(seed=0)
    a = env.codec.encode(env.layout.initial_pools)
    steps = 0
    while True:
        _, _, term, trunc, _ = env.step(a)
        steps += 1
        assert not term
        if trunc:
            break
    s = env.backend.scenario
    assert steps == int(np.ceil(s.duration_s / s.control_interval_s))


def test_invalid_actions_raise_clear_errors():
    env = gym.make("LLMCluster/Combined-small-v0").unwrapped
    env.reset(seed=0)
    good = _legal_random_action(env, np.random.default_rng(0))
    bad = good.copy()
    bad[0] = env.action_space.nvec[0]
    with pytest.raises(InvalidActionError, match=r"action\[0\].*outside"):
        env.step(bad)
    with pytest.raises(InvalidActionError, match="NaN"):
        env.step(np.where(np.arange(len(good)) == 1, np.nan, good.astype(float)))
    with pytest.raises(InvalidActionError, match="shape"):
        env.step(good[:-1])


def test_masked_placement_is_never_executed():
    env = gym.make("LLMCluster/Thermal-small-v0").unwrapped
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        mask = env.action_masks()
        place_mask = mask[-env.action_space.nvec[-1]:]
        legal = place_mask[:-1]
        a = _legal_random_action(env, rng)
        occupied_before = env.backend.vms.occupied().copy()
        if legal.any() and (~legal).any():
            illegal = int(np.flatnonzero(~legal)[0])
            a[-1] = illegal
            _, _, _, trunc, info = env.step(a)
            assert info["placement_masked"] == 1.0
            # nothing was placed on the masked server by the action
            if not occupied_before[illegal]:
                placed_there = env.backend.vms.occupied()[illegal]
                assert not (placed_there and env.backend.layout.server_is_saas[illegal])
            checked += 1
        else:
            _, _, _, trunc, _ = env.step(a)
        if trunc:
            break
    assert checked > 0
    assert not env.backend.vms.occupied()[env.layout.server_is_saas].any()


def test_reward_weights_are_constructor_arguments():
    env = ClusterEnv(task="energy", reward_weights={"energy": 0.0, "slo": 0.0})
    env.reset(seed=0)
    _, r, *_ = env.step(env.codec.encode(env.layout.initial_pools))
    assert r == 0.0


def test_render_modes():
    env = gym.make("LLMCluster/Thermal-small-v0", render_mode="ansi").unwrapped
    env.reset(seed=0)
    env.step(_legal_random_action(env, np.random.default_rng(0)))
    text = env.render()
    assert "rows" in text and "aisles" in text and "SLO" in text
    env = gym.make("LLMCluster/Thermal-small-v0", render_mode="rgb_array").unwrapped
    env.reset(seed=0)
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] >= env.layout.n_rows * 10
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2


@pytest.mark.slow
def test_subproc_vec_env():
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv

    venv = make_vec_env("llm_cluster_gym:LLMCluster/Energy-small-v0", n_envs=2, seed=0,
                        vec_env_cls=SubprocVecEnv)
    try:
        obs = venv.reset()
        assert obs.shape == (2, venv.observation_space.shape[0])
        actions = np.stack([venv.action_space.sample() for _ in range(2)])
        obs, rewards, dones, infos = venv.step(actions)
        assert rewards.shape == (2,) and "energy_j" in infos[0]
    finally:
        venv.close()


# ---------------------------------------------------------------- strictness (issue 16)
def _short_env(duration_s: float = 15.0) -> ClusterEnv:
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.scenario import load_scenario

    scenario = load_scenario("small").with_overrides(duration_s=duration_s)
    return ClusterEnv(task="energy", backend=SimCluster(scenario, serving_model="aggregate"))


def test_step_after_truncation_or_before_reset_raises():
    from gymnasium.error import ResetNeeded

    env = _short_env()
    with pytest.raises(ResetNeeded, match=r"reset\(\) before step"):
        env.step(None)
    env.reset(seed=0)
    truncated = [env.step(None)[3] for _ in range(3)]
    assert truncated == [False, False, True]
    t_end = env.last_telemetry.time_s
    with pytest.raises(ResetNeeded, match="truncated after 3 steps"):
        env.step(None)
    assert env.last_telemetry.time_s == t_end  # nothing was simulated
    env.reset(seed=1)
    assert env.step(None)[3] is False


def test_reset_refuses_unknown_options():
    env = _short_env()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['backend_sed'\].*backend_seed"):
        env.reset(seed=0, options={"backend_sed": 3})
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="'backend_seed' must be an integer >= 0"):
            env.reset(options={"backend_seed": bad})
    env.reset(seed=0, options={})
    a = env.reset(seed=0, options={"backend_seed": 5})[0]
    b = env.reset(seed=9, options={"backend_seed": 5})[0]
    np.testing.assert_array_equal(a, b)  # the backend seed alone sets the episode
    env.reset(seed=0, options={"backend_seed": None})  # None: drawn from the env's generator


def test_vec_env_resets_itself_across_episode_ends():
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([lambda: Monitor(_short_env())])
    venv.seed(0)
    venv.reset()
    dones = [bool(venv.step(np.zeros((1, len(venv.action_space.nvec)), dtype=np.int64))[2][0])
             for _ in range(7)]
    assert dones == [False, False, True, False, False, True, False]
    venv.close()
