"""Tests of the GPU/aisle thermal models and of the shipped H100 fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_cluster_gym.envs.sim.thermal import (
    DEFAULT_FIT_PATH,
    AisleCoolingParams,
    GpuThermalState,
    ThermalError,
    ThermalParams,
    inlet_steady_state_c,
    steady_state_temp_c,
    step_gpu_temperature,
    step_inlet_temperature,
    step_response_c,
)
from llm_cluster_gym.scripts.fit_thermal import RECORDINGS_DIR, load_recording, simulate_with_params


@pytest.fixture(scope="module")
def params() -> ThermalParams:
    return ThermalParams.load()


@pytest.fixture(scope="module")
def fit_json() -> dict:
    return json.loads(DEFAULT_FIT_PATH.read_text())


@pytest.mark.parametrize("dt_s", [0.01, 0.1, 1.0, 7.5, 60.0])
def test_discrete_step_matches_analytic_step_response(params, dt_s):
    # Includes dt far above tau_die (~0.2 s): the exact discretisation must still agree.
    power_w = np.array([0.0, 120.0, 450.0, 700.0])
    inlet_c = np.array([20.0, 25.0, 30.0, 35.0])
    state = GpuThermalState.zeros(4)
    n_steps = int(np.ceil(300.0 / dt_s))
    for k in range(1, n_steps + 1):
        temp_c = step_gpu_temperature(state, power_w, inlet_c, dt_s, params)
        if k in (1, 2, n_steps // 2, n_steps):
            want = step_response_c(k * dt_s, power_w, inlet_c, params)
            np.testing.assert_allclose(temp_c, want, rtol=0, atol=1e-9)
    assert params.tau_die_s < 7.5


def test_steady_state_is_inlet_plus_total_resistance_times_power(params):
    power_w = np.array([0.0, 123.0, 700.0])
    inlet_c = np.array([18.0, 24.0, 27.0])
    want = inlet_c + (params.r_die_c_per_w + params.r_sink_c_per_w) * power_w
    np.testing.assert_allclose(steady_state_temp_c(power_w, inlet_c, params), want)
    # A step much longer than both time constants lands on it from any start.
    state = GpuThermalState(np.array([5.0, 0.0, 40.0]), np.array([3.0, 0.0, 1.0]))
    got = step_gpu_temperature(state, power_w, inlet_c, 100 * params.tau_sink_s, params)
    np.testing.assert_allclose(got, want, atol=1e-9)
    # and the analytic response tends to it.
    np.testing.assert_allclose(step_response_c(1e9, power_w, inlet_c, params), want)


def test_steady_state_constructor_is_a_fixed_point(params):
    power_w = np.array([122.0, 690.0])
    state = GpuThermalState.steady(power_w, params)
    t0 = step_gpu_temperature(state, power_w, 25.0, 3.0, params)
    np.testing.assert_allclose(t0, steady_state_temp_c(power_w, 25.0, params))


def test_negative_dt_is_rejected(params):
    with pytest.raises(ThermalError, match="dt_s"):
        step_gpu_temperature(GpuThermalState.zeros(1), np.ones(1), np.zeros(1), -1.0, params)


def test_shipped_fit_is_plausible_and_better_than_single_node(params, fit_json):
    assert 0 < params.tau_die_s < params.tau_sink_s
    # 700 W over a ~30 C inlet must land between the measured ~65-70 C and the limits.
    t_700_c = steady_state_temp_c(700.0, fit_json["joint_fit_evaluation"][
        "h100_calibration_steps.json.gz"]["inlet_offset_c"], params)
    assert 60.0 < float(t_700_c) < params.slowdown_temp_c
    assert (params.slowdown_temp_c, params.max_operating_temp_c, params.shutdown_temp_c) == (
        89.0, 87.0, 95.0)
    for ev in fit_json["joint_fit_evaluation"].values():
        assert ev["two_node_rmse_c"] < ev["single_node_rmse_c"]


@pytest.mark.parametrize(
    "name",
    ["h100_calibration_steps.json.gz", "h100_steps_20261125.json.gz", "h100_probe.json"],
)
def test_shipped_fit_reproduces_recording_within_recorded_rmse(params, fit_json, name):
    ev = fit_json["joint_fit_evaluation"][name]
    rec = load_recording(RECORDINGS_DIR / name)
    sim_c = simulate_with_params(rec, params, ev["inlet_offset_c"])
    rmse_c = float(np.sqrt(np.mean((sim_c - rec.temp_end_c) ** 2)))
    assert rmse_c <= ev["two_node_rmse_c"] + 0.01
    assert rmse_c == pytest.approx(ev["two_node_rmse_c"], abs=0.01)
    assert rmse_c < 3.0  # a whole-recording error of degrees, not tens of degrees


def test_energy_counter_power_integrates_to_counter_total():
    rec = load_recording(RECORDINGS_DIR / "h100_steps_20261125.json.gz")
    samples = rec.raw["samples"]
    t0 = samples[0][0]
    t = np.array([s[0] for s in samples]) - t0
    e_mj = np.array([s[7] for s in samples], dtype=float)
    end_s = rec.t_s[-1] + 0.25
    counted_j = (np.interp(end_s, t, e_mj) - e_mj[0]) / 1000.0
    # Windows of 0.25 s: the integral of the derived power is the counter's own difference
    # (up to the counter's update-time resolution at the two ends).
    assert float(np.sum(rec.power_w) * 0.25) == pytest.approx(counted_j, rel=2e-3)
    # and the mean agrees with the (lagged, averaged) NVML power reading over the run.
    nvml_w = np.array([s[2] for s in samples])
    assert float(np.mean(rec.power_w)) == pytest.approx(float(np.mean(nvml_w[t < end_s])), rel=0.02)


def _write(tmp_path, data):
    p = tmp_path / "fit.json"
    p.write_text(json.dumps(data))
    return p


def test_load_rejects_negative_tau_naming_the_field(tmp_path, fit_json):
    data = json.loads(json.dumps(fit_json))
    data["params"]["tau_sink_s"] = -5.0
    with pytest.raises(ThermalError, match=r"params\.tau_sink_s.*-5\.0") as ei:
        ThermalParams.load(_write(tmp_path, data))
    assert "fit.json" in str(ei.value)


def test_load_rejects_missing_field_naming_it(tmp_path, fit_json):
    data = json.loads(json.dumps(fit_json))
    del data["params"]["r_die_c_per_w"]
    with pytest.raises(ThermalError, match=r"params\.r_die_c_per_w.*missing"):
        ThermalParams.load(_write(tmp_path, data))
    data = json.loads(json.dumps(fit_json))
    data["thresholds"]["slowdown_temp_c"] = "hot"
    with pytest.raises(ThermalError, match=r"thresholds\.slowdown_temp_c.*'hot'"):
        ThermalParams.load(_write(tmp_path, data))
    with pytest.raises(ThermalError, match="not found"):
        ThermalParams.load(tmp_path / "nope.json")
    assert isinstance(ThermalError("x"), ValueError)


@settings(max_examples=60, deadline=None)
@given(
    r_die=st.floats(1e-4, 0.2),
    tau_die=st.floats(0.01, 50.0),
    r_sink=st.floats(1e-4, 0.2),
    tau_sink=st.floats(0.01, 2000.0),
    power_w=st.floats(0.0, 1500.0),
    inlet_c=st.floats(-10.0, 45.0),
    dt_s=st.floats(1e-3, 500.0),
    n_steps=st.integers(1, 40),
)
def test_cold_start_stays_between_inlet_and_steady_state(
    r_die, tau_die, r_sink, tau_sink, power_w, inlet_c, dt_s, n_steps
):
    p = ThermalParams(r_die, tau_die, r_sink, tau_sink, 89.0, 87.0, 95.0, "hypothesis")
    state = GpuThermalState.zeros(2)
    power = np.array([power_w, power_w / 2])
    inlet = np.full(2, inlet_c)
    ss = steady_state_temp_c(power, inlet, p)
    prev = inlet.copy()
    for _ in range(n_steps):
        temp = step_gpu_temperature(state, power, inlet, dt_s, p)
        assert np.all(temp >= inlet - 1e-9) and np.all(temp <= ss + 1e-9)
        assert np.all(temp >= prev - 1e-9)  # monotone rise toward steady state
        prev = temp


def test_aisle_inlet_model(tmp_path):
    a = AisleCoolingParams.load()
    assert 18.0 <= a.supply_temp_c <= 27.0  # ASHRAE recommended envelope
    cap = np.array([100e3, 100e3, 100e3])
    load = np.array([50e3, 100e3, 150e3])
    ss = inlet_steady_state_c(load, cap, 10.0, a)
    np.testing.assert_allclose(ss[:2], a.supply_temp_c)  # at/below capacity: setpoint
    assert ss[2] == pytest.approx(a.supply_temp_c + 0.5 * a.overload_c_per_frac)
    hot = inlet_steady_state_c(load, cap, a.supply_temp_c + 10.0, a)
    np.testing.assert_allclose(hot - ss, 10.0 * a.outside_temp_coeff)
    # first-order approach: one tau covers 1 - 1/e of the gap, the input is untouched.
    inlet0 = np.full(3, a.supply_temp_c)
    one_tau = step_inlet_temperature(inlet0, load, cap, 10.0, a.tau_inlet_s, a)
    np.testing.assert_allclose(one_tau - inlet0, (ss - inlet0) * (1 - np.exp(-1.0)))
    assert np.all(inlet0 == a.supply_temp_c)
    halves = step_inlet_temperature(inlet0, load, cap, 10.0, a.tau_inlet_s / 2, a)
    halves = step_inlet_temperature(halves, load, cap, 10.0, a.tau_inlet_s / 2, a)
    np.testing.assert_allclose(halves, one_tau)
    with pytest.raises(ThermalError, match="capacity_w"):
        step_inlet_temperature(inlet0, load, np.array([1.0, 0.0, 1.0]), 10.0, 1.0, a)
    data = json.loads((DEFAULT_FIT_PATH.parent / "aisle_cooling_default.json").read_text())
    data["params"]["tau_inlet_s"] = 0
    with pytest.raises(ThermalError, match=r"params\.tau_inlet_s.*0"):
        AisleCoolingParams.load(_write(tmp_path, data))
