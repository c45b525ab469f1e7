"""The batched simulator (N copies as arrays) against N single simulators, decision by decision."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig
from llm_cluster_gym.envs.sim.batched import BatchedSimCluster, batch_support_error, stack_topology
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario
from llm_cluster_gym.envs.sim.thermal import ThermalParams
from llm_cluster_gym.envs.sim.topology import build_topology

COMPARED = ("arrived", "finished", "dropped", "in_flight", "tokens_generated", "energy_j",
            "gpu_energy_j", "facility_energy_j", "ttft_p50_s", "ttft_p99_s", "tbt_p50_s",
            "tbt_p99_s", "slo_ttft_violations", "slo_tbt_violations", "slo_violations",
            "thermal_throttle_events", "power_throttle_events", "thermal_throttled_gpu_s",
            "power_capped_gpu_s", "clock_lost_mhz_s", "saas_tokens_lost", "reconfigurations",
            "peak_row_power_w", "max_gpu_temp_c", "carbon_g", "gpu_hours", "servers_powered",
            "slo_attainment")
PER_POOL = ("arrivals_per_pool", "queued_per_pool", "running_per_pool")


def _random_pools(rng, layout, current, step, reconfig_every=12):
    """A random decision: new clocks and batch caps every step, new instances and TP every 12."""
    pools = []
    for cfg in current:
        n, tp = cfg.n_instances, cfg.tp
        if step % reconfig_every == 0:
            tp = int(rng.choice(layout.tp_choices))
            n = int(rng.integers(0, 4)) * (layout.gpus_per_server // tp)
        pools.append(PoolConfig(n, tp, float(rng.choice(layout.freq_choices_mhz)),
                                int(rng.choice(layout.batch_choices))))
    return tuple(pools)


def _run_both(scenario, steps, seeds, thermal=None, decision_seed=0):
    """Step a batched simulator and one SimCluster per seed with the same random decisions.

    Returns the totals of every compared field (to show what the run exercised) and the largest
    relative difference per field.
    """
    n = len(seeds)
    batched = BatchedSimCluster(scenario, n, thermal=thermal)
    singles = [SimCluster(scenario, serving_model="aggregate", thermal=thermal) for _ in seeds]
    batched.reset(seeds)
    for sim, seed in zip(singles, seeds, strict=True):
        sim.reset(seed=seed)
    rng = np.random.default_rng(decision_seed)
    lay, p = batched.layout, batched.n_pools
    totals = dict.fromkeys(COMPARED, 0.0)
    worst = dict.fromkeys(COMPARED + PER_POOL + ("gpu_temp_c", "row_power_w"), 0.0)
    for step in range(steps):
        arrays = np.zeros((4, n, p))
        for e, sim in enumerate(singles):
            pools = _random_pools(rng, lay, sim.pool_configs, step)
            sim.apply(ClusterAction(pools=pools))
            arrays[:, e] = np.array([[c.n_instances, c.tp, c.freq_mhz, c.max_batch] for c in pools]).T
        batched.apply_pools(*arrays)
        got = batched.advance()
        for e, sim in enumerate(singles):
            want = sim.advance()
            for name in COMPARED:
                a, b = float(getattr(want, name)), float(getattr(got, name)[e])
                totals[name] += abs(a)
                worst[name] = max(worst[name], abs(a - b) / max(abs(a), 1e-9))
            for name in PER_POOL:
                diff = np.abs(getattr(want, name) - getattr(got, name)[e])
                worst[name] = max(worst[name], float(diff.max()))
            tel = sim.telemetry()
            worst["gpu_temp_c"] = max(worst["gpu_temp_c"], float(
                np.abs(tel.gpu_temp_c - batched.per_copy(batched.gpu_temp_c)[e]).max()))
            worst["row_power_w"] = max(worst["row_power_w"], float(
                np.abs(tel.row_power_w - batched.per_copy(batched.row_power_w)[e]).max()))
    assert batched.done == all(sim.done for sim in singles)
    return totals, worst


def _assert_equal(worst):
    bad = {k: v for k, v in worst.items() if v > 1e-9}
    assert not bad, f"batched copies differ from single simulators: {bad}"


def test_copies_match_single_simulators_through_reconfigurations():
    """Random layouts every minute; idle servers power off after 10 s, so they also wake."""
    sc = load_scenario("small")
    sc = sc.with_overrides(datacenter=replace(sc.datacenter, idle_to_off_s=10.0))
    totals, worst = _run_both(sc, 120, seeds=[3, 4, 5])
    _assert_equal(worst)
    # The run exercised what it claims: reconfigurations with downtime, drops, servers powering off.
    assert totals["reconfigurations"] > 0 and totals["dropped"] > 0
    assert totals["servers_powered"] < 120 * 3 * 4


def test_copies_match_under_power_capping_and_thermal_slowdown():
    sc = load_scenario("small")
    sc = sc.with_overrides(datacenter=replace(sc.datacenter, power_oversubscription=2.2))
    totals, worst = _run_both(sc, 60, seeds=[1, 2], decision_seed=1)
    _assert_equal(worst)
    assert totals["power_throttle_events"] > 0 and totals["saas_tokens_lost"] > 0
    hot = replace(ThermalParams.load(), slowdown_temp_c=50.0)
    totals, worst = _run_both("small", 60, seeds=[1, 2], thermal=hot, decision_seed=2)
    _assert_equal(worst)
    assert totals["thermal_throttle_events"] > 0 and totals["thermal_throttled_gpu_s"] > 0


def test_copies_match_on_the_week_scenario_and_other_gpus():
    """A week-trace window drawn per seed, a grid region's carbon, eight rows; an MoE on B200."""
    week = load_scenario("dynamo_week").with_overrides(duration_s=1800.0)  # half an hour of it
    _assert_equal(_run_both(week, 40, seeds=[7, 8])[1])
    _assert_equal(_run_both("small_moe", 30, seeds=[9])[1])


