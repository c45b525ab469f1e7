"""Week-long request traces built from the Azure LLM inference 2024 week and the 2023 rows.

The 2024 one-week traces behind DynamoLLM (Azure/AzurePublicDataset, 16.8M coding and 27.3M
conversation requests) are not shipped; what is shipped is their request rate over the week,
digitized from the dataset's own notebook (``envs/data/traces/azure2024``), and their
prompt-length CDFs. :func:`week_trace` turns these into a request trace over any stretch of
the week, minute by minute (a *block* is one minute of the output):

1. **Rate** (:class:`RateCurve`): the 2024 curve, one point per 7.2155 minutes (requests per
   minute: the midpoint of the drawn line), linearly interpolated, the week repeating; each
   block gets the curve's mean over the block.
2. **Minute-to-minute spread**: each block's rate is multiplied by a mean-1 lognormal factor
   whose relative standard deviation follows the digitized spread: in each 7.2-minute column,
   ``(high - low - one pixel of line width) / (2.704 x rate)`` (2.704: the expected range of 7
   normal draws), times one factor per service chosen so that the mean range of the
   per-minute counts over a column, simulated with the curve's own trend inside each column,
   equals the digitized mean range (:func:`_calibrated_sd`).
3. **Burstiness within minutes** (:class:`BurstPattern`): from the 2023 trace of the same
   service, cut into its whole minutes. A block expecting ``N`` requests is the superposition
   of whole 2023 minutes drawn at random (with replacement), each circularly shifted by its
   own uniform offset in ``[0, 60)`` s, taken until they hold at least ``N`` requests; the
   last one is thinned at random to the remainder, so the block holds ``N`` requests in
   expectation whatever the drawn minutes held (the local rate is the 2024 rate, the
   sub-minute arrival pattern is 2023's). Superposing independent minutes keeps the
   variance-to-mean ratio of the per-second counts inside a minute (the 2023 traces': about
   10.6 for code, 1.10 for conversation); thinning pulls it toward Poisson's 1 only where a
   block needs a single 2023 minute (below 2.5 (code) / 5.5 (conversation) req/s).
4. **Lengths** (:class:`LengthSampler`): (input, output) pairs drawn with replacement from the
   2023 rows of the same service, pairs kept together, with importance weights that make the
   prompt-length distribution the 2024 CDF's: the CDF's points cut the token axis into bins;
   adjacent bins are merged until each holds at least five 2023 rows, and each row's weight is
   its group's 2024 mass over its group's 2023 row count. Lengths are drawn independently of
   the arrival times.

What is approximated (see ``envs/data/traces/README.md``): the curve is digitized from plot
pixels (weekly means within +0.8% / -0.4% of the exact ones); the minute spread is inferred
from a range and held as a relative spread at every scale; burst structure and the joint
length distribution are 2023's, not 2024's; the prompt mix is one CDF for the whole week (the
2024 prompt mix over time was not digitized); 2024 prompt mass beyond the longest 2023 prompt
(6.9% of the coding CDF lies above 7,437 tokens, the 2023 cap; the 2024 cap is about 7,680)
falls on the longest 2023 rows.

All randomness comes from the ``np.random.Generator`` passed in; the work is vectorized numpy
(no per-request Python loop; one loop step per block to pick its 2023 minutes), in chunks of
about a million requests.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm_cluster_gym.envs.sim.workload import (
    TRACES_DIR,
    WEEK_TRACES,
    Trace,
    TraceError,
    builtin_trace,
)

__all__ = [
    "WEEK_S",
    "BurstPattern",
    "LengthSampler",
    "RateCurve",
    "WeekSource",
    "reference_trace",
    "week_source",
    "week_trace",
]

WEEK_S = 7 * 86400.0
"""Length of the week, seconds; the week repeats past its end."""

DATA_DIR = TRACES_DIR / "azure2024"
"""The digitized 2024 data (``envs/data/traces/azure2024``)."""

BLOCK_S = 60.0
"""Length of a block: the unit of the minute-to-minute spread and of the 2023 excerpts."""

COLUMN_MIN = 7.2155
"""Minutes per digitized point (one pixel column of the notebook's plot)."""

MIN_ROWS_PER_GROUP = 5
"""Fewest 2023 rows a group of prompt-length bins holds (smaller: a closer 2024 CDF and a
smaller effective sample; see :class:`LengthSampler`)."""

RANGE_OF_7_NORMALS = 2.704
"""Expected range of 7 independent standard normal draws (d2 of quality-control tables): a
7.2-minute column holds about 7 per-minute counts."""

REFERENCE_MEAN_RPS = 1.0
"""Mean rate of :func:`reference_trace` (what ``resolve_trace`` returns for a week name)."""

TABLE_SIZE = 1 << 18
"""Slots of the length table :meth:`LengthSampler.draw` picks from (its prompt CDF is the
weighted one within 1 / 262,144; a power of two draws fastest)."""

_CHUNK_REQUESTS = 1_000_000


def _read_csv(path: Path, columns: int) -> np.ndarray:
    try:
        data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: cannot read the digitized 2024 data ({exc})") from None
    if data.shape[1] != columns or data.shape[0] < 2 or not np.all(np.isfinite(data)):
        raise TraceError(f"{path}: expected {columns} finite columns and at least 2 rows")
    return data


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class RateCurve:
    """The 2024 week's request rate, periodic over the week.

    Attributes:
        kind: ``"code"`` or ``"conv"``.
        start_utc: The week's first instant (t = 0), UTC.
        knots_s: Centres of the digitized 7.2155-minute columns, seconds from ``start_utc``.
        rate_rps: The curve at each knot, requests per second (the drawn line's midpoint / 60).
        minute_sd: Relative standard deviation of the per-minute rate factor at each knot.
    """

    kind: str
    start_utc: str
    knots_s: np.ndarray
    rate_rps: np.ndarray
    minute_sd: np.ndarray

    @functools.cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
        """The knots extended by one period on each side, with what the methods read.

        Returns (knots, rates, sds, the integral at each knot from the first extended knot,
        the integral at t = 0, the week's total).
        """
        t = np.concatenate([[self.knots_s[-1] - WEEK_S], self.knots_s, [self.knots_s[0] + WEEK_S]])
        r = np.concatenate([[self.rate_rps[-1]], self.rate_rps, [self.rate_rps[0]]])
        sd = np.concatenate([[self.minute_sd[-1]], self.minute_sd, [self.minute_sd[0]]])
        area = np.concatenate([[0.0], np.cumsum(0.5 * (r[1:] + r[:-1]) * np.diff(t))])
        at_0, at_week = (float(v) for v in _area(t, r, area, np.array([0.0, WEEK_S])))
        return t, r, sd, area, at_0, at_week - at_0

    def rate_at(self, t_s: np.ndarray | float) -> np.ndarray:
        """The interpolated rate (req/s) at times ``t_s`` (seconds from the week start, any real)."""
        t, r, _, _, _, _ = self._knots
        return np.interp(np.mod(t_s, WEEK_S), t, r)

    def sd_at(self, t_s: np.ndarray | float) -> np.ndarray:
        """The interpolated relative sd of the per-minute rate factor at times ``t_s``."""
        t, _, sd, _, _, _ = self._knots
        return np.interp(np.mod(t_s, WEEK_S), t, sd)

    def integral(self, t_s: np.ndarray | float) -> np.ndarray:
        """Expected requests in ``[0, t_s)`` at the curve's rate (``t_s`` any real; the week repeats)."""
        t, r, _, area, at_0, total = self._knots
        ts = np.asarray(t_s, dtype=float)
        periods = np.floor(ts / WEEK_S)
        return periods * total + _area(t, r, area, ts - periods * WEEK_S) - at_0

    def mean_rps(self) -> float:
        """Mean rate over the whole week, requests per second."""
        return self._knots[5] / WEEK_S

    def block_rates(self, start_s: float, n_blocks: int, scale: float,
                    rng: np.random.Generator) -> np.ndarray:
        """Rate (req/s) of ``n_blocks`` 60-s blocks from ``start_s``.

        Each block's rate is the curve's mean over the block times ``scale`` times an
        independent mean-1 lognormal factor of relative sd :meth:`sd_at` the block's centre.
        """
        edges = start_s + np.arange(n_blocks + 1) * BLOCK_S
        rate = np.diff(self.integral(edges)) / BLOCK_S * scale
        sd = self.sd_at(edges[:-1] + BLOCK_S / 2)
        sigma2 = np.log1p(sd * sd)
        return rate * np.exp(np.sqrt(sigma2) * rng.standard_normal(n_blocks) - sigma2 / 2)


def _area(t: np.ndarray, r: np.ndarray, area: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The integral of the piecewise-linear rate ``(t, r)`` from ``t[0]`` to ``x`` (exact)."""
    i = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 2)
    dt = x - t[i]
    slope = (r[i + 1] - r[i]) / (t[i + 1] - t[i])
    return area[i] + r[i] * dt + 0.5 * slope * dt * dt


def column_ranges(per_minute: np.ndarray) -> np.ndarray:
    """Range (max - min) of per-minute counts over each 7.2155-minute column of the week.

    ``per_minute`` holds the 10,080 counts of the week's minutes; minute ``m`` falls in column
    ``floor(m / 7.2155)`` (the notebook's pixel columns).
    """
    col = (np.arange(per_minute.shape[0]) / COLUMN_MIN).astype(np.int64)
    n = int(col[-1]) + 1
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    np.minimum.at(lo, col, per_minute)
    np.maximum.at(hi, col, per_minute)
    return hi - lo


def _calibrated_sd(curve: RateCurve, raw_sd: np.ndarray, target_range: np.ndarray) -> np.ndarray:
    """``raw_sd`` times the factor that makes simulated column ranges match ``target_range``.

    The simulation draws the week's per-minute rates (the curve's mean over each minute times
    the lognormal factor, fixed seed) and compares the mean range over the columns the data
    covers with the digitized mean range; four fixed-point steps (the range grows about in
    proportion to the sd once it dominates the curve's own trend).
    """
    factor = 1.0
    n = target_range.shape[0]
    for _ in range(4):
        trial = RateCurve(curve.kind, curve.start_utc, curve.knots_s, curve.rate_rps, raw_sd * factor)
        per_minute = trial.block_rates(0.0, int(WEEK_S / BLOCK_S), 1.0, np.random.default_rng(0)) * BLOCK_S
        simulated = column_ranges(per_minute)[:n]
        factor *= float(target_range.mean() / simulated.mean())
    return raw_sd * factor


@dataclass(frozen=True, eq=False)
class BurstPattern:
    """The 2023 trace of one service cut into its whole minutes (the sub-minute arrival pattern).

    Attributes:
        within_s: Arrival times inside their minute, ``[0, 60)`` s, minute after minute.
        first: Index in ``within_s`` of each minute's first arrival.
        count: Arrivals of each minute.
        dispersion_1s: Variance over mean of the per-second counts around each minute's own
            mean, pooled over the minutes (:func:`within_minute_dispersion`), averaged over ten
            phases of the one-second bins (0, 0.1, ..., 0.9 s): the 2023 value depends on the
            phase (conversation: 1.06 at 0 s, 1.14 at 0.5 s), a generated trace's bins fall at
            random phases.
    """

    within_s: np.ndarray
    first: np.ndarray
    count: np.ndarray
    dispersion_1s: float

    @classmethod
    def from_trace(cls, trace: Trace) -> BurstPattern:
        """The whole minutes of ``trace`` (those that end before its last arrival)."""
        minutes = int(trace.arrival_s[-1] // BLOCK_S) if len(trace) else 0
        a = trace.arrival_s[trace.arrival_s < minutes * BLOCK_S]
        if minutes < 2 or a.shape[0] == 0:
            raise TraceError(f"burst pattern of {trace.name!r}: needs at least two whole minutes")
        m = (a // BLOCK_S).astype(np.int64)
        count = np.bincount(m, minlength=minutes)
        first = np.concatenate([[0], np.cumsum(count)[:-1]])
        within = np.clip(a - m * BLOCK_S, 0.0, np.nextafter(BLOCK_S, 0))
        dispersion = np.mean([within_minute_dispersion(a + phase, minutes * BLOCK_S)
                              for phase in np.arange(10) / 10])
        return cls(within_s=_readonly(within), first=_readonly(first), count=_readonly(count),
                   dispersion_1s=float(dispersion))

    @property
    def mean_count(self) -> float:
        """Mean arrivals per 2023 minute."""
        return float(self.count.mean())


def within_minute_dispersion(arrival_s: np.ndarray, duration_s: float) -> float:
    """Variance over mean of per-second arrival counts around each whole minute's own mean.

    Counts per second over the whole minutes of ``[0, duration_s)``; the squared deviations
    from each minute's mean are pooled (divided by 59 per minute) and divided by the overall
    mean count. Poisson arrivals give 1; the minute-to-minute change of the rate does not
    enter.
    """
    minutes = int(duration_s // BLOCK_S)
    if minutes < 1:
        raise TraceError(f"within_minute_dispersion: needs a whole minute, got {duration_s!r} s")
    sec = arrival_s[arrival_s < minutes * BLOCK_S].astype(np.int64)
    c = np.bincount(sec, minlength=minutes * 60).reshape(minutes, 60).astype(float)
    dev = c - c.mean(axis=1, keepdims=True)
    return float((dev * dev).sum() / (minutes * 59) / c.mean())


@dataclass(frozen=True, eq=False)
class LengthSampler:
    """The 2023 rows of one service with importance weights toward the 2024 prompt CDF.

    Attributes:
        input_tokens: Prompt length of each 2023 row.
        output_tokens: Output length of each 2023 row.
        weight: Probability of each row (sums to 1).
        cdf_tokens: The 2024 CDF's token values (strictly increasing).
        cdf: The 2024 CDF at those values (fraction, non-decreasing).
    """

    input_tokens: np.ndarray
    output_tokens: np.ndarray
    weight: np.ndarray
    cdf_tokens: np.ndarray
    cdf: np.ndarray

    @classmethod
    def reweighted(cls, rows: Trace, cdf_tokens: np.ndarray, cdf: np.ndarray,
                   min_rows: int = MIN_ROWS_PER_GROUP) -> LengthSampler:
        """Weights per 2023 row: its bin group's 2024 mass over the group's 2023 row count.

        The CDF's points cut the token axis into bins ``(x[i-1], x[i]]`` (the first holds
        everything up to ``x[0]``, the last everything above the last point). Adjacent bins
        are merged, left to right, until each group holds ``min_rows`` 2023 rows (a short
        last group joins the one before), so every group with 2024 mass has rows to carry it.
        """
        x, first = np.unique(np.asarray(cdf_tokens, dtype=float), return_index=True)
        f = np.clip(np.maximum.accumulate(np.asarray(cdf, dtype=float)), 0.0, 1.0)[first]
        mass = np.diff(np.concatenate([[0.0], f, [1.0]]))
        inp, out = rows.input_tokens, rows.output_tokens
        bin_of_row = np.searchsorted(x, inp, side="left")
        count = np.bincount(bin_of_row, minlength=mass.shape[0])
        group = np.zeros(mass.shape[0], dtype=np.int64)
        gid, acc = 0, 0
        for i, c in enumerate(count):  # a few hundred bins
            group[i] = gid
            acc += int(c)
            if acc >= min_rows:
                gid, acc = gid + 1, 0
        last = group[-1]
        if count[group == last].sum() < min_rows and last > 0:
            group[group == last] = last - 1
        g_mass = np.bincount(group, weights=mass)
        g_rows = np.bincount(group, weights=count)
        weight = (g_mass / np.maximum(g_rows, 1.0))[group[bin_of_row]]
        weight = weight / weight.sum()
        return cls(input_tokens=inp, output_tokens=out, weight=_readonly(weight),
                   cdf_tokens=_readonly(x), cdf=_readonly(f))

    @functools.cached_property
    def table(self) -> tuple[np.ndarray, np.ndarray]:
        """(input, output) of ``TABLE_SIZE`` slots, each row in about ``weight * TABLE_SIZE`` of them.

        Rows in prompt-length order get slots by rounding their cumulative weight, so the
        table's prompt-length CDF is the weighted one within ``1 / TABLE_SIZE`` everywhere.
        Drawing a uniform slot is then one gather per column.
        """
        order = np.argsort(self.input_tokens, kind="stable")
        edges = np.round(np.concatenate([[0.0], np.cumsum(self.weight[order])]) * TABLE_SIZE)
        edges[-1] = TABLE_SIZE
        rows = np.repeat(order, np.diff(edges).astype(np.int64))
        return _readonly(self.input_tokens[rows]), _readonly(self.output_tokens[rows])

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (input, output) pairs drawn with replacement by weight (one table slot each)."""
        table_in, table_out = self.table
        slot = rng.integers(TABLE_SIZE, size=n)
        return table_in[slot], table_out[slot]

    def effective_rows(self) -> float:
        """Kish's effective sample size of the weights, ``1 / sum(w**2)`` (rows)."""
        return float(1.0 / np.sum(self.weight**2))

    def prompt_cdf(self, tokens: np.ndarray) -> np.ndarray:
        """The weighted prompt-length CDF at ``tokens`` (what :meth:`draw` follows)."""
        order = np.argsort(self.input_tokens, kind="stable")
        cum = np.concatenate([[0.0], np.cumsum(self.weight[order])])
        return cum[np.searchsorted(self.input_tokens[order], tokens, side="right")]



@dataclass(frozen=True, eq=False)
class WeekSource:
    """Everything :func:`week_trace` needs for one service: rate, bursts and lengths."""

    name: str
    kind: str
    curve: RateCurve
    pattern: BurstPattern
    lengths: LengthSampler


def _curve(kind: str) -> RateCurve:
    summary_path = DATA_DIR / "digitize_summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))[kind]
        pixel, start = float(summary["value_per_pixel"]), str(summary["start"])
    except (OSError, ValueError, KeyError) as exc:
        raise TraceError(f"{summary_path}: cannot read {kind!r} ({exc})") from None
    data = _read_csv(DATA_DIR / f"azure2024_{kind}_invocations_per_min.csv", 4)
    minute, low, high, mid = data.T
    if np.any(np.diff(minute) <= 0) or minute[0] < 0 or minute[-1] * 60 >= WEEK_S:
        raise TraceError(f"{DATA_DIR}: azure2024_{kind}_invocations_per_min.csv: minutes must "
                         f"increase inside the week")
    spread = np.maximum(high - low - pixel, 0.0)  # the line's extent less its width
    raw_sd = spread / RANGE_OF_7_NORMALS / np.maximum(mid, 1.0)
    curve = RateCurve(kind=kind, start_utc=start, knots_s=_readonly(minute * 60.0),
                      rate_rps=_readonly(mid / 60.0), minute_sd=raw_sd)
    sd = _calibrated_sd(curve, raw_sd, spread)
    return RateCurve(kind=kind, start_utc=start, knots_s=curve.knots_s, rate_rps=curve.rate_rps,
                     minute_sd=_readonly(sd))


@functools.cache
def week_source(name: str) -> WeekSource:
    """The rate curve, burst pattern and length sampler of a week trace (built once per process).

    Args:
        name: ``"azure_code_2024_week"`` or ``"azure_conv_2024_week"`` (see ``WEEK_TRACES``).

    Raises:
        TraceError: Unknown name or unreadable data.
    """
    if name not in WEEK_TRACES:
        raise TraceError(f"unknown week trace {name!r}; choose one of {sorted(WEEK_TRACES)}")
    kind = WEEK_TRACES[name]
    rows = builtin_trace(f"azure_{kind}_2023")
    cdf = _read_csv(DATA_DIR / f"azure2024_{kind}_input_tokens_cdf.csv", 2)
    lengths = LengthSampler.reweighted(rows, cdf[:, 0], cdf[:, 1] / 100.0)
    return WeekSource(name=name, kind=kind, curve=_curve(kind), pattern=BurstPattern.from_trace(rows),
                      lengths=lengths)


def _check(name: str, start_s: float, duration_s: float, mean_rps: float | None,
           rps_scale: float | None) -> None:
    if not (math.isfinite(start_s) and start_s >= 0):
        raise TraceError(f"week_trace({name!r}): start_s={start_s!r} must be finite and >= 0")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise TraceError(f"week_trace({name!r}): duration_s={duration_s!r} must be finite and > 0")
    if mean_rps is not None and rps_scale is not None:
        raise TraceError(f"week_trace({name!r}): give mean_rps or rps_scale, not both")
    for key, value in (("mean_rps", mean_rps), ("rps_scale", rps_scale)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise TraceError(f"week_trace({name!r}): {key}={value!r} must be finite and > 0")


def _pick_minutes(pattern: BurstPattern, expected: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 2023 minutes each block superposes: a random stream cut where blocks are full.

    Block ``b`` takes the next minutes of one stream of uniformly drawn 2023 minutes until
    they hold at least ``expected[b]`` arrivals. Returns the stream, each block's first
    stream index and number of minutes, and the fraction of its last minute's arrivals the
    block keeps (so that it holds ``expected[b]`` in expectation).
    """
    n_min = pattern.count.shape[0]
    stream = rng.integers(n_min, size=int(expected.sum() / pattern.mean_count * 1.05) + 16)
    cum = np.concatenate([[0], np.cumsum(pattern.count[stream])])
    start = np.zeros(expected.shape[0], dtype=np.int64)
    take = np.zeros(expected.shape[0], dtype=np.int64)
    pos = 0
    for b, need in enumerate(expected.tolist()):  # one step per block (1,440 a day)
        if need <= 0:
            start[b] = pos
            continue
        end = int(np.searchsorted(cum, cum[pos] + need, side="left"))
        while end >= cum.shape[0]:  # the stream ran short: draw more
            more = rng.integers(n_min, size=max(16, stream.shape[0] // 4))
            stream = np.concatenate([stream, more])
            cum = np.concatenate([cum, cum[-1] + np.cumsum(pattern.count[more])])
            end = int(np.searchsorted(cum, cum[pos] + need, side="left"))
        start[b], take[b] = pos, end - pos
        pos = end
    last = start + take - 1
    before_last = cum[np.maximum(last, 0)] - cum[start]
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.where(take > 0, (expected - before_last) / pattern.count[stream[np.maximum(last, 0)]], 0.0)
    return stream, start, take, np.clip(keep, 0.0, 1.0)


def _shifted_minutes(pattern: BurstPattern, minutes: np.ndarray, shift_s: np.ndarray,
                     at_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The arrivals of 2023 ``minutes``, each shifted circularly by ``shift_s`` and moved to ``at_s``.

    Returns the arrival times, grouped by minute, and each minute's number of arrivals.
    """
    n = pattern.count[minutes]
    total = int(n.sum())
    pos = np.arange(total, dtype=np.int64)
    pos += np.repeat(pattern.first[minutes] - (np.cumsum(n) - n), n)
    t = pattern.within_s[pos]
    t += np.repeat(shift_s, n)
    t -= np.where(t >= BLOCK_S, BLOCK_S, 0.0)
    t += np.repeat(at_s, n)
    return t, n


class _Columns:
    """Arrival time, input and output columns filled chunk by chunk (grown if ever too small)."""

    def __init__(self, capacity: int) -> None:
        self.n = 0
        self.t = np.empty(capacity)
        self.inp = np.empty(capacity, dtype=np.int32)
        self.out = np.empty(capacity, dtype=np.int32)

    def extend(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of the next ``m`` rows of each column."""
        if self.n + m > self.t.shape[0]:
            cap = max(2 * self.t.shape[0], self.n + m)
            self.t, self.inp, self.out = (np.concatenate([a[: self.n], np.empty(cap - self.n, a.dtype)])
                                          for a in (self.t, self.inp, self.out))
        lo, self.n = self.n, self.n + m
        return self.t[lo:self.n], self.inp[lo:self.n], self.out[lo:self.n]

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The filled rows of each column."""
        return self.t[: self.n], self.inp[: self.n], self.out[: self.n]


def week_trace(
    name: str,
    start_s: float,
    duration_s: float,
    rng: np.random.Generator,
    *,
    mean_rps: float | None = None,
    rps_scale: float | None = None,
) -> Trace:
    """Requests over ``[start_s, start_s + duration_s)`` of the 2024 week (method: module doc).

    Args:
        name: ``"azure_code_2024_week"`` or ``"azure_conv_2024_week"``.
        start_s: Window start, seconds from the week's start (``RateCurve.start_utc``); past
            the week's end the week repeats.
        duration_s: Window length, seconds, > 0.
        rng: Source of all randomness (the caller spawns it).
        mean_rps: Scale the curve so that its mean over the *whole week* is this rate (a
            window keeps its own level against the week: a weekday peak stays above it).
        rps_scale: Or multiply the curve by this factor (1: the 2024 service's own rate,
            1,680 (code) / 2,698 (conversation) requests per minute on average). Neither
            given: 1.

    Returns:
        The trace, arrivals re-based to the window start, named ``name``.

    Raises:
        TraceError: Unknown name or out-of-range arguments.
    """
    _check(name, start_s, duration_s, mean_rps, rps_scale)
    src = week_source(name)
    pattern = src.pattern
    scale = mean_rps / src.curve.mean_rps() if mean_rps is not None else (rps_scale or 1.0)
    n_blocks = int(math.ceil(duration_s / BLOCK_S))
    expected = src.curve.block_rates(start_s, n_blocks, scale, rng) * BLOCK_S
    stream, first, take, keep_last = _pick_minutes(pattern, expected, rng)
    shift = rng.uniform(0.0, BLOCK_S, size=stream.shape[0])
    block_at = np.arange(n_blocks) * BLOCK_S
    chunk_of = (np.cumsum(expected) // _CHUNK_REQUESTS).astype(np.int64)
    bounds = np.flatnonzero(np.diff(np.concatenate([[-1], chunk_of, [chunk_of[-1] + 1]]))).tolist()
    buf = _Columns(int(expected.sum() * 1.01) + 10_000)
    table_in, table_out = src.lengths.table
    end_s = np.nextafter(duration_s, 0.0)
    for lo_b, hi_b in zip(bounds[:-1], bounds[1:], strict=True):
        blocks = np.arange(lo_b, hi_b)
        n_whole = np.maximum(take[blocks] - 1, 0)
        whole_blocks = np.repeat(blocks, n_whole)
        whole = np.repeat(first[blocks] - (np.cumsum(n_whole) - n_whole), n_whole)
        whole += np.arange(whole.shape[0])  # stream index of every whole minute
        t_whole, _ = _shifted_minutes(pattern, stream[whole], shift[whole], block_at[whole_blocks])
        lasts = blocks[take[blocks] > 0]
        last = first[lasts] + take[lasts] - 1
        t_last, n_last = _shifted_minutes(pattern, stream[last], shift[last], block_at[lasts])
        t_last = t_last[rng.random(t_last.shape[0]) < np.repeat(keep_last[lasts], n_last)]
        t = np.concatenate([t_whole, t_last])
        t.sort()
        if hi_b == n_blocks:  # the last block may run past the window's end
            t = t[t < duration_s]
            np.minimum(t, end_s, out=t)
        at, inp, out = buf.extend(t.shape[0])
        at[:] = t
        slot = rng.integers(TABLE_SIZE, size=t.shape[0])  # lengths: independent of the times
        np.take(table_in, slot, out=inp)
        np.take(table_out, slot, out=out)
    t, input_tokens, output_tokens = buf.columns()
    how = f"mean_rps={mean_rps:g}" if mean_rps is not None else f"rps_scale={scale:g}"
    return Trace(
        arrival_s=t,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        duration_s=duration_s,
        name=name,
        source=(f"synthetic: week_trace({name}, start_s={start_s:g}, duration_s={duration_s:g}, "
                f"{how}; 2024 rate curve from {DATA_DIR.name}, 2023 bursts and lengths)"),
    )


@functools.cache
def reference_trace(name: str) -> Trace:
    """The whole week at a mean of 1 req/s, seed 0: what a scenario's ``workload.trace`` resolves to.

    Loading a scenario checks its window against it and controllers read the week's request
    lengths from it (``describe()``'s pool statistics); an episode's own arrivals are drawn by
    `demand.episode_trace` through :func:`week_trace`.
    """
    return week_trace(name, 0.0, WEEK_S, np.random.default_rng(0), mean_rps=REFERENCE_MEAN_RPS)
