r"""One call that measures a tensor-parallel GPU node: TP profiles, reconfiguration cost, links.

Made for a lent machine whose calls are capped in time (10 minutes): everything runs from one
command, under a time budget, and the results (one JSON file, rewritten after every task) land
in ``--out``. A task whose estimate no longer fits the budget is skipped and named in the
results, so a second call with ``--tasks`` runs what is left. Clocks and power limits are read,
never set; NCCL's NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``).

Tasks (``--tasks``, in the order given):

* ``env``: GPUs (name, serial, UUID, driver, clocks, power limits, MIG and persistence modes as
  read by ``nvidia-smi``), the GPU link matrix, torch/CUDA/NCCL versions, CPU, kernel, date.
* ``profile:MODEL:TP``: ``llm-cluster profile-tp``'s measurement of one (shape, TP) entry
  (``scripts/profile_tp.py`` ``measure_entry``, shorter grids: :data:`CAMPAIGN_GRIDS`): prefill
  and decode times, sustained per-GPU power, clocks. A (shape, TP) that does not fit the GPUs is
  recorded as skipped with the reason (``plan_entries``).
* ``reconfig:MODEL:T0,T1,...``: a chain of instances on GPUs ``0..T-1``: start TP ``T0``, serve
  :data:`WARM_REQUESTS` requests, stop it, start TP ``T1``, time its first token, serve, stop,
  ... Each link is one reconfiguration with ``stop_s``, ``start_s`` (spawn + process group +
  weights + KV cache + CUDA-graph warm-up, with the leader's split), ``first_token_s`` and
  ``downtime_s`` = their sum, as ``llm-cluster measure-reconfig`` defines them. Random weights.
* ``ckpt:MODEL:T0,T1,...``: the same chain with weights read from a safetensors checkpoint of
  the shape (random values, written first to ``/dev/shm`` or ``/tmp``; read back from memory,
  so it times a page-cache read, not a cold disk).
* ``h2d``: host-to-GPU copy bandwidth (pinned and pageable) per GPU, and GPU 0 -> GPU 1.
* ``allreduce:TP``: NCCL all-reduce time of bf16 buffers of 16 KiB to 256 MiB over TP GPUs.

Usage (on the GPU node; ``python3`` must import torch and this package)::

    python3 -m llm_cluster_gym.scripts.tp_campaign --out OUT --budget-s 550 \
        --tasks env profile:llama3-8b:1 profile:llama2-70b:2 reconfig:llama3-8b:1,2,1,2
    python3 -m llm_cluster_gym.scripts.tp_campaign --smoke --out /tmp/c --tasks \
        reconfig:tiny-tp:1,2 allreduce:2          # the same code on CPU (gloo, tiny shape)
    python -m llm_cluster_gym.scripts.tp_campaign --out envs/data/real/h200 \
        --tables-from call1_results.json call2_results.json   # CSV tables, tp_profile.json

``envs/data/real/h200/README.md`` records the two calls made on two H200s.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.real.tp_worker import (
    TP_SHAPES,
    RankGroup,
    TPWorkerConfig,
    TPWorkerError,
    TPWorkerProcess,
    run_tp,
)
from llm_cluster_gym.envs.real.worker import Request, WorkerConfig
from llm_cluster_gym.scripts.host import cpu_model
from llm_cluster_gym.scripts.profile_tp import (
    GIB,
    TINY_GRIDS,
    Grids,
    ProfileTPArgs,
    gpu_key,
    measure_entry,
    memory_per_gpu_bytes,
    plan_entries,
)

SCHEMA = "llm-cluster-gym/tp-campaign/1"
CAMPAIGN_GRIDS = Grids(prefill_tokens=[128, 256, 512, 1024, 2048, 4000],
                       decode_batch=[1, 2, 4, 8, 16, 32, 64], decode_ctx=[128, 1024, 4000],
                       phase_prefill_tokens=[1024, 4000], phase_decode_batch=[1, 8, 64],
                       phase_decode_ctx=1000, phase_s=5.0, gap_s=2.0, prefill_repeats=5,
                       decode_repeats=10)
"""Shorter than ``profile-tp``'s GPU grids (three context lengths, 5 s sustained phases)."""
MAX_SLOTS, MAX_CTX = 64, 4096
WARM_REQUESTS, WARM_PROMPT, WARM_OUTPUT = 8, 512, 32
# Conservative seconds per engine start and per profile entry, by shape (the budget guard).
START_EST_S = {"llama3-8b": 35.0, "llama2-70b": 90.0, "tiny-tp": 15.0}
PROFILE_EST_S = {"llama3-8b": 100.0, "llama2-70b": 200.0, "tiny-tp": 40.0}
SMOKE_SIZES = dict(max_slots=4, max_ctx=64, prompt=8, output=3)
"""``--smoke``: every task's code path on CPU (gloo, the tiny-tp shape, small sizes), for tests."""


