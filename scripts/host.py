"""What the host computes floating point with, for results that depend on it in the last bits.

numpy dispatches its float64 transcendental loops (``exp``, ``log``, ``power``, ...) to SIMD
implementations by CPU feature, and they differ from one another in the last bit
(`tests/golden/canonical_cpu.py`). Most figures do not notice; a datacenter day of `tapas_dc`
can, because its throttling hangs on thresholds (a GPU reaching its slowdown point, a VM that
fits or waits), so last-bit differences may grow into a different day (numpy's baseline against
its AVX2 loops changed one of nine such days for TAPAS, measured 2026-12-02). A result file that
names the paths it ran on can be compared with another host's honestly.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numpy_simd_targets() -> list[str]:
    """Numpy's SIMD dispatch targets active in this process (empty: its baseline loops only)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]


def float_paths() -> dict[str, Any]:
    """The host's floating-point paths: CPU, numpy's version and active SIMD loops, OpenBLAS's core."""
    import numpy as np

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "numpy": np.__version__,
            "numpy_simd": numpy_simd_targets(),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "auto")}
