"""The one episode runner: a policy (or none) on a `ClusterEnv`, recorded as an `EpisodeResult`.

`run_episode` is what every offline measurement runs: the evaluation during and after training
(`agents.evaluate`), the comparison and sweep cells (`run_measured`, shared by
`scripts.compare`, the Ray sweep and the evaluation job) and the fixed-configuration simulation
(`llm-cluster simulate`, policy None). The policy sees exactly what it sees in training (the
observation and the action mask); the recorder reads the last interval's metrics and telemetry
through the env's public properties and the backend's description through the protocol.
"""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from llm_cluster_gym.envs.episode import EpisodeRecorder, EpisodeResult, ReportError, skip_warmup

__all__ = ["EpisodeResult", "run_episode", "run_measured", "skip_warmup"]


def run_episode(env: Any, policy: Any | None, seed: int | None, *, progress: bool = False,
                max_intervals: int | None = None, seed_backend: bool = False) -> EpisodeResult:
    """Run one episode of `policy` on `env` and record every interval.

    Each interval the policy picks the action from the observation and the action mask
    (``act(observation, action_mask)``, reset after the env); policy None holds the
    configuration the backend starts with (nothing is applied: the env steps with action
    None). The episode ends when the env terminates or truncates, or after `max_intervals`.

    Args:
        env: A `ClusterEnv` or a gymnasium wrapper of one.
        policy: Any controller or trained policy, or None for the fixed configuration.
        seed: Seed of the episode (``env.reset(seed=...)``).
        progress: Show a tqdm progress bar (on stderr).
        max_intervals: Stop after this many intervals even if the episode is not over (a live
            node's episode may never end).
        seed_backend: Seed the backend with `seed` itself rather than with a draw from the
            env's generator (how the fixed-configuration simulation has always been seeded).

    Returns:
        The episode's `EpisodeResult` (controller name: the policy's ``name`` or class name,
        "fixed" without a policy).

    Raises:
        ReportError: ``max_intervals`` is not positive.
    """
    if max_intervals is not None and max_intervals <= 0:
        raise ReportError(f"run_episode: field 'max_intervals' must be > 0, got {max_intervals!r}")
    base = env.unwrapped
    desc = base.backend.describe()
    total = desc.episode_intervals
    if max_intervals is not None:
        total = min(total, max_intervals) if total is not None else max_intervals
    name = "fixed" if policy is None else getattr(policy, "name", type(policy).__name__)
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed, options={"backend_seed": seed} if seed_backend else None)
    if policy is not None:
        policy.reset()
    rec = EpisodeRecorder(desc, seed, name)
    label = desc.scenario_name or "unknown"
    with tqdm(total=total, disable=not progress, desc=f"simulating {label}", unit="interval",
              leave=False) as bar:
        while max_intervals is None or rec.n_intervals < max_intervals:
            action = None if policy is None else policy.act(obs, base.action_masks())
            obs, reward, terminated, truncated, _ = env.step(action)
            override = () if policy is None else tuple(getattr(policy, "last_override", ()) or ())
            rec.record(base.last_metrics, base.last_telemetry, reward, override)
            bar.update(1)
            if terminated or truncated:
                break
    return rec.result(base.backend.tick_history(), time.perf_counter() - start)


def run_measured(task: str, scenario: Any, serving: str, make, seed: int,
                 warmup: int) -> tuple[EpisodeResult, dict[str, float]]:
    """One controller on one seed of a simulated scenario, measured after `warmup` intervals.

    The cell `scripts.compare`, the Ray sweep and the evaluation job run: a fresh `SimCluster`
    (per-tick history on, VMs auto-placed only for the energy task), the controller built by
    ``make(env)`` on a `ClusterEnv` over it, the summary of the measured part plus the count
    of intervals the shield overrode the policy (``shield_overrides``) and of those outside
    declared emergencies (``shield_overrides_avoidable``).

    Returns:
        (measured episode result, its summary with both counts).
    """
    from llm_cluster_gym.envs.cluster_env import ClusterEnv
    from llm_cluster_gym.envs.sim.cluster import SimCluster

    backend = SimCluster(scenario, serving_model=serving, record_ticks=True,
                         auto_place_vms=task == "energy")
    env = ClusterEnv(task=task, backend=backend)
    result = run_episode(env, make(env), seed)
    measured = skip_warmup(result, warmup)
    summary = measured.summary()
    summary["shield_overrides"] = float(measured.override_count())
    summary["shield_overrides_avoidable"] = float(measured.avoidable_override_count())
    return measured, summary