def log(msg: str) -> None:
    """One progress line on stdout, with the seconds since the campaign started."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {msg}", flush=True)


_T0 = time.monotonic()


def _smi(args: list[str]) -> str:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"


GPU_FIELDS = ("index", "name", "serial", "uuid", "driver_version", "pci.bus_id", "vbios_version",
              "memory.total", "persistence_mode", "mig.mode.current", "compute_mode", "pstate",
              "power.limit", "power.default_limit", "enforced.power.limit", "power.max_limit",
              "power.draw", "temperature.gpu", "clocks.sm", "clocks.mem", "clocks.max.sm",
              "clocks.max.mem", "clocks.applications.graphics", "clocks.applications.memory",
              "clocks.default_applications.graphics", "clocks_throttle_reasons.active")


def _query(fields: tuple[str, ...]) -> list[dict[str, str]] | None:
    out = _smi([f"--query-gpu={','.join(fields)}", "--format=csv,noheader"])
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines()]
    if not rows or any(len(r) != len(fields) for r in rows):
        return None
    return [dict(zip(fields, r, strict=True)) for r in rows]


def read_gpus() -> list[dict[str, str]]:
    """One dict per GPU of the :data:`GPU_FIELDS` nvidia-smi reports (strings as printed).

    A field this nvidia-smi does not know is left out (each is then asked alone).
    """
    gpus = _query(GPU_FIELDS[:8])
    if gpus is None:
        return []
    for f in GPU_FIELDS[8:]:
        col = _query((f,))
        if col is not None and len(col) == len(gpus):
            for g, c in zip(gpus, col, strict=True):
                g.update(c)
    return gpus


def task_env(ctx: Campaign) -> dict[str, Any]:
    """What the node is: GPUs, links, software, date (``nvidia-smi -q`` goes to its own file)."""
    import torch

    (ctx.out / "nvidia_smi_q.txt").write_text(_smi(["-q"]))
    cpu = cpu_model()
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "gpus": read_gpus(), "topology": _smi(["topo", "-m"]),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available()
            else None,
            "python": sys.version.split()[0], "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count(),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",
                                                   "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                   "NVSHMEM_DISABLE_NVLS", "CUDA_VISIBLE_DEVICES")}}


def _timed_measure_entry(eng: Any, info: dict, *args: Any) -> dict[str, Any]:  # pragma: no cover
    res = measure_entry(eng, info, *args)
    res["measured_until_unix"] = time.time()
    return res


def profile_plan(ctx: Campaign, model: str, tp: int) -> dict[str, Any]:
    """``profile-tp``'s memory plan of one (shape, TP) entry; ``why`` says if it cannot run."""
    args = ProfileTPArgs(models=[model], tps=[tp], max_slots=ctx.max_slots, max_ctx=ctx.max_ctx)
    run_list, skipped = plan_entries(args, ctx.gpu_mem_bytes, ctx.n_gpus)
    return (run_list or skipped)[0]


