"""Calibration of the per-GPU coefficients on ML.ENERGY's published vLLM runs, and its checks.

Data: ``envs/data/ml_energy/v3_llm_runs.json`` (ML.ENERGY Benchmark v3, vLLM 0.11.1 on H100 and
B200, every LLM text-task configuration) and ``v2_llama31_h100_chat.json`` (the 2024 leaderboard,
an older vLLM). Each run is turned into a closed-loop configuration (`RunSetup`): the shipped
model shape, the GPU, the GPUs of the instance, ``max_num_seqs``, the run's own output-length
histogram and a prompt length per task (`TASK_INPUT_TOKENS`, an assumption: the published files
give no prompt lengths). Runs the model cannot represent are listed with the reason
(`RunSetup.unsupported`): data-parallel attention, and models whose shape is not shipped.

`fit` finds one `Coefficients` per GPU type (not per model) by Levenberg-Marquardt on the log
errors of three measured figures per run, median ITL, average power and output throughput
(energy per token is power / throughput, so it is not counted twice), with Huber weights so that
a few runs the physics cannot explain do not steer the fit. `evaluate` reports, per run and
metric, predicted vs measured, in sample and leave-one-model-out (each model family, both
precisions of one architecture together, refitted without it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.perf.hardware import GpuSpec, load_gpus
from llm_cluster_gym.envs.perf.scheduler import Benchmark, CapacityError, Workload
from llm_cluster_gym.envs.perf.serving import TimedTrace, prepare
from llm_cluster_gym.envs.perf.shapes import ModelShape, load_shipped
from llm_cluster_gym.envs.perf.step import Coefficients, StepWork, stack_work, step_time_power

DATA_DIR = Path(str(resources.files("llm_cluster_gym.envs") / "data"))
V3_FILE = DATA_DIR / "ml_energy" / "v3_llm_runs.json"
V2_FILE = DATA_DIR / "ml_energy" / "v2_llama31_h100_chat.json"
COEFFICIENTS_FILE = DATA_DIR / "perf" / "coefficients.json"

MODEL_SHAPES: dict[str, str] = {
    "Qwen/Qwen3-8B": "qwen3-8b",
    "Qwen/Qwen3-14B": "qwen3-14b",
    "Qwen/Qwen3-32B": "qwen3-32b",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "qwen3-30b-a3b",
    "Qwen/Qwen3-30B-A3B-Thinking-2507": "qwen3-30b-a3b",
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": "qwen3-30b-a3b",
    "Qwen/Qwen3-235B-A22B-Instruct-2507": "qwen3-235b-a22b",
    "Qwen/Qwen3-235B-A22B-Thinking-2507": "qwen3-235b-a22b",
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8": "qwen3-235b-a22b-fp8",
    "Qwen/Qwen3-235B-A22B-Thinking-2507-FP8": "qwen3-235b-a22b-fp8",
    "Qwen/Qwen3-Coder-480B-A35B-Instruct": "qwen3-coder-480b-a35b",
    "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8": "qwen3-coder-480b-a35b-fp8",
    "google/gemma-3-12b-it": "gemma-3-12b-it",
    "google/gemma-3-27b-it": "gemma-3-27b-it",
    "nvidia/NVIDIA-Nemotron-Nano-9B-v2": "nemotron-nano-9b-v2",
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2": "nemotron-nano-12b-v2",
    "openai/gpt-oss-20b": "gpt-oss-20b",
    "openai/gpt-oss-120b": "gpt-oss-120b",
    "meta-llama/Llama-3.1-405B-Instruct": "llama-3.1-405b-instruct",
    "meta-llama/Llama-3.1-405B-Instruct-FP8": "llama-3.1-405b-instruct-fp8",
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": "llama-4-scout-17b-16e",
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8": "llama-4-maverick-17b-128e-fp8",
    "deepseek-ai/DeepSeek-V3.1": "deepseek-v3.1",
    "deepseek-ai/DeepSeek-R1-0528": "deepseek-v3.1",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b-instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b-instruct",
}
"""Published model id -> shipped shape (``envs/data/models``)."""

TASK_INPUT_TOKENS: dict[str, int] = {"lm-arena-chat": 250, "gpqa": 300, "sourcegraph-fim": 1500, "chat": 250}
"""ASSUMED mean prompt length per task (tokens, chat template included); the runs do not publish
them. lm-arena-chat: first turns of LMArena human-preference conversations; gpqa: a GPQA question
with its four choices; sourcegraph-fim: a fill-in-the-middle prompt (prefix, suffix and context);
chat (v2): ShareGPT-like first turns. Fixed before calibration, never fitted."""

ML_ENERGY_MEMORY_UTILIZATION = 0.95
"""``--gpu-memory-utilization`` the ML.ENERGY benchmark starts vLLM with (``spawn_vllm``)."""


def ml_energy_num_requests(task: str, max_num_seqs: int) -> int:
    """Requests of one ML.ENERGY run: the task's count times its repeats at that ``max_num_seqs``.

    From ml-energy/benchmark ``configs/vllm/{task}/benchmark.yaml`` (lm-arena-chat and
    sourcegraph-fim: 1,024 requests; gpqa: 198) and the repeat schedules of its sweep files (gpqa's
    defaults: x2 from 192, x3 at 384, x4 at 512; lm-arena-chat Qwen3-8B on B200: x2 from 256, x4
    from 1,024, x6 at 2,048). ASSUMPTION: that schedule for every model, extended beyond the
    published points (x ceil(max_num_seqs / 341) and x ceil(max_num_seqs / 128)); v2 runs and the
    sweep files not read may differ.
    """
    b = max_num_seqs
    if task == "gpqa":
        reps = 1 if b <= 128 else 2 if b <= 256 else 3 if b <= 384 else 4 if b <= 512 else -(-b // 128)
        return 198 * reps
    reps = 1 if b <= 128 else 2 if b <= 512 else 4 if b <= 1536 else 6 if b <= 2048 else -(-b // 341)
    return 1024 * reps


METRICS = ("energy_per_token", "power", "itl", "throughput")
"""The compared figures (relative errors pred / measured - 1)."""

FIT_METRICS = ("itl", "power", "throughput")

_PARAMS: tuple[tuple[str, float, float], ...] = (
    ("e_c", 0.1, 1.0),
    ("e_e", 0.05, 1.0),
    ("e_a", 0.01, 1.0),
    ("e_m", 0.3, 1.0),
    ("e_s", 0.02, 1.0),
    ("tau_layer_s", 0.0, 300e-6),
    ("tau_moe_s", 0.0, 500e-6),
    ("tau_seq_s", 0.0, 5e-6),
    ("host_s", 1e-4, 20e-3),
    ("host_per_seq_s", 0.0, 60e-6),
    ("comm_scale", 0.05, 3.0),
    ("comm_latency_scale", 0.02, 3.0),
    ("p_busy_w", 0.0, 600.0),
    ("p_compute_w", 0.0, 2500.0),
    ("p_memory_w", 0.0, 1500.0),
    ("p_comm_w", 0.0, 600.0),
    ("p_quant_w", 0.0, 1500.0),
)
_IDLE_BOUNDS = (100.0, 400.0)
FD_STEP = 0.02
"""Finite-difference step of the Jacobian (logit-scaled parameters)."""
MAX_STEP = 1.0
"""Largest change of any (logit-scaled) parameter in one Levenberg-Marquardt step."""
HUBER_K = 0.15
"""Huber threshold on the log error: runs off by more than ~15% weigh linearly, not quadratically."""


def family(shape_name: str) -> str:
    """The model family of a shape (both precisions of one architecture together)."""
    return shape_name.removesuffix("-fp8")


@dataclass
class RunSetup:
    """One published run as a closed-loop configuration, or the reason it is not supported."""

    row: dict[str, Any]
    source: str
    shape_name: str | None
    gpu_key: str
    n_gpus: int
    max_num_seqs: int
    workload: Workload | None
    unsupported: str | None = None
    fit_excluded: str | None = None
    benchmark: Benchmark | None = None
    trace: TimedTrace | None = field(default=None, repr=False)

    @property
    def family(self) -> str:
        """Model family (leave-one-model-out group)."""
        return family(self.shape_name or self.row["model_id"])

    def measured(self) -> dict[str, float]:
        """The measured figures (energy J/token, power W for all GPUs, ITL ms, tokens/s)."""
        r = self.row
        if self.source == "v2":
            return {
                "energy_per_token": r["energy_per_token_joules"],
                "power": r["avg_power_watts_derived"],
                "itl": r["avg_tpot_s"] * 1e3,
                "throughput": r["output_throughput_tokens_per_sec"],
                "batch": r["avg_batch_size"],
            }
        return {
            "energy_per_token": r["energy_per_token_joules"],
            "power": r["avg_power_watts"],
            "itl": r["median_itl_ms"],
            "throughput": r["output_throughput_tokens_per_sec"],
            "batch": r["avg_batch_size"],
        }

    @property
    def label(self) -> str:
        """Short description of the configuration."""
        r = self.row
        return f"{r['model_id'].split('/')[-1]} {r['task']} {r['gpu']} x{self.n_gpus} mns{self.max_num_seqs}"


def _v3_setup(row: dict[str, Any]) -> RunSetup:
    shape = MODEL_SHAPES.get(row["model_id"])
    gpu_key = row["gpu"].lower()
    wl = Workload.from_histogram(
        TASK_INPUT_TOKENS[row["task"]], row["output_length_bins"], row["output_length_counts"]
    )
    setup = RunSetup(
        row,
        "v3",
        shape,
        gpu_key,
        int(row["num_gpus"]),
        int(row["max_num_seqs"]),
        wl,
        benchmark=Benchmark(ml_energy_num_requests(row["task"], int(row["max_num_seqs"]))),
    )
    if shape is None:
        setup.unsupported = "no shipped shape for this model"
    elif row["data_parallel"] > 1:
        setup.unsupported = "data-parallel attention with expert-parallel MoE (not modelled)"
    return setup


def _v2_setup(row: dict[str, Any]) -> RunSetup:
    shape = MODEL_SHAPES.get(row["model_id"])
    mean = float(row["avg_output_len"])
    q = np.linspace(0.0025, 0.9975, 200)
    values = np.maximum(1, np.round(-mean * np.log1p(-q))).astype(
        int
    )  # exponential law of the published mean
    wl = Workload(
        TASK_INPUT_TOKENS["chat"], tuple(int(v) for v in values), tuple([1.0 / len(values)] * len(values))
    )
    setup = RunSetup(row, "v2", shape, "h100", int(row["num_gpus"]), int(row["max_num_seqs"]), wl)
    if row.get("pipeline_parallel", 1) > 1:
        setup.unsupported = "pipeline parallelism (not modelled)"
    return setup


def flag_inconsistent(setups: list[RunSetup]) -> None:
    """Exclude from fitting (not from the checks) B200 runs slower than the same run on H100.

    Same model, task, ``max_num_seqs`` and GPU count: a B200 has 2.4x the H100's memory
    bandwidth and 2.3x its tensor-core peak, so a B200 run with a longer median ITL than its
    H100 twin was bounded by something outside the GPU (host, API server, request path) that
    the configuration does not describe. These runs are still predicted and counted in every
    error figure.
    """
    h100 = {
        (s.row["model_id"], s.row["task"], s.max_num_seqs, s.n_gpus): s.row["median_itl_ms"]
        for s in setups
        if s.gpu_key == "h100"
    }
    for s in setups:
        twin = h100.get((s.row["model_id"], s.row["task"], s.max_num_seqs, s.n_gpus))
        if s.gpu_key == "b200" and twin is not None and s.row["median_itl_ms"] > twin:
            s.fit_excluded = (
                f"B200 slower than H100 on the same configuration (median ITL "
                f"{s.row['median_itl_ms']:.1f} vs {twin:.1f} ms)"
            )


def load_setups(source: str = "v3") -> list[RunSetup]:
    """Every run of a source (``v3`` or ``v2``) as a `RunSetup` (v3: inconsistent runs flagged)."""
    if source == "v3":
        setups = [_v3_setup(r) for r in json.loads(V3_FILE.read_text())["rows"]]
        flag_inconsistent(setups)
        return setups
    if source == "v2":
        return [_v2_setup(r) for r in json.loads(V2_FILE.read_text())["rows"]]
    raise ValueError(f"unknown source {source!r} (v3, v2)")


def prepare_setups(setups: list[RunSetup], gpus: dict[str, GpuSpec] | None = None) -> list[RunSetup]:
    """Simulate each supported run's scheduler trace (marks runs that do not fit as unsupported)."""
    gpus = gpus or load_gpus()
    shapes: dict[str, ModelShape] = {}
    for s in setups:
        if s.unsupported or s.trace is not None:
            continue
        shape = shapes.setdefault(s.shape_name, load_shipped(s.shape_name))
        try:
            s.trace = prepare(
                shape,
                gpus[s.gpu_key],
                s.n_gpus,
                s.max_num_seqs,
                s.workload,
                memory_utilization=ML_ENERGY_MEMORY_UTILIZATION,
                benchmark=s.benchmark,
            )
        except CapacityError as exc:
            s.unsupported = f"does not fit: {exc}"
    return [s for s in setups if not s.unsupported]


