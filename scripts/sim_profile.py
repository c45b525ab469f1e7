"""`llm-cluster sim-profile`: the simulator's profile of one (model, GPU, TP degree), with its fit errors.

Usage::

    llm-cluster sim-profile --model llama-3.1-70b-instruct --gpu h100 --tp 4

Prints the coefficients the simulator runs with (prefill and decode time, phase power curves,
clock range, KV capacity, reconfiguration downtime), where they come from and, for a profile
derived from the shape-based performance model (`envs.sim.shape_profiles`), the surrogate's
fit error against that model per quantity; the last line is the whole profile as one JSON
object. A model shipped as a shape (``envs/data/models``) is derived; the older JSON tables
(``envs/data/profiles``: ``llama3-8b``, ``llama2-70b``) are shown as they are. An unknown
model or GPU, or a TP degree that does not fit, exits with status 2 and one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from llm_cluster_gym.scripts.usage import UsageError


@dataclass
class SimProfileArgs:
    """Show the simulator's profile of a model on a GPU at a TP degree, and its fit errors."""

    model: str
    """Model: a shipped shape (envs/data/models, e.g. llama-3.1-8b-instruct) or a JSON profile's name."""
    gpu: str = "h100"
    """GPU type (envs/data/gpus.json: h100, h200, b200)."""
    tp: int = 1
    """GPUs of the instance (tensor parallel degree)."""

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise UsageError(f"--tp must be >= 1, got {self.tp}")


def profile_record(profile: Any) -> dict[str, Any]:
    """A profile as a JSON-ready dict (every field; ``fit_error`` as plain dicts)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(profile):
        v = getattr(profile, f.name)
        out[f.name] = {k: dict(e) for k, e in v.items()} if f.name == "fit_error" else v
    return out


def run(args: SimProfileArgs, command: str = "llm-cluster sim-profile") -> int:
    """Print the profile (last line: JSON); returns the exit status.

    Raises:
        ProfileError: Unknown model or GPU, or a TP degree that does not fit (one line).
    """
    from llm_cluster_gym.envs.sim.profiles import ProfileLibrary

    p = ProfileLibrary.load().get(args.model, args.gpu, args.tp)
    print(f"{p.model} on {p.tp}x {p.gpu}")
    print(f"  source: {p.source}")
    print(
        f"  prefill time  (p0 + p1 T + p2 T^2) x (phi fmax/f + 1 - phi): p0 {p.prefill_p0_s * 1e3:.3f} ms, "
        f"p1 {p.prefill_p1_s_per_token * 1e6:.4f} us/token, "
        f"p2 {p.prefill_p2_s_per_token2 * 1e9:.5f} ns/token^2, phi {p.prefill_phi:.3f}"
    )
    print(
        f"  decode step   (d0 + d1 B + d2 B C) x (phi fmax/f + 1 - phi): d0 {p.decode_d0_s * 1e3:.3f} ms, "
        f"d1 {p.decode_d1_s_per_seq * 1e6:.3f} us/seq, "
        f"d2 {p.decode_d2_s_per_seq_token * 1e9:.4f} ns/(seq token), phi {p.decode_phi:.3f}"
    )
    print(
        f"  power per GPU idle + (max - idle) x/(x + k) (f/fmax)^{p.power_freq_exponent:g}: idle "
        f"{p.idle_power_w:.1f} W; prefill max {p.prefill_max_power_w:.1f} W, k {p.prefill_k_tokens:.1f} "
        f"tokens; decode max {p.decode_max_power_w:.1f} W, k {p.decode_k_batch:.2f} seqs; limit "
        f"{p.gpu_power_limit_w:.0f} W"
    )
    print(
        f"  clocks {p.min_freq_mhz:.0f}-{p.max_freq_mhz:.0f} MHz; KV cache {p.kv_capacity_tokens:,} tokens; "
        f"weights {p.weights_gb:.1f} GB; reconfiguration downtime {p.load_time_s:.1f} s"
    )
    if p.fit_error:
        print("  fit error vs envs/perf (|relative error|, median / max, points):")
        for name, e in p.fit_error.items():
            print(f"    {name:<24} {e['median_abs_pct']:6.2f}% / {e['max_abs_pct']:6.2f}%  n={e['n']}")
    print(json.dumps(profile_record(p)))
    return 0
