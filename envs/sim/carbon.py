"""Grid carbon intensity over simulated time: a scenario's constant series or a US region's 2022 hours.

A scenario either lists its own intensity series (`carbon_g_per_kwh`, one value per `carbon_step_s`,
repeated) or names a grid region and the UTC time its trace starts at (`carbon: {region, start}`); the
region's hourly intensity then comes from `envs/data/grid/carbon_intensity_2022.csv` (US EIA-930 hourly
data for 2022 as extracted by SustainDC; see that folder's README).

The hourly values are used stepwise: each row is the generation-weighted mean intensity of one hour, so
every instant of that hour gets that value (interpolating between hours would invent a shape inside the
hour that the data does not have). A simulator tick takes the value of the hour its start falls in.

Simulated time meets the grid at `carbon.start + workload.start_s + t`: `start` is the grid time of the
source trace's time 0, so an episode that draws a later window of the trace (a held-out day of a week) meets
the grid hours of that window, and the load and the grid keep their time of day together.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

GRID_DIR = Path(__file__).resolve().parents[1] / "data" / "grid"
CARBON_TABLE = GRID_DIR / "carbon_intensity_2022.csv"
"""One row per hour of 2022 (UTC), one column of g/kWh per grid region, and `filled`."""

GRID_REGIONS = ("BPAT", "CISO", "ERCO", "MISO", "NYIS", "PJM")
"""The US balancing authorities of the table (EIA codes; the README says which grid each is)."""

HOUR_S = 3600.0
_TICK_EPS_S = 1e-6
"""Slack for float drift of the simulated clock at an hour boundary (a tick that starts 1e-12 s before
the hour, after thousands of additions of its length, belongs to the next hour)."""


class GridDataError(ValueError):
    """The shipped grid table is malformed; the message names the file, line and value."""


@dataclass(frozen=True)
class HourlyCarbon:
    """Hourly grid carbon intensity per region, from the first hour of the table on.

    Attributes:
        first_hour_utc: UTC start of the table's first hour.
        g_per_kwh: Intensity per region (gCO2/kWh), one value per hour, shape (hours,).
        filled: Per region, the hours filled by interpolation (a reporting gap in the source).
        source: The file read.
    """

    first_hour_utc: datetime
    g_per_kwh: dict[str, np.ndarray]
    filled: dict[str, np.ndarray]
    source: str

    @property
    def regions(self) -> tuple[str, ...]:
        """The grid regions the table holds (its column order)."""
        return tuple(self.g_per_kwh)

    @property
    def hours(self) -> int:
        """Number of hours in the table."""
        return len(next(iter(self.g_per_kwh.values())))

    @property
    def end_utc(self) -> datetime:
        """UTC end of the table's last hour."""
        return self.first_hour_utc + timedelta(hours=self.hours)

    def offset_s(self, when_utc: datetime) -> float:
        """Seconds from the table's first hour to `when_utc`."""
        return (when_utc - self.first_hour_utc).total_seconds()

    def at(self, region: str, when_utc: datetime) -> float:
        """The intensity of the hour `when_utc` falls in (g/kWh)."""
        return float(self.g_per_kwh[region][int(self.offset_s(when_utc) // HOUR_S)])


def _parse_hour(text: str, where: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M").replace(tzinfo=timezone.utc)
    except ValueError:
        raise GridDataError(f"{where}: timestamp_utc {text!r} is not YYYY-MM-DDTHH:MM") from None


@functools.cache
def hourly_carbon(path: Path = CARBON_TABLE) -> HourlyCarbon:
    """Read (once per process) and check the hourly carbon table.

    Raises:
        GridDataError: Unreadable file, a gap or a repeat in the hours, or a value that is not a
            finite intensity in [0, 2000] g/kWh; the message names the file, line and value.
    """
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as exc:
        raise GridDataError(f"{path}: cannot read the grid carbon table ({exc.strerror or exc})") from None
    if not rows or rows[0][0] != "timestamp_utc" or rows[0][-1] != "filled" or len(rows) < 2:
        raise GridDataError(f"{path}: expected a header 'timestamp_utc,<regions...>,filled' and data rows")
    regions = rows[0][1:-1]
    first = _parse_hour(rows[1][0], f"{path}, line 2")
    values = np.empty((len(rows) - 1, len(regions)))
    filled = np.zeros((len(rows) - 1, len(regions)), dtype=bool)
    for i, row in enumerate(rows[1:]):
        where = f"{path}, line {i + 2}"
        if len(row) != len(regions) + 2:
            raise GridDataError(f"{where}: {len(row)} columns, expected {len(regions) + 2}")
        if _parse_hour(row[0], where) != first + timedelta(hours=i):
            raise GridDataError(f"{where}: timestamp_utc {row[0]!r} is not the hour after the previous row")
        for j, cell in enumerate(row[1:-1]):
            try:
                v = float(cell)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and 0.0 <= v <= 2000.0):
                raise GridDataError(f"{where}: {regions[j]} = {cell!r}: must be in [0, 2000] g/kWh")
            values[i, j] = v
        for name in row[-1].split():
            if name not in regions:
                raise GridDataError(f"{where}: filled names {name!r}, which is not a region {regions}")
            filled[i, regions.index(name)] = True
    return HourlyCarbon(
        first_hour_utc=first,
        g_per_kwh={r: values[:, j].copy() for j, r in enumerate(regions)},
        filled={r: filled[:, j].copy() for j, r in enumerate(regions)},
        source=str(path),
    )


def parse_start(text: str) -> datetime:
    """A scenario's `carbon.start` (`YYYY-MM-DD` or `YYYY-MM-DDTHH:MM[:SS]`, UTC) as an aware datetime.

    Raises:
        ValueError: Not such a date and time (e.g. 2022-02-30).
    """
    when = datetime.fromisoformat(text)
    if when.tzinfo is not None:
        raise ValueError("write the UTC time without an offset")
    return when.replace(tzinfo=timezone.utc)


@functools.lru_cache(maxsize=64)
def _start_offset_s(region: str, start: str) -> tuple[np.ndarray, float]:
    table = hourly_carbon()
    return table.g_per_kwh[region], table.offset_s(parse_start(start))


def region_g_per_kwh(region: str, start: str, t_s: float) -> float:
    """Intensity `t_s` seconds after `start` in `region` (the hour that instant falls in), g/kWh.

    Called once per simulator tick: the region's series and the start's offset are cached.
    """
    series, offset_s = _start_offset_s(region, start)
    return float(series[int((offset_s + t_s + _TICK_EPS_S) // HOUR_S)])
