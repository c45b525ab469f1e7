"""IaaS VM types: power that varies over a VM's lifetime, and placement by per-type history only.

`envs/sim/vms.py`: a type's VMs follow a daily cosine plus their own Ornstein-Uhlenbeck noise,
clipped to the GPU's range; the waiting VM's expected power (what telemetry and the observation
show) is the P95 of its type's past readings, or the declared mean before any VM of it ran.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.envs.backend import ClusterAction
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import ScenarioError, VmSpec, VmTypeSpec, load_scenario
from llm_cluster_gym.envs.sim.vms import EXPECTED_POWER_PERCENTILE, VmPool

ROOT = Path(__file__).resolve().parents[1]
IDLE_W, LIMIT_W = 122.0, 700.0  # the H100 profile's idle power and power limit (small_tapas)


def vm_type(name: str = "t", *, share: float = 1.0, mean: float = 400.0, lifetime_s: float = 1e12,
            amplitude: float = 0.0, peak_hour: float = 0.0, sd_w: float = 0.0,
            tau_s: float | None = None) -> VmTypeSpec:
    return VmTypeSpec(name=name, share=share, mean_gpu_w=mean, lifetime_s=lifetime_s,
                      diurnal_amplitude=amplitude, diurnal_peak_hour=peak_hour, noise_sd_w=sd_w,
                      noise_tau_s=tau_s)


def full_pool(types: tuple[VmTypeSpec, ...], n_hosts: int, seed: int = 0,
              clock_offset_s: float = 0.0) -> VmPool:
    """Every one of `n_hosts` servers holds a VM from the start, none leaves, none arrives."""
    pool = VmPool(VmSpec(initial_fraction=1.0, types=types), np.arange(n_hosts), n_hosts,
                  gpu_idle_w=IDLE_W, gpu_limit_w=LIMIT_W, clock_offset_s=clock_offset_s)
    pool.reset(np.random.default_rng(seed), duration_s=1e9)
    return pool


def trajectory(pool: VmPool, dt_s: float, n_ticks: int) -> np.ndarray:
    """(ticks, servers) per-GPU power, one row per tick."""
    out = np.empty((n_ticks, pool.n_servers))
    for i in range(n_ticks):
        pool.advance(i * dt_s, dt_s)
        out[i] = pool.gpu_power_w
    return out


# ---------------------------------------------------------------------------- the power pattern


@pytest.mark.parametrize("dt_s", [5.0, 600.0])
def test_noise_has_the_declared_mean_sd_and_correlation_for_any_tick(dt_s):
    """An OU process stepped exactly: stationary sd and lag correlation exp(-dt / tau) at any dt."""
    mean_w, sd_w, tau_s, n_hosts, n_ticks = 400.0, 30.0, 300.0, 2000, 400
    p = trajectory(full_pool((vm_type(mean=mean_w, sd_w=sd_w, tau_s=tau_s),), n_hosts), dt_s, n_ticks)
    assert p.min() > IDLE_W and p.max() < LIMIT_W  # 9 sd from either bound: no clipping here
    # Effective independent samples: per VM, the run's length over 2 tau (at least one per tick).
    n_eff = n_hosts * min(n_ticks, n_ticks * dt_s / (2 * tau_s))
    assert abs(p.mean() - mean_w) < 5 * sd_w / math.sqrt(n_eff)
    assert abs(p.std() / sd_w - 1.0) < 5 / math.sqrt(2 * n_eff) + 0.005
    x = p - mean_w
    rho = (x[1:] * x[:-1]).mean() / (x * x).mean()
    assert abs(rho - math.exp(-dt_s / tau_s)) < 0.02
    # Each VM has its own noise: two VMs are uncorrelated.
    assert abs(np.corrcoef(x[:, 0], x[:, 1])[0, 1]) < 0.3


def test_daily_swing_follows_the_declared_cosine_on_the_scenario_clock():
    mean_w, amp, peak_h, offset_s, dt_s = 400.0, 0.25, 15.0, 7200.0, 900.0
    pool = full_pool((vm_type(mean=mean_w, amplitude=amp, peak_hour=peak_h),), 3, clock_offset_s=offset_s)
    p = trajectory(pool, dt_s, 96)  # one day
    mid_h = (offset_s + (np.arange(96) + 0.5) * dt_s) / 3600.0  # each tick is read at its middle
    want = mean_w * (1 + amp * np.cos(2 * np.pi * (mid_h - peak_h) / 24.0))
    np.testing.assert_allclose(p, np.repeat(want[:, None], 3, axis=1), rtol=1e-12)
    assert mid_h[int(np.argmax(p[:, 0]))] % 24 == pytest.approx(peak_h, abs=0.25)
    assert p.mean() == pytest.approx(mean_w, rel=1e-9)  # a whole day averages to the mean


def test_power_is_clipped_to_the_gpus_idle_power_and_limit():
    deep = vm_type("deep", share=0.5, mean=300.0, amplitude=1.0)  # trough 0 W: clipped at idle
    hot = vm_type("hot", share=0.5, mean=690.0, sd_w=60.0, tau_s=60.0)  # often past the 700 W limit
    pool = full_pool((deep, hot), 400)
    p = trajectory(pool, 600.0, 200)
    kind = pool.kind
    assert p.min() == IDLE_W and p.max() == LIMIT_W
    assert (p[:, kind == 0] == IDLE_W).any() and (p[:, kind == 1] == LIMIT_W).mean() > 0.3
    assert ((p >= IDLE_W) & (p <= LIMIT_W)).all()


def test_constant_types_draw_exactly_their_level():
    pool = full_pool((vm_type("a", share=0.25, mean=300.0), vm_type("b", share=0.75, mean=450.0)), 200)
    p = trajectory(pool, 5.0, 20)
    np.testing.assert_array_equal(p, np.broadcast_to(pool.types.mean_w[pool.kind], p.shape))
    assert 0.6 < (pool.kind == 1).mean() < 0.9  # the shares are the types' probabilities


# ---------------------------------------------------------------------------- in the simulator

NOISY = vm_type("noisy", share=0.5, mean=420.0, lifetime_s=600.0, amplitude=0.2, peak_hour=14.0,
                sd_w=60.0, tau_s=120.0)
STEADY = vm_type("steady", share=0.5, mean=300.0, lifetime_s=900.0)


@functools.cache
def _base():
    return load_scenario("small_tapas")


def typed_scenario(*types: VmTypeSpec, arrivals_per_hour: float = 60.0, initial_fraction: float = 0.5,
                   duration_s: float = 600.0):
    base = _base()
    vms = VmSpec(arrivals_per_hour=arrivals_per_hour, initial_fraction=initial_fraction, types=types)
    return base.with_overrides(vms=vms, duration_s=duration_s)


def run_vms(scenario, seed: int, intervals: int) -> tuple[np.ndarray, np.ndarray]:
    """Per interval: every server's VM power and the GPUs' telemetry power (first-fit placement)."""
    c = SimCluster(scenario, serving_model="aggregate")
    c.reset(seed=seed)
    vm_w, gpu_w = [], []
    for _ in range(intervals):
        c.advance()
        vm_w.append(c.vms.gpu_power_w.copy())
        gpu_w.append(np.array(c.telemetry().gpu_power_w))
    return np.array(vm_w), np.array(gpu_w)


def test_same_seed_same_trajectory_and_another_seed_another():
    s = typed_scenario(NOISY, STEADY)
    a_vm, a_gpu = run_vms(s, seed=7, intervals=40)
    b_vm, b_gpu = run_vms(s, seed=7, intervals=40)
    np.testing.assert_array_equal(a_vm, b_vm)
    np.testing.assert_array_equal(a_gpu, b_gpu)
    c_vm, _ = run_vms(s, seed=8, intervals=40)
    assert not np.array_equal(a_vm, c_vm)
    assert np.unique(a_vm[a_vm > 0]).size > 40  # the noisy type's power moves


def test_turning_noise_on_leaves_every_other_draw_where_it_was():
    quiet = dataclasses.replace(NOISY, noise_sd_w=0.0, noise_tau_s=None, diurnal_amplitude=0.0)
    draws = []
    for t in (quiet, NOISY):
        c = SimCluster(typed_scenario(t, STEADY))
        c.reset(seed=3)
        draws.append((c.vms.drawn_arrivals(), c.vms.kind.copy(), c.vms.leave_at_s.copy(),
                      c.trace.arrival_s.copy(), c.trace.input_tokens.copy(), c.faults.active_names(100.0)))
    (arr_q, kind_q, leave_q, trace_q, tok_q, f_q), (arr_n, kind_n, leave_n, trace_n, tok_n, f_n) = draws
    for x, y in zip(arr_q, arr_n, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(arr_q[0]) > 0 and (kind_q >= 0).any()
    np.testing.assert_array_equal(kind_q, kind_n)
    np.testing.assert_array_equal(leave_q, leave_n)
    np.testing.assert_array_equal(trace_q, trace_n)
    np.testing.assert_array_equal(tok_q, tok_n)
    assert f_q == f_n


def test_legacy_levels_are_constant_types_drawn_as_before():
    """`gpu_power_w` without types: the same draws `rng.choice(levels)` / `rng.exponential` made."""
    spec = VmSpec(arrivals_per_hour=600.0, lifetime_s=900.0, gpu_power_w=(300.0, 450.0, 600.0, 690.0),
                  initial_fraction=0.5)
    pool = VmPool(spec, np.arange(8), 8, gpu_idle_w=IDLE_W, gpu_limit_w=LIMIT_W)
    pool.reset(np.random.default_rng(11), duration_s=3600.0)
    rng = np.random.default_rng(11)  # the draws as vms.py made them before types
    hosts = rng.choice(np.arange(8), size=4, replace=False)
    power = rng.choice(spec.gpu_power_w, size=4)
    life = rng.exponential(spec.lifetime_s, size=4)
    n = rng.poisson(600.0 / 3600.0 * 3600.0)
    arrival = np.sort(rng.uniform(0.0, 3600.0, size=n))
    arrival_power = rng.choice(spec.gpu_power_w, size=n)
    arrival_life = rng.exponential(spec.lifetime_s, size=n)
    np.testing.assert_array_equal(pool.gpu_power_w[hosts], power)
    np.testing.assert_array_equal(pool.leave_at_s[hosts], life)
    got_s, got_kind, got_life = pool.drawn_arrivals()
    np.testing.assert_array_equal(got_s, arrival)
    np.testing.assert_array_equal(np.asarray(spec.gpu_power_w)[got_kind], arrival_power)
    np.testing.assert_array_equal(got_life, arrival_life)


def test_expected_power_comes_from_the_past_only():
    """Declared mean before any VM of the type ran; then exactly the P95 of its past readings.

    Read where a controller reads it: the observation, through the controllers' view.
    """
    s = typed_scenario(NOISY, STEADY, arrivals_per_hour=720.0, initial_fraction=0.0, duration_s=1200.0)
    c = SimCluster(s, serving_model="aggregate", auto_place_vms=False)
    env = ClusterEnv(task="thermal", backend=c)
    env.reset(seed=5)
    view = ControllerContext.from_env(env).view
    noisy = c.vms.types.names.index("noisy")
    readings: list[float] = []  # every noisy VM's power at every interval end, as an operator read it
    checked_before = checked_after = 0
    truncated = False
    while not truncated:
        obs, _, _, truncated, _ = env.step(None)
        readings += list(c.vms.gpu_power_w[c.vms.kind == noisy])
        tel = c.telemetry()
        if not c.vms.pending:
            assert tel.pending_vm_expected_gpu_w == 0.0 and view.pending_vm_expected_gpu_w(obs) == 0.0
            continue
        kind = c.vms.pending_kind[0]
        want = float(c.vms.types.mean_w[kind])
        if kind == noisy and readings:
            want = float(np.percentile(readings, EXPECTED_POWER_PERCENTILE))
            checked_after += 1
        elif kind == noisy:
            checked_before += 1
        assert tel.pending_vm_expected_gpu_w == want
        assert view.pending_vm_expected_gpu_w(obs) == pytest.approx(want, rel=1e-6)
        if (server := c.vms.first_fit()) is not None:
            c.apply(ClusterAction(vm_servers=(server,)))
    assert checked_before >= 1 and checked_after >= 10
    # The readings moved the expectation off the declared mean, toward the P95 of what ran.
    p95 = float(np.percentile(readings, EXPECTED_POWER_PERCENTILE))
    assert c.vms.expected_gpu_w(noisy) == p95 != NOISY.mean_gpu_w
    assert p95 > np.mean(readings) + NOISY.noise_sd_w


def test_expected_power_never_reads_power_still_to_come():
    """Two episodes identical up to interval 60, whose VMs then draw other noise: the expected
    power shown up to that point is identical; afterwards it differs (it follows the readings)."""
    s = typed_scenario(dataclasses.replace(NOISY, share=1.0), arrivals_per_hour=720.0, initial_fraction=0.0,
                       duration_s=1200.0)
    shown = []
    for swap in (False, True):
        c = SimCluster(s, serving_model="aggregate", auto_place_vms=False)
        c.reset(seed=9)
        seen = []
        for i in range(c.n_intervals):
            if swap and i == 60:  # every VM's power from now on draws other noise
                c.vms._noise_rng = np.random.default_rng(12345)
            c.advance()
            seen.append(c.telemetry().pending_vm_expected_gpu_w)
            if c.vms.pending and (server := c.vms.first_fit()) is not None:
                c.apply(ClusterAction(vm_servers=(server,)))  # one VM placed per interval, first fit
        shown.append(np.array(seen))
    # Nothing ran before the first VM waited (no VM at the start): the declared mean.
    assert shown[0][np.flatnonzero(shown[0])[0]] == NOISY.mean_gpu_w
    np.testing.assert_array_equal(shown[0][:60], shown[1][:60])
    assert not np.array_equal(shown[0][60:], shown[1][60:])


def test_bounded_history_keeps_a_uniform_sample():
    from llm_cluster_gym.envs.sim.vms import PowerHistory

    h = PowerHistory(1, np.random.default_rng(0), size=1000)
    for chunk in np.array_split(np.arange(20000.0), 37):
        h.add(0, chunk)
    assert h.samples.shape == (1, 1000) and h.seen[0] == 20000
    # A uniform sample of 0..19999: its P95 near 19,000 (binomial spread of the sample's P95).
    assert h.percentile_w(0, 95.0) == pytest.approx(19000.0, abs=300.0)
    assert h.samples[0].mean() == pytest.approx(10000.0, abs=600.0)


# ---------------------------------------------------------------------------- bad input


def _typed_yaml(types: list[dict]) -> dict:
    data = yaml.safe_load((ROOT / "envs" / "scenarios" / "small_tapas.yaml").read_text())
    data = copy.deepcopy(data)
    data["vms"] = {"arrivals_per_hour": 60, "initial_fraction": 0.5, "types": types}
    return data


GOOD = [{"name": "train", "share": 0.6, "mean_gpu_w": 650, "lifetime_s": 3600, "noise_sd_w": 20,
         "noise_tau_s": 300},
        {"name": "infer", "share": 0.4, "mean_gpu_w": 350, "lifetime_s": 900, "diurnal_amplitude": 0.3,
         "diurnal_peak_hour": 14}]


def _with(i: int, **changes) -> list[dict]:
    types = copy.deepcopy(GOOD)
    types[i].update(changes)
    for k, v in list(types[i].items()):
        if v is None:
            del types[i][k]
    return types


BAD = [
    (_with(1, share=0.3), "vms.types", "[0.6, 0.3]", "sum to 0.9"),
    (_with(0, noise_sd_w=-5), "vms.types[0].noise_sd_w", "-5.0", "[0, 2000] W"),
    (_with(1, mean_gpu_w=800), "vms.types[1].mean_gpu_w", "800.0", "power limit"),
    (_with(0, noise_tau_s=None), "vms.types[0].noise_tau_s", "None", "noise_sd_w > 0"),
    (_with(1, name="train"), "vms.types[1].name", "'train'", "distinct"),
    (_with(0, diurnal_amplitude=1.5), "vms.types[0].diurnal_amplitude", "1.5", "[0, 1]"),
]


def test_good_types_load(tmp_path):
    s = load_scenario(_write(tmp_path, _typed_yaml(GOOD)))
    assert [t.name for t in s.vms.types] == ["train", "infer"]
    assert s.vms.types[0].noise_tau_s == 300.0 and s.vms.types[1].noise_tau_s is None


def _write(folder: Path, data: dict) -> Path:
    path = folder / "typed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(("types", "field", "value", "why"), BAD,
                         ids=["shares", "negative-sd", "mean-above-limit", "no-tau", "same-name", "amp"])
def test_bad_types_name_file_field_and_value(tmp_path, types, field, value, why):
    path = _write(tmp_path, _typed_yaml(types))
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: field '{field}' = {value}: ") and why in msg and "\n" not in msg, msg


def test_legacy_fields_beside_types_are_refused(tmp_path):
    data = _typed_yaml(GOOD)
    data["vms"]["gpu_power_w"] = [300, 450]
    with pytest.raises(ScenarioError, match=r"field 'vms.gpu_power_w' = \[300.0, 450.0\]: is ignored"):
        load_scenario(_write(tmp_path, data))


def test_cli_exits_2_with_one_line_on_bad_shares(tmp_path):
    path = _write(tmp_path, _typed_yaml(_with(1, share=0.3)))
    exe = Path(sys.executable).parent / "llm-cluster"
    cli = str(exe) if exe.exists() else shutil.which("llm-cluster")
    assert cli, "the console script is not installed (pip install -e .)"
    res = subprocess.run([cli, "simulate", "--scenario", str(path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "field 'vms.types'" in lines[0] and "typed.yaml" in lines[0], res.stderr
