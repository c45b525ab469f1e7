"""`llm-cluster fit-thermal`: the two-node GPU thermal model and phase power levels, fitted to H100 runs.

Reads the recordings in ``envs/data/thermal/recordings`` and writes
``envs/data/thermal/h100_thermal_fit.json`` (the parameters ``ThermalParams.load`` reads,
errors, cross-validation, phase power table) and ``envs/data/thermal/h100_thermal_fit.png``
(measured vs fitted temperature per recording).

Method (numpy only):

* Power: the NVML power reading is a ~1 s trailing average, so the instantaneous power is
  taken from differences of the NVML total-energy counter over 0.25 s windows (the counter
  updates about every 100 ms; it is interpolated linearly between its update times).
  ``h100_probe.json`` has no counter: there the NVML reading shifted 0.5 s earlier (the
  centre of its averaging window) stands in, and that recording is used only as a held-out
  check, not in the fit.
* Temperature model: ``T = T_inlet + x_die + x_sink`` with exact first-order steps per
  window (``envs.sim.thermal.step_gpu_temperature``); every recording starts from the
  steady state of its first window's power (the lent machines sat idle before).
* ``T_inlet`` was not measured: each recording gets its own constant offset (the inlet
  plus any sensor offset), fitted with the R's.
* Given (tau_die, tau_sink) the model is linear in (R_die, R_sink, offsets): a log grid
  over the two taus with linear least squares at each point, refined twice around the
  best point. The single first-order model gets the same treatment over one tau.
* Cross-recording: fit on one recording, then on the other refit only its offset.
* Online transfer (issue 19: at most 2 C RMSE on a recording the fit never saw, the inlet
  offset estimated online): `online_check` takes the offset from the recording's first
  ``ONLINE_OFFSET_S`` only, predicts the rest open-loop and scores the rest; reported per
  recording leave-one-recording-out and for the held-out ``h100_probe.json``
  (``online_transfer`` in the fit JSON).

Usage::

    llm-cluster fit-thermal                       # fit, write the JSON and the plot
    llm-cluster fit-thermal --check REC.json.gz   # apply the shipped fit online to a recording
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.sim.thermal import (
    DATA_DIR,
    DEFAULT_FIT_PATH,
    GpuThermalState,
    ThermalError,
    ThermalParams,
    step_gpu_temperature,
)
from llm_cluster_gym.scripts.usage import check_number

RECORDINGS_DIR = DATA_DIR / "recordings"
WINDOW_S = 0.25
NVML_POWER_LEAD_S = 0.5  # centre of NVML's ~1 s trailing power average (probe file only)
# Recordings with the energy counter (used in the fit) and the one without (held out).
FIT_RECORDINGS = ("h100_calibration_steps.json.gz", "h100_steps_20261125.json.gz")
HELD_OUT_RECORDINGS = ("h100_probe.json",)
ONLINE_OFFSET_S = 60.0
"""Length of a recording's start from which the online check estimates the inlet offset (s):
issue 19 asks for the offset "estimated online from its first minute"."""
GOAL_RMSE_C = 2.0
"""Issue 19's bar for the online check: at most 2 C RMSE on a recording the fit never saw."""


