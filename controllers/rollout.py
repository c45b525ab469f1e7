"""Run an env-level controller through `envs.sim.report.run_episode` (tables and plots).

`run_episode` drives a `ClusterBackend` with a backend-level policy. `EnvDriver` presents a
`ClusterEnv` plus a `Controller` as such a backend: each `advance()` asks the controller for
the env action from the observation and steps the env. So the report's summary, table and
plots are reused unchanged, and the controller sees exactly what it sees in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from llm_cluster_gym.envs.backend import ClusterAction, ServiceMetrics, Telemetry
from llm_cluster_gym.envs.sim.report import EpisodeResult, run_episode


class _Tap:
    """Forwards to a backend and keeps the last interval's `ServiceMetrics`."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.last: ServiceMetrics | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_backend":  # copy/pickle probe before __init__
            raise AttributeError(name)
        return getattr(self._backend, name)

    @property
    def done(self) -> bool:
        """The wrapped backend's `done`."""
        return self._backend.done

    def advance(self) -> ServiceMetrics:
        """Advance the wrapped backend and remember its metrics."""
        self.last = self._backend.advance()
        return self.last


class EnvDriver:
    """A `ClusterBackend` view of (env, controller), for `run_episode`.

    Args:
        env_factory: Callable ``(backend) -> ClusterEnv`` building the env over a backend.
        backend: The simulated (or real) backend.
        make: Callable ``(env) -> controller``.
    """

    def __init__(self, env_factory, backend: Any, make) -> None:
        self.tap = _Tap(backend)
        self.env = env_factory(self.tap)
        self.controller = make(self.env)
        self.layout = backend.layout
        for attr in ("scenario", "n_intervals", "thermal", "record_ticks"):
            if hasattr(backend, attr):
                setattr(self, attr, getattr(backend, attr))
        self.infos: list[dict[str, Any]] = []
        self.overrides: list[tuple[str, ...]] = []
        self._obs: np.ndarray | None = None
        self._done = False

    @property
    def record(self) -> Any:
        """The backend's per-tick record (if it keeps one)."""
        return getattr(self.tap, "record", None)

    def reset(self, seed: int | None = None) -> Telemetry:
        """Reset env (seeded) and controller."""
        self._obs, _ = self.env.reset(seed=seed)
        self.controller.reset()
        self.infos.clear()
        self.overrides.clear()
        self._done = False
        return self.tap.telemetry()

    def apply(self, action: ClusterAction) -> None:
        """Unused: actions come from the controller inside `advance`."""

    def advance(self) -> ServiceMetrics:
        """One env step under the controller."""
        action = self.controller.act(self._obs, self.env.action_masks())
        self._obs, _, _, truncated, info = self.env.step(action)
        info["shield_override"] = float(bool(getattr(self.controller, "last_override", ())))
        self.overrides.append(tuple(getattr(self.controller, "last_override", ())))
        self.infos.append(info)
        self._done = bool(truncated)
        assert self.tap.last is not None
        return self.tap.last

    def telemetry(self) -> Telemetry:
        """Latest telemetry."""
        return self.tap.telemetry()

    @property
    def done(self) -> bool:
        """True once the env truncated."""
        return self._done


def skip_warmup(result: EpisodeResult, n: int) -> EpisodeResult:
    """The result without its first `n` intervals (start-up reconfiguration and queues)."""
    if n <= 0:
        return result
    if n >= result.n_intervals:
        raise ValueError(f"warm-up of {n} intervals leaves nothing of {result.n_intervals}")
    tick = {}
    if result.tick_time_s is not None:
        per = len(result.tick_time_s) // result.n_intervals
        for k in ("tick_time_s", "tick_row_power_w", "tick_row_limit_w"):
            tick[k] = getattr(result, k)[n * per:]
    return dataclasses.replace(
        result, time_s=result.time_s[n:], metrics={k: v[n:] for k, v in result.metrics.items()},
        row_power_w=result.row_power_w[n:], row_limit_w=result.row_limit_w[n:],
        aisle_inlet_c=result.aisle_inlet_c[n:],
        aisle_max_gpu_temp_c=result.aisle_max_gpu_temp_c[n:],
        active_faults=result.active_faults[n:],
        ttft_hist=None if result.ttft_hist is None else result.ttft_hist[n:],
        tbt_hist=None if result.tbt_hist is None else result.tbt_hist[n:], **tick)


def run_controller(env_factory, backend: Any, make, seed: int, progress: bool = False
                   ) -> tuple[EpisodeResult, EnvDriver]:
    """Run one episode of a controller on an env over `backend`; result and driver (infos)."""
    driver = EnvDriver(env_factory, backend, make)
    result = run_episode(driver, seed=seed, progress=progress)
    result.controller_name = getattr(driver.controller, "name", type(driver.controller).__name__)
    return result, driver


def run_measured(task: str, scenario: Any, serving: str, make, seed: int,
                 warmup: int) -> tuple[EpisodeResult, dict[str, float]]:
    """One controller on one seed of a simulated scenario, measured after `warmup` intervals.

    The cell both `scripts.compare` and the Ray sweep run: a fresh `SimCluster` (per-tick
    history on, VMs auto-placed only for the energy task), the controller through `ClusterEnv`,
    the summary of the measured part plus the shield's override count.

    Returns:
        (measured episode result, its summary with `shield_overrides`).
    """
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    backend = SimCluster(scenario, serving_model=serving, record_ticks=True,
                         auto_place_vms=task == "energy")
    result, driver = run_controller(lambda b: ClusterEnv(task=task, backend=b), backend, make, seed)
    measured = skip_warmup(result, warmup)
    summary = measured.summary()
    summary["shield_overrides"] = float(sum(bool(o) for o in driver.overrides[warmup:]))
    return measured, summary
