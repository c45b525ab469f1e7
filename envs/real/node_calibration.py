"""A real node's calibration: the shape-based model (`envs.perf`) fitted to the node's recordings.

A lab node and a datacenter are one model. The datacenter's simulator derives its profiles from
`envs.perf` with coefficients fitted per GPU type on public vLLM runs
(``envs/data/perf/coefficients.json``); a real node is the same model, for the shape its worker
serves and its GPU, with the coefficients of *its own engine* refitted to what it recorded:

* the starting point is the GPU type's shipped coefficients (`calibration.load_coefficients`);
* `NODE_BOUNDS` are refitted: the GEMM and attention compute efficiencies, the memory-bandwidth
  efficiency of weights and activations, the KV-read efficiency of attention (``e_kv``: the
  worker's chunked split-K decode attention is far slower than vLLM's kernels), the fixed GPU time
  per layer, per scheduled sequence and per step (the worker's host work is serial, not overlapped:
  ``host_s`` is 0 and the step log's host time joins the decode iteration it precedes), and the
  power terms (busy, compute, memory); the idle power with the worker's context is measured (the
  profile recording's idle phases);
* the fit is `calibration.fit_coefficients`, the routine the public calibration uses (Huber
  weighted Levenberg-Marquardt on log errors), on the node's figures (`NodeObservations`):
  isolated prefill and decode timings and the sustained phases' power of the profile recording
  (``llm-cluster profile``); with served runs (``llm-cluster calibrate record``) instead of the
  isolated timings, their scheduler steps' prefill and decode time summed per second (the time the
  served engine spends, which sets its throughput) and the energy counter's power per second (each
  second is idle power plus every step in it at perf's predicted power for that step), with the
  sustained phases' power as an anchor. Each source has the same total weight.

`node_profile` turns the fitted coefficients into the simulator's `Profile` by
`shape_profiles.fit_profile_to_perf` (the derivation every shipped shape goes through) on grids
within the node's limits (its slots, context and KV cache). `write_node_coefficients` keeps the
coefficients with their provenance (command, date, recordings) in ``envs/data/real/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.perf.calibration import COEFFICIENTS_FILE, fit_coefficients, load_coefficients
from llm_cluster_gym.envs.perf.hardware import GpuSpec
from llm_cluster_gym.envs.perf.hardware import gpu as gpu_spec
from llm_cluster_gym.envs.perf.shapes import ModelShape, parse_config
from llm_cluster_gym.envs.perf.step import Coefficients, StepWork, step_time_power, step_work
from llm_cluster_gym.envs.real.fidelity import FidelityError, power_windows
from llm_cluster_gym.envs.real.telemetry import TelemetryRecording, load_recording
from llm_cluster_gym.envs.real.worker_config import SHAPES
from llm_cluster_gym.envs.real.worker_config import ModelShape as WorkerShape
from llm_cluster_gym.envs.sim.fitting import relative_error_stats
from llm_cluster_gym.envs.sim.profiles import Profile, serial_draw_w, serial_power_limit_w
from llm_cluster_gym.envs.sim.shape_profiles import decode_records, fit_profile_to_perf, prefill_records

NODE_COEFFICIENTS_FILE = Path(str(resources.files("llm_cluster_gym.envs") / "data" / "real"
                                  / "node_coefficients.json"))
"""The H100 node's fitted coefficients with their provenance (``llm-cluster calibrate fit --write``)."""

SCHEMA = "llm-cluster-gym/node-coefficients/1"

NODE_BOUNDS: tuple[tuple[str, float, float], ...] = (
    ("e_c", 0.1, 1.0),
    ("e_a", 0.01, 1.0),
    ("e_m", 0.1, 1.0),
    ("e_kv", 0.005, 1.0),
    ("tau_layer_s", 0.0, 1e-3),
    ("tau_seq_s", 0.0, 2e-5),
    ("step_s", 0.0, 5e-3),
    ("p_busy_w", 0.0, 600.0),
    ("p_fixed_w", 0.0, 600.0),
    ("p_compute_w", 0.0, 2500.0),
    ("p_memory_w", 0.0, 1500.0),
    ("serial_prefill_power_ratio", 0.2, 1.5),
)
"""The coefficients a node refits (name, lower, upper); the rest keep the GPU type's values (the
MoE, Mamba, all-reduce and quantization terms do not act on a dense BF16 model on one GPU)."""

