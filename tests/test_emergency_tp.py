"""The TAPAS-style controller's TP rung under emergencies (issue 19).

Cheapest first: clock ceilings, then a pool's TP (where the performance model predicts less
power on the same GPUs within the SLOs), then quantization, which waits while a TP change takes
effect; released in reverse order. Runs on `small_tapas_high` (1.6x oversubscribed: its rows
stay tight at low clocks), combined task, TAPAS rows without a pool manager, so the pools are the
scenario's unless the rung changes them.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.envs.backend import PoolConfig
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario


@cache
def scenario_at_tp(tp: int):
    """small_tapas_high with its SaaS servers serving at TP `tp` (same servers, same GPUs)."""
    sc = load_scenario("small_tapas_high")
    pool, gpus = sc.serving.pools[0], sc.datacenter.server.gpus
    servers = pool.n_instances * pool.tp // gpus
    return sc.with_overrides(serving=dataclasses.replace(
        sc.serving, pools=(dataclasses.replace(pool, tp=tp, n_instances=servers * (gpus // tp)),)))


Run = tuple[list[np.ndarray], list[tuple[PoolConfig, ...]], list[bool], TapasController]


def run(tp: int, **kwargs) -> Run:
    """One episode (seed 0): the rung's holds, the pools in force and whether any row quantized."""
    env = ClusterEnv(task="combined", backend=SimCluster(scenario_at_tp(tp), serving_model="aggregate"))
    ctl = TapasController(ControllerContext.from_env(env), **kwargs)
    obs, _ = env.reset(seed=0)
    ctl.reset()
    holds, pools, quant = [], [], []
    done = False
    while not done:
        obs, _, term, trunc, _ = env.step(ctl.act(obs, env.action_masks()))
        holds.append(ctl.tp_hold.copy())
        pools.append(env.pools)
        quant.append(bool(ctl.quant.any()))
        done = term or trunc
    return holds, pools, quant, ctl


@cache
def run_cached(tp: int, tp_min_saving: float):
    return run(tp, tp_min_saving=tp_min_saving)


def test_rung_moves_a_small_tp_pool_to_the_least_power_tp_before_quantizing():
    holds, pools, quant, ctl = run_cached(2, 0.05)
    held = [i for i, h in enumerate(holds) if h[0]]
    assert held, "rows tight at a low clock: the rung should have acted"
    first = held[0]
    assert holds[first][0] == 8  # fewest, largest instances: the weights read least per token
    # Same GPUs: 16 TP 2 instances become 4 TP 8 instances once the env's time scale allows.
    assert any(p[0].tp == 8 and p[0].n_instances == 4 for p in pools[first:])
    # Quantization waits while the TP change takes effect.
    settle = ctl.ctx.reconfig_every
    assert not any(quant[first: first + settle])
    # Without the rung, quantization comes earlier.
    _, _, quant_off, _ = run_cached(2, 0.999)
    assert quant_off.index(True) < quant.index(True)


def test_rung_holds_nothing_where_the_pool_already_runs_its_least_power_tp():
    holds, pools, quant, _ = run_cached(8, 0.05)
    assert any(quant)  # rows were tight enough to reach the later rungs
    assert not any(h.any() for h in holds)
    assert all(p[0].tp == 8 for p in pools)


def test_rung_is_skipped_where_the_task_has_no_pool_actions():
    env = ClusterEnv(task="thermal", backend=SimCluster(scenario_at_tp(2), serving_model="aggregate"))
    ctl = TapasController(ControllerContext.from_env(env))
    obs, _ = env.reset(seed=0)
    for _ in range(40):
        obs, *_ = env.step(ctl.act(obs, env.action_masks()))
    assert not ctl.tp_hold.any() and env.pools[0].tp == 2


def test_tp_min_saving_is_checked():
    env = ClusterEnv(task="combined", backend=SimCluster(scenario_at_tp(8), serving_model="aggregate"))
    with pytest.raises(ValueError, match="tp_min_saving must be in"):
        TapasController(ControllerContext.from_env(env), tp_min_saving=1.0)
