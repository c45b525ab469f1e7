"""`llm-cluster deploy`: a policy as a live controller on a simulated scenario or the local GPU node.

Examples::

    # the small scenario, shielded DynamoLLM-style controller, 10x faster than real time
    llm-cluster deploy --scenario small --policy dynamo --interval-s 0.5
    # the local GPU node, budget 550 W dropping to 300 W for 60 s at t = 60 s
    llm-cluster deploy --scenario local --policy static --interval-s 1 \
        --power-budget-w 550 --budget-drill 60,60,300 --record drill.json.gz

Prometheus metrics are served on http://127.0.0.1:9108/metrics (``--metrics-port -1``
turns them off; rows, aisles and pools, ``--metrics-per-gpu`` adds one series per GPU; the
dashboard and alert rules are ``controllers/live/grafana_dashboard.json`` and ``alerts.yaml``);
every decision goes to a JSON-lines log, started afresh by every run and
closed by a ``stop`` record saying why the run ended (a log without one is from a run that was
killed outright). SIGTERM or Ctrl-C stops the loop: no further action is applied, GPU settings
are restored and the log is flushed. The recording and the plot are written whole at the end
(`envs.outputs.staged_file`). Options are checked before anything starts: ``--interval-s``
must be >= 0 (0 = as fast as possible on the simulator), and a drill scheduled after the
run's last decision is refused.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from llm_cluster_gym.controllers.policy_spec import parse_policy_spec
from llm_cluster_gym.scripts.usage import UsageError, check_number, check_seed


@dataclass
class DeployArgs:
    """Run a policy as a live controller (metrics, decision log, drills) on a scenario or this GPU node."""

    scenario: str = "small"
    """Scenario name or YAML path, or ``local`` for the GPU node of this machine."""
    task: Literal["energy", "thermal", "combined"] = "energy"
    """Task whose action space the policy uses: energy, thermal, combined."""
    policy: str = "dynamo"
    """Policy spec: a controller name (static, unaware, dynamo, tapas, random) or ckpt:<dir>."""
    no_shield: bool = False
    """Run the policy without the safety shield."""
    interval_s: float | None = None
    """Wall seconds per control interval, >= 0 (sim: pacing, 0 = as fast as possible; local
    node: the control interval, > 0). Default: the scenario's interval in real time / 5 s."""
    max_steps: int | None = None
    """Stop after this many decisions (default: the episode's end)."""
    seed: int = 0
    """Episode seed."""
    serving_model: Literal["request", "aggregate"] = "request"
    """Simulated serving model: request (evaluation) or aggregate (fast)."""
    power_margin: float = 0.93
    """Shield: predicted row power must stay under this fraction of the limit."""
    temp_margin_c: float = 3.0
    """Shield: predicted GPU temperature must stay this far below slowdown (C)."""
    no_governor: bool = False
    """Turn off admission control on measured power."""
    governor_margin: float = 0.95
    """Governor target as a fraction of the row limit."""
    drill: list[str] = field(default_factory=list)
    """Fault drills kind@step[+steps][:worker]: telemetry_loss, policy_error, worker_kill."""
    power_budget_w: float = 550.0
    """Local node: virtual power budget (sum of GPU power, W)."""
    budget_drill: list[str] = field(default_factory=list)
    """Local node: windows where the budget drops, each start_s,duration_s,budget_w."""
    gpus: list[int] = field(default_factory=lambda: [0])
    """Local node: GPU indices (one worker each)."""
    model: str = "llama3-8b"
    """Local node: worker model shape (llama3-8b, tiny)."""
    device: str = "cuda"
    """Local node: torch device of the workers (cuda, cpu)."""
    trace: str = "azure_conv_2023"
    """Local node: trace replayed."""
    trace_start_s: float = 1200.0
    """Local node: trace window start (s)."""
    duration_s: float = 180.0
    """Local node: run length (s)."""
    rate_rps: float | None = None
    """Local node: replay rate (default: the trace's own arrivals)."""
    replay: str | None = None
    """Local node: replay this telemetry recording instead of reading NVML (dry runs)."""
    log: str = "runs/live/decisions.jsonl"
    """Decision log (JSON lines, written as the run goes; replaces the previous run's log)."""
    metrics_port: int = 9108
    """Prometheus port on --metrics-addr (-1: off, 0: any free port)."""
    metrics_addr: str = "127.0.0.1"
    """Prometheus bind address (localhost by default)."""
    metrics_per_gpu: bool = False
    """Also export one series per GPU (llmgym_gpu_*); by default rows, aisles and pools only."""
    slo_target: float = 0.95
    """SLO attainment target exported for the alert rules (llmgym_slo_attainment_target_ratio)."""
    record: str | None = None
    """Local node: write telemetry, intervals, controls and decisions here (.json.gz)."""
    plot: str | None = None
    """Local node with a budget drill: plot power vs budget here (PNG)."""


    def __post_init__(self) -> None:
        from llm_cluster_gym.controllers.live.loop import Drill

        parse_policy_spec(self.policy)
        local = self.scenario == "local"
        for d in self.drill:
            drill = Drill.parse(d)
            if drill.kind == "worker_kill" and not local:
                raise UsageError(f"--drill {d!r}: worker_kill needs the GPU node (--scenario local)")
            if drill.kind == "worker_kill" and drill.worker >= len(self.gpus):
                raise UsageError(f"--drill {d!r}: worker {drill.worker} does not exist "
                                 f"(--gpus gives {len(self.gpus)})")
        for d in self.budget_drill:
            parts = d.split(",")
            try:
                ok = len(parts) == 3 and all(math.isfinite(float(x)) and float(x) >= 0 for x in parts)
            except ValueError:
                ok = False
            if not ok:
                raise UsageError(f"--budget-drill {d!r}: want start_s,duration_s,budget_w "
                                 "(finite numbers >= 0)")
        check_seed("--seed", self.seed)
        # 0 s per interval paces nothing (as fast as possible); the GPU node needs a real interval.
        check_number("--interval-s", self.interval_s, **({"above": 0} if local else {"at_least": 0}))
        check_number("--power-margin", self.power_margin, above=0, at_most=1)
        check_number("--temp-margin-c", self.temp_margin_c, at_least=0)
        check_number("--governor-margin", self.governor_margin, above=0, at_most=1)
        check_number("--power-budget-w", self.power_budget_w, above=0)
        check_number("--trace-start-s", self.trace_start_s, at_least=0)
        check_number("--duration-s", self.duration_s, above=0)
        check_number("--rate-rps", self.rate_rps, above=0)
        for option, path in (("--log", self.log), ("--record", self.record), ("--plot", self.plot)):
            if path is not None and Path(path).is_dir():
                raise UsageError(f"{option} {path!r} is a folder; give a file name")
        if not 0.0 <= self.slo_target <= 1.0:
            raise UsageError(f"--slo-target must be in [0, 1], got {self.slo_target}")
        if not self.gpus:
            raise UsageError("--gpus needs at least one GPU index")
        if self.metrics_port < -1:
            raise UsageError(f"--metrics-port must be -1 (off), 0 (any) or a port, got {self.metrics_port}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"--max-steps must be > 0, got {self.max_steps}")


def _real_backend(a: DeployArgs) -> Any:
    from llm_cluster_gym.controllers.live.supervise import SupervisedWorker
    from llm_cluster_gym.envs.real.cluster import RealCluster, RealClusterConfig, RealClusterError
    from llm_cluster_gym.envs.real.telemetry import ReplayGpuDevice
    from llm_cluster_gym.envs.real.worker import InlineWorker, WorkerConfig, WorkerProcess

    gpus = tuple(a.gpus)
    drills = []
    for d in a.budget_drill:
        try:
            s, dur, w = (float(x) for x in d.split(","))
        except ValueError:
            raise RealClusterError(f"--budget-drill: field 'budget_drill' = {d!r}, expected "
                                   "start_s,duration_s,budget_w") from None
        drills.append((s, dur, w))
    wc = WorkerConfig(model=a.model, device=a.device if a.device != "cuda" else "cuda:0")
    cfg = RealClusterConfig(worker=wc, gpus=gpus, trace=a.trace, trace_start_s=a.trace_start_s,
                            duration_s=a.duration_s, rate_rps=a.rate_rps,
                            control_interval_s=a.interval_s or 5.0,
                            power_budget_w=a.power_budget_w, budget_drills=tuple(drills),
                            mode="process" if len(gpus) > 1 else "inline")
    devices = ([ReplayGpuDevice(a.replay, index=g) for g in gpus] if a.replay else None)

    def factory(g: int) -> Any:
        dev = f"cuda:{g}" if wc.device.startswith("cuda") else wc.device
        w = WorkerConfig(**{**wc.__dict__, "device": dev})
        return (lambda: WorkerProcess(w)) if cfg.mode == "process" else (lambda: InlineWorker(w))

    workers = [SupervisedWorker(factory(g), name=f"gpu{g}") for g in gpus]
    cluster = RealCluster(cfg, devices=devices, workers=workers)
    for w in workers:
        w.siblings = workers
    return cluster


def build(a: DeployArgs) -> tuple[Any, Any]:
    """The env (guarded backend) and the loop for these arguments."""
    from llm_cluster_gym.controllers.live import (
        DecisionLog,
        Drill,
        LiveLoop,
        MetricsExporter,
        PowerGovernor,
        build_policy,
    )
    from llm_cluster_gym.controllers.live.loop import GuardedBackend
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    node = None
    if a.scenario == "local":
        node = _real_backend(a)
        env = ClusterEnv(task=a.task, backend=GuardedBackend(node))
        speed = math.inf  # the real node paces itself
    else:
        sim = SimCluster(a.scenario, serving_model=a.serving_model,
                         auto_place_vms=a.task == "energy")
        env = ClusterEnv(task=a.task, backend=GuardedBackend(sim))
        iv = env.layout.control_interval_s
        wall = iv if a.interval_s is None else a.interval_s
        speed = math.inf if wall <= 0 else iv / wall
    policy, fallback = build_policy(a.policy, env, shield=not a.no_shield, seed=a.seed)
    for sh in (policy, fallback):
        if hasattr(sh, "power_margin"):
            sh.power_margin, sh.temp_margin_c = a.power_margin, a.temp_margin_c
    exporter = None if a.metrics_port < 0 else MetricsExporter(
        a.metrics_port, a.metrics_addr, per_gpu=a.metrics_per_gpu, slo_target=a.slo_target)
    loop = LiveLoop(env, policy, fallback,
                    governor=None if a.no_governor else PowerGovernor(margin=a.governor_margin),
                    log=DecisionLog(a.log), exporter=exporter, speed=speed,
                    drills=[Drill.parse(d) for d in a.drill], node=node)
    return env, loop


def decisions_planned(a: DeployArgs) -> tuple[int, str]:
    """How many decisions the run makes at most, and what bounds it (for the drill check)."""
    if a.scenario == "local":
        interval = a.interval_s or 5.0
        n = math.ceil(a.duration_s / interval - 1e-9)  # RealCluster's episode length
        why = f"--duration-s {a.duration_s:g} at {interval:g} s per interval"
    else:
        from llm_cluster_gym.envs.sim.scenario import load_scenario

        sc = load_scenario(a.scenario)
        n = math.ceil(sc.duration_s / sc.control_interval_s)  # SimCluster's episode length
        why = f"scenario {sc.name!r} has {n} intervals"
    if a.max_steps is not None and a.max_steps < n:
        n, why = a.max_steps, f"--max-steps {a.max_steps}"
    return n, why


def _save_recording(a: DeployArgs, env: Any, loop: Any, path: Path) -> None:
    provenance: dict[str, Any] = {
        "command": shlex.join(["llm-cluster", "deploy", *_argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import torch

        provenance["torch"] = torch.__version__
    except ImportError:
        pass
    run = {"policy": a.policy, "shield": not a.no_shield, "governor": not a.no_governor}
    loop.node.save_recording(path, provenance, run, decisions=loop.log.records)


_argv: list[str] = []


def run(a: DeployArgs, command: str = "llm-cluster deploy") -> int:
    """Run the loop; prints a summary (and the drill figures) as JSON on the last line.

    Raises:
        ScenarioError: Unknown scenario (before anything starts).
        LiveLoopError: A drill starts after the last decision (before anything starts).
        PolicySpecError: The policy cannot be built for this env.
    """
    from llm_cluster_gym.controllers.live.loop import Drill, check_drills
    from llm_cluster_gym.envs.outputs import staged_file

    _argv[:] = shlex.split(command)[2:]
    n, why = decisions_planned(a)  # loads the scenario: an unknown one stops here
    check_drills([Drill.parse(d) for d in a.drill], n, why)
    Path(a.log).unlink(missing_ok=True)  # a new run starts a new log
    env, loop = build(a)
    if loop.exporter is not None:
        print(f"metrics on http://{a.metrics_addr}:{loop.exporter.port}/metrics", flush=True)
    t = time.time()
    summary = loop.run(seed=a.seed, max_steps=a.max_steps)
    out: dict[str, Any] = {"steps": summary.steps, "stop_reason": summary.stop_reason,
                           "wall_s": round(time.time() - t, 2), **summary.latency_ms(),
                           "overrides": summary.overrides, "policy_errors": summary.policy_errors,
                           "telemetry_errors": summary.telemetry_errors,
                           "worker_events": len(summary.worker_events), **summary.totals}
    if a.scenario == "local" and a.record:
        with staged_file(a.record) as tmp:  # appears complete, or the previous one stays
            _save_recording(a, env, loop, tmp)
        if a.budget_drill:
            from llm_cluster_gym.controllers.live.report import analyse, plot

            res, series = analyse(a.record)
            out["drill"] = res.as_dict()
            if a.plot:
                with staged_file(a.plot) as tmp:
                    plot(res, series, tmp, title=f"Budget drill, {a.policy} (shield) + governor")
    from llm_cluster_gym.controllers.live.exporter import _jsonable

    print(json.dumps(_jsonable(out)))
    return 0
