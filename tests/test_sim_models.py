"""The simulator's physical and serving models, checked inside the running cluster.

Each test drives `SimCluster` through its public protocol (reset/apply/advance/telemetry) and
compares what it reports with what the model says must happen: the analytic GPU temperature
curve after a load step, row power capping that engages exactly above the limit, thermal
slowdown past the slowdown temperature, the downtime of a reconfiguration, the fault windows
of `small_faults`, and the agreement of the aggregate serving model with the request-level one.

Constant loads come from IaaS VMs (opaque servers drawing a fixed power per GPU), so the
expected values are exact; the SaaS part then idles (zero request rate).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig
from llm_cluster_gym.envs.sim.cluster import CAP_TARGET_FRACTION, SimCluster
from llm_cluster_gym.envs.sim.profiles import ProfileLibrary
from llm_cluster_gym.envs.sim.scenario import FaultSpec, Scenario, load_scenario
from llm_cluster_gym.envs.sim.thermal import ThermalParams

TICK_S = 0.5


@pytest.fixture(scope="module")
def thermal() -> ThermalParams:
    return ThermalParams.load()


def vm_scenario(
    *,
    vm_power_w: float = 600.0,
    initial_fraction: float = 1.0,
    arrivals_per_hour: float = 0.0,
    faults: tuple[FaultSpec, ...] = (),
    supply_temp_c: float = 22.0,
    duration_s: float = 60.0,
) -> Scenario:
    """2 rows x 2 servers (one SaaS, one IaaS per row), no requests, VMs at a fixed power.

    The control interval equals the tick, so telemetry after each `advance()` is per tick.
    Cooling is not oversubscribed and the outside air (15-25 C) stays below the supply
    setpoint, so the aisle inlet stays exactly at `supply_temp_c`. Servers never power off
    (`idle_to_off_s` null): an empty server idles (`tests/test_server_power.py` covers off).
    """
    base = load_scenario("small_tapas")
    d = base.datacenter
    d = dataclasses.replace(
        d, rows=2, rows_per_aisle=2, power_oversubscription=1.0, cooling_oversubscription=1.0,
        cooling=dataclasses.replace(d.cooling, supply_temp_c=supply_temp_c), idle_to_off_s=None)
    w = dataclasses.replace(base.workload, rps_per_gpu=0.0, diurnal=None)
    sv = dataclasses.replace(
        base.serving, pools=(dataclasses.replace(base.serving.pools[0], n_instances=4, tp=4),))
    vms = dataclasses.replace(base.vms, arrivals_per_hour=arrivals_per_hour, lifetime_s=1e12,
                              gpu_power_w=(vm_power_w,), initial_fraction=initial_fraction)
    return base.with_overrides(datacenter=d, workload=w, serving=sv, vms=vms, faults=faults,
                               duration_s=duration_s, tick_s=TICK_S, control_interval_s=TICK_S)


# ---------------------------------------------------------------------------- thermal


def test_vm_load_step_follows_analytic_two_node_curve(thermal):
    """A VM placed on an idle server is a power step; GPU temperature follows the RC solution."""
    vm_w = 600.0
    c = SimCluster(vm_scenario(vm_power_w=vm_w, initial_fraction=0.0, arrivals_per_hour=3.6e6,
                               duration_s=300.0),
                   auto_place_vms=False)
    t0 = c.reset(seed=0)
    # GPUs holding a model instance idle with a CUDA context; the others (IaaS) without one.
    gm = c.gpu_model
    idle_w = np.where(c.slots.gpu_has, gm.idle_power_w, gm.idle_no_context_w)
    iaas = np.flatnonzero(~c.topo.server_is_saas)
    vm_gpu = np.isin(c.topo.gpu_server, iaas[:1])
    inlet_c = t0.aisle_inlet_c[c.topo.gpu_aisle]
    idle_temp_c = inlet_c + thermal.r_total_c_per_w * idle_w
    np.testing.assert_allclose(t0.gpu_temp_c, idle_temp_c, atol=1e-9)
    for _ in range(4):  # idle ticks: nothing moves, and a VM is now waiting
        c.advance()
    assert c.telemetry().pending_vm_expected_gpu_w == vm_w
    np.testing.assert_allclose(c.telemetry().gpu_temp_c, idle_temp_c, atol=1e-9)
    step_at_s = c.time_s
    c.apply(ClusterAction(vm_servers=(int(iaas[0]),)))
    step_w = vm_w - idle_w
    for _ in range(480):  # 240 s, ten heatsink time constants
        c.advance()
        tel = c.telemetry()
        t = tel.time_s - step_at_s
        want = (idle_temp_c
                + thermal.r_die_c_per_w * step_w * -np.expm1(-t / thermal.tau_die_s)
                + thermal.r_sink_c_per_w * step_w * -np.expm1(-t / thermal.tau_sink_s))
        np.testing.assert_allclose(tel.gpu_temp_c[vm_gpu], want[vm_gpu], rtol=0, atol=1e-9)
        np.testing.assert_allclose(tel.gpu_temp_c[~vm_gpu], idle_temp_c[~vm_gpu], atol=1e-9)
        np.testing.assert_allclose(tel.gpu_power_w[vm_gpu], vm_w)
        np.testing.assert_allclose(tel.gpu_power_w[~vm_gpu], idle_w[~vm_gpu])
    # Long after the step: the steady state inlet + (R_die + R_sink) * P.
    np.testing.assert_allclose(tel.gpu_temp_c[vm_gpu],
                               inlet_c[vm_gpu] + thermal.r_total_c_per_w * vm_w, atol=1e-3)


def test_gpus_without_an_instance_idle_without_a_cuda_context():
    """Idle GPUs draw 71-73 W with no process and about 122 W holding a model (H100, measured)."""
    c = SimCluster(vm_scenario(initial_fraction=0.0))
    tel = c.reset(seed=0)
    has = c.slots.gpu_has
    assert has.any() and (~has).any()
    np.testing.assert_allclose(tel.gpu_power_w[~has], 72.0)
    assert (tel.gpu_power_w[has] >= c.gpu_model.idle_power_w - 1e-9).all()
    assert 115.0 <= c.gpu_model.idle_power_w <= 130.0


def test_reset_telemetry_reports_the_settled_state():
    """At reset the cluster reads as if it had been running idle (VMs at their power)."""
    c = SimCluster(vm_scenario())
    first = c.reset(seed=0)
    c.advance()  # a tick of the same constant load changes nothing
    after = c.telemetry()
    for name in ("gpu_power_w", "gpu_temp_c", "row_power_w", "aisle_heat_w", "aisle_inlet_c"):
        np.testing.assert_allclose(getattr(first, name), getattr(after, name), rtol=1e-12,
                                   err_msg=name)


def _run_counting_transitions(c: SimCluster, field: str, metric: str) -> tuple[int, int, list]:
    """Advance to the end; return (events reported, off->on transitions seen, telemetry)."""
    prev = getattr(c.telemetry(), field).copy()
    events = transitions = 0
    history = []
    while not c.done:
        m = c.advance()
        tel = c.telemetry()
        flags = getattr(tel, field)
        events += getattr(m, metric)
        transitions += int((flags & ~prev).sum())
        prev = flags.copy()
        history.append(tel)
    return events, transitions, history


@pytest.mark.parametrize("margin_c", [-0.5, 0.5, 5.0])
def test_thermal_slowdown_engages_exactly_above_slowdown_temperature(thermal, margin_c):
    """Steady VM temperature just below the slowdown point: no throttling; just above: throttled."""
    vm_w = 600.0
    supply_c = thermal.slowdown_temp_c - thermal.r_total_c_per_w * vm_w + margin_c
    c = SimCluster(vm_scenario(vm_power_w=vm_w, supply_temp_c=supply_c, duration_s=60.0))
    c.reset(seed=0)
    events, transitions, hist = _run_counting_transitions(
        c, "gpu_thermal_throttled", "thermal_throttle_events")
    vm_gpus = int((~c.topo.server_is_saas).sum()) * c.topo.gpus_per_server
    assert events == transitions
    if margin_c < 0:
        assert events == 0
        assert not any(t.gpu_thermal_throttled.any() for t in hist)
        assert max(t.gpu_temp_c.max() for t in hist) < thermal.slowdown_temp_c
    else:
        # Every VM GPU throttles once and stays throttled: its clock ceiling holds it in the
        # hysteresis band below the slowdown point, so the episode is never counted twice.
        assert events == vm_gpus
        last = hist[-1]
        vm_gpu = ~c.topo.server_is_saas[c.topo.gpu_server]
        assert last.gpu_thermal_throttled[vm_gpu].all()
        assert not last.gpu_thermal_throttled[~vm_gpu].any()
        assert (last.gpu_freq_mhz[vm_gpu] < c.gpu_model.max_freq_mhz).all()
        assert (last.gpu_power_w[vm_gpu] < vm_w).all()
        assert last.gpu_temp_c.max() <= thermal.slowdown_temp_c
        # Once engaged, the temperature only falls (the heatsink's slow node lags behind).
        peak = np.array([t.gpu_temp_c[vm_gpu].max() for t in hist])
        first = next(i for i, t in enumerate(hist) if t.gpu_thermal_throttled.any())
        assert (np.diff(peak[first:]) <= 1e-9).all()


def test_thermal_slowdown_under_serving_load_counts_events_and_slows_service(thermal):
    """A hot aisle (high supply air) throttles serving GPUs; events match on/off transitions."""
    base = load_scenario("small")
    hot = dataclasses.replace(base.datacenter.cooling, supply_temp_c=75.0)
    s = base.with_overrides(datacenter=dataclasses.replace(base.datacenter, cooling=hot),
                            duration_s=30.0, control_interval_s=TICK_S)
    cool = SimCluster(base.with_overrides(duration_s=30.0, control_interval_s=TICK_S))
    cool.reset(seed=3)
    c = SimCluster(s)
    c.reset(seed=3)
    events, transitions, hist = _run_counting_transitions(
        c, "gpu_thermal_throttled", "thermal_throttle_events")
    assert events == transitions > 0
    cool_events, _, cool_hist = _run_counting_transitions(
        cool, "gpu_thermal_throttled", "thermal_throttle_events")
    assert cool_events == 0
    throttled = np.array([t.gpu_thermal_throttled for t in hist])
    freq = np.array([t.gpu_freq_mhz for t in hist])
    assert (freq[throttled] < c.gpu_model.max_freq_mhz).all()
    assert (freq[~throttled] == c.gpu_model.max_freq_mhz).all()


# ---------------------------------------------------------------------------- power capping


def _capping_run(limit_fraction_of_demand: float, windows: tuple[tuple[float, float], ...]):
    """Row 1 loses part of its feed in `windows`; its new limit is a fraction of its demand."""
    probe = SimCluster(vm_scenario(duration_s=2 * TICK_S))
    probe.reset(seed=0)
    probe.advance()
    demand_w = probe.telemetry().row_power_w[1]
    nominal_w = probe.telemetry().row_limit_w[1]
    magnitude = limit_fraction_of_demand * demand_w / nominal_w
    faults = tuple(FaultSpec("power_failure", start, dur, magnitude, target=1)
                   for start, dur in windows)
    c = SimCluster(vm_scenario(faults=faults, duration_s=60.0), record_ticks=True)
    c.reset(seed=0)
    events, transitions, hist = _run_counting_transitions(c, "gpu_power_capped",
                                                          "power_throttle_events")
    return c, demand_w, events, transitions, hist


def test_power_capping_holds_row_under_limit_and_counts_one_event_per_episode():
    windows = ((10.0, 20.0), (40.0, 5.0))
    c, demand_w, events, transitions, hist = _capping_run(0.98, windows)
    rec = c.record
    t_end = np.array(rec.time_s)
    row_w = np.array(rec.row_power_w)
    limit_w = np.array(rec.row_limit_w)
    assert events == len(windows)  # one throttling event per capping episode
    assert transitions == len(windows) * c.topo.gpus_per_server * 2  # 16 GPUs of row 1 each time
    for start, dur in windows:
        in_window = (t_end > start) & (t_end <= start + dur)
        first = np.flatnonzero(in_window)[0]
        # The tick the limit drops still runs at the old clock (the controller reacts to the
        # measurement); every later tick of the window sits at the capping target, a margin
        # under the limit.
        assert row_w[first, 1] == pytest.approx(demand_w)
        later = in_window.copy()
        later[first] = False
        target_w = CAP_TARGET_FRACTION * limit_w[later, 1]
        assert (row_w[later, 1] <= target_w).all()
        assert (row_w[later, 1] >= 0.99 * target_w).all()  # capped to the target, not below
    # Row 0 keeps its full limit and is never touched; outside the windows row 1 runs free.
    assert np.allclose(row_w[:, 0], demand_w)
    capped_row1 = np.array([t.gpu_power_capped[c.topo.gpu_row == 1].all() for t in hist])
    assert not any(t.gpu_power_capped[c.topo.gpu_row == 0].any() for t in hist)
    assert capped_row1.sum() == sum(dur for _, dur in windows) / TICK_S


def test_power_capping_does_not_engage_at_or_just_under_the_limit():
    c, demand_w, events, transitions, hist = _capping_run(1.001, ((10.0, 20.0),))
    assert events == transitions == 0
    assert not any(t.gpu_power_capped.any() for t in hist)
    assert np.allclose(np.array(c.record.row_power_w), demand_w)


def test_power_capping_under_serving_load_counts_transitions():
    """Oversubscribed rows under real traffic: each uncapped->capped switch of a row is one event."""
    base = load_scenario("small")
    d = dataclasses.replace(base.datacenter, power_oversubscription=2.2)
    s = base.with_overrides(datacenter=d, duration_s=40.0, control_interval_s=TICK_S)
    c = SimCluster(s, record_ticks=True)
    c.reset(seed=1)
    row_switches = 0
    prev = np.zeros(c.topo.n_rows, dtype=bool)
    events = 0
    capped_ticks = 0
    while not c.done:
        m = c.advance()
        tel = c.telemetry()
        row_capped = np.array([tel.gpu_power_capped[c.topo.gpu_row == r].any()
                               for r in range(c.topo.n_rows)])
        row_switches += int((row_capped & ~prev).sum())
        capped_ticks += int(row_capped.sum())
        prev = row_capped
        events += m.power_throttle_events
    assert events == row_switches > 0
    assert capped_ticks > 0


# ---------------------------------------------------------------------------- reconfiguration


def test_tp_change_pays_profile_load_time_and_conserves_requests():
    base = load_scenario("small")
    s = base.with_overrides(duration_s=120.0, control_interval_s=TICK_S)  # past the 72 s load
    c = SimCluster(s)
    c.reset(seed=0)
    load_time_s = ProfileLibrary.load().get(s.serving.model, s.serving.gpu, 2).load_time_s
    for _ in range(10):
        c.advance()
    old = c.pool_configs
    in_flight_before = c.serving.in_flight
    # Pool 0: 2 instances at TP4 -> 4 instances at TP2 on the same server.
    new = (PoolConfig(4, 2, old[0].freq_mhz, old[0].max_batch),) + old[1:]
    t_apply = c.time_s
    c.apply(ClusterAction(pools=new))
    assert c.serving.in_flight == in_flight_before  # requeued, not lost
    pool0_gpu = np.zeros(c.topo.n_gpus, dtype=bool)
    pool0_gpu[:8] = True  # the first server hosts pool 0 in both layouts
    idle_w = c.gpu_model.idle_power_w
    arrived = finished = dropped = 0
    reconf = []
    first_busy_s = None
    while not c.done:
        m = c.advance()
        tel = c.telemetry()
        arrived, finished, dropped = arrived + m.arrived, finished + m.finished, dropped + m.dropped
        reconf.append(m.reconfigurations)
        tick_start = tel.time_s - TICK_S
        if tick_start < t_apply + load_time_s:
            # Loading: the new instances' GPUs do no work and draw idle power.
            np.testing.assert_allclose(tel.gpu_power_w[pool0_gpu], idle_w)
        elif first_busy_s is None and (tel.gpu_power_w[pool0_gpu] > idle_w).any():
            first_busy_s = tick_start
        assert arrived == finished + dropped + m.in_flight - in_flight_before
    assert reconf[0] == 4 and sum(reconf) == 4
    # Up again from the first tick that starts after the load time, and soon given work.
    assert first_busy_s is not None
    assert t_apply + load_time_s <= first_busy_s <= t_apply + load_time_s + 5.0


def test_same_config_or_frequency_change_costs_no_downtime():
    base = load_scenario("small")
    s = base.with_overrides(duration_s=10.0, control_interval_s=TICK_S)
    c = SimCluster(s)
    c.reset(seed=0)
    c.advance()
    same = c.pool_configs
    c.apply(ClusterAction(pools=same))
    assert c.advance().reconfigurations == 0
    slower = tuple(dataclasses.replace(p, freq_mhz=1200.0) for p in same)
    c.apply(ClusterAction(pools=slower))
    m = c.advance()
    assert m.reconfigurations == 0
    assert c.inst.serving(c.time_s).sum() == sum(p.n_instances for p in same)
    tel = c.telemetry()
    assert tel.gpu_freq_mhz.max() == c.gpu_model.max_freq_mhz  # ceilings, not set points
    assert (c.inst.freq_mhz[c.inst.active] == 1200.0).all()


# ---------------------------------------------------------------------------- faults


def test_small_faults_lower_limits_only_inside_their_windows():
    s = load_scenario("small_faults")
    c = SimCluster(s, serving_model="aggregate", record_ticks=True)  # one tick per interval
    c.reset(seed=0)
    nominal_row = c.topo.row_limit_w.copy()
    nominal_aisle = c.topo.aisle_capacity_w.copy()
    kinds = {f.kind: f for f in s.faults}
    cool, power, spike = kinds["cooling_failure"], kinds["power_failure"], kinds["load_spike"]

    def expected(t_s: float) -> tuple[np.ndarray, np.ndarray]:
        row, aisle = nominal_row.copy(), nominal_aisle.copy()
        if cool.start_s <= t_s < cool.start_s + cool.duration_s:
            aisle[cool.target] *= cool.magnitude
        if power.start_s <= t_s < power.start_s + power.duration_s:
            row[power.target] *= power.magnitude
        return row, aisle

    starts, arrived = [], []
    while not c.done:
        starts.append(c.time_s)
        arrived.append(c.advance().arrived)
        tel = c.telemetry()
        # Telemetry: the limits in force now, and the faults that cause them.
        row, aisle = expected(tel.time_s)
        np.testing.assert_allclose(tel.row_limit_w, row)
        np.testing.assert_allclose(tel.aisle_capacity_w, aisle)
        assert (f"cooling_failure@{cool.target}" in tel.active_faults) == (
            aisle[cool.target] < nominal_aisle[cool.target])
        assert (f"power_failure@{power.target}" in tel.active_faults) == (
            row[power.target] < nominal_row[power.target])
    # Tick history: each tick ran under the limit in force at its start.
    for t0, limit in zip(starts, c.record.row_limit_w, strict=True):
        np.testing.assert_allclose(limit, expected(t0)[0])
    times, counts = np.array(starts), np.array(arrived, dtype=float)
    in_spike = (times >= spike.start_s) & (times < spike.start_s + spike.duration_s)
    before = (times >= spike.start_s - spike.duration_s) & (times < spike.start_s)
    assert counts[in_spike].mean() > 1.5 * counts[before].mean()


def _small_faults_power_failure_run(seed: int = 0):
    s = load_scenario("small_faults")
    # Stop after the power failure; the spike would fall past the end anyway.
    s = s.with_overrides(duration_s=420.0,
                         faults=tuple(f for f in s.faults if f.kind != "load_spike"))
    c = SimCluster(s, record_ticks=True)
    c.reset(seed=seed)
    events = capped_gpu_s = 0.0
    while not c.done:
        m = c.advance()
        events += m.power_throttle_events
        capped_gpu_s += m.power_capped_gpu_s
    f = next(f for f in s.faults if f.kind == "power_failure")
    t_end = np.array(c.record.time_s)
    row_w = np.array(c.record.row_power_w)[:, f.target]
    limit_w = np.array(c.record.row_limit_w)[:, f.target]
    window = (t_end > f.start_s + TICK_S) & (t_end <= f.start_s + f.duration_s)
    before = (t_end > f.start_s - 100.0) & (t_end <= f.start_s)
    return events, capped_gpu_s, row_w, limit_w, window, before


@pytest.mark.slow
def test_power_failure_in_small_faults_caps_the_row_on_average():
    events, capped_gpu_s, row_w, limit_w, window, before = _small_faults_power_failure_run()
    limit = limit_w[window][0]
    assert events >= 1 and capped_gpu_s > 0
    assert row_w[before].mean() > 1.2 * limit  # without capping the row would sit far above
    assert row_w[window].mean() <= limit  # the capping controller holds it under the limit


@pytest.mark.xfail(
    strict=True,
    reason="row capping sets next tick's clock from this tick's load (and its 2 s average), so "
           "bursty serving load overshoots: small_faults seed 0, row 1 over its limit in 23% "
           "of ticks, by up to +21%")
@pytest.mark.slow
def test_power_failure_in_small_faults_holds_every_tick_under_the_limit():
    _, _, row_w, limit_w, window, _ = _small_faults_power_failure_run()
    assert (row_w[window] <= limit_w[window] * 1.001).all()


# ---------------------------------------------------------------------------- aggregate model


def _episode_totals(s: Scenario, serving_model: str, seed: int) -> tuple[float, float]:
    c = SimCluster(s, serving_model=serving_model)
    c.reset(seed=seed)
    energy_j = finished = violations = 0.0
    while not c.done:
        m = c.advance()
        energy_j += m.energy_j
        finished += m.finished
        violations += m.slo_violations
    return energy_j, 1.0 - violations / max(finished, 1.0)


@pytest.mark.parametrize("freq_mhz", [None, 1200.0, 800.0])
@pytest.mark.slow
def test_aggregate_model_tracks_request_level_energy_and_slo(freq_mhz):
    """Same scenario and seed: energy within 5 %, SLO attainment within 2 points."""
    s = load_scenario("small")
    if freq_mhz is not None:
        pools = tuple(dataclasses.replace(p, freq_mhz=freq_mhz) for p in s.serving.pools)
        s = s.with_overrides(serving=dataclasses.replace(s.serving, pools=pools))
    e_req, att_req = _episode_totals(s, "request", seed=0)
    e_agg, att_agg = _episode_totals(s, "aggregate", seed=0)
    assert e_agg == pytest.approx(e_req, rel=0.05)
    assert abs(att_agg - att_req) <= 0.02


def test_vm_history_does_not_depend_on_serving_model():
    s = load_scenario("small_tapas").with_overrides(duration_s=300.0)
    occupancy = []
    for serving_model in ("request", "aggregate"):
        c = SimCluster(s, serving_model=serving_model)
        c.reset(seed=1)
        seen = []
        while not c.done:
            c.advance()
            seen.append(c.vms.gpu_power_w.copy())
        occupancy.append(np.array(seen))
    np.testing.assert_array_equal(occupancy[0], occupancy[1])


@pytest.mark.parametrize("serving_model", ["request", "aggregate"])
def test_routing_weights_of_zero_everywhere_still_serve(serving_model):
    """Routing weights are preferences: if every live instance sits in a row weighted 0, the
    requests still go to them instead of waiting forever (this used to crash the router)."""
    s = load_scenario("small_tapas").with_overrides(duration_s=60.0)
    c = SimCluster(s, serving_model=serving_model)
    c.reset(seed=2)
    c.apply(ClusterAction(row_route_weight=np.zeros(c.layout.n_rows)))
    finished = arrived = 0.0
    while not c.done:
        m = c.advance()
        finished += m.finished
        arrived += m.arrived
    assert arrived > 0 and finished > 0.8 * arrived


def test_prefill_burst_spanning_ticks_draws_prefill_power_every_tick():
    """A backlog admitted at once is prefilled in steps of the token budget over several ticks,
    each at prefill power (of a full step's tokens), while the prompts already done decode."""
    from llm_cluster_gym.envs.sim.instances import InstanceTable
    from llm_cluster_gym.envs.sim.serving import ServiceAccumulator
    from llm_cluster_gym.envs.sim.serving_request import RequestLevelServing, SlotModel

    inst = InstanceTable.empty(np.array([0]), gpus_per_server=1)
    inst.active[0], inst.pool[0], inst.max_batch[0] = True, 0, 64
    serving = RequestLevelServing(n_slots=1, n_pools=1, max_prefill_tokens=8192, drop_after_s=60.0)
    prompts = np.arange(20) * 10 + 1000  # 21,900 tokens in all
    serving.add_arrivals(np.zeros(20), prompts, np.full(20, 50), np.zeros(20, dtype=np.int64))
    p0, p1, iter_s = 0.02, 1e-4, 0.02
    model = SlotModel(prefill_time_s=lambda tok, slot: p0 + p1 * tok,
                      decode_iter_time_s=lambda b, c, slot: np.full(len(b), iter_s),
                      kv_capacity_tokens=np.array([1e6]))
    loads = [serving.tick(0.25 * k, 0.25, inst, np.array([True]), model, np.ones(1), np.ones(1),
                          np.ones(1), np.zeros(1), ServiceAccumulator(1)) for k in range(10)]
    busy = [float(ld.prefill_busy_s[0]) for ld in loads]
    tokens = [float(ld.prefill_tokens[0]) for ld in loads]
    # The chain takes 21,900 x (o / m + p1) = 2.24 s: ticks 0-8. A busy chain's steps carry
    # m = 8192 - (decoding requests) tokens, of which p1 x m is marginal prefill time.
    share = p1 / (p1 + iter_s / 8180)
    for k in range(1, 8):
        assert busy[k] == pytest.approx(0.25 * share, rel=1e-4)
        assert loads[k].decode_busy_s[0] > 0  # the prompts already done keep decoding
    # Full steps (the budget less the decoding requests), not one 1,095-token pass per prompt;
    # the chain's last ticks carry what is left of it.
    assert all(8192 - 20 <= t < 8192 for t in tokens[1:6])
    assert 8192 > tokens[6] > tokens[7] > tokens[8] > 1095
    assert busy[0] == pytest.approx(0.25)  # pure prefill passes: nothing decodes yet
    assert sum(busy) == pytest.approx(21_900 * p1 + p0, rel=0.01)
    assert busy[9] == 0.0 and tokens[9] == 0.0  # then only decode
    assert float(loads[9].decode_batch[0]) == pytest.approx(20)