class Batch:
    """Prepared runs of one GPU type stacked into one array pass (what the fit evaluates)."""

    def __init__(self, runs: list[RunSetup], gpu: GpuSpec) -> None:
        self.runs = runs
        self.gpu = gpu
        self.work: StepWork = stack_work([r.trace.work for r in runs])
        lengths = [len(r.trace.trace.records) for r in runs]
        self.row = np.repeat(np.arange(len(runs)), lengths)
        cols = [
            np.concatenate([r.trace.trace.column(c) for r in runs])
            for c in ("count", "n_dec", "n_out", "n_running", "in_window")
        ]
        self.count, self.n_dec, self.n_out, self.n_running, self.in_window = cols
        self.n_gpus = np.array([r.n_gpus for r in runs], dtype=float)
        self.measured = {m: np.array([r.measured()[m] for r in runs]) for m in (*METRICS, "batch")}

    def predict(self, c: Coefficients) -> dict[str, np.ndarray]:
        """Per-run predictions (same keys as `RunSetup.measured`)."""
        res = step_time_power(self.work, self.gpu, c)
        n = len(self.runs)
        t = res.step_s * self.count * self.in_window
        total = np.bincount(self.row, t, n)
        out = np.bincount(self.row, self.n_out * self.count * self.in_window, n)
        energy = np.bincount(self.row, res.power_w * t, n) * self.n_gpus
        batch = np.bincount(self.row, self.n_running * t, n) / total
        # weighted median of step time per run (weights: decode tokens)
        w = self.n_dec * self.count
        order = np.lexsort((res.step_s, self.row))
        rs, ts, ws = self.row[order], res.step_s[order], w[order]
        cum = np.cumsum(ws)
        start = np.searchsorted(rs, np.arange(n))
        base = np.where(start > 0, cum[start - 1], 0.0)
        half = base + 0.5 * np.bincount(rs, ws, n)
        idx = np.searchsorted(cum, half)
        itl = ts[np.minimum(idx, len(ts) - 1)] * 1e3
        return {
            "energy_per_token": energy / out,
            "power": energy / total,
            "itl": itl,
            "throughput": out / total,
            "batch": batch,
        }


