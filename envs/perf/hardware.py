"""GPU specifications (``envs/data/gpus.json``): peak compute, memory, power limits, idle power.

Every figure carries its source in the data file: the vendors' datasheets for compute, memory
and power limits; measurements made for this project for the H100's idle power and clock range;
estimates, marked as such, where neither exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

GPUS_FILE = Path(str(resources.files("llm_cluster_gym.envs") / "data" / "gpus.json"))


class GpuError(ValueError):
    """An unknown GPU name or a malformed GPU specification."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model's datasheet figures and measured idle power (per GPU)."""

    key: str
    name: str
    peak_flops: dict[str, float]
    memory_bytes_per_s: float
    memory_bytes: float
    power_limit_w: float
    idle_power_w: float
    idle_power_with_context_w: float
    nvlink_bytes_per_s: float
    min_sm_clock_mhz: float
    max_sm_clock_mhz: float

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s of the tensor cores at a weight precision (bf16, fp8, mxfp4)."""
        if precision not in self.peak_flops:
            raise GpuError(f"{self.key}: no peak compute for precision {precision!r}")
        return self.peak_flops[precision]


def load_gpus(path: Path = GPUS_FILE) -> dict[str, GpuSpec]:
    """Every GPU of the specification file, by key (``h100``, ``h200``, ``b200``)."""
    data = json.loads(Path(path).read_text())
    out = {}
    for key, g in data["gpus"].items():
        out[key] = GpuSpec(
            key=key,
            name=g["name"],
            peak_flops={k: float(v) for k, v in g["peak_flops"].items()},
            memory_bytes_per_s=float(g["memory_bytes_per_s"]),
            memory_bytes=float(g["memory_bytes"]),
            power_limit_w=float(g["power_limit_w"]),
            idle_power_w=float(g["idle_power_w"]),
            idle_power_with_context_w=float(g["idle_power_with_context_w"]),
            nvlink_bytes_per_s=float(g["nvlink_bytes_per_s"]),
            min_sm_clock_mhz=float(g["sm_clock_mhz"]["min"]),
            max_sm_clock_mhz=float(g["sm_clock_mhz"]["max"]),
        )
    return out


def gpu(key: str) -> GpuSpec:
    """The specification of one GPU (``h100``, ``h200``, ``b200``; case-insensitive)."""
    gpus = load_gpus()
    k = key.lower()
    if k not in gpus:
        raise GpuError(f"unknown GPU {key!r}; known: {', '.join(gpus)}")
    return gpus[k]
