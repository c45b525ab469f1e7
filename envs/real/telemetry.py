"""GPU telemetry: a device abstraction over NVML, a recorded-file replay, and a sampler thread.

Layout follows zeus (``zeus/device/gpu/common.py``, ``nvidia.py``): an abstract
:class:`GpuDevice` with units in every name, an NVML implementation (:class:`NvmlGpuDevice`)
and a :class:`ReplayGpuDevice` that plays back a telemetry file recorded on a real GPU, so
CPU tests exercise the same code on real numbers instead of mocks.

:class:`TelemetrySampler` reads every device at a fixed rate (>= 20 Hz) from a background
thread into a bounded ring buffer per GPU. Energy over a window comes from the hardware
total-energy counter and is cross-checked against the integral of the power readings
(:meth:`TelemetrySampler.energy_j`). NVML's power reading on an H100 is a ~1 s trailing
average while the counter follows the real draw, so the two agree over windows of several
seconds, not over a single prefill burst.

Only reads happen here. Privileged calls (locked clocks, power limits) exist on the device
for :mod:`envs.real.actuators`, which guards them behind an explicit opt-in.
"""

from __future__ import annotations

import abc
import gzip
import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS: tuple[str, ...] = (
    "t_s",
    "power_w",
    "energy_mj",
    "temp_c",
    "mem_temp_c",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "throttle_mask",
    "util_gpu_pct",
    "util_mem_pct",
    "mem_used_mib",
)
"""Columns of one telemetry sample (NaN where the GPU or driver does not report a value)."""

_COL = {name: i for i, name in enumerate(COLUMNS)}

# Column names of the older recordings in envs/data/thermal/recordings -> ours.
_LEGACY_NAMES = {
    "t": "t_s",
    "gpu_temp_c": "temp_c",
    "throttle_reasons": "throttle_mask",
    "util_pct": "util_gpu_pct",
}

THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
"""NVML clock-event ("throttle") reason bits, from ``nvml.h`` (``nvmlClocksEventReason*``)."""

THERMAL_MASK = 0x20 | 0x40
"""Bits that mean the GPU slowed its clocks for temperature."""

POWER_MASK = 0x4 | 0x80
"""Bits that mean the GPU slowed its clocks for power (its own limit or the power brake)."""


class GpuUnavailableError(RuntimeError):
    """NVML cannot be used here: no driver, no GPU, a missing package or no permission."""


class TelemetryFileError(ValueError):
    """A telemetry recording is unreadable or malformed; the message names file, field, value."""


def decode_throttle_reasons(mask: int | float) -> tuple[str, ...]:
    """Names of the clock-event reason bits set in ``mask`` (unknown bits as ``bit_0x..``).

    Args:
        mask: NVML clock-event reason bitmask (NaN or negative gives no names).

    Returns:
        Reason names in bit order.
    """
    if mask is None or (isinstance(mask, float) and not math.isfinite(mask)) or mask < 0:
        return ()
    m = int(mask)
    names = []
    bit = 1
    while bit <= m:
        if m & bit:
            names.append(THROTTLE_REASONS.get(bit, f"bit_{bit:#x}"))
        bit <<= 1
    return tuple(names)


@dataclass(frozen=True)
class GpuStatic:
    """Facts about a GPU that do not change while it runs (read once)."""

    index: int
    name: str
    driver: str
    power_limit_w: float
    power_limit_range_w: tuple[float, float]
    slowdown_temp_c: float
    shutdown_temp_c: float
    max_sm_clock_mhz: float
    supported_sm_clocks_mhz: tuple[float, ...] = ()
    serial: str = ""
    uuid: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


