"""`llm-cluster profile`: profile the real inference worker on a GPU: time and power of prefill and decode.

Measures, with the worker of ``envs/real/worker.py`` (Llama-3-8B shape, random bf16 weights,
static KV cache, CUDA-graph decode) at the clocks the GPU runs by itself (clocks and power
limits are read, never set):

* prefill time vs prompt tokens (median of repeats, one prompt per pass);
* decode iteration time vs batch and context length (and tokens/s = batch / time), and for
  mixed batches (one long context among short ones; uniform random lengths), which show
  whether an iteration costs the batch's summed context or its longest;
* power, temperature, SM clock and throttle reasons per phase: idle, sustained prefill at
  several prompt lengths, sustained decode at several batch sizes (energy-counter means).

Usage (GPU machine; writes a gzip JSON with the command, date, GPU and driver inside)::

    PYTHONUNBUFFERED=1 llm-cluster profile --out envs/data/real/h100_llama3-8b_profile.json.gz

Without a GPU it exits with a one-line message (status 2).
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.real.telemetry import (
    GpuUnavailableError,
    NvmlGpuDevice,
    TelemetrySampler,
    column_index,
    decode_throttle_reasons,
    save_recording,
)
from llm_cluster_gym.envs.real.worker import InferenceEngine, WorkerConfig
from llm_cluster_gym.scripts.usage import UsageError


@dataclass
class ProfileArgs:
    """Profile the real inference worker on a GPU: prefill/decode time and power (needs a GPU)."""

    out: Path = Path("h100_llama3-8b_profile.json.gz")
    """Output file (.json or .json.gz)."""
    gpu: int = 0
    """GPU index (NVML and CUDA)."""
    model: str = "llama3-8b"
    """Model shape (envs.real.worker.SHAPES)."""
    max_slots: int = 64
    """KV-cache slots (largest decode batch)."""
    max_ctx: int = 4096
    """Context per slot."""
    sample_hz: float = 25.0
    """NVML sampling rate."""
    phase_s: float = 8.0
    """Length of each sustained power phase (s)."""
    quick: bool = False
    """Short grids and phases (smoke test)."""

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_ctx", "sample_hz", "phase_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")


def phase_summary(sampler: TelemetrySampler, t0: float, t1: float, settle_s: float) -> dict:
    """Power (energy counter), temperature, clock and throttle reasons over ``[t0+settle, t1]``."""
    a = t0 + min(settle_s, 0.5 * (t1 - t0))
    chk = sampler.energy_j(a, t1)
    w = sampler.window(a, t1)
    mask = np.nan_to_num(w[:, column_index("throttle_mask")]).astype(np.int64)
    reasons = sorted({r for m in np.unique(mask) for r in decode_throttle_reasons(int(m))})
    return {
        "t0": a, "t1": t1,
        "power_w": chk.mean_power_w,
        "power_w_nvml_mean": float(np.nanmean(w[:, column_index("power_w")])),
        "energy_counter_vs_integral": chk.rel_diff,
        "temp_c_mean": float(np.nanmean(w[:, column_index("temp_c")])),
        "temp_c_end": float(w[-1, column_index("temp_c")]),
        "sm_clock_mhz_median": float(np.nanmedian(w[:, column_index("sm_clock_mhz")])),
        "throttle_reasons": reasons,
        "n_samples": len(w),
    }


def measure(args: ProfileArgs) -> dict[str, Any]:
    """Do every measurement; returns the result sections (also holds the samples)."""
    import torch

    dev = NvmlGpuDevice(args.gpu)
    if not torch.cuda.is_available():
        raise GpuUnavailableError("torch sees no CUDA device")
    static = dev.static().as_dict()
    static.update(date_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  command=shlex.join([sys.executable, *sys.argv]), torch=torch.__version__,
                  model=f"{args.model}-shaped Llama (envs/real/worker.py), random bf16 weights, "
                        "static KV cache, chunked-attention CUDA-graph decode, CUDA-graph "
                        "prefill buckets",
                  sample_hz=args.sample_hz)
    print(static, flush=True)
    sampler = TelemetrySampler([dev], rate_hz=args.sample_hz, keep_all=True).start()
    marks: list[dict[str, Any]] = []
    try:
        t_build = time.time()
        eng = InferenceEngine(WorkerConfig(model=args.model, device=f"cuda:{args.gpu}",
                                           max_slots=args.max_slots, max_ctx=args.max_ctx))
        print(f"engine built in {time.time() - t_build:.1f} s", flush=True)
        marks.append({"phase": "build", "t0": t_build, "t1": time.time()})
        t_w = time.time()
        n_graphs = eng.warmup()
        print(f"captured {n_graphs} CUDA graphs in {time.time() - t_w:.1f} s", flush=True)
        marks.append({"phase": "warmup", "t0": t_w, "t1": time.time(), "graphs": n_graphs})
        tok_grid = [128, 512, 2048] if args.quick else [64, 128, 256, 512, 768, 1024, 1536, 2048,
                                                         3072, 4000]
        batch_grid = [1, 8, 64] if args.quick else [1, 2, 4, 8, 16, 32, 48, 64]
        ctx_grid = [256, 2048] if args.quick else [128, 512, 1024, 2048, 4000]
        batch_grid = [b for b in batch_grid if b <= args.max_slots]
        prefill = {"tokens": [], "time_s": [], "sm_clock_mhz": []}
        t0 = time.time()
        for n in tok_grid:
            n = min(n, args.max_ctx - 1)
            a = time.time()
            prefill["tokens"].append(n)
            prefill["time_s"].append(eng.time_prefill_s(n, repeats=5))
            w = sampler.window(a, time.time())
            prefill["sm_clock_mhz"].append(float(np.nanmedian(w[:, column_index("sm_clock_mhz")]))
                                           if len(w) else float("nan"))
            print("prefill", n, prefill["time_s"][-1], flush=True)
        marks.append({"phase": "prefill_sweep", "t0": t0, "t1": time.time()})
        decode = {"batch": [], "ctx_tokens": [], "time_s": [], "tokens_per_s": []}
        t0 = time.time()
        for c in ctx_grid:
            for b in batch_grid:
                t = eng.time_decode_s(b, c, repeats=5 if args.quick else 15)
                decode["batch"].append(b)
                decode["ctx_tokens"].append(c)
                decode["time_s"].append(t)
                decode["tokens_per_s"].append(b / t)
                print("decode", b, c, round(t * 1e3, 2), "ms", round(b / t), "tok/s", flush=True)
        marks.append({"phase": "decode_sweep", "t0": t0, "t1": time.time()})
        # Mixed batches: (a) one long context among 512-token ones, (b) uniform random lengths.
        mixed = {"batch": [], "kind": [], "mean_ctx_tokens": [], "max_ctx_tokens": [],
                 "time_s": []}
        rng = np.random.default_rng(0)
        long_ctx = min(4000, args.max_ctx - 1)
        t0 = time.time()
        for b in [b for b in ([8, 64] if args.quick else [8, 16, 32, 64]) if b <= args.max_slots]:
            cases = {"one_long": np.array([long_ctx] + [512] * (b - 1)),
                     "uniform": rng.integers(64, long_ctx + 1, size=b)}
            for kind, lens in cases.items():
                t = eng.time_decode_s(b, lens, repeats=5 if args.quick else 15)
                mixed["batch"].append(b)
                mixed["kind"].append(kind)
                mixed["mean_ctx_tokens"].append(float(lens.mean()))
                mixed["max_ctx_tokens"].append(int(lens.max()))
                mixed["time_s"].append(t)
                print("decode_mixed", b, kind, round(float(lens.mean())), int(lens.max()),
                      round(t * 1e3, 2), "ms", flush=True)
        marks.append({"phase": "decode_mixed", "t0": t0, "t1": time.time()})
        # Sustained phases for power and temperature (idle gaps between them).
        phases: list[dict[str, Any]] = []
        ps = 3.0 if args.quick else args.phase_s
        gap_s = 2.0 if args.quick else 4.0

        def idle(seconds: float, name: str = "idle") -> None:
            a = time.time()
            time.sleep(seconds)
            b = time.time()
            marks.append({"phase": name, "t0": a, "t1": b})
            phases.append({"phase": name, "kind": "idle", "load": 0,
                           **phase_summary(sampler, a, b, 0.5 * seconds)})

        idle(2 * gap_s)
        pre_tokens = [512, 2048] if args.quick else [256, 1024, 2048, 4000]
        for n in pre_tokens:
            n = min(n, args.max_ctx - 1)
            ids = torch.randint(0, eng.shape.vocab, (n,), device=eng.device)
            a = time.time()
            iters = 0
            with torch.inference_mode():
                while time.time() - a < ps:
                    eng.prefill(ids, 0)
                    eng.sync()
                    iters += 1
            b = time.time()
            name = f"prefill_L{n}"
            marks.append({"phase": name, "t0": a, "t1": b, "iters": iters})
            phases.append({"phase": name, "kind": "prefill", "load": n, "iters": iters,
                           "time_s_per_iter": (b - a) / iters,
                           **phase_summary(sampler, a, b, 2.0)})
            print(phases[-1], flush=True)
            idle(gap_s, "idle_gap")
        # Decode power depends on the context as well as the batch (longer contexts read more
        # KV cache per iteration), so the sustained phases cover both.
        dec_loads = [(1, 1000), (64, 1000), (64, 2000)] if args.quick else [
            (1, 1000), (8, 1000), (32, 1000), (64, 1000), (8, 256), (32, 256), (64, 256),
            (8, 2000), (32, 2000), (64, 2000), (16, 3500), (32, 3500), (64, 3500)]
        for bsz, ctx in [(b, c) for b, c in dec_loads
                         if b <= args.max_slots and c + 20 < args.max_ctx]:
            a = time.time()
            iters = 0
            while time.time() - a < ps:
                eng.passes.pos[:bsz] = ctx - 1
                for k in range(20):
                    eng.decode_step(bsz, ctx - 1 + k, np.full(bsz, ctx - 1 + k))
                eng.sync()
                iters += 20
            b = time.time()
            name = f"decode_bs{bsz}_ctx{ctx}"
            marks.append({"phase": name, "t0": a, "t1": b, "iters": iters})
            phases.append({"phase": name, "kind": "decode", "load": bsz, "ctx_tokens": ctx,
                           "iters": iters, "time_s_per_iter": (b - a) / iters,
                           **phase_summary(sampler, a, b, 2.0)})
            print(phases[-1], flush=True)
            idle(gap_s, "idle_gap")
    finally:
        sampler.stop()
    chk = sampler.energy_j(sampler.samples()[0, 0], sampler.samples()[-1, 0])
    static["achieved_sample_hz"] = sampler.achieved_rate_hz()
    static["energy_counter_vs_power_integral_whole_run"] = chk.rel_diff
    return {"static": static, "prefill": prefill, "decode": decode, "decode_mixed": mixed,
            "phases": phases,
            "marks": marks, "samples": sampler.recorded()}


def run(args: ProfileArgs, command: str = "llm-cluster profile") -> int:
    """Run the profile and write it.

    Raises:
        GpuUnavailableError: No NVML / GPU here.
        WorkerError: No CUDA device for the worker.
    """
    res = measure(args)
    samples = res.pop("samples")
    static = res.pop("static")
    save_recording(args.out, static, samples, **res)
    print(f"wrote {args.out}", flush=True)
    return 0
