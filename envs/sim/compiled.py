"""What the simulator's compiled loops share: numba's options and numpy's summation order.

The simulator's hot loops (`routing`, `serving_aggregate_kernels`, `serving_request_kernels`)
are compiled with numba and promise the figures of the numpy formulation they replaced, bit for
bit. Where that formulation summed a whole array (``ndarray.sum``), numpy added pairwise, so
the loops sum the same way (`pairwise_sum`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

JIT_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}
"""Cached on disk beside the module (compiled once per change), and numpy's division semantics
(inf or nan, never an exception)."""


def per_element(value: np.ndarray | float, shape: tuple[int, ...]) -> np.ndarray:
    """`value` (an array of `shape`, one scalar, or broadcastable) as a float64 array of `shape`.

    What the compiled loops take instead of numpy's broadcasting (``np.full`` for a scalar:
    ``np.broadcast_to`` costs a few microseconds a call).
    """
    a = np.asarray(value, dtype=np.float64)
    if a.shape == shape:
        return a
    if a.ndim == 0:
        return np.full(shape, float(a))
    return np.broadcast_to(a, shape)


@njit(**JIT_OPTIONS)
def np_minimum(a: float, b: float) -> float:
    """``np.minimum`` of two floats (a NaN wins)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a <= b else b


@njit(**JIT_OPTIONS)
def np_maximum(a: float, b: float) -> float:
    """``np.maximum`` of two floats (a NaN wins)."""
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@njit(**JIT_OPTIONS)
def flatnonzero(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` of a boolean array, in the compiled loops."""
    n = 0
    for i in range(len(mask)):
        if mask[i]:
            n += 1
    out = np.empty(n, np.int64)
    n = 0
    for i in range(len(mask)):
        if mask[i]:
            out[n] = i
            n += 1
    return out


@njit(**JIT_OPTIONS)
def _block_sum(a: np.ndarray, lo: int, n: int) -> float:
    """Sum of a block of at most 128 values in numpy's order (in sequence below 8, else 8-way)."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    stop = n - (n % 8)
    while i < stop:
        b = lo + i
        r0 += a[b]
        r1 += a[b + 1]
        r2 += a[b + 2]
        r3 += a[b + 3]
        r4 += a[b + 4]
        r5 += a[b + 5]
        r6 += a[b + 6]
        r7 += a[b + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(**JIT_OPTIONS)
def pairwise_sum(a: np.ndarray) -> float:
    """Sum of `a` in numpy's order, so that a renormalisation matches ``ndarray.sum`` bit for bit.

    numpy sums a contiguous float64 array pairwise: blocks of up to 128 values (`_block_sum`),
    and above that the two halves (split at a multiple of 8) summed apart and added. The halving
    runs on an explicit stack: numba's on-disk cache does not load recursive functions safely.
    """
    n = len(a)
    if n <= 128:
        return _block_sum(a, 0, n)
    depth = 64  # halving from 2**63 values
    f_lo = np.empty(depth, np.int64)
    f_n = np.empty(depth, np.int64)
    f_stage = np.zeros(depth, np.int64)  # 0: descend left, 1: left summed, 2: right summed
    f_left = np.empty(depth)
    sp = 0
    f_lo[0], f_n[0] = 0, n
    ret = 0.0
    while sp >= 0:
        lo, m = f_lo[sp], f_n[sp]
        if m <= 128:
            ret = _block_sum(a, lo, m)
            sp -= 1
            continue
        half = m // 2
        half -= half % 8
        if f_stage[sp] == 0:
            f_stage[sp] = 1
            sp += 1
            f_lo[sp], f_n[sp], f_stage[sp] = lo, half, 0
        elif f_stage[sp] == 1:
            f_left[sp] = ret
            f_stage[sp] = 2
            sp += 1
            f_lo[sp], f_n[sp], f_stage[sp] = lo + half, m - half, 0
        else:
            ret = f_left[sp] + ret
            sp -= 1
    return ret
