"""`llm-cluster calibrate`: record a trace replay on the GPU, fit the simulator to it, compare.

Two steps:

``record`` (GPU machine): replay an Azure trace window against the real worker through
:class:`envs.real.cluster.RealCluster` with a scripted emergency drill (the virtual power
budget drops and the batch cap is cut for a while), sampling NVML at 25 Hz from before the
worker is built (the thermal history the replay starts from); write the recording (telemetry,
every request's TTFT/TBT, per-interval metrics, every scheduler step, the drill) as gzip JSON.

``fit`` (CPU): fit the node's coefficients of the shape-based model (``envs/perf``, the model the
datacenter simulator derives its profiles from) to a served calibration run (one trace window, its
scheduler steps and 1 s energy) together with the profile recording (``llm-cluster profile``: idle
power, sustained phases), by the shape model's own calibration routine
(``envs/real/node_calibration.py``), derive the node's simulator profile from it, and fit
the two-node thermal model to the profile recording; then replay the requests and the
batch-cap schedule of a second, held-out run (another trace window) in the simulator
(``SimCluster`` with one GPU) and compare: power MAPE over 1 s windows, temperature RMSE,
throughput and latency errors.

Usage::

    # on the H100: the calibration window, then the held-out test window
    PYTHONUNBUFFERED=1 llm-cluster calibrate record --start-s 600 \
        --batch-steps 0:64 50:8 100:16 140:64 --out envs/data/real/h100_calibration_run.json.gz
    PYTHONUNBUFFERED=1 llm-cluster calibrate record --out envs/data/real/h100_fidelity_run.json.gz
    # anywhere
    llm-cluster calibrate fit
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Union

import numpy as np
import tyro

from llm_cluster_gym.envs.backend import ClusterAction, PoolConfig
from llm_cluster_gym.envs.real.telemetry import save_recording
from llm_cluster_gym.envs.real.worker import STEP_LOG_COLUMNS, WorkerConfig
from llm_cluster_gym.scripts.usage import UsageError

DATA_DIR = Path(__file__).resolve().parents[1] / "envs" / "data" / "real"
PROFILE_REC = DATA_DIR / "h100_llama3-8b_profile.json.gz"
FIDELITY_REC = DATA_DIR / "h100_fidelity_run.json.gz"
CALIBRATION_REC = DATA_DIR / "h100_calibration_run.json.gz"
OTHER_GPU_RECS = (DATA_DIR / "h100_other_gpu_window1200.json.gz",
                  DATA_DIR / "h100_other_gpu_window1800.json.gz")
"""Served runs on two other H100s (other lent machines): the test window again, and another
trace window. How the fit carries over to GPUs it was not fitted on."""
MEASURED_PROFILE = DATA_DIR / "llama3-8b-real_h100_tp1.json"
"""The node's simulator profile, derived from ``node_coefficients.json`` (what RealCluster describes)."""
NODE_COEFFICIENTS = DATA_DIR / "node_coefficients.json"
"""The node's fitted shape-model coefficients with their provenance."""
CALIBRATION = DATA_DIR / "calibration.json"

# The scripted drill of the recorded run: (start_s, max_batch) steps and the budget window.
DRILL_BATCH_STEPS: tuple[tuple[float, int], ...] = ((0.0, 64), (60.0, 8), (120.0, 64))
DRILL_BUDGET: tuple[tuple[float, float, float], ...] = ((60.0, 60.0, 250.0),)
DEFAULT_LEAD_S = 20.0
"""Idle telemetry before the worker is built (s): the thermal history of the replay."""


def _colon_tuples(items: Sequence[str], option: str, form: str,
                  types: tuple[type, ...]) -> tuple[tuple, ...]:
    """``["a:b", "c:d"]`` -> ((a, b), (c, d)), each field converted by ``types``.

    Raises:
        UsageError: A field is missing, extra or not a number (names the option).
    """
    try:
        return tuple(tuple(t(x) for t, x in zip(types, part.split(":"), strict=True))
                     for part in items)
    except ValueError as err:
        raise UsageError(f"{option} {' '.join(items)!r}: want {form}") from err


def parse_batch_steps(items: Sequence[str]) -> tuple[tuple[float, int], ...]:
    """``["0:64", "60:8", "120:64"]`` -> ((0.0, 64), (60.0, 8), (120.0, 64)); must start at 0 s.

    Raises:
        UsageError: Malformed, not starting at 0 s, times not increasing, or a cap below 1.
    """
    steps = _colon_tuples(items, "--batch-steps", "START_S:BATCH ...", (float, int))
    if not steps or steps[0][0] != 0.0 or any(b < 1 for _, b in steps) or any(
            t1 <= t0 for (t0, _), (t1, _) in zip(steps, steps[1:], strict=False)):
        raise UsageError(f"--batch-steps {' '.join(items)!r}: start at 0, increasing times, "
                         "batch caps >= 1")
    return steps


