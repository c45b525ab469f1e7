"""Simulator profiles derived from the shape-based performance model (`llm_cluster_gym.envs.perf`).

The simulator needs a handful of coefficients per (model, GPU, TP degree) (`profiles.Profile`),
and `envs.perf` predicts the time and power of any engine step from the model's shape and the
GPU (calibrated on ML.ENERGY v3). `derive_profile` fits the first to the second:

* **grids**, per GPU of a ``tp``-GPU instance, evaluated with `step_work` and `step_time_power`
  and the GPU's fitted coefficients (``envs/data/perf/coefficients.json``):
  pure prefill steps of one prompt of `PREFILL_TOKENS` tokens (64..8192: one chunk under vLLM's
  8192-token budget), pure decode steps of `DECODE_BATCH` (1..512) sequences of mean context
  `DECODE_CTX_TOKENS` (128..8192) whose KV cache fits the instance, each at the maximum clock
  and at the clock ratios `CLOCK_RATIOS`; power is the *uncapped* power (the simulator applies
  the power limit itself, by pulling the clock down: `profiles.freq_at_power_limit_mhz`);
* **times** at the maximum clock: ``p0 + p1 T + p2 T^2`` and ``d0 + d1 B + d2 B C`` (plus
  ``d3 S (1 - (1 - 1/S)^B)`` for a mixture-of-experts model, ``S = E / k``: the experts the
  batch touches, `profiles.moe_experts_touched`), non-negative, least squares of the relative
  error (`fitting.nonneg_rel_lstsq`);
* **phi** (compute-bound fraction, time x ``phi fmax/f + 1 - phi``): the value in [0, 1] with
  the least squared relative error of the surrogate's times at the lower clocks;
* **power** ``idle + busy + (max - idle - busy) x/(x + k)`` at the maximum clock (``x > 0``), ``x``
  the prefill tokens or the decode load ``B (1 + beta C / 1000)`` (``beta`` from a grid, 0
  allowed: `_decode_power_fit`): for each ``k`` on a log grid ``busy`` and the amplitude
  by non-negative least squares of the relative error, the best ``k`` kept (``busy``: the power a
  GPU draws above idle as soon as kernels run, which perf's ``p_busy_w`` term and the H100
  measurements show: 122 W idle, 300-400 W at batch 1); ``idle`` is the GPU's idle power with a
  CUDA context (the calibration's fitted ``idle_w`` where it fitted one, else ``gpus.json``);
  the clock exponent is perf's `GAMMA`;
* **KV capacity** from `scheduler.kv_layout` at vLLM's default ``gpu_memory_utilization`` 0.9;
  a configuration whose weights do not fit raises `ProfileError`;
* **load time** (reconfiguration downtime) from the law in ``envs/data/perf/reconfig.json``,
  fitted to the two-H200 measurements (`ReconfigLaw`).

Each profile records its surrogate's error against perf on its grids (`Profile.fit_error`,
percent): median and max |relative error| of prefill and decode time and power at the maximum
clock (the four `FIT_QUANTITIES`), of the times and powers at the lower clocks, and of the times
with the power limit applied on both sides (``*_capped``). The surrogate's forms are shared
with every other profile (`profiles.py`); where they cannot follow perf (one ``phi`` per phase
for short and long prompts; prefill power by prompt length alone) the error says so.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from llm_cluster_gym.envs.perf.calibration import COEFFICIENTS_FILE
from llm_cluster_gym.envs.perf.hardware import GPUS_FILE, GpuSpec, load_gpus
from llm_cluster_gym.envs.perf.scheduler import (
    DEFAULT_TOKEN_BUDGET,
    GPU_MEMORY_UTILIZATION,
    TRACE_FIELDS,
    CapacityError,
    KvLayout,
    kv_layout,
)
from llm_cluster_gym.envs.perf.shapes import ModelShape, load_shipped, shipped_models
from llm_cluster_gym.envs.perf.step import GAMMA, Coefficients, StepResult, step_time_power, step_work
from llm_cluster_gym.envs.sim.fitting import nonneg_rel_lstsq
from llm_cluster_gym.envs.sim.profiles import (
    Profile,
    ProfileError,
    decode_iter_time_s,
    freq_at_power_limit_mhz,
    moe_experts_touched,
    phase_power_w,
    prefill_time_s,
)

__all__ = [
    "CANDIDATE_TPS",
    "CLOCK_RATIOS",
    "DECODE_BATCH",
    "DECODE_CTX_TOKENS",
    "FIT_QUANTITIES",
    "PREFILL_TOKENS",
    "RECONFIG_FILE",
    "ReconfigLaw",
    "decode_step",
    "derive_profile",
    "fit_reconfig_law",
    "fit_profile_to_perf",
    "fitting_tps",
    "gpu_keys",
    "is_shape_model",
    "prefill_step",
    "reconfig_law",
]

DATA_DIR = Path(str(resources.files("llm_cluster_gym.envs") / "data"))
RECONFIG_FILE = DATA_DIR / "perf" / "reconfig.json"
"""The reconfiguration-downtime law and the measurements it was fitted to."""
RECONFIG_CSV = DATA_DIR / "real" / "h200" / "reconfig.csv"
"""The two-H200 reconfiguration measurements (``envs/data/real/h200/README.md``)."""

PREFILL_TOKENS = tuple(int(t) for t in np.unique(np.round(np.geomspace(64, DEFAULT_TOKEN_BUDGET, 22))))
"""Prompt tokens of the prefill grid: one prompt per pass, at most vLLM's 8192-token step budget
(the simulator charges ``p0`` per pass and ``p1``/``p2`` per token)."""
DECODE_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Sequences per decode step on the grid (vLLM's default ``max_num_seqs`` is 256-1024)."""
DECODE_CTX_TOKENS = (128, 256, 512, 1024, 2048, 4096, 8192)
"""Mean context per sequence on the decode grid; points whose KV cache (batch x context) exceeds
the instance's capacity are left out (no engine runs them)."""
CLOCK_RATIOS = (0.4, 0.55, 0.7, 0.85)
"""SM clock / maximum clock of the grids that fit ``phi`` (0.4: the scenarios' lowest clock
choice, 800 MHz of 1980)."""
CANDIDATE_TPS = (1, 2, 4, 8)
"""Tensor-parallel degrees a derived profile may have (GPUs of one server)."""
FIT_QUANTITIES = ("prefill_time", "decode_time", "prefill_power", "decode_power")
"""The fit errors every derived profile records, at the maximum clock (the power uncapped)."""