class GpuDevice(abc.ABC):
    """One GPU whose telemetry can be read (and, for real GPUs, whose settings can be changed).

    Reading is always allowed. The privileged setters are for :mod:`envs.real.actuators`
    only, which logs them, restores them and keeps them off unless explicitly enabled.
    """

    index: int

    @abc.abstractmethod
    def static(self) -> GpuStatic:
        """Static facts (name, driver, limits, thresholds)."""

    @abc.abstractmethod
    def read(self) -> np.ndarray:
        """One sample as a float array in :data:`COLUMNS` order (``t_s`` = Unix time)."""

    # Privileged operations (only real devices implement them).
    def set_locked_sm_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        """Lock the SM clock range (privileged)."""
        raise NotImplementedError(f"{type(self).__name__} cannot lock clocks")

    def reset_locked_sm_clocks(self) -> None:
        """Undo a clock lock (privileged)."""
        raise NotImplementedError(f"{type(self).__name__} cannot reset clocks")

    def power_limit_mw(self) -> int:
        """Current enforced power limit in mW."""
        return int(self.static().power_limit_w * 1000)

    def set_power_limit_mw(self, limit_mw: int) -> None:
        """Set the power limit (privileged)."""
        raise NotImplementedError(f"{type(self).__name__} cannot set a power limit")


# ---------------------------------------------------------------------------------------------
# NVML
# ---------------------------------------------------------------------------------------------


def _nvml() -> Any:
    """Import and initialise NVML, or raise :class:`GpuUnavailableError` saying why not."""
    try:
        import pynvml
    except ImportError as exc:
        raise GpuUnavailableError(
            "NVML is not available: the Python package nvidia-ml-py (module pynvml) is not "
            "installed"
        ) from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, NoPermission, ...
        raise GpuUnavailableError(
            f"NVML could not be initialised ({type(exc).__name__}: {exc}); is an NVIDIA driver "
            "installed and a GPU visible to this process?"
        ) from exc
    return pynvml


def _try(fn: Callable[[], Any]) -> Any:
    """Call one NVML reader; None when this GPU or driver does not support it."""
    try:
        return fn()
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_device_count() -> int:
    """Number of GPUs NVML sees.

    Raises:
        GpuUnavailableError: No driver, no GPU, missing package or no permission.
    """
    n = _nvml()
    try:
        return int(n.nvmlDeviceGetCount())
    except Exception as exc:
        raise GpuUnavailableError(f"NVML could not count GPUs: {exc}") from exc


