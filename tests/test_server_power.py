"""Server power states: scale-in empties whole servers, which power off; scale-out wakes them.

A server that holds nothing for `datacenter.idle_to_off_s` powers off (standby power, its GPUs
at 0 W, its GPU-hours no longer paid); a layout that needs it again wakes it, and its new
instances serve only after the wake latency plus their model load. `idle_to_off_s: null` keeps
every server powered: the simulator's arithmetic from before power states existed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm_cluster_gym.envs.backend import SERVER_POWER_STATES, ClusterAction, PoolConfig, ServerPowerSpec
from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.instances import InstanceTable, packed_first_slots
from llm_cluster_gym.envs.sim.scenario import Scenario, ScenarioError, load_scenario
from llm_cluster_gym.envs.sim.server_power import IDLE, OFF, SERVING, WAKING, ServerPowerStates

ROOT = Path(__file__).resolve().parents[1]
SERVING_MODELS = ("request", "aggregate")
INTERVAL_S = 5.0


def small(idle_to_off_s: float | None = 20.0, duration_s: float = 150.0, **server: float) -> Scenario:
    """`small` (4 SaaS servers) starting with 2, 2 and 4 TP-4 instances, with power-state settings."""
    s = load_scenario("small")
    dc = s.datacenter
    dc = dataclasses.replace(dc, idle_to_off_s=idle_to_off_s,
                             server=dataclasses.replace(dc.server, **server))
    pools = tuple(dataclasses.replace(p, n_instances=n, tp=4)
                  for p, n in zip(s.serving.pools, (2, 2, 4), strict=True))
    return s.with_overrides(duration_s=duration_s, datacenter=dc,
                            serving=dataclasses.replace(s.serving, pools=pools))


def halved(pools: tuple[PoolConfig, ...]) -> tuple[PoolConfig, ...]:
    """Half the instances of every pool: 1, 1 and 2 TP-4 instances, which fit on two servers."""
    return tuple(dataclasses.replace(p, n_instances=p.n_instances // 2) for p in pools)


def run(c: SimCluster, seed: int, actions: dict[int, ClusterAction]):
    """Reset and run to the end, applying `actions[k]` before interval k."""
    c.reset(seed=seed)
    metrics, tel = [], []
    k = 0
    while not c.done:
        if k in actions:
            c.apply(actions[k])
        metrics.append(c.advance())
        tel.append(c.telemetry())
        k += 1
    return metrics, tel


def table_servers(c: SimCluster, table_index: slice) -> np.ndarray:
    """Topology indices of the SaaS servers at positions `table_index` of the instance table."""
    return c.topo.saas_servers[table_index]


# ---------------------------------------------------------------------------- the cluster


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_scale_in_powers_servers_off_after_idle_to_off_s(serving_model):
    """Halving the pools frees two whole servers; 20 s later they draw standby power only."""
    c_off = SimCluster(small(20.0, duration_s=60.0), serving_model=serving_model)
    c_on = SimCluster(small(None, duration_s=60.0), serving_model=serving_model)
    act = {1: ClusterAction(pools=halved(c_off.pool_configs))}
    m_off, t_off = run(c_off, 0, act)
    m_on, t_on = run(c_on, 0, act)
    freed = table_servers(c_off, slice(2, None))
    g = c_off.topo.gpus_per_server
    spec = c_off.scenario.datacenter.server
    idle_server_w = g * c_off.gpu_model.idle_no_context_w + spec.overhead_idle_w
    for k, (mo, mn, to) in enumerate(zip(m_off, m_on, t_off, strict=True)):
        # Freed at t = 5 s (interval 1); off from the first tick at or after 5 + 20 = 25 s.
        off_now = k >= 5
        state = to.server_power_state[freed]
        want = [OFF] * 2 if off_now else ([SERVING] * 2 if k == 0 else [IDLE] * 2)
        assert state.tolist() == want, (k, state)
        assert to.server_state_counts()["serving"] == (4 if k == 0 else 2)
        gpu_off = np.isin(c_off.topo.gpu_server, freed)
        if off_now:
            assert (to.gpu_power_w[gpu_off] == 0.0).all()
            # Everything else is the same cluster: the energy saved is exactly two idle servers
            # less their standby power, the GPU-hours those of two servers.
            np.testing.assert_allclose(mn.energy_j - mo.energy_j,
                                       2 * (idle_server_w - spec.standby_w) * INTERVAL_S, rtol=1e-9)
            np.testing.assert_allclose(mn.gpu_energy_j - mo.gpu_energy_j,
                                       2 * g * c_off.gpu_model.idle_no_context_w * INTERVAL_S,
                                       rtol=1e-9)
            assert mo.gpu_hours == pytest.approx(2 * g * INTERVAL_S / 3600.0)
            assert mo.servers_powered == 2.0
            assert mo.facility_energy_j == pytest.approx(mo.energy_j * c_off.scenario.datacenter.pue)
        else:
            assert mo.energy_j == mn.energy_j and mo.gpu_energy_j == mn.gpu_energy_j
            assert mo.gpu_hours == pytest.approx(4 * g * INTERVAL_S / 3600.0)
            assert mo.servers_powered == 4.0
        # Serving is untouched by the power states of servers that hold nothing.
        assert (mo.finished, mo.tokens_generated) == (mn.finished, mn.tokens_generated)
        assert mn.gpu_hours == pytest.approx(4 * g * INTERVAL_S / 3600.0)  # never released


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_scale_out_wakes_servers_and_new_instances_serve_after_wake_plus_load(serving_model):
    """Regrowing after the power-off: boot (idle draw), then model load, then service."""
    wake_s = 30.0
    c = SimCluster(small(20.0, duration_s=160.0, wake_latency_s=wake_s), serving_model=serving_model)
    full = c.pool_configs
    regrow_k = 8  # at t = 40 s, when the freed servers have been off for 15 s
    metrics, tel = run(c, 0, {1: ClusterAction(pools=halved(full)),
                              regrow_k: ClusterAction(pools=full)})
    woken = table_servers(c, slice(2, None))
    g = c.topo.gpus_per_server
    t_regrow = regrow_k * INTERVAL_S
    load_s = c.tp_profiles[4].load_time_s
    # The new instances are those on the woken servers (table slots 16-31); they serve from
    # wake + load on. The others were kept (same slots, same TP).
    new = np.zeros(c.inst.n_slots, dtype=bool)
    new[16::4] = True
    np.testing.assert_allclose(c.inst.ready_at_s[new], t_regrow + wake_s + load_s)
    assert (c.inst.ready_at_s[c.inst.active & ~new] <= t_regrow).all()
    assert metrics[regrow_k].reconfigurations == 4
    gpu_woken = np.isin(c.topo.gpu_server, woken)
    for k, (m, t) in enumerate(zip(metrics, tel, strict=True)):
        t_end = (k + 1) * INTERVAL_S
        state = t.server_power_state[woken]
        if regrow_k <= k and t_end <= t_regrow + wake_s:
            assert (state == WAKING).all()
            np.testing.assert_allclose(t.gpu_power_w[gpu_woken], c.gpu_model.idle_no_context_w)
            assert m.gpu_hours == pytest.approx(4 * g * INTERVAL_S / 3600.0)  # waking is paid
        elif k >= regrow_k:
            assert (state == SERVING).all()
            assert (t.gpu_power_w[gpu_woken] >= c.gpu_model.idle_power_w - 1e-9).all()
        up = c.inst.serving(t_end)
        assert up.sum() == (8 if t_end >= t_regrow + wake_s + load_s else 4)
    # Requests arriving meanwhile wait on the instances that serve; none is lost.
    arrived = sum(m.arrived for m in metrics)
    out = sum(m.finished + m.dropped for m in metrics) + metrics[-1].in_flight
    assert out == pytest.approx(arrived, abs=1e-6)
    assert sum(m.finished for m in metrics[regrow_k:]) > 0


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_null_keeps_every_server_powered_with_unchanged_arithmetic(serving_model):
    """`idle_to_off_s: null` = a timer that never fires: the same episode, every server paid."""
    never = SimCluster(small(None, duration_s=80.0), serving_model=serving_model)
    late = SimCluster(small(86400.0, duration_s=80.0), serving_model=serving_model)
    act = {1: ClusterAction(pools=halved(never.pool_configs))}
    m_never, t_never = run(never, 3, act)
    m_late, t_late = run(late, 3, act)
    assert [m.as_dict() for m in m_never] == [m.as_dict() for m in m_late]
    for a, b in zip(t_never, t_late, strict=True):
        np.testing.assert_array_equal(a.gpu_power_w, b.gpu_power_w)
        np.testing.assert_array_equal(a.row_power_w, b.row_power_w)
        np.testing.assert_array_equal(a.server_power_state, b.server_power_state)
        assert set(np.unique(a.server_power_state)) <= {IDLE, SERVING}
    n_gpus = never.topo.n_gpus
    for m in m_never:
        assert m.gpu_hours == pytest.approx(n_gpus * INTERVAL_S / 3600.0)
        assert m.servers_powered == never.topo.n_servers


def test_vms_keep_their_servers_powered_and_start_once_the_server_is_up():
    """An IaaS server that is off boots for a VM placed on it; it stays on while the VM runs."""
    base = load_scenario("small_tapas")
    dc = dataclasses.replace(base.datacenter, idle_to_off_s=10.0,
                             server=dataclasses.replace(base.datacenter.server, wake_latency_s=20.0))
    vms = dataclasses.replace(base.vms, initial_fraction=0.0, arrivals_per_hour=3.6e5,
                              lifetime_s=1e9, gpu_power_w=(450.0,))
    s = base.with_overrides(datacenter=dc, vms=vms, duration_s=80.0)
    c = SimCluster(s, serving_model="aggregate", auto_place_vms=False)
    tel0 = c.reset(seed=0)
    iaas = np.flatnonzero(~c.topo.server_is_saas)
    assert (tel0.server_power_state[iaas] == OFF).all()  # empty at the start: steady state off
    c.advance()
    host = int(iaas[0])
    c.apply(ClusterAction(vm_servers=(host,)))
    placed_s = c.time_s
    gpus = c.topo.gpu_server == host
    g = c.topo.gpus_per_server
    saas_gpus = np.count_nonzero(c.topo.server_is_saas) * g
    while not c.done:
        m = c.advance()
        t = c.telemetry()
        assert m.gpu_hours == pytest.approx(saas_gpus * INTERVAL_S / 3600.0)  # IaaS not the service's
        if t.time_s <= placed_s + 20.0:
            assert t.server_power_state[host] == WAKING
            np.testing.assert_allclose(t.gpu_power_w[gpus], c.gpu_model.idle_no_context_w)
        else:
            assert t.server_power_state[host] == SERVING
            assert (t.gpu_power_w[gpus] > c.gpu_model.idle_power_w).all()
        others = np.setdiff1d(iaas, [host])
        assert (t.server_power_state[others] == OFF).all()
        assert m.servers_powered == np.count_nonzero(c.topo.server_is_saas) + 1


@pytest.mark.parametrize("serving_model", SERVING_MODELS)
def test_power_states_are_deterministic(serving_model):
    s = small(10.0, duration_s=100.0, wake_latency_s=15.0)
    a = SimCluster(s, serving_model=serving_model)
    b = SimCluster(s, serving_model=serving_model)
    act = {1: ClusterAction(pools=halved(a.pool_configs)), 6: ClusterAction(pools=a.pool_configs)}
    ma, ta = run(a, 5, act)
    mb, tb = run(b, 5, act)
    assert [m.as_dict() for m in ma] == [m.as_dict() for m in mb]
    for x, y in zip(ta, tb, strict=True):
        np.testing.assert_array_equal(x.server_power_state, y.server_power_state)
        np.testing.assert_array_equal(x.gpu_power_w, y.gpu_power_w)
    assert any((t.server_power_state == OFF).any() for t in ta)
    assert any((t.server_power_state == WAKING).any() for t in ta)
    # The same cluster replays the episode after a reset (no state leaks between episodes).
    mc, _ = run(a, 5, act)
    assert [m.as_dict() for m in mc] == [m.as_dict() for m in ma]


def test_description_and_capping_see_the_power_states():
    c = SimCluster(small(30.0, standby_w=40.0, wake_latency_s=90.0))
    srv = c.describe().server
    assert (srv.standby_w, srv.wake_latency_s, srv.idle_to_off_s) == (40.0, 90.0, 30.0)
    # Server power with some servers off: their standby alone, the others unchanged.
    spec = c.scenario.datacenter.server
    gpu_w = np.full(c.topo.n_gpus, 300.0)
    off = np.array([False, True, False, True])
    on = pw.server_power_w(gpu_w, spec, c.gpu_model.idle_power_w)
    some = pw.server_power_w(gpu_w, spec, c.gpu_model.idle_power_w, off)
    np.testing.assert_array_equal(some[~off], on[~off])
    np.testing.assert_array_equal(some[off], 40.0)


def test_server_draws_measured_non_gpu_power_at_idle_and_full_load():
    """Idle GPUs: gpus x idle + `overhead_idle_w`; GPUs at TDP: gpus x TDP + `overhead_max_w`."""
    c = SimCluster(small(None))
    spec = c.scenario.datacenter.server
    assert (spec.overhead_idle_w, spec.overhead_max_w) == (1624.0, 2780.0)  # DGX H100, measured
    idle_w = c.gpu_model.idle_power_w
    g, n = spec.gpus, c.topo.n_servers
    cases = [(np.full(c.topo.n_gpus, idle_w), g * idle_w + spec.overhead_idle_w),
             (np.full(c.topo.n_gpus, spec.gpu_tdp_w), g * spec.gpu_tdp_w + spec.overhead_max_w)]
    srv = c.describe().server
    assert srv.overhead_max_w == spec.overhead_max_w
    for gpu_w, want_w in cases:
        np.testing.assert_allclose(pw.server_power_w(gpu_w, spec, idle_w), np.full(n, want_w))
        np.testing.assert_allclose(srv.server_power_w(gpu_w[:g].sum(), idle_w), want_w)
    # Full load stays below the nameplate (10.2 kW): 8 x 700 + 2,780 = 8,380 W.
    assert g * spec.gpu_tdp_w + spec.overhead_max_w < spec.max_power_w


def test_server_power_spec_without_overhead_max_is_the_nameplate_remainder():
    """`ServerPowerSpec` built without `overhead_max_w` keeps the nameplate's non-GPU share."""
    srv = ServerPowerSpec(8, 10200.0, 700.0, 1624.0)
    assert srv.overhead_full_load_w == 10200.0 - 8 * 700.0
    np.testing.assert_allclose(srv.server_power_w(8 * 700.0, 72.0), 10200.0)


