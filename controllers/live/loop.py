"""The live control loop: any policy, inside the shield, driving a backend in real time.

Every interval the loop takes the latest telemetry snapshot and service metrics (through the
same :class:`envs.cluster_env.ClusterEnv` observation a trained agent saw in training), asks
the policy, lets the :class:`~controllers.live.governor.PowerGovernor` bound admission on the
measured power, applies the action through the backend, and records the decision (JSON lines)
and the measurements (Prometheus). The backend is simulated (accelerated or paced to wall
time) or the real GPU node (whose ``advance`` takes the interval's wall time by itself).

Faults it survives, each drilled by :class:`Drill` and tested:

* telemetry read fails: :class:`GuardedBackend` hands out the last good snapshot flagged as a
  power emergency (``power_failure:telemetry_unavailable``), so the shield's fallback holds and
  the governor does not open admission further;
* the policy raises: the rule-based fallback (shielded) acts instead and the error is logged;
* a worker dies: :class:`~controllers.live.supervise.SupervisedWorker` restarts it and
  resubmits its requests (real node);
* SIGTERM/SIGINT: no further action is applied, the backend is closed (RealCluster restores
  every GPU setting its actuators changed) and the log is flushed and synced.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from llm_cluster_gym.controllers.live.exporter import DecisionLog, MetricsExporter
from llm_cluster_gym.controllers.live.governor import GovernorDecision, PowerGovernor
from llm_cluster_gym.envs.backend import (
    BackendDescription,
    ClusterAction,
    ClusterBackend,
    ServiceMetrics,
    Telemetry,
    TickHistory,
)
from llm_cluster_gym.envs.episode import EpisodeRecorder, EpisodeResult

TELEMETRY_LOST = "power_failure:telemetry_unavailable"
"""Fault name set while telemetry cannot be read (maps to the power-emergency flag)."""

DRILL_KINDS = ("telemetry_loss", "policy_error", "worker_kill")


class LiveLoopError(ValueError):
    """Bad loop configuration or drill (the message names the field and value)."""


class DrillError(RuntimeError):
    """Raised by a scheduled fault drill (telemetry read or policy)."""


@dataclass(frozen=True)
class Drill:
    """A scheduled fault: ``kind`` for ``steps`` decisions from decision ``step``.

    Attributes:
        kind: ``telemetry_loss``, ``policy_error`` or ``worker_kill`` (real node).
        step: First decision affected (0-based).
        steps: Decisions affected.
        worker: Worker index (``worker_kill``).
    """

    kind: str
    step: int
    steps: int = 1
    worker: int = 0

    def active(self, step: int) -> bool:
        """True when decision ``step`` is affected."""
        return self.step <= step < self.step + self.steps

    @classmethod
    def parse(cls, text: str) -> Drill:
        """From ``kind@step[+steps][:worker]``, e.g. ``telemetry_loss@5+3``, ``worker_kill@4:0``.

        Raises:
            LiveLoopError: Unknown kind or malformed numbers.
        """
        try:
            kind, rest = text.split("@", 1)
            worker = 0
            if ":" in rest:
                rest, w = rest.split(":", 1)
                worker = int(w)
            step, _, n = rest.partition("+")
            d = cls(kind, int(step), int(n) if n else 1, worker)
        except ValueError as exc:
            raise LiveLoopError(f"drill {text!r}: expected kind@step[+steps][:worker] ({exc})"
                                ) from None
        if d.kind not in DRILL_KINDS or d.step < 0 or d.steps < 1 or d.worker < 0:
            raise LiveLoopError(f"drill {text!r}: field 'kind' must be one of {DRILL_KINDS}, "
                                "step >= 0, steps >= 1")
        return d

    def __str__(self) -> str:
        """The drill as `parse` reads it (``telemetry_loss@5+3``)."""
        worker = f":{self.worker}" if self.kind == "worker_kill" else ""
        return f"{self.kind}@{self.step}{f'+{self.steps}' if self.steps != 1 else ''}{worker}"


def check_drills(drills: Sequence[Drill], decisions: int | None, why: str = "") -> None:
    """Refuse a drill that starts after the last decision of the run (it would never fire).

    Args:
        drills: The scheduled drills.
        decisions: Decisions the run will make (None: unknown, nothing to check).
        why: What bounds the run, for the message (``"the episode's 24 intervals"``).

    Raises:
        LiveLoopError: Naming the drill, its step and the last step.
    """
    if decisions is None:
        return
    for d in drills:
        if d.step >= decisions:
            raise LiveLoopError(
                f"drill '{d}' starts at step {d.step}, after the last step {decisions - 1} "
                f"({decisions} decisions{': ' + why if why else ''}); it would never fire")


class GuardedBackend:
    """A ClusterBackend proxy: one telemetry snapshot per interval, failures contained.

    The first ``telemetry()`` after ``advance()`` reads the backend and stamps ``read_at``;
    later calls in the same interval (observation, shield, governor, metrics) share that
    snapshot. ``apply()`` stamps ``applied_at``, so ``applied_at - read_at`` is the decision
    latency. A failed read returns the last good snapshot with :data:`TELEMETRY_LOST` added to
    its faults and sets ``stale``.

    Args:
        inner: The backend (SimCluster, RealCluster, ...).
    """

    def __init__(self, inner: ClusterBackend) -> None:
        self.inner = inner
        self.layout = inner.layout
        self.fail_reads = False
        self.stale = False
        self.errors: list[str] = []
        self.read_at = self.applied_at = time.perf_counter()
        self._snap: Telemetry | None = None
        self._good: Telemetry | None = None

    def reset(self, seed: int | None = None) -> Telemetry:
        """Reset the backend; its first telemetry is the first snapshot."""
        tel = self.inner.reset(seed=seed)
        self.read_at = time.perf_counter()
        self._snap = self._good = tel
        self.stale = False
        return tel

    def apply(self, action: ClusterAction) -> None:
        """Apply and stamp the time."""
        self.inner.apply(action)
        self.applied_at = time.perf_counter()

    def advance(self) -> ServiceMetrics:
        """One interval; the next telemetry call reads fresh values."""
        m = self.inner.advance()
        self._snap = None
        return m

    def telemetry(self) -> Telemetry:
        """This interval's snapshot (read on first call)."""
        if self._snap is not None:
            return self._snap
        self.read_at = time.perf_counter()
        try:
            if self.fail_reads:
                raise DrillError("telemetry read failed (fault drill)")
            tel = self.inner.telemetry()
            self._good, self.stale = tel, False
        except Exception as exc:
            if self._good is None:
                raise LiveLoopError(f"telemetry unavailable before any good read: {exc}") from exc
            self.errors.append(f"{type(exc).__name__}: {exc}")
            faults = tuple(f for f in self._good.active_faults if f != TELEMETRY_LOST)
            tel = replace(self._good, active_faults=(*faults, TELEMETRY_LOST))
            self.stale = True
        self._snap = tel
        return tel

    @property
    def done(self) -> bool:
        """The backend's episode end."""
        return bool(self.inner.done)

    def describe(self) -> BackendDescription:
        """The backend's description."""
        return self.inner.describe()

    def tick_history(self) -> TickHistory | None:
        """The backend's per-tick history."""
        return self.inner.tick_history()

    def close(self) -> None:
        """Close the backend (RealCluster: stops workers and sampler, restores GPU settings)."""
        self.inner.close()


