"""Fit the simulator to real-GPU recordings and measure how well it reproduces a real run.

Inputs are two recordings made on the H100 (``envs/data/real``):

* the profile (``scripts/profile_gpu.py``): prefill/decode timing sweeps and sustained
  phases with energy-counter power and temperature;
* the fidelity run (``llm-cluster calibrate record``): an Azure trace window served by the
  real worker through ``RealCluster`` with a scripted drill (batch cap 64 -> 8 -> 64).

:func:`fit_profile` turns the profile into a simulator profile (the schema of
``envs/data/profiles``): prefill and decode time coefficients, idle/prefill/decode power.
:func:`fit_thermal` fits the two-node GPU thermal model (``envs/sim/thermal.py``) to the
profile recording's telemetry. :func:`replay_in_simulator` serves the run's requests, with
the same batch-cap schedule, in ``SimCluster`` (one GPU, 0.25 s ticks) using those fits, and
:func:`compare` prints power MAPE (1 s windows), temperature RMSE and throughput/latency
errors. The replay's thermal model starts from the GPU's measured history (the telemetry
recorded before the replay: idle lead and worker warm-up). Only the thermal model's inlet
offset is fitted to the fidelity run itself (the inlet air temperature was not measured);
everything else comes from the profile and calibration recordings.

What the fits cannot know (the clocks were never changed on the shared H100): the
frequency sensitivities ``prefill_phi``, ``decode_phi`` and ``power_freq_exponent`` are
taken from the shipped ``llama3-8b_h100_tp1`` profile.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig
from llm_cluster_gym.envs.real.telemetry import TelemetryRecording, load_recording
from llm_cluster_gym.envs.sim.fitting import nonneg_rel_lstsq, relative_error_stats, saturation_fit
from llm_cluster_gym.envs.sim.profiles import (
    DEFAULT_PROFILE_DIR,
    Profile,
    ProfileLibrary,
    freq_at_power_limit_mhz,
    profile_from_dict,
)
from llm_cluster_gym.envs.sim.thermal import GpuThermalState, ThermalParams, step_gpu_temperature

MODEL_NAME = "llama3-8b-real"
"""Model key of the measured profile (the worker of envs/real/worker.py, not vLLM)."""

WINDOW_S = 0.25
"""Resampling window of the thermal fit and simulator tick (s)."""

PRE_HISTORY_MIN_S = 5.0
"""Telemetry before the replay starts that is enough to start the thermal model from (s)."""


class FidelityError(ValueError):
    """A recording lacks what the fit needs (the message names file and field)."""


# ---------------------------------------------------------------------------------------------
# Telemetry windows
# ---------------------------------------------------------------------------------------------


def power_windows(rec: TelemetryRecording, t0_s: float, t1_s: float, window_s: float,
                  gpu: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean power (energy counter) and end-of-window temperature on a window grid.

    The counter is read at every sample but changes only about every 100 ms, so only the
    first sample of each new value (its update time) is used for interpolation.

    Returns:
        (window starts relative to ``t0_s``, power W, temperature C at each window end).
    """
    t = rec.column("t_s", gpu)
    e = rec.column("energy_mj", gpu)
    temp = rec.column("temp_c", gpu)
    fin = np.isfinite(e)
    if fin.sum() < 10:
        raise FidelityError(f"{rec.path}: field 'energy_mj' has too few values for GPU {gpu}")
    tf, ef = t[fin], e[fin]
    keep = np.concatenate([[True], np.diff(ef) != 0])
    grid = np.arange(max(t0_s, tf[0]), min(t1_s, tf[-1]) - 1e-9, window_s)
    e_j = np.interp(grid, tf[keep], ef[keep] / 1000.0)
    power = np.diff(e_j) / window_s
    temp_end = np.interp(grid[1:], t, temp)
    return grid[:-1] - t0_s, power, temp_end


# ---------------------------------------------------------------------------------------------
# Profile fit
# ---------------------------------------------------------------------------------------------


def _template() -> dict[str, Any]:
    return json.loads((DEFAULT_PROFILE_DIR / "llama3-8b_h100_tp1.json").read_text())


