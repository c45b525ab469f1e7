"""Spatial thermal variation (issue 19): rack inlet spread along a row and per-GPU position offsets.

Off by default (every GPU at its aisle's inlet, as before); when set, each GPU's air is its aisle's
inlet plus a fixed offset, so GPUs of one server heat, and slow down, one by one instead of in
identical blocks of eight; the slowdown's clock ceiling aims at each GPU's own air.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario
from llm_cluster_gym.envs.sim.thermal import ThermalParams
from llm_cluster_gym.envs.sim.throttle import THERMAL_RELEASE_C
from llm_cluster_gym.envs.sim.topology import build_topology

REAR_HOT = (0.0, 0.0, 0.0, 0.0, 6.0, 6.0, 6.0, 6.0)


def _tapas(spread_c: float = 0.0, by_gpu: tuple[float, ...] = (), supply_c: float = 24.0,
           duration_s: float = 150.0):
    s = load_scenario("small_tapas")
    d = s.datacenter
    d = dataclasses.replace(
        d, racks_per_row=2, servers_per_rack=1,  # same 8 servers, two racks per row
        server=dataclasses.replace(d.server, gpu_inlet_offsets_c=by_gpu),
        cooling=dataclasses.replace(d.cooling, rack_inlet_spread_c=spread_c, supply_temp_c=supply_c))
    return s.with_overrides(datacenter=d, duration_s=duration_s)


def test_defaults_leave_every_gpu_at_its_aisle_inlet() -> None:
    topo = build_topology(load_scenario("small_tapas"))
    assert topo.gpu_inlet_offset_c is None
    inlet = np.array([25.0, 27.0])
    assert np.array_equal(topo.gpu_inlet_c(inlet), inlet[topo.gpu_aisle])


def test_offsets_add_rack_position_and_gpu_position() -> None:
    topo = build_topology(_tapas(spread_c=3.0, by_gpu=REAR_HOT))
    off = topo.gpu_inlet_offset_c.reshape(topo.n_servers, 8)
    rack_in_row = topo.server_rack % 2
    for srv in range(topo.n_servers):
        expected = 3.0 * rack_in_row[srv] + np.array(REAR_HOT)
        assert off[srv].tolist() == pytest.approx(expected.tolist())
    inlet = np.array([24.0, 24.0])
    assert topo.gpu_inlet_c(inlet).max() == pytest.approx(24.0 + 3.0 + 6.0)
    assert topo.gpu_inlet_c(inlet).min() == pytest.approx(24.0)


def test_offsets_must_fit_the_server() -> None:
    with pytest.raises(ScenarioError, match=r"gpu_inlet_offsets_c' = \[1.0, 2.0\]: has 2 values"):
        _tapas(by_gpu=(1.0, 2.0))


def _run(s):
    c = SimCluster(s, serving_model="request")
    c.reset(seed=0)
    events = 0
    while not c.done:
        events += c.advance().thermal_throttle_events
    return c, events


def test_offsets_spread_gpu_temperatures_inside_a_server() -> None:
    c, _ = _run(_tapas(spread_c=3.0, by_gpu=REAR_HOT))
    temp = c.telemetry().gpu_temp_c.reshape(-1, 8)
    # Same load on a server's GPUs (tensor parallel): the rear ones run about 6 C hotter.
    saas = c.topo.saas_servers
    rear_minus_front = temp[saas, 4:].mean(axis=1) - temp[saas, :4].mean(axis=1)
    assert rear_minus_front == pytest.approx(np.full(len(saas), 6.0), abs=1.0)
    c0, _ = _run(_tapas())
    t0 = c0.telemetry().gpu_temp_c.reshape(-1, 8)[saas]
    assert np.ptp(t0, axis=1).max() < np.ptp(temp[saas], axis=1).min()


def test_slowdown_engages_gpu_by_gpu_and_aims_at_each_gpus_own_air() -> None:
    """At an inlet where only the hottest positions cross 89 C, only they slow down."""
    th = ThermalParams.load()
    # Supply such that 700 W on a +9 C position just crosses slowdown, a +0 C one stays far below.
    supply_c = th.slowdown_temp_c - th.r_total_c_per_w * 700.0 - 9.0 + 2.0
    c, events = _run(_tapas(spread_c=3.0, by_gpu=REAR_HOT, supply_c=supply_c, duration_s=300.0))
    offsets = c.topo.gpu_inlet_offset_c
    hot = offsets == offsets.max()
    assert events > 0
    thr = c.slowdown.throttled
    assert not thr[offsets == 0.0].any()       # the coolest positions never slow down
    per_server = thr.reshape(-1, 8).sum(axis=1)
    assert ((per_server > 0) & (per_server < 8)).any()  # no longer blocks of eight
    # Steady state under the ceiling: a throttled GPU sits near its target, not far below it.
    temp = c.telemetry().gpu_temp_c
    if thr.any():
        assert temp[thr].min() > th.slowdown_temp_c - THERMAL_RELEASE_C - 3.0
    assert hot[thr].all()
