"""Episode roll-outs of any Controller, and the comparison of a trained agent with static.

`run_episodes` is the one loop used by the periodic evaluation during training and by the
checkpoint's final evaluation; the full comparison against every rule-based controller and the
oracle (plots, report) lives in the evaluation job over `controllers.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from llm_cluster_gym.agents.config import WINDOWS

import llm_cluster_gym  # noqa: F401  (registers the LLMCluster ids)


@dataclass(frozen=True)
class EpisodeStats:
    """Totals of one episode (units in names)."""

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
    """Roll one episode of `controller` on `env` from `seed`."""
    controller.reset()
    obs, _ = env.reset(seed=seed)
    masks_fn = getattr(env.unwrapped, "action_masks", None)
    totals = dict.fromkeys(("reward", "energy_j", "finished", "dropped", "slo_violations",
                            "thermal_throttle_events", "power_throttle_events"), 0.0)
    peak_w, max_c, steps, done = 0.0, 0.0, 0, False
    while not done:
        mask = masks_fn() if masks_fn is not None else None
        obs, reward, terminated, truncated, info = env.step(controller.act(obs, mask))
        totals["reward"] += reward
        for k in ("energy_j", "finished", "dropped", "slo_violations",
                  "thermal_throttle_events", "power_throttle_events"):
            totals[k] += info[k]
        peak_w = max(peak_w, info["peak_row_power_w"])
        max_c = max(max_c, info["max_gpu_temp_c"])
        steps += 1
        done = terminated or truncated
    served = totals["finished"] + totals["dropped"]
    attain = 1.0 - (totals["slo_violations"] + totals["dropped"]) / served if served > 0 else 1.0
    return EpisodeStats(seed=seed, reward=totals["reward"], energy_j=totals["energy_j"],
                        slo_attainment=attain, finished=totals["finished"], dropped=totals["dropped"],
                        thermal_throttle_events=totals["thermal_throttle_events"],
                        power_throttle_events=totals["power_throttle_events"],
                        peak_row_power_w=peak_w, max_gpu_temp_c=max_c, steps=steps)


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