def fit_profile(profile_path: str | Path) -> dict[str, Any]:
    """Fit simulator coefficients to a ``profile_gpu.py`` recording.

    Returns:
        A profile document in the schema of ``envs/data/profiles`` (model ``llama3-8b-real``).

    Raises:
        FidelityError: The recording lacks the ``prefill``, ``decode`` or ``phases`` sections.
    """
    rec = load_recording(profile_path)
    ex = rec.extra
    for key in ("prefill", "decode", "phases"):
        if key not in ex:
            raise FidelityError(f"{rec.path}: field '{key}' is missing (not a profile_gpu.py file)")
    tpl = _template()
    co = tpl["coefficients"]
    max_f = float(rec.static.get("max_sm_clock_mhz") or co["max_freq_mhz"])
    # Decode ran at the maximum clock throughout (no throttling), so only prefill is normalised.
    phi_p, gamma = co["prefill_phi"], co["power_freq_exponent"]
    # Prefill time: sweep points and sustained phases, normalised to the maximum clock.
    pre = ex["prefill"]
    phases = ex["phases"]
    sus = [p for p in phases if p["kind"] == "prefill"]
    tok = np.array(pre["tokens"] + [p["load"] for p in sus], dtype=float)
    t_meas = np.array(pre["time_s"] + [p["time_s_per_iter"] for p in sus], dtype=float)
    f_meas = np.array(pre["sm_clock_mhz"] + [p["sm_clock_mhz_median"] for p in sus], dtype=float)
    f_meas = np.where(np.isfinite(f_meas), f_meas, max_f)
    slow = phi_p * max_f / f_meas + 1.0 - phi_p
    t_fmax = t_meas / slow
    p_coef = nonneg_rel_lstsq(np.column_stack([np.ones_like(tok), tok, tok**2]), t_fmax)
    p_pred = np.column_stack([np.ones_like(tok), tok, tok**2]) @ p_coef
    # Decode time vs batch and context.
    dec = ex["decode"]
    # Mixed-length batches (recordings from the chunked-attention worker) enter at their mean
    # context, the simulator's decode input.
    mix = ex.get("decode_mixed", {"batch": [], "mean_ctx_tokens": [], "time_s": []})
    b = np.array(dec["batch"] + mix["batch"], dtype=float)
    c = np.array(dec["ctx_tokens"] + mix["mean_ctx_tokens"], dtype=float)
    td = np.array(dec["time_s"] + mix["time_s"], dtype=float)
    n_mix = len(mix["batch"])
    xd = np.column_stack([np.ones_like(b), b, b * c])
    d_coef = nonneg_rel_lstsq(xd, td)
    # Power.
    idle = [p["power_w"] for p in phases if p["kind"] == "idle"]
    idle_w = float(np.median(idle))
    pp = [p for p in phases if p["kind"] == "prefill"]
    dp = [p for p in phases if p["kind"] == "decode"]
    pl = np.array([p["load"] for p in pp], dtype=float)
    pf = np.array([p["sm_clock_mhz_median"] for p in pp], dtype=float)
    pw = np.array([p["power_w"] for p in pp], dtype=float)
    pre_max, pre_k = saturation_fit(pl, (pf / max_f) ** gamma, pw, idle_w)
    dl = np.array([p["load"] for p in dp], dtype=float)
    df = np.array([p["sm_clock_mhz_median"] for p in dp], dtype=float)
    dw = np.array([p["power_w"] for p in dp], dtype=float)
    dec_max, dec_k = saturation_fit(dl, (df / max_f) ** gamma, dw, idle_w)

    def sat(load: np.ndarray, f: np.ndarray, mx: float, k: float) -> np.ndarray:
        return idle_w + (mx - idle_w) * load / (load + k) * (f / max_f) ** gamma

    st = rec.static
    doc = copy.deepcopy(tpl)
    doc["model"] = MODEL_NAME
    doc["provenance"] = {
        "sources": [{
            "measured_here": (f"{Path(profile_path).name}: {st.get('command')}; {st.get('name')}, "
                              f"driver {st.get('driver')}, {st.get('date_utc')}, torch "
                              f"{st.get('torch')}"),
            "used_for": "every time and power coefficient",
        }, {
            "from_profile": "envs/data/profiles/llama3-8b_h100_tp1.json",
            "used_for": "prefill_phi, decode_phi, power_freq_exponent (clocks were not varied: "
                        "the shared H100 forbids setting them), model_shape, hardware",
        }],
        "built_by": "llm-cluster calibrate fit --write (envs/real/fidelity.py)",
        "built_on": datetime.now(timezone.utc).date().isoformat(),
        "engine": st.get("model", "envs/real/worker.py") + "; one prompt per prefill pass, "
                  "static KV cache 64 slots x 4096 tokens",
    }
    co = doc["coefficients"]
    co.update(
        prefill_p0_s=float(p_coef[0]), prefill_p1_s_per_token=float(p_coef[1]),
        prefill_p2_s_per_token2=float(p_coef[2]), decode_d0_s=float(d_coef[0]),
        decode_d1_s_per_seq=float(d_coef[1]), decode_d2_s_per_seq_token=float(d_coef[2]),
        idle_power_w=round(idle_w, 2), prefill_max_power_w=round(pre_max, 2),
        prefill_k_tokens=round(pre_k, 3), decode_max_power_w=round(dec_max, 2),
        decode_k_batch=round(dec_k, 4), gpu_power_limit_w=float(st.get("power_limit_w") or 700.0),
        max_freq_mhz=max_f, kv_capacity_tokens=64 * 4096,
        load_time_s=round(float(next((m["t1"] - m["t0"] for m in ex.get("marks", [])
                                      if m["phase"] == "build"), co["load_time_s"])), 2),
    )
    doc["grids"] = {
        "prefill": {"tokens": tok.tolist(), "time_s_measured": t_meas.tolist(),
                    "freq_mhz": f_meas.tolist(), "time_s_at_max_freq": t_fmax.tolist(),
                    "note": "profile_gpu.py sweep (median of 5) and sustained phases"},
        "decode": {"batch": b.tolist(), "ctx_tokens": c.tolist(), "time_s": td.tolist()},
        "prefill_power": {"tokens": pl.tolist(), "freq_mhz": pf.tolist(), "power_w": pw.tolist()},
        "decode_power": {"batch": dl.tolist(), "power_w": dw.tolist(),
                         "ctx_tokens": [p.get("ctx_tokens") for p in dp]},
    }
    doc["fit_error"] = {
        "prefill_time": {**relative_error_stats(p_pred, t_fmax),
                         "target": "grids.prefill.time_s_at_max_freq"},
        "decode_time": {**relative_error_stats(xd @ d_coef, td), "target": "grids.decode.time_s"},
        **({"decode_time_mixed_batches": {
            **relative_error_stats((xd @ d_coef)[-n_mix:], td[-n_mix:]),
            "target": "grids.decode.time_s (the last n: mixed-length batches at mean context)"}}
           if n_mix else {}),
        "prefill_power": {**relative_error_stats(sat(pl, pf, pre_max, pre_k), pw),
                          "target": "grids.prefill_power.power_w"},
        "decode_power": {**relative_error_stats(sat(dl, df, dec_max, dec_k), dw),
                         "target": "grids.decode_power.power_w"},
    }
    return doc


# ---------------------------------------------------------------------------------------------
# Served-run fit: the engine as it serves, not as it is timed in isolation
# ---------------------------------------------------------------------------------------------