@dataclass
class Recording:
    """One recording resampled to fixed windows.

    Attributes:
        name: File name.
        t_s: Window start times from the first sample (s).
        power_w: Mean GPU power over each window (W).
        temp_end_c: Measured GPU temperature at each window's end (C), interpolated.
        power_source: "energy_counter" or "nvml_power_shifted".
        raw: The decoded JSON (static info, marks, samples).
    """

    name: str
    t_s: np.ndarray
    power_w: np.ndarray
    temp_end_c: np.ndarray
    power_source: str
    raw: dict[str, Any] = field(repr=False)


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value cut to `limit` characters (error messages stay one short line)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_json(path: Path) -> dict[str, Any]:
    """The decoded JSON object of a ``.json`` or ``.json.gz`` file.

    Raises:
        ThermalError: Missing, unreadable, not (gzipped) JSON, or not a JSON object.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise ThermalError(f"{path}: file not found") from exc
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        why = f"{type(exc).__name__}: {_short(str(exc))}"
        raise ThermalError(f"{path}: not a JSON recording ({why})") from exc
    if not isinstance(data, dict):
        raise ThermalError(f"{path}: top level must be a JSON object, got {_short(data)}")
    return data


REQUIRED_COLUMNS = ("t", "power_w", "gpu_temp_c")
"""Columns every recording needs (time s, NVML power W, GPU temperature C)."""


def _columns(raw: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    """Samples as named float columns (phase dropped); knows both file layouts.

    Raises:
        ThermalError: A missing or malformed field; the message names the file, the field
            and the value.
    """
    if "columns" in raw:
        cols = raw["columns"]
        if not (isinstance(cols, list) and all(isinstance(c, str) for c in cols)):
            raise ThermalError(f"{path}: field 'columns' must be a list of names, got {_short(cols)}")
        for need in REQUIRED_COLUMNS:
            if need not in cols:
                raise ThermalError(f"{path}: field 'columns' lacks {need!r}, got {_short(cols)}")
    else:  # h100_probe.json: (t, power W, temp C, SM MHz, throttle bitmask)
        cols = ["t", "power_w", "gpu_temp_c", "sm_clock_mhz", "throttle_reasons"]
    samples = raw.get("samples")
    if not isinstance(samples, list):
        raise ThermalError(f"{path}: field 'samples' must be a list of rows, got {_short(samples)}")
    rows = [r for r in samples if isinstance(r, list) and len(r) == len(cols)]
    if len(rows) < 100:
        raise ThermalError(f"{path}: field 'samples' has only {len(rows)} complete rows")
    out = {}
    for i, c in enumerate(cols):
        if c == "phase":
            out[c] = np.array([r[i] for r in rows], dtype=object)
            continue
        vals = [np.nan if r[i] is None else r[i] for r in rows]
        bad = next((v for v in vals if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None:
            raise ThermalError(f"{path}: field 'samples' column {c!r} must hold numbers, got {_short(bad)}")
        out[c] = np.array(vals, dtype=float)
    for c in ("t", "gpu_temp_c"):  # power_w is checked where it is used (no energy counter)
        bad_rows = np.flatnonzero(~np.isfinite(out[c]))
        if bad_rows.size:
            raise ThermalError(f"{path}: field 'samples' column {c!r} must be finite, got "
                               f"{_short(rows[bad_rows[0]][cols.index(c)])} in row {bad_rows[0]}")
    return out


def power_from_energy(t_s: np.ndarray, energy_mj: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Mean power (W) over windows ``[grid[k], grid[k+1])`` from the NVML energy counter.

    The counter is read at every sample but only changes about every 100 ms, so only the
    first sample of each new value is kept (its update time) and the energy is
    interpolated linearly between those points.

    Args:
        t_s: Sample times (s), increasing.
        energy_mj: Counter readings (mJ) at those times.
        grid_s: Window edges (s), ``len = n_windows + 1``.

    Returns:
        Power per window (W), length ``len(grid_s) - 1``.
    """
    keep = np.concatenate([[True], np.diff(energy_mj) != 0])
    e_j = np.interp(grid_s, t_s[keep], energy_mj[keep] / 1000.0)
    return np.diff(e_j) / np.diff(grid_s)


def load_recording(path: Path, window_s: float = WINDOW_S) -> Recording:
    """Read a recording and resample it to ``window_s`` windows.

    Args:
        path: ``.json`` or ``.json.gz`` file made by ``record_h100_steps.py``,
            ``calibration_steps.py`` or ``nvml_probe.py``.
        window_s: Window length (s).

    Returns:
        The resampled recording.

    Raises:
        ThermalError: Too few samples or a broken column.
    """
    raw = _open_json(path)
    c = _columns(raw, path)
    t = c["t"] - c["t"][0]
    if np.any(np.diff(t) <= 0):
        raise ThermalError(f"{path}: field 't' must increase strictly")
    grid = np.arange(0.0, t[-1] - 1.0, window_s)
    if grid.size < 2:
        raise ThermalError(f"{path}: field 't' spans only {t[-1]:.3g} s, too short to resample")
    if "energy_mj" in c and np.all(np.isfinite(c["energy_mj"])):
        power = power_from_energy(t, c["energy_mj"], grid)
        src = "energy_counter"
    else:
        if not np.all(np.isfinite(c["power_w"])):
            k = int(np.flatnonzero(~np.isfinite(c["power_w"]))[0])
            raise ThermalError(f"{path}: field 'samples' column 'power_w' must be finite, got None/NaN "
                               f"in row {k}")
        # NVML reading averages over the last ~1 s: advance it by half that window.
        mids = grid[:-1] + window_s / 2 + NVML_POWER_LEAD_S
        power = np.interp(mids, t, c["power_w"])
        src = "nvml_power_shifted"
    temp_end = np.interp(grid[1:], t, c["gpu_temp_c"])
    if not (np.all(np.isfinite(power)) and np.all(np.isfinite(temp_end))):
        raise ThermalError(f"{path}: non-finite power or temperature after resampling")
    return Recording(path.name, grid[:-1], power, temp_end, src, raw)


