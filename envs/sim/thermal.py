"""GPU and aisle thermal models of the simulated datacenter.

GPU: a two-node (die + heatsink) RC model driven by the GPU's power, on top of the aisle
inlet temperature::

    T_gpu = T_inlet + x_die + x_sink
    dx_i/dt = (R_i * P - x_i) / tau_i          for i in {die, sink}

Why two nodes: real H100 recordings (``envs/data/thermal/recordings``) show a jump of
about +15 C within a second of a load step (die) and a second, slower drift over one to
two minutes (heatsink). A single first-order model leaves errors of several degrees; the
fitted numbers and both models' errors are in ``envs/data/thermal/h100_thermal_fit.json``
(made by ``scripts/fit_thermal.py``).

The update is the exact solution for power held constant over the step,
``x <- R*P + (x - R*P) * exp(-dt/tau)``, so it is stable and exact for any ``dt``, also
for ``dt`` much longer than ``tau_die``.

Aisle: the inlet temperature of an aisle follows a first-order response (minutes) toward a
steady value that sits at the supply setpoint while the aisle's heat load is below its
cooling capacity and rises with the overload (hot-air recirculation) above it; see
:class:`AisleCoolingParams`.

All functions are vectorized over GPUs (or aisles) with numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.sim import thermal_kernels
from llm_cluster_gym.envs.sim.compiled import per_element

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "thermal"
DEFAULT_FIT_PATH = DATA_DIR / "h100_thermal_fit.json"
DEFAULT_AISLE_PATH = DATA_DIR / "aisle_cooling_default.json"


class ThermalError(ValueError):
    """Bad thermal parameters or inputs; the message names the file, field and value."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise ThermalError(f"{path}: file not found") from exc
    except json.JSONDecodeError as exc:
        raise ThermalError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ThermalError(f"{path}: top level must be an object, got {type(data).__name__}")
    return data


