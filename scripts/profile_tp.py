r"""`llm-cluster profile-tp`: tensor-parallel workers' prefill/decode time and per-GPU power at TP 1/2/4/8.

For each model shape (default: the Llama-3-8B shape and the Llama-2-70B shape, random weights;
``envs/real/tp_worker.py`` ``TP_SHAPES``) and each TP degree that fits the node, starts a
:class:`envs.real.tp_worker.TPInferenceEngine` on GPUs ``0..tp-1`` and, on the leader, measures
at the clocks the GPUs run by themselves (clocks and power limits are read, never set):

* prefill time vs prompt tokens (median of repeats, one prompt per pass) and the SM clock;
* decode iteration time vs batch and context length;
* sustained phases (idle, prefill at two prompt lengths, decode at two batch sizes) with the
  power of every GPU of the group from the NVML energy counter, clocks and throttle reasons.

The table it writes (JSON, schema ``llm-cluster-gym/tp-profile/1``; provenance holds the
command, date, GPUs and driver) is what ``llm-cluster compare-profiles`` reads.

Usage::

    llm-cluster profile-tp --dry-run                      # print the plan, run nothing
    llm-cluster profile-tp --tiny --out /tmp/tp_tiny.json  # CPU, gloo, tiny shapes
    PYTHONUNBUFFERED=1 llm-cluster profile-tp --models llama2-70b --tps 2 4 8 \\
        --out envs/data/real/h200_tp_llama2-70b.json       # GPU node (NCCL)
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.real.tp_worker import (
    TP_SHAPES,
    TPShardError,
    TPWorkerConfig,
    TPWorkerError,
    run_tp,
)
from llm_cluster_gym.envs.real.worker import ModelShape, WorkerConfig
from llm_cluster_gym.scripts.usage import UsageError

SCHEMA = "llm-cluster-gym/tp-profile/1"
GIB = 1024 ** 3
# MODELLING ASSUMPTION for the memory plan: CUDA context, NCCL buffers, activations and graph
# pools take this much per GPU on top of weights and KV cache (vLLM keeps 10% of HBM free).
OVERHEAD_FRACTION = 0.10
# Memory per GPU used by --dry-run without a GPU: the nvidia-h200 machine description of the
# lent machines ("about 139 GiB of GPU memory"); pass --gpu-mem-gib for another GPU.
DRY_RUN_GPU_MEM_GIB = 139.0


@dataclass
class Grids:
    """What is measured for one (model, TP) entry."""

    prefill_tokens: list[int]
    decode_batch: list[int]
    decode_ctx: list[int]
    phase_prefill_tokens: list[int]
    phase_decode_batch: list[int]
    phase_decode_ctx: int
    phase_s: float
    gap_s: float
    prefill_repeats: int = 5
    decode_repeats: int = 15


GPU_GRIDS = Grids([128, 256, 512, 1024, 2048, 3072, 4000], [1, 2, 4, 8, 16, 32, 64],
                  [128, 512, 1024, 2048, 4000], [1024, 4000], [8, 64], 1000, 8.0, 4.0)
TINY_GRIDS = Grids([8, 32], [1, 4], [16, 48], [32], [4], 16, 0.3, 0.1, 2, 3)


@dataclass
class ProfileTPArgs:
    """Profile tensor-parallel workers at TP 1/2/4/8: time and per-GPU power (GPU node, or --tiny on CPU)."""

    out: Path = Path("tp_profile.json")
    """Output table (JSON)."""
    models: list[str] = field(default_factory=lambda: ["llama3-8b", "llama2-70b"])
    """Model shapes (keys of envs.real.tp_worker.TP_SHAPES)."""
    tps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """TP degrees."""
    first_gpu: int = 0
    """The group of TP t runs on GPUs first_gpu .. first_gpu+t-1."""
    max_slots: int = 64
    """KV-cache slots (largest decode batch); lowered per entry until the plan fits."""
    max_ctx: int = 4096
    """Context per slot."""
    sample_hz: float = 25.0
    """NVML sampling rate."""
    dry_run: bool = False
    """Print the plan and what would be measured; run nothing."""
    tiny: bool = False
    """CPU run with gloo and the tiny-tp shape at TP 1 and 2 (tests the whole path)."""
    gpu_mem_gib: float | None = None
    """Memory per GPU for the plan (None: read from the GPU; dry run: 139 GiB)."""
    n_gpus: int | None = None
    """GPUs on the node for the plan (None: torch's count; dry run: 8)."""

    def __post_init__(self) -> None:
        if self.tiny:
            self.models, self.tps, self.max_slots, self.max_ctx = ["tiny-tp"], [1, 2], 4, 64
        for m in self.models:
            if m not in TP_SHAPES:
                raise UsageError(f"--models: unknown shape {m!r}; known: {sorted(TP_SHAPES)}")
        if not self.models or not self.tps or any(t <= 0 for t in self.tps):
            raise UsageError(f"--models and --tps need at least one value, TP degrees > 0; got "
                             f"{self.models} and {self.tps}")


def gpu_key(name: str) -> str:
    """Short GPU name used in profile file names: "NVIDIA H100 80GB HBM3" -> "h100"."""
    for tok in name.lower().replace("-", " ").split():
        if tok[:1] in "abhl" and any(c.isdigit() for c in tok) and tok != "80gb":
            return tok
    return name.lower().replace(" ", "_")


def memory_per_gpu_bytes(shape: ModelShape, tp: int, slots: int, ctx: int) -> dict[str, float]:
    """Bytes per GPU of a TP engine: weight shard (bf16), replicated embedding/head, KV shard."""
    emb = 2 * shape.vocab * shape.d_model * 2
    sharded = (shape.n_params - 2 * shape.vocab * shape.d_model) * 2 / tp
    kv = slots * ctx * shape.kv_bytes_per_token() / tp
    return {"weights": sharded + emb, "kv_cache": kv}


def plan_entries(args: ProfileTPArgs, gpu_mem_bytes: float, n_gpus: int) -> tuple[list[dict], list[dict]]:
    """(entries to run, entries skipped with why) for the requested models and TP degrees."""
    run_list, skipped = [], []
    for m in args.models:
        shape = TP_SHAPES[m]
        for tp in args.tps:
            why = None
            if tp > n_gpus:
                why = f"needs {tp} GPUs, the node has {n_gpus}"
            elif shape.n_kv_heads % tp or shape.n_heads % tp:
                why = f"{shape.n_kv_heads} KV heads do not split over tp={tp}"
            slots = args.max_slots
            budget = gpu_mem_bytes * (1.0 - OVERHEAD_FRACTION)
            mem = memory_per_gpu_bytes(shape, tp, slots, args.max_ctx)
            while why is None and mem["weights"] + mem["kv_cache"] > budget and slots > 1:
                slots //= 2
                mem = memory_per_gpu_bytes(shape, tp, slots, args.max_ctx)
            if why is None and mem["weights"] + mem["kv_cache"] > budget:
                why = (f"weights {mem['weights'] / GIB:.1f} GiB per GPU exceed "
                       f"{budget / GIB:.1f} GiB usable")
            e = {"model": m, "tp": tp, "max_slots": slots, "max_ctx": args.max_ctx,
                 "weights_gib_per_gpu": round(mem["weights"] / GIB, 2),
                 "kv_gib_per_gpu": round(mem["kv_cache"] / GIB, 2)}
            (skipped if why else run_list).append({**e, "why": why} if why else e)
    return run_list, skipped


def estimate_duration_s(entry: dict, grids: Grids) -> float:
    """Rough wall time of one entry on GPUs (start-up + sweeps + sustained phases)."""
    shape = TP_SHAPES[entry["model"]]
    start_s = 30.0 + shape.n_params * 2 / entry["tp"] / 50e9 + 60.0  # init, random fill, graphs
    phases = len(grids.phase_prefill_tokens) + len(grids.phase_decode_batch) + 1
    sweeps = 15.0 + 0.5 * len(grids.decode_batch) * len(grids.decode_ctx)
    return start_s + sweeps + phases * (grids.phase_s + grids.gap_s)


def describe(args: ProfileTPArgs, grids: Grids, run_list: list[dict], skipped: list[dict]) -> str:
    """What the run measures, as text (printed by --dry-run and before a real run)."""
    lines = [f"profile_tp plan ({'tiny CPU/gloo' if args.tiny else 'GPU/NCCL'}):",
             f"  prefill time: prompt tokens {grids.prefill_tokens} "
             f"(median of {grids.prefill_repeats}), SM clock per point",
             f"  decode time: batch {grids.decode_batch} x context {grids.decode_ctx} "
             f"(median of {grids.decode_repeats})",
             f"  sustained power per GPU (energy counter): idle, prefill "
             f"{grids.phase_prefill_tokens} tokens, decode batch {grids.phase_decode_batch} at "
             f"context {grids.phase_decode_ctx}; {grids.phase_s} s each, {grids.gap_s} s idle "
             "gaps; clocks read, never set"]
    total = 0.0
    for e in run_list:
        est = estimate_duration_s(e, grids)
        total += est
        lines.append(f"  RUN  {e['model']:>11} tp={e['tp']} on GPUs {args.first_gpu}.."
                     f"{args.first_gpu + e['tp'] - 1}: slots={e['max_slots']} ctx={e['max_ctx']} "
                     f"weights {e['weights_gib_per_gpu']} GiB + KV {e['kv_gib_per_gpu']} GiB per "
                     f"GPU, ~{est / 60:.1f} min on GPUs")
    for e in skipped:
        lines.append(f"  SKIP {e['model']:>11} tp={e['tp']}: {e['why']}")
    lines.append(f"  total ~{total / 60:.1f} min on GPUs")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The measurement (runs in the leader's process)
# ---------------------------------------------------------------------------------------------


def _phase_power(sampler: Any, n_gpus: int, a: float, b: float, settle_s: float) -> dict:
    if sampler is None:
        return {"power_w_per_gpu": None, "power_w_mean": None, "sm_clock_mhz_median": None,
                "temp_c_max": None, "throttle_reasons": []}
    from llm_cluster_gym.envs.real.telemetry import column_index, decode_throttle_reasons

    t0 = a + min(settle_s, 0.5 * (b - a))
    power = [sampler.energy_j(t0, b, gpu=g).mean_power_w for g in range(n_gpus)]
    clocks, temps, reasons = [], [], set()
    for g in range(n_gpus):
        w = sampler.window(t0, b, gpu=g)
        clocks.append(float(np.nanmedian(w[:, column_index("sm_clock_mhz")])))
        temps.append(float(np.nanmax(w[:, column_index("temp_c")])))
        mask = np.nan_to_num(w[:, column_index("throttle_mask")]).astype(np.int64)
        reasons |= {r for m in np.unique(mask) for r in decode_throttle_reasons(int(m))}
    return {"power_w_per_gpu": power, "power_w_mean": float(np.mean(power)),
            "sm_clock_mhz_median": float(np.median(clocks)), "temp_c_max": float(max(temps)),
            "throttle_reasons": sorted(reasons)}


def measure_entry(eng: Any, info: dict, grids: Grids, gpu_indices: list[int] | None,
                  sample_hz: float) -> dict[str, Any]:
    """Measure one engine (leader side); ``gpu_indices`` None: no NVML (CPU)."""
    import torch

    sampler, statics = None, []
    if gpu_indices is not None:
        from llm_cluster_gym.envs.real.telemetry import NvmlGpuDevice, TelemetrySampler

        devs = [NvmlGpuDevice(i) for i in gpu_indices]
        statics = [d.static().as_dict() for d in devs]
        sampler = TelemetrySampler(devs, rate_hz=sample_hz, keep_all=True).start()
    n_g = len(gpu_indices or [])
    cfg = eng.cfg
    try:
        prefill: dict[str, list] = {"tokens": [], "time_s": [], "sm_clock_mhz": []}
        for n in grids.prefill_tokens:
            n = min(n, cfg.max_ctx - 1)
            a = time.time()
            prefill["tokens"].append(n)
            prefill["time_s"].append(eng.time_prefill_s(n, repeats=grids.prefill_repeats))
            clk = _phase_power(sampler, n_g, a, time.time(), 0.0)["sm_clock_mhz_median"]
            prefill["sm_clock_mhz"].append(clk)
        decode: dict[str, list] = {"batch": [], "ctx_tokens": [], "time_s": []}
        for c in grids.decode_ctx:
            for b in grids.decode_batch:
                if b > cfg.max_slots or c >= cfg.max_ctx:
                    continue
                decode["batch"].append(b)
                decode["ctx_tokens"].append(c)
                decode["time_s"].append(eng.time_decode_s(b, c, repeats=grids.decode_repeats))
        phases: list[dict[str, Any]] = []

        def idle(seconds: float) -> dict:
            a = time.time()
            time.sleep(seconds)
            return {"phase": "idle", "kind": "idle", "load": 0,
                    **_phase_power(sampler, n_g, a, time.time(), 0.5 * seconds)}

        phases.append(idle(2 * grids.gap_s))
        with torch.inference_mode():
            for n in grids.phase_prefill_tokens:
                n = min(n, cfg.max_ctx - 1)
                ids = torch.randint(0, eng.shape.vocab, (n,), device=eng.device)
                a, iters = time.time(), 0
                while time.time() - a < grids.phase_s or iters == 0:
                    eng.prefill(ids, 0)
                    eng.sync()
                    iters += 1
                b = time.time()
                phases.append({"phase": f"prefill_L{n}", "kind": "prefill", "load": n,
                               "iters": iters, "time_s_per_iter": (b - a) / iters,
                               **_phase_power(sampler, n_g, a, b, min(2.0, 0.3 * (b - a)))})
                time.sleep(grids.gap_s)
            ctx = min(grids.phase_decode_ctx, cfg.max_ctx - 21)
            for bsz in [x for x in grids.phase_decode_batch if x <= cfg.max_slots]:
                a, iters = time.time(), 0
                while time.time() - a < grids.phase_s or iters == 0:
                    eng.passes.pos[:bsz] = ctx - 1
                    for _ in range(20):
                        eng.decode_step(bsz, ctx + 20)
                    eng.sync()
                    iters += 20
                b = time.time()
                phases.append({"phase": f"decode_bs{bsz}_ctx{ctx}", "kind": "decode",
                               "load": bsz, "ctx_tokens": ctx, "iters": iters,
                               "time_s_per_iter": (b - a) / iters,
                               **_phase_power(sampler, n_g, a, b, min(2.0, 0.3 * (b - a)))})
                time.sleep(grids.gap_s)
    finally:
        if sampler is not None:
            sampler.stop()
    idle_w = phases[0]["power_w_mean"]
    return {"model": eng.full_shape.name, "tp": eng.tp, "max_slots": cfg.max_slots,
            "max_ctx": cfg.max_ctx, "start": info, "gpu_static": statics,
            "shape": {k: getattr(eng.full_shape, k) for k in (
                "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ffn", "vocab")},
            "prefill": prefill, "decode": decode,
            "power": {"idle_w_per_gpu": idle_w, "phases": phases}}


def _provenance(args: ProfileTPArgs, statics: list[dict]) -> dict[str, Any]:
    import torch

    prov = {"command": shlex.join([sys.executable, *sys.argv]),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "mode": "tiny-cpu-gloo" if args.tiny else "gpu-nccl",
            "weights": "random (seeded blocks, envs/real/tp_layers.py); bf16 on GPU, fp32 on CPU",
            "clocks": "read, never set"}
    if statics:
        prov.update(gpu_name=statics[0].get("name"), driver=statics[0].get("driver"),
                    gpu_power_limit_w=statics[0].get("power_limit_w"),
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
    return prov


def measure(args: ProfileTPArgs) -> dict[str, Any]:
    """Plan, measure every entry that fits, return the table."""
    grids = TINY_GRIDS if args.tiny else GPU_GRIDS
    if args.dry_run:
        mem = (args.gpu_mem_gib or DRY_RUN_GPU_MEM_GIB) * GIB
        n_gpus = args.n_gpus or (2 if args.tiny else 8)
    elif args.tiny:
        mem, n_gpus = 64 * GIB, args.n_gpus or 8
    else:
        import torch

        if not torch.cuda.is_available():
            raise TPWorkerError("profile_tp: torch sees no CUDA device (use --tiny or --dry-run)")
        n_gpus = args.n_gpus or torch.cuda.device_count() - args.first_gpu
        mem = (args.gpu_mem_gib * GIB if args.gpu_mem_gib else
               torch.cuda.get_device_properties(args.first_gpu).total_memory)
    run_list, skipped = plan_entries(args, mem, n_gpus)
    print(describe(args, grids, run_list, skipped), flush=True)
    table: dict[str, Any] = {"schema": SCHEMA, "plan": run_list, "skipped": skipped,
                             "entries": []}
    if args.dry_run:
        return table
    statics: list[dict] = []
    for e in run_list:
        wc = WorkerConfig(model=e["model"], device="cpu" if args.tiny else f"cuda:{args.first_gpu}",
                          max_slots=e["max_slots"], max_ctx=e["max_ctx"],
                          cuda_graphs=False if args.tiny else None)
        tcfg = TPWorkerConfig(worker=wc, tp=e["tp"],
                              start_method="forkserver" if args.tiny else "spawn")
        gpus = None if args.tiny else list(range(args.first_gpu, args.first_gpu + e["tp"]))
        t0 = time.time()
        try:
            res = run_tp(tcfg, measure_entry, grids, gpus, args.sample_hz, timeout_s=3600)
        except (TPWorkerError, TPShardError) as err:
            print(f"FAILED {e['model']} tp={e['tp']}: {err}", flush=True)
            table["skipped"].append({**e, "why": f"failed: {err}"})
            continue
        res["gpu"] = "cpu" if args.tiny else gpu_key(res["gpu_static"][0]["name"])
        res["wall_s"] = time.time() - t0
        statics = statics or res["gpu_static"]
        table["entries"].append(res)
        print(f"done {e['model']} tp={e['tp']} in {res['wall_s']:.0f} s: prefill "
              f"{[round(t * 1e3, 2) for t in res['prefill']['time_s']]} ms, idle "
              f"{res['power']['idle_w_per_gpu']} W/GPU", flush=True)
    table["provenance"] = _provenance(args, statics)
    return table


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def run(args: ProfileTPArgs, command: str = "llm-cluster profile-tp") -> int:
    """Run the profile and write the table.

    Raises:
        TPWorkerError: No GPU usable (or the workers cannot start).
    """
    table = measure(args)
    if not args.dry_run:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_jsonable(table), indent=1))
        print(f"wrote {args.out}", flush=True)
    return 0