Bounds = tuple[tuple[str, float, float], ...]
"""Fitted coefficients as (name, lower bound, upper bound): each is searched through a logistic map
of an unbounded variable, so it stays inside its bounds."""


def _bounds(fit_idle: bool) -> Bounds:
    return _PARAMS + ((("idle_w", *_IDLE_BOUNDS),) if fit_idle else ())


def coefficients_from_z(z: np.ndarray, bounds: Bounds, base: Coefficients | None = None) -> Coefficients:
    """``base`` (default `Coefficients()`) with the bounded coefficients set from their logits ``z``."""
    vals = {name: float(lo + (hi - lo) / (1.0 + np.exp(-zi)))
            for (name, lo, hi), zi in zip(bounds, z, strict=True)}
    return Coefficients(**{**(base or Coefficients()).to_dict(), **vals})


def z_from_coefficients(c: Coefficients, bounds: Bounds) -> np.ndarray:
    """The logits of ``c``'s bounded coefficients (a coefficient that is None starts mid-range)."""
    z = []
    d = c.to_dict()
    for name, lo, hi in bounds:
        v = d[name] if d[name] is not None else 0.5 * (lo + hi)
        f = np.clip((v - lo) / (hi - lo), 1e-4, 1 - 1e-4)
        z.append(np.log(f / (1 - f)))
    return np.array(z)


