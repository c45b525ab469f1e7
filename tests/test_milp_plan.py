"""The offline MILP over the horizon (controllers/milp_plan.py) on a short `dynamo_week`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.milp_plan import (
    PlanController,
    episode_rates,
    planning_tables,
    round_up_split,
    solve_plan,
)
from llm_cluster_gym.controllers.perfmodel import predict_pool
from llm_cluster_gym.controllers.registry import make_controller
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.rollout import run_measured
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario


@pytest.fixture(scope="module")
def scenario():
    return dataclasses.replace(load_scenario("dynamo_week"), duration_s=600.0)


@pytest.fixture(scope="module")
def env(scenario):
    e = ClusterEnv(task="energy", backend=SimCluster(scenario, serving_model="aggregate"))
    e.reset(seed=0)
    return e


@pytest.fixture(scope="module")
def ctx(env):
    return ControllerContext.from_env(env)


@pytest.fixture(scope="module")
def tables(ctx):
    return planning_tables(ctx)


@pytest.fixture(scope="module")
def rates(env):
    desc = env.unwrapped.backend.describe()
    return episode_rates(desc.arrival_oracle, 0.0, desc.episode_intervals, 5.0, 24)


def _check_solution(tb, res, rates_rps, splits=None):
    scap = tb.server_cap_rps[None]
    assert np.all(res.rate_rps <= scap * res.servers * (1 + 1e-6) + 1e-6)  # capacity
    assert np.allclose(res.rate_rps.sum(axis=2), rates_rps, rtol=1e-6, atol=1e-6)  # all served
    assert np.all(res.rate_rps >= -1e-9) and np.all(res.servers >= -1e-9)
    per_pool = res.servers.sum(axis=2)
    if "continuous servers" in res.what:  # the LP: whole servers are its shares rounded up
        assert np.all((per_pool <= res.pool_servers + 1e-6) & (res.pool_servers < per_pool + 1))
    else:
        assert np.allclose(per_pool, res.pool_servers, atol=1e-6)
    assert np.all(res.pool_servers.sum(axis=1) <= tb.n_servers)
    if res.form == "executable":
        assert np.all((res.servers > 0).sum(axis=2) <= 1)  # one configuration per pool
        assert np.allclose(res.servers, np.rint(res.servers))
    if splits is not None:
        allowed = {tuple(row) for row in np.asarray(splits).tolist()}
        assert all(tuple(row) in allowed for row in res.pool_servers.tolist())


def test_linear_cost_lies_under_the_planning_model(ctx, tables):
    """n * base + x * slope <= n * S(x / n) for every configuration on a fine load grid."""
    lay, st_, server = ctx.layout, ctx.pool_stats, ctx.server
    gpus = lay.gpus_per_server
    for p in range(tables.n_pools):
        for c in np.flatnonzero(tables.cap_rps[p] > 0):
            tp = int(tables.tp[c])
            prof = ctx.profiles[tp]
            lam = np.linspace(0.0, tables.cap_rps[p, c], 1001)
            pred = predict_pool(prof, lam, 1, tables.freq_mhz[c], tables.max_batch,
                                st_.mean_input_tokens[p], st_.p90_input_tokens[p],
                                st_.mean_output_tokens[p], st_.mean_input_all)
            assert pred.feasible.all()  # the cap lies inside the SLO region
            assert np.all(pred.ttft_s <= lay.slo_ttft_s[p] + 1e-12)
            assert np.all(pred.tbt_s <= lay.slo_tbt_s[p] + 1e-12)
            s_w = server.server_power_w(gpus * pred.gpu_power_w, prof.idle_power_w)
            linear = tables.base_server_w[c] + lam * tables.instances_per_server[c] \
                * tables.server_j_per_req[p, c]
            assert np.all(linear <= s_w * (1 + 1e-6) + 1e-6), (p, c)
            gpu_linear = tables.base_gpu_w[c] + lam * tables.instances_per_server[c] \
                * tables.gpu_j_per_req[p, c]
            assert np.all(gpu_linear <= gpus * pred.gpu_power_w * (1 + 1e-6) + 1e-6), (p, c)


def test_episode_rates_mean_and_peak(env, rates):
    desc = env.unwrapped.backend.describe()
    raw = desc.arrival_oracle(0.0, desc.episode_intervals, 5.0)
    assert rates.n_periods == 5 and rates.mean_rps.shape == (5, 3)
    assert np.allclose(rates.mean_rps, raw.reshape(5, 24, 3).mean(axis=1))
    assert np.allclose(rates.peak_rps, raw.reshape(5, 24, 3).max(axis=1))
    assert np.all(rates.mean_rps <= rates.peak_rps) and np.allclose(rates.duration_s, 120.0)
    short = episode_rates(desc.arrival_oracle, 0.0, 30, 5.0, 24)  # last period: 6 intervals
    assert short.duration_s.tolist() == [120.0, 30.0]
    assert np.allclose(short.mean_rps[1], raw[24:30].mean(axis=0))
    assert rates.period_of(0.0) == 0 and rates.period_of(239.9) == 1 and rates.period_of(1e9) == 4


def test_relaxed_is_below_executable_and_constraints_hold(ctx, tables, rates):
    relaxed = solve_plan(tables, rates.mean_rps, rates.duration_s, "relaxed")
    lp = solve_plan(tables, rates.mean_rps, rates.duration_s, "relaxed", integral_servers=False)
    same = solve_plan(tables, rates.mean_rps, rates.duration_s, "executable")
    exe = solve_plan(tables, rates.peak_rps, rates.duration_s, "executable")
    splits = ctx.codec.server_splits()
    in_codec = solve_plan(tables, rates.peak_rps, rates.duration_s, "executable", splits=splits)
    for res, r in ((relaxed, rates.mean_rps), (lp, rates.mean_rps), (same, rates.mean_rps),
                   (exe, rates.peak_rps)):
        _check_solution(tables, res, r)
    _check_solution(tables, in_codec, rates.peak_rps, splits)
    assert relaxed.status == "optimal" and exe.status == "optimal"
    assert lp.bound_server_energy_j <= relaxed.bound_server_energy_j * (1 + 1e-9)
    assert relaxed.bound_server_energy_j <= relaxed.server_energy_j
    assert relaxed.server_energy_j <= same.server_energy_j * (1 + 1e-4)
    assert same.server_energy_j <= exe.server_energy_j
    assert exe.server_energy_j <= in_codec.server_energy_j * (1 + 1e-4)
    assert 0 < exe.gpu_energy_j < exe.server_energy_j
    assert np.isclose(exe.period_server_energy_j.sum(), exe.server_energy_j)
    assert "planning-model" in relaxed.what and "not a bound of the simulator" in relaxed.what


def test_reshard_charge_never_adds_tp_changes(ctx, tables, rates):
    splits = ctx.codec.server_splits()
    free = solve_plan(tables, rates.peak_rps, rates.duration_s, "executable", splits=splits)
    charged = solve_plan(tables, rates.peak_rps, rates.duration_s, "executable", splits=splits,
                         reshard_j_per_server=np.full(tables.n_configs, 1e9))
    _check_solution(tables, charged, rates.peak_rps, splits)
    assert charged.tp_changes == 0 <= free.tp_changes
    assert charged.server_energy_j >= free.server_energy_j * (1 - 1e-9)


def test_zero_rate_powers_nothing(ctx, tables):
    zero = np.zeros((3, tables.n_pools))
    standby_j = 3 * 60.0 * tables.n_servers * tables.standby_w  # every server off all along
    for form, splits in (("relaxed", None), ("executable", None),
                         ("executable", ctx.codec.server_splits())):
        res = solve_plan(tables, zero, 60.0, form, splits=splits)
        assert res.servers.sum() == 0 and res.pool_servers.sum() == 0
        assert res.gpu_energy_j == 0.0 and np.isclose(res.server_energy_j, standby_j)


def test_rate_beyond_the_cluster_names_period_and_pool(tables):
    r = np.full((3, tables.n_pools), 1.0)
    r[1, 2] = 1.01 * tables.server_cap_rps[2].max() * tables.n_servers
    for form in ("relaxed", "executable"):
        with pytest.raises(ValueError, match=r"period 1, pool 2"):
            solve_plan(tables, r, 60.0, form)
    # each pool fits alone, together they do not: HiGHS says which period
    r = np.zeros((2, tables.n_pools))
    r[1] = 0.6 * tables.server_cap_rps.max(axis=1) * tables.n_servers
    with pytest.raises(ValueError, match=r"period 1"):
        solve_plan(tables, r, 60.0, "relaxed")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.lists(st.floats(0.0, 0.15), min_size=3, max_size=3))
def test_doubling_the_rates_never_lowers_the_optimum(tables, frac):
    top = tables.server_cap_rps.max(axis=1) * tables.n_servers
    r = (np.array(frac) * top)[None, :]
    for form in ("relaxed", "executable"):
        one = solve_plan(tables, r, 60.0, form, mip_rel_gap=1e-9)
        two = solve_plan(tables, 2 * r, 60.0, form, mip_rel_gap=1e-9)
        assert two.server_energy_j >= one.server_energy_j * (1 - 1e-7)
        assert two.bound_server_energy_j >= one.bound_server_energy_j * (1 - 1e-6)


def test_round_up_split():
    splits = np.array([[0, 0], [4, 0], [0, 4], [4, 4], [8, 0], [8, 4]])
    assert round_up_split([3, 1], splits).tolist() == [4, 4]
    assert round_up_split([5, 0], splits).tolist() == [8, 0]
    assert round_up_split([9, 0], splits) is None


def test_registry_builds_the_plan_controller(env):
    assert isinstance(make_controller("milp", env), PlanController)


def test_plan_controller_runs_an_episode_with_executable_actions(scenario):
    made = {}

    def make(e):
        c = PlanController(ControllerContext.from_env(e), e, period_s=120.0, compute_bound=True)
        decide = c.decide

        def checked(obs, mask=None):
            action = decide(obs, mask)
            vec = c.ctx.codec.encode_action(action)
            assert e.action_space.contains(vec)
            assert c.ctx.codec.decode(vec, np.zeros(e.layout.n_servers, bool))[0].pools == action.pools
            made.setdefault("pools", []).append(action.pools)
            return action

        c.decide = checked
        made["c"] = c
        return c

    result, summary = run_measured("energy", scenario, "aggregate", make, 0, 0)
    c = made["c"]
    assert result.n_intervals == 120 and len(made["pools"]) == 120
    assert c.plan is not None and c.plan.form == "executable" and c.plan.pool_servers.shape == (5, 3)
    assert c.bound.bound_server_energy_j <= c.plan.server_energy_j
    # every interval runs at least the servers the plan gives its period (more ahead of a
    # period that needs more), at the plan's TP degrees outside the lead windows
    used = np.array([c.ctx.codec.pool_servers(pools) for pools in made["pools"]])
    period = np.arange(120) // 24
    assert np.all(used >= c.plan.pool_servers[period])
    cfg, _ = c.plan.pool_choice(4)
    assert [p.tp for p in made["pools"][-1]] == [int(c.tables.tp[k]) for k in cfg]
    assert summary["energy_kwh"] > 0 and summary["slo_attainment"] > 0.5


def test_plan_controller_plans_an_overloaded_period_at_what_the_cluster_serves(scenario):
    heavy = scenario.with_overrides(workload=dataclasses.replace(scenario.workload, rps_per_gpu=2.5))
    e = ClusterEnv(task="energy", backend=SimCluster(heavy, serving_model="aggregate"))
    c = PlanController(ControllerContext.from_env(e), e, period_s=120.0)
    obs, _ = e.reset(seed=0)
    c.reset()
    assert e.action_space.contains(c.act(obs, e.action_masks()))
    assert c.clipped  # the peaks are beyond the cluster: planned at the largest servable share
    with pytest.raises(ValueError, match="period"):
        solve_plan(c.tables, c.rates.peak_rps, c.rates.duration_s, "executable", splits=c.splits)
    served = c.plan.rate_rps.sum(axis=2)
    assert np.all(served <= c.rates.peak_rps + 1e-9)
    assert np.all(served[c.clipped] < c.rates.peak_rps[c.clipped])