def test_same_seeds_same_trajectory_and_copies_are_independent():
    a = BatchedSimCluster("small", 2)
    b = BatchedSimCluster("small", 3)
    a.reset([10, 11])
    b.reset([99, 11, 10])  # the same seeds in other slots, next to another copy
    for _ in range(30):
        ma, mb = a.advance(), b.advance()
        np.testing.assert_array_equal(ma.energy_j, mb.energy_j[[2, 1]])
        np.testing.assert_array_equal(ma.finished, mb.finished[[2, 1]])
    assert not np.array_equal(mb.energy_j[0], mb.energy_j[1])


def test_stacked_topology_keeps_each_copy_to_itself():
    topo = build_topology(load_scenario("small"))
    stacked = stack_topology(topo, 3)
    assert stacked.n_servers == 3 * topo.n_servers and stacked.n_rows == 3 * topo.n_rows
    per_server = np.arange(stacked.n_servers, dtype=float)
    rows = stacked.row_sum(per_server).reshape(3, -1)
    for e in range(3):
        np.testing.assert_array_equal(rows[e], topo.row_sum(per_server[e * topo.n_servers:
                                                                       (e + 1) * topo.n_servers]))
    np.testing.assert_array_equal(stacked.gpu_row // topo.n_rows,
                                  np.repeat(np.arange(3), topo.n_gpus))


@pytest.mark.parametrize("name, field", [("small_tapas", "datacenter.saas_fraction"),
                                          ("small_faults", "datacenter.saas_fraction"),
                                          ("tapas_dc", "datacenter.saas_fraction")])
def test_unsupported_scenarios_are_refused_with_the_field(name, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        BatchedSimCluster(name, 2)


def test_faults_and_slo_classes_are_refused():
    sc = load_scenario("small")
    rf = replace(sc.random_faults, per_hour=2.0, kinds=("load_spike",))
    assert "random_faults.per_hour" in batch_support_error(sc.with_overrides(random_faults=rf))
    assert batch_support_error(sc) is None


def test_bad_decisions_are_refused():
    b = BatchedSimCluster("small", 2)
    b.reset([0, 1])
    ok = np.ones((2, 3))
    with pytest.raises(ValueError, match="shape"):
        b.apply_pools(np.ones((1, 3)), 8 * ok, 1980 * ok, 64 * ok)
    with pytest.raises(ValueError, match="tp must be one of"):
        b.apply_pools(ok, 3 * ok, 1980 * ok, 64 * ok)
    with pytest.raises(ValueError, match="n_instances"):
        b.apply_pools(-ok, 8 * ok, 1980 * ok, 64 * ok)
    with pytest.raises(ValueError, match="seeds"):
        b.reset([1])
    for _ in range(b.n_intervals):
        b.advance()
    with pytest.raises(RuntimeError, match="reset"):
        b.advance()