def task_profile(ctx: Campaign, model: str, tp: int) -> dict[str, Any]:
    """``profile-tp``'s measurement of one (shape, TP) entry, or why it cannot run here."""
    e = profile_plan(ctx, model, tp)
    if e.get("why"):
        return {"skipped": e}
    wc = WorkerConfig(model=model, device=ctx.device, max_slots=e["max_slots"],
                      max_ctx=e["max_ctx"])
    tcfg = TPWorkerConfig(worker=wc, tp=tp, start_timeout_s=ctx.left_s(),
                          collective_timeout_s=300.0)
    t0 = time.time()
    res = run_tp(tcfg, _timed_measure_entry, TINY_GRIDS if ctx.smoke else CAMPAIGN_GRIDS,
                 None if ctx.smoke else list(range(tp)), 25.0,
                 timeout_s=max(30.0, ctx.left_s() - 5.0))
    t1 = time.time()
    res.update(gpu=gpu_key(res["gpu_static"][0]["name"]) if res["gpu_static"] else "cpu",
               plan=e, wall_s=t1 - t0, teardown_s=t1 - res.pop("measured_until_unix"))
    phases = [(p["phase"], round(p["power_w_mean"] or 0), round(p.get("time_s_per_iter", 0) * 1e3, 2))
              for p in res["power"]["phases"]]
    log(f"profile {model} tp={tp}: start {res['start']}, prefill ms "
        f"{[round(x * 1e3, 2) for x in res['prefill']['time_s']]}, phases (W, ms/iter) {phases}")
    return res


def _serve(worker: TPWorkerProcess, n: int, prompt: int, out: int, timeout_s: float) -> float:
    """Submit ``n`` requests now; returns the wall time until the last one finished."""
    t0 = time.time()
    worker.submit([Request(i, t0, prompt, out) for i in range(n)])
    got = 0
    while got < n:
        if time.time() - t0 > timeout_s:
            raise TPWorkerError(f"tp_campaign: {n - got} of {n} requests not done in {timeout_s} s")
        time.sleep(0.002)
        got += len(worker.poll().completed)
    return time.time() - t0


def task_reconfig(ctx: Campaign, model: str, chain: list[int],
                  weights_path: str | None = None) -> dict[str, Any]:
    """A chain of instances, each replacing the previous one on GPUs ``0..tp-1``."""
    def cfg(tp: int) -> TPWorkerConfig:
        wc = WorkerConfig(model=model, device=ctx.device, max_slots=ctx.max_slots,
                          max_ctx=ctx.max_ctx, weights_path=weights_path)
        return TPWorkerConfig(worker=wc, tp=tp, start_timeout_s=max(30.0, ctx.left_s() - 5.0),
                              collective_timeout_s=300.0)

    est = START_EST_S[model]
    prompt, out = ctx.warm
    res: dict[str, Any] = {"model": model, "chain": chain, "weights": weights_path or "random",
                           "max_slots": ctx.max_slots, "max_ctx": ctx.max_ctx,
                           "warm": {"requests": WARM_REQUESTS, "prompt": prompt, "output": out},
                           "first_prompt": prompt, "links": []}
    t0 = time.perf_counter()
    w = TPWorkerProcess(cfg(chain[0]))
    res["first_start"] = {"tp": chain[0], "start_s": time.perf_counter() - t0, **w.start_info}
    log(f"reconfig {model}: TP{chain[0]} up in {res['first_start']['start_s']:.1f} s "
        f"{w.start_info}")
    try:
        res["first_start"]["warm_s"] = _serve(w, WARM_REQUESTS, prompt, out, 120.0)
        for k, tp in enumerate(chain[1:]):
            if ctx.left_s() < est + 20.0:
                res["stopped_early"] = f"{ctx.left_s():.0f} s left before link {k}"
                break
            stop_s = w.close()
            link: dict[str, Any] = {"from_tp": chain[k], "to_tp": tp, "stop_s": stop_s,
                                    "old_stop_info": w.stop_info}
            t0 = time.perf_counter()
            w = TPWorkerProcess(cfg(tp))
            link["start_s"] = time.perf_counter() - t0
            link["new_start_info"] = dict(w.start_info)
            link["first_token_s"] = _serve(w, 1, prompt, 1, 120.0)
            link["downtime_s"] = link["stop_s"] + link["start_s"] + link["first_token_s"]
            si = w.start_info
            link["spawn_import_s"] = si["spawn_to_ready_s"] - si["dist_init_s"] - si["build_s"] \
                - si["warmup_s"]
            if k < len(chain) - 2:
                link["warm_s"] = _serve(w, WARM_REQUESTS, prompt, out, 120.0)
            res["links"].append(link)
            log(f"reconfig {model}: TP{chain[k]} -> TP{tp}: stop {stop_s:.2f} s, start "
                f"{link['start_s']:.2f} s ({ {a: round(b, 2) for a, b in si.items()} }), first "
                f"token {link['first_token_s']:.3f} s, downtime {link['downtime_s']:.2f} s")
    finally:
        res["last_stop_s"] = w.close()
        res["last_stop_info"] = w.stop_info
    return res


