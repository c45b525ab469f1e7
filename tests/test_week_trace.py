"""Week-long traces from the digitized 2024 week (envs/sim/week_trace.py)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from llm_cluster_gym.envs.sim.demand import episode_trace
from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario
from llm_cluster_gym.envs.sim.week_trace import (
    DATA_DIR,
    WEEK_S,
    column_ranges,
    reference_trace,
    week_source,
    week_trace,
    within_minute_dispersion,
)
from llm_cluster_gym.envs.sim.workload import (
    WEEK_TRACES,
    TraceError,
    builtin_trace,
    diurnal_trace,
    resolve_trace,
)

CODE, CONV = "azure_code_2024_week", "azure_conv_2024_week"
DAY = 86400.0


def _hourly(trace, start_s, name, mean_rps):
    """(generated, expected) request counts per hour of `trace` (a window from `start_s`)."""
    curve = week_source(name).curve
    hours = int(trace.duration_s // 3600)
    got = np.histogram(trace.arrival_s, np.arange(hours + 1) * 3600.0)[0]
    exp = np.diff(curve.integral(start_s + np.arange(hours + 1) * 3600.0)) * mean_rps / curve.mean_rps()
    return got, exp


# ------------------------------------------------------------------ the data
@pytest.mark.parametrize(("name", "exact_per_min"),
                         [(CODE, 16_803_695 / 10_080), (CONV, 27_303_995 / 10_080)])
def test_curve_mean_is_the_exact_weekly_mean(name, exact_per_min):
    # the digitized curve against the true row counts: +0.8% (code), -0.4% (conv)
    assert week_source(name).curve.mean_rps() * 60 == pytest.approx(exact_per_min, rel=0.01)


# ------------------------------------------------------------------ rate
@pytest.mark.parametrize(("name", "per_hour", "mean_abs"), [(CODE, 0.09, 0.025), (CONV, 0.04, 0.012)])
def test_rate_follows_the_curve_hour_by_hour(name, per_hour, mean_abs):
    # the minute-to-minute spread (sd 11-29% per minute for code at night, 5-11% conv) leaves
    # an hour about 2% (code) / 0.7% (conv) off the curve: 20 seeds, hourly sd 1.3-2.7% (code)
    start = 2 * DAY  # a weekday for conv (Tuesday), Sunday for code
    tr = week_trace(name, start, DAY, np.random.default_rng(7), mean_rps=30.0)
    got, exp = _hourly(tr, start, name, 30.0)
    assert np.all(np.abs(got / exp - 1) < per_hour), got / exp
    assert np.abs(got / exp - 1).mean() < mean_abs
    assert got.sum() / exp.sum() == pytest.approx(1.0, abs=0.015)
    assert exp.max() / exp.min() > 1.5  # the day really has peaks and troughs to follow


def test_mean_rps_is_the_whole_weeks_mean_and_rps_scale_multiplies():
    curve = week_source(CONV).curve
    week = week_trace(CONV, 0.0, WEEK_S, np.random.default_rng(1), mean_rps=2.0)
    assert week.mean_rate_rps() == pytest.approx(2.0, rel=0.01)
    native = week_trace(CONV, 0.0, 3 * 3600.0, np.random.default_rng(1), rps_scale=0.01)
    assert len(native) == pytest.approx(0.01 * curve.integral(3 * 3600.0), rel=0.03)
    # the weekend stays quieter than a weekday at the same weekly mean
    sunday = week_trace(CONV, 0.0, DAY, np.random.default_rng(2), mean_rps=2.0)
    monday = week_trace(CONV, DAY, DAY, np.random.default_rng(2), mean_rps=2.0)
    assert len(monday) > 1.6 * len(sunday)


def test_minute_spread_reproduces_the_digitized_ranges():
    # three days at the 2024 service's own rate: per-minute counts, their range per 7.2-min column
    tr = week_trace(CODE, 0.0, 3 * DAY, np.random.default_rng(5), rps_scale=1.0)
    per_min = np.bincount((tr.arrival_s // 60).astype(np.int64), minlength=3 * 1440).astype(float)
    data = np.loadtxt(DATA_DIR / "azure2024_code_invocations_per_min.csv", delimiter=",", skiprows=1)
    columns = int(3 * 1440 / 7.2155)
    digitized = np.maximum(data[:columns, 2] - data[:columns, 1] - 16.58, 0)  # less one pixel of line
    generated = column_ranges(per_min)[:columns]
    assert generated.mean() == pytest.approx(digitized.mean(), rel=0.08)
    assert np.corrcoef(generated, digitized)[0, 1] > 0.6  # wide where the data is wide
    assert len(tr) == pytest.approx(data[:columns, 3].sum() * 7.2155, rel=0.03)


# ------------------------------------------------------------------ burstiness
@pytest.mark.parametrize(("name", "rel"), [(CODE, 0.12), (CONV, 0.05)])
def test_per_second_dispersion_is_the_2023_traces(name, rel):
    t23 = builtin_trace(f"azure_{WEEK_TRACES[name]}_2023")
    # the 2023 statistic over ten phases of the 1-s bins (it depends on the phase: 1.06-1.14 conv)
    d23 = np.mean([within_minute_dispersion(t23.arrival_s + p, t23.duration_s) for p in np.arange(10) / 10])
    assert d23 == pytest.approx(week_source(name).pattern.dispersion_1s)
    assert d23 > 1.05  # 2023: 10.6 (code), 1.10 (conv)
    tr = week_trace(name, 3 * DAY + 10 * 3600, 7200.0, np.random.default_rng(3), mean_rps=150.0)
    d = within_minute_dispersion(tr.arrival_s, tr.duration_s)
    assert d > 1.05 and d == pytest.approx(d23, rel=rel)
    # the same statistic on Poisson arrivals is 1: it tells the two apart
    poisson = diurnal_trace(6 * 3600.0, 150.0, 1.0, DAY, 0.0, t23, np.random.default_rng(3))
    assert within_minute_dispersion(poisson.arrival_s, 6 * 3600.0) == pytest.approx(1.0, abs=0.04)


# ------------------------------------------------------------------ lengths
@pytest.mark.parametrize("name", [CODE, CONV])
def test_prompt_cdf_is_2024s_and_pairs_are_2023_rows(name):
    src = week_source(name)
    t23 = builtin_trace(f"azure_{src.kind}_2023")
    tr = week_trace(name, DAY, 4 * 3600.0, np.random.default_rng(11), mean_rps=60.0)
    x, f24 = src.lengths.cdf_tokens, src.lengths.cdf
    gen = np.searchsorted(np.sort(tr.input_tokens), x, side="right") / len(tr)
    inside = x < t23.input_tokens.max()  # where 2023 rows exist to carry the 2024 mass
    assert np.abs(gen - f24)[inside].max() < 0.02  # KS distance: 0.008 (code), 0.011 (conv)
    beyond = 1.0 - np.interp(t23.input_tokens.max(), x, f24)  # 2024 mass past the longest 2023 prompt
    assert np.abs(gen - f24).max() < beyond + 0.02
    # against the unweighted 2023 prompts the distance is large: the reweighting does the work
    raw = np.searchsorted(np.sort(t23.input_tokens), x, side="right") / len(t23)
    assert np.abs(raw - f24).max() > 0.1
    # every (input, output) pair is a 2023 row, and the output given the input is 2023's
    rows = t23.input_tokens.astype(np.int64) * 1_000_000 + t23.output_tokens
    pairs = tr.input_tokens.astype(np.int64) * 1_000_000 + tr.output_tokens
    assert np.isin(pairs, rows).all()
    w = src.lengths.weight
    edges = np.quantile(t23.input_tokens, [0, 0.25, 0.5, 0.75, 1.0]) + [0, 0, 0, 0, 1]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel23 = (t23.input_tokens >= lo) & (t23.input_tokens < hi)
        sel = (tr.input_tokens >= lo) & (tr.input_tokens < hi)
        expected = np.sum(w[sel23] * t23.output_tokens[sel23]) / np.sum(w[sel23])
        assert tr.output_tokens[sel].mean() == pytest.approx(expected, rel=0.05)


# ------------------------------------------------------------------ determinism, windows, speed
def test_same_seed_same_trace_other_seed_another():
    a = week_trace(CONV, DAY, 1800.0, np.random.default_rng(4), mean_rps=20.0)
    b = week_trace(CONV, DAY, 1800.0, np.random.default_rng(4), mean_rps=20.0)
    c = week_trace(CONV, DAY, 1800.0, np.random.default_rng(5), mean_rps=20.0)
    for col in ("arrival_s", "input_tokens", "output_tokens"):
        assert np.array_equal(getattr(a, col), getattr(b, col))
    assert len(a) != len(c) or not np.array_equal(a.arrival_s, c.arrival_s)
    assert not np.array_equal(a.input_tokens[:1000], c.input_tokens[:1000])


def test_window_selects_the_weeks_stretch_and_wraps_past_its_end():
    start = WEEK_S - 6 * 3600.0  # the week's last 6 hours, then its first 6
    tr = week_trace(CODE, start, 12 * 3600.0, np.random.default_rng(9), mean_rps=20.0)
    assert tr.duration_s == 12 * 3600.0 and np.all(tr.arrival_s < tr.duration_s)
    got, exp = _hourly(tr, start, CODE, 20.0)
    assert np.all(np.abs(got / exp - 1) < 0.06), got / exp
    # one week later is the same stretch (the week repeats)
    later = week_trace(CODE, start + WEEK_S, 12 * 3600.0, np.random.default_rng(9), mean_rps=20.0)
    assert np.array_equal(tr.arrival_s, later.arrival_s)
    # a window that does not end on a whole minute keeps its arrivals inside it
    short = week_trace(CODE, 12_345.6, 90.5, np.random.default_rng(1), mean_rps=20.0)
    assert short.duration_s == 90.5 and len(short) > 0 and short.arrival_s.max() < 90.5


def test_two_hours_at_1000_rps_is_fast():
    week_source(CONV)  # built once per process (not timed)
    t0 = time.perf_counter()
    tr = week_trace(CONV, DAY + 12 * 3600.0, 2 * 3600.0, np.random.default_rng(0), mean_rps=1000.0)
    elapsed = time.perf_counter() - t0
    assert len(tr) > 5_000_000
    assert elapsed < 20.0, elapsed  # loose (a shared machine); timing goals: bench/week_trace_speed.py


@pytest.mark.parametrize("bad", [dict(start_s=-1.0), dict(duration_s=0.0), dict(mean_rps=0.0),
                                 dict(mean_rps=1.0, rps_scale=1.0), dict(rps_scale=float("nan"))])
def test_bad_arguments_are_refused(bad):
    kwargs = dict(start_s=0.0, duration_s=60.0) | bad
    with pytest.raises(TraceError):
        week_trace(CONV, kwargs.pop("start_s"), kwargs.pop("duration_s"), np.random.default_rng(0), **kwargs)
    with pytest.raises(TraceError, match="unknown week trace"):
        week_trace("azure_conv_2025_week", 0.0, 60.0, np.random.default_rng(0))


# ------------------------------------------------------------------ scenarios name it
def test_a_week_name_resolves_to_the_reference_week():
    tr = resolve_trace(CONV)
    assert tr is reference_trace(CONV) and tr is resolve_trace(CONV)  # built once per process
    assert tr.duration_s == WEEK_S and tr.mean_rate_rps() == pytest.approx(1.0, rel=0.01)
    with pytest.raises(TraceError, match="azure_code_2024_week"):
        resolve_trace("azure_code_2024")  # the error lists the week names too


def test_scenario_episode_draws_the_weeks_window():
    sc = load_scenario("small")
    w = dataclasses.replace(sc.workload, trace=CONV, start_s=3 * DAY + 14 * 3600.0)
    week_sc = sc.with_overrides(workload=w)
    gpus = week_sc.n_saas_servers * week_sc.datacenter.server.gpus
    target = sc.workload.rps_per_gpu * gpus  # the week's mean
    a = episode_trace(week_sc, gpus, [], np.random.default_rng(0))
    b = episode_trace(week_sc, gpus, [], np.random.default_rng(0))
    assert np.array_equal(a.arrival_s, b.arrival_s) and a.duration_s == week_sc.duration_s
    curve = week_source(CONV).curve
    level = curve.integral(w.start_s + week_sc.duration_s) - curve.integral(w.start_s)
    expected = level / week_sc.duration_s / curve.mean_rps() * target
    assert a.mean_rate_rps() == pytest.approx(expected, rel=0.15)  # a 10-minute window
    # a window longer than the episode: the episode starts somewhere inside it
    roam = week_sc.with_overrides(workload=dataclasses.replace(w, window_s=DAY))
    assert not np.array_equal(episode_trace(roam, gpus, [], np.random.default_rng(0)).arrival_s, a.arrival_s)
    with pytest.raises(ScenarioError, match="window_s"):
        week_sc.with_overrides(workload=dataclasses.replace(w, window_s=60.0))