def parse_budget(items: Sequence[str]) -> tuple[tuple[float, float, float], ...]:
    """``["60:60:250"]`` -> ((60.0, 60.0, 250.0),): start s, length s, budget W per window.

    Raises:
        UsageError: Malformed, or a length or budget that is not positive.
    """
    drills = _colon_tuples(items, "--budget", "START_S:LENGTH_S:WATTS ...", (float, float, float))
    if any(d[1] <= 0 or d[2] <= 0 for d in drills):
        raise UsageError(f"--budget {' '.join(items)!r}: want START_S:LENGTH_S:WATTS ...")
    return drills  # type: ignore[return-value]


def record(out: Path, trace: str, start_s: float, duration_s: float, rate_rps: float | None,
           gpu: int, interval_s: float,
           batch_steps: tuple[tuple[float, int], ...] = DRILL_BATCH_STEPS,
           budget: tuple[tuple[float, float, float], ...] = DRILL_BUDGET,
           lead_s: float = DEFAULT_LEAD_S) -> Path:
    """Replay a trace window on the real GPU with the scripted drill and save everything.

    The recording keeps every scheduler step of the worker (``step_log``) and its per-interval
    engine counters, which is what the host-overhead fit reads. Telemetry starts ``lead_s``
    before the worker is built, so the recording also holds the GPU's idle baseline and the
    warm-up before the replay: the thermal history the simulator's replay starts from.

    Raises:
        GpuUnavailableError: No NVML / GPU.
        WorkerError: No CUDA device for the worker.
    """
    import torch

    from llm_cluster_gym.envs.real.cluster import RealCluster, RealClusterConfig

    cfg = RealClusterConfig(
        worker=WorkerConfig(model="llama3-8b", device=f"cuda:{gpu}", max_slots=64, max_ctx=4096,
                            record_steps=True),
        gpus=(gpu,), trace=trace, trace_start_s=start_s, duration_s=duration_s,
        rate_rps=rate_rps, control_interval_s=interval_s, power_budget_w=450.0,
        budget_drills=budget, mode="inline", sample_hz=25.0)
    cluster = RealCluster(cfg)
    cluster.sampler.start()
    t_lead = time.time()
    time.sleep(lead_s)  # the GPU's idle baseline, sampled
    t_build = time.time()
    _ = cluster.workers  # build and warm up the engine before the clock starts
    t_ready = time.time()
    print(f"worker ready in {t_ready - t_build:.1f} s", flush=True)
    static = cluster.devices[0].static().as_dict()
    static.update(date_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  command=shlex.join([sys.executable, *sys.argv]), torch=torch.__version__,
                  model="llama3-8b-shaped Llama (envs/real/worker.py), random bf16 weights",
                  config={k: (v if not hasattr(v, "__dict__") else v.__dict__)
                          for k, v in cfg.__dict__.items()})
    try:
        cluster.reset(seed=0)
        steps = list(batch_steps)
        while not cluster.done:
            t = cluster.elapsed_s
            cap = [b for s, b in steps if s <= t + 1e-9][-1]
            cluster.apply(ClusterAction(pools=(PoolConfig(1, 1, cluster.layout.max_freq_mhz, cap),)))
            m = cluster.advance()
            tel = cluster.telemetry()
            print(f"t={cluster.elapsed_s:6.1f} arr={m.arrived:3d} fin={m.finished:3d} "
                  f"drop={m.dropped:3d} tok/s={m.tokens_generated / m.interval_s:7.1f} "
                  f"P={m.energy_j / m.interval_s:6.1f} W T={m.max_gpu_temp_c:.0f} C "
                  f"ttft50={m.ttft_p50_s:.3f} tbt50={m.tbt_p50_s:.4f} budget={tel.row_limit_w[0]:.0f}",
                  flush=True)
        time.sleep(2.0)  # a little tail of telemetry after the last interval
    finally:
        cluster.close()
    tr = cluster.trace
    log = cluster.log
    engine = getattr(cluster.workers[0], "engine", None)
    step_log = [[round(x - log.t0_s, 6) if i < 2 else round(x, 6) for i, x in enumerate(row)]
                for row in (engine.step_log if engine is not None else [])]
    reqs = [[r.req_id, round(r.arrival_s - log.t0_s, 6), r.input_tokens, r.output_tokens,
             None if not np.isfinite(r.ttft_s) else round(r.ttft_s, 6),
             None if not np.isfinite(r.tbt_s) else round(r.tbt_s, 6),
             None if not np.isfinite(r.finish_s) else round(r.finish_s - log.t0_s, 6),
             int(r.dropped)] for r in log.requests]
    return save_recording(
        out, static, cluster.sampler.recorded(),
        t0_s=log.t0_s,
        request_columns=["req_id", "arrival_rel_s", "input_tokens", "output_tokens", "ttft_s",
                         "tbt_s", "finish_rel_s", "dropped"],
        requests=reqs,
        trace={"arrival_s": [round(float(x), 6) for x in tr.arrival_s],
               "input_tokens": [int(x) for x in tr.input_tokens],
               "output_tokens": [int(x) for x in tr.output_tokens],
               "duration_s": tr.duration_s, "source": tr.source},
        intervals=log.intervals, controls=log.controls,
        drill={"batch_steps": batch_steps, "budget": budget},
        step_columns=list(STEP_LOG_COLUMNS), step_log=step_log,
        marks=[{"phase": "idle_lead", "t0": t_lead, "t1": t_build},
               {"phase": "build_and_warmup", "t0": t_build, "t1": t_ready}],
    )


