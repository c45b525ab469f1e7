"""Outside air from real hourly weather (issue 19): EPW parsing, interpolation, alignment, scenario field.

The shipped EPW files read right (known rows), a malformed file fails with one line naming the file,
line and field, the temperature is interpolated linearly between hourly readings (row h is the value at
the end of hour h) and wraps at the year's end, episode time meets the weather at `start +
workload.start_s + t`, and a scenario without `datacenter.weather` keeps the daily sine.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm_cluster_gym.envs.sim.cluster import SimCluster
from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario
from llm_cluster_gym.envs.sim.thermal import OutsideAir
from llm_cluster_gym.envs.sim.weather import (
    LOCATIONS,
    WEATHER_DIR,
    WeatherAir,
    WeatherDataError,
    location_weather,
    outside_air,
    parse_start,
    read_epw,
)

ROOT = Path(__file__).resolve().parents[1]
LEESBURG = WEATHER_DIR / LOCATIONS["leesburg_va"]


@functools.cache
def _small_yaml() -> dict:
    return yaml.safe_load((ROOT / "envs/scenarios/small.yaml").read_text())


def _load_with(tmp_path: Path, datacenter: dict | None = None, **top) -> object:
    data = copy.deepcopy(_small_yaml())
    data.update(top)
    data.setdefault("datacenter", {}).update(datacenter or {})
    path = tmp_path / "weather.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_scenario(path)


# ---------------------------------------------------------------------------- the files


@pytest.mark.parametrize("location", sorted(LOCATIONS))
def test_every_shipped_site_reads_a_whole_typical_year(location: str) -> None:
    w = location_weather(location)
    assert w.dry_bulb_c.shape == (8760,)
    assert -30 < w.dry_bulb_c.min() < w.dry_bulb_c.mean() < w.dry_bulb_c.max() < 50
    assert w.utc_offset_h in (-5.0, -6.0, -8.0)


def test_leesburg_rows_are_read_from_field_7() -> None:
    w = read_epw(LEESBURG)
    lines = LEESBURG.read_text().splitlines()
    # Known rows: Jan 1 hours 1-3 and Dec 31 hour 24 (field 7 = dry bulb).
    assert w.dry_bulb_c[:3].tolist() == [1.1, 1.1, 0.8]
    assert w.dry_bulb_c[-1] == float(lines[-1].split(",")[6]) == 1.0
    assert w.place.startswith("Leesburg") and w.utc_offset_h == -5.0
    # A July afternoon is warmer than a January night.
    assert w.dry_bulb_c[int(parse_start("07-15T14:00") // 3600) - 1] > w.dry_bulb_c[0] + 15


def _bad_copy(tmp_path: Path, line_no: int, edit) -> Path:
    lines = LEESBURG.read_text().splitlines()
    fields = lines[line_no - 1].split(",")
    lines[line_no - 1] = ",".join(edit(fields))
    path = tmp_path / "bad.epw"
    path.write_text("\n".join(lines) + "\n")
    return path


def _set(k: int, value: str):
    def edit(fields: list[str]) -> list[str]:
        fields[k - 1] = value
        return fields
    return edit


@pytest.mark.parametrize(("line_no", "edit", "message"), [
    (100, _set(7, "abc"), "line 100: field 7 (dry bulb) 'abc' is not a number"),
    (101, _set(7, "99.9"), "line 101: field 7 (dry bulb) '99.9': missing or outside -70..70 C"),
    (102, _set(7, "nan"), "line 102: field 7 (dry bulb) 'nan' is not finite"),
    (103, _set(4, "5"), "line 103: month/day/hour 1/4/5 is not the hour after the previous row"),
    (104, _set(3, "32"), "line 104: month/day/hour 1/32/"),
    (105, lambda f: f[:5], "line 105: 5 fields, no field 7 (dry bulb)"),
])
def test_a_bad_row_names_file_line_and_field(tmp_path: Path, line_no, edit, message) -> None:
    path = _bad_copy(tmp_path, line_no, edit)
    with pytest.raises(WeatherDataError) as err:
        read_epw(path)
    assert str(err.value).startswith(f"{path}, ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_short_file_or_a_foreign_header_is_refused(tmp_path: Path) -> None:
    lines = LEESBURG.read_text().splitlines()
    short = tmp_path / "short.epw"
    short.write_text("\n".join(lines[:-24]) + "\n")
    with pytest.raises(WeatherDataError, match=r"short.epw: 8736 data rows after the 8 header lines"):
        read_epw(short)
    foreign = tmp_path / "foreign.epw"
    foreign.write_text("\n".join(["timestamp,temp", *lines[1:]]) + "\n")
    with pytest.raises(WeatherDataError, match=r"foreign.epw, line 1: expected the EPW header's LOCATION"):
        read_epw(foreign)
    with pytest.raises(WeatherDataError, match="cannot read the weather file"):
        read_epw(tmp_path / "missing.epw")


# ---------------------------------------------------------------------------- interpolation


def test_temperature_is_linear_between_hourly_readings_and_wraps() -> None:
    w = read_epw(LEESBURG)
    v = w.dry_bulb_c
    h = 4000
    # Row h is the reading at the end of hour h + 1 (EPW / EnergyPlus convention).
    assert w.temp_c((h + 1) * 3600.0) == pytest.approx(v[h])
    assert w.temp_c((h + 1.25) * 3600.0) == pytest.approx(0.75 * v[h] + 0.25 * v[h + 1])
    # Before 01:00 on Jan 1 it runs from the last reading of the typical year (Dec 31 24:00).
    assert w.temp_c(0.0) == pytest.approx(v[-1])
    assert w.temp_c(1800.0) == pytest.approx(0.5 * (v[-1] + v[0]))
    air = WeatherAir(w, offset_s=8760 * 3600.0 - 1800.0)  # Dec 31 23:30
    assert air.temp_c(3600.0) == pytest.approx(0.5 * (v[-1] + v[0]))  # Jan 1 00:30, wrapped


def test_start_parses_days_and_times_of_a_non_leap_year() -> None:
    assert parse_start("01-01") == 0.0
    assert parse_start("03-01T06:30") == (59 * 24 + 6.5) * 3600.0
    for bad in ("02-29", "04-31", "13-01", "01-01T24:00"):
        with pytest.raises(ValueError):
            parse_start(bad)


# ---------------------------------------------------------------------------- scenarios


def test_without_weather_the_outside_air_is_the_daily_sine(tmp_path: Path) -> None:
    s = load_scenario("small_tapas")
    air = outside_air(s)
    assert isinstance(air, OutsideAir)
    d = s.datacenter
    assert air.temp_c(0.0) == pytest.approx(d.outside_temp_mean_c - d.outside_temp_amplitude_c)


def test_weather_replaces_the_sine_and_follows_workload_start_s(tmp_path: Path) -> None:
    dc = {"weather": {"location": "dallas_tx", "start": "07-15T06:00"}}
    s = _load_with(tmp_path, datacenter=dc)
    w = location_weather("dallas_tx")
    t0 = parse_start("07-15T06:00")
    air = outside_air(s)
    assert isinstance(air, WeatherAir)
    for t in (0.0, 1234.5, 5 * 3600.0):
        assert air.temp_c(t) == pytest.approx(w.temp_c(t0 + t))
    # A later trace window (workload.start_s) meets later weather, as carbon does.
    later = _load_with(tmp_path, datacenter=dc,
                       workload={**_small_yaml()["workload"], "start_s": 1800.0})
    assert outside_air(later).temp_c(0.0) == pytest.approx(w.temp_c(t0 + 1800.0))
    # The simulator reports it as the outside temperature.
    c = SimCluster(s, serving_model="aggregate")
    c.reset(seed=0)
    assert c.telemetry().outside_temp_c == pytest.approx(w.temp_c(t0))
    c.advance()
    assert c.telemetry().outside_temp_c == pytest.approx(w.temp_c(t0 + s.control_interval_s))


def test_hot_weather_warms_the_inlet_through_the_economizer_coefficient(tmp_path: Path) -> None:
    """A July afternoon in Dallas warms the inlet more than a January night (outside air above setpoint)."""
    temps = {}
    for start in ("07-20T15:00", "01-10T03:00"):
        s = _load_with(tmp_path, datacenter={"weather": {"location": "dallas_tx", "start": start}},
                       duration_s=1800)
        c = SimCluster(s, serving_model="aggregate")
        c.reset(seed=0)
        while not c.done:
            c.advance()
        temps[start] = float(np.mean(c.telemetry().aisle_inlet_c))
    assert temps["07-20T15:00"] > temps["01-10T03:00"] + 0.3


@pytest.mark.parametrize(("dc", "path", "why"), [
    ({"weather": {"location": "dallas_tx", "start": "02-29"}}, "datacenter.weather.start", "not a day"),
    ({"weather": {"location": "dallas_tx", "start": "2022-07-01"}}, "datacenter.weather.start", "MM-DD"),
    ({"weather": {"location": "phoenix", "start": "07-01"}}, "datacenter.weather.location", "must be one of"),
    ({"weather": {"location": "dallas_tx", "start": "07-01"}, "outside_temp_mean_c": 30.0},
     "datacenter.outside_temp_mean_c", "is ignored when datacenter.weather names a site"),
])
def test_bad_weather_fields_name_the_field(tmp_path: Path, dc, path, why) -> None:
    with pytest.raises(ScenarioError) as err:
        _load_with(tmp_path, datacenter=dc)
    assert f"field '{path}'" in str(err.value) and why in str(err.value)