# ---------------------------------------------------------------------------- placement


def test_packing_leaves_whole_servers_empty_and_refills_them_in_order():
    g, n_servers = 8, 4
    tp4 = PoolConfig(2, 4, 1980.0, 128)
    full = (tp4, tp4, dataclasses.replace(tp4, n_instances=4))
    # Pools share a server when their instances fit: 1 + 1 + 2 TP-4 instances on 2 servers.
    slots = packed_first_slots(halved(full), g, n_servers)
    assert [s.tolist() for s in slots] == [[0], [4], [8, 12]]
    # Mixed TP: an instance never straddles two servers.
    mixed = (PoolConfig(3, 2, 1980.0, 8), PoolConfig(1, 4, 1980.0, 8), PoolConfig(3, 8, 1980.0, 8))
    assert [s.tolist() for s in packed_first_slots(mixed, g, n_servers)] == [[0, 2, 4], [8], [16, 24]]
    # Whole-server pools land where a server-per-pool layout puts them (the shipped layouts).
    assert [s.tolist() for s in packed_first_slots(full, g, n_servers)] == [[0, 4], [8, 12],
                                                                            [16, 20, 24, 28]]
    # Counts past the table are clipped.
    big = (PoolConfig(9, 8, 1980.0, 8),)
    assert packed_first_slots(big, g, n_servers)[0].tolist() == [0, 8, 16, 24]
    table = InstanceTable.empty(np.arange(n_servers), g)
    table.reconfigure(full, 0.0, {4: 60.0})
    assert table.occupied_servers().tolist() == [True] * 4
    table.reconfigure(halved(full), 10.0, {4: 60.0})
    assert table.occupied_servers().tolist() == [True, True, False, False]
    table.reconfigure((tp4, tp4, tp4), 20.0, {4: 60.0})
    assert table.occupied_servers().tolist() == [True, True, True, False]  # first emptied first


