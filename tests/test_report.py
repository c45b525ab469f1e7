from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from llm_cluster_gym.envs.backend import PoolConfig
from llm_cluster_gym.envs.cluster_env import ClusterEnv
from llm_cluster_gym.envs.episode import HARM_KEYS, SUMMARY_FIELDS, EpisodeResult, ReportError
from llm_cluster_gym.envs.latency import LATENCY_EDGES_S, N_LATENCY_BINS
from llm_cluster_gym.envs.rollout import run_episode
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.report import format_table, row_power_series, write_report
from llm_cluster_gym.envs.sim.scenario import FaultSpec, load_scenario
from llm_cluster_gym.scripts.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNGS = ("row_power.png", "temperature.png", "latency.png", "energy.png")


def _small() -> SimCluster:
    return SimCluster(load_scenario("small").with_overrides(duration_s=60), record_ticks=True)


def _small_faults() -> SimCluster:
    # The shipped faults start at 120-450 s; shift them into a 120 s episode.
    faults = (
        FaultSpec(kind="cooling_failure", target=0, start_s=10.0, duration_s=80.0, magnitude=0.5),
        FaultSpec(kind="power_failure", target=1, start_s=30.0, duration_s=40.0, magnitude=0.6),
        FaultSpec(kind="load_spike", target=0, start_s=80.0, duration_s=20.0, magnitude=2.0),
    )
    s = load_scenario("small_faults")
    # Servers stay powered (no empty IaaS server off), so both aisles carry like heat and the
    # one that loses half its cooling is the warmer one.
    s = s.with_overrides(duration_s=120, faults=faults,
                         datacenter=dataclasses.replace(s.datacenter, idle_to_off_s=None))
    return SimCluster(s, record_ticks=True)


def _fixed(cluster: SimCluster, seed: int | None = 0, policy=None, **kwargs) -> EpisodeResult:
    """An episode the way `llm-cluster simulate` runs it (backend seeded with `seed`)."""
    env = ClusterEnv(task="energy", backend=cluster)
    return run_episode(env, policy, seed, seed_backend=True, **kwargs)


@pytest.fixture(scope="module")
def small() -> EpisodeResult:
    return _fixed(_small(), seed=0)


@pytest.fixture(scope="module")
def faults() -> EpisodeResult:
    return _fixed(_small_faults(), seed=1)


def test_arrays_cover_every_interval(small: EpisodeResult) -> None:
    assert small.n_intervals == 12
    np.testing.assert_allclose(small.time_s, np.arange(1, 13) * 5.0)
    assert small.row_power_w.shape == small.row_limit_w.shape == (12, 2)
    assert small.aisle_inlet_c.shape == small.aisle_max_gpu_temp_c.shape == (12, 2)
    for arr in small.metrics.values():
        assert arr.shape == (12,)
    assert small.tick_row_power_w is not None and small.tick_row_power_w.shape == (120, 2)
    assert small.slowdown_temp_c is not None and 80 < small.slowdown_temp_c < 95


