"""The worker plumbing: one engine driven in the caller's thread or in a process of its own.

:class:`InlineWorker` runs an engine in the caller's thread (CPU tests, one-GPU runs);
:class:`WorkerProcess` runs one engine per GPU in a spawned process talking over a pipe
(:func:`serve_pipe` is the child's loop, :class:`PipeWorkerClient` the driver's side, shared
with the tensor-parallel worker). All offer ``submit``, ``set_control``, ``pump``, ``poll`` and
``close``, which is what :class:`envs.real.cluster.RealCluster` drives.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict
from typing import Any

from llm_cluster_gym.envs.real.engine import InferenceEngine
from llm_cluster_gym.envs.real.records import Completed, EngineStats, Request, WorkerReport
from llm_cluster_gym.envs.real.worker_config import WorkerConfig, WorkerError


class InlineWorker:
    """An engine driven from the caller's thread: call :meth:`pump` to make progress."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine = InferenceEngine(config)
        self.engine.warmup()
        self._done: list[Completed] = []

    def submit(self, reqs: list[Request]) -> None:
        """Queue requests (refusals are reported by the next poll)."""
        for r in reqs:
            c = self.engine.submit(r)
            if c is not None:
                self._done.append(c)

    def set_control(self, **kwargs: Any) -> None:
        """Forward to :meth:`InferenceEngine.set_control`."""
        self.engine.set_control(**kwargs)

    def pump(self, until_s: float) -> None:
        """Step the engine until wall time ``until_s`` or until it has nothing to do."""
        while self.engine.busy and time.time() < until_s:
            self._done.extend(self.engine.step())

    def poll(self) -> WorkerReport:
        """Completions since the last poll and the counters."""
        done, self._done = self._done, []
        e = self.engine
        return WorkerReport(done, EngineStats(**asdict(e.stats)), len(e.waiting), len(e.running))

    def close(self) -> None:
        """Nothing to stop in-process."""


def _worker_main(conn: Any, config: WorkerConfig) -> None:  # pragma: no cover - child process
    try:
        engine = InferenceEngine(config)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    engine.warmup()
    conn.send(("ready", engine.shape.name))
    serve_pipe(engine, conn, on_stop=lambda: None)


def serve_pipe(engine: Any, conn: Any, on_stop: Any) -> None:
    """Serve the driver's pipe until "stop": submit, control, poll; step while busy.

    Shared by the single-GPU worker process and the tensor-parallel leader; `on_stop` runs
    before the "stopped" answer (the TP leader shuts its followers down there) and what it
    returns is that answer's payload.
    """
    done: list[Completed] = []
    while True:
        while conn.poll(0 if engine.busy else 0.002):
            kind, payload = conn.recv()
            if kind == "submit":
                for r in payload:
                    c = engine.submit(r)
                    if c is not None:
                        done.append(c)
            elif kind == "control":
                engine.set_control(**payload)
            elif kind == "poll":
                conn.send(("report", WorkerReport(done, EngineStats(**asdict(engine.stats)),
                                                  len(engine.waiting), len(engine.running))))
                done = []
            elif kind == "stop":
                conn.send(("stopped", on_stop()))
                return
        if engine.busy:
            done.extend(engine.step())


class PipeWorkerClient:
    """The driver's side of a worker that runs in its own process(es) behind a pipe.

    Shared by `WorkerProcess` and the tensor-parallel worker: subclasses open `self._conn`.
    """

    _conn: Any

    def submit(self, reqs: list[Request]) -> None:
        """Send requests to the worker."""
        if reqs:
            self._conn.send(("submit", reqs))

    def set_control(self, **kwargs: Any) -> None:
        """Send a control change (batch cap, admission, queue cap)."""
        self._conn.send(("control", kwargs))

    def pump(self, until_s: float) -> None:
        """The process runs by itself: just wait."""
        time.sleep(max(0.0, until_s - time.time()))

    def poll(self) -> WorkerReport:
        """Ask for completions and counters."""
        self._conn.send(("poll", None))
        while True:
            kind, rep = self._conn.recv()
            if kind == "report":
                return rep


class WorkerProcess(PipeWorkerClient):
    """One engine in a spawned process (one per GPU), driven over a pipe.

    Raises:
        WorkerError: The child failed to build its engine (message from the child).
    """

    def __init__(self, config: WorkerConfig, start_timeout_s: float = 600.0) -> None:
        self.config = config
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, config), daemon=True)
        self._proc.start()
        if not self._conn.poll(start_timeout_s):
            self.close()
            raise WorkerError(f"worker on {config.device} did not start in {start_timeout_s} s")
        kind, msg = self._conn.recv()
        if kind != "ready":
            self.close()
            raise WorkerError(f"worker on {config.device} failed to start: {msg}")

    def close(self) -> None:
        """Stop the process."""
        if self._proc.is_alive():
            try:
                self._conn.send(("stop", None))
                self._proc.join(timeout=10)
            except (BrokenPipeError, OSError):
                pass
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