def served_steps(rec: TelemetryRecording) -> dict[str, np.ndarray]:
    """The scheduler-step log of a ``calibrate.py record`` recording, one array per column.

    Raises:
        FidelityError: The recording has no step log (made before it was recorded).
    """
    ex = rec.extra
    rows = ex.get("step_log")
    cols = ex.get("step_columns")
    if not rows or not cols:
        raise FidelityError(f"{rec.path}: field 'step_log' is missing or empty (record the run "
                            "again with llm-cluster calibrate record)")
    arr = np.asarray(rows, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != len(cols) or not np.all(np.isfinite(arr)):
        raise FidelityError(f"{rec.path}: field 'step_log' must be finite rows of {len(cols)} values")
    return {name: arr[:, i] for i, name in enumerate(cols)}


def _prefill_slowdown(co: dict[str, Any], tokens: np.ndarray) -> np.ndarray:
    """Prefill time factor the simulator applies at ``tokens`` (clock held to the power limit)."""
    f = freq_at_power_limit_mhz(tokens, co["gpu_power_limit_w"], co["idle_power_w"],
                                co["prefill_max_power_w"], co["prefill_k_tokens"],
                                co["power_freq_exponent"], co["min_freq_mhz"], co["max_freq_mhz"])
    phi = co["prefill_phi"]
    return phi * co["max_freq_mhz"] / f + 1.0 - phi


def fit_served_times(runs: list[dict[str, np.ndarray]], co: dict[str, Any]) -> dict[str, Any]:
    """Prefill and decode time coefficients from the steps of served runs (pooled).

    The served engine pays what an isolated timing does not: prompt-length buckets padded up,
    prompts longer than the largest CUDA-graph bucket run eagerly, and per step the
    scheduler's host work (admission, retiring sequences, the chunk table). Prefill times are
    divided by the slowdown the simulator itself applies at the power-limited clock (so the
    simulator reproduces them); the host time per step (inside steps and between them) is
    added to the per-iteration constant ``d0``, since every step runs one decode iteration.

    Returns:
        ``coefficients`` (the six time coefficients), ``fit_error`` (MAPE per step) and
        ``host_s_per_step``.
    """
    steps = {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}
    pre = steps["prefill_passes"] > 0
    n, tok = steps["prefill_passes"][pre], steps["prefill_tokens"][pre]
    xp = np.column_stack([n, tok, tok**2 / n])  # one prompt length per pass: the step's mean
    yp = steps["prefill_s"][pre]
    slow = _prefill_slowdown(co, tok / n)
    p_coef = nonneg_rel_lstsq(xp, yp / slow)
    dec = steps["decode_batch"] > 0
    xd = np.column_stack([np.ones(dec.sum()), steps["decode_batch"][dec],
                          steps["decode_ctx_tokens"][dec]])
    yd = steps["decode_s"][dec]
    d_coef = nonneg_rel_lstsq(xd, yd)
    host_s = 0.0
    for r in runs:  # gaps between steps are within one run
        wall = r["t_end_s"] - r["t_start_s"]
        between = np.diff(r["t_start_s"]) - wall[:-1]
        host_s += float(np.sum(wall - r["prefill_s"] - r["decode_s"])
                        + np.sum(between[between < 1.0]))  # longer pauses: no work
    host_per_step = host_s / len(steps["t_start_s"])
    return {
        "coefficients": {
            "prefill_p0_s": float(p_coef[0]), "prefill_p1_s_per_token": float(p_coef[1]),
            "prefill_p2_s_per_token2": float(p_coef[2]),
            "decode_d0_s": float(d_coef[0] + host_per_step), "decode_d1_s_per_seq": float(d_coef[1]),
            "decode_d2_s_per_seq_token": float(d_coef[2]),
        },
        "fit_error": {
            "served_prefill_time": {**relative_error_stats(xp @ p_coef * slow, yp),
                                    "target": "step_log prefill_s (steps with prefill passes)"},
            "served_decode_time": {**relative_error_stats(xd @ d_coef, yd),
                                   "target": "step_log decode_s (steps with a decode iteration)"},
        },
        "host_s_per_step": host_per_step,
    }


def served_vs_isolated(steps: dict[str, np.ndarray], co: dict[str, Any]) -> dict[str, float]:
    """How much longer the served engine's steps take than the isolated sweeps' fit predicts.

    Medians of measured / predicted time: single prefill passes up to 2048 prompt tokens (the
    largest CUDA-graph bucket) and above it (eager passes), and decode iterations.
    """
    one = steps["prefill_passes"] == 1
    tok = steps["prefill_tokens"][one]
    pred = (co["prefill_p0_s"] + co["prefill_p1_s_per_token"] * tok
            + co["prefill_p2_s_per_token2"] * tok**2) * _prefill_slowdown(co, tok)
    ratio = steps["prefill_s"][one] / pred
    dec = steps["decode_batch"] > 0
    pred_d = (co["decode_d0_s"] + co["decode_d1_s_per_seq"] * steps["decode_batch"][dec]
              + co["decode_d2_s_per_seq_token"] * steps["decode_ctx_tokens"][dec])

    def median(x: np.ndarray) -> float:
        return round(float(np.median(x)), 3) if x.size else float("nan")

    return {"prefill_up_to_2048_tokens": median(ratio[tok <= 2048]),
            "prefill_above_2048_tokens": median(ratio[tok > 2048]),
            "decode": median(steps["decode_s"][dec] / pred_d)}


def _split_into_seconds(start_s: np.ndarray, dur_s: np.ndarray, weight: np.ndarray,
                        n: int) -> np.ndarray:
    """Sum of ``dur * weight`` per 1 s bin, splitting intervals that cross a bin edge."""
    out = np.zeros(n)
    end_s = start_s + dur_s
    a, b = np.floor(start_s).astype(int), np.floor(end_s).astype(int)
    first = np.where(a == b, dur_s, b - start_s)
    ok = (a >= 0) & (a < n)
    np.add.at(out, a[ok], (first * weight)[ok])
    cross = (a != b) & (b >= 0) & (b < n)
    np.add.at(out, b[cross], ((end_s - b) * weight)[cross])
    return out


def _served_seconds(rec: TelemetryRecording, steps: dict[str, np.ndarray], co: dict[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray, Any]:
    """A served run's 1 s power, its prefill term per second, and its decode term for ``k``."""
    t0 = float(rec.extra["t0_s"])
    duration = float(rec.static.get("config", {}).get("duration_s", 0.0)) or float(
        steps["t_end_s"][-1])
    _, power, _ = power_windows(rec, t0, t0 + duration, 1.0)
    n = len(power)
    idle, limit = co["idle_power_w"], co["gpu_power_limit_w"]
    passes = np.maximum(steps["prefill_passes"], 1.0)
    x = steps["prefill_tokens"] / passes
    p_pre = np.minimum(idle + (co["prefill_max_power_w"] - idle) * x / (x + co["prefill_k_tokens"]),
                       limit)
    t_dec = steps["t_start_s"] + steps["prefill_s"]
    f_pre = _split_into_seconds(steps["t_start_s"], steps["prefill_s"], p_pre - idle, n)
    b = steps["decode_batch"]

    def f_dec(k: float) -> np.ndarray:
        return _split_into_seconds(t_dec, steps["decode_s"], b / (b + k), n)

    return power, f_pre, f_dec


def fit_served_power(runs: list[tuple[TelemetryRecording, dict[str, np.ndarray]]],
                     co: dict[str, Any], phase_batch: np.ndarray, phase_power_w: np.ndarray
                     ) -> dict[str, Any]:
    """Prefill and decode power from served runs' 1 s energy and their step schedules.

    Each second's measured energy is idle power plus, for every step in it, the prefill time
    at the (power-limited) prefill power and the decode time at ``decode_max_power_w`` and
    ``decode_k_batch`` (the simulator's saturating form). The prefill curve keeps the
    profile's shape with a fitted scale; the decode amplitude and scale are linear least
    squares (relative error) for each half-load ``k`` on a grid. The profile's sustained
    decode phases join the fit with a weight from a grid, which anchors batches the runs
    seldom reached; ``k`` and the weight minimize the runs' MAPE plus the phases' MAPE.

    Args:
        runs: (recording, its step log) of each calibration run; their seconds are pooled.
        co: The profile's coefficients (idle power, prefill curve shape, power limit).
        phase_batch: Batch of each sustained decode phase of the profile recording.
        phase_power_w: Power of each of those phases (W).

    Returns:
        ``coefficients`` (``prefill_max_power_w``, ``decode_max_power_w``, ``decode_k_batch``)
        and ``fit_error`` (``served_power_1s`` over the runs, ``decode_power_phases``).
    """
    idle = co["idle_power_w"]
    parts = [_served_seconds(rec, steps, co) for rec, steps in runs]
    power = np.concatenate([pw_ for pw_, _, _ in parts])
    f_pre = np.concatenate([fp for _, fp, _ in parts])

    def f_dec(k: float) -> np.ndarray:
        return np.concatenate([fd(k) for _, _, fd in parts])

    pb, pw = np.asarray(phase_batch, dtype=float), np.asarray(phase_power_w, dtype=float)
    y = power - idle
    best: tuple[float, float, float, np.ndarray] | None = None
    for k in np.logspace(-1, 2, 31):
        run_x = np.column_stack([f_pre, f_dec(k)])
        phase_x = np.column_stack([np.zeros_like(pb), pb / (pb + k)])
        for w in (0.0, 1.0, 3.0, 10.0):
            xx = np.vstack([run_x / power[:, None], w * phase_x / pw[:, None]])
            yy = np.concatenate([y / power, w * (pw - idle) / pw])
            coef, *_ = np.linalg.lstsq(xx, yy, rcond=None)
            if np.any(coef <= 0):
                continue
            score = float(np.mean(np.abs(run_x @ coef - y) / power)
                          + np.mean(np.abs(phase_x @ coef - (pw - idle)) / pw))
            if best is None or score < best[0]:
                best = (score, float(k), w, coef)
    if best is None:
        names = ", ".join(str(rec.path) for rec, _ in runs)
        raise FidelityError(f"{names}: no positive power fit to the served runs")
    _, k, w, (pre_scale, dec_amp) = best
    pred = idle + pre_scale * f_pre + dec_amp * f_dec(k)
    phase_pred = idle + dec_amp * pb / (pb + k)
    return {
        "coefficients": {
            "prefill_max_power_w": round(idle + pre_scale * (co["prefill_max_power_w"] - idle), 2),
            "decode_max_power_w": round(idle + dec_amp, 2),
            "decode_k_batch": round(k, 4),
        },
        "fit_error": {
            "served_power_1s": {**relative_error_stats(pred, power),
                                "target": "1 s energy-counter power of the served runs"},
            "decode_power_phases": {**relative_error_stats(phase_pred, pw),
                                    "target": "grids.decode_power.power_w (sustained phases)"},
        },
        "prefill_power_scale": round(float(pre_scale), 4),
        "phase_weight": w,
    }


def fit_to_served_run(doc: dict[str, Any],
                      run_paths: str | Path | tuple[str | Path, ...] | list[str | Path]
                      ) -> dict[str, Any]:
    """Refit a profile document's time and power coefficients to served calibration runs.

    ``doc`` is :func:`fit_profile`'s document; its sustained decode phases
    (``grids.decode_power``) join the power fit. Several runs (other trace windows) are
    pooled: their steps in the time fit, their seconds in the power fit.

    Returns:
        A new document: coefficients from the served runs, the isolated-sweep coefficients
        and fit errors kept under ``isolated_sweep``, provenance naming every recording.
    """
    paths = [run_paths] if isinstance(run_paths, (str, Path)) else list(run_paths)
    recs = [load_recording(x) for x in paths]
    steps = [served_steps(rec) for rec in recs]
    out = copy.deepcopy(doc)
    co = out["coefficients"]
    isolated = {k: co[k] for k in ("prefill_p0_s", "prefill_p1_s_per_token",
                                   "prefill_p2_s_per_token2", "decode_d0_s", "decode_d1_s_per_seq",
                                   "decode_d2_s_per_seq_token", "prefill_max_power_w",
                                   "decode_max_power_w", "decode_k_batch")}
    slower = {Path(x).name: served_vs_isolated(st, co) for x, st in zip(paths, steps, strict=True)}
    phases = doc["grids"]["decode_power"]
    power = fit_served_power(list(zip(recs, steps, strict=True)), co, phases["batch"],
                             phases["power_w"])
    co.update(power["coefficients"])
    times = fit_served_times(steps, co)  # the slowdown uses the served power curve
    co.update(times["coefficients"])
    out["isolated_sweep"] = {"coefficients": isolated, "fit_error": doc["fit_error"]}
    out["fit_error"] = {**doc["fit_error"], **times["fit_error"], **power["fit_error"]}
    out["served_fit"] = {
        "recordings": [Path(x).name for x in paths],
        "commands": [rec.static.get("command") for rec in recs],
        "steps": int(sum(len(st["t_start_s"]) for st in steps)),
        "host_s_per_step": round(times["host_s_per_step"], 6),
        "served_over_isolated_time_median": slower,
        "prefill_power_scale": power["prefill_power_scale"],
        "phase_weight": power["phase_weight"],
        "note": "time and power coefficients fitted to the served calibration runs (their "
                "scheduler steps and 1 s energy), not to the isolated sweeps: see "
                "envs/real/fidelity.py fit_served_times / fit_served_power; the isolated-sweep "
                "coefficients are kept under isolated_sweep",
    }
    for x, rec in reversed(list(zip(paths, recs, strict=True))):
        out["provenance"]["sources"].insert(1, {
            "measured_here": f"{Path(x).name}: {rec.static.get('command')}; "
                             f"{rec.static.get('name')} {rec.static.get('serial') or ''}".rstrip()
                             + f", {rec.static.get('date_utc')}",
            "used_for": "prefill/decode time coefficients (served steps) and prefill/decode "
                        "power (1 s energy of the served runs, with the profile's sustained "
                        "decode phases)",
        })
    out["provenance"]["sources"][0]["used_for"] = (
        "idle power, prefill power curve shape, sustained decode phases, isolated sweeps")
    return out


def profile_object(doc: dict[str, Any]) -> Profile:
    """Validate a profile document with the simulator's own loader."""
    return profile_from_dict(doc, Path(f"<{doc.get('model')}>"))


# ---------------------------------------------------------------------------------------------
# Thermal fit
# ---------------------------------------------------------------------------------------------


def _unit_responses(power_w: np.ndarray, taus_s: np.ndarray, window_s: float,
                    p0_w: float) -> np.ndarray:
    a = np.exp(-window_s / taus_s)
    x = np.full(a.shape, p0_w)
    out = np.empty((power_w.size, a.size))
    for k, p in enumerate(power_w):
        x = p + (x - p) * a
        out[k] = x
    return out


def fit_thermal(power_w: np.ndarray, temp_c: np.ndarray, window_s: float = WINDOW_S
                ) -> tuple[ThermalParams, float, float]:
    """Fit the two-node model (R_die, tau_die, R_sink, tau_sink, inlet offset) to one trace.

    Grid search over the two time constants (log grid, refined twice) with linear least
    squares for the resistances and the offset; resistances must be non-negative. Starts
    from the steady state of the first window's power.

    Returns:
        (parameters, inlet offset C, RMSE C).
    """
    shipped = ThermalParams.load()
    best: tuple[float, tuple[float, float], np.ndarray] | None = None
    lo, hi = np.log10([0.05, 1000.0])
    n = 30
    for _ in range(3):
        taus = np.logspace(lo, hi, n)
        u = _unit_responses(power_w, taus, window_s, power_w[0])
        for i, j in itertools.combinations(range(n), 2):
            a = np.column_stack([u[:, i], u[:, j], np.ones(power_w.size)])
            coef, *_ = np.linalg.lstsq(a, temp_c, rcond=None)
            if coef[0] < 0 or coef[1] < 0:
                continue
            sse = float(np.sum((a @ coef - temp_c) ** 2))
            if best is None or sse < best[0]:
                best = (sse, (float(taus[i]), float(taus[j])), coef)
        if best is None:
            raise FidelityError("fit_thermal: no fit with non-negative resistances")
        step = (hi - lo) / (n - 1)
        cen = np.log10(best[1])
        lo, hi = float(cen.min() - 3 * step), float(cen.max() + 3 * step)
    sse, (t_die, t_sink), coef = best
    params = replace(shipped, r_die_c_per_w=float(coef[0]), tau_die_s=t_die,
                     r_sink_c_per_w=float(coef[1]), tau_sink_s=t_sink,
                     source="envs/real/fidelity.py fit_thermal on "
                            "envs/data/real/h100_llama3-8b_profile.json.gz")
    return params, float(coef[2]), math.sqrt(sse / power_w.size)


def thermal_rmse(params: ThermalParams, power_w: np.ndarray, temp_c: np.ndarray,
                 window_s: float = WINDOW_S, score_from: int = 0) -> tuple[float, float]:
    """RMSE of given parameters on a trace with only the inlet offset refitted (C, offset).

    The model starts at the steady state of the first window's power; the offset is fitted
    to every window, the RMSE taken from window ``score_from`` on (the windows before it are
    history that sets the model's state).
    """
    u = _unit_responses(power_w, np.array([params.tau_die_s, params.tau_sink_s]), window_s,
                        power_w[0])
    pred0 = u @ np.array([params.r_die_c_per_w, params.r_sink_c_per_w])
    off = float(np.mean((temp_c - pred0)[score_from:]))
    err = (temp_c - pred0 - off)[score_from:]
    return float(np.sqrt(np.mean(err ** 2))), off


# ---------------------------------------------------------------------------------------------
# Replay in the simulator
# ---------------------------------------------------------------------------------------------


def _scenario(duration_s: float, slo_ttft_s: float, slo_tbt_s: float, inlet_c: float,
              max_prefill_tokens: int, drop_after_s: float) -> Any:
    from llm_cluster_gym.envs.sim.scenario import (
        CoolingSpec,
        DatacenterSpec,
        PoolSpec,
        Scenario,
        ServerSpec,
        ServingSpec,
        WorkloadSpec,
        validate,
    )

    s = Scenario(
        name="real_h100_replay",
        description="one H100 serving the fidelity run's requests (envs/real/fidelity.py)",
        duration_s=duration_s, tick_s=WINDOW_S, control_interval_s=WINDOW_S,
        datacenter=DatacenterSpec(
            rows=1, racks_per_row=1, servers_per_rack=1, rows_per_aisle=1,
            # A one-GPU "server": its non-GPU power is irrelevant here (GPU power is compared).
            server=ServerSpec(gpus=1, max_power_w=1400.0, gpu_tdp_w=700.0, overhead_idle_w=1.0,
                              overhead_max_w=700.0, standby_w=0.0),
            idle_to_off_s=None,  # the measured GPU was never powered off
            cooling=CoolingSpec(supply_temp_c=inlet_c, outside_temp_coeff=0.0,
                                overload_c_per_frac=0.0, tau_inlet_s=300.0),
            outside_temp_mean_c=inlet_c, outside_temp_amplitude_c=0.0,
            cooling_oversubscription=0.01),
        workload=WorkloadSpec(trace="azure_conv_2023", rps_per_gpu=1.0, pools="single"),
        serving=ServingSpec(
            model=MODEL_NAME, gpu="h100",
            pools=(PoolSpec(1, 1, 1980.0, 64, slo_ttft_s, slo_tbt_s),),
            tp_choices=(1,), freq_choices_mhz=(1980.0,), batch_choices=(8, 64),
            max_prefill_tokens=max_prefill_tokens, drop_after_s=drop_after_s),
        source="envs/real/fidelity.py",
    )
    validate(s, "envs/real/fidelity.py")
    return s


def pre_history_s(run: TelemetryRecording) -> float:
    """Seconds of telemetry recorded before the trace replay starts (``t0_s``)."""
    return max(float(run.extra["t0_s"]) - float(run.column("t_s")[0]), 0.0)


def _history_start_s(run: TelemetryRecording, use_history: bool = True) -> float:
    """Where the thermal model starts: the first sample, on a window grid through ``t0_s``.

    So the history's windows end where the replay's first tick starts.
    """
    t0 = float(run.extra["t0_s"])
    if use_history and pre_history_s(run) >= PRE_HISTORY_MIN_S:
        return t0 - WINDOW_S * math.floor(pre_history_s(run) / WINDOW_S)
    return t0


def history_windows(run: TelemetryRecording, t1_s: float, use_history: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Power and temperature windows from where the thermal model starts up to ``t1_s``.

    Returns:
        (power W, temperature C, index of the first window of the replay): the windows
        before it are the history that sets the model's state.
    """
    t0 = float(run.extra["t0_s"])
    h0 = _history_start_s(run, use_history)
    rel, pw, tt = power_windows(run, h0, t1_s, WINDOW_S)
    return pw, tt, int(np.searchsorted(rel, t0 - h0 - 1e-9))


def initial_thermal_state(run: TelemetryRecording, thermal: ThermalParams,
                          inlet_c: float, use_history: bool = True) -> GpuThermalState:
    """The GPU's thermal state (rises above the inlet) when the trace replay starts.

    Recordings that sampled the GPU before the replay (``calibrate.py record`` samples while
    the GPU idles and the worker warms up) give it from measurement: the model runs over that
    measured power from a steady state at its first window's power, as :func:`thermal_rmse`
    does when it fits the inlet offset. Without such history (older recordings) the die and
    sink are put at the steady state that matches the first temperature of the replay (also
    with ``use_history=False``, to measure what the history is worth).
    """
    t0 = float(run.extra["t0_s"])
    h0 = _history_start_s(run, use_history)
    if h0 < t0:
        _, pw, _ = power_windows(run, h0, t0 + 0.5 * WINDOW_S, WINDOW_S)  # windows up to t0
        st = GpuThermalState.steady(pw[:1], thermal)
        for p in pw:
            step_gpu_temperature(st, np.array([p]), np.array([inlet_c]), WINDOW_S, thermal)
        return st
    t_first = float(run.column("temp_c")[np.searchsorted(run.column("t_s"), t0)])
    p0 = max((t_first - inlet_c) / thermal.r_total_c_per_w, 0.0)
    return GpuThermalState.steady(np.array([p0]), thermal)


def replay_in_simulator(run: TelemetryRecording, profile: Profile, thermal: ThermalParams,
                        inlet_c: float, use_history: bool = True) -> dict[str, np.ndarray]:
    """Serve the run's requests with its batch-cap schedule in ``SimCluster``.

    The GPU's thermal state at the start comes from :func:`initial_thermal_state`.

    Returns:
        Per-tick arrays: ``t_s`` (tick start), ``power_w``, ``temp_c``, ``tokens``,
        ``finished``, and per-interval lists of TTFT/TBT P50.
    """
    from llm_cluster_gym.envs.sim.cluster import SimCluster
    from llm_cluster_gym.envs.sim.workload import Trace

    ex = run.extra
    cfg = run.static.get("config", {})
    wcfg = cfg.get("worker", {})
    max_ctx = int(wcfg.get("max_ctx", 4096))
    tr = ex["trace"]
    out_tok = np.minimum(np.array(tr["output_tokens"]), max_ctx // 2)
    in_tok = np.minimum(np.array(tr["input_tokens"]), max_ctx - out_tok)
    duration = float(cfg.get("duration_s", tr["duration_s"]))
    s = _scenario(duration, float(cfg.get("slo_ttft_s", 1.0)), float(cfg.get("slo_tbt_s", 0.2)),
                  inlet_c, int(wcfg.get("max_prefill_tokens", 8192)),
                  float(wcfg.get("drop_after_s", 60.0)))
    sim = SimCluster(s, serving_model="request", profiles=ProfileLibrary([profile]),
                     thermal=thermal, auto_place_vms=False)
    sim.reset(seed=0)
    # Replace the drawn trace with the recorded requests (same arrival times and lengths).
    trace = Trace(np.array(tr["arrival_s"]), in_tok, out_tok, duration, "fidelity_run",
                  str(run.path))
    sim.trace = trace
    sim.trace_pool = sim.pools.assign(trace.input_tokens, trace.output_tokens)
    sim._trace_pos = 0
    sim.mean_input_tokens = float(in_tok.mean())
    st = initial_thermal_state(run, thermal, inlet_c, use_history)
    sim.thermal_state.x_die_c[:] = st.x_die_c
    sim.thermal_state.x_sink_c[:] = st.x_sink_c
    steps = [tuple(x) for x in ex["drill"]["batch_steps"]]
    out: dict[str, list[float]] = {k: [] for k in ("t_s", "power_w", "temp_c", "tokens",
                                                   "finished", "ttft_p50_s", "tbt_p50_s")}
    cap_now = None
    while not sim.done:
        t = sim.time_s
        cap = int([c for s0, c in steps if s0 <= t + 1e-9][-1])
        if cap != cap_now:
            sim.apply(ClusterAction(pools=(PoolConfig(1, 1, 1980.0, cap),)))
            cap_now = cap
        m = sim.advance()
        tel = sim.telemetry()
        out["t_s"].append(t)
        out["power_w"].append(float(tel.gpu_power_w[0]))
        out["temp_c"].append(float(tel.gpu_temp_c[0]))
        out["tokens"].append(m.tokens_generated)
        out["finished"].append(m.finished)
        out["ttft_p50_s"].append(m.ttft_p50_s)
        out["tbt_p50_s"].append(m.tbt_p50_s)
    res = {k: np.array(v, dtype=float) for k, v in out.items()}
    res["sim_requests"] = np.array([sim.finished_total, sim.dropped_total])
    return res


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def _bins(t: np.ndarray, v: np.ndarray, width_s: float, n: int, how: str = "mean") -> np.ndarray:
    idx = np.floor(t / width_s + 1e-9).astype(int)
    ok = (idx >= 0) & (idx < n)
    tot = np.bincount(idx[ok], weights=v[ok], minlength=n)
    if how == "sum":
        return tot
    cnt = np.bincount(idx[ok], minlength=n)
    return tot / np.maximum(cnt, 1)


def compare(run_path: str | Path, profile: Profile, thermal: ThermalParams,
            inlet_c: float | None = None, use_history: bool = True) -> dict[str, Any]:
    """Replay the run in the simulator and measure the gaps to the real run.

    Args:
        run_path: The fidelity recording.
        profile: Simulator profile (fitted).
        thermal: Thermal parameters (fitted).
        inlet_c: Inlet offset for the simulator (None: fitted to this run's telemetry with
            the given thermal parameters; the inlet was not measured).
        use_history: Start the thermal model from the telemetry recorded before the replay
            (if the recording has it); False: from a steady state at the first temperature.

    Returns:
        Figures: ``power_mape``, ``temp_rmse_c``, ``throughput_error`` (fractions and C) and
        the details behind them.
    """
    run = load_recording(run_path)
    ex = run.extra
    t0 = float(ex["t0_s"])
    duration = float(run.static.get("config", {}).get("duration_s", ex["trace"]["duration_s"]))
    if inlet_c is None:
        # The model runs over the same span as the replay's initial state (pre-history, then
        # the run); the offset is fitted to the run's windows.
        pw, tt, first = history_windows(run, t0 + duration, use_history)
        _, inlet_c = thermal_rmse(thermal, pw, tt, score_from=first)
    sim = replay_in_simulator(run, profile, thermal, inlet_c, use_history)
    n = int(round(duration))
    # Real: 1 s power from the energy counter, temperature at each second's end.
    rt, rp, rtemp = power_windows(run, t0, t0 + duration, 1.0)
    m = min(n, len(rp))
    sim_p = _bins(sim["t_s"], sim["power_w"], 1.0, n)[:m]
    sim_t = np.interp(rt[:m] + 1.0, sim["t_s"] + WINDOW_S, sim["temp_c"])
    real_p, real_t = rp[:m], rtemp[:m]
    power_mape = float(np.mean(np.abs(sim_p - real_p) / real_p))
    n5 = m // 5  # the real backend's control interval
    real_5, sim_5 = (x[:n5 * 5].reshape(n5, 5).mean(axis=1) for x in (real_p, sim_p))
    power_mape_5s = float(np.mean(np.abs(sim_5 - real_5) / real_5))
    temp_rmse = float(np.sqrt(np.mean((sim_t - real_t) ** 2)))
    iv = ex["intervals"]
    real_tok = np.array([r["tokens_generated"] for r in iv])
    width = float(iv[0]["interval_s"])
    sim_tok = _bins(sim["t_s"], sim["tokens"], width, len(iv), "sum")
    real_fin = float(sum(r["finished"] for r in iv))
    sim_fin = float(sim["finished"].sum())
    thr_err = abs(sim_tok.sum() - real_tok.sum()) / real_tok.sum()
    per_iv = np.abs(sim_tok - real_tok) / np.maximum(real_tok, 1.0)
    cols = ex["request_columns"]
    req = np.array([[np.nan if v is None else v for v in r] for r in ex["requests"]], dtype=float)
    ok = req[:, cols.index("dropped")] == 0
    real_ttft = float(np.median(req[ok, cols.index("ttft_s")]))
    real_tbt = float(np.median(req[ok, cols.index("tbt_s")]))
    return {
        "power_mape": round(power_mape, 4),
        "power_mape_5s": round(power_mape_5s, 4),
        "temp_rmse_c": round(temp_rmse, 3),
        "throughput_error": round(float(thr_err), 4),
        "throughput_interval_mape": round(float(per_iv.mean()), 4),
        "finished_error": round(abs(sim_fin - real_fin) / max(real_fin, 1.0), 4),
        "real_tokens": float(real_tok.sum()), "sim_tokens": float(sim_tok.sum()),
        "real_finished": real_fin, "sim_finished": sim_fin,
        "real_mean_power_w": round(float(real_p.mean()), 2),
        "sim_mean_power_w": round(float(sim_p.mean()), 2),
        "energy_error": round(float(abs(sim_p.sum() - real_p.sum()) / real_p.sum()), 4),
        "real_ttft_p50_s": round(real_ttft, 4),
        "real_tbt_p50_s": round(real_tbt, 5),
        "inlet_offset_c": round(inlet_c, 3),
        "n_power_windows": int(m),
        "tokens_interval_s": width,
        "series": {"real_power_w": real_p.tolist(), "sim_power_w": sim_p.tolist(),
                   "real_temp_c": real_t.tolist(), "sim_temp_c": sim_t.tolist(),
                   "real_tokens": real_tok.tolist(), "sim_tokens": sim_tok.tolist()},
    }


def calibrate_and_compare(profile_path: str | Path, run_path: str | Path,
                          calibration_path: str | Path | tuple[str | Path, ...] | None = None,
                          write_dir: Path | None = None,
                          other_runs: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Fit profile and thermal parameters, replay the run in the simulator, report the gaps.

    Args:
        profile_path: ``profile_gpu.py`` recording.
        run_path: ``calibrate.py record`` recording of the test window (only the thermal
            model's inlet offset is fitted to it).
        calibration_path: Another served recording (a different trace window) the time and
            power coefficients are fitted to, or several (pooled); None: the isolated sweeps
            alone.
        write_dir: Where to write the fitted profile and ``calibration.json`` (None: don't).
        other_runs: More served recordings judged with the same fit (e.g. another GPU), in
            the summary under ``other_runs`` by file name.

    Returns:
        ``{"summary": {...}, "profile": doc, "thermal": {...}, "comparison": {...}}``.
    """
    sweep_doc = fit_profile(profile_path)
    doc = (sweep_doc if calibration_path is None
           else fit_to_served_run(sweep_doc, calibration_path))
    prof = profile_object(doc)
    prec = load_recording(profile_path)
    t = prec.column("t_s")
    _, pw, tt = power_windows(prec, float(t[0]), float(t[-1]), WINDOW_S)
    thermal, off, rmse_fit = fit_thermal(pw, tt)
    run = load_recording(run_path)
    rpw, rtt, first = history_windows(run, float(run.column("t_s")[-1]))
    rmse_run_fitted, _ = thermal_rmse(thermal, rpw, rtt, score_from=first)
    rmse_run_shipped, _ = thermal_rmse(ThermalParams.load(), rpw, rtt, score_from=first)
    comp = compare(run_path, prof, thermal)
    comp_sweep = (comp if calibration_path is None
                  else compare(run_path, profile_object(sweep_doc), thermal))
    cal_paths = ([] if calibration_path is None else [calibration_path]
                 if isinstance(calibration_path, (str, Path)) else list(calibration_path))
    comp_in_sample = [compare(x, prof, thermal) for x in cal_paths]
    shipped_prof = replace(ProfileLibrary.load().get("llama3-8b", "h100", 1), model=MODEL_NAME)
    comp_shipped = compare(run_path, shipped_prof, ThermalParams.load())
    comp_steady = compare(run_path, prof, thermal, use_history=False)
    th = {
        "params": {"r_die_c_per_w": round(thermal.r_die_c_per_w, 6),
                   "tau_die_s": round(thermal.tau_die_s, 4),
                   "r_sink_c_per_w": round(thermal.r_sink_c_per_w, 6),
                   "tau_sink_s": round(thermal.tau_sink_s, 3)},
        "fit_rmse_c_on_profile_recording": round(rmse_fit, 3),
        "inlet_offset_c_profile_recording": round(off, 3),
        "rmse_c_on_fidelity_run_offset_refitted": round(rmse_run_fitted, 3),
        "shipped_params_rmse_c_on_fidelity_run_offset_refitted": round(rmse_run_shipped, 3),
    }
    headline = ("power_mape", "power_mape_5s", "temp_rmse_c", "throughput_error")
    summary = {
        "power_mape": comp["power_mape"],
        "temp_rmse_c": comp["temp_rmse_c"],
        "throughput_error": comp["throughput_error"],
        "power_mape_5s": comp["power_mape_5s"],
        "throughput_interval_mape": comp["throughput_interval_mape"],
        "finished_error": comp["finished_error"],
        "energy_error": comp["energy_error"],
        "thermal_history_s": round(pre_history_s(run), 1),
        "temp_rmse_c_steady_start": comp_steady["temp_rmse_c"],
        "isolated_sweep_profile": {k: comp_sweep[k] for k in headline},
        **({"calibration_run_in_sample": {k: comp_in_sample[0][k] for k in headline}}
           if len(comp_in_sample) == 1 else {}),
        **({"calibration_runs_in_sample": {Path(x).name: {k: c[k] for k in headline}
                                           for x, c in zip(cal_paths, comp_in_sample, strict=True)}}
           if len(comp_in_sample) > 1 else {}),
        "shipped_profile_power_mape": comp_shipped["power_mape"],
        "shipped_profile_temp_rmse_c": comp_shipped["temp_rmse_c"],
        "shipped_profile_throughput_error": comp_shipped["throughput_error"],
        "profile_fit_error_mape_pct": {k: v["mape_pct"] for k, v in doc["fit_error"].items()},
        "thermal": th,
    }
    if other_runs:
        summary["other_runs"] = {Path(x).name: {k: v for k, v in compare(x, prof, thermal).items()
                                                if k != "series"} for x in other_runs}
    if write_dir is not None:
        write_dir = Path(write_dir)
        (write_dir / f"{MODEL_NAME}_h100_tp1.json").write_text(json.dumps(doc, indent=1) + "\n")
        thermal_doc = {
            "description": "Two-node H100 thermal model fitted to the real-worker profile run",
            "source": thermal.source,
            "command": "llm-cluster calibrate fit --write",
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "params": th["params"],
            "thresholds": {"slowdown_temp_c": thermal.slowdown_temp_c,
                           "max_operating_temp_c": thermal.max_operating_temp_c,
                           "shutdown_temp_c": thermal.shutdown_temp_c,
                           "source": "envs/data/thermal/h100_thermal_fit.json (NVML thresholds)"},
        }
        (write_dir / "h100_thermal_fit_real_worker.json").write_text(
            json.dumps(thermal_doc, indent=1) + "\n")
        cal = {"summary": summary, "comparison": {k: v for k, v in comp.items() if k != "series"},
               "comparison_shipped_profile": {k: v for k, v in comp_shipped.items()
                                              if k != "series"},
               "recordings": [Path(x).name for x in (profile_path, *cal_paths, run_path)]}
        (write_dir / "calibration.json").write_text(json.dumps(cal, indent=1) + "\n")
        from llm_cluster_gym.envs.real.fidelity_plot import write_comparison_png

        fitted_to = ", ".join(Path(x).name for x in cal_paths) or Path(profile_path).name
        write_comparison_png(comp, f"{Path(run_path).name} replayed in the simulator "
                                   f"(fitted to {fitted_to})", write_dir / "fidelity.png")
    return {"summary": summary, "profile": doc, "thermal": th, "comparison": comp}