def _section(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    sec = data.get(key)
    if not isinstance(sec, dict):
        raise ThermalError(f"{path}: field '{key}' missing or not an object (got {sec!r})")
    return sec


def _number(
    sec: dict[str, Any], key: str, path: Path, where: str, *, positive: bool = False
) -> float:
    """Fetch a finite number (optionally > 0) from ``sec`` or raise naming file and field."""
    if key not in sec:
        raise ThermalError(f"{path}: field '{where}.{key}' is missing")
    val = sec[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        raise ThermalError(f"{path}: field '{where}.{key}' must be a finite number, got {val!r}")
    if positive and val <= 0:
        raise ThermalError(f"{path}: field '{where}.{key}' must be > 0, got {val!r}")
    return float(val)


@dataclass(frozen=True)
class ThermalParams:
    """Parameters of the two-node GPU thermal model and the GPU's NVML thresholds.

    Attributes:
        r_die_c_per_w: Die-to-heatsink thermal resistance (C per W of GPU power).
        tau_die_s: Die time constant (s): the fast jump after a load step.
        r_sink_c_per_w: Heatsink-to-inlet-air thermal resistance (C per W).
        tau_sink_s: Heatsink time constant (s): the slow drift.
        slowdown_temp_c: NVML slowdown threshold: past it the GPU throttles its clocks.
        max_operating_temp_c: NVML "GPU max operating" threshold.
        shutdown_temp_c: NVML shutdown threshold.
        source: Where the numbers came from (file, command, recordings).
    """

    r_die_c_per_w: float
    tau_die_s: float
    r_sink_c_per_w: float
    tau_sink_s: float
    slowdown_temp_c: float
    max_operating_temp_c: float
    shutdown_temp_c: float
    source: str

    @property
    def r_total_c_per_w(self) -> float:
        """Steady-state rise above inlet per watt (C/W)."""
        return self.r_die_c_per_w + self.r_sink_c_per_w

    @classmethod
    def load(cls, path: Path | None = None) -> ThermalParams:
        """Load and validate a fit file (default: the shipped H100 joint fit).

        Args:
            path: JSON file with ``params`` (``r_die_c_per_w``, ``tau_die_s``,
                ``r_sink_c_per_w``, ``tau_sink_s``) and ``thresholds``
                (``slowdown_temp_c``, ``max_operating_temp_c``, ``shutdown_temp_c``).

        Returns:
            The validated parameters.

        Raises:
            ThermalError: Missing file or field, non-finite or non-positive values, or
                thresholds out of order; the message names the file, field and value.
        """
        path = Path(path) if path is not None else DEFAULT_FIT_PATH
        data = _read_json(path)
        p = _section(data, "params", path)
        th = _section(data, "thresholds", path)
        vals = {
            k: _number(p, k, path, "params", positive=True)
            for k in ("r_die_c_per_w", "tau_die_s", "r_sink_c_per_w", "tau_sink_s")
        }
        for k in ("slowdown_temp_c", "max_operating_temp_c", "shutdown_temp_c"):
            vals[k] = _number(th, k, path, "thresholds")
        if not vals["slowdown_temp_c"] < vals["shutdown_temp_c"]:
            raise ThermalError(
                f"{path}: field 'thresholds.shutdown_temp_c' ({vals['shutdown_temp_c']}) must "
                f"exceed 'thresholds.slowdown_temp_c' ({vals['slowdown_temp_c']})"
            )
        source = data.get("source", "")
        if not isinstance(source, str) or not source:
            raise ThermalError(f"{path}: field 'source' must be a non-empty string, got {source!r}")
        return cls(source=f"{path.name}: {source}", **vals)


@dataclass
class GpuThermalState:
    """Per-GPU temperature rises above the inlet (C) of the die and heatsink nodes."""

    x_die_c: np.ndarray
    x_sink_c: np.ndarray

    @classmethod
    def zeros(cls, n_gpus: int) -> GpuThermalState:
        """A cold start: every GPU at its inlet temperature."""
        return cls(np.zeros(n_gpus), np.zeros(n_gpus))

    @classmethod
    def steady(cls, power_w: np.ndarray, params: ThermalParams) -> GpuThermalState:
        """The state after holding ``power_w`` for a long time (e.g. idle at reset)."""
        p = np.asarray(power_w, dtype=float)
        return cls(params.r_die_c_per_w * p, params.r_sink_c_per_w * p)


def step_gpu_temperature(
    state: GpuThermalState,
    power_w: np.ndarray,
    inlet_c: np.ndarray,
    dt_s: float,
    params: ThermalParams,
) -> np.ndarray:
    """Advance every GPU's temperature by ``dt_s`` with power held constant over the step.

    Exact discretisation of the two-node model, so any ``dt_s >= 0`` is stable.

    Args:
        state: Node rises above inlet; updated in place.
        power_w: Power of each GPU over the step (W), shape like the state.
        inlet_c: Inlet air temperature of each GPU (C), broadcastable to the state.
        dt_s: Step length (s).
        params: Model parameters.

    Returns:
        GPU (die) temperature of each GPU at the end of the step (C).

    Raises:
        ThermalError: ``dt_s`` negative or not finite.
    """
    if not math.isfinite(dt_s) or dt_s < 0:
        raise ThermalError(f"step_gpu_temperature: dt_s must be finite and >= 0, got {dt_s!r}")
    p = np.asarray(power_w, dtype=float)
    a_die = math.exp(-dt_s / params.tau_die_s)
    a_sink = math.exp(-dt_s / params.tau_sink_s)
    x_die, x_sink = state.x_die_c, state.x_sink_c
    if p.ndim == 1 and x_die.shape == p.shape == x_sink.shape and x_die.dtype == x_sink.dtype == p.dtype:
        # The usual case, one compiled loop (the same figures as the expressions below).
        out = np.empty_like(p)
        inlet = np.asarray(inlet_c, dtype=float)
        thermal_kernels.step_gpu(x_die, x_sink, p, per_element(inlet, p.shape),
                                 params.r_die_c_per_w, params.r_sink_c_per_w, a_die, a_sink, out)
        return out
    ss_die = params.r_die_c_per_w * p
    ss_sink = params.r_sink_c_per_w * p
    state.x_die_c[...] = ss_die + (state.x_die_c - ss_die) * a_die
    state.x_sink_c[...] = ss_sink + (state.x_sink_c - ss_sink) * a_sink
    return np.asarray(inlet_c, dtype=float) + state.x_die_c + state.x_sink_c


def step_response_c(
    t_s: np.ndarray, power_w: np.ndarray, inlet_c: np.ndarray, params: ThermalParams
) -> np.ndarray:
    """Analytic temperature after ``t_s`` seconds of constant power from zero rise.

    Args:
        t_s: Time since the step (s), >= 0; broadcast against the others.
        power_w: Constant power (W).
        inlet_c: Constant inlet temperature (C).
        params: Model parameters.

    Returns:
        ``inlet + R_die*P*(1-exp(-t/tau_die)) + R_sink*P*(1-exp(-t/tau_sink))`` (C).
    """
    t = np.asarray(t_s, dtype=float)
    p = np.asarray(power_w, dtype=float)
    rise_die = params.r_die_c_per_w * p * -np.expm1(-t / params.tau_die_s)
    rise_sink = params.r_sink_c_per_w * p * -np.expm1(-t / params.tau_sink_s)
    return np.asarray(inlet_c, dtype=float) + rise_die + rise_sink


def steady_state_temp_c(
    power_w: np.ndarray, inlet_c: np.ndarray, params: ThermalParams
) -> np.ndarray:
    """Temperature reached after holding ``power_w`` indefinitely: inlet + (R_die+R_sink)*P."""
    p = np.asarray(power_w, dtype=float)
    return np.asarray(inlet_c, dtype=float) + params.r_total_c_per_w * p


# --------------------------------------------------------------------------------------
# Aisle inlet temperature
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AisleCoolingParams:
    """Scenario-level parameters of the aisle inlet-temperature model.

    Steady inlet temperature of an aisle::

        T_ss = supply_temp_c
               + outside_temp_coeff * max(0, outside_c - supply_temp_c)
               + overload_c_per_frac * max(0, load_w - capacity_w) / capacity_w

    and the inlet relaxes toward ``T_ss`` with time constant ``tau_inlet_s``.

    Attributes:
        supply_temp_c: Cold-aisle supply setpoint (C). ASHRAE TC 9.9 recommends an inlet
            envelope of 18-27 C; the setpoint is chosen inside it.
        outside_temp_coeff: Inlet rise per C of outside air above the setpoint (C/C):
            the part of outside heat an economizer lets through (modelling assumption).
        overload_c_per_frac: Inlet rise per unit fractional overload of the aisle
            (C per (load-capacity)/capacity): hot-air recirculation (modelling assumption).
        tau_inlet_s: Time constant of the inlet response (s), minutes (modelling
            assumption: thermal mass of the room air and equipment).
        source: Where the numbers came from.
    """

    supply_temp_c: float
    outside_temp_coeff: float
    overload_c_per_frac: float
    tau_inlet_s: float
    source: str

    @classmethod
    def load(cls, path: Path | None = None) -> AisleCoolingParams:
        """Load and validate aisle cooling parameters (default: the shipped defaults).

        Raises:
            ThermalError: Missing or invalid field; the message names file, field, value.
        """
        path = Path(path) if path is not None else DEFAULT_AISLE_PATH
        data = _read_json(path)
        p = _section(data, "params", path)
        vals = {
            "supply_temp_c": _number(p, "supply_temp_c", path, "params"),
            "outside_temp_coeff": _number(p, "outside_temp_coeff", path, "params"),
            "overload_c_per_frac": _number(p, "overload_c_per_frac", path, "params"),
            "tau_inlet_s": _number(p, "tau_inlet_s", path, "params", positive=True),
        }
        for k in ("outside_temp_coeff", "overload_c_per_frac"):
            if vals[k] < 0:
                raise ThermalError(f"{path}: field 'params.{k}' must be >= 0, got {vals[k]!r}")
        source = data.get("source", "")
        if not isinstance(source, str) or not source:
            raise ThermalError(f"{path}: field 'source' must be a non-empty string, got {source!r}")
        return cls(source=f"{path.name}: {source}", **vals)


def inlet_steady_state_c(
    load_w: np.ndarray, capacity_w: np.ndarray, outside_c: np.ndarray, params: AisleCoolingParams
) -> np.ndarray:
    """Steady inlet temperature per aisle (C); see :class:`AisleCoolingParams`.

    Raises:
        ThermalError: A cooling capacity that is not > 0 (model a cooling failure as a
            partial capacity loss).
    """
    cap = np.asarray(capacity_w, dtype=float)
    if np.count_nonzero(cap > 0) != cap.size:  # NaN fails too
        raise ThermalError(f"inlet model: capacity_w must be > 0, got {cap[~(cap > 0)]!r}")
    overload_frac = np.maximum(0.0, np.asarray(load_w, dtype=float) - cap) / cap
    warm_outside_c = np.maximum(0.0, np.asarray(outside_c, dtype=float) - params.supply_temp_c)
    return (
        params.supply_temp_c
        + params.outside_temp_coeff * warm_outside_c
        + params.overload_c_per_frac * overload_frac
    )


def step_inlet_temperature(
    inlet_c: np.ndarray,
    load_w: np.ndarray,
    capacity_w: np.ndarray,
    outside_c: np.ndarray,
    dt_s: float,
    params: AisleCoolingParams,
) -> np.ndarray:
    """Advance each aisle's inlet temperature by ``dt_s`` (exact first-order step).

    Args:
        inlet_c: Current inlet temperature per aisle (C).
        load_w: Heat load per aisle over the step (W): the IT power it must remove.
        capacity_w: Cooling capacity per aisle (W), > 0.
        outside_c: Outside air temperature (C), broadcastable.
        dt_s: Step length (s), >= 0.
        params: Aisle cooling parameters.

    Returns:
        The new inlet temperature per aisle (C); the input is not modified.

    Raises:
        ThermalError: Negative ``dt_s`` or non-positive capacity.
    """
    if not math.isfinite(dt_s) or dt_s < 0:
        raise ThermalError(f"step_inlet_temperature: dt_s must be finite and >= 0, got {dt_s!r}")
    decay = math.exp(-dt_s / params.tau_inlet_s)
    inlet = np.asarray(inlet_c, dtype=float)
    load, cap = np.asarray(load_w, dtype=float), np.asarray(capacity_w, dtype=float)
    if inlet.ndim == 1 and load.shape == inlet.shape == cap.shape:
        # The usual case, one compiled loop (the same figures as the expressions below).
        out = np.empty_like(inlet)
        if thermal_kernels.step_inlet(inlet, load, cap,
                                      per_element(outside_c, inlet.shape),
                                      params.supply_temp_c, params.outside_temp_coeff,
                                      params.overload_c_per_frac, decay, out):
            return out
    ss = inlet_steady_state_c(load_w, capacity_w, outside_c, params)
    return ss + (inlet - ss) * decay


class OutsideAir:
    """Outside air temperature: a daily sine, coldest at midnight (memoized for the last time asked).

    Args:
        mean_c: Daily mean (C).
        amplitude_c: Half the daily swing (C).
    """

    def __init__(self, mean_c: float, amplitude_c: float) -> None:
        self.mean_c, self.amplitude_c = mean_c, amplitude_c
        self._memo = (math.nan, 0.0)

    def temp_c(self, t_s: float) -> float:
        """Temperature at ``t_s`` seconds after midnight of day 0 (telemetry asks, then the tick)."""
        last_t, last_c = self._memo
        if t_s == last_t:
            return last_c
        c = self.mean_c + self.amplitude_c * np.sin(2 * np.pi * (t_s / 86400.0 - 0.25))
        self._memo = (t_s, c)
        return c