@pytest.mark.parametrize("name", ["small", "faults"])
def test_summary_matches_interval_metrics(name: str, request: pytest.FixtureRequest) -> None:
    r: EpisodeResult = request.getfixturevalue(name)
    m, s = r.metrics, r.summary()
    assert set(s) == set(SUMMARY_FIELDS)
    assert s["energy_kwh"] == pytest.approx(m["energy_j"].sum() / 3.6e6)
    assert s["energy_kwh"] > 0
    assert s["energy_per_token_j"] == pytest.approx(m["energy_j"].sum() / m["tokens_generated"].sum())
    assert s["carbon_kg"] == pytest.approx(m["carbon_g"].sum() / 1e3)
    # The scenario gives 390 g/kWh and the default PUE 1.12: operational carbon is the facility's
    # energy (servers x PUE) x intensity.
    assert s["facility_energy_kwh"] == pytest.approx(s["energy_kwh"] * 1.12, rel=1e-9)
    assert 0 < s["gpu_energy_kwh"] < s["energy_kwh"]
    assert s["carbon_kg"] == pytest.approx(s["facility_energy_kwh"] * 0.390, rel=1e-9)
    assert s["cost_usd"] == pytest.approx(s["gpu_hours"] * 12.29)
    assert s["gpu_hours"] == pytest.approx(m["gpu_hours"].sum())
    fin = m["finished"]
    assert fin.sum() > 0
    # SLO attainment counts every arrival: met / (finished + dropped + still in flight at the
    # end), i.e. the mean of the interval attainments weighted by the requests each resolved,
    # with the requests left in flight at the end as misses; never above the served fraction.
    judged = fin.sum() + m["dropped"].sum() + m["in_flight"][-1]
    assert judged == pytest.approx(s["requests_arrived"])
    assert s["slo_attainment"] == pytest.approx((fin.sum() - m["slo_violations"].sum()) / judged)
    resolved = fin + m["dropped"]
    assert s["slo_attainment"] == pytest.approx(np.sum(m["slo_attainment"] * resolved) / judged)
    assert 0.0 < s["slo_attainment"] <= s["requests_finished"] / s["requests_arrived"]
    served = fin > 0
    assert s["ttft_p99_worst_interval_s"] == pytest.approx(m["ttft_p99_s"][served].max())
    assert s["tbt_p99_worst_interval_s"] == pytest.approx(m["tbt_p99_s"][served].max())
    # Episode percentiles come from the intervals' histograms, one count per finished request.
    assert r.ttft_hist is not None and r.ttft_hist.shape == (r.n_intervals, N_LATENCY_BINS)
    np.testing.assert_allclose(r.ttft_hist.sum(axis=1), fin, rtol=1e-6)
    np.testing.assert_allclose(r.tbt_hist.sum(axis=1), fin, rtol=1e-6)
    # The episode P99 is at most the worst interval's (within one bin), and the median lies
    # between the interval medians.
    bin_ratio = LATENCY_EDGES_S[1] / LATENCY_EDGES_S[0]
    assert s["ttft_p99_s"] <= s["ttft_p99_worst_interval_s"] * bin_ratio
    assert s["tbt_p99_s"] <= s["tbt_p99_worst_interval_s"] * bin_ratio
    lo, hi = m["ttft_p50_s"][served].min(), m["ttft_p50_s"][served].max()
    assert lo / bin_ratio <= s["ttft_p50_s"] <= hi * bin_ratio
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["tbt_p50_s"] <= s["tbt_p99_s"]
    assert s["power_throttle_events"] == m["power_throttle_events"].sum()
    assert s["thermal_throttle_events"] == m["thermal_throttle_events"].sum()
    # Harm beside the events: totals of the interval GPU-seconds and MHz x s, SaaS + IaaS parts.
    for key in HARM_KEYS:
        assert s[key] == pytest.approx(m[key].sum()) and s[key] >= 0.0
    for total, part in (("thermal_throttled_gpu_s", "throttled_gpu_s"),
                        ("power_capped_gpu_s", "capped_gpu_s"), ("clock_lost_mhz_s", "clock_lost_mhz_s")):
        assert s[f"saas_{part}"] + s[f"iaas_{part}"] == pytest.approx(s[total])
    assert (s["clock_lost_mhz_s"] > 0) <= (s["power_capped_gpu_s"] + s["thermal_throttled_gpu_s"] > 0)
    # Peaks are over ticks, so they bound the end-of-interval readings.
    assert s["peak_row_power_kw"] * 1e3 >= r.row_power_w.max() - 1e-6
    assert s["max_gpu_temp_c"] >= r.aisle_max_gpu_temp_c.max() - 1e-9
    # Requests are conserved: arrived = finished + dropped + still in flight.
    assert s["requests_arrived"] == pytest.approx(
        s["requests_finished"] + s["requests_dropped"] + m["in_flight"][-1])


def test_tick_record_integrates_to_interval_energy(small: EpisodeResult) -> None:
    tick_s = 0.5
    assert small.tick_row_power_w.sum() * tick_s == pytest.approx(small.metrics["energy_j"].sum())
    mean_w, peak_w, limit_w, what = row_power_series(small)
    assert what == "interval mean and peak"
    assert (peak_w >= mean_w).all()
    np.testing.assert_allclose(mean_w.sum(axis=1) * 5.0, small.metrics["energy_j"], rtol=1e-9)


def test_faults_show_in_telemetry_summaries(faults: EpisodeResult) -> None:
    active = [set(n) for n in faults.active_faults]
    assert any(any(x.startswith("power_failure") for x in n) for n in active)
    lim = faults.row_limit_w[:, 1]
    assert lim.min() == pytest.approx(0.6 * lim.max())
    assert (faults.row_limit_w[:, 0] == faults.row_limit_w[0, 0]).all()
    # The aisle that lost half of its cooling warms above the other one.
    assert faults.aisle_inlet_c[:, 0].max() > faults.aisle_inlet_c[:, 1].max()