_K_GRID = np.logspace(-2, 5, 1401)
_PHI_GRID = np.linspace(0.0, 1.0, 1001)
_CTX_POWER_GRID = np.concatenate([[0.0], np.logspace(-3, 2, 101)])
"""Candidates for the decode power's context coefficient (per 1,000 tokens of mean context)."""


# ---------------------------------------------------------------------------------------------
# Inputs: GPUs, coefficients, shapes
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _gpus() -> dict[str, GpuSpec]:
    return load_gpus(GPUS_FILE)


@lru_cache(maxsize=1)
def _coefficients() -> dict[str, tuple[Coefficients, str]]:
    """GPU key -> (coefficients, what they were fitted on) from ``coefficients.json``."""
    data = json.loads(Path(COEFFICIENTS_FILE).read_text())
    return {
        k: (Coefficients.from_dict(v["coefficients"]), str(v.get("fitted_on", "not stated")))
        for k, v in data["gpus"].items()
    }


def gpu_keys() -> list[str]:
    """GPUs a profile can be derived for: in ``gpus.json`` and in ``coefficients.json``."""
    return sorted(set(_gpus()) & set(_coefficients()))


def is_shape_model(model: str) -> bool:
    """Whether ``model`` names a shipped model shape (``envs/data/models/*.json``)."""
    return model in shipped_models()


def _check_names(model: str, gpu: str) -> tuple[ModelShape, GpuSpec]:
    if not is_shape_model(model):
        raise ProfileError(
            f"unknown model {model!r}: not a shipped model shape; shipped: {', '.join(shipped_models())}"
        )
    if gpu not in gpu_keys():
        raise ProfileError(f"unknown GPU {gpu!r} for model {model!r}; known: {', '.join(gpu_keys())}")
    return _shape(model), _gpus()[gpu]