def _save_checkpoint(eng: Any, info: dict, folder: str) -> dict[str, Any]:  # pragma: no cover
    """Write the leader's (TP 1) random weights as an HF Llama checkpoint (bf16 safetensors)."""
    from safetensors.torch import save_file

    s = eng.full_shape
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({
        "_name_or_path": s.name, "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": s.n_layers, "hidden_size": s.d_model,
        "num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads,
        "head_dim": s.head_dim, "intermediate_size": s.d_ffn, "vocab_size": s.vocab,
        "rope_theta": s.rope_theta, "rms_norm_eps": s.rms_eps, "torch_dtype": "bfloat16"}))
    t0 = time.perf_counter()
    shard: dict[str, Any] = {}
    size, n_files, total = 0, 0, 0
    params = list(eng.passes.model.named_parameters())
    for i, (name, prm) in enumerate(params):
        t = prm.detach().to("cpu").contiguous()
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= 4 * GIB or i == len(params) - 1:
            save_file(shard, str(out / f"model-{n_files:05d}.safetensors"))
            n_files, total, shard, size = n_files + 1, total + size, {}, 0
    return {"bytes": total, "files": n_files, "write_s": time.perf_counter() - t0,
            "folder": folder}


def task_ckpt(ctx: Campaign, model: str, chain: list[int]) -> dict[str, Any]:
    """Write a checkpoint of the shape, then the reconfiguration chain loading it."""
    need = memory_per_gpu_bytes(TP_SHAPES[model], 1, 0, 1)["weights"] * 1.2
    root = next((d for d in ("/dev/shm", "/tmp") if shutil.disk_usage(d).free > need), None)
    if root is None:
        return {"skipped": f"no /dev/shm or /tmp with {need / GIB:.0f} GiB free"}
    folder = f"{root}/tp_campaign_ckpt_{model}"
    wc = WorkerConfig(model=model, device=ctx.device, max_slots=1, max_ctx=64, cuda_graphs=False)
    t0 = time.perf_counter()
    ck = run_tp(TPWorkerConfig(worker=wc, tp=1), _save_checkpoint, folder,
                timeout_s=max(30.0, ctx.left_s() - 5.0))
    ck["wall_s"] = time.perf_counter() - t0
    log(f"checkpoint {model}: {ck}")
    try:
        res = task_reconfig(ctx, model, chain, weights_path=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res["checkpoint"] = ck
    return res


def _h2d_child(q: Any, n_gpus: int, gib: float) -> None:  # pragma: no cover - child process
    import torch

    nbytes = int(gib * GIB)
    out: dict[str, Any] = {"bytes": nbytes}

    def bw(fn: Callable[[], Any], dev: int, reps: int = 5) -> float:
        fn()
        torch.cuda.synchronize(dev)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(dev)
            ts.append(time.perf_counter() - t0)
        return nbytes / float(np.median(ts)) / 1e9

    try:
        pinned = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        pageable = torch.ones(nbytes, dtype=torch.uint8)
        for g in range(n_gpus):
            dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{g}")
            out[f"gpu{g}_pinned_gb_s"] = bw(lambda d=dst: d.copy_(pinned, non_blocking=True), g)
            out[f"gpu{g}_pageable_gb_s"] = bw(lambda d=dst: d.copy_(pageable), g)
            del dst
        if n_gpus > 1:
            a = torch.ones(nbytes, dtype=torch.uint8, device="cuda:0")
            b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
            out["can_access_peer_0_1"] = torch.cuda.can_device_access_peer(0, 1)
            out["gpu0_to_gpu1_gb_s"] = bw(lambda: b.copy_(a, non_blocking=True), 0)
        q.put(("ok", out))
    except Exception as exc:  # noqa: BLE001
        q.put(("error", f"{type(exc).__name__}: {exc}"))


def _spawn_and_wait(targets: list[tuple[Callable, tuple]], timeout_s: float) -> Any:
    """Run spawned processes; returns the first ("ok", value) put on the queue by rank 0."""
    mctx = mp.get_context("spawn")
    q = mctx.Queue()
    procs = [mctx.Process(target=f, args=(q, *a), daemon=True) for f, a in targets]
    for p in procs:
        p.start()
    try:
        kind, val = q.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    if kind != "ok":
        raise TPWorkerError(f"tp_campaign child: {val}")
    return val


def task_h2d(ctx: Campaign) -> dict[str, Any]:
    """Host-to-GPU copy bandwidth per GPU (pinned, pageable) and GPU 0 -> GPU 1."""
    if ctx.smoke:
        return {"skipped": "needs CUDA"}
    return _spawn_and_wait([(_h2d_child, (min(ctx.n_gpus, 2), 4.0))],
                           max(30.0, ctx.left_s() - 5.0))


ALLREDUCE_KIB = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536, 262144]


