"""Build `carbon_intensity_2022.csv` from SustainDC's per-region files (run once; kept for provenance).

Usage::

    python envs/data/grid/build_table.py <folder holding the upstream <REGION>_hourly_2022.csv files>

Reads `<REGION>_hourly_2022.csv` (HewlettPackard/dc-rl, commit a92b4755, MIT; extracted by SustainDC
from the US EIA-930 hourly bulk data) for every region, keeps the `avg_CI` column (gCO2/kWh), and writes
one table with one row per hour of 2022 (UTC) and one column per region.

Cleaning, the only change to the values:

* An hour is *missing* when its `avg_CI` is empty, or when the generation the region reported that hour
  (sum of the fuel columns) is below `MIN_GENERATION_FRACTION` of its median hour: an EIA-930 reporting gap
  (PJM reports 0.3% of its usual generation for five hours of 1-2 October 2022, whose intensity, 43-47 g/kWh,
  is an artefact of the little that was reported).
* A missing hour is filled by linear interpolation in time between the nearest hours that are not missing,
  and its region is listed in the row's `filled` column.
"""

from __future__ import annotations

import csv
import math
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

REGIONS = ("BPAT", "CISO", "ERCO", "MISO", "NYIS", "PJM")
FUELS = ("WND", "SUN", "WAT", "OIL", "NG", "COL", "NUC", "OTH")
MIN_GENERATION_FRACTION = 0.1
YEAR_START = datetime(2022, 1, 1, tzinfo=timezone.utc)
HOURS = 8760
OUT = Path(__file__).resolve().parent / "carbon_intensity_2022.csv"


def _read_region(path: Path) -> tuple[list[float], list[bool]]:
    """Hourly intensity of one region (NaN where missing) and which hours were missing."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != HOURS:
        raise SystemExit(f"{path}: {len(rows)} rows, expected {HOURS}")
    totals = []
    for i, r in enumerate(rows):
        when = datetime.fromisoformat(r["timestamp"])
        if when != YEAR_START + timedelta(hours=i):
            raise SystemExit(f"{path}: row {i + 1} is {r['timestamp']}, expected hour {i} of 2022")
        vals = [float(r[f]) for f in FUELS if r[f] != ""]
        totals.append(sum(vals) if vals else 0.0)
    median = sorted(totals)[HOURS // 2]
    ci, missing = [], []
    for r, total in zip(rows, totals, strict=True):
        bad = r["avg_CI"] == "" or total < MIN_GENERATION_FRACTION * median
        ci.append(math.nan if bad else float(r["avg_CI"]))
        missing.append(bad)
    return _fill(ci), missing


def _fill(ci: list[float]) -> list[float]:
    """Linear interpolation in time over the NaN hours (the ends take the nearest value)."""
    known = [i for i, v in enumerate(ci) if not math.isnan(v)]
    out = list(ci)
    for i, v in enumerate(ci):
        if not math.isnan(v):
            continue
        before = max((k for k in known if k < i), default=None)
        after = min((k for k in known if k > i), default=None)
        if before is None or after is None:
            out[i] = ci[after if before is None else before]
        else:
            w = (i - before) / (after - before)
            out[i] = ci[before] * (1 - w) + ci[after] * w
    return out


def main(src: Path) -> None:
    """Write the table from the per-region files in `src`."""
    series = {r: _read_region(src / f"{r}_hourly_2022.csv") for r in REGIONS}
    with open(OUT, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["timestamp_utc", *REGIONS, "filled"])
        for h in range(HOURS):
            when = (YEAR_START + timedelta(hours=h)).strftime("%Y-%m-%dT%H:%M")
            filled = " ".join(r for r in REGIONS if series[r][1][h])
            w.writerow([when, *(f"{series[r][0][h]:.1f}" for r in REGIONS), filled])
    n = {r: sum(series[r][1]) for r in REGIONS}
    print(f"wrote {OUT} ({HOURS} hours); filled hours per region: {n}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
