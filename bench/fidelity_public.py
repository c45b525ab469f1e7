"""Fidelity of the shape-based performance model against ML.ENERGY's published vLLM runs.

For every ML.ENERGY v3 LLM configuration the model supports (vLLM 0.11.1 on H100 and B200:
Qwen3 dense and MoE, Gemma-3, Nemotron-Nano, gpt-oss, Llama-3.1-405B, Llama-4, DeepSeek), the
scheduler replays the benchmark's run (all requests sent at once, the steady-state window between
the max_num_seqs-th and the (N - max_num_seqs)-th first token) and the step model predicts energy
per output token, average power (all GPUs), median ITL and output throughput. The per-GPU
coefficients are fitted to these runs (`llm_cluster_gym.envs.perf.calibration`); the table gives
measured vs predicted, in sample and leave-one-model-out (each model family refitted without
it), and the median absolute relative error per metric (never energy alone: power and throughput
errors could cancel in it). The v2 (2024, older vLLM) Llama-3.1 runs are predicted with the v3
H100 coefficients as an out-of-engine check, reported apart.

Usage::

    python bench/fidelity_public.py [--no-loo] [--write-coefficients] [--cache /tmp/perf-traces.pkl]

The last line is a JSON object: ``loo_median_abs_err_{energy_per_token,power,itl,throughput}``,
``in_sample_median_abs_err_*`` and the same per GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from llm_cluster_gym.envs.perf import calibration as cal
from llm_cluster_gym.envs.perf.hardware import load_gpus

REPO = Path(__file__).resolve().parents[1]
METRIC_COLS = (
    ("energy_per_token", "E/tok J"),
    ("power", "power W"),
    ("itl", "ITL ms"),
    ("throughput", "tok/s"),
)


def _fingerprint() -> str:
    """Hash of everything a trace depends on (data files and the perf package's source)."""
    h = hashlib.sha256()
    perf = REPO / "envs" / "perf"
    for p in sorted(
        [
            *perf.glob("*.py"),
            cal.V3_FILE,
            cal.V2_FILE,
            *(REPO / "envs" / "data" / "models").glob("*.json"),
            REPO / "envs" / "data" / "gpus.json",
        ]
    ):
        if p.name == "step.py":
            continue  # the timing does not change the traces (their work is recounted on load)
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def prepared(source: str, cache: Path | None) -> list[cal.RunSetup]:
    """Run setups with their traces, from the cache when it matches the current code and data."""
    key = f"{source}-{_fingerprint()}"
    if cache and cache.is_file():
        try:
            stored = pickle.loads(cache.read_bytes())
            if key in stored:
                setups = stored[key]
                gpus = load_gpus()
                from llm_cluster_gym.envs.perf.serving import TimedTrace
                from llm_cluster_gym.envs.perf.shapes import load_shipped
                from llm_cluster_gym.envs.perf.step import step_work

                for s in setups:  # recount the work: the step model may have changed
                    if s.trace is not None:
                        tr = s.trace.trace
                        s.trace = TimedTrace(
                            tr,
                            step_work(load_shipped(s.shape_name), s.n_gpus, gpus[s.gpu_key], tr.records),
                            s.n_gpus,
                        )
                return setups
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            pass
    setups = cal.load_setups(source)
    cal.prepare_setups(setups)
    if cache:
        stored = {}
        if cache.is_file():
            try:
                stored = pickle.loads(cache.read_bytes())
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
                stored = {}
        stored = {k: v for k, v in stored.items() if k.endswith(key.split("-", 1)[1])}
        stored[key] = setups
        cache.write_bytes(pickle.dumps(stored))
    return setups


def print_table(ev: cal.Evaluation) -> None:
    """One line per run: measured, leave-one-model-out prediction and its error per metric."""
    err_in, err_loo = ev.errors("in_sample"), ev.errors("loo")
    head = f"{'configuration':62s} {'batch m/p':>13s}"
    for _, name in METRIC_COLS:
        head += f" | {name:>8s} meas {'pred':>8s} {'loo%':>6s} {'in%':>5s}"
    print(head)
    order = sorted(range(len(ev.runs)), key=lambda i: (ev.runs[i].gpu_key, ev.runs[i].label))
    for i in order:
        r = ev.runs[i]
        line = f"{r.label:62s} {ev.measured['batch'][i]:6.0f}/{ev.in_sample['batch'][i]:<6.0f}"
        for m, _ in METRIC_COLS:
            line += (
                f" | {ev.measured[m][i]:13.4g} {ev.loo[m][i]:8.4g} {100 * err_loo[m][i]:+6.0f} "
                f"{100 * err_in[m][i]:+5.0f}"
            )
        print(line)


def summary(ev: cal.Evaluation) -> dict[str, float]:
    """Median absolute errors per metric, overall and per GPU, in sample and leave-one-model-out."""
    out: dict[str, float] = {}
    for which, tag in (("loo", "loo"), ("in_sample", "in_sample")):
        med = ev.median_abs(which)
        for m, _ in METRIC_COLS:
            out[f"{tag}_median_abs_err_{m}"] = round(med[m], 4)
    for g in sorted({r.gpu_key for r in ev.runs}):
        mask = np.array([r.gpu_key == g for r in ev.runs])
        for which, tag in (("loo", "loo"), ("in_sample", "in_sample")):
            med = ev.median_abs(which, mask)
            for m, _ in METRIC_COLS:
                out[f"{g}_{tag}_median_abs_err_{m}"] = round(med[m], 4)
    out["configurations"] = len(ev.runs)
    out["unsupported_configurations"] = len(ev.unsupported)
    return out


def print_breakdown(ev: cal.Evaluation) -> None:
    """Median absolute errors per GPU and task, and per model family (LOO)."""
    print("\nmedian |relative error| (leave-one-model-out / in sample), per GPU and task")
    groups = sorted({(r.gpu_key, r.row["task"]) for r in ev.runs})
    for g, t in [*(("all", "all"),), *groups]:
        mask = np.array(
            [(g == "all" or r.gpu_key == g) and (t == "all" or r.row["task"] == t) for r in ev.runs]
        )
        lo, ins = ev.median_abs("loo", mask), ev.median_abs("in_sample", mask)
        cells = "  ".join(
            f"{name.split()[0]:>6s} {100 * lo[m]:5.1f}/{100 * ins[m]:4.1f}" for m, name in METRIC_COLS
        )
        print(f"  {g:5s} {t:16s} n={int(mask.sum()):3d}  {cells}")
    print("\nper model family (leave-one-model-out median |error|, %)")
    for g in sorted({r.gpu_key for r in ev.runs}):
        for fam in sorted({r.family for r in ev.runs if r.gpu_key == g}):
            mask = np.array([r.gpu_key == g and r.family == fam for r in ev.runs])
            lo = ev.median_abs("loo", mask)
            cells = "  ".join(f"{name.split()[0]:>6s} {100 * lo[m]:5.1f}" for m, name in METRIC_COLS)
            print(f"  {g:5s} {fam:32s} n={int(mask.sum()):3d}  {cells}")


def write_coefficients(ev: cal.Evaluation, stats: dict[str, float], command: str) -> Path:
    """Write ``envs/data/perf/coefficients.json`` (H200 takes H100's: same die, no H200 data)."""
    path = cal.COEFFICIENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    gpus = {}
    for key, c in sorted(ev.coefficients.items()):
        gpus[key] = {
            "coefficients": c.to_dict(),
            "fitted_on": f"{sum(r.gpu_key == key for r in ev.runs)} ML.ENERGY v3 runs on {key.upper()}",
            "median_abs_err": {
                k.split(f"{key}_", 1)[1]: v for k, v in stats.items() if k.startswith(f"{key}_")
            },
        }
    if "h100" in gpus:
        gpus["h200"] = {
            "coefficients": ev.coefficients["h100"].to_dict(),
            "fitted_on": "none: ESTIMATE, the H100 coefficients (same GH100 die and clocks; HBM3e capacity "
            "and bandwidth come from envs/data/gpus.json). No public H200 vLLM runs were used.",
        }
    doc = {
        "schema": "llm-cluster-gym/perf-coefficients/1",
        "built_by": command,
        "built_on": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "data": ["envs/data/ml_energy/v3_llm_runs.json (ML.ENERGY Benchmark v3, Apache-2.0)"],
        "model": "envs/perf/step.py (roofline step time and power), "
        "envs/perf/scheduler.py (vLLM V1 scheduler)",
        "assumptions": {
            "prompt_tokens_per_task": cal.TASK_INPUT_TOKENS,
            "ml_energy_gpu_memory_utilization": cal.ML_ENERGY_MEMORY_UTILIZATION,
        },
        "gpus": gpus,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--no-loo", action="store_true", help="skip the leave-one-model-out refits (in sample only)"
    )
    ap.add_argument(
        "--write-coefficients", action="store_true", help="write envs/data/perf/coefficients.json"
    )
    ap.add_argument("--cache", type=Path, default=None, help="pickle file caching the scheduler traces")
    ap.add_argument(
        "--iterations", type=int, default=40, help="Levenberg-Marquardt iterations of the full fits"
    )
    ap.add_argument("--quiet", action="store_true", help="print only the summaries")
    args = ap.parse_args(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    log("simulating the scheduler for every v3 configuration")
    setups = prepared("v3", args.cache)
    log("fitting per GPU" + ("" if args.no_loo else " and leave-one-model-out"))
    ev = cal.calibrate(setups, loo=not args.no_loo, iterations=args.iterations, progress=log)
    if not args.quiet:
        print_table(ev)
    print(f"\nunsupported configurations: {len(ev.unsupported)}")
    for s in ev.unsupported:
        print(f"  {s.label}: {s.unsupported}")
    print_breakdown(ev)
    stats = summary(ev)
    for key, c in sorted(ev.coefficients.items()):
        print(
            f"\n{key} coefficients: "
            + ", ".join(f"{k}={v:.4g}" for k, v in c.to_dict().items() if v is not None)
        )

    log("v2 (2024 engine) Llama-3.1 runs with the v3 H100 coefficients")
    v2 = cal.predict_with(prepared("v2", args.cache), ev.coefficients)
    err = v2.errors("in_sample")
    print("\nML.ENERGY v2 (vLLM of 2024, not fitted): Llama-3.1 8B/70B on H100, chat")
    for i, r in enumerate(v2.runs):
        print(
            f"  {r.label:50s} "
            + "  ".join(
                f"{name.split()[0]} {v2.measured[m][i]:8.4g}/{v2.loo[m][i]:<8.4g}{100 * err[m][i]:+5.0f}%"
                for m, name in METRIC_COLS
            )
        )
    med = v2.median_abs("in_sample")
    print("  median |error|: " + ", ".join(f"{m} {100 * med[m]:.0f}%" for m, _ in METRIC_COLS))
    for m, _ in METRIC_COLS:
        stats[f"v2_median_abs_err_{m}"] = round(med[m], 4)

    if args.write_coefficients:
        path = write_coefficients(ev, stats, "python bench/fidelity_public.py --write-coefficients")
        log(f"wrote {path}")
    log("done")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