def _residuals(batch: Batch, c: Coefficients) -> np.ndarray:
    pred = batch.predict(c)
    return np.concatenate([np.log(pred[m] / batch.measured[m]) for m in FIT_METRICS])


def fit_coefficients(
    residuals: Callable[[Coefficients], np.ndarray],
    bounds: Bounds,
    start: Coefficients | None = None,
    iterations: int = 40,
    tol: float = 1e-6,
    row_weights: np.ndarray | None = None,
) -> Coefficients:
    """Levenberg-Marquardt with Huber weights on log errors, over bounded coefficients.

    The one fitting routine of the shape-based model: the per-GPU fit on the published runs
    (`fit`) and a node's fit to its own recordings (`envs/real/node_calibration.py`) both use it.

    Args:
        residuals: Log errors (predicted / measured) of the figures fitted, for given coefficients.
        bounds: The coefficients fitted, each with its bounds; the others stay as in ``start``.
        start: Starting coefficients (default: `Coefficients()`).
        iterations: Maximum LM iterations.
        tol: Stop when the weighted cost improves by less than this fraction.
        row_weights: A weight per residual (default: all 1), e.g. to give each group of figures
            the same total weight.
    """
    base = start or Coefficients()
    z = z_from_coefficients(base, bounds)
    lam = 0.1
    r = residuals(coefficients_from_z(z, bounds, base))
    rw = np.ones_like(r) if row_weights is None else np.asarray(row_weights, dtype=float)

    def weights(res: np.ndarray) -> np.ndarray:
        a = np.abs(res)
        return rw * np.where(a <= HUBER_K, 1.0, HUBER_K / np.maximum(a, 1e-12))

    def cost(res: np.ndarray) -> float:
        a = np.abs(res)
        return float(np.sum(rw * np.where(a <= HUBER_K, 0.5 * a * a, HUBER_K * (a - 0.5 * HUBER_K))))

    cur = cost(r)
    for _ in range(iterations):
        w = weights(r)
        jac = np.empty((len(r), len(z)))
        for j in range(len(z)):
            dz = np.zeros_like(z)
            dz[j] = FD_STEP  # wide differences: the median ITL moves in small jumps as steps reorder
            jac[:, j] = (residuals(coefficients_from_z(z + dz, bounds, base)) - r) / FD_STEP
        jw = jac * w[:, None]
        a = jac.T @ jw
        g = jw.T @ r
        improved = False
        for _ in range(12):
            step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-9), -g)
            step = np.clip(step, -MAX_STEP, MAX_STEP)  # trust region per (logit-scaled) parameter
            z_new = np.clip(z + step, -9, 9)
            r_new = residuals(coefficients_from_z(z_new, bounds, base))
            c_new = cost(r_new)
            if np.isfinite(c_new) and c_new < cur:
                improved = True
                rel = (cur - c_new) / max(cur, 1e-12)
                z, r, cur = z_new, r_new, c_new
                lam = max(lam / 3, 1e-6)
                break
            lam *= 4
        if not improved or rel < tol:
            break
    return coefficients_from_z(z, bounds, base)


