"""The CPU code paths the golden digests are recorded and checked on, the same on every x86-64.

numpy dispatches its float64 ``exp``, ``expm1``, ``log``, ``log1p``, ``log10`` and ``power``
loops to AVX-512 implementations where the CPU has them; those differ from the C library's in
the last bit for 0.3-20% of arguments (measured 2026-12-02). OpenBLAS picks its dot-product and
matrix kernels per CPU too, and their summation orders differ. So a trajectory's exact bytes
depend on the CPU, and digests recorded on one machine fail on another (on this project's
AVX-512 machine, 7 of the 12 fast golden checks failed under OpenBLAS's Haswell kernels, 6
under numpy without its AVX-512 loops). The tests therefore run on numpy's baseline loops
(x86-64-v2: transcendentals from the C library) and OpenBLAS's Nehalem kernels, which every
x86-64-v2 CPU runs alike; the simulator itself, outside the tests, runs on whatever the CPU
offers (the same figures up to the last bits).

Both settings are read when numpy (and its OpenBLAS) is first imported, so `apply` must run
before that: `tests/conftest.py` calls it at import, and `record.py` at its start.
"""

from __future__ import annotations

import os
import sys

CANONICAL_CPU_ENV = {
    # numpy's dispatch targets above the x86-64-v2 baseline (AVX2 and AVX-512 groups);
    # naming one the CPU lacks is harmless.
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Nehalem",
    "OPENBLAS_NUM_THREADS": "1",
}


def apply() -> None:
    """Set the canonical CPU environment (keeping values already set by the caller)."""
    for key, value in CANONICAL_CPU_ENV.items():
        os.environ.setdefault(key, value)


def check() -> str | None:
    """Why numpy in this process does not run on the canonical paths (None if it does)."""
    if "numpy" not in sys.modules:
        return None
    from llm_cluster_gym.scripts.host import numpy_simd_targets

    active = numpy_simd_targets()
    if active:
        return (f"numpy runs its {', '.join(active)} loops: the golden digests are recorded on "
                f"its baseline loops; set {CANONICAL_CPU_ENV} before numpy is imported (as "
                "tests/conftest.py does)")
    return None
