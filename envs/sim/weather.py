"""Outside air temperature from real hourly weather: EnergyPlus typical-year (EPW) dry-bulb temperatures.

A scenario may name a site and the time of year its trace starts at (`datacenter.weather: {location,
start}`); the outside air then follows that site's hourly dry-bulb temperature, linearly interpolated
between hours, instead of the daily sine (`outside_temp_mean_c`, `outside_temp_amplitude_c`). The files
are in `envs/data/weather/` (TMYx typical years derived from NOAA ISD records; see that folder's README).

Times. An EPW file holds one typical year in the site's local standard time (no daylight saving), 8,760
hourly rows; row `h` (hour field 1..24 of its day) is the value at the END of that hour, the convention
EnergyPlus reads them with (it interpolates linearly between hours too). A typical year has no year of its
own, so `start` is `MM-DD[THH:MM]` and the year wraps: after Dec 31 24:00 comes Jan 1 of the same typical
year. Interpolating is right here, unlike for the grid's hourly means (`carbon.py`): a dry-bulb reading is
an instant's value and the air's temperature moves smoothly between readings.

Simulated time meets the weather at `start + workload.start_s + t` (as `carbon` does), so an episode that
draws a later window of its trace (a held-out day of a week) meets the weather of that window.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from llm_cluster_gym.envs.sim.scenario import Scenario
    from llm_cluster_gym.envs.sim.thermal import OutsideAir

WEATHER_DIR = Path(__file__).resolve().parents[1] / "data" / "weather"

LOCATIONS: dict[str, str] = {
    "leesburg_va": "USA_VA_Leesburg.Exec.epw",
    "san_jose_ca": "USA_CA_San.Jose-Mineta.epw",
    "dallas_tx": "USA_TX_Dallas-Fort.Worth.epw",
    "seattle_wa": "USA_WA_Seattle-Tacoma.epw",
}
"""Shipped sites (scenario name -> EPW file): the weather beside the grid regions of `carbon` (PJM northern
Virginia, CISO California, ERCO Texas, BPAT Pacific Northwest)."""

HOURS_PER_YEAR = 8760
HOUR_S = 3600.0
YEAR_S = HOURS_PER_YEAR * HOUR_S
EPW_HEADER_LINES = 8
DRY_BULB_FIELD = 7
"""1-based field of a data row holding the dry-bulb temperature (C)."""
EPW_MISSING_DRY_BULB = 99.9
"""The EPW format's 'missing' value for the dry-bulb field."""
DRY_BULB_RANGE_C = (-70.0, 70.0)
"""Plausible dry-bulb range: a value outside it is a corrupt or missing reading."""

START_PATTERN = r"\d{2}-\d{2}(T\d{2}:\d{2})?"
"""`weather.start`: a day of the typical year, or a day and a time, local standard time."""

_REFERENCE_YEAR = 2001
"""A non-leap year: typical-year files have no February 29."""