def fit(
    batch: Batch,
    start: Coefficients | None = None,
    fit_idle: bool = False,
    iterations: int = 40,
    tol: float = 1e-6,
) -> Coefficients:
    """Levenberg-Marquardt with Huber weights on the log errors of ITL, power and throughput.

    Args:
        batch: The runs of one GPU type.
        start: Starting coefficients (default: `Coefficients()`).
        fit_idle: Also fit the idle-with-context power (GPUs without a measurement of it).
        iterations: Maximum LM iterations.
        tol: Stop when the weighted cost improves by less than this fraction.
    """
    bounds = _bounds(fit_idle)
    # The fitted coefficients start from ``start``; the rest keep `Coefficients()`'s values.
    given = (start or Coefficients()).to_dict()
    base = Coefficients(**{**Coefficients().to_dict(), **{n: given[n] for n, _, _ in bounds}})
    return fit_coefficients(lambda c: _residuals(batch, c), bounds, base, iterations, tol)


def fits_idle(gpu: GpuSpec) -> bool:
    """Whether a GPU's idle-with-context power is fitted (no measurement of it exists here)."""
    return gpu.key != "h100"


@dataclass
class Evaluation:
    """Predicted vs measured per run, in sample and leave-one-model-out, for one source."""

    runs: list[RunSetup]
    measured: dict[str, np.ndarray]
    in_sample: dict[str, np.ndarray]
    loo: dict[str, np.ndarray]
    coefficients: dict[str, Coefficients]
    unsupported: list[RunSetup]

    def errors(self, which: str) -> dict[str, np.ndarray]:
        """Relative errors pred / measured - 1 per metric (``which``: in_sample or loo)."""
        pred = getattr(self, which)
        return {m: pred[m] / self.measured[m] - 1.0 for m in (*METRICS, "batch")}

    def median_abs(self, which: str, mask: np.ndarray | None = None) -> dict[str, float]:
        """Median absolute relative error per metric over the runs (optionally a subset)."""
        err = self.errors(which)
        sel = np.ones(len(self.runs), bool) if mask is None else mask
        return {m: float(np.median(np.abs(err[m][sel]))) for m in (*METRICS, "batch")}


