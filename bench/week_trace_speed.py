"""Week-trace generation: speed of a day at 1,000 req/s, and how well the result fits its sources.

Generates one day of the conversation week (and of the coding week) at a weekly mean of
1,000 requests/s through `envs/sim/week_trace.week_trace` on one CPU core, and reports:

* seconds for the day and requests generated per second. Target: the conversation day
  (about 100 million requests, a Monday) in under 15 s;
* the fit of the rate: the largest and the mean absolute hourly deviation from the curve;
* burstiness: the per-second count dispersion inside minutes (variance / mean; Poisson: 1)
  against the 2023 trace's, over ten bin phases;
* lengths: the KS distance of the generated prompt lengths to the 2024 CDF, inside the
  2023 rows' support and over all tokens;
* `scale_to_rate` (the 2023 conversation trace rescaled to 1,000 requests/s for an hour,
  3.6 million requests): seconds, best of three. Target: under 2 s.

The week source (curve, burst pattern, length table) is built once before timing. Earlier
lines are for people; the last line is one JSON object.

Usage::

    python bench/week_trace_speed.py [--day 1] [--rps 1000]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from llm_cluster_gym.envs.sim.week_trace import week_source, week_trace, within_minute_dispersion  # noqa: E402
from llm_cluster_gym.envs.sim.workload import builtin_trace, scale_to_rate  # noqa: E402

TARGET_S = 15.0
SCALE_TARGET_S = 2.0
DAY = 86400.0


def measure(name: str, day: int, rps: float) -> dict:
    src = week_source(name)
    _ = src.lengths.table  # built once per process, not timed
    t0 = time.perf_counter()
    tr = week_trace(name, day * DAY, DAY, np.random.default_rng(0), mean_rps=rps)
    seconds = time.perf_counter() - t0
    curve = src.curve
    edges = day * DAY + np.arange(25) * 3600.0
    expected = np.diff(curve.integral(edges)) * rps / curve.mean_rps()
    got = np.histogram(tr.arrival_s, np.arange(25) * 3600.0)[0]
    err = got / expected - 1
    t23 = builtin_trace(f"azure_{src.kind}_2023")
    x, f24 = src.lengths.cdf_tokens, src.lengths.cdf
    gen = np.searchsorted(np.sort(tr.input_tokens), x, side="right") / len(tr)
    inside = x < t23.input_tokens.max()
    return {
        "trace": name, "requests": len(tr), "seconds": round(seconds, 2),
        "requests_per_s": round(len(tr) / seconds), "mean_rps": round(tr.mean_rate_rps(), 1),
        "hourly_error_max": round(float(np.abs(err).max()), 4),
        "hourly_error_mean_abs": round(float(np.abs(err).mean()), 4),
        "dispersion_1s": round(within_minute_dispersion(tr.arrival_s, tr.duration_s), 3),
        "dispersion_1s_2023": round(src.pattern.dispersion_1s, 3),
        "ks_prompt_inside_2023_support": round(float(np.abs(gen - f24)[inside].max()), 4),
        "ks_prompt_all": round(float(np.abs(gen - f24).max()), 4),
    }


def scale_to_rate_s(repeats: int = 3) -> float:
    """Best of `repeats` timings of an hour of the 2023 conversation trace at 1,000 requests/s."""
    tr = builtin_trace("azure_conv_2023")
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        scale_to_rate(tr, 1000.0, np.random.default_rng(i), duration_s=3600.0)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", type=int, default=1, help="day of the week (0: its first day)")
    parser.add_argument("--rps", type=float, default=1000.0, help="weekly mean rate, req/s")
    args = parser.parse_args()
    rows = [measure(name, args.day, args.rps) for name in ("azure_conv_2024_week", "azure_code_2024_week")]
    for r in rows:
        print(f"{r['trace']}: {r['requests']:,} requests in {r['seconds']} s ({r['requests_per_s']:,}/s); "
              f"hourly error max {r['hourly_error_max']:.1%} mean {r['hourly_error_mean_abs']:.1%}; "
              f"dispersion {r['dispersion_1s']} (2023: {r['dispersion_1s_2023']}); "
              f"prompt KS {r['ks_prompt_inside_2023_support']} inside 2023's support, "
              f"{r['ks_prompt_all']} all")
    conv = rows[0]
    print(f"target: the conversation day in under {TARGET_S:g} s: "
          f"{'met' if conv['seconds'] < TARGET_S else 'NOT met'}")
    scale_s = scale_to_rate_s()
    print(f"scale_to_rate, an hour at 1,000 req/s: {scale_s:.2f} s (target under {SCALE_TARGET_S:g} s: "
          f"{'met' if scale_s < SCALE_TARGET_S else 'NOT met'})")
    print(json.dumps({"target_s": TARGET_S, "met": conv["seconds"] < TARGET_S, "results": rows,
                      "scale_to_rate_hour_s": round(scale_s, 3), "scale_to_rate_target_s": SCALE_TARGET_S}))


if __name__ == "__main__":
    main()