@lru_cache(maxsize=64)
def _shape(model: str) -> ModelShape:
    return load_shipped(model)


def _layout(model: str, gpu: str, tp: int) -> KvLayout:
    """The instance's KV layout; `ProfileError` naming model, GPU and TP when it cannot run."""
    shape, spec = _check_names(model, gpu)
    if tp < 1 or (shape.n_heads % tp and tp % shape.n_heads):
        raise ProfileError(
            f"model {model!r} on gpu {gpu!r} cannot run at tp={tp}: the TP degree must divide the "
            f"model's {shape.n_heads} attention heads; fitting: {fitting_tps(model, gpu)}"
        )
    try:
        return kv_layout(shape, tp, spec.memory_bytes, DEFAULT_TOKEN_BUDGET, GPU_MEMORY_UTILIZATION)
    except CapacityError as exc:
        raise ProfileError(
            f"model {model!r} does not fit on gpu {gpu!r} at tp={tp} ({exc}); "
            f"fitting TP degrees: {fitting_tps(model, gpu) or 'none'}"
        ) from None


def fitting_tps(model: str, gpu: str) -> list[int]:
    """TP degrees of `CANDIDATE_TPS` at which the model's weights fit the GPUs (ascending)."""
    shape, spec = _check_names(model, gpu)
    out = []
    for tp in CANDIDATE_TPS:
        if shape.n_heads % tp and tp % shape.n_heads:
            continue
        try:
            kv_layout(shape, tp, spec.memory_bytes, DEFAULT_TOKEN_BUDGET, GPU_MEMORY_UTILIZATION)
        except CapacityError:
            continue
        out.append(tp)
    return out


def _kv_tokens(kv: KvLayout) -> int:
    """Tokens the instance's KV cache holds (as `envs.perf.serving` counts them)."""
    return int(kv.capacity_bytes / max(kv.full_bytes_per_token + kv.window_bytes_per_token, 1e-9))


# ---------------------------------------------------------------------------------------------
# The reference: perf's step model on pure prefill and pure decode steps
# ---------------------------------------------------------------------------------------------


def _records(n: int, **cols: np.ndarray) -> np.ndarray:
    rec = np.zeros((n, len(TRACE_FIELDS)))
    rec[:, TRACE_FIELDS.index("count")] = 1.0
    rec[:, TRACE_FIELDS.index("in_window")] = 1.0
    for name, values in cols.items():
        rec[:, TRACE_FIELDS.index(name)] = values
    return rec


def prefill_records(shape: ModelShape, tokens: np.ndarray) -> np.ndarray:
    """One prompt of ``tokens`` tokens from an empty cache per step (its first token sampled)."""
    t = np.asarray(tokens, dtype=float)
    win = float(shape.window) if shape.n_attn_window else 0.0
    pairs_win = np.zeros_like(t)
    if win:  # position p attends min(p, window) keys
        below = np.minimum(t, win)
        pairs_win = below * (below + 1) / 2.0 + (t - below) * win
    one = np.ones_like(t)
    return _records(
        t.size, n_pre=t, pairs_full=t * (t + 1) / 2.0, pairs_win=pairs_win, kvpre_full=t,
        kvpre_win=t if win else 0.0 * t, n_sched=one, n_running=one, n_out=one, n_prefill_seqs=one,
    )