@dataclass
class CalibrateRecordArgs:
    """Replay a trace window on the GPU with the scripted drill and record everything (needs a GPU)."""

    out: Path = FIDELITY_REC
    """Recording to write (gzip JSON)."""
    trace: str = "azure_conv_2023"
    """Trace replayed (a shipped trace name)."""
    start_s: float = 1200.0
    """Start of the trace window (s)."""
    duration_s: float = 180.0
    """Length of the replay (s)."""
    rate_rps: float | None = None
    """Replay rate (default: the trace's own arrivals)."""
    gpu: int = 0
    """GPU index (NVML and CUDA)."""
    interval_s: float = 5.0
    """Control interval of the replay (s)."""
    batch_steps: list[str] = field(
        default_factory=lambda: [f"{t:g}:{b}" for t, b in DRILL_BATCH_STEPS])
    """Batch-cap schedule, START_S:CAP items starting at 0 s."""
    budget: list[str] = field(
        default_factory=lambda: [":".join(f"{x:g}" for x in d) for d in DRILL_BUDGET])
    """Virtual power budget drills, START_S:LENGTH_S:WATTS items."""
    lead_s: float = DEFAULT_LEAD_S
    """Seconds of idle GPU telemetry sampled before the worker is built."""

    def __post_init__(self) -> None:
        parse_batch_steps(self.batch_steps)
        parse_budget(self.budget)
        if not (self.lead_s >= 0 and math.isfinite(self.lead_s)):
            raise UsageError(f"--lead-s {self.lead_s}: want a finite number of seconds >= 0")


@dataclass
class CalibrateFitArgs:
    """Fit the simulator to the recordings and compare with a held-out run (CPU)."""

    profile: Path = PROFILE_REC
    """Profile recording (`llm-cluster profile`): idle power, prefill and decode sweeps."""
    run: Path = FIDELITY_REC
    """Served recording of the test window (compared, not fitted)."""
    calibration_run: list[Path] | None = None
    """Served recordings of other trace windows that the node's coefficients are fitted to, pooled
    (default: h100_calibration_run.json.gz)."""
    sweeps_only: bool = False
    """Fit to the isolated profile sweeps alone (no served calibration run)."""
    other_run: list[Path] | None = None
    """Other served recordings judged with the same fit (default: the committed runs on two other
    H100s)."""
    write: bool = False
    """Write node_coefficients.json, the derived profile, thermal fit, calibration.json and fidelity.png
    to envs/data/real."""


@dataclass
class CalibrateArgs:
    """Sim-to-real calibration: record a trace replay on the GPU (record), fit and compare (fit)."""

    step: Union[  # noqa: UP007 - tyro reads the Annotated members of a typing.Union
        Annotated[CalibrateRecordArgs, tyro.conf.subcommand(
            "record", description="Replay a trace window on the GPU and record it (needs a GPU).")],
        Annotated[CalibrateFitArgs, tyro.conf.subcommand(
            "fit", description="Fit the simulator to the recordings and compare (CPU).")],
    ]
    """The step: record (GPU) or fit (CPU)."""


def run(args: CalibrateArgs, command: str = "llm-cluster calibrate") -> int:
    """Run ``record`` or ``fit``.

    Raises:
        GpuUnavailableError: record: no NVML / GPU.
        WorkerError: record: no CUDA device for the worker.
        FidelityError: fit: a recording lacks what the fit needs.
        TelemetryFileError: fit: a recording cannot be read.
    """
    ns = args.step
    if isinstance(ns, CalibrateRecordArgs):
        path = record(ns.out, ns.trace, ns.start_s, ns.duration_s, ns.rate_rps, ns.gpu,
                      ns.interval_s, parse_batch_steps(ns.batch_steps), parse_budget(ns.budget),
                      ns.lead_s)
        print(f"wrote {path}")
        return 0
    from llm_cluster_gym.envs.real.fidelity import calibrate_and_compare

    report = calibrate_and_compare(ns.profile, ns.run,
                                   None if ns.sweeps_only
                                   else tuple(ns.calibration_run or (CALIBRATION_REC,)),
                                   write_dir=DATA_DIR if ns.write else None,
                                   other_runs=tuple(ns.other_run if ns.other_run is not None
                                                    else [p for p in OTHER_GPU_RECS if p.exists()]))
    print(json.dumps(report["summary"], indent=1))
    return 0