@dataclass
class LoopSummary:
    """What one run of the loop did."""

    steps: int = 0
    stop_reason: str = ""
    decision_latency_s: list[float] = field(default_factory=list)
    policy_latency_s: list[float] = field(default_factory=list)
    overrides: int = 0
    policy_errors: int = 0
    telemetry_errors: int = 0
    worker_events: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)
    episode: EpisodeResult | None = None

    def latency_ms(self) -> dict[str, float]:
        """P50/P99 of decision and policy latency (ms)."""
        out = {}
        for key, xs in (("decision", self.decision_latency_s), ("policy", self.policy_latency_s)):
            a = np.asarray(xs) * 1e3
            out[f"{key}_p50_ms"] = float(np.percentile(a, 50)) if a.size else float("nan")
            out[f"{key}_p99_ms"] = float(np.percentile(a, 99)) if a.size else float("nan")
        return out


TOTAL_KEYS = ("energy_j", "arrived", "finished", "dropped", "slo_violations",
              "power_throttle_events", "thermal_throttle_events")
"""Interval metrics summed into `LoopSummary.totals` (and the stop record's ``totals``); the
totals also give the episode's ``slo_attainment`` (every arrival counted, the requests still in
flight at the stop as misses: `envs.episode.EpisodeResult.summary`)."""