class WeatherDataError(ValueError):
    """A weather file is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class EpwWeather:
    """One site's typical-year hourly dry-bulb temperature.

    Attributes:
        place: The site as the file's LOCATION line names it (city, state, country).
        utc_offset_h: The site's standard time zone (hours from UTC), from the LOCATION line.
        dry_bulb_c: Dry-bulb temperature at the end of each hour of the year (C), shape (8760,).
        source: The file read.
    """

    place: str
    utc_offset_h: float
    dry_bulb_c: np.ndarray
    source: str

    def temp_c(self, year_s: float | np.ndarray) -> float | np.ndarray:
        """Temperature `year_s` seconds after Jan 1 00:00 (local standard time), interpolated, wrapping.

        Row h holds the value at (h + 1) hours; before 01:00 on Jan 1 the interpolation runs from the
        previous Dec 31 24:00 (the last row), as the typical year repeats.
        """
        x = np.asarray(year_s, dtype=float) / HOUR_S - 1.0
        lo = np.floor(x)
        frac = x - lo
        i = lo.astype(np.int64) % HOURS_PER_YEAR
        v = self.dry_bulb_c
        out = v[i] + frac * (v[(i + 1) % HOURS_PER_YEAR] - v[i])
        return float(out) if out.ndim == 0 else out


def _float_field(fields: list[str], k: int, where: str, name: str) -> float:
    if len(fields) < k:
        raise WeatherDataError(f"{where}: {len(fields)} fields, no field {k} ({name})")
    text = fields[k - 1].strip()
    try:
        value = float(text)
    except ValueError:
        raise WeatherDataError(f"{where}: field {k} ({name}) {text!r} is not a number") from None
    if not math.isfinite(value):
        raise WeatherDataError(f"{where}: field {k} ({name}) {text!r} is not finite")
    return value


@functools.cache
def read_epw(path: Path) -> EpwWeather:
    """Read (once per process) and check an EPW file's dry-bulb temperature.

    Raises:
        WeatherDataError: Unreadable file, a header that is not EPW's (LOCATION first, 8 lines), a data
            row count other than 8,760, a row out of hourly order (month, day, hour), or a dry-bulb value
            that is missing (99.9), not a number or outside -70..70 C; the message names file, line, field.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", errors="replace", newline=None) as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise WeatherDataError(f"{path}: cannot read the weather file ({exc.strerror or exc})") from None
    if not lines or not lines[0].startswith("LOCATION,"):
        raise WeatherDataError(f"{path}, line 1: expected the EPW header's LOCATION line")
    loc = lines[0].split(",")
    place = ", ".join(s.strip() for s in loc[1:4] if s.strip())
    utc_offset_h = _float_field(loc, 9, f"{path}, line 1", "time zone")
    if len(lines) < EPW_HEADER_LINES or not lines[EPW_HEADER_LINES - 1].startswith("DATA PERIODS"):
        raise WeatherDataError(
            f"{path}, line {EPW_HEADER_LINES}: expected the EPW header's DATA PERIODS line")
    rows = [ln for ln in lines[EPW_HEADER_LINES:] if ln.strip()]
    if len(rows) != HOURS_PER_YEAR:
        raise WeatherDataError(
            f"{path}: {len(rows)} data rows after the {EPW_HEADER_LINES} header lines, expected "
            f"{HOURS_PER_YEAR} (one typical year, hourly)")
    values = np.empty(HOURS_PER_YEAR)
    first = datetime(_REFERENCE_YEAR, 1, 1)
    lo_c, hi_c = DRY_BULB_RANGE_C
    for h, row in enumerate(rows):
        where = f"{path}, line {EPW_HEADER_LINES + 1 + h}"
        fields = row.split(",")
        month = _float_field(fields, 2, where, "month")
        day = _float_field(fields, 3, where, "day")
        hour = _float_field(fields, 4, where, "hour")
        try:
            begin = datetime(_REFERENCE_YEAR, int(month), int(day), int(hour) - 1)
        except ValueError:
            raise WeatherDataError(
                f"{where}: month/day/hour {fields[1]}/{fields[2]}/{fields[3]} is not an hour of a "
                "non-leap year") from None
        if round((begin - first).total_seconds() / HOUR_S) != h:
            raise WeatherDataError(
                f"{where}: month/day/hour {fields[1]}/{fields[2]}/{fields[3]} is not the hour after the "
                "previous row")
        t = _float_field(fields, DRY_BULB_FIELD, where, "dry bulb")
        if t == EPW_MISSING_DRY_BULB or not lo_c <= t <= hi_c:
            raise WeatherDataError(
                f"{where}: field {DRY_BULB_FIELD} (dry bulb) {fields[DRY_BULB_FIELD - 1]!r}: missing or "
                f"outside {lo_c:g}..{hi_c:g} C")
        values[h] = t
    values.flags.writeable = False
    return EpwWeather(place=place, utc_offset_h=utc_offset_h, dry_bulb_c=values, source=str(path))


def location_weather(location: str) -> EpwWeather:
    """The shipped typical year of a site named in `LOCATIONS`.

    Raises:
        WeatherDataError: An unknown site, or a malformed file.
    """
    if location not in LOCATIONS:
        raise WeatherDataError(f"unknown weather location {location!r}; known: {', '.join(LOCATIONS)}")
    return read_epw(WEATHER_DIR / LOCATIONS[location])


def parse_start(text: str) -> float:
    """A scenario's `weather.start` (`MM-DD` or `MM-DDTHH:MM`) as seconds after Jan 1 00:00.

    Raises:
        ValueError: Not a day and time of a non-leap year (e.g. 02-29, 04-31, 24:00).
    """
    fmt = "%Y-%m-%dT%H:%M" if "T" in text else "%Y-%m-%d"
    when = datetime.strptime(f"{_REFERENCE_YEAR}-{text}", fmt)
    return (when - datetime(_REFERENCE_YEAR, 1, 1)).total_seconds()


class WeatherAir:
    """Outside air from a site's typical year (same interface as `thermal.OutsideAir`).

    Args:
        weather: The site's hourly dry-bulb temperature.
        offset_s: Seconds from Jan 1 00:00 to the episode's time 0 (`start + workload.start_s`).
    """

    def __init__(self, weather: EpwWeather, offset_s: float) -> None:
        self.weather, self.offset_s = weather, float(offset_s)
        self._memo = (math.nan, 0.0)

    def temp_c(self, t_s: float) -> float:
        """Temperature `t_s` seconds into the episode (C); the last answer is memoized."""
        last_t, last_c = self._memo
        if t_s == last_t:
            return last_c
        c = float(self.weather.temp_c((self.offset_s + t_s) % YEAR_S))
        self._memo = (t_s, c)
        return c


def outside_air(scenario: Scenario) -> OutsideAir | WeatherAir:
    """The outside air of a scenario: its site's weather when `datacenter.weather` is set, else the sine."""
    from llm_cluster_gym.envs.sim import thermal

    d = scenario.datacenter
    if d.weather is None:
        return thermal.OutsideAir(d.outside_temp_mean_c, d.outside_temp_amplitude_c)
    offset_s = parse_start(d.weather.start) + scenario.workload.start_s
    return WeatherAir(location_weather(d.weather.location), offset_s)
