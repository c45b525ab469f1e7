"""Performance and power profiles of one LLM instance (model, GPU, tensor-parallel degree).

The simulator runs thousands of instances with different models and TP degrees in one numpy
pass, so a profile is a handful of fitted coefficients, not a lookup table. They come from
two places: the shape-based performance model (`llm_cluster_gym.envs.perf`), fitted per
(model shape, GPU, TP degree) by `shape_profiles.derive_profile`, and older JSON tables with
the measured grids they were fitted to (``envs/data/profiles/*.json``, written by
``scripts/build_profiles.py``; every number there names its source), kept as calibration data.
`ProfileLibrary` serves both.

Runtime model, with ``freq_scale = max_freq_mhz / freq_mhz``:

* prefill pass over ``tokens`` prompt tokens (summed over the prompts in the pass)::

      (p0 + p1*tokens + p2*tokens**2) * (phi_p*freq_scale + 1 - phi_p)

* one decode iteration over ``batch`` sequences of mean context ``ctx_tokens``::

      (d0 + d1*batch + d2*batch*ctx_tokens) * (phi_d*freq_scale + 1 - phi_d)

  ``phi`` is the compute-bound fraction of the pass (from a roofline): only that part of the
  time stretches when the SM clock drops.
* power per GPU in a phase with load ``x`` (prefill tokens or decode batch)::

      idle + (max - idle) * x/(x + k) * (freq_mhz/max_freq_mhz)**gamma

  Not capped here: the GPU power limit (``gpu_power_limit_w``) is applied by the simulator,
  e.g. with :func:`freq_at_power_limit_mhz`.

:class:`Profile` (one instance type) and :class:`ProfileArrays` (one entry per instance) call
the same module-level functions, so the scalar and vectorized paths cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_PROFILE_DIR",
    "Profile",
    "ProfileArrays",
    "ProfileError",
    "ProfileLibrary",
    "decode_iter_time_s",
    "freq_at_power_limit_mhz",
    "phase_power_w",
    "prefill_time_s",
]

DEFAULT_PROFILE_DIR = Path(__file__).resolve().parent.parent / "data" / "profiles"
"""Where the shipped profile JSON files live (inside the package, found via ``__file__``)."""

SCHEMA_VERSION = 1


class ProfileError(ValueError):
    """A profile file or lookup is invalid; the message names the file, field and value."""


# ---------------------------------------------------------------------------------------------
# The math, shared by Profile and ProfileArrays. Arguments broadcast against each other.
# ---------------------------------------------------------------------------------------------


def clock_slowdown(freq_mhz: Any, max_freq_mhz: Any, phi: Any) -> np.ndarray:
    """Time multiplier at ``freq_mhz`` relative to ``max_freq_mhz`` for compute fraction phi."""
    freq = np.asarray(freq_mhz, dtype=np.float64)
    if (freq <= 0.0).any():
        raise ValueError(f"freq_mhz must be > 0, got min {float(np.min(freq))}")
    scale = np.asarray(max_freq_mhz, dtype=np.float64) / freq
    return phi * scale + (1.0 - phi)


def prefill_time_s(
    tokens: Any, freq_mhz: Any, p0_s: Any, p1_s: Any, p2_s: Any, phi: Any, max_freq_mhz: Any
) -> np.ndarray:
    """Seconds for one prefill pass.

    Args:
        tokens: Prompt tokens in the pass (sum over the prompts batched together).
        freq_mhz: SM clock during the pass.
        p0_s: Fixed cost per pass at the maximum clock, s.
        p1_s: Cost per token, s/token.
        p2_s: Quadratic (attention) cost, s/token**2.
        phi: Compute-bound fraction of the pass (0..1).
        max_freq_mhz: Clock at which p0..p2 hold.

    Returns:
        Array of seconds, broadcast over the arguments.
    """
    t = np.asarray(tokens, dtype=np.float64)
    base_s = p0_s + t * (p1_s + p2_s * t)
    return base_s * clock_slowdown(freq_mhz, max_freq_mhz, phi)


def moe_experts_touched(batch: Any, experts_per_active: Any) -> np.ndarray:
    """Distinct experts a decode batch reads per layer, in units of one token's experts.

    With ``E`` experts of which each token routes to ``k`` (``experts_per_active`` ``S = E / k``),
    ``b`` tokens touch ``E (1 - (1 - k/E)^b)`` of them on average (uniform routing, as the
    shape-based model counts the bytes a step reads: `envs.perf.step.step_work`); divided by
    ``k`` that is ``S (1 - (1 - 1/S)^b)``: 1 at one token, ``b`` while few overlap, ``S`` once
    every expert is read. 0 where ``S <= 1`` (a dense model, or every expert active).
    """
    b = np.asarray(batch, dtype=np.float64)
    s = np.asarray(experts_per_active, dtype=np.float64)
    safe = np.where(s > 1.0, s, 2.0)
    return np.where(s > 1.0, safe * (1.0 - np.power(1.0 - 1.0 / safe, b)), 0.0)


def decode_iter_time_s(
    batch: Any,
    ctx_tokens: Any,
    freq_mhz: Any,
    d0_s: Any,
    d1_s: Any,
    d2_s: Any,
    phi: Any,
    max_freq_mhz: Any,
    d3_s: Any = 0.0,
    experts_per_active: Any = 0.0,
) -> np.ndarray:
    """Seconds for one decode iteration (one new token for every sequence in the batch).

    Args:
        batch: Sequences in the batch.
        ctx_tokens: Mean context length per sequence, tokens.
        freq_mhz: SM clock.
        d0_s: Fixed cost per iteration (weight reads), s.
        d1_s: Cost per sequence, s.
        d2_s: Cost per sequence per context token (KV reads), s.
        phi: Compute-bound fraction (0..1).
        max_freq_mhz: Clock at which d0..d3 hold.
        d3_s: Mixture-of-experts models: cost per expert-equivalent the batch touches
            (`moe_experts_touched`: reading the routed experts' weights), s; 0 for dense models.
        experts_per_active: ``E / k`` of a mixture-of-experts model (0: dense).

    Returns:
        Array of seconds, broadcast over the arguments.
    """
    b = np.asarray(batch, dtype=np.float64)
    c = np.asarray(ctx_tokens, dtype=np.float64)
    base_s = d0_s + b * (d1_s + d2_s * c)
    if np.any(np.asarray(d3_s) > 0.0):  # dense models skip it (and keep their exact bits)
        base_s = base_s + d3_s * moe_experts_touched(b, experts_per_active)
    return base_s * clock_slowdown(freq_mhz, max_freq_mhz, phi)


def phase_power_w(
    load: Any,
    freq_mhz: Any,
    idle_power_w: Any,
    max_power_w: Any,
    k_load: Any,
    freq_exponent: Any,
    max_freq_mhz: Any,
    busy_power_w: Any = 0.0,
) -> np.ndarray:
    """Power per GPU in one phase, not capped by the GPU power limit.

    Args:
        load: Prefill tokens in the pass, or decode batch size; 0 gives idle power.
        freq_mhz: SM clock.
        idle_power_w: Power of an idle GPU, W.
        max_power_w: Power at saturating load and the maximum clock, W (may exceed the limit).
        k_load: Load at which half of the dynamic power is reached.
        freq_exponent: gamma in (f/f_max)**gamma.
        max_freq_mhz: Maximum SM clock.
        busy_power_w: Power above idle as soon as any work runs (kernels resident, clocks and
            memory active), before the load-dependent part; 0 gives the plain saturating curve.

    Returns:
        Array of watts per GPU.
    """
    x = np.asarray(load, dtype=np.float64)
    f_rel = np.asarray(freq_mhz, dtype=np.float64) / max_freq_mhz
    return idle_power_w + _dynamic_w(x, idle_power_w, max_power_w, k_load, busy_power_w) * (
        f_rel**freq_exponent)


def _dynamic_w(x: np.ndarray, idle_power_w: Any, max_power_w: Any, k_load: Any,
               busy_power_w: Any) -> np.ndarray:
    """Power above idle at the maximum clock: ``busy`` once loaded, rising to ``max`` - idle."""
    util = x / (x + k_load)
    return np.where(x > 0.0, busy_power_w, 0.0) + (max_power_w - idle_power_w - busy_power_w) * util


def freq_at_power_limit_mhz(
    load: Any,
    limit_w: Any,
    idle_power_w: Any,
    max_power_w: Any,
    k_load: Any,
    freq_exponent: Any,
    min_freq_mhz: Any,
    max_freq_mhz: Any,
    busy_power_w: Any = 0.0,
) -> np.ndarray:
    """Highest clock at which :func:`phase_power_w` stays within ``limit_w``.

    This is what the GPU's power controller does (it lowers the SM clock until the power fits
    the limit), inverted in closed form. Clipped to [min_freq_mhz, max_freq_mhz]; at the minimum
    clock the power may still exceed the limit.

    Returns:
        Array of MHz.
    """
    x = np.asarray(load, dtype=np.float64)
    dyn_w = _dynamic_w(x, idle_power_w, np.asarray(max_power_w, dtype=np.float64), k_load,
                       busy_power_w)
    headroom_w = np.asarray(limit_w, dtype=np.float64) - idle_power_w
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(dyn_w > 0.0, np.maximum(headroom_w, 0.0) / dyn_w, np.inf)
        f = max_freq_mhz * ratio ** (1.0 / np.asarray(freq_exponent, dtype=np.float64))
    return np.clip(f, min_freq_mhz, max_freq_mhz)


def serial_power_limit_w(idle_power_w: Any, limit_w: Any, serial_power_ratio: Any) -> np.ndarray:
    """The sustained-curve power at which a serial prefill pass reaches the GPU power limit.

    A pass that draws ``ratio`` of the sustained power above idle hits ``limit_w`` where the
    sustained curve reaches ``idle + (limit - idle) / ratio``; so `freq_at_power_limit_mhz` at
    this limit is the pass's clock. Where the ratio is 1 this is ``limit_w`` itself (same bits).
    """
    idle = np.asarray(idle_power_w, dtype=np.float64)
    limit = np.asarray(limit_w, dtype=np.float64)
    ratio = np.asarray(serial_power_ratio, dtype=np.float64)
    return np.where(ratio == 1.0, limit, idle + (limit - idle) / ratio)


def serial_draw_w(idle_power_w: Any, sustained_w: Any, serial_power_ratio: Any) -> np.ndarray:
    """What a serial prefill pass draws where the same work sustained draws ``sustained_w``.

    ``idle + ratio (sustained - idle)``; where the ratio is 1, ``sustained_w`` itself (same bits).
    """
    idle = np.asarray(idle_power_w, dtype=np.float64)
    sustained = np.asarray(sustained_w, dtype=np.float64)
    ratio = np.asarray(serial_power_ratio, dtype=np.float64)
    return np.where(ratio == 1.0, sustained, idle + ratio * (sustained - idle))


# ---------------------------------------------------------------------------------------------
# Profile records
# ---------------------------------------------------------------------------------------------


class _ProfileMath:
    """The runtime model over a profile's coefficient fields.

    Shared by `Profile` (scalars) and `ProfileArrays` (one entry per instance): the fields have
    the same names in both, so one implementation serves both.
    """

    def prefill_time_s(self, tokens: Any, freq_mhz: Any) -> np.ndarray:
        """Seconds for a prefill pass of ``tokens`` prompt tokens at ``freq_mhz``."""
        return prefill_time_s(
            tokens,
            freq_mhz,
            self.prefill_p0_s,
            self.prefill_p1_s_per_token,
            self.prefill_p2_s_per_token2,
            self.prefill_phi,
            self.max_freq_mhz,
        )

    def decode_iter_time_s(self, batch: Any, ctx_tokens: Any, freq_mhz: Any) -> np.ndarray:
        """Seconds for one decode iteration of ``batch`` sequences of mean context ``ctx_tokens``.

        Returns:
            Array of seconds.
        """
        return decode_iter_time_s(
            batch,
            ctx_tokens,
            freq_mhz,
            self.decode_d0_s,
            self.decode_d1_s_per_seq,
            self.decode_d2_s_per_seq_token,
            self.decode_phi,
            self.max_freq_mhz,
            self.decode_d3_s_per_expert,
            self.decode_moe_experts_per_active,
        )

    def prefill_power_w(self, tokens: Any, freq_mhz: Any) -> np.ndarray:
        """Power per GPU during prefill, W (before the GPU power limit)."""
        return phase_power_w(
            tokens,
            freq_mhz,
            self.idle_power_w,
            self.prefill_max_power_w,
            self.prefill_k_tokens,
            self.power_freq_exponent,
            self.max_freq_mhz,
            self.prefill_busy_power_w,
        )

    def decode_power_w(self, batch: Any, freq_mhz: Any, ctx_tokens: Any = 0.0) -> np.ndarray:
        """Power per GPU during decode, W (before the GPU power limit).

        ``ctx_tokens`` is the batch's mean context: decode power rises with it (the KV cache
        read each step), through the effective load `decode_power_load`.
        """
        return phase_power_w(
            self.decode_power_load(batch, ctx_tokens),
            freq_mhz,
            self.idle_power_w,
            self.decode_max_power_w,
            self.decode_k_batch,
            self.power_freq_exponent,
            self.max_freq_mhz,
            self.decode_busy_power_w,
        )

    def decode_power_load(self, batch: Any, ctx_tokens: Any = 0.0) -> np.ndarray:
        """Decode load that sets decode power: ``batch * (1 + beta * ctx_tokens / 1000)``.

        ``beta`` is ``decode_power_ctx_per_ktok`` (0: power by batch alone, as the JSON tables).
        """
        b = np.asarray(batch, dtype=np.float64)
        return b * (1.0 + self.decode_power_ctx_per_ktok * np.asarray(ctx_tokens, np.float64) / 1000.0)

    def serial_prefill_freq_at_limit_mhz(self, tokens: Any) -> np.ndarray:
        """Clock of a serial prefill pass (``serving.prefill_mode: serial``) under the power limit.

        The pass draws `prefill_serial_power_ratio` of the sustained power above idle
        (`serial_power_limit_w`); with the ratio 1, `prefill_freq_at_limit_mhz`.
        """
        return self.prefill_freq_at_limit_mhz(tokens, serial_power_limit_w(
            self.idle_power_w, self.gpu_power_limit_w, self.prefill_serial_power_ratio))

    def prefill_freq_at_limit_mhz(self, tokens: Any, limit_w: Any | None = None) -> np.ndarray:
        """Clock the power controller settles at during prefill (default limit: the GPU's)."""
        return freq_at_power_limit_mhz(
            tokens,
            self.gpu_power_limit_w if limit_w is None else limit_w,
            self.idle_power_w,
            self.prefill_max_power_w,
            self.prefill_k_tokens,
            self.power_freq_exponent,
            self.min_freq_mhz,
            self.max_freq_mhz,
            self.prefill_busy_power_w,
        )


@dataclass(frozen=True)
class Profile(_ProfileMath):
    """Fitted performance and power coefficients of one (model, GPU, TP degree).

    Times hold at ``max_freq_mhz``; power is per GPU (an instance has ``tp`` GPUs).
    """

    model: str
    gpu: str
    tp: int
    prefill_p0_s: float
    prefill_p1_s_per_token: float
    prefill_p2_s_per_token2: float
    prefill_phi: float
    decode_d0_s: float
    decode_d1_s_per_seq: float
    decode_d2_s_per_seq_token: float
    decode_phi: float
    idle_power_w: float
    prefill_max_power_w: float
    prefill_k_tokens: float
    decode_max_power_w: float
    decode_k_batch: float
    power_freq_exponent: float
    gpu_power_limit_w: float
    kv_capacity_tokens: int
    load_time_s: float
    min_freq_mhz: float
    max_freq_mhz: float
    weights_gb: float
    n_params: int
    n_layers: int
    d_model: int
    n_kv_heads: int
    head_dim: int
    source: str
    prefill_busy_power_w: float = 0.0
    """Prefill power above idle as soon as a pass runs (see `phase_power_w`); 0 in the JSON
    tables, whose curves rise from idle."""
    decode_busy_power_w: float = 0.0
    """Decode power above idle as soon as an iteration runs (see `phase_power_w`)."""
    decode_d3_s_per_expert: float = 0.0
    """Mixture-of-experts models: decode time per expert-equivalent the batch touches
    (`moe_experts_touched`); 0 for dense models and in the JSON tables."""
    decode_moe_experts_per_active: float = 0.0
    """``E / k`` (experts over experts per token) of a mixture-of-experts model; 0: dense."""
    decode_power_ctx_per_ktok: float = 0.0
    """How decode power's load grows with the batch's mean context, per 1,000 tokens
    (`decode_power_load`): each step reads the batch's KV cache as well as the weights. 0 in the
    JSON tables, whose decode power was measured by batch alone."""
    prefill_serial_power_ratio: float = 1.0
    """A prefill pass run alone between decode iterations (``serving.prefill_mode: serial``) draws
    this share of the sustained prefill power above idle, and the GPU power limit pulls its clock
    down only where that share exceeds it (`Coefficients.serial_prefill_power_ratio`, fitted per
    node); 1: as sustained prefill (the JSON tables, the shipped derived profiles)."""
    fit_error: Mapping[str, Mapping[str, float]] = dataclasses.field(
        default_factory=dict, compare=False
    )
    """Fit error of the coefficients against what they were fitted to, by quantity (derived
    profiles: percent, ``median_abs_pct``, ``max_abs_pct``, ``n``; see `shape_profiles`). Empty
    for the JSON tables (their errors are in the files). Not numeric: `ProfileArrays` omits it."""


_STR_FIELDS = ("model", "gpu", "source")
_NON_NUMERIC = (*_STR_FIELDS, "fit_error")
_INT_FIELDS = (
    "tp",
    "kv_capacity_tokens",
    "n_params",
    "n_layers",
    "d_model",
    "n_kv_heads",
    "head_dim",
)
_NUM_FIELDS = tuple(f.name for f in dataclasses.fields(Profile) if f.name not in _NON_NUMERIC)


@dataclass(frozen=True)
class ProfileArrays(_ProfileMath):
    """Struct of arrays: the fields of :class:`Profile`, one entry per instance.

    Build with :meth:`stack`, gather per instance with :meth:`take`. Methods take arrays aligned
    with the entries (or broadcastable to them) and return one value per entry.
    """

    model: np.ndarray
    gpu: np.ndarray
    tp: np.ndarray
    prefill_p0_s: np.ndarray
    prefill_p1_s_per_token: np.ndarray
    prefill_p2_s_per_token2: np.ndarray
    prefill_phi: np.ndarray
    decode_d0_s: np.ndarray
    decode_d1_s_per_seq: np.ndarray
    decode_d2_s_per_seq_token: np.ndarray
    decode_phi: np.ndarray
    idle_power_w: np.ndarray
    prefill_max_power_w: np.ndarray
    prefill_k_tokens: np.ndarray
    decode_max_power_w: np.ndarray
    decode_k_batch: np.ndarray
    power_freq_exponent: np.ndarray
    gpu_power_limit_w: np.ndarray
    kv_capacity_tokens: np.ndarray
    load_time_s: np.ndarray
    min_freq_mhz: np.ndarray
    max_freq_mhz: np.ndarray
    weights_gb: np.ndarray
    n_params: np.ndarray
    n_layers: np.ndarray
    d_model: np.ndarray
    n_kv_heads: np.ndarray
    head_dim: np.ndarray
    source: np.ndarray
    prefill_busy_power_w: np.ndarray
    decode_busy_power_w: np.ndarray
    decode_d3_s_per_expert: np.ndarray
    decode_moe_experts_per_active: np.ndarray
    decode_power_ctx_per_ktok: np.ndarray
    prefill_serial_power_ratio: np.ndarray

    @classmethod
    def stack(cls, profiles: Sequence[Profile]) -> ProfileArrays:
        """Stack profiles (repeats allowed: one per instance) into arrays.

        Only the fields of this class are stacked: non-numeric ones such as ``Profile.fit_error``
        stay with the profiles.
        """
        if len(profiles) == 0:
            raise ProfileError("ProfileArrays.stack: got no profiles")
        cols: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(cls):
            values = [getattr(p, f.name) for p in profiles]
            if f.name in _STR_FIELDS:
                cols[f.name] = np.asarray(values, dtype=object)
            elif f.name in _INT_FIELDS:
                cols[f.name] = np.asarray(values, dtype=np.int64)
            else:
                cols[f.name] = np.asarray(values, dtype=np.float64)
        return cls(**cols)

    def __len__(self) -> int:
        return int(self.tp.shape[0])

    def take(self, index: np.ndarray) -> ProfileArrays:
        """Gather entries, e.g. ``library_arrays.take(profile_id_of_instance)``."""
        idx = np.asarray(index)
        return ProfileArrays(
            **{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)}
        )



# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

# Grid name -> the columns it must have (all equal length, finite, >= 0).
REQUIRED_GRIDS: dict[str, tuple[str, ...]] = {
    "prefill": ("tokens", "time_s_measured", "freq_mhz", "time_s_at_max_freq"),
    "decode": ("batch", "ctx_tokens", "time_s"),
    "prefill_power": ("tokens", "freq_mhz", "power_w"),
    "decode_power": ("batch", "power_w"),
}
REQUIRED_FIT_ERRORS = ("prefill_time", "decode_time", "prefill_power", "decode_power")
_PHI_FIELDS = ("prefill_phi", "decode_phi")
_OPTIONAL_COEFFS = ("prefill_busy_power_w", "decode_busy_power_w", "decode_power_ctx_per_ktok",
                    "prefill_serial_power_ratio",
                    "decode_d3_s_per_expert", "decode_moe_experts_per_active")


def _require(obj: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ProfileError(f"{path}: missing field '{where}{key}'")
    return obj[key]


def _finite_nonneg(value: Any, field: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{path}: field '{field}' must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise ProfileError(f"{path}: field '{field}' must be finite and >= 0, got {value!r}")
    return v


def _check_grids(grids: Any, path: Path) -> None:
    if not isinstance(grids, dict):
        raise ProfileError(f"{path}: field 'grids' must be an object, got {type(grids).__name__}")
    for name, columns in REQUIRED_GRIDS.items():
        grid = _require(grids, name, "grids.", path)
        length = None
        for col in columns:
            field = f"grids.{name}.{col}"
            values = _require(grid, col, f"grids.{name}.", path)
            if not isinstance(values, list) or len(values) == 0:
                raise ProfileError(
                    f"{path}: field '{field}' must be a non-empty list, got {values!r}"
                )
            for i, v in enumerate(values):
                _finite_nonneg(v, f"{field}[{i}]", path)
            if length is None:
                length = len(values)
            elif len(values) != length:
                raise ProfileError(
                    f"{path}: field '{field}' has {len(values)} points, other columns of "
                    f"grids.{name} have {length} (a hole in the grid)"
                )


def profile_from_dict(data: dict[str, Any], path: Path) -> Profile:
    """Validate one parsed profile JSON and build its :class:`Profile`.

    Raises:
        ProfileError: On a missing field, a wrong type, a NaN/negative value or a grid hole.
    """
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: top level must be an object")
    version = _require(data, "schema_version", "", path)
    if version != SCHEMA_VERSION:
        raise ProfileError(
            f"{path}: field 'schema_version' must be {SCHEMA_VERSION}, got {version!r}"
        )
    _require(data, "provenance", "", path)
    _check_grids(_require(data, "grids", "", path), path)
    fit_error = _require(data, "fit_error", "", path)
    for q in REQUIRED_FIT_ERRORS:
        err = _require(fit_error, q, "fit_error.", path)
        for k in ("mape_pct", "max_abs_pct"):
            _finite_nonneg(_require(err, k, f"fit_error.{q}.", path), f"fit_error.{q}.{k}", path)
    coeffs = _require(data, "coefficients", "", path)
    shape = _require(data, "model_shape", "", path)

    kwargs: dict[str, Any] = {}
    for key in ("model", "gpu"):
        value = _require(data, key, "", path)
        if not isinstance(value, str) or not value:
            raise ProfileError(f"{path}: field '{key}' must be a non-empty string, got {value!r}")
        kwargs[key] = value
    tp = _require(data, "tp", "", path)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ProfileError(f"{path}: field 'tp' must be an integer >= 1, got {tp!r}")
    kwargs["tp"] = tp
    for name in _NUM_FIELDS:
        if name == "tp":
            continue
        if name in _OPTIONAL_COEFFS and name not in coeffs:
            continue  # the dataclass default
        if name in ("n_params", "n_layers", "d_model", "n_kv_heads", "head_dim"):
            field, value = f"model_shape.{name}", _require(shape, name, "model_shape.", path)
        else:
            field, value = f"coefficients.{name}", _require(coeffs, name, "coefficients.", path)
        v = _finite_nonneg(value, field, path)
        if name in _PHI_FIELDS and v > 1.0:
            raise ProfileError(f"{path}: field '{field}' must be in [0, 1], got {value!r}")
        kwargs[name] = int(v) if name in _INT_FIELDS else v
    if kwargs["min_freq_mhz"] <= 0 or kwargs["min_freq_mhz"] > kwargs["max_freq_mhz"]:
        raise ProfileError(
            f"{path}: fields 'coefficients.min_freq_mhz'={kwargs['min_freq_mhz']} and "
            f"'coefficients.max_freq_mhz'={kwargs['max_freq_mhz']} must satisfy 0 < min <= max"
        )
    for name in ("prefill_k_tokens", "decode_k_batch", "power_freq_exponent", "prefill_serial_power_ratio"):
        if kwargs.get(name, 1.0) <= 0:  # the ratio is optional (default 1)
            raise ProfileError(
                f"{path}: field 'coefficients.{name}' must be > 0, got {kwargs[name]}"
            )
    kwargs["source"] = str(path.name)
    return Profile(**kwargs)


def load_profile(path: Path) -> Profile:
    """Read and validate one profile JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile file ({exc})") from exc
    try:
        data = json.loads(text)  # json accepts NaN/Infinity; validation rejects them
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc})") from exc
    return profile_from_dict(data, path)


class ProfileLibrary:
    """Profiles keyed by (model, gpu, tp): the given ones (JSON tables), else derived ones.

    A key held by the library (a JSON profile of ``envs/data/profiles``) is returned as it is;
    any other key whose model is a shipped model shape (``envs/data/models``) and whose GPU is
    known (``envs/data/gpus.json``) gets the profile derived from the shape-based performance
    model (`shape_profiles.derive_profile`, cached).
    """

    def __init__(self, profiles: Sequence[Profile]) -> None:
        self._profiles: dict[tuple[str, str, int], Profile] = {}
        for p in profiles:
            key = (p.model, p.gpu, p.tp)
            if key in self._profiles:
                raise ProfileError(
                    f"duplicate profile {key}: {self._profiles[key].source} and {p.source}"
                )
            self._profiles[key] = p

    @classmethod
    def load(cls, directory: Path | None = None) -> ProfileLibrary:
        """Load every ``*.json`` profile in ``directory`` (default: the shipped profiles)."""
        d = DEFAULT_PROFILE_DIR if directory is None else Path(directory)
        files = sorted(d.glob("*.json"))
        if not files:
            raise ProfileError(f"{d}: no profile *.json files")
        return cls([load_profile(f) for f in files])

    def get(self, model: str, gpu: str, tp: int) -> Profile:
        """The profile for (model, gpu, tp): the held one, else the derived one.

        Raises:
            ProfileError: Unknown model (listing the profiled models and the shipped shapes),
                unknown GPU (listing the known ones), or a TP degree that is not held or does not
                fit (naming model, GPU and TP).
        """
        from llm_cluster_gym.envs.sim import shape_profiles

        key = (model, gpu, int(tp))
        if key in self._profiles:
            return self._profiles[key]
        if shape_profiles.is_shape_model(model):
            return shape_profiles.derive_profile(model, gpu, int(tp))
        held = sorted({m for m, _, _ in self._profiles})
        if model not in held:
            raise ProfileError(
                f"unknown model {model!r}: no profile and not a shipped model shape; profiled: "
                f"{', '.join(held) or 'none'}; shapes: {', '.join(shape_profiles.shipped_models())}"
            )
        have = ", ".join(f"{m}/{g}/tp{t}" for m, g, t in sorted(self._profiles))
        raise ProfileError(
            f"no profile for model={model!r} gpu={gpu!r} tp={tp!r}; available: {have}"
        )

    def tps(self, model: str, gpu: str) -> list[int]:
        """TP degrees available for (model, gpu), ascending.

        The held ones and, for a shipped shape on a known GPU, those of 1, 2, 4, 8 whose weights
        fit; empty for an unknown model or GPU.
        """
        from llm_cluster_gym.envs.sim import shape_profiles

        out = {t for m, g, t in self._profiles if m == model and g == gpu}
        if shape_profiles.is_shape_model(model) and gpu in shape_profiles.gpu_keys():
            out.update(shape_profiles.fitting_tps(model, gpu))
        return sorted(out)

    def models(self) -> list[str]:
        """Model names with at least one held profile, and the shipped model shapes."""
        from llm_cluster_gym.envs.sim import shape_profiles

        return sorted({m for m, _, _ in self._profiles} | set(shape_profiles.shipped_models()))

    def gpus(self, model: str) -> list[str]:
        """GPU types with a held profile for ``model`` or, for a shape, at least one fitting TP degree."""
        from llm_cluster_gym.envs.sim import shape_profiles

        out = {g for m, g, _ in self._profiles if m == model}
        if shape_profiles.is_shape_model(model):
            out.update(g for g in shape_profiles.gpu_keys() if shape_profiles.fitting_tps(model, g))
        return sorted(out)

    def profiles(self) -> list[Profile]:
        """The held profiles (not the derived ones), sorted by (model, gpu, tp)."""
        return [self._profiles[k] for k in sorted(self._profiles)]

    def __len__(self) -> int:
        """Number of held profiles."""
        return len(self._profiles)
