r"""`llm-cluster measure-reconfig`: the cost of re-sharding an instance, TP4 -> TP8 (stop to first token).

The simulator charges a reconfiguration as downtime (``load_time_s`` in the profiles,
DynamoLLM's re-shard/restart cost). This script measures it on a multi-GPU node with the real
TP workers (``envs/real/tp_worker.py``):

1. start a TP``--from-tp`` worker on GPUs ``0..from_tp-1``, serve ``--warm-requests`` requests;
2. ``stop_s``: stop it (every rank exits, GPU memory freed);
3. ``start_s``: start a TP``--to-tp`` worker on GPUs ``0..to_tp-1``; the leader reports
   ``dist_init_s`` (process group), ``build_s`` (weights created or loaded, KV cache allocated)
   and ``warmup_s`` (CUDA-graph capture of every decode and prefill bucket);
4. ``first_token_s``: submit one request and wait for it (TTFT of the new instance).

``downtime_s = stop_s + start_s + first_token_s``, repeated ``--repeats`` times (alternating
directions is not done: each repeat goes from-tp -> to-tp). Random weights are created on the
GPUs, so ``build_s`` holds no checkpoint read; with ``--weights-path`` (an HF checkpoint on
local disk) it does.

Usage::

    llm-cluster measure-reconfig --dry-run                # print the plan only
    llm-cluster measure-reconfig --tiny --out /tmp/r.json  # CPU, gloo, TP1 -> TP2
    PYTHONUNBUFFERED=1 llm-cluster measure-reconfig --model llama2-70b --from-tp 4 \\
        --to-tp 8 --out envs/data/real/h200_reconfig_tp4_tp8.json   # 8-GPU node
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_gym.envs.real.tp_worker import TP_SHAPES, TPWorkerConfig, TPWorkerError, TPWorkerProcess
from llm_cluster_gym.envs.real.worker import Request, WorkerConfig
from llm_cluster_gym.scripts.usage import UsageError

SCHEMA = "llm-cluster-gym/reconfig/1"


@dataclass
class MeasureReconfigArgs:
    """Measure the downtime of re-sharding an instance, TP4 -> TP8 (GPU node, or --tiny on CPU)."""

    out: Path = Path("reconfig.json")
    """Output file (JSON)."""
    model: str = "llama2-70b"
    """Model shape (envs.real.tp_worker.TP_SHAPES)."""
    from_tp: int = 4
    """TP degree before."""
    to_tp: int = 8
    """TP degree after."""
    max_slots: int = 64
    """KV-cache slots of both instances."""
    max_ctx: int = 4096
    """Context per slot."""
    warm_requests: int = 8
    """Requests served by the old instance before it is stopped."""
    repeats: int = 2
    """Reconfigurations measured."""
    weights_path: str | None = None
    """HF checkpoint folder to load (None: random weights made on the GPUs)."""
    dry_run: bool = False
    """Print the plan; run nothing."""
    tiny: bool = False
    """CPU with gloo, tiny-tp shape, TP1 -> TP2 (tests the whole path)."""

    def __post_init__(self) -> None:
        if self.tiny:
            self.model, self.from_tp, self.to_tp, self.max_slots, self.max_ctx = "tiny-tp", 1, 2, 4, 64
            self.warm_requests, self.repeats = 3, 1
        if self.model not in TP_SHAPES and not self.weights_path:
            raise UsageError(f"--model: unknown shape {self.model!r}; known: {sorted(TP_SHAPES)}")
        for name in ("from_tp", "to_tp", "max_slots", "max_ctx", "warm_requests", "repeats"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")


def _config(args: MeasureReconfigArgs, tp: int) -> TPWorkerConfig:
    wc = WorkerConfig(model=args.model, device="cpu" if args.tiny else "cuda:0",
                      max_slots=args.max_slots, max_ctx=args.max_ctx,
                      weights_path=args.weights_path)
    return TPWorkerConfig(worker=wc, tp=tp, start_method="forkserver" if args.tiny else "spawn")


def _serve(worker: TPWorkerProcess, n: int, prompt: int, out: int, timeout_s: float) -> float:
    """Submit ``n`` requests now; wait for all; returns the wall time until the last finished."""
    t0 = time.time()
    worker.submit([Request(i, t0, prompt, out) for i in range(n)])
    got = 0
    while got < n:
        if time.time() - t0 > timeout_s:
            raise TPWorkerError(f"measure_reconfig: {n - got} of {n} requests not done in "
                                f"{timeout_s} s")
        time.sleep(0.005)
        got += len(worker.poll().completed)
    return time.time() - t0


def _prompt(args: MeasureReconfigArgs) -> int:
    return 16 if args.tiny else 512


def _out_tokens(args: MeasureReconfigArgs) -> int:
    return 4 if args.tiny else 32


def describe(args: MeasureReconfigArgs) -> str:
    """The plan as text."""
    return "\n".join([
        f"measure_reconfig plan ({'tiny CPU/gloo' if args.tiny else 'GPU/NCCL'}): model "
        f"{args.model}, TP{args.from_tp} on GPUs 0..{args.from_tp - 1} -> TP{args.to_tp} on "
        f"GPUs 0..{args.to_tp - 1}, slots={args.max_slots} ctx={args.max_ctx}, "
        f"{args.repeats} repeats",
        f"  before each: start TP{args.from_tp}, serve {args.warm_requests} requests "
        f"({_prompt(args)}-token prompt, {_out_tokens(args)} output tokens)",
        "  measured: stop_s (old ranks exit), start_s (spawn + dist init + "
        f"{'weights read from ' + args.weights_path if args.weights_path else 'random weights'}"
        " + KV alloc + CUDA-graph warm-up, with the leader's split), first_token_s (one "
        f"{_prompt(args)}-token request), downtime_s = stop + start + first token",
        "  duration on 8 H200s for llama2-70b: not measured yet; rough estimate 2-4 min per "
        "repeat (two engine starts of 1-2 min each)",
    ])


def measure(args: MeasureReconfigArgs) -> dict[str, Any]:
    """Do the reconfigurations; returns the result table."""
    print(describe(args), flush=True)
    res: dict[str, Any] = {"schema": SCHEMA, "model": args.model, "from_tp": args.from_tp,
                           "to_tp": args.to_tp, "repeats": []}
    if args.dry_run:
        return res
    prompt, out_tok = _prompt(args), _out_tokens(args)
    for k in range(args.repeats):
        old = TPWorkerProcess(_config(args, args.from_tp))
        try:
            _serve(old, args.warm_requests, prompt, out_tok, 600.0)
        finally:
            stop_s = old.close()
        t0 = time.perf_counter()
        new = TPWorkerProcess(_config(args, args.to_tp))
        start_s = time.perf_counter() - t0
        try:
            first_s = _serve(new, 1, prompt, 1, 600.0)
        finally:
            new_stop_s = new.close()
        rep = {"stop_s": stop_s, "start_s": start_s, "first_token_s": first_s,
               "downtime_s": stop_s + start_s + first_s, "new_start_info": new.start_info,
               "old_start_info": old.start_info, "new_stop_s": new_stop_s}
        res["repeats"].append(rep)
        print(f"repeat {k}: stop {stop_s:.2f} s, start {start_s:.2f} s "
              f"({ {key: round(v, 2) for key, v in new.start_info.items()} }), first token "
              f"{first_s:.3f} s, downtime {rep['downtime_s']:.2f} s", flush=True)
    d = np.array([r["downtime_s"] for r in res["repeats"]])
    res["downtime_s_median"] = float(np.median(d))
    import torch

    prov: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]),
                            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "torch": torch.__version__,
                            "mode": "tiny-cpu-gloo" if args.tiny else "gpu-nccl",
                            "weights": args.weights_path or "random, created on the devices"}
    if not args.tiny:
        from llm_cluster_gym.envs.real.telemetry import NvmlGpuDevice

        st = NvmlGpuDevice(0).static()
        prov.update(gpu_name=st.name, driver=st.driver,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
    res["provenance"] = prov
    return res


def run(args: MeasureReconfigArgs, command: str = "llm-cluster measure-reconfig") -> int:
    """Run and write the result.

    Raises:
        TPWorkerError: The workers cannot start (no GPU, bad shape).
    """
    res = measure(args)
    if not args.dry_run:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}", flush=True)
    return 0