def decode_records(shape: ModelShape, batch: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """``batch`` sequences of ``ctx`` tokens of context each decoding one token per step."""
    b = np.asarray(batch, dtype=float)
    c = np.asarray(ctx, dtype=float)
    win = float(shape.window) if shape.n_attn_window else 0.0
    return _records(
        b.size, n_dec=b, ctx_full=b * c, ctx_win=b * np.minimum(c, win) if win else 0.0 * b,
        n_sched=b, n_running=b, n_out=b,
    )


def _step(
    shape: ModelShape, spec: GpuSpec, tp: int, coeffs: Coefficients, records: np.ndarray,
    clock_ratio: float = 1.0, capped: bool = False,
) -> StepResult:
    limit = spec if capped else dataclasses.replace(spec, power_limit_w=float("inf"))
    return step_time_power(step_work(shape, tp, spec, records), limit, coeffs, clock_ratio)


def _run(model: str, gpu: str, tp: int, records: np.ndarray, clock_ratio: float, capped: bool) -> StepResult:
    shape, spec = _check_names(model, gpu)
    return _step(shape, spec, tp, _coefficients()[gpu][0], records, clock_ratio, capped)


def prefill_step(
    model: str, gpu: str, tp: int, tokens: np.ndarray, clock_ratio: float = 1.0, capped: bool = False
) -> StepResult:
    """Time and per-GPU power (perf's step model) of prefill passes of one prompt of ``tokens`` tokens.

    Args:
        model: Shipped model shape.
        gpu: GPU key.
        tp: GPUs of the instance.
        tokens: Prompt tokens of each pass.
        clock_ratio: SM clock as a fraction of the maximum.
        capped: Apply the GPU's power limit (pull the clock down); default: uncapped power.
    """
    return _run(model, gpu, tp, prefill_records(_shape(model), np.atleast_1d(tokens)), clock_ratio, capped)


def decode_step(
    model: str,
    gpu: str,
    tp: int,
    batch: np.ndarray,
    ctx_tokens: np.ndarray,
    clock_ratio: float = 1.0,
    capped: bool = False,
) -> StepResult:
    """Time and per-GPU power (perf's step model) of decode steps of ``batch`` sequences of ``ctx_tokens``."""
    b, c = np.broadcast_arrays(np.atleast_1d(np.asarray(batch, float)), np.asarray(ctx_tokens, float))
    return _run(model, gpu, tp, decode_records(_shape(model), b, c), clock_ratio, capped)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


def _err(pred: np.ndarray, ref: np.ndarray) -> Mapping[str, float]:
    rel = np.abs(np.asarray(pred, float) / np.asarray(ref, float) - 1.0) * 100.0
    return dict({
        "median_abs_pct": round(float(np.median(rel)), 3),
        "max_abs_pct": round(float(rel.max()), 3),
        "n": int(rel.size),
    })


def _saturation_fit_rel(load: np.ndarray, power_w: np.ndarray, idle_w: float) -> tuple[float, float, float]:
    """(max_w, k, busy_w) of ``idle + busy + (max - idle - busy) x/(x + k)`` (loads > 0).

    For each ``k`` of a log grid, ``busy`` and the amplitude ``max - idle - busy`` are the
    non-negative least-squares solution of the relative error; the best ``k`` is kept. The
    two-unknown problems of all ``k`` are solved at once (normal equations, then each edge where
    the unconstrained optimum has a negative component).
    """
    max_w, k, busy, _ = _saturation_fit_rel_sse(load, power_w, idle_w)
    return max_w, k, busy


def _saturation_fit_rel_sse(load: np.ndarray, power_w: np.ndarray,
                            idle_w: float) -> tuple[float, float, float, float]:
    """`_saturation_fit_rel` and its summed squared relative error."""
    w = 1.0 / power_w
    y = (power_w - idle_w) * w
    g = load[None, :] / (load[None, :] + _K_GRID[:, None])  # (k, points)
    a1 = g * w[None, :]
    s00 = float(w @ w)
    s01 = a1 @ w
    s11 = (a1 * a1).sum(axis=1)
    t0 = float(w @ y)
    t1 = a1 @ y
    yy = float(y @ y)
    det = s00 * s11 - s01 * s01
    ok = np.abs(det) > 1e-300
    safe = np.where(ok, det, 1.0)
    x0 = np.where(ok, (s11 * t0 - s01 * t1) / safe, -1.0)
    x1 = np.where(ok, (s00 * t1 - s01 * t0) / safe, -1.0)

    def sse(b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
        return yy - 2 * (b0 * t0 + b1 * t1) + b0 * b0 * s00 + 2 * b0 * b1 * s01 + b1 * b1 * s11

    inf = np.inf
    cand = [np.where((x0 >= 0) & (x1 >= 0), sse(x0, x1), inf)]
    e0 = np.full_like(s11, max(t0 / s00, 0.0))  # amplitude 0
    e1 = np.maximum(t1 / np.maximum(s11, 1e-300), 0.0)  # busy 0
    cand += [sse(e0, 0.0 * e0), sse(0.0 * e1, e1)]
    stack = np.stack(cand)  # (3, k)
    which = np.argmin(stack, axis=0)
    best_sse = stack[which, np.arange(stack.shape[1])]
    i = int(np.argmin(best_sse))
    b0, b1 = ((x0[i], x1[i]), (e0[i], 0.0), (0.0, e1[i]))[int(which[i])]
    return idle_w + float(b0) + float(b1), float(_K_GRID[i]), float(b0), float(best_sse[i])


def _decode_power_fit(batch: np.ndarray, ctx: np.ndarray, power_w: np.ndarray,
                      idle_w: float) -> tuple[float, float, float, float]:
    """(max_w, k, busy_w, beta) of the decode power curve over the effective load.

    The load is ``batch (1 + beta ctx / 1000)`` (`profiles.Profile.decode_power_load`): each
    candidate ``beta`` of `_CTX_POWER_GRID` gets its own saturation fit, and the one with the
    least squared relative error is kept (``beta = 0`` is power by batch alone).
    """
    best: tuple[float, tuple[float, float, float, float]] = (np.inf, (0.0, 1.0, 0.0, 0.0))
    for beta in _CTX_POWER_GRID:
        mx, k, busy, sse = _saturation_fit_rel_sse(batch * (1.0 + beta * ctx / 1000.0), power_w, idle_w)
        if sse < best[0] * (1.0 - 1e-9):
            best = (sse, (mx, k, busy, float(beta)))
    return best[1]


def _fit_phi(base_s: np.ndarray, ratios: np.ndarray, ref_s: np.ndarray) -> float:
    """The phi in [0, 1] minimizing the squared relative error of ``base (phi/s + 1 - phi)``."""
    stretch = 1.0 / ratios - 1.0
    pred = base_s[None, :] * (1.0 + _PHI_GRID[:, None] * stretch[None, :])
    sse = (((pred - ref_s[None, :]) / ref_s[None, :]) ** 2).sum(axis=1)
    return round(float(_PHI_GRID[int(np.argmin(sse))]), 3)


# ---------------------------------------------------------------------------------------------
# Reconfiguration downtime
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReconfigLaw:
    """Reconfiguration downtime: ``fixed_s + per_layer_s n_layers + weight_bytes_per_gpu / rate``."""

    fixed_s: float
    per_layer_s: float
    load_bytes_per_s: float

    def load_time_s(self, shape: ModelShape, tp: int) -> float:
        """Seconds an instance of ``shape`` on ``tp`` GPUs is down when (re)started."""
        return (
            self.fixed_s
            + self.per_layer_s * shape.n_layers
            + shape.total_weight_bytes / tp / self.load_bytes_per_s
        )


@lru_cache(maxsize=1)
def reconfig_law(path: Path = RECONFIG_FILE) -> ReconfigLaw:
    """The law of ``envs/data/perf/reconfig.json``."""
    c = json.loads(Path(path).read_text())["constants"]
    return ReconfigLaw(float(c["fixed_s"]), float(c["per_layer_s"]), float(c["load_bytes_per_s"]))


def fit_reconfig_law(
    csv_path: Path = RECONFIG_CSV, n_layers: Mapping[str, int] | None = None
) -> tuple[float, float]:
    """(fixed_s, per_layer_s): least squares of the valid random-weight reconfiguration downtimes.

    Args:
        csv_path: ``reconfig.csv`` of the two-H200 campaign.
        n_layers: Layers of each measured shape (default: ``reconfig.json``'s ``fit.n_layers``).
    """
    if n_layers is None:
        n_layers = json.loads(RECONFIG_FILE.read_text())["fit"]["n_layers"]
    with Path(csv_path).open() as f:
        rows = [
            r for r in csv.DictReader(f)
            if r["what"] == "reconfiguration" and r["valid"] == "True" and r["weights"] == "random"
        ]
    x = np.array([n_layers[r["model"]] for r in rows], dtype=float)
    y = np.array([float(r["downtime_s"]) for r in rows])
    (fixed, per_layer), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), y, rcond=None)
    return float(fixed), float(per_layer)


