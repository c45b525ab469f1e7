"""The TAPAS-scale evaluation: its statistics, its argument checks and a short paired run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.envs.sim.topology import build_topology
from llm_cluster_gym.scripts import tapas_scale as ts


def test_reduction_is_a_ratio_of_sums_with_a_bootstrap_interval_around_it():
    baseline = np.array([100.0, 0.0, 300.0, 50.0])
    policy = np.array([10.0, 5.0, 30.0, 0.0])
    point, lo, hi = ts.reduction_ci(baseline, policy)
    assert point == pytest.approx(1 - 45.0 / 450.0)
    assert lo <= point <= hi
    assert hi <= 1.0 and lo < hi  # harm is never negative; four unequal units spread
    # Same data, same interval (the bootstrap is seeded).
    assert ts.reduction_ci(baseline, policy) == (point, lo, hi)


def test_day_clustered_interval_sums_each_days_seeds_and_is_wider():
    """Seeds of one day share its weather: the stricter interval resamples days, not units."""
    def run(policy, day, seed, harm):
        return ts.UnitRun(ts.Unit(policy, day, seed), {"thermal_throttled_gpu_s": harm}, 1.0)

    base = {(0, 0): 100.0, (0, 1): 120.0, (1, 0): 10.0, (1, 1): 15.0, (2, 0): 300.0, (2, 1): 280.0}
    pol = {(0, 0): 10.0, (0, 1): 14.0, (1, 0): 9.0, (1, 1): 12.0, (2, 0): 20.0, (2, 1): 25.0}
    runs = [run("unaware", d, s, h) for (d, s), h in base.items()]
    runs += [run("tapas", d, s, h) for (d, s), h in pol.items()]
    days = ts._by_day(runs, "unaware", "thermal_throttled_gpu_s")
    assert days.tolist() == [220.0, 25.0, 580.0]
    units = ts.reduction_ci(ts._paired(runs, "unaware", "thermal_throttled_gpu_s"),
                            ts._paired(runs, "tapas", "thermal_throttled_gpu_s"))
    by_day = ts.reduction_ci(days, ts._by_day(runs, "tapas", "thermal_throttled_gpu_s"))
    assert by_day[0] == pytest.approx(units[0])  # the same ratio of sums
    assert by_day[2] - by_day[1] >= units[2] - units[1]


def test_reduction_undefined_without_baseline_harm_and_needs_paired_units():
    assert all(math.isnan(v) for v in ts.reduction_ci(np.zeros(3), np.ones(3)))
    point, lo, hi = ts.reduction_ci(np.array([4.0]), np.array([1.0]))
    assert point == pytest.approx(0.75) and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="paired"):
        ts.reduction_ci(np.ones(3), np.ones(2))


def test_capacity_interpolates_between_the_last_level_within_budget_and_the_first_above():
    levels = (1.2, 1.4, 1.6)
    cap, how = ts.capacity(levels, [0.0, 0.005, 0.025], budget=0.01)
    assert how == "interpolated" and cap == pytest.approx(1.4 + 0.2 * 0.005 / 0.02)
    assert ts.capacity(levels, [0.0, 0.0, 0.001], 0.01) == (1.6, "at least")
    assert ts.capacity(levels, [0.02, 0.03, 0.05], 0.01) == (1.2, "at most")
    # Unsorted levels give the same answer.
    assert ts.capacity((1.6, 1.2, 1.4), [0.025, 0.0, 0.005], 0.01)[0] == pytest.approx(cap)


@pytest.mark.parametrize("field, value", [("seeds", (-1,)), ("days", (7,)), ("hours", 0.0),
                                          ("oversubscriptions", (5.0,)), ("harm_budget", 1.5),
                                          ("workers", 0)])
def test_bad_arguments_name_the_field(field, value):
    with pytest.raises(ts.TapasScaleError, match=field):
        ts.TapasScaleArgs(**{field: value})


def test_cli_rejects_a_negative_seed_with_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "llm_cluster_gym", "tapas-scale", "--seeds", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "seeds" in proc.stderr and "-3" in proc.stderr


def test_tapas_dc_is_datacenter_scale_and_oversubscribed_against_measured_peaks():
    s = load_scenario("tapas_dc")
    topo = build_topology(s)
    assert s.n_gpus >= 1024 and s.datacenter.racks_per_row * s.datacenter.servers_per_rack >= 10
    sv = s.datacenter.server
    per_row = s.datacenter.racks_per_row * s.datacenter.servers_per_rack
    assert topo.row_limit_w[0] == pytest.approx(
        per_row * (sv.gpus * sv.gpu_tdp_w + sv.overhead_max_w) / s.datacenter.power_oversubscription)
    assert 0 < topo.server_is_saas.mean() < 1 and s.datacenter.weather is not None


def test_short_paired_run_tapas_caps_less_than_unaware(tmp_path):
    """Half an hour at 1.7x: both policies see the same requests; TAPAS is capped less."""
    args = ts.TapasScaleArgs(days=(2,), seeds=(0,), hours=0.5, oversubscriptions=(1.7,),
                             sweep_days=(2,), sweep_seeds=(0,), workers=1, out=str(tmp_path / "r"),
                             no_progress=True)
    results = ts.evaluate(args, progress=False)
    runs = {(r["policy"], r["oversubscription"]): r["summary"] for r in results["runs"]}
    base, tapas = runs[("unaware", 1.7)], runs[("tapas", 1.7)]
    assert base["requests_arrived"] == tapas["requests_arrived"] > 0
    assert base["power_capped_gpu_s"] > 0
    assert tapas["power_capped_gpu_s"] < base["power_capped_gpu_s"]
    assert tapas["slo_attainment"] >= 0.99
    head = results["headline"]
    assert head["units"] == 1 and set(head) >= {"throttled_gpu_s_reduction", "capped_gpu_s_reduction",
                                               "capacity_gain", "baseline_throttle_events",
                                               "slo_attainment"}
    path = ts.write_report(args, results, tmp_path / "r", "test")
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert path.exists() and (tmp_path / "r" / "capacity.png").exists()
    assert data["headline"]["units"] == 1
    assert "saas_tokens_lost" in data["reductions"] and "reductions_by_day" in data


def test_the_policy_alone_places_the_vms():
    """A VM nobody places keeps waiting: no first-fit fallback places it behind the policy's back."""
    env, _ = ts.unit_env("tapas_dc", ts.Unit("tapas", 2, 0), 0.5)
    env.reset(seed=0)
    vms = env.backend.vms
    for _ in range(200):
        env.step(None)  # holds every setting, places nothing
        if vms.n_pending:
            break
    assert vms.n_pending > 0
    waiting = vms.n_pending
    env.step(None)
    assert vms.n_pending >= waiting
