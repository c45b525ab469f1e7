"""Invariants of the simulated datacenter that must hold for any scenario, seed and action.

Energy equals the integral of power; requests are conserved (arrived = finished + dropped +
in flight); the same seed gives the same episode; counts and powers stay in range. Checked on
the shipped scenarios and, with hypothesis, on random variations of them (load, clocks, batch
caps, admission, drop deadline, serving model).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_cluster_gym.envs.backend import SERVER_POWER_STATES, ClusterAction, ServiceMetrics, Telemetry
from llm_cluster_gym.envs.sim.accounting import IntervalStats
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import Scenario, load_scenario

SERVING_MODELS = ("request", "aggregate")


def short(name: str, duration_s: float, **workload: float) -> Scenario:
    """A shipped scenario cut to `duration_s`, with optional workload overrides."""
    s = load_scenario(name)
    faults = tuple(f for f in s.faults if f.start_s < duration_s)
    w = dataclasses.replace(s.workload, **workload)
    return s.with_overrides(duration_s=duration_s, faults=faults, workload=w)


def run_episode(c: SimCluster, seed: int, actions: dict[int, ClusterAction] | None = None
                ) -> tuple[list[ServiceMetrics], list[Telemetry]]:
    """Reset and run to the end, applying `actions[k]` before interval k."""
    tel = [c.reset(seed=seed)]
    metrics = []
    k = 0
    while not c.done:
        if actions and k in actions:
            c.apply(actions[k])
        metrics.append(c.advance())
        tel.append(c.telemetry())
        k += 1
    return metrics, tel


def assert_energy_is_integral_of_power(c: SimCluster, metrics: list[ServiceMetrics]) -> None:
    """Sum over ticks of row power x tick length equals the reported energy, interval by interval."""
    row_w = np.array(c.record.row_power_w)
    assert row_w.shape == (len(metrics) * c.ticks_per_interval, c.topo.n_rows)
    per_tick_j = row_w.sum(axis=1) * c.tick_s
    per_interval_j = per_tick_j.reshape(len(metrics), c.ticks_per_interval).sum(axis=1)
    reported_j = np.array([m.energy_j for m in metrics])
    np.testing.assert_allclose(per_interval_j, reported_j, rtol=1e-12, atol=1e-6)
    gpu_j = np.array([m.gpu_energy_j for m in metrics])
    assert (gpu_j > 0).all() and (gpu_j < reported_j).all()  # servers add overhead to GPUs
    assert (np.diff(c.record.time_s) == pytest.approx(c.tick_s))


def assert_requests_conserved(metrics: list[ServiceMetrics], exact: bool) -> None:
    """Cumulative arrived = finished + dropped + in flight, after every interval."""
    arrived = np.cumsum([m.arrived for m in metrics])
    out = np.cumsum([m.finished + m.dropped for m in metrics])
    in_flight = np.array([m.in_flight for m in metrics])
    if exact:
        np.testing.assert_array_equal(arrived, out + in_flight)
    else:
        np.testing.assert_allclose(arrived, out + in_flight, rtol=1e-9, atol=1e-6)


def assert_in_range(metrics: list[ServiceMetrics], tel: list[Telemetry], c: SimCluster) -> None:
    for m in metrics:
        assert m.finished >= 0 and m.dropped >= 0 and m.in_flight >= -1e-9
        assert 0 <= m.slo_ttft_violations <= m.finished + 1e-9
        assert 0 <= m.slo_tbt_violations <= m.finished + 1e-9
        assert max(m.slo_ttft_violations, m.slo_tbt_violations) - 1e-9 <= m.slo_violations
        assert m.slo_violations <= m.slo_ttft_violations + m.slo_tbt_violations + 1e-9
        assert 0.0 <= m.slo_attainment <= 1.0
        assert m.tokens_generated >= 0 and m.energy_j > 0
        assert m.arrivals_per_pool.sum() == m.arrived
    for t in tel[1:]:
        # The GPUs of a powered server draw at least their bare idle power; those of one that is
        # off draw nothing.
        off = np.repeat(t.server_power_state == SERVER_POWER_STATES.index("off"), c.topo.gpus_per_server)
        assert (t.gpu_power_w[~off] >= c.gpu_model.idle_no_context_w - 1e-9).all()
        assert (t.gpu_power_w[off] == 0.0).all()
        assert (t.gpu_power_w <= c.gpu_model.gpu_power_limit_w + 1e-9).all()
        assert (t.gpu_freq_mhz >= c.gpu_model.min_freq_mhz - 1e-9).all()
        assert (t.gpu_freq_mhz <= c.gpu_model.max_freq_mhz + 1e-9).all()
        assert np.isfinite(t.gpu_temp_c).all() and (t.gpu_temp_c >= t.aisle_inlet_c.min()).all()
        np.testing.assert_allclose(t.row_power_w.sum(), t.aisle_heat_w.sum(), rtol=1e-12)


# ---------------------------------------------------------------------------- shipped scenarios


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
@pytest.mark.parametrize("name", ["small", "small_tapas", "small_faults"])
def test_energy_is_integral_of_row_power(name, serving_model):
    c = SimCluster(short(name, 150.0), serving_model=serving_model, record_ticks=True)
    metrics, tel = run_episode(c, seed=0)
    assert_energy_is_integral_of_power(c, metrics)
    assert_requests_conserved(metrics, exact=serving_model == "request")
    assert_in_range(metrics, tel, c)


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_requests_conserved_under_overload_admission_control_and_reconfiguration(serving_model):
    """Drops (stale queue, admission) and requeues on reconfiguration lose no request."""
    s = short("small", 120.0, rps_per_gpu=1.0)
    s = s.with_overrides(serving=dataclasses.replace(s.serving, drop_after_s=5.0))
    c = SimCluster(s, serving_model=serving_model, record_ticks=True)
    pools = c.pool_configs
    smaller = tuple(dataclasses.replace(p, tp=2, n_instances=2, max_batch=8) for p in pools)
    actions = {
        4: ClusterAction(admit_fraction=0.5),
        8: ClusterAction(pools=smaller, admit_fraction=1.0),
        14: ClusterAction(pools=pools),
    }
    metrics, _ = run_episode(c, seed=0, actions=actions)
    assert sum(m.dropped for m in metrics) > 0
    assert sum(m.reconfigurations for m in metrics) > 0
    assert_requests_conserved(metrics, exact=serving_model == "request")
    assert_energy_is_integral_of_power(c, metrics)


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_same_seed_same_episode_different_seed_different_episode(serving_model):
    s = short("small_tapas", 100.0)
    a = SimCluster(s, serving_model=serving_model)
    b = SimCluster(s, serving_model=serving_model)
    ma, ta = run_episode(a, seed=7)
    mb, tb = run_episode(b, seed=7)
    assert [m.as_dict() for m in ma] == [m.as_dict() for m in mb]
    for x, y in zip(ta, tb, strict=True):
        np.testing.assert_array_equal(x.gpu_temp_c, y.gpu_temp_c)
        np.testing.assert_array_equal(x.gpu_power_w, y.gpu_power_w)
        np.testing.assert_array_equal(x.legal_vm_servers, y.legal_vm_servers)
    # Reusing a cluster: reset with the same seed replays the episode (no leaked state).
    mc, _ = run_episode(a, seed=7)
    assert [m.as_dict() for m in mc] == [m.as_dict() for m in ma]
    md, _ = run_episode(b, seed=8)
    assert [m.arrived for m in md] != [m.arrived for m in ma]


# ---------------------------------------------------------------------------- hypothesis


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    serving_model=st.sampled_from(SERVING_MODELS),
    seed=st.integers(0, 2**31 - 1),
    rps_per_gpu=st.floats(0.0, 1.5),
    freq_mhz=st.sampled_from([800.0, 1200.0, 1980.0]),
    max_batch=st.sampled_from([32, 256]),  # the scenarios' smallest and largest choice
    admit_fraction=st.floats(0.0, 1.0),
    drop_after_s=st.floats(2.0, 60.0),
    oversubscription=st.floats(1.0, 2.5),
)
@pytest.mark.slow
def test_invariants_hold_for_random_variations(serving_model, seed, rps_per_gpu, freq_mhz,
                                               max_batch, admit_fraction, drop_after_s,
                                               oversubscription):
    base = short("small_tapas", 60.0, rps_per_gpu=rps_per_gpu)
    pools = tuple(dataclasses.replace(p, freq_mhz=freq_mhz, max_batch=max_batch)
                  for p in base.serving.pools)
    d = dataclasses.replace(base.datacenter, power_oversubscription=oversubscription)
    s = base.with_overrides(
        datacenter=d, serving=dataclasses.replace(base.serving, pools=pools,
                                                  drop_after_s=drop_after_s))
    c = SimCluster(s, serving_model=serving_model, record_ticks=True)
    metrics, tel = run_episode(c, seed=seed, actions={3: ClusterAction(admit_fraction=admit_fraction)})
    assert_energy_is_integral_of_power(c, metrics)
    assert_requests_conserved(metrics, exact=serving_model == "request")
    assert_in_range(metrics, tel, c)
    # Throttling counters agree with the per-interval throttled time.
    for m in metrics:
        assert (m.power_throttle_events > 0) <= (m.power_capped_gpu_s > 0)
        assert (m.thermal_throttle_events > 0) <= (m.thermal_throttled_gpu_s > 0)
    assert_harm_split(metrics)


def assert_harm_split(metrics: list[ServiceMetrics]) -> None:
    """SaaS + IaaS parts make each throttling total; clock is lost only where something is held."""
    for m in metrics:
        assert m.saas_throttled_gpu_s + m.iaas_throttled_gpu_s == pytest.approx(
            m.thermal_throttled_gpu_s, rel=1e-12, abs=0.0)
        assert m.saas_capped_gpu_s + m.iaas_capped_gpu_s == pytest.approx(
            m.power_capped_gpu_s, rel=1e-12, abs=0.0)
        assert m.clock_lost_mhz_s == m.saas_clock_lost_mhz_s + m.iaas_clock_lost_mhz_s
        parts = (m.saas_throttled_gpu_s, m.iaas_throttled_gpu_s, m.saas_capped_gpu_s,
                 m.iaas_capped_gpu_s, m.saas_clock_lost_mhz_s, m.iaas_clock_lost_mhz_s)
        assert min(parts) >= 0.0
        assert (m.clock_lost_mhz_s > 0) <= (m.power_capped_gpu_s + m.thermal_throttled_gpu_s > 0)
        assert m.saas_tokens_lost >= 0.0
    # Tokens are lost in a tick under the ceilings set at the end of the tick before, which that
    # tick counted as held: none is lost unless SaaS GPUs were held in this interval or the last.
    held = [m.saas_capped_gpu_s + m.saas_throttled_gpu_s > 0 for m in metrics]
    for k, m in enumerate(metrics):
        assert (m.saas_tokens_lost > 0) <= (held[k] or (k > 0 and held[k - 1]))


def test_capping_harm_is_split_by_each_gpus_server_role():
    """small_tapas_high (1.6x oversubscription) with three servers a row caps mixed rows.

    Rows 2 and 3 hold one SaaS server and two IaaS hosts, rows 0 and 1 the reverse, so the two
    parts differ (a swapped role would show). The aggregate model runs one tick per interval,
    so the telemetry after each interval shows exactly the per-GPU flags that interval counted:
    the SaaS part is the capped GPUs of SaaS servers (by the layout's roles), the IaaS part the
    rest.
    """
    base = load_scenario("small_tapas_high")
    s = base.with_overrides(datacenter=dataclasses.replace(base.datacenter, servers_per_rack=3))
    c = SimCluster(s, serving_model="aggregate")
    assert c.ticks_per_interval == 1
    layout = c.describe().layout
    gpu_is_saas = np.repeat(layout.server_is_saas, layout.gpus_per_server)
    assert gpu_is_saas.any() and not gpu_is_saas.all()
    metrics, tel = run_episode(c, seed=0)
    assert_harm_split(metrics)
    dt = s.control_interval_s
    for m, t in zip(metrics, tel[1:], strict=True):
        capped, hot = np.asarray(t.gpu_power_capped), np.asarray(t.gpu_thermal_throttled)
        assert m.saas_capped_gpu_s == np.count_nonzero(capped & gpu_is_saas) * dt
        assert m.iaas_capped_gpu_s == np.count_nonzero(capped & ~gpu_is_saas) * dt
        assert m.saas_throttled_gpu_s == np.count_nonzero(hot & gpu_is_saas) * dt
        assert m.iaas_throttled_gpu_s == np.count_nonzero(hot & ~gpu_is_saas) * dt
        # Every capped row here holds a serving SaaS server and a VM host at work under a
        # ceiling below their set clocks: clock is lost exactly in the capped intervals.
        held = m.power_capped_gpu_s + m.thermal_throttled_gpu_s > 0
        assert (m.clock_lost_mhz_s > 0) == held
        assert (m.saas_clock_lost_mhz_s > 0) == (m.saas_capped_gpu_s + m.saas_throttled_gpu_s > 0)
    total = sum(m.power_capped_gpu_s for m in metrics)
    saas, iaas = (sum(getattr(m, k) for m in metrics) for k in ("saas_capped_gpu_s", "iaas_capped_gpu_s"))
    assert 0 < saas < iaas
    assert sum(m.saas_capped_gpu_s + m.iaas_capped_gpu_s for m in metrics) == pytest.approx(total)
    assert sum(m.clock_lost_mhz_s for m in metrics) > 0
    # The capped SaaS servers decode slower: tokens are lost, a small share of those generated.
    lost = sum(m.saas_tokens_lost for m in metrics)
    assert 0 < lost < 0.5 * sum(m.tokens_generated for m in metrics)


def test_tokens_lost_follow_the_decode_slowdown():
    """A decode iteration takes phi f_max / f + 1 - phi of its time at f_max: halving the clock of
    a compute-bound slot (phi 1) doubles it (as many tokens lost as made), a memory-bound one
    (phi 0) loses none, and an unthrottled slot nothing."""
    stats = IntervalStats()
    tokens = np.array([100.0, 100.0, 100.0, 40.0])
    f_set = np.array([1980.0, 1980.0, 1980.0, 990.0])
    f_eff = np.array([990.0, 990.0, 1980.0, 990.0])
    stats.add_tokens_lost(tokens, f_eff, f_set, np.array([1.0, 0.0, 1.0, 1.0]), np.full(4, 1980.0))
    assert stats.saas_tokens_lost == pytest.approx(100.0)
    stats.add_tokens_lost(tokens, f_eff, f_set, np.full(4, 0.5), np.full(4, 1980.0))
    assert stats.saas_tokens_lost == pytest.approx(100.0 + 2 * 100.0 * (1.5 / 1.0 - 1.0))


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_an_uncapped_run_loses_no_clock(serving_model):
    """small_tapas (1.3x) over a minute: nothing capped or throttled, so no harm and no clock lost."""
    c = SimCluster(short("small_tapas", 60.0), serving_model=serving_model)
    metrics, _ = run_episode(c, seed=0)
    assert_harm_split(metrics)
    for m in metrics:
        assert m.power_capped_gpu_s == m.thermal_throttled_gpu_s == 0.0
        assert m.clock_lost_mhz_s == m.saas_clock_lost_mhz_s == m.iaas_clock_lost_mhz_s == 0.0
        assert m.saas_tokens_lost == 0.0