def test_defer_start_delays_only_instances_on_booting_servers():
    table = InstanceTable.empty(np.arange(2), 8)
    tp4 = PoolConfig(4, 4, 1980.0, 128)
    table.reconfigure((tp4,), 0.0, {4: 60.0})
    table.ready_at_s[:] = np.where(table.active, 0.0, table.ready_at_s)  # up and serving
    table.reconfigure((tp4,), 100.0, {4: 60.0})  # unchanged: kept
    table.defer_start(np.array([100.0, 130.0]), 100.0, {4: 60.0})
    np.testing.assert_array_equal(table.ready_at_s[[0, 4]], [0.0, 0.0])  # kept, server up
    np.testing.assert_array_equal(table.ready_at_s[[8, 12]], [190.0, 190.0])  # boot + load


# ---------------------------------------------------------------------------- the state machine


def test_state_machine_timers():
    p = ServerPowerStates(3, wake_latency_s=30.0, idle_to_off_s=20.0)
    p.reset(np.array([True, False, False]))
    assert p.state.tolist() == [SERVING, OFF, OFF]
    p.update(0.0, np.array([False, False, False]))
    assert p.state.tolist() == [IDLE, OFF, OFF]
    p.update(19.5, np.array([False, False, False]))
    assert p.state.tolist() == [IDLE, OFF, OFF]
    p.update(20.0, np.array([False, False, False]))
    assert p.state.tolist() == [OFF, OFF, OFF]
    p.wake(np.array([False, True, False]), 25.0)
    assert p.state.tolist() == [OFF, WAKING, OFF]
    np.testing.assert_array_equal(p.up_at_s(25.0), [25.0, 55.0, 25.0])
    p.update(40.0, np.array([False, False, True]))  # a VM on an off server: it boots too
    assert p.state.tolist() == [OFF, WAKING, WAKING]
    # The first server's occupant left while it booted: idle from its boot end, off 20 s later.
    p.update(55.0, np.array([False, False, True]))
    assert p.state.tolist() == [OFF, IDLE, WAKING]
    p.update(70.0, np.array([False, False, True]))
    assert p.state.tolist() == [OFF, IDLE, SERVING]
    p.update(75.0, np.array([False, False, True]))
    assert p.state.tolist() == [OFF, OFF, SERVING]
    assert p.counts() == {"off": 2, "waking": 0, "idle": 0, "serving": 1}
    assert list(p.counts()) == list(SERVER_POWER_STATES)
    never = ServerPowerStates(2, wake_latency_s=30.0, idle_to_off_s=None)
    never.reset(np.array([True, False]))
    never.update(1e9, np.array([False, False]))
    assert never.state.tolist() == [IDLE, IDLE] and not never.any_down