def _allreduce_child(q: Any, rank: int, tp: int, port: int, smoke: bool) -> None:  # pragma: no cover
    import torch
    import torch.distributed as dist

    dev = "cpu" if smoke else f"cuda:{rank}"
    if not smoke:
        torch.cuda.set_device(rank)

    def sync() -> None:
        if not smoke:
            torch.cuda.synchronize()

    rg = RankGroup.join("gloo" if smoke else "nccl", rank, tp, port,
                        None if smoke else dev, 120.0)
    rows = []
    try:
        for kib in ALLREDUCE_KIB[:3] if smoke else ALLREDUCE_KIB:
            n = kib * 1024 // 2
            x = torch.ones(n, dtype=torch.bfloat16, device=dev)
            for _ in range(5):
                dist.all_reduce(x)
            sync()
            reps = 50 if kib <= 4096 else 20
            ts = []
            for _ in range(reps):
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                sync()
                ts.append(time.perf_counter() - t0)
            t = float(np.median(ts))
            nbytes = n * 2
            rows.append({"bytes": nbytes, "time_s": t, "min_time_s": float(np.min(ts)),
                         "bus_gb_s": nbytes * 2 * (tp - 1) / tp / t / 1e9})
        if rank == 0:
            q.put(("ok", {"tp": tp, "dtype": "bfloat16", "timing": "wall time of one eager "
                          "all_reduce after a barrier, synchronized, median", "rows": rows}))
    except Exception as exc:  # noqa: BLE001
        q.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
    finally:
        rg.close()


def task_allreduce(ctx: Campaign, tp: int) -> dict[str, Any]:
    """NCCL all-reduce times over ``tp`` GPUs (bf16, 16 KiB to 256 MiB)."""
    if tp > ctx.n_gpus:
        return {"skipped": f"needs {tp} GPUs, the node has {ctx.n_gpus}"}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    return _spawn_and_wait([(_allreduce_child, (r, tp, port, ctx.smoke)) for r in range(tp)],
                           max(30.0, ctx.left_s() - 5.0))


