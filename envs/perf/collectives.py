"""Tensor-parallel all-reduce time from a measured collective table.

The table (``envs/data/collectives/h100_dgx_all_reduce.csv``) is microsoft/vidur's
``data/profiling/network/h100_dgx/all_reduce.csv`` (MIT, commit 7d47513; median of repeated NCCL
all-reduces on an 8x H100 DGX, 2 KiB to 64 MiB, 2, 4 and 8 GPUs). Between measured sizes the
time is interpolated on a smoothed copy (a running median, then made non-decreasing in size).
Other GPUs read the table at the size that moves the same time on H100 NVLink (``size x
h100_link / link``), so the latency floor is kept and only the bandwidth part scales.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

TABLE_FILE = Path(
    str(resources.files("llm_cluster_gym.envs") / "data" / "collectives" / "h100_dgx_all_reduce.csv")
)
H100_NVLINK_BYTES_PER_S = 900e9
"""The link bandwidth of the machine the table was measured on (H100 SXM, NVLink 4)."""


@lru_cache(maxsize=1)
def _table() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rows: dict[int, list[tuple[float, float]]] = {}
    with TABLE_FILE.open() as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["num_workers"]), []).append((float(r["size_bytes"]), float(r["median_ms"])))
    out = {}
    for n, pts in rows.items():
        pts.sort()
        size = np.array([p[0] for p in pts])
        ms = np.array([p[1] for p in pts])
        k = 7  # running median over 15 neighbouring sizes: the medians jitter by a few microseconds
        smooth = np.array([np.median(ms[max(0, i - k) : i + k + 1]) for i in range(len(ms))])
        out[n] = (size, np.maximum.accumulate(smooth) / 1e3)
    return out


def latency_floor_s(n_gpus: int) -> float:
    """The table's time for its smallest message (2 KiB) at ``n_gpus``: the latency floor (0 for one GPU)."""
    if n_gpus <= 1:
        return 0.0
    table = _table()
    n = min(table, key=lambda m: (abs(m - n_gpus), -m))
    return float(table[n][1][0])


def all_reduce_s(
    size_bytes: np.ndarray | float,
    n_gpus: int,
    link_bytes_per_s: float = H100_NVLINK_BYTES_PER_S,
) -> np.ndarray:
    """Seconds of one all-reduce of ``size_bytes`` over ``n_gpus`` GPUs (0 for one GPU).

    Sizes beyond the table extrapolate linearly from its last two points; GPU counts not in
    the table use the nearest measured one.
    """
    size = np.asarray(size_bytes, dtype=float)
    if n_gpus <= 1:
        return np.zeros_like(size)
    table = _table()
    n = min(table, key=lambda m: (abs(m - n_gpus), -m))
    sizes, secs = table[n]
    eq = size * (H100_NVLINK_BYTES_PER_S / link_bytes_per_s)
    slope = (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2])
    inside = np.interp(eq, sizes, secs)
    return np.where(eq > sizes[-1], secs[-1] + (eq - sizes[-1]) * slope, inside)
