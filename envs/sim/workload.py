"""Request workloads: real Azure LLM inference traces, scaled, synthetic diurnal load, spikes.

The simulator is driven by a stream of requests, each an arrival time with a prompt (input)
length and a generated (output) length. This module

* loads traces in the Azure LLM inference formats (2023 Splitwise sample, 2024 DynamoLLM
  week-long trace) and in Vidur's processed format (:func:`load_trace`), and ships the two
  2023 traces (:func:`builtin_trace`); the two 2024 weeks are generated from their digitized
  rate (:data:`WEEK_TRACES`, ``envs/sim/week_trace.py``);
* replays a real trace at another mean rate while keeping its burstiness and its joint length
  distribution (:func:`scale_to_rate`);
* makes synthetic diurnal load (:func:`diurnal_trace`) and load spikes (:func:`add_spike`);
* splits requests into DynamoLLM-style length pools (:class:`LengthPools`) and aggregates
  them per control tick (:func:`arrivals_per_tick`) for the aggregate serving model.

All randomness comes from the ``np.random.Generator`` passed in: the same seed gives the same
trace. Everything is vectorized numpy; there is no per-request Python loop outside error paths.

Data: Azure LLM inference traces 2023 (Azure/AzurePublicDataset, CC-BY 4.0). Cite Patel et al.,
"Splitwise", ISCA 2024, and Stojkovic et al., "DynamoLLM", HPCA 2025 (see
``envs/data/traces/README.md``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from llm_cluster_gym.envs.sim.compiled import JIT_OPTIONS

__all__ = [
    "DEFAULT_POOLS",
    "BUILTIN_TRACES",
    "WEEK_TRACES",
    "LengthPools",
    "Trace",
    "TraceError",
    "add_spike",
    "arrivals_per_tick",
    "builtin_trace",
    "diurnal_trace",
    "is_builtin_name",
    "is_week_trace",
    "load_trace",
    "merge",
    "resolve_trace",
    "scale_to_rate",
]

TRACES_DIR = Path(__file__).resolve().parent.parent / "data" / "traces"
"""Folder of the shipped trace files (``envs/data/traces``)."""

BUILTIN_TRACES: dict[str, str] = {
    "azure_code_2023": "AzureLLMInferenceTrace_code.csv",
    "azure_conv_2023": "AzureLLMInferenceTrace_conv.csv",
}
"""Names accepted by :func:`builtin_trace` and the file each one reads."""

WEEK_TRACES: dict[str, str] = {
    "azure_code_2024_week": "code",
    "azure_conv_2024_week": "conv",
}
"""Week-long traces generated from the digitized 2024 week (``envs/sim/week_trace.py``): name
and service. A scenario names them like a shipped trace."""

# Column names of the accepted formats. Azure 2023 and 2024 use the same three columns.
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_VIDUR_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")

_CHUNK_ROWS = 1_000_000  # rows parsed per numpy call; bounds memory on the 0.8-1.3 GB week traces
_INT32_MAX = np.iinfo(np.int32).max


class TraceError(ValueError):
    """A trace file, or an argument of a workload function, is invalid.

    For file errors the message names the file, the field (column), the data row (1-based,
    the header is row 0) and the offending value.
    """


def _row_error(path: Path, field: str, row: int, value: object, why: str,
               line: int | None = None, column: int | None = None) -> TraceError:
    """Build a :class:`TraceError` naming file, field (and column), row (and line) and value."""
    col = f" (column {column})" if column is not None else ""
    ln = f" (line {line})" if line is not None else ""
    return TraceError(f"{path}: field {field!r}{col}, row {row}{ln}: value {value!r}: {why}")


class _Lines:
    """Where a data row sits in the file: the header is line 1, blank lines are skipped.

    Only the blank lines' numbers are kept, so the map costs nothing on a clean file; it is
    read on error paths only.
    """

    def __init__(self, path: Path, header: list[str]) -> None:
        self.path, self.header = path, header
        self.blank: list[int] = []

    def line(self, row: int) -> int:
        """The file line of data row ``row`` (1-based)."""
        line = row + 1
        for b in self.blank:  # ascending
            if b > line:
                break
            line += 1
        return line

    def error(self, field: str, row: int, value: object, why: str) -> TraceError:
        """A :class:`TraceError` for ``field`` of data row ``row``."""
        column = self.header.index(field) + 1 if field in self.header else None
        return _row_error(self.path, field, row, value, why, line=self.line(row), column=column)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Trace:
    """An immutable request trace: arrival times and the joint input/output lengths.

    Attributes:
        arrival_s: Arrival times in seconds from the trace start, float64, sorted ascending
            (the first arrival may be > 0).
        input_tokens: Prompt (context) length of each request, int32, > 0.
        output_tokens: Generated length of each request, int32, >= 1.
        duration_s: Length of the period the trace covers, seconds; every arrival is in
            ``[0, duration_s)``. ``mean_rate_rps`` is ``len / duration_s``.
        name: Short name, e.g. ``"azure_conv_2023"``.
        source: File path it was read from, or ``"synthetic: ..."`` saying how it was made.
    """

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    duration_s: float
    name: str
    source: str

    def __post_init__(self) -> None:
        arrival_s = np.ascontiguousarray(self.arrival_s, dtype=np.float64)
        input_tokens = np.ascontiguousarray(self.input_tokens, dtype=np.int32)
        output_tokens = np.ascontiguousarray(self.output_tokens, dtype=np.int32)
        n = arrival_s.shape[0]
        if arrival_s.ndim != 1 or input_tokens.shape != (n,) or output_tokens.shape != (n,):
            raise TraceError(
                f"Trace {self.name!r}: arrays must be 1-D of one length, got shapes "
                f"{arrival_s.shape}, {input_tokens.shape}, {output_tokens.shape}"
            )
        duration_s = float(self.duration_s)
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise TraceError(f"Trace {self.name!r}: duration_s={self.duration_s!r} must be > 0")
        if n:
            if not np.all(np.isfinite(arrival_s)) or np.any(arrival_s[1:] < arrival_s[:-1]):
                raise TraceError(f"Trace {self.name!r}: arrival_s must be finite and sorted")
            if arrival_s[0] < 0 or arrival_s[-1] >= duration_s:
                raise TraceError(
                    f"Trace {self.name!r}: arrivals [{arrival_s[0]}, {arrival_s[-1]}] must lie "
                    f"in [0, duration_s={duration_s})"
                )
            if input_tokens.min() < 1 or output_tokens.min() < 1:
                raise TraceError(f"Trace {self.name!r}: token counts must be >= 1")
        # Frozen dataclass: swap in the normalized, read-only arrays (safe to share/cache).
        object.__setattr__(self, "arrival_s", _readonly(arrival_s))
        object.__setattr__(self, "input_tokens", _readonly(input_tokens))
        object.__setattr__(self, "output_tokens", _readonly(output_tokens))
        object.__setattr__(self, "duration_s", duration_s)

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def __repr__(self) -> str:
        return (
            f"Trace(name={self.name!r}, n={len(self)}, duration_s={self.duration_s:.1f}, "
            f"mean_rate_rps={self.mean_rate_rps():.3f}, source={self.source!r})"
        )

    def mean_rate_rps(self) -> float:
        """Mean arrival rate over the whole trace period, requests per second."""
        return len(self) / self.duration_s

    def window(self, start_s: float, duration_s: float) -> Trace:
        """Return the requests arriving in ``[start_s, start_s + duration_s)``, re-based to 0.

        The window is clipped to the trace period, so the result's ``duration_s`` is
        ``min(start_s + duration_s, self.duration_s) - start_s``.

        Args:
            start_s: Window start, seconds from the trace start, in ``[0, duration_s)``.
            duration_s: Window length, seconds, > 0.

        Raises:
            TraceError: If the window is empty or starts outside the trace.
        """
        if not (0 <= start_s < self.duration_s) or not duration_s > 0:
            raise TraceError(
                f"Trace {self.name!r}: window start_s={start_s!r}, duration_s={duration_s!r} "
                f"must satisfy 0 <= start_s < {self.duration_s} and duration_s > 0"
            )
        end_s = min(start_s + duration_s, self.duration_s)
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s], side="left")
        return Trace(
            # Clip guards the float rounding of (t - start) up to the window length.
            arrival_s=np.minimum(self.arrival_s[lo:hi] - start_s, np.nextafter(end_s - start_s, 0)),
            input_tokens=self.input_tokens[lo:hi],
            output_tokens=self.output_tokens[lo:hi],
            duration_s=end_s - start_s,
            name=self.name,
            source=f"{self.source} [window {start_s:g}s + {end_s - start_s:g}s]",
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _first_bad(values: np.ndarray, convert) -> int:
    """Index of the first element ``convert`` rejects (error path only: Python loop)."""
    for i, v in enumerate(values):
        try:
            convert(v)
        except (ValueError, TypeError, OverflowError):
            return i
    return -1


def _parse_tokens(col: np.ndarray, where: _Lines, field: str, row0: int, min_value: int) -> np.ndarray:
    """Parse a bytes column of token counts; reject non-numbers, non-integers, < min_value."""
    try:
        x = col.astype(np.float64)
    except ValueError:
        i = _first_bad(col, lambda v: float(v))
        raise where.error(field, row0 + i, col[i].decode(errors="replace"), "not a number") from None
    bad = ~np.isfinite(x) | (x != np.round(x)) | (x < min_value) | (x > _INT32_MAX)
    if bad.any():
        i = int(np.argmax(bad))
        v = x[i]
        why = (
            "not a finite number"
            if not np.isfinite(v)
            else "not an integer"
            if v != round(v)
            else f"must be >= {min_value}"
            if v < min_value
            else "too large for int32"
        )
        raise where.error(field, row0 + i, col[i].decode(errors="replace"), why)
    return x.astype(np.int32)


def _parse_timestamps_ns(col: np.ndarray, where: _Lines, field: str, row0: int) -> np.ndarray:
    """Parse a bytes column of ISO timestamps to int64 ns since the epoch, in UTC.

    Accepts naive timestamps (2023 trace: ``2023-11-16 18:17:03.9799600``) and tz-aware ones
    (2024 trace: ``2024-05-10 00:00:00.009930+00:00``, any ``+HH:MM``/``-HH:MM`` offset, or a
    ``Z`` suffix). Vectorized: the offset suffix is read and blanked through a ``uint8`` view
    of the fixed-width bytes array, then numpy parses the rest.
    """
    n = col.shape[0]
    width = col.dtype.itemsize
    s = np.char.strip(col).astype(f"S{width}")
    b = s.view(np.uint8).reshape(n, width).copy()
    length = np.count_nonzero(b, axis=1)  # fixed-width bytes are NUL-padded on the right
    rows = np.arange(n)

    def at(k: np.ndarray) -> np.ndarray:
        return b[rows, np.clip(k, 0, width - 1)]

    offset_min = np.zeros(n, dtype=np.int64)
    sign_pos = length - 6
    sign = at(sign_pos)
    has_off = (
        (length >= 16) & ((sign == ord("+")) | (sign == ord("-"))) & (at(length - 3) == ord(":"))
    )
    if has_off.any():
        digits = np.stack([at(sign_pos + k) for k in (1, 2, 4, 5)], axis=1).astype(np.int64)
        digits -= ord("0")
        ok = np.all((digits >= 0) & (digits <= 9), axis=1)
        has_off &= ok
        minutes = (digits[:, 0] * 10 + digits[:, 1]) * 60 + digits[:, 2] * 10 + digits[:, 3]
        offset_min = np.where(has_off, np.where(sign == ord("-"), -minutes, minutes), 0)
        cols = sign_pos[has_off, None] + np.arange(6)
        b[rows[has_off, None], cols] = 0
    has_z = (length > 0) & (at(length - 1) == ord("Z"))
    b[rows[has_z], length[has_z] - 1] = 0
    # numpy also reads "5" as the year 0005: require a calendar date, YYYY-MM-DD...
    dated = (length >= 10) & (at(np.full(n, 4)) == ord("-")) & (at(np.full(n, 7)) == ord("-"))
    if not dated.all():
        i = int(np.argmin(dated))
        raise where.error(field, row0 + i, col[i].decode(errors="replace"),
                          "not an ISO timestamp (YYYY-MM-DD hh:mm:ss)")
    stripped = b.view(f"S{width}").reshape(n)
    try:
        t = stripped.astype("datetime64[ns]")
    except ValueError:
        i = _first_bad(stripped, lambda v: np.datetime64(v.decode(), "ns"))
        raise where.error(
            field, row0 + i, col[i].decode(errors="replace"), "unparsable timestamp"
        ) from None
    nat = np.isnat(t)
    if nat.any():
        i = int(np.argmax(nat))
        raise where.error(field, row0 + i, col[i].decode(errors="replace"), "missing timestamp")
    # local = UTC + offset  =>  UTC = local - offset
    return t.astype(np.int64) - offset_min * 60_000_000_000


def _parse_seconds(col: np.ndarray, where: _Lines, field: str, row0: int) -> np.ndarray:
    """Parse a bytes column of arrival seconds (Vidur's ``arrived_at``)."""
    try:
        x = col.astype(np.float64)
    except ValueError:
        i = _first_bad(col, lambda v: float(v))
        raise where.error(field, row0 + i, col[i].decode(errors="replace"), "not a number") from None
    bad = ~np.isfinite(x) | (x < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise where.error(field, row0 + i, col[i].decode(errors="replace"), "must be finite and >= 0")
    return x


def _read_columns(
    path: Path,
) -> tuple[str, tuple[str, ...], _Lines, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Parse a trace file's three columns chunk by chunk: (kind, fields, lines, times, ins, outs)."""
    with path.open("r", encoding="utf-8-sig") as f:  # universal newlines; drop a BOM
        header_line = f.readline()
        if "\x00" in header_line:
            raise TraceError(f"{path}: line 1: holds NUL bytes; a trace is a CSV text file")
        header = [h.strip().strip('"') for h in header_line.strip().split(",")]
        if not header_line.strip():
            raise TraceError(f"{path}: empty file (no header row)")
        if "arrived_at" in header:
            fields, kind = _VIDUR_COLUMNS, "vidur"
        else:
            fields, kind = _AZURE_COLUMNS, "azure"
        for field in fields:
            if field not in header:
                shown = repr(header) if len(repr(header)) <= 200 else repr(header)[:200] + "..."
                raise TraceError(
                    f"{path}: field {field!r} missing from header {shown} "
                    f"(expected columns {list(fields)})"
                )
        usecols = [header.index(field) for field in fields]
        where = _Lines(path, header)
        times: list[np.ndarray] = []
        ins: list[np.ndarray] = []
        outs: list[np.ndarray] = []
        row0, line0 = 1, 1  # next data row; lines read so far (the header)
        while True:
            lines = list(itertools.islice(f, _CHUNK_ROWS))
            if not lines:
                break
            blank = [i for i, ln in enumerate(lines) if not ln.strip()]
            if blank:
                where.blank.extend(line0 + 1 + i for i in blank)
                skip = set(blank)
                data = [ln for i, ln in enumerate(lines) if i not in skip]
            else:
                data = lines
            line0 += len(lines)
            if not data:
                continue
            try:
                cells = np.loadtxt(
                    data, delimiter=",", dtype=bytes, usecols=usecols, ndmin=2, comments=None
                )
            except ValueError as e:
                need = max(usecols) + 1
                short = next((i for i, ln in enumerate(data) if ln.count(",") + 1 < need), None)
                if short is not None:
                    row = row0 + short
                    raise TraceError(
                        f"{path}: row {row} (line {where.line(row)}): "
                        f"{data[short].count(',') + 1} comma-separated values, the header's "
                        f"columns {list(fields)} need {need}"
                    ) from None
                raise TraceError(
                    f"{path}: malformed CSV in rows {row0}..{row0 + len(data) - 1}: {e}"
                ) from None
            if kind == "vidur":
                times.append(_parse_seconds(cells[:, 0], where, fields[0], row0))
            else:
                times.append(_parse_timestamps_ns(cells[:, 0], where, fields[0], row0))
            ins.append(_parse_tokens(cells[:, 1], where, fields[1], row0, 1))
            outs.append(_parse_tokens(cells[:, 2], where, fields[2], row0, 1))
            row0 += len(cells)
    return kind, fields, where, times, ins, outs


def _undecodable(path: Path) -> tuple[int, int]:
    """(line, byte value) of the first byte of ``path`` that is not UTF-8 (error path only)."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return n, raw[e.start]
    return 1, 0


def load_trace(path: str | Path, name: str | None = None) -> Trace:
    """Read a request trace from a CSV file.

    Accepted formats (found from the header; extra columns are ignored):

    * Azure 2023 (Splitwise): ``TIMESTAMP`` naive with 7 fractional digits,
      ``ContextTokens``, ``GeneratedTokens``.
    * Azure 2024 week-long (DynamoLLM): same columns, tz-aware timestamps such as
      ``2024-05-10 00:00:00.009930+00:00``; converted to UTC.
    * Vidur processed traces: ``arrived_at`` (seconds), ``num_prefill_tokens``,
      ``num_decode_tokens``.

    Timestamps are re-based so that ``arrival_s`` counts seconds from the first request's
    timestamp floored to the whole second (so the first arrival is in ``[0, 1)``); Vidur's
    ``arrived_at`` is used as is. ``duration_s`` is the last arrival plus the mean
    inter-arrival gap, so that a trace tiled end to end (as :func:`scale_to_rate` does) keeps
    its mean rate across the seam.

    The file is parsed in chunks of 1M rows with numpy's C CSV reader and vectorized
    timestamp parsing (no pandas): about 0.65M rows/s and 0.5 GB peak on a 2M-row 2024-format
    file here, i.e. roughly 25 s for the 16.8M-row week-long code trace.

    Args:
        path: CSV file path.
        name: Trace name; defaults to the file stem.

    Returns:
        The trace.

    Raises:
        TraceError: Missing file or column, empty file, a file that is not UTF-8 text (a
            binary file), a row with too few values, unparsable or unsorted timestamps,
            token counts that are not positive integers (output tokens of 0, NaN and
            infinities included), negative or non-finite Vidur arrival times; the message
            names the file, field (and column), data row (1-based, blank lines skipped), its
            line in the file, and the value.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        kind, fields, where, times, ins, outs = _read_columns(path)
    except UnicodeDecodeError:
        line, byte = _undecodable(path)
        raise TraceError(
            f"{path}: line {line}: byte 0x{byte:02x} is not UTF-8 text; a trace is a CSV file "
            f"(is this a binary file?)"
        ) from None
    if not times or sum(len(t) for t in times) == 0:
        raise TraceError(f"{path}: empty file (header but no data rows)")
    t = np.concatenate(times)
    back = np.flatnonzero(np.diff(t) < 0)
    if back.size:
        i = int(back[0]) + 1
        value = str(np.datetime64(int(t[i]), "ns")) if kind == "azure" else repr(float(t[i]))
        raise where.error(fields[0], i + 1, value, "timestamps are not sorted ascending")
    if kind == "azure":
        origin_ns = (t[0] // 1_000_000_000) * 1_000_000_000
        arrival_s = (t - origin_ns).astype(np.float64) * 1e-9
    else:
        arrival_s = t
    n = arrival_s.shape[0]
    mean_gap_s = (arrival_s[-1] - arrival_s[0]) / (n - 1) if n > 1 else 0.0
    duration_s = float(arrival_s[-1] + (mean_gap_s if mean_gap_s > 0 else 1.0))
    return Trace(
        arrival_s=arrival_s,
        input_tokens=np.concatenate(ins),
        output_tokens=np.concatenate(outs),
        duration_s=duration_s,
        name=name if name is not None else path.stem,
        source=str(path),
    )


@functools.cache
def builtin_trace(name: str) -> Trace:
    """Load a shipped trace by name (cached; the returned arrays are read-only).

    Args:
        name: ``"azure_code_2023"`` or ``"azure_conv_2023"`` (see :data:`BUILTIN_TRACES`).

    Raises:
        TraceError: Unknown name.
    """
    if name not in BUILTIN_TRACES:
        known = sorted(BUILTIN_TRACES) + sorted(WEEK_TRACES)
        raise TraceError(f"unknown builtin trace {name!r}; choose one of {known}")
    return load_trace(TRACES_DIR / BUILTIN_TRACES[name], name=name)


def is_builtin_name(ref: str) -> bool:
    """Whether a scenario's ``workload.trace`` is a shipped trace's name (no ``/``, no ``.``)."""
    return "/" not in ref and "." not in ref


def is_week_trace(ref: str) -> bool:
    """Whether ``ref`` names a generated 2024 week trace (:data:`WEEK_TRACES`)."""
    return ref in WEEK_TRACES


def resolve_trace(ref: str) -> Trace:
    """The trace a scenario names: a shipped trace by name, a 2024 week by name, or a CSV file.

    A file is parsed once per version (path, modification time, size) and cached in memory,
    and files of 1 MiB or more also on disk (``trace_cache``: the user's cache folder), so
    that loading a scenario checks its trace, every episode reuses the parse and the next
    process reads the columns back instead of parsing the CSV. A week name resolves to
    ``week_trace.reference_trace``: the whole week at 1 req/s, seed 0 (episodes draw their
    own arrivals through ``demand.episode_trace``).

    Raises:
        TraceError: Unknown shipped name, missing file, or a malformed file (see :func:`load_trace`).
    """
    if is_week_trace(ref):
        from llm_cluster_gym.envs.sim.week_trace import reference_trace

        return reference_trace(ref)
    if is_builtin_name(ref):
        return builtin_trace(ref)
    path = Path(ref).expanduser()
    try:
        st = path.stat()
    except OSError:
        raise TraceError(f"{path}: no such trace file") from None
    if not path.is_file():
        raise TraceError(f"{path}: not a file")
    return _file_trace(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _file_trace(path: str, mtime_ns: int, size: int) -> Trace:
    """`load_trace`, cached per file version (the key's mtime and size) here and on disk."""
    from llm_cluster_gym.envs.sim.trace_cache import cached_load

    return cached_load(Path(path))


# --------------------------------------------------------------------------------------------
# Scaling and synthesis
# --------------------------------------------------------------------------------------------


def _check_positive(func: str, **kwargs: float) -> None:
    for key, value in kwargs.items():
        if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
            raise TraceError(f"{func}: {key}={value!r} must be a finite number > 0")


def scale_to_rate(
    trace: Trace,
    target_rps: float,
    rng: np.random.Generator,
    duration_s: float | None = None,
) -> Trace:
    """Replay a real trace's arrival process at another mean rate.

    Method (superpose-and-thin): the trace is treated as one period of a circular process.
    ``k = ceil(target_rps / trace.mean_rate_rps())`` copies are made; each copy, and each
    period of it needed to fill ``duration_s``, is circularly shifted in time by its own
    uniform random offset in ``[0, trace.duration_s)``. Each request keeps its own (input,
    output) pair, so the joint length distribution is the trace's, and the bursts inside
    every copy are kept (superposing k shifted copies of a bursty process keeps the shape of
    its bursts while multiplying the rate). The superposition is then thinned uniformly at
    random to exactly ``round(target_rps * duration_s)`` requests, so the mean rate equals
    the target up to rounding to a whole request. A lower target than the trace's rate is a
    pure thinning of one shifted copy.

    The length mix of the real traces drifts over the hour, so the result keeps the trace's
    length distribution exactly in expectation only over whole periods; a ``duration_s``
    shorter than the trace samples a random stretch of it per copy (as a real shorter
    window would).

    Args:
        trace: The trace to replay; must not be empty.
        target_rps: Target mean arrival rate, requests per second, > 0.
        rng: Source of all randomness (offsets and thinning).
        duration_s: Length of the result, seconds; defaults to ``trace.duration_s``.

    Returns:
        A trace of ``round(target_rps * duration_s)`` requests over ``duration_s``.

    Raises:
        TraceError: Empty trace or non-positive rate/duration.
    """
    out_duration_s = trace.duration_s if duration_s is None else duration_s
    _check_positive("scale_to_rate", target_rps=target_rps, duration_s=out_duration_s)
    if len(trace) == 0:
        raise TraceError(f"scale_to_rate: trace {trace.name!r} is empty")
    period_s = trace.duration_s
    n_target = int(round(target_rps * out_duration_s))
    n_periods = int(math.ceil(out_duration_s / period_s))
    base_rate = trace.mean_rate_rps()
    k = max(1, int(math.ceil(target_rps / base_rate)))
    t_src = trace.arrival_s
    n_src = len(trace)

    sorted_src = bool(np.all(np.diff(t_src) >= 0))
    margin_s = 1e-6 * period_s  # candidate ranges reach past the cut; the cut itself is exact

    def copies(n_copies: int) -> tuple[np.ndarray, np.ndarray]:
        # One offset per (copy, period); arrivals (t + offset) mod period, + period index.
        offsets = rng.uniform(0.0, period_s, size=(n_copies * n_periods, 1))
        if not sorted_src:
            t = np.mod(t_src[None, :] + offsets, period_s)
            t += (np.arange(n_copies * n_periods) % n_periods * period_s)[:, None]
            src = np.broadcast_to(np.arange(n_src, dtype=np.int32), t.shape)
            t = t.ravel()
            keep = t < out_duration_s
            return t[keep], src.ravel()[keep]
        # The same arrivals, in the same order, computed only where they can fall before the
        # end: a period cut short keeps two stretches of the shifted copy (sorted arrivals).
        ts, srcs = [], []
        for row, offset in enumerate(offsets[:, 0].tolist()):
            start_s = row % n_periods * period_s
            window_s = out_duration_s - start_s
            if window_s >= period_s:
                idx = np.arange(n_src, dtype=np.int32)
            else:
                mask = np.zeros(n_src, dtype=bool)
                mask[: t_src.searchsorted(window_s - offset + margin_s, side="right")] = True
                lo = t_src.searchsorted(period_s - offset - margin_s, side="left")
                mask[lo: t_src.searchsorted(period_s - offset + window_s + margin_s, side="right")] = True
                idx = np.flatnonzero(mask).astype(np.int32)
            t = np.mod(t_src[idx] + offset, period_s)
            t += start_s
            keep = t < out_duration_s
            ts.append(t[keep])
            srcs.append(idx[keep])
        return np.concatenate(ts), np.concatenate(srcs)

    t, src = copies(k)
    while t.shape[0] < n_target:  # only when the last, partial period falls short
        t2, src2 = copies(1)
        t, src = np.concatenate([t, t2]), np.concatenate([src, src2])
    n_have = t.shape[0]
    if n_have > n_target:
        drop = rng.choice(n_have, size=n_have - n_target, replace=False)
        keep = np.ones(n_have, dtype=bool)
        keep[drop] = False
        t, src = t[keep], src[keep]
    order = np.argsort(t, kind="stable")
    t, src = t[order], src[order]
    return Trace(
        arrival_s=t,
        input_tokens=trace.input_tokens[src],
        output_tokens=trace.output_tokens[src],
        duration_s=out_duration_s,
        name=f"{trace.name}@{target_rps:g}rps",
        source=(
            f"synthetic: scale_to_rate({trace.source}, target_rps={target_rps:g}, "
            f"duration_s={out_duration_s:g}, copies={k})"
        ),
    )


def _resample_lengths(
    lengths_from: Trace, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw n (input, output) pairs jointly, uniformly with replacement from a trace."""
    if len(lengths_from) == 0:
        raise TraceError(f"cannot resample lengths from empty trace {lengths_from.name!r}")
    idx = rng.integers(0, len(lengths_from), size=n)
    return lengths_from.input_tokens[idx], lengths_from.output_tokens[idx]


def diurnal_trace(
    duration_s: float,
    mean_rps: float,
    peak_to_mean: float,
    period_s: float,
    phase_s: float,
    lengths_from: Trace,
    rng: np.random.Generator,
) -> Trace:
    """Synthetic diurnal load: a Poisson process with a sinusoidal rate.

    The rate is ``mean_rps * (1 + (peak_to_mean - 1) * cos(2 pi (t - phase_s) / period_s))``,
    so it peaks at ``t = phase_s`` (mod ``period_s``) at ``peak_to_mean * mean_rps`` and
    bottoms at ``(2 - peak_to_mean) * mean_rps``. Arrivals are drawn by thinning (Lewis and
    Shedler): a homogeneous Poisson process at the peak rate, each point kept with
    probability rate(t) / peak rate. (Input, output) lengths are resampled jointly, with
    replacement, from ``lengths_from``. The sinusoid is a modelling assumption: the real
    diurnal shape is in the 2024 week-long traces, which are not shipped here.

    Args:
        duration_s: Trace length, seconds, > 0.
        mean_rps: Mean rate over whole periods, requests per second, > 0.
        peak_to_mean: Peak over mean rate, in ``[1, 2]`` (2 makes the trough 0).
        period_s: Period of the sinusoid, seconds (86400 for a day), > 0.
        phase_s: Time of the peak, seconds from the trace start.
        lengths_from: Trace whose joint length distribution is resampled.
        rng: Source of all randomness.

    Raises:
        TraceError: Out-of-range arguments or an empty ``lengths_from``.
    """
    _check_positive("diurnal_trace", duration_s=duration_s, mean_rps=mean_rps, period_s=period_s)
    if not (1.0 <= peak_to_mean <= 2.0):
        raise TraceError(f"diurnal_trace: peak_to_mean={peak_to_mean!r} must be in [1, 2]")
    if not math.isfinite(phase_s):
        raise TraceError(f"diurnal_trace: phase_s={phase_s!r} must be finite")
    peak_rps = mean_rps * peak_to_mean
    n_candidates = rng.poisson(peak_rps * duration_s)
    t = np.sort(rng.uniform(0.0, duration_s, size=n_candidates))
    rate = mean_rps * (1.0 + (peak_to_mean - 1.0) * np.cos(2.0 * np.pi * (t - phase_s) / period_s))
    t = t[rng.uniform(0.0, peak_rps, size=n_candidates) < rate]
    input_tokens, output_tokens = _resample_lengths(lengths_from, t.shape[0], rng)
    return Trace(
        arrival_s=t,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        duration_s=duration_s,
        name=f"diurnal({lengths_from.name})",
        source=(
            f"synthetic: diurnal_trace(mean_rps={mean_rps:g}, peak_to_mean={peak_to_mean:g}, "
            f"period_s={period_s:g}, phase_s={phase_s:g}, lengths_from={lengths_from.source})"
        ),
    )


def add_spike(
    trace: Trace,
    start_s: float,
    duration_s: float,
    multiplier: float,
    rng: np.random.Generator,
) -> Trace:
    """Add a load spike: ``multiplier`` times the local rate inside a window.

    The local rate is the trace's arrival count in ``[start_s, start_s + duration_s)`` over
    the window length (the trace's mean rate if the window holds no arrival). Extra arrivals
    are a homogeneous Poisson process at ``(multiplier - 1)`` times that rate, uniform in the
    window, with (input, output) lengths resampled jointly from the whole trace.

    Args:
        trace: Base trace; must not be empty.
        start_s: Window start, seconds, in ``[0, trace.duration_s)``.
        duration_s: Window length, seconds, > 0; clipped to the trace's end.
        multiplier: Rate multiplier inside the window, >= 1.
        rng: Source of all randomness.

    Raises:
        TraceError: Out-of-range arguments or an empty trace.
    """
    _check_positive("add_spike", duration_s=duration_s)
    if not (0 <= start_s < trace.duration_s):
        raise TraceError(f"add_spike: start_s={start_s!r} must be in [0, {trace.duration_s})")
    if not (math.isfinite(multiplier) and multiplier >= 1):
        raise TraceError(f"add_spike: multiplier={multiplier!r} must be a finite number >= 1")
    if len(trace) == 0:
        raise TraceError(f"add_spike: trace {trace.name!r} is empty")
    end_s = min(start_s + duration_s, trace.duration_s)
    win_s = end_s - start_s
    lo, hi = np.searchsorted(trace.arrival_s, [start_s, end_s], side="left")
    local_rps = (hi - lo) / win_s if hi > lo else trace.mean_rate_rps()
    n_extra = rng.poisson((multiplier - 1.0) * local_rps * win_s)
    t = rng.uniform(start_s, end_s, size=n_extra)
    t = np.minimum(t, np.nextafter(end_s, start_s))  # keep inside [start, end)
    input_tokens, output_tokens = _resample_lengths(trace, n_extra, rng)
    extra = Trace(
        arrival_s=np.sort(t),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        duration_s=trace.duration_s,
        name="spike",
        source="synthetic: spike",
    )
    merged = merge([trace, extra])
    return Trace(
        arrival_s=merged.arrival_s,
        input_tokens=merged.input_tokens,
        output_tokens=merged.output_tokens,
        duration_s=trace.duration_s,
        name=f"{trace.name}+spike",
        source=(
            f"{trace.source} + synthetic: add_spike(start_s={start_s:g}, duration_s={win_s:g}, "
            f"multiplier={multiplier:g}, extra={n_extra})"
        ),
    )


def merge(traces: Sequence[Trace]) -> Trace:
    """Superpose traces on one time axis (all start at 0); stable-sorted by arrival.

    The result's duration is the longest input duration; names and sources are joined.

    Raises:
        TraceError: No traces given.
    """
    if len(traces) == 0:
        raise TraceError("merge: need at least one trace")
    t = np.concatenate([tr.arrival_s for tr in traces])
    order = np.argsort(t, kind="stable")
    return Trace(
        arrival_s=t[order],
        input_tokens=np.concatenate([tr.input_tokens for tr in traces])[order],
        output_tokens=np.concatenate([tr.output_tokens for tr in traces])[order],
        duration_s=max(tr.duration_s for tr in traces),
        name="+".join(tr.name for tr in traces),
        source="merge: " + " | ".join(tr.source for tr in traces),
    )


# --------------------------------------------------------------------------------------------
# Length pools and per-tick aggregation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthPools:
    """DynamoLLM-style request pools by input length and output length.

    Input class ``i`` holds inputs with ``input_edges[i-1] <= input_tokens < input_edges[i]``
    (class 0 below the first edge, the last class at or above the last edge); output classes
    likewise. Pool id is ``input_class * n_output_classes + output_class``.

    Attributes:
        input_edges: Strictly increasing input-length boundaries, tokens.
        output_edges: Strictly increasing output-length boundaries, tokens.
        names: One name per pool, in pool-id order
            (``(len(input_edges) + 1) * (len(output_edges) + 1)`` names).
    """

    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        for field in ("input_edges", "output_edges"):
            edges = tuple(int(e) for e in getattr(self, field))
            if any(e < 1 for e in edges) or any(
                b <= a for a, b in zip(edges, edges[1:], strict=False)
            ):
                raise TraceError(
                    f"LengthPools: field {field!r} value {edges!r} must be positive and "
                    "strictly increasing"
                )
            object.__setattr__(self, field, edges)
        names = tuple(self.names)
        expected = (len(self.input_edges) + 1) * (len(self.output_edges) + 1)
        if len(names) != expected or len(set(names)) != len(names):
            raise TraceError(
                f"LengthPools: field 'names' value {names!r} must hold {expected} distinct names"
            )
        object.__setattr__(self, "names", names)

    @property
    def n_pools(self) -> int:
        """Number of pools."""
        return len(self.names)

    def assign(self, input_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        """Return the pool id (int64) of each request, vectorized.

        The input class times the number of output classes plus the output class; a class is
        how many of the field's edges the token count reaches (``searchsorted(edges, tokens,
        "right")``). Integer token counts (every trace's) take one compiled pass over both
        columns (`_pool_ids`): a week window's ten million requests in tens of milliseconds,
        where two ``searchsorted`` calls and three temporaries of 80 MB took most of a second
        at every episode start.
        """
        x, y = np.asarray(input_tokens), np.asarray(output_tokens)
        e_in, e_out = _edges_for(self.input_edges, x), _edges_for(self.output_edges, y)
        if e_in is not None and e_out is not None and x.ndim == 1 and x.shape == y.shape:
            return _pool_ids(x, y, e_in, e_out)
        in_cls = _classes(self.input_edges, x)
        out_cls = _classes(self.output_edges, y)
        return in_cls.astype(np.int64) * (len(self.output_edges) + 1) + out_cls


def _edges_for(edges: tuple[int, ...], tokens: np.ndarray) -> np.ndarray | None:
    """``edges`` in the tokens' integer dtype (None where not exactly).

    Integer tokens compared with edges of their own dtype: numpy does not convert millions of
    tokens to the edges' dtype first, and the compiled pass takes one signature per dtype.
    """
    if not np.issubdtype(tokens.dtype, np.integer):
        return None
    e = np.asarray(edges, dtype=np.int64)
    info = np.iinfo(tokens.dtype)
    if e.size and not (info.min <= e.min() and e.max() <= info.max):
        return None
    return e.astype(tokens.dtype)


@njit(**JIT_OPTIONS)
def _pool_ids(input_tokens: np.ndarray, output_tokens: np.ndarray, input_edges: np.ndarray,
              output_edges: np.ndarray) -> np.ndarray:
    """`LengthPools.assign` of integer token counts in one pass (edges increasing, same dtype)."""
    n_out = len(output_edges) + 1
    out = np.empty(len(input_tokens), np.int64)
    for i in range(len(input_tokens)):
        a = 0
        for e in input_edges:
            if input_tokens[i] >= e:
                a += 1
        b = 0
        for e in output_edges:
            if output_tokens[i] >= e:
                b += 1
        out[i] = a * n_out + b
    return out


def _classes(edges: tuple[int, ...], tokens: np.ndarray) -> np.ndarray:
    """How many of ``edges`` each token count reaches (``searchsorted(edges, tokens, "right")``).

    The edges take the tokens' own dtype where they fit it exactly, so numpy does not convert
    millions of tokens to the edges' dtype first (the same classes, about 4x faster on a week's
    int32 token counts).
    """
    x = np.asarray(tokens)
    e = _edges_for(edges, x)
    return np.searchsorted(np.asarray(edges) if e is None else e, x, side="right")


DEFAULT_POOLS = LengthPools(
    # Terciles of the pooled 2023 code+conv traces (28,185 requests): input 446 / 1236 tokens,
    # output 50 / 139 tokens, rounded. DynamoLLM pools requests into short/medium/long input
    # x short/medium/long output buckets; these edges are our choice (a modelling assumption)
    # so each class holds about a third of the shipped requests.
    input_edges=(450, 1250),
    output_edges=(50, 140),
    names=("SS", "SM", "SL", "MS", "MM", "ML", "LS", "LM", "LL"),  # input letter, output letter
)
"""Default pools: S/M/L input (<450, <1250, >=1250) x S/M/L output (<50, <140, >=140) tokens."""


def arrivals_per_tick(
    trace: Trace, tick_s: float, n_ticks: int, pools: LengthPools
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate arrivals per control tick and pool, for the aggregate serving model.

    Tick ``j`` covers ``[j * tick_s, (j + 1) * tick_s)``; arrivals at or past
    ``n_ticks * tick_s`` are ignored.

    Args:
        trace: The trace.
        tick_s: Tick length, seconds, > 0.
        n_ticks: Number of ticks, >= 0.
        pools: Length pools.

    Returns:
        ``(counts, mean_input_tokens, mean_output_tokens)``, each ``[n_ticks, n_pools]``:
        arrival counts (int64) and mean input/output tokens of those arrivals (float64,
        0 where a (tick, pool) had no arrival).
    """
    _check_positive("arrivals_per_tick", tick_s=tick_s)
    if int(n_ticks) != n_ticks or n_ticks < 0:
        raise TraceError(f"arrivals_per_tick: n_ticks={n_ticks!r} must be an integer >= 0")
    n_ticks = int(n_ticks)
    n_pools = pools.n_pools
    hi = np.searchsorted(trace.arrival_s, n_ticks * tick_s, side="left")
    tick = np.minimum((trace.arrival_s[:hi] // tick_s).astype(np.int64), max(n_ticks - 1, 0))
    cell = tick * n_pools + pools.assign(trace.input_tokens[:hi], trace.output_tokens[:hi])
    size = n_ticks * n_pools
    counts = np.bincount(cell, minlength=size)
    sum_in = np.bincount(cell, weights=trace.input_tokens[:hi], minlength=size)
    sum_out = np.bincount(cell, weights=trace.output_tokens[:hi], minlength=size)
    denom = np.maximum(counts, 1)
    shape = (n_ticks, n_pools)
    return (
        counts.reshape(shape),
        (sum_in / denom).reshape(shape),
        (sum_out / denom).reshape(shape),
    )
