"""TAPAS heeding the shield's forecast (`controllers/tapas_forecast.py`) and `Shield.forecast`."""

from __future__ import annotations

import numpy as np
import pytest

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.registry import make_controller
from llm_cluster_gym.controllers.shield import Shield, heed_forecast_placements
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.controllers.tapas_forecast import TapasForecastController
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.rollout import run_episode
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import load_scenario


def thermal_env(scenario: str = "small_tapas_high") -> ClusterEnv:
    return ClusterEnv(task="thermal", backend=SimCluster(load_scenario(scenario), serving_model="aggregate",
                                                         auto_place_vms=False))


def shielded_run(name: str, seed: int = 0) -> tuple[Shield, dict]:
    env = thermal_env()
    shield = make_controller(f"shield:{name}", env)
    return shield, run_episode(env, shield, seed).summary()


def test_the_shield_lets_tapas_heeding_its_forecast_through_and_overrides_plain_tapas():
    heeding, s_heed = shielded_run("tapas_forecast")
    plain, s_plain = shielded_run("tapas")
    assert heeding.avoidable_override_rate == 0.0
    assert plain.avoidable_override_rate > 0.3
    # It places VMs (the forecast moves them, it does not hold them all) and caps nothing.
    assert s_heed["vm_hours"] > 0.0 and s_heed["power_capped_gpu_s"] <= s_plain["power_capped_gpu_s"]


def test_forecast_counts_nothing_and_a_forecaster_judges_no_action():
    env = thermal_env()
    obs, _ = env.reset(seed=0)
    ctx = ControllerContext.from_env(env)
    forecaster = Shield.forecaster(ctx, env.backend.telemetry)
    base = TapasController(ctx).decide(obs, env.action_masks())
    fc = forecaster.forecast(obs, base, env.action_masks())
    assert forecaster.steps == 0 and forecaster.overrides == 0
    lay = env.layout
    assert fc.safe_row_freq_mhz.shape == (lay.n_rows,) and fc.clock_helps.dtype == bool
    assert set(fc.safe_row_freq_mhz) <= set(lay.freq_choices_mhz)
    assert 0 <= fc.safe_placements <= fc.placements
    assert len(fc.safe_vm_servers) == len(base.vm_servers)
    with pytest.raises(RuntimeError, match="forecast"):
        forecaster.act(obs, env.action_masks())


def test_heeding_keeps_waiting_slots_waiting_and_only_lowers_ceilings():
    env = thermal_env()
    obs, _ = env.reset(seed=0)
    ctx = ControllerContext.from_env(env)
    rule = TapasForecastController(ctx, env.backend.telemetry)
    tapas = TapasController(ctx)
    for _ in range(30):
        mask = env.action_masks()
        base, heeded = tapas.decide(obs, mask), rule.decide(obs, mask)
        assert np.all(np.asarray(heeded.row_freq_cap_mhz) <= np.asarray(base.row_freq_cap_mhz))
        assert all(h is None for b, h in zip(base.vm_servers, heeded.vm_servers, strict=True) if b is None)
        obs, *_ = env.step(ctx.codec.encode_action(heeded))
    forecast = Shield.forecaster(ctx, env.backend.telemetry).forecast(obs, base, None)
    assert forecast.safe_vm_servers is None  # without a mask: placements judged, none moved
    assert heed_forecast_placements((3, None), forecast) == (3, None)


def test_tapas_forecast_needs_row_actions():
    with pytest.raises(ValueError, match="tapas_forecast"):
        make_controller("tapas_forecast", ClusterEnv(task="energy", scenario="small"))
