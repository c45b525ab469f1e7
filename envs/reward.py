"""Rewards: a weighted sum of normalized cost terms, returned with every term for `info`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from llm_cluster_gym.envs.backend import ServiceMetrics


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the cost terms (the reward is minus their weighted sum).

    Terms, each per control interval:
        energy: cluster energy over the energy of every GPU at its 700 W limit (fraction of peak).
        slo: fraction of the requests judged in the interval that missed an SLO: 1 - its SLO
            attainment (`envs.backend.slo_attainment`). The requests judged are those that
            finished or were dropped in the interval; in the episode's last interval the
            requests still in flight count too, as violations. An interval that judged none
            costs 0.
        thermal: thermal-throttling events (a GPU crossing its slowdown temperature).
        power: power-throttling events (a row entering power capping).
        quality: mean quality loss per finished request (quantized serving).
    """

    energy: float = 1.0
    slo: float = 4.0
    thermal: float = 0.0
    power: float = 0.0
    quality: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Weights by term name."""
        return asdict(self)


TASK_WEIGHTS = {
    "energy": RewardWeights(energy=1.0, slo=4.0),
    "thermal": RewardWeights(energy=0.2, slo=4.0, thermal=0.5, power=0.5, quality=2.0),
    "combined": RewardWeights(energy=1.0, slo=4.0, thermal=0.5, power=0.5, quality=2.0),
}
"""Default weights per task (constructor arguments override them)."""

TERMS = ("energy", "slo", "thermal", "power", "quality")

_TERM_KEYS = tuple((name, f"cost_{name}", f"reward_{name}") for name in TERMS)
"""Each term with its `info` keys."""


@lru_cache(maxsize=64)
def weights_dict(weights: RewardWeights) -> dict[str, float]:
    """`RewardWeights.as_dict`, memoized (the weights are frozen; the hot path asks every step)."""
    return weights.as_dict()


def reward_terms(m: ServiceMetrics, energy_ref_j: float, episode_end: bool = False
                 ) -> dict[str, float]:
    """Normalized cost terms of one interval (all >= 0).

    Args:
        m: The interval's service metrics.
        energy_ref_j: Energy of every GPU at its power limit over the interval (J).
        episode_end: True for the episode's last interval: its requests still in flight are
            SLO violations (as in the episode's attainment), so that a policy gains nothing by
            leaving requests unserved when the episode ends.
    """
    unserved = m.in_flight if episode_end else 0.0
    judged = m.finished + m.dropped + unserved
    return {
        "energy": m.energy_j / energy_ref_j,
        "slo": (m.slo_violations + m.dropped + unserved) / judged if judged > 0 else 0.0,
        "thermal": float(m.thermal_throttle_events),
        "power": float(m.power_throttle_events),
        "quality": m.quality_loss / m.finished if m.finished > 0 else 0.0,
    }


def compute_reward(
    m: ServiceMetrics, weights: RewardWeights, energy_ref_j: float, episode_end: bool = False
) -> tuple[float, dict[str, float]]:
    """Reward and its terms (`cost_<term>` unweighted, `reward_<term>` weighted and signed).

    ``episode_end`` marks the episode's last interval (see `reward_terms`).
    """
    terms = reward_terms(m, energy_ref_j, episode_end)
    w = weights_dict(weights)
    out: dict[str, float] = {}
    total = 0.0
    for name, cost_key, reward_key in _TERM_KEYS:
        r = -w[name] * terms[name]
        out[cost_key] = terms[name]
        out[reward_key] = r
        total += r
    return total, out