def _prepared(
    setups: list[RunSetup],
) -> tuple[dict[str, GpuSpec], list[RunSetup], list[RunSetup], dict[str, np.ndarray]]:
    """GPU specs, prepared supported runs, unsupported runs, and measured metrics per run.

    Shared by `calibrate` and `predict_with`.
    """
    gpus = load_gpus()
    runs = prepare_setups(setups, gpus)
    unsupported = [s for s in setups if s.unsupported]
    measured = {m: np.array([r.measured()[m] for r in runs]) for m in (*METRICS, "batch")}
    return gpus, runs, unsupported, measured


def calibrate(
    setups: list[RunSetup], loo: bool = True, iterations: int = 40, progress: Any = None
) -> Evaluation:
    """Fit per GPU type, predict every run in sample and (optionally) leave-one-model-out."""
    gpus, runs, unsupported, measured = _prepared(setups)
    n = len(runs)
    ins = {m: np.full(n, np.nan) for m in (*METRICS, "batch")}
    out = {m: np.full(n, np.nan) for m in (*METRICS, "batch")}
    coeffs: dict[str, Coefficients] = {}
    for key in sorted({r.gpu_key for r in runs}):
        gpu = gpus[key]
        idx = [i for i, r in enumerate(runs) if r.gpu_key == key]
        batch = Batch([runs[i] for i in idx], gpu)
        c = fit(
            Batch([runs[i] for i in idx if not runs[i].fit_excluded], gpu),
            fit_idle=fits_idle(gpu),
            iterations=iterations,
        )
        coeffs[key] = c
        pred = batch.predict(c)
        for m in ins:
            ins[m][idx] = pred[m]
        if not loo:
            continue
        for fam in sorted({runs[i].family for i in idx}):
            keep = [i for i in idx if runs[i].family != fam and not runs[i].fit_excluded]
            held = [i for i in idx if runs[i].family == fam]
            if progress:
                progress(f"{key}: leave out {fam} ({len(held)} runs)")
            c_loo = fit(
                Batch([runs[i] for i in keep], gpu),
                start=c,
                fit_idle=fits_idle(gpu),
                iterations=max(8, iterations // 4),
            )
            p_held = Batch([runs[i] for i in held], gpu).predict(c_loo)
            for m in out:
                out[m][held] = p_held[m]
    return Evaluation(runs, measured, ins, out, coeffs, unsupported)


def predict_with(setups: list[RunSetup], coeffs: dict[str, Coefficients]) -> Evaluation:
    """Predictions for runs with given coefficients (no fitting; e.g. the v2 runs with v3's fit)."""
    gpus, runs, unsupported, measured = _prepared(setups)
    pred = {m: np.full(len(runs), np.nan) for m in (*METRICS, "batch")}
    for key in sorted({r.gpu_key for r in runs}):
        idx = [i for i, r in enumerate(runs) if r.gpu_key == key]
        p = Batch([runs[i] for i in idx], gpus[key]).predict(coeffs[key])
        for m in pred:
            pred[m][idx] = p[m]
    return Evaluation(runs, measured, pred, pred, coeffs, unsupported)


def load_coefficients(path: Path = COEFFICIENTS_FILE) -> dict[str, Coefficients]:
    """The shipped coefficients per GPU key (``h100``, ``h200``, ``b200``)."""
    data = json.loads(Path(path).read_text())
    return {k: Coefficients.from_dict(v["coefficients"]) for k, v in data["gpus"].items()}
