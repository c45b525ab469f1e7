"""Guarded GPU actuators: locked SM clocks and power limits, off unless explicitly enabled.

Changing a GPU setting changes it for every user of the GPU and outlives the process unless
undone, so :class:`GpuActuators`

* does nothing unless constructed with ``enable=True`` (a refused call is logged and returns
  False); with ``dry_run=True`` it records what it would do and touches nothing;
* logs every change (``self.log`` and the ``envs.real.actuators`` logger);
* remembers each GPU's setting before its first change and restores it on :meth:`restore`,
  on normal interpreter exit (``atexit``), when used as a context manager (also on
  exceptions) and on SIGINT/SIGTERM (the previous handlers run afterwards).

On the shared accelerator machines of this project the actuators stay off (never enable
them there); real control there goes through routing, admission and batch size.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llm_cluster_gym.envs.real.telemetry import GpuDevice

logger = logging.getLogger(__name__)


class ActuatorError(ValueError):
    """A requested setting is out of the GPU's range (the message names GPU, field and value)."""


@dataclass(frozen=True)
class ActuatorEvent:
    """One logged decision."""

    time_s: float
    gpu: int
    action: str
    value: Any
    applied: bool
    note: str


class GpuActuators:
    """Clock and power-limit control over some GPUs, guarded and self-restoring.

    Args:
        devices: The GPUs to control.
        enable: Allow changes at all (default False: every change is refused and logged).
        dry_run: Record what would be done without calling the GPU (implies no change).
        install_signal_handlers: Restore on SIGINT/SIGTERM (main thread only).
    """

    def __init__(self, devices: Sequence[GpuDevice], enable: bool = False, dry_run: bool = False,
                 install_signal_handlers: bool = True) -> None:
        self.devices = {d.index: d for d in devices}
        self.enable = bool(enable)
        self.dry_run = bool(dry_run)
        self.log: list[ActuatorEvent] = []
        self._saved_power_mw: dict[int, int] = {}
        self._clock_locked: set[int] = set()
        self._lock = threading.Lock()
        self._old_handlers: dict[int, Any] = {}
        self._closed = False
        if self.enable and not self.dry_run:
            atexit.register(self.restore)
            if install_signal_handlers and threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    @property
    def live(self) -> bool:
        """True when calls reach the GPU (enabled and not a dry run)."""
        return self.enable and not self.dry_run and not self._closed

    def _record(self, gpu: int, action: str, value: Any, applied: bool, note: str) -> None:
        ev = ActuatorEvent(time.time(), gpu, action, value, applied, note)
        self.log.append(ev)
        logger.warning("GPU %d %s %r: %s (%s)", gpu, action, value,
                       "applied" if applied else "not applied", note)

    def _device(self, gpu: int) -> GpuDevice:
        if gpu not in self.devices:
            raise ActuatorError(f"GpuActuators: no GPU {gpu} (have {sorted(self.devices)})")
        return self.devices[gpu]

    def _gate(self, gpu: int, action: str, value: Any) -> bool:
        """True when the call should reach the GPU; logs the refusal or dry run otherwise."""
        if self._closed:
            self._record(gpu, action, value, False, "actuators closed")
            return False
        if not self.enable:
            self._record(gpu, action, value, False, "actuators disabled (enable=False)")
            return False
        if self.dry_run:
            self._record(gpu, action, value, False, "dry run")
            return False
        return True

    def lock_sm_clocks_mhz(self, gpu: int, max_mhz: float, min_mhz: float | None = None) -> bool:
        """Lock one GPU's SM clock to ``[min_mhz, max_mhz]`` (min defaults to the GPU's lowest).

        Returns:
            True when the GPU was changed.

        Raises:
            ActuatorError: Unknown GPU or clocks outside the GPU's supported range.
        """
        dev = self._device(gpu)
        st = dev.static()
        lo_ok = min(st.supported_sm_clocks_mhz) if st.supported_sm_clocks_mhz else 0.0
        hi_ok = st.max_sm_clock_mhz
        lo = lo_ok if min_mhz is None else float(min_mhz)
        if not (lo <= max_mhz) or (hi_ok == hi_ok and max_mhz > hi_ok) or lo < lo_ok:
            raise ActuatorError(f"GPU {gpu}: field 'sm_clock_mhz' range [{lo}, {max_mhz}] outside "
                                f"the supported [{lo_ok}, {hi_ok}]")
        with self._lock:
            if not self._gate(gpu, "lock_sm_clocks_mhz", (lo, max_mhz)):
                return False
            dev.set_locked_sm_clocks_mhz(lo, max_mhz)
            self._clock_locked.add(gpu)
            self._record(gpu, "lock_sm_clocks_mhz", (lo, max_mhz), True, "")
            return True

    def set_power_limit_w(self, gpu: int, limit_w: float) -> bool:
        """Set one GPU's power limit.

        Returns:
            True when the GPU was changed.

        Raises:
            ActuatorError: Unknown GPU or a limit outside the GPU's allowed range.
        """
        dev = self._device(gpu)
        lo, hi = dev.static().power_limit_range_w
        if lo == lo and hi == hi and not lo <= limit_w <= hi:  # skip the check when unknown
            raise ActuatorError(f"GPU {gpu}: field 'power_limit_w' = {limit_w} outside the "
                                f"allowed [{lo}, {hi}] W")
        with self._lock:
            if not self._gate(gpu, "set_power_limit_w", float(limit_w)):
                return False
            if gpu not in self._saved_power_mw:
                self._saved_power_mw[gpu] = dev.power_limit_mw()
            dev.set_power_limit_mw(int(round(limit_w * 1000)))
            self._record(gpu, "set_power_limit_w", float(limit_w), True,
                         f"previous {self._saved_power_mw[gpu] / 1000:.0f} W")
            return True

    def restore(self) -> None:
        """Put back every setting changed through this object (idempotent)."""
        with self._lock:
            for gpu in sorted(self._clock_locked):
                try:
                    self.devices[gpu].reset_locked_sm_clocks()
                    self._record(gpu, "reset_locked_sm_clocks", None, True, "restore")
                except Exception as exc:  # keep restoring the others
                    self._record(gpu, "reset_locked_sm_clocks", None, False, f"failed: {exc}")
            self._clock_locked.clear()
            for gpu, mw in sorted(self._saved_power_mw.items()):
                try:
                    self.devices[gpu].set_power_limit_mw(mw)
                    self._record(gpu, "set_power_limit_w", mw / 1000.0, True, "restore")
                except Exception as exc:
                    self._record(gpu, "set_power_limit_w", mw / 1000.0, False, f"failed: {exc}")
            self._saved_power_mw.clear()

    def close(self) -> None:
        """Restore, unhook the signal handlers and refuse further changes."""
        self.restore()
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        self._closed = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.restore()
        old = self._old_handlers.get(signum)
        if callable(old):
            old(signum, frame)
        elif old == signal.SIG_DFL or old is None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def __enter__(self) -> GpuActuators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
