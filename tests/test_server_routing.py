"""Routing per SaaS instance (`serving.route_per_server`, issue 19).

Off by default (the golden digests keep every other scenario's spaces and trajectories); where a
scenario sets it, the thermal and combined tasks get one routing level per SaaS server between
the row block and the placement slots, the observation shows each SaaS server's hottest GPU and
weight, the simulator sends an instance new work in proportion to its row's weight x its
server's, and the TAPAS-style controller steers work inside a row away from hot servers.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.shield import Shield
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.envs.actions import ROUTE_WEIGHT_LEVELS, InvalidActionError
from llm_cluster_gym.envs.backend import ClusterAction
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario


@cache
def routed_scenario():
    """small_tapas with 2 rows of 8 servers (4 SaaS per row), routing per SaaS server."""
    sc = load_scenario("small_tapas")
    return sc.with_overrides(
        duration_s=300.0,
        datacenter=dataclasses.replace(sc.datacenter, rows=2, servers_per_rack=8),
        serving=dataclasses.replace(sc.serving, route_per_server=True))


def routed_env(task: str = "thermal", serving_model: str = "aggregate") -> ClusterEnv:
    return ClusterEnv(task=task, backend=SimCluster(routed_scenario(), serving_model=serving_model))


def test_default_layouts_have_no_server_block_and_refuse_server_weights():
    env = ClusterEnv(task="thermal", scenario="small_tapas", serving_model="aggregate")
    assert not env.layout.route_per_server and env.codec.route_servers == 0
    assert not any(n.startswith("server[") for n in env.observation_names)
    ctx = ControllerContext.from_env(env)
    action = ctx.uncapped_action(None, env.action_masks())
    with pytest.raises(InvalidActionError, match="server_route_weight.*route_per_server"):
        env.codec.encode_action(dataclasses.replace(action, server_route_weight=np.ones(4)))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="server_route_weight: the scenario does not set"):
        env.backend.apply(ClusterAction(server_route_weight=np.ones(4)))


@pytest.mark.parametrize("task", ["thermal", "combined"])
def test_server_block_sits_between_rows_and_placements(task):
    env = routed_env(task)
    lay, codec = env.layout, env.codec
    saas = lay.saas_servers
    assert codec.route_servers == len(saas) == 8
    nvec = codec.nvec()
    rows_end = (4 * lay.n_pools if codec.has_pools else 0) + 3 * lay.n_rows
    np.testing.assert_array_equal(nvec[rows_end: rows_end + len(saas)], len(ROUTE_WEIGHT_LEVELS))
    assert len(nvec) == rows_end + len(saas) + codec.placement_slots
    names = env.observation_names
    assert names[-2 * len(saas):] == tuple(
        n for s in saas for n in (f"server[{s}].max_gpu_temp", f"server[{s}].route_weight"))


def test_server_levels_decode_encode_and_all_zero_reads_as_even():
    env = routed_env()
    codec = env.codec
    v = np.zeros(len(codec.nvec()), dtype=np.int64)
    v[: 3 * env.layout.n_rows: 3] = 3
    rows_end = 3 * env.layout.n_rows
    v[rows_end: rows_end + 8] = [3, 0, 1, 2, 3, 3, 3, 3]
    v[-1] = env.layout.n_servers  # no placement
    legal = np.zeros(env.layout.n_servers, dtype=bool)
    action, _ = codec.decode(v, legal)
    np.testing.assert_allclose(action.server_route_weight,
                               np.array(ROUTE_WEIGHT_LEVELS)[[3, 0, 1, 2, 3, 3, 3, 3]])
    np.testing.assert_array_equal(codec.encode_action(action), v)
    v[rows_end: rows_end + 8] = 0
    even, _ = codec.decode(v, legal)
    np.testing.assert_array_equal(even.server_route_weight, np.ones(8))
    with pytest.raises(InvalidActionError, match=r"server_route_weight must have shape \(8,\)"):
        codec.encode_action(dataclasses.replace(action, server_route_weight=np.ones(3)))
    with pytest.raises(InvalidActionError, match=r"server_route_weight\[1\]=0.5 is not one of"):
        codec.encode_action(dataclasses.replace(action, server_route_weight=np.array([1, .5] + [1] * 6)))


def test_observation_shows_each_saas_servers_hottest_gpu_and_its_weight():
    env = routed_env()
    ctx = ControllerContext.from_env(env)
    obs, _ = env.reset(seed=0)
    action = ctx.uncapped_action(None, env.action_masks())
    weights = np.array([1.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    for _ in range(3):
        obs, *_ = env.step(env.codec.encode_action(
            dataclasses.replace(action, server_route_weight=weights)))
    lay, tel = env.layout, env.last_telemetry
    hottest = tel.gpu_temp_c.reshape(lay.n_servers, lay.gpus_per_server).max(axis=1)[lay.saas_servers]
    np.testing.assert_allclose(ctx.view.saas_server_max_temp_c(obs), hottest, atol=1e-3)
    i = env.observation_names.index(f"server[{lay.saas_servers[1]}].route_weight")
    np.testing.assert_allclose(obs[i: i + 6: 2], weights[1:4], atol=1e-6)


@pytest.mark.parametrize("serving_model", ["aggregate", "request"])
def test_a_server_at_weight_zero_gets_no_new_work(serving_model):
    """Same row weights; one SaaS server at weight 0: its GPUs fall to idle, its row-mates take the load."""
    env = routed_env(serving_model=serving_model)
    ctx = ControllerContext.from_env(env)
    env.reset(seed=0)
    lay = env.layout
    saas = lay.saas_servers
    weights = np.ones(len(saas))
    weights[0] = 0.0
    action = dataclasses.replace(ctx.uncapped_action(None, env.action_masks()),
                                 server_route_weight=weights, vm_servers=())
    power = []
    for _ in range(24):  # two minutes: the requests it held have finished
        env.step(env.codec.encode_action(action))
        power.append(env.last_telemetry.gpu_power_w.reshape(lay.n_servers, -1).sum(axis=1)[saas])
    late = np.mean(power[-6:], axis=0)
    idle = ctx.profiles[lay.initial_pools[0].tp].idle_power_w * lay.gpus_per_server
    serving = late > 0  # servers holding an instance (packed from the first SaaS server)
    assert serving[0] and np.count_nonzero(serving) >= 2
    assert late[0] < 1.1 * idle  # no new work: idle with its model loaded
    assert late[serving][1:].min() > late[0] + 0.1 * idle


def test_tapas_steers_work_away_from_a_hot_saas_server_and_keeps_the_coolest():
    env = routed_env()
    ctx = ControllerContext.from_env(env)
    ctl = TapasController(ctx)
    obs, _ = env.reset(seed=0)
    lay = env.layout
    saas = lay.saas_servers
    level = ctl._server_routing(obs)
    np.testing.assert_array_equal(level, 3)  # cool floor: nothing to steer
    hot = obs.copy()
    i = env.observation_names.index(f"server[{saas[0]}].max_gpu_temp")
    span = lay.slowdown_temp_c - 40.0
    hot[i] = (lay.slowdown_temp_c - 2.0 - 40.0) / span  # 2 C from slowdown
    hot[i + 2] = (lay.slowdown_temp_c - 6.0 - 40.0) / span  # 6 C
    level = ctl._server_routing(hot)
    assert level[0] == 1 and level[1] == 2 and (level[2:] == 3).all()
    # Every SaaS server of a row hot: the coolest of them keeps full weight.
    row0 = np.flatnonzero(lay.server_row[saas] == lay.server_row[saas[0]])
    for k in row0:
        hot[env.observation_names.index(f"server[{saas[k]}].max_gpu_temp")] = (
            lay.slowdown_temp_c - 1.0 - 40.0 - 0.1 * k) / span
    level = ctl._server_routing(hot)
    assert level[row0].max() == 3 and level[row0[-1]] == 3 and (level[row0[:-1]] == 1).all()
    # And the whole decision goes through the codec and the shield.
    a = ctl.act(hot, env.action_masks())
    decoded, _ = env.codec.decode(a, env._slot_legality())
    np.testing.assert_allclose(decoded.server_route_weight,
                               np.array(ROUTE_WEIGHT_LEVELS)[ctl._server_routing(hot)])
    shield = Shield(TapasController(ctx), ctx, lambda: env.last_telemetry)
    for _ in range(5):  # the shield passes the per-server weights through (or its fallback's)
        a = shield.act(obs, env.action_masks())
        assert env.codec.decode(a, env._slot_legality())[0].server_route_weight.shape == (len(saas),)
        obs, *_ = env.step(a)


def test_tapas_scale_floor_routes_per_server():
    sc = load_scenario("tapas_dc")
    assert sc.serving.route_per_server
