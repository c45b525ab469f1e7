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
the same batch-cap schedule, in ``SimCluster`` (one GPU, 0.25 s ticks, request-level serving with
the worker's serial prefill: ``serving.prefill_mode: serial``) using those fits, and
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

import itertools
import json
import math
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig
from llm_cluster_gym.envs.latency import empty_histogram, histogram_percentile, latency_histogram
from llm_cluster_gym.envs.real.telemetry import TelemetryRecording, load_recording
from llm_cluster_gym.envs.sim.profiles import (
    Profile,
    ProfileLibrary,
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
# Profile documents
# ---------------------------------------------------------------------------------------------


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
            max_prefill_tokens=max_prefill_tokens, drop_after_s=drop_after_s,
            # The worker runs one prompt per pass, decoding stalled (envs/real/engine.py).
            prefill_mode="serial"),
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
        ``finished``, per-interval lists of TTFT/TBT P50, and the whole replay's TTFT and
        TBT histograms (``ttft_hist``, ``tbt_hist``: `envs.latency` bins).
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
    ttft_hist, tbt_hist = empty_histogram(), empty_histogram()
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
        ttft_hist += m.ttft_hist
        tbt_hist += m.tbt_hist
    res = {k: np.array(v, dtype=float) for k, v in out.items()}
    res["ttft_hist"], res["tbt_hist"] = ttft_hist, tbt_hist
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
    latency = _latency_errors(req[ok, cols.index("ttft_s")], req[ok, cols.index("tbt_s")], sim)
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
        **latency,
        "inlet_offset_c": round(inlet_c, 3),
        "n_power_windows": int(m),
        "tokens_interval_s": width,
        "series": {"real_power_w": real_p.tolist(), "sim_power_w": sim_p.tolist(),
                   "real_temp_c": real_t.tolist(), "sim_temp_c": sim_t.tolist(),
                   "real_tokens": real_tok.tolist(), "sim_tokens": sim_tok.tolist()},
    }


LATENCY_QUANTILES = (50, 90)
"""Percentiles of TTFT and TBT the replay is compared at (`_latency_errors`)."""


def _latency_keys(name: str, q: int) -> tuple[str, str, str]:
    """The real (binned), simulated and error keys of one latency percentile."""
    return f"real_{name}_p{q}_binned_s", f"sim_{name}_p{q}_s", f"{name}_p{q}_error"


LATENCY_SUMMARY_KEYS = ("real_ttft_p50_s", "real_tbt_p50_s") + tuple(
    key for name in ("ttft", "tbt") for q in LATENCY_QUANTILES for key in _latency_keys(name, q))
"""The comparison's latency figures the summary reports, in their order."""


def _latency_errors(real_ttft_s: np.ndarray, real_tbt_s: np.ndarray,
                    sim: dict[str, np.ndarray]) -> dict[str, float]:
    """TTFT and TBT percentiles (P50, P90) of the replay against the real run's, and their errors.

    Both sides are read from the same latency bins (`envs.latency`: the simulator reports
    histograms), so the bins' interpolation (within 12%) is the same on both and does not count
    as error. Each figure's own relative error is reported; none is combined with another.
    """
    out: dict[str, float] = {}
    for name, real_v, sim_h in (("ttft", real_ttft_s, sim["ttft_hist"]),
                                ("tbt", real_tbt_s, sim["tbt_hist"])):
        real_h = latency_histogram(real_v)
        for q in LATENCY_QUANTILES:
            r, m = histogram_percentile(real_h, q), histogram_percentile(sim_h, q)
            real_key, sim_key, error_key = _latency_keys(name, q)
            out[real_key] = round(r, 5)
            out[sim_key] = round(m, 5)
            out[error_key] = round(abs(m - r) / r, 4)
    return out