PROFILE_PREFILL_TOKENS = (32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
PROFILE_DECODE_BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
PROFILE_DECODE_CTX_TOKENS = (128, 256, 512, 1024, 2048, 3072, 4096)
"""Grids of the node's simulator profile: within the worker's 64 slots of 4096 tokens."""

HOST_GAP_MAX_S = 1.0
"""Gaps between scheduler steps longer than this are pauses (no work), not host time."""


class NodeCalibrationError(FidelityError):
    """A recording lacks what the node fit needs (the message names file and field)."""


def perf_shape(shape: WorkerShape) -> ModelShape:
    """The worker's model shape as `envs.perf` reads one (a Hugging Face style config)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.d_model,
           "intermediate_size": shape.d_ffn, "num_hidden_layers": shape.n_layers,
           "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_kv_heads,
           "head_dim": shape.head_dim, "vocab_size": shape.vocab, "torch_dtype": "bfloat16"}
    return parse_config(cfg, name=shape.name)


def _worker_config(rec: TelemetryRecording) -> dict[str, Any]:
    return rec.static.get("config", {}).get("worker", {}) or {}


# ---------------------------------------------------------------------------------------------
# What the node recorded, as perf's step records with measured figures
# ---------------------------------------------------------------------------------------------


def _split_into_seconds(start_s: np.ndarray, dur_s: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
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


def served_steps(rec: TelemetryRecording) -> dict[str, np.ndarray]:
    """The scheduler-step log of a ``calibrate record`` recording, one array per column.

    Raises:
        NodeCalibrationError: The recording has no step log (made before it was recorded).
    """
    rows, cols = rec.extra.get("step_log"), rec.extra.get("step_columns")
    if not rows or not cols:
        raise NodeCalibrationError(f"{rec.path}: field 'step_log' is missing or empty (record the run "
                                   "again with llm-cluster calibrate record)")
    arr = np.asarray(rows, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != len(cols) or not np.all(np.isfinite(arr)):
        raise NodeCalibrationError(f"{rec.path}: field 'step_log' must be finite rows of {len(cols)} values")
    return {name: arr[:, i] for i, name in enumerate(cols)}


def host_s_per_step(steps: dict[str, np.ndarray]) -> float:
    """Mean host time per scheduler step: inside steps and between them (pauses left out)."""
    wall = steps["t_end_s"] - steps["t_start_s"]
    between = np.diff(steps["t_start_s"]) - wall[:-1]
    host = float(np.sum(wall - steps["prefill_s"] - steps["decode_s"])
                 + np.sum(between[between < HOST_GAP_MAX_S]))
    return host / len(wall)


@dataclass
class Source:
    """One source of measured figures: step records and, per figure, what is compared.

    ``kind`` is ``time`` (each record's measured seconds), ``power`` (each record's measured
    watts), ``clock`` (each record's SM clock under the power cap, MHz) or ``seconds`` (a served
    run's 1 s power: idle plus its steps' energy above idle).
    """

    name: str
    kind: str
    records: np.ndarray
    measured: np.ndarray
    extra_s: np.ndarray | None = None
    """``time``: seconds added to each prediction (the host time joined to a decode iteration)."""
    spread: np.ndarray | None = None
    """``seconds``: (n seconds x records) seconds of each record's run inside each second; ``time``
    (served runs): which records' times sum to each measured figure (the steps starting in a second)."""
    serial: np.ndarray | None = None
    """Per record, True for a prefill pass the served engine ran alone between decode iterations
    (`Coefficients.serial_prefill_power_ratio` sets its power and its clock under the limit)."""


def _profile_sources(rec: TelemetryRecording, shape: ModelShape) -> list[Source]:
    ex = rec.extra
    for key in ("prefill", "decode", "phases"):
        if key not in ex:
            raise NodeCalibrationError(f"{rec.path}: field '{key}' is missing (not a profile_gpu.py file)")
    pre, dec, phases = ex["prefill"], ex["decode"], ex["phases"]
    mix = ex.get("decode_mixed", {"batch": [], "mean_ctx_tokens": [], "time_s": []})
    tok = np.asarray(pre["tokens"], dtype=float)
    b = np.asarray(dec["batch"] + mix["batch"], dtype=float)
    c = np.asarray(dec["ctx_tokens"] + mix["mean_ctx_tokens"], dtype=float)
    pp = [p for p in phases if p["kind"] == "prefill"]
    dp = [p for p in phases if p["kind"] == "decode"]
    phase_rec = np.vstack([
        prefill_records(shape, np.asarray([p["load"] for p in pp], dtype=float)),
        decode_records(shape, np.asarray([p["load"] for p in dp], dtype=float),
                       np.asarray([p["ctx_tokens"] for p in dp], dtype=float)),
    ])
    return [
        Source("isolated_prefill_time", "time", prefill_records(shape, tok),
               np.asarray(pre["time_s"], float)),
        Source("isolated_decode_time", "time", decode_records(shape, b, c),
               np.asarray(dec["time_s"] + mix["time_s"], float)),
        Source("sustained_phase_power", "power", phase_rec,
               np.asarray([p["power_w"] for p in pp + dp], dtype=float)),
        *_capped_clock_source(pp, shape),
    ]


def _capped_clock_source(prefill_phases: list[dict[str, Any]], shape: ModelShape) -> list[Source]:
    """The SM clock the power controller held in sustained phases at the power cap, if any.

    Where a phase ran under ``sw_power_cap`` its median clock says how far the clock had to fall
    to fit the limit: how much power the work would draw uncapped, which the power readings
    (pinned at the limit) cannot say.
    """
    capped = [p for p in prefill_phases if "sw_power_cap" in p.get("throttle_reasons", [])
              and np.isfinite(p.get("sm_clock_mhz_median", np.nan))]
    if not capped:
        return []
    return [Source("capped_phase_clock", "clock",
                   prefill_records(shape, np.asarray([p["load"] for p in capped], dtype=float)),
                   np.asarray([p["sm_clock_mhz_median"] for p in capped], dtype=float))]


def _served_sources(recs: list[TelemetryRecording], shape: ModelShape) -> list[Source]:
    pre_rec, pre_t, dec_rec, dec_t, dec_host, pre_start, dec_start = [], [], [], [], [], [], []
    sec_rec, sec_p, spreads, n_pass = [], [], [], []
    for rec in recs:
        st = served_steps(rec)
        host = host_s_per_step(st)
        passes = st["prefill_passes"]
        has_pre = passes > 0
        per_pass = st["prefill_tokens"][has_pre] / passes[has_pre]  # one prompt length per pass: the mean
        r_pre = prefill_records(shape, per_pass)
        has_dec = st["decode_batch"] > 0
        b = st["decode_batch"][has_dec]
        r_dec = decode_records(shape, b, st["decode_ctx_tokens"][has_dec] / b)
        pre_rec.append(r_pre)
        pre_t.append(st["prefill_s"][has_pre] / passes[has_pre])
        dec_rec.append(r_dec)
        dec_t.append(st["decode_s"][has_dec])
        dec_host.append(np.full(int(has_dec.sum()), host))
        offset = 1e6 * len(pre_start)  # each run's seconds apart from the others'
        pre_start.append(offset + np.floor(st["t_start_s"][has_pre]))
        dec_start.append(offset + np.floor(st["t_start_s"][has_dec]))
        # 1 s power: each second holds parts of the steps' prefill passes and decode iterations
        t0 = float(rec.extra["t0_s"])
        duration = float(rec.static.get("config", {}).get("duration_s", 0.0)) or float(st["t_end_s"][-1])
        _, power, _ = power_windows(rec, t0, t0 + duration, 1.0)
        n = len(power)
        cols = []
        for i in np.flatnonzero(has_pre):
            cols.append(_split_into_seconds(st["t_start_s"][i:i + 1], st["prefill_s"][i:i + 1],
                                            np.ones(1), n))
        t_dec = st["t_start_s"] + st["prefill_s"]
        for i in np.flatnonzero(has_dec):
            cols.append(_split_into_seconds(t_dec[i:i + 1], st["decode_s"][i:i + 1], np.ones(1), n))
        sec_rec.append(np.vstack([r_pre, r_dec]))
        n_pass.append(len(r_pre))
        spreads.append(np.stack(cols, axis=1))
        sec_p.append(power)
    n_sec = sum(s.shape[0] for s in spreads)
    n_rec = sum(s.shape[1] for s in spreads)
    spread = np.zeros((n_sec, n_rec))
    i = j = 0
    for s in spreads:  # block diagonal: a run's seconds hold only its own steps
        spread[i:i + s.shape[0], j:j + s.shape[1]] = s
        i, j = i + s.shape[0], j + s.shape[1]
    pre_t_all, dec_t_all = np.concatenate(pre_t), np.concatenate(dec_t) + np.concatenate(dec_host)
    pre_sum, dec_sum = _per_second(pre_start), _per_second(dec_start)
    return [
        Source("served_prefill_time", "time", np.vstack(pre_rec), pre_sum @ pre_t_all, spread=pre_sum,
               serial=np.ones(len(pre_t_all), dtype=bool)),
        Source("served_decode_time", "time", np.vstack(dec_rec), dec_sum @ dec_t_all,
               extra_s=np.concatenate(dec_host), spread=dec_sum),
        Source("served_power_1s", "seconds", np.vstack(sec_rec), np.concatenate(sec_p), spread=spread,
               serial=np.concatenate([np.arange(len(r)) < n for r, n in zip(sec_rec, n_pass, strict=True)])),
    ]


def _per_second(starts: list[np.ndarray]) -> np.ndarray:
    """(seconds x steps) 0/1 matrix: which steps start in each second (of a run) that has any.

    Served times are compared per second, summed: the fit then matches the time the engine spends
    (what sets its throughput), not the median step, and a long eager prompt weighs its duration.
    """
    sec = np.concatenate(starts)
    keys, idx = np.unique(sec, return_inverse=True)
    out = np.zeros((keys.size, sec.size))
    out[np.ravel(idx), np.arange(sec.size)] = 1.0
    return out


@dataclass
class NodeObservations:
    """Everything the node fit compares: its sources, the GPU, the shape and the idle power."""

    shape: ModelShape
    gpu: GpuSpec
    idle_w: float
    sources: list[Source]
    recordings: list[dict[str, Any]] = field(default_factory=list)
    _work: StepWork | None = field(default=None, repr=False)
    _inverse: np.ndarray | None = field(default=None, repr=False)

    def predict(self, c: Coefficients) -> list[np.ndarray]:
        """The shape-based model's figures for each source (seconds or watts) with coefficients ``c``."""
        if self._work is None:  # the steps' work does not depend on the coefficients: one pass for all
            recs = np.vstack([s.records for s in self.sources])
            rows, inverse = np.unique(recs, axis=0, return_inverse=True)
            self._inverse = np.ravel(inverse)
            self._work = step_work(self.shape, 1, self.gpu, rows)
        step_s, power_w, clock_mhz = self._steps(c)
        serial = None
        if c.serial_prefill_power_ratio != 1.0 and any(s.serial is not None for s in self.sources):
            serial = self._steps(c, serial=True)
        out, i = [], 0
        for s in self.sources:
            n = len(s.records)
            t, p, f = step_s[i:i + n], power_w[i:i + n], clock_mhz[i:i + n]
            if serial is not None and s.serial is not None:
                m = s.serial
                t, p, f = (np.where(m, x[i:i + n], y) for x, y in zip(serial, (t, p, f), strict=True))
            i += n
            if s.kind == "time":
                t = t + (0.0 if s.extra_s is None else s.extra_s)
                out.append(t if s.spread is None else s.spread @ t)
            elif s.kind == "power":
                out.append(p)
            elif s.kind == "clock":
                out.append(f)
            else:  # each second: idle plus the energy above idle of the steps in it
                out.append(self.idle_w + s.spread @ (p - self.idle_w))
        return out

    def _steps(self, c: Coefficients, serial: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every record's (seconds, watts, SM clock MHz) as a sustained step, or as a serial pass.

        A serial pass draws ``ratio`` of the sustained power above idle, and the clock falls only
        where that (not the sustained draw) exceeds the power limit: the limit applies to the
        steps' power as the pass draws it.
        """
        gpu = self.gpu
        ratio = c.serial_prefill_power_ratio if serial else 1.0
        idle = gpu.idle_power_with_context_w if c.idle_w is None else c.idle_w
        if serial:
            gpu = replace(gpu, power_limit_w=float(serial_power_limit_w(idle, gpu.power_limit_w, ratio)))
        res = step_time_power(self._work, gpu, c)
        p = serial_draw_w(idle, res.power_w, ratio)
        return (res.step_s[self._inverse], p[self._inverse],
                res.clock_ratio[self._inverse] * gpu.max_sm_clock_mhz)

    def residuals(self, c: Coefficients) -> np.ndarray:
        """Log errors (predicted / measured) of every figure, source after source."""
        return np.concatenate([np.log(p / s.measured) for p, s in zip(self.predict(c), self.sources,
                                                                           strict=True)])

    def row_weights(self) -> np.ndarray:
        """Each source weighs as much as any other, however many figures it has."""
        return np.concatenate([np.full(len(s.measured), 1.0 / len(s.measured)) for s in self.sources])

    def errors(self, c: Coefficients) -> dict[str, dict[str, float]]:
        """MAPE and max |error| (percent) of each source with coefficients ``c``."""
        return {s.name: relative_error_stats(p, s.measured)
                for p, s in zip(self.predict(c), self.sources, strict=True)}


def _recording_note(path: str | Path, rec: TelemetryRecording) -> dict[str, Any]:
    st = rec.static
    return {"recording": Path(path).name, "command": st.get("command"), "date_utc": st.get("date_utc"),
            "gpu": st.get("name"), "serial": st.get("serial"), "driver": st.get("driver")}


def node_observations(profile_path: str | Path, served_paths: tuple[str | Path, ...] = (),
                      gpu: str = "h100") -> NodeObservations:
    """The node's figures from its profile recording and served runs (none: isolated sweeps only).

    Raises:
        NodeCalibrationError: A recording lacks a field the fit needs.
    """
    prec = load_recording(profile_path)
    idle = [p["power_w"] for p in prec.extra.get("phases", []) if p["kind"] == "idle"]
    if not idle:
        raise NodeCalibrationError(f"{prec.path}: field 'phases' has no idle phase (idle power)")
    model = _worker_config(prec).get("model") or "llama3-8b"
    shape = perf_shape(SHAPES[model] if model in SHAPES else SHAPES["llama3-8b"])
    spec = gpu_spec(gpu)
    limit = prec.static.get("power_limit_w")
    if limit:
        spec = GpuSpec(**{**spec.__dict__, "power_limit_w": float(limit)})
    recs = [load_recording(p) for p in served_paths]
    sources = _profile_sources(prec, shape)
    if recs:  # the served engine's steps set the times; the sustained phases stay as power and clock anchors
        sources = [s for s in sources if s.kind in ("power", "clock")] + _served_sources(recs, shape)
    notes = [_recording_note(profile_path, prec)] + [_recording_note(p, r)
                                                     for p, r in zip(served_paths, recs, strict=True)]
    return NodeObservations(shape, spec, float(np.median(idle)), sources, notes)


# ---------------------------------------------------------------------------------------------
# The fit and the node's profile
# ---------------------------------------------------------------------------------------------


@dataclass
class NodeFit:
    """A node's fitted coefficients, their errors per source and where they come from."""

    coefficients: Coefficients
    gpu: str
    shape: ModelShape
    fit_error: dict[str, dict[str, float]]
    start_error: dict[str, dict[str, float]]
    recordings: list[dict[str, Any]]
    kv_capacity_tokens: int
    load_time_s: float
    decode_ctx_tokens: tuple[int, ...] = PROFILE_DECODE_CTX_TOKENS
    """Mean contexts of the profile's decode grid (`served_contexts`)."""

    def profile(self, model: str = "llama3-8b-real") -> Profile:
        """The node's simulator profile (`node_profile`)."""
        return node_profile(self, model)


def fit_node(profile_path: str | Path, served_paths: tuple[str | Path, ...] = (), gpu: str = "h100",
             iterations: int = 60) -> NodeFit:
    """Fit perf's coefficients to a node's recordings, starting from the GPU type's shipped ones.

    Args:
        profile_path: ``llm-cluster profile`` recording (idle power, isolated sweeps, sustained phases).
        served_paths: ``llm-cluster calibrate record`` recordings (other trace windows), pooled.
        gpu: The node's GPU type (``envs/data/gpus.json``).
        iterations: Maximum Levenberg-Marquardt iterations.

    Raises:
        NodeCalibrationError: A recording lacks a field the fit needs.
    """
    obs = node_observations(profile_path, tuple(served_paths), gpu)
    start = Coefficients(**{**load_coefficients()[gpu].to_dict(), "idle_w": obs.idle_w, "host_s": 0.0,
                            "host_per_seq_s": 0.0})
    c = fit_coefficients(obs.residuals, NODE_BOUNDS, start, iterations=iterations,
                         row_weights=obs.row_weights())
    prec = load_recording(profile_path)
    wcfg = _worker_config(prec)
    slots, ctx = int(wcfg.get("max_slots", 64)), int(wcfg.get("max_ctx", 4096))
    build = next((m["t1"] - m["t0"] for m in prec.extra.get("marks", []) if m["phase"] == "build"), None)
    return NodeFit(c, gpu, obs.shape, obs.errors(c), obs.errors(start), obs.recordings, slots * ctx,
                   round(float(build), 2) if build is not None else 6.79,
                   served_contexts([load_recording(p) for p in served_paths]))


def served_contexts(recs: list[TelemetryRecording]) -> tuple[int, ...]:
    """Decode-grid contexts where the node serves: deciles 10-90 of its served steps' mean context.

    The profile's decode power follows the context through one coefficient
    (`Profile.decode_power_load`), perf's through the KV traffic of each step; fitted on the node's
    own contexts, the profile follows perf where the node runs. Without served runs:
    `PROFILE_DECODE_CTX_TOKENS`.
    """
    if not recs:
        return PROFILE_DECODE_CTX_TOKENS
    ctx = []
    for rec in recs:
        st = served_steps(rec)
        dec = st["decode_batch"] > 0
        ctx.append(st["decode_ctx_tokens"][dec] / st["decode_batch"][dec])
    q = np.percentile(np.concatenate(ctx), np.arange(10, 100, 10))
    return tuple(int(x) for x in np.unique(np.round(q / 16.0) * 16))


def node_profile(fit: NodeFit, model: str = "llama3-8b-real") -> Profile:
    """The simulator profile of a fitted node: `fit_profile_to_perf` on the node's grids."""
    spec = gpu_spec(fit.gpu)
    source = (f"derived from envs/perf with the node's own coefficients (envs/real/node_calibration.py, "
              f"fitted on {', '.join(r['recording'] for r in fit.recordings)}) by "
              f"shape_profiles.fit_profile_to_perf; GPU envs/data/gpus.json {fit.gpu}")
    prof = fit_profile_to_perf(
        fit.shape, spec, 1, fit.coefficients, model=model, kv_tokens=fit.kv_capacity_tokens,
        load_time_s=fit.load_time_s, source=source, prefill_tokens=PROFILE_PREFILL_TOKENS,
        decode_batch=PROFILE_DECODE_BATCH, decode_ctx_tokens=fit.decode_ctx_tokens,
    )
    # The surrogate follows perf's sustained steps; the worker's serial passes draw their own share.
    return replace(prof, prefill_serial_power_ratio=fit.coefficients.serial_prefill_power_ratio)


def node_document(fit: NodeFit, command: str) -> dict[str, Any]:
    """The fitted coefficients with their provenance, as ``node_coefficients.json`` holds them."""
    return {
        "schema": SCHEMA,
        "built_by": command,
        "built_on": datetime.now(timezone.utc).date().isoformat(),
        "model": "envs/perf (step_work, step_time_power); the fit: envs/real/node_calibration.py fit_node "
                 "with envs/perf/calibration.py fit_coefficients",
        "gpu": fit.gpu,
        "shape": {"name": fit.shape.name, "n_layers": fit.shape.n_layers, "hidden": fit.shape.hidden,
                  "n_heads": fit.shape.n_heads, "n_kv_heads": fit.shape.n_kv_heads,
                  "head_dim": fit.shape.head_dim, "vocab": fit.shape.vocab,
                  "source": "envs/real/worker_config.py SHAPES (meta-llama/Meta-Llama-3-8B config.json)"},
        "engine": "envs/real/worker.py: one prompt per prefill pass (CUDA graphs up to 2048 tokens), "
                  "chunked split-K decode attention, static KV cache, host work serial",
        "start": f"{Path(COEFFICIENTS_FILE).name} gpus.{fit.gpu}",
        "fitted": [name for name, _, _ in NODE_BOUNDS],
        "fixed": {"idle_w": "median of the profile recording's idle phases (worker context alive)",
                  "host_s": "0: the worker's host work is serial; the step log's host time per step "
                            "joins the decode iteration (served_decode_time)",
                  "host_per_seq_s": "0 (as host_s)"},
        "coefficients": fit.coefficients.to_dict(),
        "kv_capacity_tokens": fit.kv_capacity_tokens,
        "load_time_s": fit.load_time_s,
        "profile_decode_ctx_tokens": list(fit.decode_ctx_tokens),
        "recordings": fit.recordings,
        "fit_error_pct": fit.fit_error,
        "start_error_pct": fit.start_error,
    }


def write_node_coefficients(fit: NodeFit, path: Path = NODE_COEFFICIENTS_FILE,
                            command: str = "llm-cluster calibrate fit --write") -> Path:
    """Write `node_document` to ``path``."""
    Path(path).write_text(json.dumps(node_document(fit, command), indent=1) + "\n")
    return Path(path)


def profile_document(fit: NodeFit, profile: Profile, profile_path: str | Path,
                     node_file: str = "envs/data/real/node_coefficients.json") -> dict[str, Any]:
    """The node's profile in the simulator's JSON schema (``envs/data/profiles``), as `RealCluster` reads it.

    Its grids are the profile recording's measured points; its fit errors are the profile's (the
    simulator's formulas with the derived coefficients) against them, at the clocks measured (prefill
    power: at the power limit, as the GPU ran).
    """
    ex = load_recording(profile_path).extra
    pre, dec, phases = ex["prefill"], ex["decode"], ex["phases"]
    mix = ex.get("decode_mixed", {"batch": [], "mean_ctx_tokens": [], "time_s": []})
    fmax = profile.max_freq_mhz
    tok = np.asarray(pre["tokens"], float)
    f_pre = np.where(np.isfinite(np.asarray(pre["sm_clock_mhz"], float)), pre["sm_clock_mhz"], fmax)
    b = np.asarray(dec["batch"] + mix["batch"], float)
    c = np.asarray(dec["ctx_tokens"] + mix["mean_ctx_tokens"], float)
    t_dec = np.asarray(dec["time_s"] + mix["time_s"], float)
    pp = [p for p in phases if p["kind"] == "prefill"]
    dp = [p for p in phases if p["kind"] == "decode"]
    pl = np.asarray([p["load"] for p in pp], float)
    pf = np.asarray([p["sm_clock_mhz_median"] for p in pp], float)
    dl = np.asarray([p["load"] for p in dp], float)
    dc = np.asarray([p["ctx_tokens"] for p in dp], float)  # each phase's context
    pre_pw = np.minimum(profile.prefill_power_w(pl, profile.prefill_freq_at_limit_mhz(pl)),
                        profile.gpu_power_limit_w)
    doc: dict[str, Any] = {
        "schema_version": 1, "model": profile.model, "gpu": profile.gpu, "tp": profile.tp,
        "provenance": {
            "sources": [{"derived_from": node_file,
                         "used_for": "every coefficient: the shape-based model (envs/perf) with the node's "
                                     "own coefficients, fitted to " + ", ".join(
                                         r["recording"] for r in fit.recordings)}],
            "built_by": "llm-cluster calibrate fit --write (envs/real/node_calibration.py profile_document)",
            "built_on": datetime.now(timezone.utc).date().isoformat(),
            "source": profile.source,
        },
        "model_shape": {"n_params": profile.n_params, "n_layers": profile.n_layers,
                        "d_model": profile.d_model, "n_kv_heads": profile.n_kv_heads,
                        "head_dim": profile.head_dim},
        "coefficients": {k: getattr(profile, k) for k in (
            "prefill_p0_s", "prefill_p1_s_per_token", "prefill_p2_s_per_token2", "prefill_phi",
            "decode_d0_s", "decode_d1_s_per_seq", "decode_d2_s_per_seq_token", "decode_phi",
            "idle_power_w", "prefill_max_power_w", "prefill_k_tokens", "decode_max_power_w",
            "decode_k_batch", "power_freq_exponent", "gpu_power_limit_w", "kv_capacity_tokens",
            "load_time_s", "min_freq_mhz", "max_freq_mhz", "weights_gb", "prefill_busy_power_w",
            "decode_busy_power_w", "decode_power_ctx_per_ktok", "prefill_serial_power_ratio")},
        "grids": {
            "prefill": {"tokens": tok.tolist(), "time_s_measured": list(pre["time_s"]),
                        "freq_mhz": f_pre.tolist(), "time_s_at_max_freq": list(pre["time_s"]),
                        "note": "profile_gpu.py sweep (median of 5), at the clocks measured"},
            "decode": {"batch": b.tolist(), "ctx_tokens": c.tolist(), "time_s": t_dec.tolist()},
            "prefill_power": {"tokens": pl.tolist(), "freq_mhz": pf.tolist(),
                              "power_w": [p["power_w"] for p in pp]},
            "decode_power": {"batch": dl.tolist(), "power_w": [p["power_w"] for p in dp],
                             "ctx_tokens": [p.get("ctx_tokens") for p in dp]},
        },
        "fit_error": {
            "prefill_time": relative_error_stats(profile.prefill_time_s(tok, f_pre),
                                                 np.asarray(pre["time_s"], float)),
            "decode_time": relative_error_stats(profile.decode_iter_time_s(b, c, fmax), t_dec),
            "prefill_power": relative_error_stats(pre_pw, np.asarray([p["power_w"] for p in pp], float)),
            "decode_power": relative_error_stats(profile.decode_power_w(dl, fmax, dc),
                                                 np.asarray([p["power_w"] for p in dp], float)),
            "node_fit": fit.fit_error,
            "surrogate_vs_perf": dict(profile.fit_error),
        },
    }
    return doc


def load_node_fit(path: Path = NODE_COEFFICIENTS_FILE) -> NodeFit:
    """A node fit from its data file (the coefficients as fitted; no recording is read)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise NodeCalibrationError(f"{path}: field 'schema' must be {SCHEMA!r}, got {doc.get('schema')!r}")
    shape = perf_shape(SHAPES[doc["shape"]["name"]])
    return NodeFit(Coefficients.from_dict(doc["coefficients"]), doc["gpu"], shape, doc["fit_error_pct"],
                   doc["start_error_pct"], doc["recordings"], int(doc["kv_capacity_tokens"]),
                   float(doc["load_time_s"]), tuple(int(x) for x in doc["profile_decode_ctx_tokens"]))


__all__ = ["NODE_BOUNDS", "NODE_COEFFICIENTS_FILE", "NodeCalibrationError", "NodeFit", "NodeObservations",
           "fit_node", "load_node_fit", "node_document", "node_observations",
           "node_profile", "perf_shape", "profile_document", "served_steps", "write_node_coefficients"]
