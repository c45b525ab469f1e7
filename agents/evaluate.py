"""Episode roll-outs of any Controller, and the comparison of a trained agent with static.

`run_episodes` is what the periodic evaluation during training and the checkpoint's final
evaluation run: episodes of the one runner (`envs.rollout.run_episode`), reduced to the totals
training selects on (`EpisodeStats`); the full comparison against every rule-based controller
and the oracle (plots, report) lives in the evaluation job over `controllers.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np

import llm_cluster_gym  # noqa: F401  (registers the LLMCluster ids)
from llm_cluster_gym.agents.config import WINDOWS
from llm_cluster_gym.envs.backend import slo_attainment
from llm_cluster_gym.envs.episode import EpisodeResult
from llm_cluster_gym.envs.rollout import run_episode as run_env_episode


@dataclass(frozen=True)
class EpisodeStats:
    """Totals of one episode (units in names), what training's model selection reads.

    ``slo_attainment`` counts every arrival, as the episode summary does
    (`envs.backend.slo_attainment`): dropped requests and the requests still in flight after the
    last interval are misses, so that shedding or stalling load never looks like meeting the
    SLO; NaN when the episode had no request at all.
    """

    seed: int
    reward: float
    energy_j: float
    slo_attainment: float
    finished: float
    dropped: float
    thermal_throttle_events: float
    power_throttle_events: float
    peak_row_power_w: float
    max_gpu_temp_c: float
    steps: int

    @classmethod
    def from_result(cls, result: EpisodeResult) -> EpisodeStats:
        """The totals of a recorded episode (summed interval by interval, in order)."""
        m = result.metrics

        def total(key: str) -> float:
            return sum(m[key].tolist(), 0.0)

        finished, dropped = total("finished"), total("dropped")
        unserved = max(float(m["in_flight"][-1]), 0.0) if result.n_intervals else 0.0
        attain = slo_attainment(finished, total("slo_violations"), dropped, unserved=unserved,
                                arrived=total("arrived"))
        peak_w = max_c = 0.0
        for w, c in zip(m["peak_row_power_w"].tolist(), m["max_gpu_temp_c"].tolist(), strict=True):
            peak_w, max_c = max(peak_w, w), max(max_c, c)
        return cls(seed=int(result.seed) if result.seed is not None else 0,
                   reward=sum(result.reward.tolist(), 0.0), energy_j=total("energy_j"),
                   slo_attainment=attain, finished=finished, dropped=dropped,
                   thermal_throttle_events=total("thermal_throttle_events"),
                   power_throttle_events=total("power_throttle_events"),
                   peak_row_power_w=peak_w, max_gpu_temp_c=max_c, steps=result.n_intervals)


def make_env(env_id: str, window: str | tuple[float, float] | None = "test",
             reward_weights: dict[str, float] | None = None) -> gym.Env:
    """A registered env on a named trace window ("train", "validation", "test") or (start_s, window_s)."""
    kwargs: dict[str, Any] = {}
    if window is not None:
        kwargs["trace_window_s"] = WINDOWS[window] if isinstance(window, str) else tuple(window)
    if reward_weights:
        kwargs["reward_weights"] = reward_weights
    return gym.make(env_id, disable_env_checker=True, **kwargs)


def run_episode(controller: Any, env: gym.Env, seed: int) -> EpisodeStats:
    """Roll one episode of `controller` on `env` from `seed` (the one runner) and total it."""
    return EpisodeStats.from_result(run_env_episode(env, controller, seed))


def run_episodes(controller: Any, env: gym.Env, seeds: Sequence[int]) -> list[EpisodeStats]:
    """One episode per seed."""
    return [run_episode(controller, env, int(s)) for s in seeds]


def summarize(stats: Sequence[EpisodeStats]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of every field over episodes."""
    rows = [asdict(s) for s in stats]
    out: dict[str, dict[str, float]] = {}
    for key in rows[0]:
        if key == "seed":
            continue
        v = np.array([r[key] for r in rows], dtype=float)
        out[key] = {"mean": float(v.mean()), "std": float(v.std())}
    return out


def compare_with_static(policy: Any, env_factory: Callable[[], gym.Env],
                        seeds: Sequence[int]) -> dict[str, Any]:
    """Policy vs the static baseline on the same env and seeds; ratios policy / static.

    The baseline is the one every report uses, `controllers.static.StaticController`
    (DynamoLLM's peak provisioning: TP 8, maximum clock, largest batch, never changed).
    """
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.controllers.static import StaticController

    env = env_factory()
    try:
        ours = run_episodes(policy, env, seeds)
        static = run_episodes(StaticController(ControllerContext.from_env(env)), env, seeds)
    finally:
        env.close()
    a, b = summarize(ours), summarize(static)
    return {
        "seeds": list(map(int, seeds)),
        "static_baseline": "llm_cluster_gym.controllers.static.StaticController",
        "policy": a,
        "static": b,
        "energy_ratio_vs_static": a["energy_j"]["mean"] / b["energy_j"]["mean"],
        "reward_gain_vs_static": a["reward"]["mean"] - b["reward"]["mean"],
        "beats_static_reward": bool(a["reward"]["mean"] > b["reward"]["mean"]),
        "per_seed_reward": {"policy": [s.reward for s in ours], "static": [s.reward for s in static]},
    }
