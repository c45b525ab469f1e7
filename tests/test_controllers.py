"""Rule-based controllers: real behaviour on the request-level simulator."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llm_cluster_gym.controllers.base import Controller
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.dynamo import DynamoController
from llm_cluster_gym.controllers.forecast import LoadForecaster
from llm_cluster_gym.controllers.oracle import OracleController
from llm_cluster_gym.controllers.perfmodel import predict_pool
from llm_cluster_gym.controllers.registry import make_controller
from llm_cluster_gym.controllers.static import StaticController, split_levels
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.controllers.unaware import UnawareController
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.rollout import run_episode, skip_warmup
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario

WARMUP = 12


def _episode(task: str, scenario, name: str, seed: int = 0) -> dict[str, float]:
    backend = SimCluster(scenario, serving_model="request", record_ticks=True,
                         auto_place_vms=task == "energy")
    env = ClusterEnv(task=task, backend=backend)
    result = run_episode(env, make_controller(name, env), seed)
    return skip_warmup(result, WARMUP).summary()


@pytest.fixture(scope="module")
def energy_env():
    return ClusterEnv(task="energy", scenario="small", serving_model="request")


def test_split_levels_sums_and_floors():
    out = split_levels(np.array([0.4, 0.4, 0.2]), 4)
    assert out.sum() == 4 and (out >= 1).all()
    assert split_levels(np.array([0.0, 1.0]), 8).tolist() == [1, 7]


def test_every_controller_implements_the_protocol(energy_env):
    ctx = ControllerContext.from_env(energy_env)
    obs, _ = energy_env.reset(seed=0)
    for c in (StaticController(ctx), UnawareController(ctx), DynamoController(ctx),
              OracleController(ctx, energy_env)):
        assert isinstance(c, Controller)
        c.reset()
        a = c.act(obs, energy_env.action_masks())
        assert energy_env.action_space.contains(a)


def test_static_is_tp8_max_clock_peak_split(energy_env):
    ctx = ControllerContext.from_env(energy_env)
    action, _ = ctx.codec.decode(StaticController(ctx).act(np.zeros(1)), np.zeros(4, bool))
    top_batch = max(ctx.layout.batch_choices)
    assert all(p.tp == 8 and p.freq_mhz == 1980 and p.max_batch == top_batch for p in action.pools)
    assert sum(p.n_instances for p in action.pools) == 4  # every SaaS server in use


def test_perf_model_monotone_in_instances_and_clock(energy_env):
    ctx = ControllerContext.from_env(energy_env)
    prof, s = ctx.profiles[4], ctx.pool_stats
    pred = predict_pool(prof, 3.0, np.array([1, 2, 4]), 1980.0, 64, s.mean_input_tokens[1],
                        s.p90_input_tokens[1], s.mean_output_tokens[1], s.mean_input_all)
    assert np.all(np.diff(pred.ttft_s) < 0) and pred.feasible[-1]
    slow = predict_pool(prof, 3.0, 2, np.array([800.0, 1980.0]), 64, s.mean_input_tokens[1],
                        s.p90_input_tokens[1], s.mean_output_tokens[1], s.mean_input_all)
    assert slow.gpu_power_w[0] < slow.gpu_power_w[1] and slow.ttft_s[0] > slow.ttft_s[1]


def test_forecaster_follows_a_ramp():
    f = LoadForecaster(np.array([1.0]))
    for k in range(20):
        f.update(np.array([2.0 + 0.5 * k]))
    assert abs(f.forecast(1)[0] - (2.0 + 0.5 * 20)) < 0.5
    assert f.peak(3)[0] >= 2.0 + 0.5 * 19


@pytest.mark.slow
def test_dynamo_saves_energy_against_static_at_the_same_slo():
    scenario = load_scenario("small").with_overrides(duration_s=300.0)
    static = _episode("energy", scenario, "static")
    dynamo = _episode("energy", scenario, "dynamo")
    assert dynamo["energy_kwh"] < 0.85 * static["energy_kwh"]
    # Within a point. Issue-17 physics, 300 s of `small`, seed 0: static 98.4%, the manager
    # 98.2% at 35% less energy while it costed dynamic power only; since it costs its servers'
    # whole power (issue 18: scale-in), 97.7% at 35% less (request level, seeds 0-2: static
    # 98.3-98.8%, the manager 97.9-98.4%); its re-shards cost about a minute each.
    assert dynamo["slo_attainment"] >= static["slo_attainment"] - 0.01


@pytest.mark.slow
def test_oracle_uses_less_energy_than_static():
    scenario = load_scenario("small").with_overrides(duration_s=150.0)
    static = _episode("energy", scenario, "static")
    oracle = _episode("energy", scenario, "oracle")
    assert oracle["energy_kwh"] < 0.85 * static["energy_kwh"]


@pytest.mark.slow
def test_tapas_cuts_throttling_against_unaware_at_high_oversubscription():
    events = {"unaware": 0.0, "tapas": 0.0}
    for seed in (0, 1, 2, 3):  # enough episodes for at least 10 baseline events
        for name in events:
            s = _episode("thermal", "small_tapas_high", name, seed)
            events[name] += s["thermal_throttle_events"] + s["power_throttle_events"]
            if name == "tapas":
                assert s["slo_attainment"] > 0.8
    assert events["unaware"] >= 10
    assert events["tapas"] <= 0.5 * events["unaware"]


@pytest.mark.slow
def test_tapas_places_vms_on_legal_servers_with_headroom():
    env = ClusterEnv(task="thermal", scenario="small_tapas_high", serving_model="request")
    ctx = ControllerContext.from_env(env)
    c = TapasController(ctx)
    c.reset()
    obs, _ = env.reset(seed=2)
    placed = 0
    for _ in range(60):
        mask = env.action_masks()
        a = c.act(obs, mask)
        legal = ctx.legal_servers(mask)
        if legal.any():
            assert legal[a[-1]]
            placed += 1
        obs, _, _, _, info = env.step(a)
        assert info["placement_masked"] == 0.0
    assert env.action_space.contains(a)


def test_tapas_routes_nothing_to_an_aisle_that_lost_cooling():
    """small_faults: aisle 0 keeps 25% of its cooling from 120 s to 360 s. While the failure is in
    force its rows get no new requests (the other aisle takes them); before it they do."""
    env = ClusterEnv(task="thermal", scenario="small_faults", serving_model="aggregate")
    ctx = ControllerContext.from_env(env)
    c = TapasController(ctx)
    c.reset()
    obs, _ = env.reset(seed=0)
    aisle0_rows = np.unique(ctx.layout.server_row[ctx.layout.server_aisle == 0])
    before, during = [], []
    for step in range(80):  # 400 s
        mask = env.action_masks()
        action = c.decide(obs, mask)
        t_s = step * 5.0  # small_faults: control_interval_s 5
        weights = np.asarray(action.row_route_weight)
        if t_s < 110:
            before.append(weights[aisle0_rows].max())
        elif 130 <= t_s < 350:
            during.append(weights[aisle0_rows].max())
            assert weights.max() > 0  # the other aisle still serves
        obs, _, _, _, _ = env.step(ctx.codec.encode_action(action))
    assert min(before) > 0
    assert during and max(during) == 0
    # The threshold is the controller's: an aisle at 25% counts as lost only below a fraction
    # above 0.25; a bad fraction is refused.
    lax = TapasController(ctx, cooling_lost_below=0.2)
    lax.reset()
    obs, _ = env.reset(seed=0)
    for _ in range(30):  # into the failure (150 s)
        action = lax.decide(obs, env.action_masks())
        obs, _, _, _, _ = env.step(ctx.codec.encode_action(action))
    assert not lax._cooling_lost_rows(obs).any()
    assert c._cooling_lost_rows(obs)[aisle0_rows].all()
    with pytest.raises(ValueError, match="cooling_lost_below"):
        TapasController(ctx, cooling_lost_below=0.0)


def test_registry_rejects_unknown_and_mismatched(energy_env):
    with pytest.raises(ValueError, match="unknown controller"):
        make_controller("nope", energy_env)
    with pytest.raises(ValueError, match="row actions"):
        make_controller("tapas", energy_env)
    shielded = make_controller("shield:static", energy_env)
    assert shielded.name == "shield(static)"


def test_dynamo_predicts_the_servers_the_codec_executes():
    """The DynamoLLM manager's model uses the servers that really run, not floored shares.

    On 48 SaaS servers (K = 32 levels of 1.5 servers) decode hands out remainders.
    """
    sc = load_scenario("small").with_overrides(duration_s=300.0)
    sc = sc.with_overrides(datacenter=dataclasses.replace(sc.datacenter, servers_per_rack=24))
    env = ClusterEnv(task="energy", backend=SimCluster(sc, serving_model="aggregate",
                                                       auto_place_vms=True))
    ctx = ControllerContext.from_env(env)
    codec = ctx.codec
    assert (codec.n_saas_servers, codec.share_levels) == (48, 32)
    c = DynamoController(ctx)
    c.reset()
    obs, _ = env.reset(seed=0)
    floored_wrong = 0
    for _ in range(40):
        a = c.act(obs, env.action_masks())
        obs, *_ = env.step(a)
        executed = codec.pool_servers(env.pools)
        np.testing.assert_array_equal(executed, c.servers)
        levels = codec.share_levels_for(executed)
        floored = np.floor(levels / codec.share_levels * codec.n_saas_servers + 1e-9)
        floored_wrong += not np.array_equal(floored, executed)
    assert floored_wrong > 0  # the episode does run layouts a floored share would mispredict