class NvmlGpuDevice(GpuDevice):
    """A real GPU read through NVML (nvidia-ml-py).

    Args:
        index: NVML index of the GPU.

    Raises:
        GpuUnavailableError: No driver, no GPU with this index, or no permission.
    """

    def __init__(self, index: int = 0) -> None:
        self._n = _nvml()
        self.index = int(index)
        try:
            self._h = self._n.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:
            raise GpuUnavailableError(f"NVML has no GPU with index {index}: {exc}") from exc
        # Newer NVML calls throttle reasons "clock event reasons"; use whichever exists.
        self._reasons = (getattr(self._n, "nvmlDeviceGetCurrentClocksEventReasons", None)
                         or self._n.nvmlDeviceGetCurrentClocksThrottleReasons)
        self._static: GpuStatic | None = None

    def static(self) -> GpuStatic:
        """Static facts, read once from NVML."""
        if self._static is None:
            n, h = self._n, self._h
            lim = _try(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h)) or 0
            rng = _try(lambda: n.nvmlDeviceGetPowerManagementLimitConstraints(h)) or (0, 0)

            def thr(name: str) -> float:
                c = getattr(n, f"NVML_TEMPERATURE_THRESHOLD_{name}", None)
                v = None if c is None else _try(lambda: n.nvmlDeviceGetTemperatureThreshold(h, c))
                return float("nan") if v is None else float(v)

            mem_clocks = _try(lambda: n.nvmlDeviceGetSupportedMemoryClocks(h)) or []
            sm = (_try(lambda: n.nvmlDeviceGetSupportedGraphicsClocks(h, mem_clocks[0]))
                  if mem_clocks else None) or []
            self._static = GpuStatic(
                index=self.index,
                name=_text(_try(lambda: n.nvmlDeviceGetName(h))),
                driver=_text(_try(lambda: n.nvmlSystemGetDriverVersion())),
                power_limit_w=lim / 1000.0,
                power_limit_range_w=(rng[0] / 1000.0, rng[1] / 1000.0),
                slowdown_temp_c=thr("SLOWDOWN"),
                shutdown_temp_c=thr("SHUTDOWN"),
                max_sm_clock_mhz=float(_try(lambda: n.nvmlDeviceGetMaxClockInfo(h, n.NVML_CLOCK_SM))
                                       or "nan"),
                supported_sm_clocks_mhz=tuple(sorted(float(c) for c in sm)),
                # Which board this is: recordings from different lent machines can differ.
                serial=_text(_try(lambda: n.nvmlDeviceGetSerial(h)) or ""),
                uuid=_text(_try(lambda: n.nvmlDeviceGetUUID(h)) or ""),
            )
        return self._static

    def _mem_temp_c(self) -> float | None:
        fv = self._n.nvmlDeviceGetFieldValues(self._h, [self._n.NVML_FI_DEV_MEMORY_TEMP])[0]
        return float(fv.value.uiVal) if fv.nvmlReturn == 0 else None

    def read(self) -> np.ndarray:
        """One sample from NVML (about 1 ms on an H100)."""
        n, h = self._n, self._h
        t = time.time()
        pw = _try(lambda: n.nvmlDeviceGetPowerUsage(h))
        util = _try(lambda: n.nvmlDeviceGetUtilizationRates(h))
        mem = _try(lambda: n.nvmlDeviceGetMemoryInfo(h))
        vals = (
            t,
            None if pw is None else pw / 1000.0,
            _try(lambda: n.nvmlDeviceGetTotalEnergyConsumption(h)),
            _try(lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
            _try(self._mem_temp_c),
            _try(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
            _try(lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),
            _try(lambda: self._reasons(h)),
            None if util is None else util.gpu,
            None if util is None else util.memory,
            None if mem is None else mem.used / 2**20,
        )
        return np.array([np.nan if v is None else float(v) for v in vals])

    # Privileged calls: used only through envs.real.actuators (which remembers what it locked).
    def set_locked_sm_clocks_mhz(self, min_mhz: float, max_mhz: float) -> None:
        """Lock the SM clock range (needs root; changes the GPU for every user)."""
        self._n.nvmlDeviceSetGpuLockedClocks(self._h, int(min_mhz), int(max_mhz))

    def reset_locked_sm_clocks(self) -> None:
        """Undo a clock lock."""
        self._n.nvmlDeviceResetGpuLockedClocks(self._h)

    def power_limit_mw(self) -> int:
        """Current enforced power limit (mW)."""
        return int(self._n.nvmlDeviceGetEnforcedPowerLimit(self._h))

    def set_power_limit_mw(self, limit_mw: int) -> None:
        """Set the power limit (needs root; changes the GPU for every user)."""
        self._n.nvmlDeviceSetPowerManagementLimit(self._h, int(limit_mw))


# ---------------------------------------------------------------------------------------------
# Recorded telemetry files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryRecording:
    """Samples of one or more GPUs read from a recording file.

    Attributes:
        path: The file.
        static: Its ``static`` section (GPU name, driver, command, date).
        samples: GPU index -> array (n, len(COLUMNS)) sorted by time.
        phases: Per-sample phase labels of GPU 0 when the file has them, else empty.
        extra: Every other top-level key of the file (marks, requests, intervals, ...).
    """

    path: Path
    static: dict[str, Any]
    samples: dict[int, np.ndarray]
    phases: tuple[str, ...]
    extra: dict[str, Any]

    def column(self, name: str, gpu: int = 0) -> np.ndarray:
        """One column of one GPU."""
        if name not in _COL:
            raise TelemetryFileError(f"{self.path}: unknown column {name!r}; known: {COLUMNS}")
        return self.samples[gpu][:, _COL[name]]


def _open_json(path: Path) -> dict[str, Any]:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise TelemetryFileError(f"{path}: file not found") from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TelemetryFileError(f"{path}: not a (gzip) JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise TelemetryFileError(f"{path}: top level must be an object, got {type(data).__name__}")
    return data


def load_recording(path: str | Path) -> TelemetryRecording:
    """Read a telemetry recording (this module's format or the older thermal recordings').

    The file is JSON (gzipped when it ends in ``.gz``) with ``columns`` and ``samples`` (one
    row per sample). A ``gpu`` column splits the rows by GPU; without it every row is GPU 0.
    Known older column names (``t``, ``gpu_temp_c``, ``throttle_reasons``, ``util_pct``) are
    mapped; columns the file lacks are NaN.

    Raises:
        TelemetryFileError: Missing file, bad JSON, missing ``columns``/``samples`` or
            ``t``/``t_s``, non-numeric values, or time running backwards.
    """
    p = Path(path)
    data = _open_json(p)
    cols = data.get("columns")
    rows = data.get("samples")
    if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        raise TelemetryFileError(f"{p}: field 'columns' must be a list of names, got {cols!r}")
    if not isinstance(rows, list) or not rows:
        raise TelemetryFileError(f"{p}: field 'samples' must be a non-empty list")
    names = [_LEGACY_NAMES.get(c, c) for c in cols]
    if "t_s" not in names:
        raise TelemetryFileError(f"{p}: field 'columns' has no time column ('t_s' or 't'): {cols}")
    src = {n: i for i, n in enumerate(names)}
    gpu_i = src.get("gpu")
    phase_i = src.get("phase")
    out = np.full((len(rows), len(COLUMNS)), np.nan)
    gpus = np.zeros(len(rows), dtype=np.int64)
    phases: list[str] = []
    for r, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(cols):
            raise TelemetryFileError(
                f"{p}: field 'samples[{r}]' must be a list of {len(cols)} values, got {row!r}")
        for name, i in src.items():
            if name in _COL:
                v = row[i]
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TelemetryFileError(f"{p}: field 'samples[{r}].{cols[i]}' must be a "
                                             f"number, got {v!r}")
                out[r, _COL[name]] = float(v)
        if gpu_i is not None:
            gpus[r] = int(row[gpu_i])
        if phase_i is not None:
            phases.append(str(row[phase_i]))
    samples: dict[int, np.ndarray] = {}
    for g in np.unique(gpus):
        arr = out[gpus == g]
        t = arr[:, 0]
        if not np.isfinite(t).all():
            raise TelemetryFileError(f"{p}: field 't_s' has missing values for GPU {g}")
        if (np.diff(t) < 0).any():
            k = int(np.flatnonzero(np.diff(t) < 0)[0])
            raise TelemetryFileError(f"{p}: field 't_s' runs backwards at GPU {g} sample {k + 1} "
                                     f"({t[k]} -> {t[k + 1]})")
        samples[int(g)] = arr
    if gpu_i is not None and phases:
        phases = [ph for ph, g in zip(phases, gpus, strict=True) if g == gpus.min()]
    static = data.get("static") if isinstance(data.get("static"), dict) else {}
    extra = {k: v for k, v in data.items() if k not in ("static", "columns", "samples")}
    return TelemetryRecording(p, static, samples, tuple(phases), extra)


def save_recording(path: str | Path, static: dict[str, Any], samples: dict[int, np.ndarray],
                   **extra: Any) -> Path:
    """Write samples of one or more GPUs as (gzip) JSON readable by :func:`load_recording`.

    Args:
        path: Output file (``.gz`` compresses).
        static: Provenance: GPU name, driver, command, date.
        samples: GPU index -> (n, len(COLUMNS)) array.
        **extra: More top-level sections (marks, requests, per-interval metrics).

    Returns:
        The path written.
    """
    p = Path(path)
    rows: list[list[Any]] = []
    for g, arr in sorted(samples.items()):
        for r in np.asarray(arr):
            vals = [None if not math.isfinite(v) else round(float(v), 4) for v in r]
            rows.append([g, *vals])
    rows.sort(key=lambda row: (row[1], row[0]))
    payload = {"static": static, "columns": ["gpu", *COLUMNS], "samples": rows, **extra}
    p.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "wt", encoding="utf-8") as fh:
        json.dump(payload, fh, separators=(",", ":"))
    return p


class ReplayGpuDevice(GpuDevice):
    """Plays back one GPU of a recording as if it were live (for tests and dry runs).

    Time starts at the recording's first sample when the device is created (or at
    ``start_offset_s``) and advances with ``clock`` times ``speed``; a read returns the last
    recorded sample at or before that point, stamped with the current Unix time. Past the end
    the recording loops (the energy counter keeps counting up) when ``loop`` is set.

    Args:
        recording: A loaded recording or a path to one.
        gpu: Which GPU of the recording to play.
        speed: Recording seconds per wall second.
        loop: Wrap around at the end instead of holding the last sample.
        clock: Monotonic clock in seconds (injectable for deterministic tests).
        start_offset_s: Where in the recording to start (seconds after its first sample).
        index: Index this device reports.
    """

    def __init__(self, recording: TelemetryRecording | str | Path, gpu: int = 0, speed: float = 1.0,
                 loop: bool = True, clock: Callable[[], float] = time.monotonic,
                 start_offset_s: float = 0.0, index: int | None = None) -> None:
        self.rec = recording if isinstance(recording, TelemetryRecording) else load_recording(
            recording)
        if gpu not in self.rec.samples:
            raise TelemetryFileError(f"{self.rec.path}: no samples for GPU {gpu} "
                                     f"(has {sorted(self.rec.samples)})")
        if not speed > 0:
            raise ValueError(f"ReplayGpuDevice: speed must be > 0, got {speed!r}")
        self.index = gpu if index is None else int(index)
        self._arr = self.rec.samples[gpu]
        self._t = self._arr[:, 0] - self._arr[0, 0]
        self.duration_s = float(self._t[-1])
        self.speed = float(speed)
        self.loop = loop
        self._clock = clock
        self._t0 = clock()
        self._offset = float(start_offset_s)
        e = self._arr[:, _COL["energy_mj"]]
        if np.isfinite(e).sum() >= 2:
            self._energy = None
            fin = np.isfinite(e)
            self._energy_mj = np.interp(self._t, self._t[fin], e[fin]) - e[fin][0]
        else:  # no counter in the file: integrate the power column
            pwr = np.nan_to_num(self._arr[:, _COL["power_w"]])
            self._energy_mj = np.concatenate([[0.0], np.cumsum(
                0.5 * (pwr[1:] + pwr[:-1]) * np.diff(self._t) * 1000.0)])
        self._loop_energy_mj = float(self._energy_mj[-1])

    def static(self) -> GpuStatic:
        """Static facts from the recording's ``static`` section (NaN where missing)."""
        s = self.rec.static

        def num(*keys: str, scale: float = 1.0) -> float:
            for k in keys:
                v = s.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return float(v) * scale
            return float("nan")

        rng = s.get("power_limit_constraints_mw") or s.get("power_limit_range_w")
        scale = 1e-3 if "power_limit_constraints_mw" in s else 1.0
        return GpuStatic(
            index=self.index,
            name=str(s.get("name", "replay")),
            driver=str(s.get("driver", "replay")),
            power_limit_w=num("power_limit_w") if "power_limit_w" in s else num(
                "power_limit_mw", scale=1e-3),
            power_limit_range_w=(tuple(float(x) * scale for x in rng) if rng else (
                float("nan"), float("nan"))),
            slowdown_temp_c=num("slowdown_temp_c", "slowdown_c"),
            shutdown_temp_c=num("shutdown_temp_c", "shutdown_c"),
            max_sm_clock_mhz=num("max_sm_clock_mhz"),
            serial=str(s.get("serial", "")),
            uuid=str(s.get("uuid", "")),
        )

    def position_s(self) -> tuple[float, int]:
        """Current position in the recording (s after its start) and completed loops."""
        pos = self._offset + (self._clock() - self._t0) * self.speed
        if self.duration_s <= 0:
            return 0.0, 0
        if self.loop:
            return pos % self.duration_s, int(pos // self.duration_s)
        return min(pos, self.duration_s), 0

    def read(self) -> np.ndarray:
        """The recorded sample for now, stamped with the current Unix time."""
        pos, loops = self.position_s()
        i = max(int(np.searchsorted(self._t, pos, side="right")) - 1, 0)
        row = self._arr[i].copy()
        row[_COL["t_s"]] = time.time()
        row[_COL["energy_mj"]] = self._energy_mj[i] + loops * self._loop_energy_mj
        return row


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


class RingBuffer:
    """Fixed-capacity buffer of sample rows; the oldest rows are overwritten (thread-safe)."""

    def __init__(self, capacity: int, width: int) -> None:
        if capacity < 2:
            raise ValueError(f"RingBuffer: capacity must be >= 2, got {capacity}")
        self._buf = np.full((capacity, width), np.nan)
        self._n = 0  # rows ever written
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(self._n, len(self._buf))

    @property
    def total_written(self) -> int:
        """Rows written since creation (including overwritten ones)."""
        return self._n

    def append(self, row: np.ndarray) -> None:
        """Add one row."""
        with self._lock:
            self._buf[self._n % len(self._buf)] = row
            self._n += 1

    def snapshot(self) -> np.ndarray:
        """All held rows, oldest first (a copy)."""
        with self._lock:
            cap, n = len(self._buf), self._n
            if n <= cap:
                return self._buf[:n].copy()
            i = n % cap
            return np.concatenate([self._buf[i:], self._buf[:i]])

    def latest(self) -> np.ndarray | None:
        """The newest row, or None when empty."""
        with self._lock:
            if self._n == 0:
                return None
            return self._buf[(self._n - 1) % len(self._buf)].copy()


@dataclass(frozen=True)
class EnergyCheck:
    """Energy of one GPU over a window, two ways."""

    counter_j: float
    power_integral_j: float
    duration_s: float

    @property
    def mean_power_w(self) -> float:
        """Mean power over the window: counter-based, else from the power integral (NaN if none)."""
        if self.duration_s <= 0:
            return float("nan")
        e = self.counter_j if math.isfinite(self.counter_j) else self.power_integral_j
        return e / self.duration_s

    @property
    def rel_diff(self) -> float:
        """(integral - counter) / counter (NaN when the counter is missing or zero)."""
        if not math.isfinite(self.counter_j) or self.counter_j <= 0:
            return float("nan")
        return (self.power_integral_j - self.counter_j) / self.counter_j


def window_energy(samples: np.ndarray, t0_s: float, t1_s: float) -> EnergyCheck:
    """Energy in ``[t0_s, t1_s]`` from the energy counter and from the power integral.

    The window is first clipped to the span of the samples (a sampler's last row is up to one
    period old), so ``duration_s`` may be a little shorter than asked; use
    :attr:`EnergyCheck.mean_power_w` to scale. The counter is interpolated at both ends; the
    power integral is trapezoidal over the samples inside the window.

    Args:
        samples: (n, len(COLUMNS)) rows of one GPU, sorted by time.
        t0_s: Window start (Unix s).
        t1_s: Window end (Unix s).
    """
    nan = float("nan")
    if len(samples) < 2:
        return EnergyCheck(nan, nan, 0.0)
    t = samples[:, _COL["t_s"]]
    a, b = max(t0_s, float(t[0])), min(t1_s, float(t[-1]))
    if b <= a:
        return EnergyCheck(nan, nan, 0.0)
    e = samples[:, _COL["energy_mj"]]
    p = samples[:, _COL["power_w"]]
    fin = np.isfinite(e)
    counter = nan
    if fin.sum() >= 2:
        counter = float(np.interp(b, t[fin], e[fin]) - np.interp(a, t[fin], e[fin])) / 1000.0
    pf = np.isfinite(p)
    integral = nan
    if pf.sum() >= 2:
        grid = np.concatenate([[a], t[pf][(t[pf] > a) & (t[pf] < b)], [b]])
        pg = np.interp(grid, t[pf], p[pf])
        integral = float(np.sum(0.5 * (pg[1:] + pg[:-1]) * np.diff(grid)))
    return EnergyCheck(counter, integral, b - a)


class TelemetrySampler:
    """Reads every device at ``rate_hz`` from a background thread into per-GPU ring buffers.

    Args:
        devices: The GPUs to read.
        rate_hz: Sampling rate (>= 20 Hz wanted; one NVML read of an H100 takes about 1 ms).
        capacity: Rows kept per GPU (default: 10 minutes at ``rate_hz``).
        keep_all: Also keep every row (unbounded) for writing a recording file.
    """

    def __init__(self, devices: Sequence[GpuDevice], rate_hz: float = 25.0,
                 capacity: int | None = None, keep_all: bool = False) -> None:
        if not devices:
            raise ValueError("TelemetrySampler: needs at least one device")
        if not rate_hz > 0:
            raise ValueError(f"TelemetrySampler: rate_hz must be > 0, got {rate_hz!r}")
        self.devices = list(devices)
        self.rate_hz = float(rate_hz)
        cap = capacity or int(600 * rate_hz)
        self.buffers = [RingBuffer(cap, len(COLUMNS)) for _ in self.devices]
        self.keep_all = keep_all
        self.all_rows: list[list[np.ndarray]] = [[] for _ in self.devices]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def sample_once(self) -> None:
        """Read every device once (the thread calls this; tests may call it directly)."""
        for k, dev in enumerate(self.devices):
            try:
                row = dev.read()
            except Exception as exc:  # keep sampling the others; remember what failed
                if len(self.errors) < 100:
                    self.errors.append(f"GPU {dev.index}: {type(exc).__name__}: {exc}")
                continue
            self.buffers[k].append(row)
            if self.keep_all:
                self.all_rows[k].append(row)

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_t = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:  # fell behind: resynchronise instead of bursting
                next_t = time.monotonic()

    def start(self) -> TelemetrySampler:
        """Start the thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def samples(self, gpu: int = 0) -> np.ndarray:
        """Rows held for the ``gpu``-th device, oldest first."""
        return self.buffers[gpu].snapshot()

    def latest(self) -> np.ndarray:
        """Newest row of every device, shape (n_devices, len(COLUMNS)) (NaN rows if none)."""
        out = np.full((len(self.devices), len(COLUMNS)), np.nan)
        for k, b in enumerate(self.buffers):
            row = b.latest()
            if row is not None:
                out[k] = row
        return out

    def window(self, t0_s: float, t1_s: float, gpu: int = 0) -> np.ndarray:
        """Rows of one device with ``t0_s <= t_s <= t1_s``."""
        s = self.samples(gpu)
        t = s[:, 0]
        return s[(t >= t0_s) & (t <= t1_s)]

    def mean_power_w(self, t0_s: float, t1_s: float) -> np.ndarray:
        """Mean power of every device over a window, from the energy counter where it has one."""
        return np.array([window_energy(self.samples(k), t0_s, t1_s).mean_power_w
                         for k in range(len(self.devices))])

    def energy_j(self, t0_s: float, t1_s: float, gpu: int = 0) -> EnergyCheck:
        """Energy of one device over a window from the counter, cross-checked by the integral."""
        return window_energy(self.samples(gpu), t0_s, t1_s)

    def achieved_rate_hz(self, gpu: int = 0) -> float:
        """Samples per second actually held for one device."""
        s = self.samples(gpu)
        if len(s) < 2:
            return 0.0
        return (len(s) - 1) / max(s[-1, 0] - s[0, 0], 1e-9)

    def recorded(self) -> dict[int, np.ndarray]:
        """Every row kept (``keep_all``) per device index."""
        return {dev.index: (np.array(rows) if rows else np.zeros((0, len(COLUMNS))))
                for dev, rows in zip(self.devices, self.all_rows, strict=True)}


def open_devices(indices: Sequence[int] | None = None) -> list[NvmlGpuDevice]:
    """NVML devices for ``indices`` (default: every GPU NVML sees).

    Raises:
        GpuUnavailableError: No driver, no GPU, missing package or no permission.
    """
    if indices is None:
        indices = range(nvml_device_count())
    devs = [NvmlGpuDevice(i) for i in indices]
    if not devs:
        raise GpuUnavailableError("NVML sees no GPU")
    return devs


def column_index(name: str) -> int:
    """Position of a column in :data:`COLUMNS`."""
    if name not in _COL:
        raise ValueError(f"unknown telemetry column {name!r}; known: {COLUMNS}")
    return _COL[name]
