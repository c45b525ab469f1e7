"""A picture of the sim-to-real comparison: the real run and its replay, side by side in time."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np


def render_comparison(comp: dict[str, Any], title: str) -> bytes:
    """PNG of power (1 s), GPU temperature and tokens per interval, real vs simulated.

    Args:
        comp: The result of `envs.real.fidelity.compare` (its ``series`` and headline figures).
        title: Figure title (which run, which fit).

    Returns:
        The PNG file's bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = comp["series"]
    t = np.arange(len(s["real_power_w"]))
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    ax = axes[0]
    ax.plot(t, s["real_power_w"], color="black", lw=1.0, label="real (energy counter)")
    ax.plot(t, s["sim_power_w"], color="tab:orange", lw=1.0, label="simulator")
    ax.set_ylabel("GPU power, 1 s (W)")
    ax.set_title(f"{title}\npower MAPE {comp['power_mape']:.1%}, temperature RMSE "
                 f"{comp['temp_rmse_c']:.2f} C, throughput error {comp['throughput_error']:.1%}")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    ax.plot(t, s["real_temp_c"], color="black", lw=1.0, label="real (NVML, whole degrees)")
    ax.plot(t, s["sim_temp_c"], color="tab:orange", lw=1.0, label="simulator")
    ax.set_ylabel("GPU temperature (C)")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    width = float(comp["tokens_interval_s"])
    ti = np.arange(len(s["real_tokens"])) * width
    ax.step(ti, s["real_tokens"], where="post", color="black", lw=1.0, label="real")
    ax.step(ti, s["sim_tokens"], where="post", color="tab:orange", lw=1.0, label="simulator")
    ax.set_ylabel(f"output tokens per {width:g} s")
    ax.set_xlabel("time since the replay started (s)")
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_comparison_png(comp: dict[str, Any], title: str, path: str | Path) -> Path:
    """Render and write the picture (through a temporary name, so nothing is half-written)."""
    p = Path(path)
    data = render_comparison(comp, title)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)
    return p