# ---------------------------------------------------------------------------------------------
# The profile
# ---------------------------------------------------------------------------------------------


def _decode_grid(
    kv_tokens: int, batch: tuple[int, ...] = DECODE_BATCH, ctx_tokens: tuple[int, ...] = DECODE_CTX_TOKENS
) -> tuple[np.ndarray, np.ndarray]:
    b, c = np.meshgrid(np.asarray(batch, float), np.asarray(ctx_tokens, float))
    b, c = b.ravel(), c.ravel()
    keep = b * c <= kv_tokens
    keep |= (b == batch[0]) & (c == ctx_tokens[0])  # at least one point
    return b[keep], c[keep]


@lru_cache(maxsize=256)
def derive_profile(model: str, gpu: str, tp: int) -> Profile:
    """The simulator profile of ``model`` on ``tp`` GPUs of type ``gpu``, fitted to `envs.perf`.

    Args:
        model: A shipped model shape (`envs.perf.shapes.shipped_models`).
        gpu: A GPU key of ``envs/data/gpus.json`` with coefficients (`gpu_keys`).
        tp: GPUs of the instance (tensor parallel; experts spread over them).

    Raises:
        ProfileError: Unknown model or GPU (the message lists the known ones), a TP degree that
            does not divide the attention heads, or weights that do not fit (naming model, GPU
            and TP).
    """
    tp = int(tp)
    kv = _layout(model, gpu, tp)
    shape, spec = _check_names(model, gpu)
    coeffs, fitted_on = _coefficients()[gpu]
    coeff_note = (
        f"envs/data/perf/coefficients.json gpus.{gpu} (fitted on: {fitted_on})"
        if gpu != "h200"
        else f"envs/data/perf/coefficients.json gpus.h200, the H100 coefficients (same Hopper SMs and "
        f"clocks; no public H200 calibration runs; fitted on: {fitted_on}) with the H200's own memory "
        f"bandwidth and capacity"
    )
    source = (
        f"derived from envs/perf (step_work, step_time_power; power uncapped) by "
        f"envs/sim/shape_profiles.py; model envs/data/models/{model}.json; {coeff_note}; GPU "
        f"envs/data/gpus.json {gpu} ({spec.name}); KV cache at gpu_memory_utilization "
        f"{GPU_MEMORY_UTILIZATION}; load time envs/data/perf/reconfig.json (measured on two H200s"
        f"{'' if gpu == 'h200' else '; the same law on this GPU is an assumption'})"
    )
    return fit_profile_to_perf(
        shape, spec, tp, coeffs, model=model, kv_tokens=_kv_tokens(kv),
        load_time_s=reconfig_law().load_time_s(shape, tp), source=source,
    )