class Campaign:
    """The budget, the output folder and the results file of one call."""

    def __init__(self, out: Path, budget_s: float, smoke: bool = False) -> None:
        self.out, self.budget_s, self.smoke = out, budget_s, smoke
        self.t0 = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        if smoke:
            self.n_gpus, self.gpu_mem_bytes, self.device = 2, 64.0 * GIB, "cpu"
            self.max_slots, self.max_ctx = SMOKE_SIZES["max_slots"], SMOKE_SIZES["max_ctx"]
            self.warm = (SMOKE_SIZES["prompt"], SMOKE_SIZES["output"])
        else:
            gpus = read_gpus()
            self.n_gpus, self.device = len(gpus), "cuda:0"
            self.gpu_mem_bytes = float(gpus[0]["memory.total"].split()[0]) * 1024 ** 2 \
                if gpus else 0.0
            self.max_slots, self.max_ctx = MAX_SLOTS, MAX_CTX
            self.warm = (WARM_PROMPT, WARM_OUTPUT)
        self.results: dict[str, Any] = {
            "schema": SCHEMA, "command": shlex.join([sys.executable, *sys.argv]),
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "budget_s": budget_s, "grids": CAMPAIGN_GRIDS.__dict__, "tasks": {}}

    def left_s(self) -> float:
        """Seconds left of the budget."""
        return self.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        """Rewrite the results file (atomically)."""
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(_jsonable(self.results), indent=1))
        tmp.replace(self.out / "results.json")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def plan_task(name: str) -> tuple[float, Callable[[Campaign], dict[str, Any]]]:
    """(estimated seconds, function) of a task name (see the module docstring).

    Raises:
        ValueError: Unknown task or shape.
    """
    kind, _, rest = name.partition(":")
    if kind == "env":
        return 10.0, task_env
    if kind == "h2d":
        return 40.0, task_h2d
    if kind == "allreduce":
        return 45.0, lambda c: task_allreduce(c, int(rest))
    model, _, arg = rest.partition(":")
    if model not in START_EST_S:
        raise ValueError(f"task {name!r}: unknown shape {model!r}; known: {sorted(START_EST_S)}")
    if kind == "profile":
        return PROFILE_EST_S[model], lambda c: task_profile(c, model, int(arg))
    chain = [int(t) for t in arg.split(",")]
    if kind == "reconfig":
        return START_EST_S[model] * len(chain) + 30.0, lambda c: task_reconfig(c, model, chain)
    if kind == "ckpt":
        return START_EST_S[model] * len(chain) + 90.0, lambda c: task_ckpt(c, model, chain)
    raise ValueError(f"task {name!r}: unknown kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# Tables from the results of one or more calls
# ---------------------------------------------------------------------------------------------


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    def cell(x: Any) -> str:
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return ""
        if isinstance(x, float):
            return f"{x:.6g}"
        return str(x).replace(",", ";")

    path.write_text("\n".join([",".join(header)] + [",".join(cell(c) for c in r) for r in rows])
                    + "\n")


def _call_label(path: Path, res: dict[str, Any]) -> str:
    return path.parent.name if path.name == "results.json" else path.stem.removesuffix("_results")


def write_tables(paths: list[Path], out: Path) -> dict[str, Any]:
    """CSV tables and a ``profile-tp`` table (for ``compare-profiles``) from results files.

    Returns:
        The ``profile-tp`` table (schema ``llm-cluster-gym/tp-profile/1``).
    """
    out.mkdir(parents=True, exist_ok=True)
    pre, dec, pw, rc, ar = [], [], [], [], []
    table: dict[str, Any] = {"schema": "llm-cluster-gym/tp-profile/1", "plan": [], "skipped": [],
                             "entries": [], "calls": []}
    for path in paths:
        res = json.loads(Path(path).read_text())
        call = _call_label(Path(path), res)
        env = res["tasks"].get("env", {})
        gpus = env.get("gpus", [])
        table["calls"].append({"call": call, "command": res["command"],
                               "started_utc": res["started_utc"], "gpus": gpus,
                               **{k: env.get(k) for k in ("torch", "cuda", "nccl", "kernel")}})
        for name, t in res["tasks"].items():
            if name.startswith("profile:") and isinstance(t.get("skipped"), dict):
                table["skipped"].append({**t["skipped"], "call": call})
            if not name.startswith("profile:") or "prefill" not in t:
                continue
            m, tp = t["model"], t["tp"]
            table["entries"].append({**t, "call": call})
            table["plan"].append(t.get("plan"))
            p = t["prefill"]
            pre += [[call, m, tp, n, 1e3 * x, c] for n, x, c in
                    zip(p["tokens"], p["time_s"], p["sm_clock_mhz"], strict=True)]
            d = t["decode"]
            dec += [[call, m, tp, b, c, 1e3 * x] for b, c, x in
                    zip(d["batch"], d["ctx_tokens"], d["time_s"], strict=True)]
            for ph in t["power"]["phases"]:
                w = (ph.get("power_w_per_gpu") or []) + [None, None]
                pw.append([call, m, tp, ph["phase"], ph["kind"], ph["load"], ph.get("ctx_tokens"),
                           ph.get("iters"), 1e3 * ph["time_s_per_iter"] if "time_s_per_iter" in ph
                           else None, w[0], w[1] if tp > 1 else None, ph["power_w_mean"],
                           ph["sm_clock_mhz_median"], ph["temp_c_max"],
                           " ".join(ph["throttle_reasons"])])
            st = t["start"]
            rc.append([call, m, "random", "", tp, "", "", st["dist_init_s"], st["build_s"],
                       st.get("warmup_s"), st.get("graphs_captured"), "", "", "profile start",
                       True, ""])
        for name, t in res["tasks"].items():
            if not name.startswith(("reconfig:", "ckpt:")) or "links" not in t:
                continue
            weights = "checkpoint (page cache)" if name.startswith("ckpt:") else "random"
            fs = t["first_start"]
            rc.append([call, t["model"], weights, "", fs["tp"], "", fs["start_s"],
                       fs["dist_init_s"], fs["build_s"], fs["warmup_s"], fs["graphs_captured"],
                       "", "", "first start of a chain", True,
                       fs["spawn_to_ready_s"] - fs["dist_init_s"] - fs["build_s"]
                       - fs["warmup_s"]])
            for ln in t["links"]:
                si = ln["new_start_info"]
                ok = all(c == 0 for c in ln["old_stop_info"].get("exitcodes", [0]))
                rc.append([call, t["model"], weights, ln["from_tp"], ln["to_tp"], ln["stop_s"],
                           ln["start_s"], si["dist_init_s"], si["build_s"], si["warmup_s"],
                           si["graphs_captured"], ln["first_token_s"], ln["downtime_s"],
                           "reconfiguration" if ok else "INVALID: old ranks hung in "
                           "destroy_process_group and were killed (fixed since)", ok,
                           ln["spawn_import_s"]])
        for name, t in res["tasks"].items():
            if name.startswith("allreduce:") and "rows" in t:
                ar += [[call, t["tp"], r["bytes"], 1e6 * r["time_s"], 1e6 * r["min_time_s"],
                        r["bus_gb_s"]] for r in t["rows"]]
            if name == "h2d" and "bytes" in t:
                table["h2d"] = {**t, "call": call}
    _csv(out / "prefill.csv", ["call", "model", "tp", "prompt_tokens", "time_ms",
                               "sm_clock_mhz_median"], pre)
    _csv(out / "decode.csv", ["call", "model", "tp", "batch", "ctx_tokens", "time_ms"], dec)
    _csv(out / "power.csv", ["call", "model", "tp", "phase", "kind", "load", "ctx_tokens",
                             "iters", "ms_per_iter", "power_w_gpu0", "power_w_gpu1",
                             "power_w_mean", "sm_clock_mhz_median", "temp_c_max",
                             "throttle_reasons"], pw)
    _csv(out / "reconfig.csv", ["call", "model", "weights", "from_tp", "to_tp", "stop_s",
                                "start_s", "dist_init_s", "build_s", "warmup_s",
                                "graphs_captured", "first_token_s", "downtime_s", "what",
                                "valid", "spawn_import_s"], rc)
    _csv(out / "allreduce.csv", ["call", "tp", "bytes", "median_us", "min_us", "bus_gb_s"], ar)
    first = table["calls"][0] if table["calls"] else {}
    g0 = (first.get("gpus") or [{}])[0]
    table["provenance"] = {
        "command": "; ".join(c["command"] for c in table["calls"]),
        "date_utc": first.get("started_utc"), "torch": first.get("torch"),
        "mode": "gpu-nccl", "weights": "random (seeded blocks, envs/real/tp_layers.py); bf16",
        "clocks": "read, never set", "gpu_name": g0.get("name"), "driver": g0.get("driver_version"),
        "gpu_power_limit_w": float(g0["power.limit"].split()[0]) if g0.get("power.limit") else None,
        "nccl": first.get("nccl")}
    (out / "tp_profile.json").write_text(json.dumps(_jsonable(table), indent=1))
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the tasks in order under the budget; returns 0 (failures are recorded per task)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json")
    ap.add_argument("--budget-s", type=float, default=550.0,
                    help="start no task whose estimate exceeds what is left of this")
    ap.add_argument("--tasks", nargs="+", default=["env", "profile:llama3-8b:1",
                                                   "profile:llama3-8b:2", "profile:llama2-70b:1",
                                                   "profile:llama2-70b:2"])
    ap.add_argument("--estimate-scale", type=float, default=1.0,
                    help="multiply every task's time estimate by this (after a first call)")
    ap.add_argument("--smoke", action="store_true",
                    help="run the tasks' code on CPU (gloo, tiny-tp shape, small sizes)")
    ap.add_argument("--tables-from", type=Path, nargs="+", default=None,
                    help="measure nothing: write CSV tables and tp_profile.json to --out from "
                         "these results.json files")
    ns = ap.parse_args(argv)
    if ns.tables_from:
        write_tables(ns.tables_from, ns.out)
        return 0
    plans = [(t, est * ns.estimate_scale, fn) for t in ns.tasks for est, fn in [plan_task(t)]]
    camp = Campaign(ns.out, ns.budget_s, smoke=ns.smoke)
    log(f"{camp.n_gpus} GPUs, {camp.gpu_mem_bytes / GIB:.1f} GiB each; tasks {ns.tasks}")
    for name, est, fn in plans:
        kind, _, rest = name.partition(":")
        if kind == "profile" and profile_plan(camp, *rest.split(":")[:1],
                                              int(rest.split(":")[1])).get("why"):
            est = 0.0  # recorded as skipped at once, with the plan's reason
        if camp.left_s() < est:
            camp.results["tasks"][name] = {"skipped": f"budget: {camp.left_s():.0f} s left, "
                                                      f"estimate {est:.0f} s"}
            log(f"SKIP {name}: {camp.results['tasks'][name]['skipped']}")
            camp.save()
            continue
        log(f"START {name} (estimate {est:.0f} s, {camp.left_s():.0f} s left)")
        t0 = time.monotonic()
        try:
            res = fn(camp)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next task
            res = {"failed": f"{type(exc).__name__}: {exc}"}
        res["task_wall_s"] = time.monotonic() - t0
        camp.results["tasks"][name] = res
        camp.save()
        log(f"DONE {name} in {res['task_wall_s']:.1f} s"
            + (f": {res.get('failed') or res.get('skipped')}" if "failed" in res or "skipped" in res
               else ""))
    camp.results["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    camp.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