class LiveLoop:
    """Runs a policy against a ClusterEnv's backend in (accelerated) real time.

    The episode is recorded by the same `envs.episode.EpisodeRecorder` as every offline run:
    `LoopSummary.episode` is an `EpisodeResult` (its summary goes to the stop record, and
    `envs.sim.report.write_report` can report it).

    Args:
        env: A :class:`envs.cluster_env.ClusterEnv` whose backend is a :class:`GuardedBackend`
            (see :func:`guarded_env`).
        policy: Any Controller (``act(observation, action_mask)``), usually shielded.
        fallback: Controller used when the policy raises.
        governor: Admission governor on measured power (None: off).
        log: Decision log (None: in memory).
        exporter: Prometheus exporter (None: no metrics).
        speed: Simulated seconds per wall second (``inf``: as fast as possible; 1: real
            time). A real backend paces itself.
        drills: Scheduled faults.
        node: The `envs.real.cluster.RealCluster` behind the guard when the loop drives the
            real node (its builder has it): its supervised workers take ``worker_kill`` drills
            and report worker events, and its GPU actuators' log is counted at the stop.
    """

    def __init__(self, env: Any, policy: Any, fallback: Any,
                 governor: PowerGovernor | None = None, log: DecisionLog | None = None,
                 exporter: MetricsExporter | None = None, speed: float = math.inf,
                 drills: Sequence[Drill] = (), node: Any | None = None) -> None:
        self.env = env
        self.guard = env.unwrapped.backend
        if not isinstance(self.guard, GuardedBackend):
            raise LiveLoopError("LiveLoop: the env's backend must be a GuardedBackend "
                                "(build the env with guarded_env())")
        if not speed > 0:
            raise LiveLoopError(f"LiveLoop: field 'speed' must be > 0, got {speed!r}")
        self.policy, self.fallback, self.governor = policy, fallback, governor
        self.log = log or DecisionLog(None)
        self.exporter, self.speed, self.drills = exporter, float(speed), tuple(drills)
        if node is not None and self.guard.inner is not node:
            raise LiveLoopError("LiveLoop: field 'node' must be the backend the env's guard wraps")
        self.node = node
        workers = list(node.workers) if node is not None else []
        if any(d.kind == "worker_kill" for d in self.drills):
            if not workers or not all(hasattr(w, "kill") for w in workers):
                raise LiveLoopError("drill 'worker_kill' needs a real backend with supervised "
                                    "workers")
            for d in self.drills:
                if d.kind == "worker_kill" and d.worker >= len(workers):
                    raise LiveLoopError(f"drill worker_kill: field 'worker' = {d.worker}, "
                                        f"node has {len(workers)}")
        self._workers = workers
        self._worker_events: list[dict[str, Any]] = []
        for w in workers:
            if hasattr(w, "on_event"):
                w.on_event = lambda ev: self._worker_events.append(ev.__dict__.copy())
        self._stop = threading.Event()
        self.stop_reason = ""
        self._recorder: EpisodeRecorder | None = None
        self._t_start = time.perf_counter()

    # ------------------------------------------------------------------ control
    def request_stop(self, reason: str) -> None:
        """Stop before the next action (thread- and signal-safe)."""
        if not self.stop_reason:
            self.stop_reason = reason
        self._stop.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request_stop(signal.Signals(signum).name)

    def _drill(self, kind: str, step: int) -> Drill | None:
        return next((d for d in self.drills if d.kind == kind and d.active(step)), None)

    def _act(self, obs: np.ndarray, mask: np.ndarray, step: int) -> tuple[np.ndarray, str | None]:
        try:
            if self._drill("policy_error", step):
                raise DrillError("policy raised (fault drill)")
            return np.asarray(self.policy.act(obs, mask), dtype=np.int64), None
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            return np.asarray(self.fallback.act(obs, mask), dtype=np.int64), err

    # ------------------------------------------------------------------ the loop
    def run(self, seed: int | None = 0, max_steps: int | None = None) -> LoopSummary:
        """Run until the episode ends, ``max_steps`` decisions, or a stop request/signal.

        The backend is closed at the end (restoring GPU settings on the real node) and the log
        flushed, also on an exception.

        Raises:
            LiveLoopError: A drill starts after the run's last decision (`check_drills`).
        """
        old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        summary = LoopSummary()
        try:
            total = self.guard.describe().episode_intervals
            if max_steps is not None:
                total = max_steps if total is None else min(total, max_steps)
            check_drills(self.drills, total)
            self._run(summary, seed, max_steps)
        except BaseException as exc:
            self.request_stop(f"error: {type(exc).__name__}: {exc}")
            raise
        finally:
            summary.stop_reason = self.stop_reason or "done"
            self._finish(summary)
            for sig, h in old.items():
                signal.signal(sig, h)
        return summary

    def _run(self, summary: LoopSummary, seed: int | None, max_steps: int | None) -> None:
        env, be, lay = self.env, self.guard, self.env.unwrapped.layout
        self._t_start = time.perf_counter()
        description = be.describe()
        self._recorder = EpisodeRecorder(description, seed, getattr(self.policy, "name", "policy"))
        if self.exporter is not None:
            self.exporter.bind(lay, description.slowdown_temp_c)
        obs, _ = env.reset(seed=seed)
        self.policy.reset()
        self.fallback.reset()
        if self.governor is not None:
            self.governor.reset()
        wall_per_step = lay.control_interval_s / self.speed
        t_begin = time.monotonic()
        step = 0
        while not self._stop.is_set() and (max_steps is None or step < max_steps):
            # The decision starts here: the telemetry it uses is this interval's (read now, or
            # already read by the env at the end of the last step); pacing sleeps lie outside.
            read_at = time.perf_counter()
            tel = be.telemetry()
            stale = be.stale
            t0 = time.perf_counter()
            action, err = self._act(obs, env.unwrapped.action_masks(), step)
            t_policy = time.perf_counter() - t0
            gov: GovernorDecision | None = None
            if self.governor is not None:
                gov = self.governor.decide(tel, stale=stale)
                be.apply(ClusterAction(admit_fraction=gov.admit_fraction))
            kill = self._drill("worker_kill", step)
            if kill is not None and kill.step == step:
                self._workers[kill.worker].kill()
            if self._stop.is_set():  # a signal arrived while deciding: apply nothing more
                break
            be.fail_reads = self._drill("telemetry_loss", step + 1) is not None
            obs, _reward, terminated, truncated, info = env.step(action)
            latency = be.applied_at - read_at  # env.step applies, then advances
            summary.decision_latency_s.append(latency)
            summary.policy_latency_s.append(t_policy)
            self._record(step, tel, stale, action, err, gov, info, latency, t_policy, summary,
                         float(_reward))
            step += 1
            summary.steps = step
            if terminated or truncated:
                self.request_stop("episode_end")
                break
            target = t_begin + step * wall_per_step
            while not self._stop.is_set() and time.monotonic() < target:
                time.sleep(min(0.05, target - time.monotonic()))

    def _record(self, step: int, tel: Telemetry, stale: bool, action: np.ndarray,
                err: str | None, gov: GovernorDecision | None, info: dict[str, Any],
                latency: float, t_policy: float, summary: LoopSummary, reward: float) -> None:
        env = self.env.unwrapped
        override = tuple(getattr(self.policy, "last_override", ()) or ())
        if err is not None:
            override = tuple(getattr(self.fallback, "last_override", ()) or ())
        summary.overrides += int(bool(override))
        summary.policy_errors += int(err is not None)
        summary.telemetry_errors += int(stale)
        events, self._worker_events = self._worker_events, []
        summary.worker_events.extend(events)
        metrics = {k: info[k] for k in ("energy_j", "arrived", "finished", "dropped", "in_flight",
                                        "slo_violations", "slo_attainment", "ttft_p99_s",
                                        "tbt_p99_s", "peak_row_power_w", "max_gpu_temp_c",
                                        "power_throttle_events", "thermal_throttle_events")}
        m = env.last_metrics
        if self._recorder is not None and m is not None and env.last_telemetry is not None:
            self._recorder.record(m, env.last_telemetry, reward, override)
        pools = [p.__dict__ for p in env.pools]
        rec = {
            "event": "decision", "step": step, "wall_time_s": time.time(),
            "time_s": float(tel.time_s), "policy": getattr(self.policy, "name", "policy"),
            "action": action, "pools": pools,
            "fallback_used": err is not None, "policy_error": err,
            "shield_override": list(override),
            "telemetry_stale": stale,
            "telemetry_error": self.guard.errors[-1] if stale and self.guard.errors else None,
            "admit_fraction": None if gov is None else gov.admit_fraction,
            "governor": None if gov is None else gov.reason,
            "power_ratio": None if gov is None else gov.power_ratio,
            "row_power_w": tel.row_power_w, "row_limit_w": tel.row_limit_w,
            "gpu_power_w": tel.gpu_power_w if len(tel.gpu_power_w) <= 16 else None,
            "max_gpu_temp_c": float(np.nanmax(tel.gpu_temp_c)) if len(tel.gpu_temp_c) else None,
            "faults": list(tel.active_faults),
            "latency_ms": {"decision": latency * 1e3, "policy": t_policy * 1e3},
            "interval": metrics, "worker_events": events,
        }
        self.log.write(rec)
        if self.exporter is not None:  # the action is applied: exporting costs no latency
            self.exporter.observe_decision(
                telemetry=tel, action=action, pool_names=env.layout.pool_names, pools=env.pools,
                admit_fraction=None if gov is None else gov.admit_fraction, override=override,
                policy_error=err is not None, telemetry_stale=stale, worker_events=events,
                latency_s=latency, policy_latency_s=t_policy, metrics=m)

    def _finish(self, summary: LoopSummary) -> None:
        closed: bool | str = True
        try:
            self.guard.close()  # RealCluster: stops workers and sampler, restores GPU settings
        except Exception as exc:  # still flush the log
            closed = f"{type(exc).__name__}: {exc}"
        episode_summary = None
        if self._recorder is not None:
            summary.totals = self._recorder.totals(TOTAL_KEYS)
            summary.episode = self._recorder.result(self.guard.tick_history(),
                                                    time.perf_counter() - self._t_start)
            if summary.episode.n_intervals:
                full = summary.episode.summary()
                summary.totals["slo_attainment"] = full["slo_attainment"]
                episode_summary = {k: (v if math.isfinite(v) else None) for k, v in full.items()}
        self.log.write({"event": "stop", "wall_time_s": time.time(),
                        "reason": summary.stop_reason, "steps": summary.steps,
                        "backend_closed": closed,
                        "gpu_settings_changed": None if self.node is None else sum(
                            e.applied for e in self.node.actuators.log),
                        "totals": summary.totals, "summary": episode_summary,
                        **summary.latency_ms(),
                        "overrides": summary.overrides, "policy_errors": summary.policy_errors,
                        "telemetry_errors": summary.telemetry_errors,
                        "worker_events": len(summary.worker_events)})
        self.log.close()
        if self.exporter is not None:
            self.exporter.close()


def guarded_env(env: Any) -> Any:
    """A ClusterEnv like `env` built over a :class:`GuardedBackend` of `env`'s backend.

    The new env has `env`'s task, reward weights, time scale and render mode; `env` itself
    shares the backend and must not be used any more. An env whose backend is already guarded
    is returned as is.
    """
    from llm_cluster_gym.envs.cluster_env import ClusterEnv

    base = env.unwrapped
    if isinstance(base.backend, GuardedBackend):
        return env
    return ClusterEnv(task=base.task, backend=GuardedBackend(base.backend),
                      reward_weights=base.reward_weights, render_mode=base.render_mode,
                      reconfig_every=base.reconfig_every)