def unit_responses(power_w: np.ndarray, taus_s: np.ndarray, window_s: float) -> np.ndarray:
    """Rise of a first-order node with R = 1 C/W for each tau, at each window end.

    Starts from the steady state of the first window's power. Exact for power held
    constant over each window (same update as ``step_gpu_temperature``).

    Returns:
        Array ``(n_windows, n_taus)`` (C per C/W).
    """
    a = np.exp(-window_s / np.asarray(taus_s, dtype=float))
    x = np.full(a.shape, power_w[0])
    out = np.empty((power_w.size, a.size))
    for k, p in enumerate(power_w):
        x = p + (x - p) * a
        out[k] = x
    return out


def _solve(cols: list[np.ndarray], recs_idx: np.ndarray, n_recs: int, y: np.ndarray):
    """Least squares of y on the given columns plus one offset per recording."""
    offs = np.zeros((y.size, n_recs))
    offs[np.arange(y.size), recs_idx] = 1.0
    a = np.column_stack([*cols, offs])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    return coef, resid


@dataclass
class Fit:
    """Result of a grid + least-squares fit over one or more recordings."""

    taus_s: tuple[float, ...]
    r_c_per_w: tuple[float, ...]
    offsets_c: dict[str, float]
    rmse_c: dict[str, float]


def fit_model(recs: list[Recording], n_nodes: int, window_s: float = WINDOW_S) -> Fit:
    """Fit a one- or two-node model jointly to ``recs`` (shared R, tau; own offsets).

    Args:
        recs: Recordings to fit.
        n_nodes: 1 (single first-order) or 2 (die + heatsink).
        window_s: Window length the recordings were resampled to.

    Returns:
        The best fit with non-negative resistances.
    """
    y = np.concatenate([r.temp_end_c for r in recs])
    idx = np.concatenate([np.full(r.t_s.size, i) for i, r in enumerate(recs)])

    def basis(taus: np.ndarray) -> np.ndarray:
        return np.concatenate([unit_responses(r.power_w, taus, window_s) for r in recs])

    best: tuple[float, tuple, np.ndarray] | None = None
    lo, hi = np.log10([0.1, 2000.0])
    n_grid = 60 if n_nodes == 1 else 36
    for _ in range(3):  # coarse grid, then two refinements around the best point
        taus = np.logspace(lo, hi, n_grid)
        u = basis(taus)
        if n_nodes == 1:
            pairs = [(i,) for i in range(taus.size)]
        else:
            pairs = [(i, j) for i in range(taus.size) for j in range(taus.size) if j > i]
        for pr in pairs:
            coef, resid = _solve([u[:, i] for i in pr], idx, len(recs), y)
            if np.any(coef[:n_nodes] < 0):
                continue
            sse = float(resid @ resid)
            if best is None or sse < best[0]:
                best = (sse, tuple(float(taus[i]) for i in pr), coef)
        assert best is not None, "no fit with non-negative resistances"
        step = (hi - lo) / (n_grid - 1)
        centre = np.log10(best[1])
        lo, hi = float(centre.min() - 3 * step), float(centre.max() + 3 * step)
        n_grid = 40 if n_nodes == 1 else 30
    _, taus_best, coef = best
    u = basis(np.array(taus_best))
    coef, resid = _solve([u[:, i] for i in range(n_nodes)], idx, len(recs), y)
    rmse = {r.name: float(np.sqrt(np.mean(resid[idx == i] ** 2))) for i, r in enumerate(recs)}
    offsets = {r.name: float(coef[n_nodes + i]) for i, r in enumerate(recs)}
    return Fit(taus_best, tuple(float(c) for c in coef[:n_nodes]), offsets, rmse)


def predict(rec: Recording, fit: Fit, offset_c: float, window_s: float = WINDOW_S) -> np.ndarray:
    """Model temperature at each window end for given fitted R's/taus and an offset."""
    u = unit_responses(rec.power_w, np.array(fit.taus_s), window_s)
    return offset_c + u @ np.array(fit.r_c_per_w)


def transfer_rmse(rec: Recording, fit: Fit) -> tuple[float, float]:
    """Test a fit on another recording: refit only its offset; return (rmse, offset)."""
    pred0 = predict(rec, fit, 0.0)
    off = float(np.mean(rec.temp_end_c - pred0))
    return float(np.sqrt(np.mean((rec.temp_end_c - pred0 - off) ** 2))), off