# ---------------------------------------------------------------------------- the schema


@pytest.mark.parametrize(("server", "field"), [
    ({"standby_w": 2500.0}, "datacenter.server.standby_w"),  # above overhead_idle_w
    ({"standby_w": -1.0}, "standby_w"),
    ({"wake_latency_s": -5.0}, "wake_latency_s"),
])
def test_schema_refuses_bad_power_state_fields(server, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        small(20.0, **server)


@pytest.mark.parametrize(("server", "field", "why"), [
    ({"overhead_max_w": 1000.0}, "overhead_idle_w", "exceeds overhead_max_w (1000 W)"),
    ({"max_power_w": 7000.0}, "overhead_max_w", "max_power_w - gpus x gpu_tdp_w (1400 W)"),
    ({"overhead_max_w": 4601.0}, "overhead_max_w", "(4600 W)"),
])
def test_schema_refuses_overhead_max_outside_idle_and_nameplate(tmp_path, server, field, why):
    """`overhead_idle_w <= overhead_max_w <= max_power_w - gpus x gpu_tdp_w`, else one clear line."""
    data = yaml.safe_load((ROOT / "envs/scenarios/small.yaml").read_text())
    data["datacenter"]["server"] = {**data["datacenter"].get("server", {}), **server}
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    msg = str(info.value)
    assert msg.startswith(f"{file}: field 'datacenter.server.{field}' = "), msg
    assert why in msg and "\n" not in msg, msg
    assert load_scenario("small_b200").datacenter.server.overhead_max_w == 3580.0


def test_schema_refuses_negative_idle_to_off_and_accepts_null():
    with pytest.raises(ScenarioError, match="idle_to_off_s"):
        small(-1.0)
    assert small(None).datacenter.idle_to_off_s is None
    assert load_scenario("small").datacenter.idle_to_off_s == 200.0
