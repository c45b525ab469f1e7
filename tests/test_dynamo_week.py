"""The DynamoLLM week evaluation (scripts/dynamo_week.py): protocol, provisioning, statistics."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.envs.sim.scenario import load_scenario
from llm_cluster_gym.envs.sim.slo_classes import classes_of_input_pools
from llm_cluster_gym.scripts import dynamo_week as week


@pytest.fixture(scope="module")
def base():
    return load_scenario("dynamo_week")


@pytest.fixture(scope="module")
def provisioner(base):
    return week.Provisioner(ControllerContext.from_env(week.make_env(base)))


def test_day_sets_never_overlap():
    sets = [set(week.TRAIN_DAYS), set(week.VALIDATION_DAYS), set(week.TEST_DAYS)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(7))


def test_day_scenario_starts_burn_in_before_midnight_and_wraps_the_week(base):
    s = week.day_scenario(base, 2, 1800.0)
    assert s.workload.start_s == 2 * week.DAY_S - 1800.0
    assert s.duration_s == week.DAY_S + 1800.0
    sunday = week.day_scenario(base, 0, 1800.0, 3600.0)
    assert sunday.workload.start_s == week.WEEK_S - 1800.0  # Saturday's last half hour
    assert sunday.duration_s == 3600.0 + 1800.0
    with pytest.raises(week.WeekEvalError, match="days: 7"):
        week.day_scenario(base, 7, 0.0)


def test_servers_needed_grows_with_the_rate_and_fails_beyond_the_cluster(provisioner):
    lay = provisioner.ctx.layout
    needs = [provisioner.servers_needed(2, 8, lay.max_freq_mhz, r) for r in (0.0, 20.0, 60.0, 120.0)]
    assert needs[0] == 0
    assert all(a <= b for a, b in zip(needs, needs[1:], strict=False))
    assert needs[-1] > needs[1]
    assert provisioner.servers_needed(2, 8, lay.max_freq_mhz, 1e5) is None


def test_slower_clock_needs_at_least_as_many_servers(provisioner):
    lay = provisioner.ctx.layout
    fast = provisioner.servers_needed(1, 8, lay.max_freq_mhz, 80.0)
    slow = provisioner.servers_needed(1, 8, min(lay.freq_choices_mhz), 80.0)
    assert slow is None or slow >= fast


def test_executable_split_covers_the_need_and_the_codec_runs_it(provisioner):
    codec = provisioner.ctx.codec
    split = provisioner.executable([5, 17, 40])
    assert np.all(split >= [5, 17, 40])
    assert any(np.array_equal(split, row) for row in codec.server_splits())
    assert split.sum() <= codec.n_saas_servers
    with pytest.raises(week.WeekEvalError, match="provisioning"):
        provisioner.executable([100, 100, 100])


def test_best_fixed_layout_is_sized_for_the_peak_of_the_rates(provisioner, base):
    rates = np.array([[20.0, 40.0, 60.0], [30.0, 60.0, 90.0], [10.0, 20.0, 30.0]])
    pools = provisioner.best_fixed_layout(rates, 300.0, base.serving.pools)
    gpus = provisioner.ctx.layout.gpus_per_server
    for p, spec in enumerate(pools):
        servers = spec.n_instances * spec.tp // gpus
        assert servers >= provisioner.servers_needed(p, spec.tp, spec.freq_mhz, rates[:, p].max())
        assert spec.slo_ttft_s == base.serving.pools[p].slo_ttft_s
    # Per pool, the chosen (TP, clock) at the servers it needs costs no more over these rates
    # than TP 8 at the maximum clock (one of the candidates) at the servers that one needs.
    lay = provisioner.ctx.layout
    for p, spec in enumerate(pools):
        peak = rates[:, p].max()
        n_best = provisioner.servers_needed(p, spec.tp, spec.freq_mhz, peak)
        n_tp8 = provisioner.servers_needed(p, 8, lay.max_freq_mhz, peak)
        best = provisioner.server_power_w(p, spec.tp, spec.freq_mhz, n_best, rates[:, p]).sum()
        tp8 = provisioner.server_power_w(p, 8, lay.max_freq_mhz, n_tp8, rates[:, p]).sum()
        assert best <= tp8 * (1 + 1e-9)


def test_single_pool_scenario_has_one_pool_judged_by_the_length_pools_classes(base):
    s = week.single_pool_scenario(base)
    assert s.workload.pools == "single"
    assert len(s.serving.pools) == 1
    # The pool's own SLO (derived from all prompts) sits between the S and L pools'...
    slos = [p.slo_ttft_s for p in base.serving.pools]
    assert min(slos) < s.serving.pools[0].slo_ttft_s < max(slos)
    # ... but every request is judged by its by-input pool's SLOs, the ones the pooled policies meet.
    assert s.serving.slo_classes == classes_of_input_pools(base.serving, "by_input")
    assert [c.slo_ttft_s for c in s.serving.slo_classes] == slos
    assert week.class_targets(base) == ((), (), ())


def test_single_pool_is_sized_so_that_every_class_meets_its_slo(base):
    s = week.single_pool_scenario(base)
    ctx = ControllerContext.from_env(week.make_env(s))
    targets = week.class_targets(s)
    assert len(targets[0]) == 3
    by_pool = week.Provisioner(ctx, 0.6)
    by_class = week.Provisioner(ctx, 0.6, targets)
    f = ctx.layout.max_freq_mhz
    n_pool, n_class = by_pool.servers_needed(0, 8, f, 300.0), by_class.servers_needed(0, 8, f, 300.0)
    assert n_class > n_pool  # the short prompts' 0.13 s TTFT binds, not the pool's lenient SLO
    ok, _ = by_class._predict(0, 8, f, np.array([n_class - 1, n_class]), 300.0)
    assert ok.tolist() == [False, True]


def test_single_pool_run_is_judged_by_the_classes(base):
    """The same SinglePool layout (32 servers, half an hour of Tuesday): identical energy, but
    fewer requests meet the classes' SLOs than the pool's lenient one."""
    s = week.single_pool_scenario(week.day_scenario(base, 2, 0.0, 1800.0))
    s = week.with_pools(s, [dataclasses.replace(s.serving.pools[0], n_instances=32)])
    by_class = week._measure("single_pool", 2, 0, s, None, 0.0, "").summary
    by_pool = week._measure("single_pool", 2, 0, dataclasses.replace(
        s, serving=dataclasses.replace(s.serving, slo_classes=())), None, 0.0, "").summary
    assert by_class["energy_kwh"] == by_pool["energy_kwh"]
    assert by_class["slo_attainment"] < by_pool["slo_attainment"] - 0.005


def test_mean_ci95_matches_the_t_interval():
    mean, half = week.mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302652729911275 * 1.0 / np.sqrt(3))
    one_mean, one_half = week.mean_ci95([5.0])
    assert one_mean == 5.0 and np.isnan(one_half)


def test_intervals_are_over_days_with_seeds_averaged_within_a_day():
    """Two seeds of one day are one sample: the interval is the one over the three day means."""
    def run(day: int, seed: int, energy: float) -> week.DayRun:
        return week.DayRun("static", day, seed, {"energy_kwh": energy}, np.zeros(1), np.zeros(1),
                           "", 0.0)

    runs = [run(0, 0, 1.0), run(0, 1, 1.2), run(2, 0, 2.0), run(2, 1, 2.0), run(5, 0, 3.0),
            run(5, 1, 3.4)]
    mean, half = week.mean_ci95_over_days(runs, lambda r: r.summary["energy_kwh"])
    assert (mean, half) == pytest.approx(week.mean_ci95([1.1, 2.0, 3.2]))
    assert half > week.mean_ci95([r.summary["energy_kwh"] for r in runs])[1]


def test_evaluate_week_rejects_training_days_and_a_missing_baseline():
    with pytest.raises(week.WeekEvalError, match="training or validation"):
        week.evaluate_week(week.WeekArgs(days=(1,)))
    with pytest.raises(week.WeekEvalError, match="single_pool"):
        week.evaluate_week(week.WeekArgs(policies=("static",)))
    with pytest.raises(week.WeekEvalError, match="hours"):
        week.evaluate_week(week.WeekArgs(hours=0.1))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seeds", (0, -1), "seeds: -1 must be >= 0"),
    ("cross_check_hours", -1.0, "cross_check_hours: -1.0 must be 0"),
    ("cross_check_hours", 0.1, "cross_check_hours: 0.1 must be 0"),
    ("cross_check_hours", 25.0, "cross_check_hours: 25.0 must be 0"),
])
def test_evaluate_week_and_the_cross_check_reject_a_bad_field_naming_it(field, value, message):
    args = week.WeekArgs(**{field: value})
    with pytest.raises(week.WeekEvalError, match=message):
        week.evaluate_week(args)
    # A negative cross-check length is an error, not a silent skip.
    with pytest.raises(week.WeekEvalError, match=message):
        week.run_cross_check(args)


def test_cross_check_of_zero_hours_is_skipped():
    assert week.run_cross_check(week.WeekArgs(cross_check_hours=0.0)) == {}


def fixed_energy(runs, policy):
    (run,) = [r for r in runs if r.policy == policy]
    return run.summary["energy_kwh"]


def test_short_day_runs_every_policy_and_pairs_savings(tmp_path):
    args = week.WeekArgs(days=(2,), seeds=(0,), hours=0.5, burn_in_s=300.0, out=str(tmp_path / "w"),
                         policies=week.available_policies())
    runs, table = week.evaluate_week(args)
    assert {r.policy for r in runs} == set(week.POLICIES) | {"milp"}
    (plan,) = [r for r in runs if r.policy == "milp"]
    assert plan.bound_kwh is not None and 0 < plan.bound_kwh
    # Every policy's distance to the planning-model optimum of the same (day, seed).
    for pol in week.available_policies():
        gap = table[pol]["bound_gap"][0]
        assert gap == pytest.approx(fixed_energy(runs, pol) / plan.bound_kwh - 1.0)
    assert table["single_pool"]["energy_kwh_saving"][0] == 0.0
    for r in runs:
        assert r.summary["duration_s"] == pytest.approx(1800.0)
        assert 0.0 <= r.summary["slo_attainment"] <= 1.0
        assert np.all(r.servers_powered <= 128)
    fixed = {r.policy: r for r in runs}
    # The fixed layouts hold exactly the servers they were sized for (the rest power off).
    assert fixed["static"].servers_powered.max() == sum(
        int(part.split()[0]) for part in fixed["static"].layout.split(" | "))
    path = week.write_report(args, runs, table, tmp_path / "w", "test")
    data = json.loads((tmp_path / "w" / "results.json").read_text())
    assert data["headline"]["days"] == 1 and path.exists() and (tmp_path / "w" / "day.png").exists()


@pytest.mark.parametrize(("flags", "field"), [
    (["--days", "3"], "days"),
    (["--seeds", "0", "-1"], "seeds: -1"),
    (["--cross-check-hours", "-1"], "cross_check_hours: -1.0"),
])
def test_cli_rejects_a_bad_field_with_one_line_and_exit_2(flags, field):
    proc = subprocess.run([sys.executable, "-m", "llm_cluster_gym", "dynamo-week", *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and field in proc.stderr


def test_select_manager_keeps_the_slo_target_and_picks_the_least_energy(base):
    candidates = ((0.4, 1.25), (1.0, 1.0))
    chosen, tried = week.select_manager(base, 300.0, 1800.0, candidates=candidates)
    assert set(tried) == set(candidates)
    ok = [c for c, (_, slo) in tried.items() if slo >= week.MARGIN_TARGET_SLO]
    if ok:
        assert chosen in ok and tried[chosen][0] == min(tried[c][0] for c in ok)
    else:
        assert chosen == (0.4, 1.25)  # the most cautious candidate
    # The cautious candidate (tight margin, headroom) never uses less energy than the loose one.
    assert tried[(0.4, 1.25)][0] >= tried[(1.0, 1.0)][0] * 0.98