def test_same_seed_same_summary() -> None:
    a = _fixed(_small(), seed=3).summary()
    b = _fixed(_small(), seed=3).summary()
    assert a == b


class LowClock:
    """A tiny policy: every pool at 1,200 MHz; remembers the observations it saw."""

    name = "low-clock"

    def __init__(self, env: ClusterEnv) -> None:
        pools = (PoolConfig(2, 4, 1200.0, 64), PoolConfig(2, 4, 1200.0, 64),
                 PoolConfig(4, 4, 1200.0, 64))
        self.action = env.codec.encode(pools)
        self.seen: list[np.ndarray] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        self.seen.append(observation)
        return self.action


def test_policy_drives_the_episode(small: EpisodeResult) -> None:
    env = ClusterEnv(task="energy", backend=_small())
    ctrl = LowClock(env)
    r = run_episode(env, ctrl, 0, seed_backend=True)
    assert len(ctrl.seen) == r.n_intervals == 12 and ctrl.resets == 1
    assert r.controller_name == "low-clock" and small.controller_name == "fixed"
    assert r.reward.shape == (12,) and np.isfinite(r.reward).all()
    # Same arrivals, lower clocks: less GPU energy.
    assert r.metrics["arrived"].sum() == small.metrics["arrived"].sum()
    assert r.metrics["gpu_energy_j"].sum() < small.metrics["gpu_energy_j"].sum()


def test_env_seeding_differs_from_backend_seeding() -> None:
    env = ClusterEnv(task="energy", backend=_small())
    a = run_episode(env, None, 0, max_intervals=4)
    b = run_episode(env, None, 0, max_intervals=4, seed_backend=True)
    c = run_episode(env, None, 0, max_intervals=4)
    assert a.metrics["arrived"].tolist() == c.metrics["arrived"].tolist()
    assert a.metrics["arrived"].tolist() != b.metrics["arrived"].tolist()


def test_bad_max_intervals_is_rejected() -> None:
    with pytest.raises(ReportError, match="max_intervals"):
        _fixed(_small(), max_intervals=0)


def test_max_intervals_stops_early() -> None:
    r = _fixed(_small(), max_intervals=3)
    assert r.n_intervals == 3


@pytest.mark.slow
def test_write_report_files(faults: EpisodeResult, tmp_path) -> None:
    out = tmp_path / "rep"
    path = write_report(faults, out, "faults test", command="llm-cluster simulate --seed 1")
    assert path == out / "report.md"
    for name in PNGS:
        data = (out / name).read_bytes()
        assert len(data) > 5000 and data.startswith(PNG_SIGNATURE)
    md = path.read_text()
    for key in SUMMARY_FIELDS:
        assert f"`{key}`" in md
    for name in PNGS:
        assert f"]({name})" in md
    assert "small_faults" in md and "seed: 1" in md and "--seed 1" in md
    doc = json.loads((out / "summary.json").read_text())
    assert doc["scenario"] == "small_faults" and doc["seed"] == 1
    for key, value in faults.summary().items():
        assert doc["summary"][key] == pytest.approx(value)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_write_report_refuses_bad_input_and_writes_nothing(small: EpisodeResult, tmp_path) -> None:
    empty = dataclasses.replace(
        small, time_s=small.time_s[:0], metrics={k: v[:0] for k, v in small.metrics.items()})
    with pytest.raises(ReportError, match="time_s"):
        write_report(empty, tmp_path / "none", "empty")
    assert not (tmp_path / "none").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ReportError, match="out_dir"):
        write_report(small, afile, "t")


def test_format_table_marks_missing_values() -> None:
    table = format_table({"energy_kwh": 1.5, "ttft_p99_s": math.nan})
    assert "| 1.5 | kWh |" in table and "n/a" in table


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    rc = main(["simulate", "--scenario", "small", "--seed", "2", "--serving", "aggregate",
               "--duration-s", "30", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for key in ("energy_kwh", "carbon_kg", "cost_usd", "slo_attainment", "max_gpu_temp_c"):
        assert f"`{key}`" in printed
    doc = json.loads((out / "summary.json").read_text())
    assert doc["seed"] == 2 and doc["n_intervals"] == 6
    assert "--duration-s 30" in doc["command"]
    for name in PNGS:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


def test_cli_rejects_unknown_scenario(capsys) -> None:
    assert main(["simulate", "--scenario", "no_such_scenario", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no_such_scenario" in err and len(err.strip().splitlines()) == 1


def test_cli_help_comes_from_field_docstrings(capsys) -> None:
    assert main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "per-request continuous batching" in text
    assert "Hide the progress bar" in text