@dataclass
class OnlineCheck:
    """A fit applied to a recording online: offset from its start, scored on the rest.

    Attributes:
        name: Recording file name.
        first_s: Length of the start the offset came from (s).
        inlet_offset_c: The offset estimated from that start (C).
        rmse_c: RMSE of the open-loop prediction after the start (C).
        max_abs_err_c: Largest absolute error after the start (C).
        max_err_at_s: Time of that error from the first sample (window end, s).
        max_err_phase: Phase running then (from the recording's ``marks``; None without).
        scored_s: Length of the scored remainder (s).
        start_power_w: Power the states start in equilibrium with (the first window's, W).
        first_minute_power_w: (min, max) of 1 s mean power over the start (W): a wide range
            says the start is not steady, so the offset rests on the model's own prediction.
        whole_run_offset_rmse_c: RMSE over the same remainder with the offset fitted to the
            whole run instead (the old `transfer_rmse` way; for comparison only).
    """

    name: str
    first_s: float
    inlet_offset_c: float
    rmse_c: float
    max_abs_err_c: float
    max_err_at_s: float
    max_err_phase: str | None
    scored_s: float
    start_power_w: float
    first_minute_power_w: tuple[float, float]
    whole_run_offset_rmse_c: float

    def as_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict (without the name)."""
        return {
            "inlet_offset_c": self.inlet_offset_c,
            "rmse_c": self.rmse_c,
            "max_abs_err_c": self.max_abs_err_c,
            "max_err_at_s": self.max_err_at_s,
            "max_err_phase": self.max_err_phase,
            "scored_s": self.scored_s,
            "start_power_w": self.start_power_w,
            "first_minute_power_w": list(self.first_minute_power_w),
            "whole_run_offset_rmse_c": self.whole_run_offset_rmse_c,
        }


def _phase_at(rec: Recording, t_s: float) -> str | None:
    """Name of the phase of ``rec.raw['marks']`` running at ``t_s`` from the first sample."""
    t_abs = float(rec.raw["samples"][0][0]) + t_s
    for m in rec.raw.get("marks", []):
        if m.get("t0", np.inf) <= t_abs < m.get("t1", -np.inf):
            return str(m.get("phase"))
    return None


def online_check(
    rec: Recording, fit: Fit, first_s: float = ONLINE_OFFSET_S, window_s: float = WINDOW_S
) -> OnlineCheck:
    """Apply a fit to a recording as a controller would: offset from the start only.

    The unmeasured inlet offset (inlet air plus any sensor offset of this GPU) is estimated
    from the windows ending within the first `first_s` seconds, the rest of the run is
    predicted open-loop from the measured power, and the error is scored on that rest only.

    Initial state: the RC states start in equilibrium with the first window's power, as in
    the fit: the lent machines sat idle before each recording, so the GPU starts at an idle
    equilibrium. The data bear this out only roughly: the first temperature reading is 1-2 C
    below the next ones (probably the recording process lifting the GPU from its bare idle,
    74 W in ``h100_probe.json``'s static reading, to ~120 W with a CUDA context), and the
    first minute of every committed recording holds a load step (warm-up, prefill). So the offset
    is not the mean of a steady start: it is the mean of (measured - model) over the first
    minute, the model being run from that initial state through the first minute's measured
    power. It uses nothing after `first_s` (the prediction is causal), so it is what a
    monitor could compute online at ``t = first_s``.

    Args:
        rec: The recording.
        fit: The model (taus, R's; its offsets are not used).
        first_s: Length of the start the offset is estimated from (s).
        window_s: Window length the recording was resampled to.

    Returns:
        The figures.

    Raises:
        ThermalError: `first_s` is not positive, or leaves no window to score.
    """
    end_s = rec.t_s + window_s
    first = end_s <= first_s + 1e-9
    if not (np.isfinite(first_s) and first.any()):
        raise ThermalError(f"{rec.name}: online offset window must hold a {window_s} s window, got "
                           f"{first_s!r} s")
    if first.all():
        raise ThermalError(f"{rec.name}: field 't' spans {end_s[-1]:.1f} s, not more than the "
                           f"{first_s:g} s online offset window")
    pred0 = predict(rec, fit, 0.0, window_s)
    offset = float(np.mean(rec.temp_end_c[first] - pred0[first]))
    err = pred0[~first] + offset - rec.temp_end_c[~first]
    k = int(np.argmax(np.abs(err)))
    at_s = float(end_s[~first][k])
    whole = float(np.mean(rec.temp_end_c - pred0))
    whole_err = pred0[~first] + whole - rec.temp_end_c[~first]
    n_per_s = max(1, int(round(1.0 / window_s)))
    head = rec.power_w[first][: first.sum() // n_per_s * n_per_s].reshape(-1, n_per_s).mean(axis=1)
    head = head if head.size else rec.power_w[first]
    return OnlineCheck(
        name=rec.name,
        first_s=float(first_s),
        inlet_offset_c=offset,
        rmse_c=float(np.sqrt(np.mean(err**2))),
        max_abs_err_c=float(np.abs(err[k])),
        max_err_at_s=at_s,
        max_err_phase=_phase_at(rec, at_s),
        scored_s=float(end_s[-1] - first_s),
        start_power_w=float(rec.power_w[0]),
        first_minute_power_w=(float(head.min()), float(head.max())),
        whole_run_offset_rmse_c=float(np.sqrt(np.mean(whole_err**2))),
    )


def fit_of_params(params: ThermalParams) -> Fit:
    """A `Fit` holding a loaded fit file's two-node parameters (for `predict`, `online_check`)."""
    return Fit((params.tau_die_s, params.tau_sink_s), (params.r_die_c_per_w, params.r_sink_c_per_w), {}, {})


def simulate_with_params(
    rec: Recording, params: ThermalParams, inlet_c: float, window_s: float = WINDOW_S
) -> np.ndarray:
    """Run the simulator's own stepper over a recording's power; temperature per window end.

    Starts from the steady state of the first window's power, as in the fit.
    """
    state = GpuThermalState.steady(np.array([rec.power_w[0]]), params)
    inlet = np.array([inlet_c])
    out = np.empty(rec.power_w.size)
    for k, p in enumerate(rec.power_w):
        out[k] = step_gpu_temperature(state, np.array([p]), inlet, window_s, params)[0]
    return out


def _phase_tokens(name: str, mark: dict[str, Any]) -> int | None:
    """Tokens per iteration from the mark or the phase name (prefill_bsB_LL, decode_bsB)."""
    if mark.get("tokens_per_iter"):
        return int(mark["tokens_per_iter"])
    bs = re.search(r"_bs(\d+)", name)
    seq = re.search(r"_L(\d+)", name)
    if name.startswith("prefill") and "duty" not in name and bs and seq:
        return int(bs.group(1)) * int(seq.group(1))
    if name.startswith("decode") and bs:
        return int(bs.group(1))
    return None


def phase_table(path: Path) -> list[dict[str, Any]]:
    """Per-phase power, clock, throttle and throughput of one recording with ``marks``."""
    raw = _open_json(path)
    c = _columns(raw, path)
    rows = []
    keep = np.concatenate([[True], np.diff(c["energy_mj"]) != 0])
    for m in raw.get("marks", []):
        t0, t1 = m["t0"], m["t1"]
        sel = (c["t"] >= t0) & (c["t"] < t1)
        e0, e1 = np.interp([t0, t1], c["t"][keep], c["energy_mj"][keep])
        dur = t1 - t0
        tok = _phase_tokens(m["phase"], m)
        thr = np.nan_to_num(c["throttle_reasons"][sel]).astype(np.int64)
        rows.append(
            {
                "phase": m["phase"],
                "duration_s": round(dur, 2),
                "iters": m["iters"],
                "iters_per_s": None if m["phase"] == "idle" else round(m["iters"] / dur, 3),
                "tokens_per_s": None if tok is None else round(tok * m["iters"] / dur, 1),
                "mean_power_w_energy_counter": round((e1 - e0) / 1000.0 / dur, 1),
                "mean_power_w_nvml_reading": round(float(np.nanmean(c["power_w"][sel])), 1),
                "sm_clock_median_mhz": float(np.nanmedian(c["sm_clock_mhz"][sel])),
                "throttle_reasons_or": hex(int(np.bitwise_or.reduce(thr))) if thr.size else None,
                "gpu_temp_end_c": float(c["gpu_temp_c"][sel][-1]),
            }
        )
    return rows


def idle_power(path: Path, settle_s: float = 10.0) -> tuple[float, float]:
    """Energy-counter mean power over idle phases, skipping ``settle_s`` after each start.

    Returns:
        (mean W, standard deviation W of 1 s windows).
    """
    raw = _open_json(path)
    c = _columns(raw, path)
    keep = np.concatenate([[True], np.diff(c["energy_mj"]) != 0])
    vals = []
    for m in raw["marks"]:
        if m["phase"] != "idle":
            continue
        grid = np.arange(m["t0"] + settle_s, m["t1"], 1.0)
        if grid.size > 1:
            vals.append(power_from_energy(c["t"][keep], c["energy_mj"][keep], grid))
    v = np.concatenate(vals)
    return float(v.mean()), float(v.std())


def _plot(recs, two: Fit, one: Fit, offsets2, offsets1, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(recs), 1, figsize=(12, 3.6 * len(recs)))
    for ax, r in zip(np.atleast_1d(axes), recs, strict=True):
        p2 = predict(r, two, offsets2[r.name])
        p1 = predict(r, one, offsets1[r.name])
        t = r.t_s + WINDOW_S
        ax.plot(t, r.temp_end_c, "k.", ms=2, label="measured GPU temp")
        rm2 = np.sqrt(np.mean((p2 - r.temp_end_c) ** 2))
        rm1 = np.sqrt(np.mean((p1 - r.temp_end_c) ** 2))
        ax.plot(t, p2, "C3", lw=1.2, label=f"two-node (RMSE {rm2:.2f} C)")
        ax.plot(t, p1, "C0", lw=1.0, ls="--", label=f"single-node (RMSE {rm1:.2f} C)")
        ax.set_ylabel("temperature (C)")
        ax.set_title(f"{r.name}  (power: {r.power_source})")
        ax2 = ax.twinx()
        ax2.plot(t, r.power_w, color="0.7", lw=0.6)
        ax2.set_ylabel("power (W)", color="0.5")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("time from first sample (s)")
    fig.suptitle("H100 GPU temperature: measured vs fitted (joint fit over energy-counter recordings)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


@dataclass
class FitThermalArgs:
    """Fit the two-node GPU thermal model and phase power levels to the committed H100 recordings."""

    out: Path = DATA_DIR / "h100_thermal_fit.json"
    """Where the fit goes (the JSON `ThermalParams.load` reads)."""
    plot: Path = DATA_DIR / "h100_thermal_fit.png"
    """Where the measured-vs-fitted temperature figure goes (PNG)."""
    check: Path | None = None
    """Fit nothing: apply the fit `--fit` to this recording (.json or .json.gz, the layout of
    envs/data/thermal/recordings) with the inlet offset from its first `--online-offset-s`
    seconds, and print the RMSE over the rest (last line: JSON)."""
    fit: Path = DEFAULT_FIT_PATH
    """The fit `--check` applies (default: the shipped H100 fit)."""
    online_offset_s: float = ONLINE_OFFSET_S
    """Length of a recording's start the online inlet offset is estimated from (s)."""

    def __post_init__(self) -> None:
        check_number("--online-offset-s", self.online_offset_s, at_least=WINDOW_S)


def check_recording(path: Path, fit_path: Path = DEFAULT_FIT_PATH,
                    first_s: float = ONLINE_OFFSET_S) -> dict[str, Any]:
    """Apply a fit file to one recording online (see `online_check`).

    Args:
        path: The recording (.json or .json.gz, the layout of ``envs/data/thermal/recordings``).
        fit_path: The fit file (default: the shipped H100 fit).
        first_s: Length of the start the inlet offset is estimated from (s).

    Returns:
        ``recording``, ``fit``, ``online_offset_s``, the `OnlineCheck` figures, ``goal_rmse_c``
        and ``meets_goal``.

    Raises:
        ThermalError: A bad recording or fit file (the message names file, field and value).
    """
    fit = fit_of_params(ThermalParams.load(fit_path))
    rec = load_recording(Path(path))
    if rec.t_s[-1] + WINDOW_S <= first_s:
        raise ThermalError(f"{path}: field 't' spans {rec.t_s[-1] + WINDOW_S:.1f} s, not more than "
                           f"the {first_s:g} s online offset window")
    res = online_check(rec, fit, first_s)
    return {"recording": str(path), "fit": str(fit_path), "online_offset_s": first_s,
            **res.as_dict(), "goal_rmse_c": GOAL_RMSE_C, "meets_goal": res.rmse_c <= GOAL_RMSE_C}


def _run_check(args: FitThermalArgs) -> int:
    out = check_recording(args.check, args.fit, args.online_offset_s)
    print(f"{Path(args.check).name}: online offset {out['inlet_offset_c']:.2f} C from the first "
          f"{args.online_offset_s:g} s; RMSE {out['rmse_c']:.2f} C, max error {out['max_abs_err_c']:.2f} C "
          f"over the next {out['scored_s']:.0f} s (goal {GOAL_RMSE_C:g} C)")
    print(json.dumps(out))
    return 0


def online_transfer(fit_recs: list[Recording], held: list[Recording], solo2: dict[str, Fit],
                    joint2: Fit, first_s: float = ONLINE_OFFSET_S) -> dict[str, Any]:
    """The ``online_transfer`` section: every recording tested by a fit that never saw it.

    Each fitted recording is tested with the two-node fit of the other recordings (with two,
    the other one's own fit: leave one recording out); each held-out recording with the joint
    fit of all of them. Offsets come from the first `first_s` seconds only (`online_check`).
    """
    rows = {}
    for r in fit_recs + held:
        others = [x.name for x in fit_recs if x.name != r.name]
        if r.name not in solo2:  # never fitted: the joint fit of all the others
            fit = joint2
        elif len(others) == 1:  # the other recording's own fit (already made)
            fit = solo2[others[0]]
        else:
            fit = fit_model([x for x in fit_recs if x.name != r.name], 2)
        res = online_check(r, fit, first_s)
        rows[r.name] = {"fit_on": others, "fit_tau_s": list(fit.taus_s),
                        "fit_r_c_per_w": list(fit.r_c_per_w), **res.as_dict()}
    return {
        "method": (
            f"Leave one recording out: each recording is predicted by the two-node model fitted to the "
            f"other recordings (h100_probe.json, never fitted: by the joint fit). The inlet offset is "
            f"the mean of (measured - model) over windows ending in the first {first_s:g} s; the model "
            f"starts in equilibrium with the first 0.25 s window's power (the GPU sat idle before) and "
            f"runs open-loop on the measured power; RMSE and max error are over the rest of the run "
            f"only. The first minute of each recording holds a load step, so the offset rests on "
            f"the model's own prediction over it, not on a steady start. whole_run_offset_rmse_c: "
            f"the same remainder with the offset fitted to the whole run (the old way), for "
            f"comparison. `llm-cluster fit-thermal --check FILE` does the same with the shipped fit."
        ),
        "online_offset_s": first_s,
        "goal_rmse_c": GOAL_RMSE_C,
        "goal_source": "issue 19: at most 2 C RMSE on a recording the fit never saw, inlet offset "
                       "estimated online from its first minute",
        "recordings": rows,
        "meets_goal": {n: v["rmse_c"] <= GOAL_RMSE_C for n, v in rows.items()},
    }


def run(args: FitThermalArgs, command: str = "llm-cluster fit-thermal") -> int:
    """Fit, cross-validate, write the fit JSON and the plot (or, with ``--check``, only check).

    Args:
        args: The options.
        command: The command line (recorded in the fit).

    Returns:
        Exit code.
    """
    if args.check is not None:
        return _run_check(args)
    fit_recs = [load_recording(RECORDINGS_DIR / n) for n in FIT_RECORDINGS]
    held = [load_recording(RECORDINGS_DIR / n) for n in HELD_OUT_RECORDINGS]

    joint2 = fit_model(fit_recs, 2)
    joint1 = fit_model(fit_recs, 1)
    per_rec = {}
    solo2 = {}
    for r in fit_recs:
        f2, f1 = fit_model([r], 2), fit_model([r], 1)
        solo2[r.name] = f2
        per_rec[r.name] = {
            "two_node": {"tau_s": f2.taus_s, "r_c_per_w": f2.r_c_per_w,
                         "inlet_offset_c": f2.offsets_c[r.name], "rmse_c": f2.rmse_c[r.name]},
            "single_node": {"tau_s": f1.taus_s, "r_c_per_w": f1.r_c_per_w,
                            "inlet_offset_c": f1.offsets_c[r.name], "rmse_c": f1.rmse_c[r.name]},
        }
        per_rec[r.name]["_single"] = f1
    cross = []
    for a in fit_recs:
        for b in fit_recs + held:
            if a.name == b.name:
                continue
            rm2, _ = transfer_rmse(b, solo2[a.name])
            rm1, _ = transfer_rmse(b, per_rec[a.name]["_single"])
            cross.append({"fit_on": a.name, "test_on": b.name, "two_node_rmse_c": rm2,
                          "single_node_rmse_c": rm1, "refit": "offset only"})
    for r in fit_recs:
        per_rec[r.name].pop("_single")
    online = online_transfer(fit_recs, held, solo2, joint2, args.online_offset_s)

    # The shipped joint fit, re-checked through the simulator's own stepper.
    params = ThermalParams(
        r_die_c_per_w=joint2.r_c_per_w[0], tau_die_s=joint2.taus_s[0],
        r_sink_c_per_w=joint2.r_c_per_w[1], tau_sink_s=joint2.taus_s[1],
        slowdown_temp_c=89.0, max_operating_temp_c=87.0, shutdown_temp_c=95.0, source="fit",
    )
    joint_eval = {}
    offsets2 = dict(joint2.offsets_c)
    offsets1 = dict(joint1.offsets_c)
    for r in fit_recs + held:
        if r.name in offsets2:
            off2, off1 = offsets2[r.name], offsets1[r.name]
        else:
            _, off2 = transfer_rmse(r, joint2)
            _, off1 = transfer_rmse(r, joint1)
            offsets2[r.name], offsets1[r.name] = off2, off1
        sim = simulate_with_params(r, params, off2)
        p1 = predict(r, joint1, off1)
        err = sim - r.temp_end_c
        joint_eval[r.name] = {
            "used_in_fit": r.name in joint2.offsets_c,
            "power_source": r.power_source,
            "inlet_offset_c": off2,
            "two_node_rmse_c": float(np.sqrt(np.mean(err**2))),
            "two_node_max_abs_err_c": float(np.max(np.abs(err))),
            "single_node_rmse_c": float(np.sqrt(np.mean((p1 - r.temp_end_c) ** 2))),
            "single_node_inlet_offset_c": off1,
            "n_windows": int(r.t_s.size),
            "duration_s": float(r.t_s[-1] + WINDOW_S),
        }

    phases = {n: phase_table(RECORDINGS_DIR / n) for n in FIT_RECORDINGS}
    idle = {n: idle_power(RECORDINGS_DIR / n) for n in FIT_RECORDINGS}
    idle_all = [v[0] for v in idle.values()]

    def r4(x: Any) -> Any:
        if isinstance(x, float):
            return float(f"{x:.5g}")
        if isinstance(x, dict):
            return {k: r4(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [r4(v) for v in x]
        return x

    statics = {n: r.raw.get("static", {}) for n, r in ((r.name, r) for r in fit_recs + held)}
    out = {
        "description": (
            "Two-node (die + heatsink) thermal model of an NVIDIA H100 80GB HBM3 GPU, fitted "
            "to real NVML recordings; plus measured phase power levels for the simulator."
        ),
        "source": (
            "joint least-squares fit by scripts/fit_thermal.py (llm-cluster fit-thermal) to "
            + ", ".join(FIT_RECORDINGS)
            + " (envs/data/thermal/recordings, see README.md there)"
        ),
        "command": command,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": (
            "T_gpu = T_inlet + x_die + x_sink; dx_i/dt = (R_i*P - x_i)/tau_i; exact step "
            "x <- R*P + (x - R*P)*exp(-dt/tau). P = GPU power from NVML energy-counter "
            f"differences over {WINDOW_S} s windows; fitted against NVML GPU temperature."
        ),
        "params": {
            "r_die_c_per_w": joint2.r_c_per_w[0],
            "tau_die_s": joint2.taus_s[0],
            "r_sink_c_per_w": joint2.r_c_per_w[1],
            "tau_sink_s": joint2.taus_s[1],
        },
        "units": {"r_die_c_per_w": "C/W", "tau_die_s": "s", "r_sink_c_per_w": "C/W",
                  "tau_sink_s": "s"},
        "single_node_params": {"r_c_per_w": joint1.r_c_per_w[0], "tau_s": joint1.taus_s[0]},
        "inlet_note": (
            "The inlet (aisle) temperature was not measured on the lent machines. Each "
            "recording gets its own fitted constant T_inlet ('inlet_offset_c'), which also "
            "absorbs any sensor offset; it is not a measured air temperature."
        ),
        "thresholds": {
            "slowdown_temp_c": 89.0,
            "max_operating_temp_c": 87.0,
            "shutdown_temp_c": 95.0,
            "mem_max_temp_c": 95.0,
            "source": (
                "NVML nvmlDeviceGetTemperatureThreshold on H100 80GB HBM3, driver 580.159.04: "
                "recordings/h100_probe.json static.thr_* and "
                "recordings/h100_steps_20261125.json.gz static.*_c"
            ),
        },
        "joint_fit_evaluation": joint_eval,
        "per_recording_fits": per_rec,
        "cross_recording": cross,
        "online_transfer": online,
        "recordings": {
            n: {"static": statics[n], "power_source": joint_eval[n]["power_source"],
                "used_in_fit": joint_eval[n]["used_in_fit"]}
            for n in statics
        },
        "power": {
            "idle_power_w": float(np.mean(idle_all)),
            "idle_power_w_per_recording": {n: {"mean_w": v[0], "std_1s_w": v[1]}
                                           for n, v in idle.items()},
            "idle_note": (
                "energy-counter mean over idle phases, skipping 10 s after each phase start; "
                "idle right after load runs ~10 W higher than on a cold GPU (see phases)"
            ),
            "phases": phases,
            "phase_note": (
                "Llama-3-8B-shaped model, random bf16 weights, eager HF transformers, one GPU, "
                "700 W power limit. iters_per_s from marks; tokens_per_s = tokens per "
                "iteration (batch x prompt for prefill, batch for decode) x iters_per_s; "
                "decode iterations include a context prefill every 256 steps."
            ),
        },
    }
    out = r4(out)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    ThermalParams.load(args.out)  # the written file must validate
    _plot(fit_recs + held, joint2, joint1, offsets2, offsets1, args.plot)
    print(json.dumps({"params": out["params"], "single": out["single_node_params"],
                      "eval": out["joint_fit_evaluation"], "cross": out["cross_recording"],
                      "online_transfer": {n: {k: v[k] for k in ("fit_on", "inlet_offset_c", "rmse_c",
                                                                 "max_abs_err_c")}
                                          for n, v in out["online_transfer"]["recordings"].items()},
                      "idle_w": out["power"]["idle_power_w"]}, indent=1))
    return 0