def calibrate_and_compare(profile_path: str | Path, run_path: str | Path,
                          calibration_path: str | Path | tuple[str | Path, ...] | None = None,
                          write_dir: Path | None = None,
                          other_runs: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Fit the node's shape-based model and the thermal model, replay the run, report the gaps.

    The node's profile is the shape-based model (`envs.perf`) for the worker's shape on its GPU,
    with the node's own coefficients fitted to its recordings by the shape model's calibration
    routine (`envs.real.node_calibration.fit_node`), turned into the simulator's profile by the
    derivation every shipped shape goes through (`shape_profiles.fit_profile_to_perf`).

    Args:
        profile_path: ``profile_gpu.py`` recording.
        run_path: ``calibrate.py record`` recording of the test window (only the thermal
            model's inlet offset is fitted to it).
        calibration_path: Another served recording (a different trace window) the node's
            coefficients are fitted to, or several (pooled); None: the isolated sweeps alone.
        write_dir: Where to write ``node_coefficients.json``, the node's profile,
            ``calibration.json`` and the picture (None: don't).
        other_runs: More served recordings judged with the same fit (e.g. another GPU), in
            the summary under ``other_runs`` by file name.

    Returns:
        ``{"summary": {...}, "profile": doc, "thermal": {...}, "comparison": {...}, "node": fit}``.
    """
    from llm_cluster_gym.envs.real.node_calibration import (
        fit_node,
        profile_document,
        write_node_coefficients,
    )

    cal_paths = ([] if calibration_path is None else [calibration_path]
                 if isinstance(calibration_path, (str, Path)) else list(calibration_path))
    node = fit_node(profile_path, tuple(cal_paths))
    prof = node.profile(MODEL_NAME)
    doc = profile_document(node, prof, profile_path)
    sweep_node = fit_node(profile_path) if cal_paths else node
    prec = load_recording(profile_path)
    t = prec.column("t_s")
    _, pw, tt = power_windows(prec, float(t[0]), float(t[-1]), WINDOW_S)
    thermal, off, rmse_fit = fit_thermal(pw, tt)
    run = load_recording(run_path)
    rpw, rtt, first = history_windows(run, float(run.column("t_s")[-1]))
    rmse_run_fitted, _ = thermal_rmse(thermal, rpw, rtt, score_from=first)
    rmse_run_shipped, _ = thermal_rmse(ThermalParams.load(), rpw, rtt, score_from=first)
    comp = compare(run_path, prof, thermal)
    comp_sweep = comp if not cal_paths else compare(run_path, sweep_node.profile(MODEL_NAME), thermal)
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
    latency = ("ttft_p50_error", "ttft_p90_error", "tbt_p50_error", "tbt_p90_error")
    summary = {
        "power_mape": comp["power_mape"],
        "temp_rmse_c": comp["temp_rmse_c"],
        "throughput_error": comp["throughput_error"],
        "power_mape_5s": comp["power_mape_5s"],
        "throughput_interval_mape": comp["throughput_interval_mape"],
        "finished_error": comp["finished_error"],
        "energy_error": comp["energy_error"],
        "latency": {k: comp[k] for k in LATENCY_SUMMARY_KEYS},
        "thermal_history_s": round(pre_history_s(run), 1),
        "temp_rmse_c_steady_start": comp_steady["temp_rmse_c"],
        "isolated_sweep_profile": {k: comp_sweep[k] for k in headline},
        **({"calibration_run_in_sample": {k: comp_in_sample[0][k] for k in headline + latency}}
           if len(comp_in_sample) == 1 else {}),
        **({"calibration_runs_in_sample": {Path(x).name: {k: c[k] for k in headline + latency}
                                           for x, c in zip(cal_paths, comp_in_sample, strict=True)}}
           if len(comp_in_sample) > 1 else {}),
        "shipped_profile_power_mape": comp_shipped["power_mape"],
        "shipped_profile_temp_rmse_c": comp_shipped["temp_rmse_c"],
        "shipped_profile_throughput_error": comp_shipped["throughput_error"],
        "node_fit_error_mape_pct": {k: v["mape_pct"] for k, v in node.fit_error.items()},
        "profile_fit_error_mape_pct": {k: doc["fit_error"][k]["mape_pct"]
                                       for k in ("prefill_time", "decode_time", "prefill_power",
                                                 "decode_power")},
        "node_coefficients": {k: v for k, v in node.coefficients.to_dict().items() if v is not None},
        "thermal": th,
    }
    if other_runs:
        summary["other_runs"] = {Path(x).name: {k: v for k, v in compare(x, prof, thermal).items()
                                                if k != "series"} for x in other_runs}
    if write_dir is not None:
        write_dir = Path(write_dir)
        write_node_coefficients(node, write_dir / "node_coefficients.json")
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
    return {"summary": summary, "profile": doc, "thermal": th, "comparison": comp, "node": node}
