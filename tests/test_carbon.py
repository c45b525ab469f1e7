"""Time-varying grid carbon intensity and facility energy (issue 18).

The hourly table is read right (known rows of the EIA-930 data as SustainDC extracted it), an
episode's carbon is the sum over its hours of facility energy times that hour's intensity, a
scenario with a constant series behaves as before, facility energy is IT energy times the PUE,
and a bad region, date or episode span is a `ScenarioError` naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm_cluster_gym.envs.episode import EpisodeRecorder
from llm_cluster_gym.envs.sim.accounting import carbon_g_per_kwh
from llm_cluster_gym.envs.sim.carbon import GRID_REGIONS, hourly_carbon, region_g_per_kwh
from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import CarbonSpec, ScenarioError, SpikeSpec, load_scenario

ROOT = Path(__file__).resolve().parents[1]
UTC = timezone.utc


def _hour(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _run(s, seed: int = 0):
    """Every interval of an aggregate-model episode, and its recorded summary."""
    c = SimCluster(s, serving_model="aggregate")
    c.reset(seed=seed)
    rec = EpisodeRecorder(c.describe(), seed, "held")
    metrics = []
    while not c.done:
        metrics.append(c.advance())
        rec.record(metrics[-1], c.telemetry())
    return metrics, rec.result().summary()


@functools.cache
def _small_yaml() -> dict:
    return yaml.safe_load((ROOT / "envs/scenarios/small.yaml").read_text())


def _load_with(tmp_path: Path, **top) -> object:
    data = copy.deepcopy(_small_yaml())
    data.update(top)
    path = tmp_path / "carbon.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_scenario(path)


# ---------------------------------------------------------------------------- the table


def test_table_holds_every_hour_of_2022_for_each_region():
    t = hourly_carbon()
    assert t.regions == GRID_REGIONS
    assert t.hours == 8760
    assert t.first_hour_utc == _hour("2022-01-01T00:00") and t.end_utc == _hour("2023-01-01T00:00")


@pytest.mark.parametrize(("region", "hour", "source_value"), [
    # avg_CI of dc-rl's <region>_hourly_2022.csv at that timestamp (the source, before rounding)
    ("CISO", "2022-01-01T00:00", 222.29592090536002),
    ("CISO", "2022-12-31T23:00", 234.87388724035608),
    ("PJM", "2022-10-01T18:00", 327.934684),
    ("BPAT", "2022-05-10T19:00", 25.181070),
])
def test_region_and_start_read_the_right_row(region, hour, source_value):
    t = hourly_carbon()
    assert t.at(region, _hour(hour)) == pytest.approx(source_value, abs=0.05)
    # The same through the simulator's per-tick lookup, anywhere inside that hour.
    for inside_s in (0.0, 1799.5, 3599.0):
        assert region_g_per_kwh(region, hour, inside_s) == pytest.approx(source_value, abs=0.05)


def test_reporting_gaps_are_filled_between_their_neighbours():
    """PJM reports 0.3% of its generation for 1 Oct 2022 05-08 UTC; its 47 g/kWh is an artefact."""
    t = hourly_carbon()
    i = int(t.offset_s(_hour("2022-10-01T05:00")) // 3600)
    series, filled = t.g_per_kwh["PJM"], t.filled["PJM"]
    assert filled[i : i + 4].all() and not filled[i - 1] and not filled[i + 4]
    lo, hi = sorted((series[i - 1], series[i + 4]))
    assert ((series[i : i + 4] >= lo) & (series[i : i + 4] <= hi)).all()
    assert series.min() > 250.0  # PJM never drops near the artefact's 43-47 g/kWh
    # CISO's empty cells (3 hours) are filled too; no region has a NaN.
    assert t.filled["CISO"].sum() == 3 and all(np.isfinite(v).all() for v in t.g_per_kwh.values())


# ---------------------------------------------------------------------------- carbon per hour


def test_two_hour_episode_carbon_is_energy_times_each_hours_intensity():
    start = "2022-06-01T13:00"  # CISO: 243.9 g/kWh until 14:00 UTC, 171.8 after (solar ramp)
    s = load_scenario("small").with_overrides(
        duration_s=7200.0, carbon=CarbonSpec(region="CISO", start=start))
    ci = [hourly_carbon().at("CISO", _hour(h)) for h in (start, "2022-06-01T14:00")]
    assert ci[0] - ci[1] > 50.0
    metrics, summary = _run(s)
    end_s = np.cumsum([m.interval_s for m in metrics])
    facility = np.array([m.facility_energy_j for m in metrics])
    carbon = np.array([m.carbon_g for m in metrics])
    first = end_s <= 3600.0 + 1e-9
    assert first.sum() == len(metrics) // 2
    expected = (facility[first].sum() * ci[0] + facility[~first].sum() * ci[1]) / 3.6e6
    assert carbon.sum() == pytest.approx(expected, rel=1e-12)
    assert summary["carbon_kg"] == pytest.approx(expected / 1e3, rel=1e-12)
    # Every interval took its own hour's value (not a mean, not the next hour's).
    np.testing.assert_allclose(carbon / facility * 3.6e6, np.where(first, ci[0], ci[1]), rtol=1e-12)


def test_start_moves_with_the_trace_window():
    """Grid time is start + workload.start_s + t: a later trace window meets later grid hours."""
    s = load_scenario("small").with_overrides(carbon=CarbonSpec(region="ERCO", start="2022-05-13T00:00"))
    later = s.with_overrides(workload=dataclasses.replace(s.workload, start_s=1800.0))
    t = hourly_carbon()
    assert carbon_g_per_kwh(s, 1799.0) == t.at("ERCO", _hour("2022-05-13T00:00"))
    assert carbon_g_per_kwh(later, 1799.0) == t.at("ERCO", _hour("2022-05-13T00:00"))
    assert carbon_g_per_kwh(later, 1800.0) == t.at("ERCO", _hour("2022-05-13T01:00"))
    assert t.at("ERCO", _hour("2022-05-13T00:00")) != t.at("ERCO", _hour("2022-05-13T01:00"))


def test_carbon_saving_differs_from_energy_saving_when_the_intensity_changes():
    """Extra load in the dirtier hour adds more carbon than energy (savings differ when load moves)."""
    base = load_scenario("small").with_overrides(
        duration_s=7200.0, carbon=CarbonSpec(region="CISO", start="2022-06-01T13:00"))
    full, _ = _run(base)
    # The same episode with the load spiked during the dirty first hour only.
    spike = base.with_overrides(workload=dataclasses.replace(
        base.workload, spikes=(SpikeSpec(start_s=0.0, duration_s=3600.0, multiplier=1.5),)))
    spiked, _ = _run(spike)

    def totals(ms):
        return sum(m.facility_energy_j for m in ms), sum(m.carbon_g for m in ms)

    e0, c0 = totals(full)
    e1, c1 = totals(spiked)
    assert e1 > e0 and c1 > c0
    # The extra energy fell in the 243.9 g/kWh hour (the mean of the two is 207.9): carbon grows by
    # about 243.9 / 207.9 = 1.17 times as much as energy (a constant intensity would give 1).
    assert (c1 / c0 - 1.0) > 1.05 * (e1 / e0 - 1.0)


# ---------------------------------------------------------------------------- backward compatible


def test_constant_series_scenario_is_unchanged():
    s = load_scenario("small")
    assert s.carbon is None and s.carbon_g_per_kwh == (390.0,)
    metrics, summary = _run(s.with_overrides(duration_s=60.0))
    for m in metrics:
        assert m.carbon_g == pytest.approx(m.facility_energy_j / 3.6e6 * 390.0, rel=1e-12)
    assert summary["carbon_kg"] == pytest.approx(summary["facility_energy_kwh"] * 0.390, rel=1e-9)
    # A list still steps every carbon_step_s and repeats.
    stepped = s.with_overrides(carbon_g_per_kwh=(100.0, 300.0), carbon_step_s=60.0)
    assert [carbon_g_per_kwh(stepped, t) for t in (0.0, 59.5, 60.0, 119.5, 120.0)] == [
        100.0, 100.0, 300.0, 300.0, 100.0]


# ---------------------------------------------------------------------------- facility energy


@pytest.mark.parametrize("pue", [1.0, 1.12, 1.55])
def test_facility_energy_is_it_energy_times_pue(pue):
    s = load_scenario("small")
    s = s.with_overrides(duration_s=60.0, datacenter=dataclasses.replace(s.datacenter, pue=pue))
    metrics, summary = _run(s)
    for m in metrics:
        assert m.facility_energy_j == pytest.approx(m.energy_j * pue, rel=1e-12)
        assert 0.0 < m.gpu_energy_j < m.energy_j
    assert summary["facility_energy_kwh"] == pytest.approx(summary["energy_kwh"] * pue, rel=1e-12)
    assert summary["gpu_energy_kwh"] == pytest.approx(sum(m.gpu_energy_j for m in metrics) / 3.6e6)


def test_default_pue_is_the_cited_figure():
    assert load_scenario("small").datacenter.pue == 1.12


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("top", "named", "why"), [
    ({"carbon": {"region": "CAISO", "start": "2022-06-01"}}, "carbon.region", "one of"),
    ({"carbon": {"region": "CISO", "start": "2022-13-01T00:00"}}, "carbon.start", "not a date"),
    ({"carbon": {"region": "CISO", "start": "2022-02-30"}}, "carbon.start", "not a date"),
    ({"carbon": {"region": "CISO", "start": "June 1st"}}, "carbon.start", "YYYY-MM-DD"),
    ({"carbon": {"region": "CISO", "start": "2022-06-01T00:00+02:00"}}, "carbon.start", "no offset"),
    ({"carbon": {"region": "CISO", "start": "2021-06-01"}}, "carbon.start", "inside the hourly data"),
    ({"carbon": {"region": "CISO", "start": "2022-12-31T23:55"}}, "carbon.start", "inside the hourly data"),
    ({"carbon": {"region": "CISO", "start": 5}}, "carbon.start", "must be a string"),
    ({"carbon": {"region": "CISO"}}, "carbon.start", "missing required field"),
    ({"carbon": {"region": "CISO", "start": "2022-06-01"}, "carbon_g_per_kwh": [200]},
     "carbon_g_per_kwh", "give one or the other"),
    ({"datacenter": {**_small_yaml()["datacenter"], "pue": 0.9}}, "datacenter.pue", "[1, 3]"),
])
def test_bad_carbon_or_pue_is_a_scenario_error_naming_the_field(tmp_path, top, named, why):
    with pytest.raises(ScenarioError) as info:
        _load_with(tmp_path, **top)
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "carbon.yaml") + ": ") and "\n" not in msg
    assert f"'{named}'" in msg and why in msg, msg


def test_yaml_dates_and_the_last_hour_of_the_year_load(tmp_path):
    path = tmp_path / "dated.yaml"
    text = (ROOT / "envs/scenarios/small.yaml").read_text()
    path.write_text(text + "\ncarbon:\n  region: CISO\n  start: 2022-12-31T23:50:00\n")  # a YAML timestamp
    s = load_scenario(path)  # 600 s from 23:50 ends exactly at the table's end
    assert s.carbon == CarbonSpec(region="CISO", start="2022-12-31T23:50:00")
    path.write_text(text + "\ncarbon:\n  region: PJM\n  start: 2022-06-01\n")  # a YAML date
    assert load_scenario(path).carbon.start == "2022-06-01"
    with pytest.raises(ScenarioError, match="carbon.start"):  # a later trace window runs past the year
        s.with_overrides(workload=dataclasses.replace(s.workload, start_s=60.0))
