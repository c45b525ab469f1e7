"""The batched DynamoLLM-style manager decides, copy by copy, what the single manager decides."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.dynamo import DynamoController
from llm_cluster_gym.controllers.dynamo_batched import BatchedDynamoManager
from llm_cluster_gym.controllers.forecast import BatchedLoadForecaster, LoadForecaster
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.envs.vector_env import BatchedClusterEnv
from llm_cluster_gym.scripts.dynamo_week import DAY_S, window_scenario


def test_batched_forecaster_follows_each_copys_own_forecaster():
    rng = np.random.default_rng(0)
    prior = np.array([3.0, 7.0])
    single = [LoadForecaster(prior, window=4) for _ in range(3)]
    batched = BatchedLoadForecaster(prior, 3, window=4)
    for step in range(15):
        x = rng.uniform(0, 20, (3, 2))
        on = rng.random(3) < 0.7
        if step == 9:  # one copy starts over
            single[1].reset()
            batched.reset(np.array([False, True, False]))
        batched.update(x, on)
        for i in np.flatnonzero(on):
            single[i].update(x[i])
        for i in range(3):
            np.testing.assert_array_equal(batched.forecast(2)[i], single[i].forecast(2))
            np.testing.assert_array_equal(batched.peak(3)[i], single[i].peak(3))


def _week_window(minutes: float):
    return window_scenario(load_scenario("dynamo_week"), 2 * DAY_S + 14 * 3600.0, 0.0, minutes * 60.0)


@pytest.mark.parametrize("kwargs", [{"slo_margin": 0.6, "peak_headroom": 1.0}, {}])
def test_batched_manager_decides_what_each_copys_manager_decides(kwargs):
    """Four copies of a week window (Tuesday afternoon, its peak) stepped on the batched simulator:
    every interval each copy's instances, TP, clock and batch cap equal those of its own
    `DynamoController` fed the same observations, across several re-plannings and a reset."""
    s = _week_window(10.0)
    n = 4
    venv = BatchedClusterEnv(num_envs=n, scenario=s)
    single_env = ClusterEnv(task="energy", backend=SimCluster(s, serving_model="aggregate"))
    ctx = ControllerContext.from_env(single_env)
    singles = [DynamoController(ctx, **kwargs) for _ in range(n)]
    batched = BatchedDynamoManager(ctx, n, **kwargs)
    obs, _ = venv.reset(seed=3)
    changes, layouts = 0, set()
    for step in range(2 * venv.max_episode_steps // 3):
        if step == 40:  # copy 2 starts over (as at its episode's end)
            singles[2].reset()
            batched.reset(np.arange(n) == 2)
        inst, tp, freq, batch = batched.next_pools(obs)
        actions = []
        for i, c in enumerate(singles):
            pools = c.next_pools(obs[i])
            np.testing.assert_array_equal(inst[i], [p.n_instances for p in pools])
            np.testing.assert_array_equal(tp[i], [p.tp for p in pools])
            np.testing.assert_array_equal(freq[i], [p.freq_mhz for p in pools])
            np.testing.assert_array_equal(batch[i], [p.max_batch for p in pools])
            actions.append(ctx.codec.encode_action(ctx.uncapped_action(pools, None)))
        changes += int(np.any(freq != freq[:1]))
        layouts.update(tuple(x) for x in inst)
        obs, *_ = venv.step(np.array(actions))
    assert changes > 10  # the copies' clocks differ: not one decision repeated four times
    assert len(layouts) >= 2  # and re-planning moved servers between pools


def test_batched_manager_refuses_a_task_without_pools():
    env = ClusterEnv(task="thermal", scenario="small_tapas")
    with pytest.raises(ValueError, match="pool actions"):
        BatchedDynamoManager(ControllerContext.from_env(env), 2)
