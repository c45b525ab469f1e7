"""Worker supervision: a dead inference worker is restarted and its requests rerouted.

:class:`SupervisedWorker` wraps any worker of :mod:`envs.real.worker` (``InlineWorker``,
``WorkerProcess``) behind the same interface RealCluster uses. It remembers every request it
was given until a poll reports it finished or dropped. When a call to the worker fails (a
killed process shows up as a broken pipe or end-of-file on its pipe, or as a dead process
during ``pump``), it records the failure, restarts the worker from its factory, re-applies the
last control settings and resubmits the outstanding requests (with their original arrival
times, so the outage shows in their TTFT). If the restart itself fails, the requests go to a
live sibling worker, and only when there is none are they reported dropped, each with the
recorded error. So no request is lost without a recorded error.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_cluster_gym.envs.real.worker import Completed, Request, WorkerReport


@dataclass(frozen=True)
class WorkerEvent:
    """One supervision event (failure, restart, reroute, drop)."""

    time_s: float
    worker: str
    kind: str
    detail: str
    requests: int = 0


class SupervisedWorker:
    """A worker that is restarted on failure, with its outstanding requests resubmitted.

    Args:
        factory: Builds a fresh worker (called now and on every restart).
        name: Name used in events (e.g. ``gpu0``).
        max_restarts: Restarts allowed before the worker is given up.
        on_event: Called with every :class:`WorkerEvent` (the live loop logs them).
    """

    def __init__(self, factory: Callable[[], Any], name: str = "worker", max_restarts: int = 3,
                 on_event: Callable[[WorkerEvent], None] | None = None) -> None:
        self.factory, self.name, self.max_restarts = factory, name, max_restarts
        self.on_event = on_event
        self.events: list[WorkerEvent] = []
        self.siblings: list[SupervisedWorker] = []
        self.restarts = 0
        self.outstanding: dict[int, Request] = {}
        self._control: dict[str, Any] = {}
        self._dropped: list[Completed] = []
        self.inner: Any | None = factory()

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, detail: str, n: int = 0) -> None:
        ev = WorkerEvent(time.time(), self.name, kind, detail, n)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    @property
    def alive(self) -> bool:
        """False once the worker was given up (restarts exhausted or failed)."""
        return self.inner is not None

    def _process_dead(self) -> bool:
        proc = getattr(self.inner, "_proc", None)  # WorkerProcess keeps its process here
        return proc is not None and not proc.is_alive()

    def kill(self) -> None:
        """Fault drill: kill the worker's process (SIGKILL), or drop an in-process engine."""
        proc = getattr(self.inner, "_proc", None)
        if proc is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=5)
        else:
            self.inner = _Dead(self.inner)
        self._event("killed", "fault drill")

    # ------------------------------------------------------------------ recovery
    def _recover(self, exc: BaseException) -> None:
        pending = list(self.outstanding.values())
        self._event("failed", f"{type(exc).__name__}: {exc}", len(pending))
        old, self.inner = self.inner, None
        try:
            if old is not None:
                old.close()
        except Exception:  # the old worker is dead; closing it may fail too
            pass
        if self.restarts < self.max_restarts:
            self.restarts += 1
            try:
                self.inner = self.factory()
                if self._control:
                    self.inner.set_control(**self._control)
                if pending:
                    self.inner.submit(pending)
                self._event("restarted", f"restart {self.restarts}; resubmitted", len(pending))
                return
            except Exception as exc2:
                self.inner = None
                self._event("restart_failed", f"{type(exc2).__name__}: {exc2}", len(pending))
        self.outstanding.clear()
        live = [s for s in self.siblings if s is not self and s.alive]
        if live and pending:
            target = min(live, key=lambda s: len(s.outstanding))
            target.submit(pending)
            self._event("rerouted", f"to {target.name}", len(pending))
            return
        for r in pending:
            self._dropped.append(Completed(r.req_id, r.pool, r.arrival_s, r.input_tokens,
                                           r.output_tokens, dropped=True))
        if pending:
            self._event("dropped", "no live worker left", len(pending))

    def _call(self, fn: Callable[[], Any]) -> Any:
        if self.inner is None:
            return None
        try:
            if self._process_dead():
                raise EOFError("worker process is not running")
            return fn()
        except (OSError, EOFError, RuntimeError, _WorkerDiedError) as exc:
            self._recover(exc)
            return None

    # ------------------------------------------------------------------ worker interface
    def submit(self, reqs: list[Request]) -> None:
        """Queue requests (remembered until a poll reports them)."""
        if not reqs:
            return
        if self.inner is None:
            live = [s for s in self.siblings if s is not self and s.alive]
            if live:
                min(live, key=lambda s: len(s.outstanding)).submit(reqs)
                return
            self._dropped.extend(Completed(r.req_id, r.pool, r.arrival_s, r.input_tokens,
                                           r.output_tokens, dropped=True) for r in reqs)
            self._event("dropped", "no live worker", len(reqs))
            return
        for r in reqs:
            self.outstanding[r.req_id] = r
        self._call(lambda: self.inner.submit(reqs))

    def set_control(self, **kwargs: Any) -> None:
        """Forward a control change (remembered and re-applied after a restart)."""
        self._control.update(kwargs)
        self._call(lambda: self.inner.set_control(**kwargs))

    def pump(self, until_s: float) -> None:
        """Let the worker make progress until ``until_s``."""
        if self._call(lambda: self.inner.pump(until_s)) is None and self.inner is None:
            time.sleep(max(0.0, until_s - time.time()))

    def poll(self) -> WorkerReport:
        """Completions since the last poll (including requests dropped by a failure)."""
        rep = self._call(lambda: self.inner.poll())
        if rep is None:  # failed (now recovered) or given up: an empty report this time
            rep = WorkerReport()
        for c in rep.completed:
            self.outstanding.pop(c.req_id, None)
        if self._dropped:
            rep.completed = [*rep.completed, *self._dropped]
            self._dropped = []
        return rep

    def close(self) -> None:
        """Stop the worker."""
        if self.inner is not None:
            try:
                self.inner.close()
            except Exception:
                pass


class _WorkerDiedError(RuntimeError):
    """Raised by a killed in-process worker."""


class _Dead:
    """An in-process worker after a kill drill: every call fails like a dead process."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise _WorkerDiedError("worker was killed (fault drill)")

    submit = set_control = pump = poll = _fail

    def close(self) -> None:
        """Nothing left to stop."""