def fit_profile_to_perf(
    shape: ModelShape,
    spec: GpuSpec,
    tp: int,
    coeffs: Coefficients,
    *,
    model: str,
    kv_tokens: int,
    load_time_s: float,
    source: str,
    prefill_tokens: tuple[int, ...] = PREFILL_TOKENS,
    decode_batch: tuple[int, ...] = DECODE_BATCH,
    decode_ctx_tokens: tuple[int, ...] = DECODE_CTX_TOKENS,
) -> Profile:
    """A simulator `Profile` fitted to perf's step model for any shape, GPU and coefficients.

    `derive_profile` calls it with a shipped shape and the shipped per-GPU coefficients; a real
    node calls it with its own engine's coefficients and its own grid limits (its slots, context
    and KV cache: `envs/real/node_calibration.py`). The grids, forms and fits are described in
    this module's docstring.

    Args:
        shape: The model's shape.
        spec: The GPU (its idle power unless ``coeffs.idle_w`` is set, clocks, power limit).
        tp: GPUs of the instance.
        coeffs: perf's coefficients for this GPU (or node).
        model: The profile's model key.
        kv_tokens: Tokens the instance's KV cache holds (decode grid points beyond it are left out).
        load_time_s: Reconfiguration downtime.
        source: Where the profile comes from (kept in the profile).
        prefill_tokens: Prompt tokens of the prefill grid.
        decode_batch: Sequences per step of the decode grid.
        decode_ctx_tokens: Mean contexts of the decode grid.
    """
    idle = spec.idle_power_with_context_w if coeffs.idle_w is None else float(coeffs.idle_w)
    fmax, fmin, limit = spec.max_sm_clock_mhz, spec.min_sm_clock_mhz, spec.power_limit_w
    ratios = np.asarray([r for r in CLOCK_RATIOS if r * fmax >= fmin], dtype=float)

    def pre_step(t: np.ndarray, ratio: float = 1.0, capped: bool = False) -> StepResult:
        return _step(shape, spec, tp, coeffs, prefill_records(shape, t), ratio, capped)

    def dec_step(bb: np.ndarray, cc: np.ndarray, ratio: float = 1.0, capped: bool = False) -> StepResult:
        return _step(shape, spec, tp, coeffs, decode_records(shape, bb, cc), ratio, capped)

    # prefill: one prompt of T tokens per pass
    tok = np.asarray(prefill_tokens, dtype=float)
    pre = pre_step(tok)
    p = nonneg_rel_lstsq(np.stack([np.ones_like(tok), tok, tok * tok], axis=1), pre.step_s)
    pre_base = p[0] + tok * (p[1] + p[2] * tok)
    pre_low = [pre_step(tok, r) for r in ratios]
    s_pre = np.repeat(ratios, tok.size)
    pre_low_t = np.concatenate([r.step_s for r in pre_low])
    phi_p = _fit_phi(np.tile(pre_base, ratios.size), s_pre, pre_low_t)
    pmax, pk, pbusy = _saturation_fit_rel(tok, pre.power_w, idle)

    # decode: B sequences of mean context C, the KV cache holding them
    b, c = _decode_grid(kv_tokens, decode_batch, decode_ctx_tokens)
    dec = dec_step(b, c)
    # A mixture-of-experts step also reads the experts its batch touches (E / k of them per
    # token's worth at most): one more non-negative column; dense models keep three.
    moe_s = float(shape.n_experts) / float(shape.top_k) if shape.n_ffn_moe and shape.top_k else 0.0
    cols = [np.ones_like(b), b, b * c]
    if moe_s > 1.0:
        cols.append(moe_experts_touched(b, moe_s))
    d = nonneg_rel_lstsq(np.stack(cols, axis=1), dec.step_s)
    d3 = float(d[3]) if moe_s > 1.0 else 0.0
    dec_base = d[0] + b * (d[1] + d[2] * c) + d3 * moe_experts_touched(b, moe_s)
    dec_low = [dec_step(b, c, r) for r in ratios]
    s_dec = np.repeat(ratios, b.size)
    dec_low_t = np.concatenate([r.step_s for r in dec_low])
    phi_d = _fit_phi(np.tile(dec_base, ratios.size), s_dec, dec_low_t)
    dmax, dk, dbusy, dbeta = _decode_power_fit(b, c, dec.power_w, idle)
    xd = b * (1.0 + dbeta * c / 1000.0)  # decode power's effective load

    # errors of the surrogate (the simulator's own functions) against perf
    def surr_pre_t(f: np.ndarray, t: np.ndarray = tok) -> np.ndarray:
        return prefill_time_s(t, f, p[0], p[1], p[2], phi_p, fmax)

    def surr_dec_t(f: np.ndarray, bb: np.ndarray = b, cc: np.ndarray = c) -> np.ndarray:
        return decode_iter_time_s(bb, cc, f, d[0], d[1], d[2], phi_d, fmax, d3, moe_s)

    def surr_pw(x: np.ndarray, f: np.ndarray, mx: float, k: float, busy: float) -> np.ndarray:
        return phase_power_w(x, f, idle, mx, k, GAMMA, fmax, busy)

    tok_l, b_l, c_l = np.tile(tok, ratios.size), np.tile(b, ratios.size), np.tile(c, ratios.size)
    xd_l = np.tile(xd, ratios.size)
    f_pre_cap = freq_at_power_limit_mhz(tok, limit, idle, pmax, pk, GAMMA, fmin, fmax, pbusy)
    f_dec_cap = freq_at_power_limit_mhz(xd, limit, idle, dmax, dk, GAMMA, fmin, fmax, dbusy)
    errors = {
        "prefill_time": _err(surr_pre_t(fmax), pre.step_s),
        "decode_time": _err(surr_dec_t(fmax), dec.step_s),
        "prefill_power": _err(surr_pw(tok, fmax, pmax, pk, pbusy), pre.power_w),
        "decode_power": _err(surr_pw(xd, fmax, dmax, dk, dbusy), dec.power_w),
        "prefill_time_low_clock": _err(surr_pre_t(s_pre * fmax, tok_l), pre_low_t),
        "decode_time_low_clock": _err(surr_dec_t(s_dec * fmax, b_l, c_l), dec_low_t),
        "prefill_power_low_clock": _err(
            surr_pw(tok_l, s_pre * fmax, pmax, pk, pbusy), np.concatenate([r.power_w for r in pre_low])
        ),
        "decode_power_low_clock": _err(
            surr_pw(xd_l, s_dec * fmax, dmax, dk, dbusy), np.concatenate([r.power_w for r in dec_low])
        ),
        "prefill_time_capped": _err(surr_pre_t(f_pre_cap), pre_step(tok, capped=True).step_s),
        "decode_time_capped": _err(surr_dec_t(f_dec_cap), dec_step(b, c, capped=True).step_s),
    }
    return Profile(
        model=model,
        gpu=spec.key,
        tp=tp,
        prefill_p0_s=float(p[0]),
        prefill_p1_s_per_token=float(p[1]),
        prefill_p2_s_per_token2=float(p[2]),
        prefill_phi=phi_p,
        decode_d0_s=float(d[0]),
        decode_d1_s_per_seq=float(d[1]),
        decode_d2_s_per_seq_token=float(d[2]),
        decode_d3_s_per_expert=d3,
        decode_moe_experts_per_active=moe_s if d3 > 0.0 else 0.0,
        decode_phi=phi_d,
        idle_power_w=float(idle),
        prefill_max_power_w=pmax,
        prefill_k_tokens=pk,
        decode_max_power_w=dmax,
        decode_k_batch=dk,
        decode_power_ctx_per_ktok=dbeta,
        power_freq_exponent=float(GAMMA),
        gpu_power_limit_w=float(limit),
        kv_capacity_tokens=int(kv_tokens),
        load_time_s=float(load_time_s),
        min_freq_mhz=float(fmin),
        max_freq_mhz=float(fmax),
        weights_gb=shape.total_weight_bytes / 1e9,
        n_params=int(shape.total_params),
        n_layers=int(shape.n_layers),
        d_model=int(shape.hidden),
        n_kv_heads=int(shape.n_kv_heads),
        head_dim=int(shape.head_dim),
        source=source,
        prefill_busy_power_w=pbusy,
        decode_busy_power_w=dbusy,
        fit_error=errors,
    )


_TABLE_COLUMNS = (
    ("prefill_time", "prefill time"),
    ("decode_time", "decode time"),
    ("prefill_power", "prefill power"),
    ("decode_power", "decode power"),
    ("prefill_time_capped", "prefill time, capped"),
    ("prefill_time_low_clock", "prefill time, lower clocks"),
    ("decode_time_low_clock", "decode time, lower clocks"),
)


def fit_error_table(models: tuple[str, ...] = ("llama-3.1-8b-instruct", "llama-3.1-70b-instruct",
                                               "qwen3-30b-a3b")) -> str:
    """Markdown table of every derived profile's fit errors (median / max |rel. error|, %)."""
    head = ["model", "GPU", "TP", *(title for _, title in _TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        for gpu in ("h100", "h200", "b200"):
            for tp in fitting_tps(model, gpu):
                fe = derive_profile(model, gpu, tp).fit_error
                cells = [f"{fe[k]['median_abs_pct']:.1f} / {fe[k]['max_abs_pct']:.1f}"
                         for k, _ in _TABLE_COLUMNS]
                lines.append("| " + " | ".join([model, gpu.upper(), str(tp), *cells]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(fit_error_table())
